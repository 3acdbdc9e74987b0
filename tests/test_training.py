"""collectives.training (DiLoCo, streaming, CO2): the outer loop's arithmetic, rollback,
fragment order, penalty and clipping against a stand-in communicator (in this process);
then examples/diloco_train.py under `commlib elastic-run` through a SIGKILL and a joiner in
every mode, state parity checked every outer period."""
import math
import os
import re
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

import harness  # noqa: E402
from collectives.elastic import PeerFailure  # noqa: E402
from collectives.training import CO2, DiLoCo  # noqa: E402
from collectives.training.diloco import quantize_like_the_wire  # noqa: E402

EXAMPLE = os.path.join(harness.ROOT, "examples", "diloco_train.py")


class _Work:
    def __init__(self, error=None):
        self.error = error

    def wait(self, timeout=None):
        if self.error:
            raise self.error


class StandIn:
    """An elastic communicator of `peers` peers that all hold what this one holds: a sum is
    peers * x.  fail_at: the all-reduce calls (1-based) that fail with PeerFailure."""

    def __init__(self, peers=3, fail_at=()):
        self.peers, self.fail_at, self.calls, self.world = peers, set(fail_at), [], peers
        self.topology_updates, self.syncs, self.sent = 0, [], []
        self.group_state = None  # sync_state: name -> tensor the group holds (a joiner fetches it)

    def all_reduce(self, x, op="sum", async_op=False, timeout=None, quantize=None):
        self.calls.append((x.numel(), op, quantize))
        self.sent.append(x.clone())
        if len(self.calls) in self.fail_at:
            work = _Work(PeerFailure("a peer died (stand-in)"))
        else:
            if op == "sum":
                x.mul_(self.peers)
            work = _Work()
        if async_op:
            return work
        work.wait()
        return x

    def update_topology(self, timeout=None):
        self.topology_updates += 1

    def sync_state(self, state, revision, timeout=None):
        self.syncs.append(revision)
        fetched = 0
        if revision is None and self.group_state:
            for name, t in self.group_state.items():
                state[name].copy_(t)
                fetched += t.numel() * t.element_size()
        return {"revision": revision, "fetched_bytes": fetched, "digest": ""}


def model_and_optimizer(seed=0, sizes=(3, 4, 2)):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])]
    model = torch.nn.Sequential(*layers)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def inner_step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, model[0].in_features, generator=g)
    model(x).square().sum().backward()
    opt.step()
    opt.zero_grad()


def flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params])


def test_a_blocking_round_is_nesterov_sgd_on_the_averaged_pseudo_gradient():
    model, opt = model_and_optimizer()
    comm = StandIn(peers=3)
    outer = DiLoCo(model, opt, comm, sync_every=3, outer_lr=0.7, outer_momentum=0.9)
    g0 = flat(model.parameters()).clone()
    for s in range(2):
        inner_step(model, opt, s)
        assert outer.step() == 0
    inner_step(model, opt, 2)
    local = flat(model.parameters()).clone()
    assert outer.step() == 1 and outer.outer_steps == 1 and outer.inner_step == 3
    delta = g0 - local  # every peer holds the same: the average is this peer's own
    momentum = delta
    expected = g0 - 0.7 * (delta + 0.9 * momentum)
    assert torch.allclose(flat(outer.global_parameters()), expected, atol=1e-7)
    assert torch.equal(flat(model.parameters()), flat(outer.global_parameters()))  # local <- global
    # count and pseudo-gradient all-reduced, as sums; membership at start and at the period
    assert [c[1] for c in comm.calls] == ["sum", "sum"] and comm.calls[0][0] == 1
    # (the first membership skips update_topology: collectives.init() admitted the peer already)
    assert comm.syncs == [0, 1] and comm.topology_updates == 1


def test_a_failed_round_changes_nothing_and_is_retried_with_a_fresh_membership():
    model, opt = model_and_optimizer()
    comm = StandIn(peers=2, fail_at={2})  # the first pseudo-gradient all-reduce fails
    outer = DiLoCo(model, opt, comm, sync_every=2)
    g0 = flat(outer.global_parameters()).clone()
    inner_step(model, opt, 0)
    outer.step()
    inner_step(model, opt, 1)
    local = flat(model.parameters()).clone()
    assert outer.step() == 1
    kinds = [e["kind"] for e in outer.events]
    assert kinds == ["sync", "sync", "rollback", "sync", "commit"] and outer.failures == 1
    assert "stand-in" in outer.events[2]["error"]
    # the retry sent the same pseudo-gradient: the result is the unfailed formula's
    delta = g0 - local
    assert torch.allclose(flat(outer.global_parameters()), g0 - 0.7 * (delta + 0.9 * delta), atol=1e-7)
    assert comm.syncs == [0, 1, 1]  # the retry's membership re-synchronised at the same revision


def test_overlap_applies_a_round_late_and_keeps_the_local_progress():
    model, opt = model_and_optimizer()
    comm = StandIn(peers=4)
    outer = DiLoCo(model, opt, comm, sync_every=2, overlap=True, outer_lr=0.5, outer_momentum=0.0)
    assert outer.delay == 2
    g0 = flat(outer.global_parameters()).clone()
    for s in range(2):
        inner_step(model, opt, s)
        outer.step()
    snapshot = flat(model.parameters()).clone()  # round 1 launched at step 2, in flight
    assert torch.equal(flat(outer.global_parameters()), g0) and outer.outer_steps == 0
    for s in range(2, 4):
        inner_step(model, opt, s)
        if s == 2:
            outer.step()
    local = flat(model.parameters()).clone()
    assert outer.step() == 1  # step 4: round 1 applied, round 2 launched
    g1 = g0 - 0.5 * (g0 - snapshot)
    assert torch.allclose(flat(outer.global_parameters()), g1, atol=1e-7)
    # the local weights: the new global ones plus the two steps taken since the snapshot
    assert torch.allclose(flat(model.parameters()), g1 + (local - snapshot), atol=1e-6)


def test_fragments_go_in_an_order_keyed_on_the_shared_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(3)])  # 6 tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    comm = StandIn(peers=2)
    outer = DiLoCo(model, opt, comm, sync_every=6, fragments=3, overlap=True, delay=1)
    assert [f.offset for f in outer._frags] == [0, 2, 4]
    assert [sum(p.numel() for p in f.params) for f in outer._frags] == [20, 20, 20]
    for s in range(12):
        inner_step(model, opt, s)
        outer.step()
    commits = [(e["fragment"], e["step"]) for e in outer.events if e["kind"] == "commit"]
    assert commits == [(1, 3), (2, 5), (0, 7), (1, 9), (2, 11)]  # launched at 2, 4, 6, 8, 10; one step late
    with pytest.raises(ValueError, match="fragments"):
        DiLoCo(model, opt, comm, sync_every=6, fragments=7)


def test_error_feedback_keeps_what_compression_left_out():
    model, opt = model_and_optimizer()
    comm = StandIn(peers=1)
    outer = DiLoCo(model, opt, comm, sync_every=1, quantize="uint4")
    assert outer.error_feedback and comm.calls == []
    g0 = flat(outer.global_parameters()).clone()
    inner_step(model, opt, 0)
    delta = g0 - flat(model.parameters())
    outer.step()
    assert comm.calls[-1][2] == "uint4"
    residual = outer._frags[0].residual
    assert torch.allclose(residual, delta - quantize_like_the_wire(delta, "uint4"), atol=1e-7)
    assert residual.abs().max() > 0  # 4 bits leave something out
    assert (residual.abs() <= (delta.max() - delta.min()) / 15 / 2 + 1e-7).all()


def test_co2_penalises_the_staleness_gap_and_clips_the_momentum():
    model, opt = model_and_optimizer()
    comm = StandIn(peers=2)
    outer = CO2(model, opt, comm, sync_every=1, outer_lr=1.0, outer_momentum=0.5, staleness_penalty=2.0,
                clip_norm=1e-3)
    assert outer.delay == 1 and outer.fragments == 1
    f = outer._frags[0]
    for s in range(4):
        g_before, prev_before, m_before = f.glob.clone(), outer._previous[0].clone(), f.momentum.clone()
        inner_step(model, opt, s)
        outer.step()
        if outer.outer_steps < 2:
            continue
        last = [e for e in outer.events if e["kind"] == "commit"][-1]
        assert last["step"] == s + 1
        gap = (g_before - prev_before).abs()
        assert gap.max() > 0
        divisor = 1 + 2.0 * gap / gap.mean()
        assert outer.last_penalty[1] > 1.0 and math.isclose(outer.last_penalty[1], float(divisor.max()), rel_tol=1e-5)
        # the momentum is clipped to the threshold, and the clipped one is kept
        assert outer.last_clip < 1.0
        assert math.isclose(float(f.momentum.double().norm()), 1e-3, rel_tol=1e-5)
        assert torch.allclose(f.glob, g_before - f.momentum, atol=1e-7)  # lr 1, no Nesterov: G -= m
        assert torch.equal(outer._previous[0], g_before)
        assert not torch.equal(f.momentum, m_before)
    assert outer.outer_steps == 3  # launched at 1, 2, 3, applied at 2, 3, 4


def test_a_joiner_contributes_nothing_to_the_round_it_joins_in():
    model, opt = model_and_optimizer()
    comm = StandIn(peers=2)
    comm.world = 0  # not admitted yet: the first membership runs update_topology
    group = {"step": torch.tensor([4]), "fragment0/global": torch.full((26,), 0.5),
             "fragment0/momentum": torch.full((26,), 0.25)}
    comm.group_state = group  # the members are at step 4, a period start (sync_every 2)
    outer = DiLoCo(model, opt, comm, sync_every=2, joiner=True)
    assert comm.topology_updates == 1 and comm.syncs == [None]  # a joiner offers no state
    assert outer.inner_step == 4 and outer.outer_steps == 1  # it took part in the members' round at step 4
    count, delta = comm.sent
    assert int(count[0]) == 0 and not delta.any()  # ... adding nothing to it
    # (the stand-in mirrors this peer: nobody contributed, so the round changed nothing) and
    # the joiner's local weights are the group's global ones
    assert torch.equal(flat(outer.global_parameters()), torch.full((26,), 0.5))
    assert torch.equal(flat(model.parameters()), flat(outer.global_parameters()))


def test_bad_arguments_are_clear_errors():
    model, opt = model_and_optimizer()
    comm = StandIn()
    for kwargs, match in [({"sync_every": 0}, "sync_every"), ({"delay": 3}, "overlap"),
                          ({"overlap": True, "delay": 9, "sync_every": 4}, "delay"),
                          ({"alpha": 2.0}, "alpha"), ({"quantize": "int3"}, "quantize"),
                          ({"error_feedback": True}, "quantize")]:
        with pytest.raises(ValueError, match=match):
            DiLoCo(model, opt, comm, **kwargs)

    class NoState:  # an MPI-like communicator: no elastic all-reduce to quantize
        world = 1

    with pytest.raises(ValueError, match="ElasticComm"):
        DiLoCo(model, opt, NoState(), quantize="uint8")
    with pytest.raises(ValueError, match="clip_norm"):
        CO2(model, opt, comm, clip_norm=0)


@pytest.mark.parametrize("overlap", [False, True])
def test_diloco_over_mpi(overlap, tmp_path):
    """MPIComm: no membership, rank 0's initial weights for everyone, parity every period."""
    proc = harness.run_mpi(2, [sys.executable, os.path.join(harness.TESTS_DIR, "diloco_mpi_worker.py"), str(tmp_path),
                               *(["--overlap"] if overlap else [])], timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [(tmp_path / f"rank{r}.txt").read_text().split() for r in range(2)]
    assert [r[:2] for r in rows] == [["3", "3"], ["3", "3"]], rows  # rounds at 3, 6, 9; parity checks at 3, 6, 9
    assert rows[0][2] == rows[1][2] and len(rows[0][2]) == 64, rows


def run_example(*args, launcher=(), timeout=400):
    env = harness.clean_env(COMMLIB_ELASTIC_QUIET="1", COMMLIB_ELASTIC_TIMEOUT="2")
    proc = subprocess.run([*harness.commlib_cli(), "elastic-run", "-n", "3", *launcher, EXAMPLE, *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


SMALL = ["--steps", "90", "--sync-every", "15", "--dim", "64", "--corpus-mb", "0.5", "--kill-at", "30",
         "--join-at", "44"]


@pytest.mark.parametrize("mode, extra", [("diloco", []), ("overlap", []), ("streaming", ["--quantize", "uint4"]),
                                         ("co2", ["--quantize", "uint8", "--clip-norm", "5"])])
def test_example_trains_through_a_kill_and_a_joiner(mode, extra):
    # diloco also loses its coordinator (SIGKILL during an outer all-reduce): the standby
    # takes over and the round commits
    coordinator = ["--kill-coordinator", "--kill-coordinator-at", "75"] if mode == "diloco" else []
    rc, out = run_example("--mode", mode, *SMALL, *extra, "--kill-one", "--join-one", *coordinator,
                          launcher=["--standby"] if coordinator else [])
    assert rc == 0, out
    assert "SIGKILL to myself during the all-reduce" in out, out
    assert re.search(r"\[peer joiner \(id \d+\)\] admitted at step 45", out), out
    done = re.findall(r"done at step 90: held-out loss ([\d.]+) -> ([\d.]+).*sha256 ([0-9a-f]{16})", out)
    assert len(done) == 3, out  # two survivors and the joiner
    assert len({d[2] for d in done}) == 1, out  # one shared state, bit for bit
    assert len({d[1] for d in done}) == 1, out
    members = [float(d[0]) for d in done if float(d[0]) > 5]  # the joiner's first loss is the group's
    assert len(members) == 2 and float(done[0][1]) < min(members) - 1.5, out  # the loss fell
    assert "parity broken" not in out
    if mode == "diloco":  # a blocking round: rolled back and retried at once
        m = re.findall(r"step 30: committed ([\d.]+) s after the failed round", out)
        assert len(m) == 2, out  # both survivors
        # the coordinator's SIGKILL (step 75) may abort the all-reduce in flight too, or not: either
        # way, every peer that rolled a round back committed it at the same step
        rolled = re.findall(r"\[peer ([^]]+)\] step (\d+): round rolled back", out)
        retried = re.findall(r"\[peer ([^]]+)\] step (\d+): committed [\d.]+ s after the failed round", out)
        assert sorted(rolled) == sorted(retried) and {s for _, s in rolled} <= {"30", "75"}, out
        assert "SIGKILL to the active coordinator" in out, out
        assert re.search(r"step 75: committed [\d.]+ s after the coordinator's SIGKILL", out), out
        assert "failovers': 1" in out, out  # the standby took over
