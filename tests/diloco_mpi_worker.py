"""DiLoCo over MPIComm (tests/test_training.py): ranks start from different weights; the
first sync gives everyone rank 0's, every period's parity check passes, every rank ends with
the same shared state.  Writes OUTDIR/rank<R>.txt: committed rounds, parity checks, state digest
(a file each: the ranks' stdout lines may interleave under the launcher)."""
import os
import sys

import torch

import collectives
from collectives.training import DiLoCo

comm = collectives.init("mpi")
torch.manual_seed(comm.rank)  # different initial weights on every rank
model = torch.nn.Linear(8, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
outer = DiLoCo(model, opt, comm, sync_every=3, check_parity=True, overlap="--overlap" in sys.argv)
g = torch.Generator().manual_seed(100 + comm.rank)  # and different data
for s in range(9):
    x = torch.randn(4, 8, generator=g)
    model(x).square().sum().backward()
    opt.step()
    opt.zero_grad()
    outer.step()
outer.sync()
with open(os.path.join(sys.argv[1], f"rank{comm.rank}.txt"), "w") as f:
    f.write(f"{outer.outer_steps} {outer.parity_checks} {outer.state_digest()}\n")
