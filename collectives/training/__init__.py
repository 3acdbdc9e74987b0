"""Outer loops for training through churn and slow links, over any communicator (the
elastic engine's ElasticComm under `commlib elastic-run`; MPIComm works where nobody joins
or dies).

    comm = collectives.init()
    outer = collectives.training.DiLoCo(model, inner_optimizer, comm, sync_every=50,
                                        fragments=4, delay=5, quantize="uint8", overlap=True)
    for batch in data:
        loss = model(batch).mean(); loss.backward()
        inner_optimizer.step(); inner_optimizer.zero_grad()
        outer.step()                  # syncs, joins, recovers when due

DiLoCo (Douillard et al. 2023), its overlapped and streaming forms (one outer step late;
fragments with `delay` inner steps of overlap) and CO2 (Sun et al., ICLR 2024: staleness
gap penalty, outer momentum clipping) share one machinery: diloco.py; co2.py adds CO2's
outer update.
"""
from collectives.training.diloco import DiLoCo
from collectives.training.co2 import CO2

__all__ = ["DiLoCo", "CO2"]
