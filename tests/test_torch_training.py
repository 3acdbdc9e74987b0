"""Training with torch over commlib: examples/ddp_train.py (DDP on the "commlib" backend,
checked by the example itself every step: parameters identical on every rank, equal to a
replica trained on the global batch), FSDP2 against DDP (tests/torch_fsdp_worker.py), and
examples/elastic_ddp.py (ElasticDataParallel through a SIGKILL and a joiner, parity every
step).  CUDA variants run where a GPU is (tests/gpu/session.sh, stage torch)."""
import os
import re
import subprocess
import sys

import pytest

import harness

torch = pytest.importorskip("torch")

DDP = os.path.join(harness.ROOT, "examples", "ddp_train.py")
FSDP = os.path.join(harness.TESTS_DIR, "torch_fsdp_worker.py")
ELASTIC = os.path.join(harness.ROOT, "examples", "elastic_ddp.py")
GPU = torch.cuda.is_available()


def _run(ranks, argv, timeout=240):
    proc = harness.run_mpi(ranks, [sys.executable, *argv], timeout=timeout)
    return proc, proc.stdout + proc.stderr[-4000:]


@pytest.mark.parametrize("ranks,extra", [
    (4, []),
    (2, ["--model", "transformer", "--width", "64", "--hook", "quantized"]),
    (3, ["--hook", "allreduce", "--accumulate", "2", "--unused", "--bucket-mb", "0.01", "--batch", "60"]),
    (2, ["--hook", "powersgd"]),
    (2, ["--hook", "fp16"]),
], ids=["mlp-4", "transformer-quantized-2", "allreduce-hook-accumulate-unused-3", "powersgd-2", "fp16-2"])
def test_ddp_example_verifies_itself(ranks, extra):
    if "powersgd" in extra and GPU:
        # torch's PowerSGD hook calls torch.cuda.synchronize(tensor's device) whenever CUDA is
        # available, which fails for CPU tensors (torch's own bug): on a GPU machine it trains on CUDA
        extra = [*extra, "--device", "cuda"]
    proc, out = _run(ranks, [DDP, "--steps", "12", *extra])
    assert proc.returncode == 0, out
    assert f"ddp_train: OK ranks={ranks} backend=commlib" in proc.stdout, out


def test_ddp_bf16_hook():
    if not (torch.distributed.is_nccl_available() and GPU):
        pytest.skip("torch's bf16_compress_hook refuses to run without CUDA and NCCL (its own check)")
    proc, out = _run(2, [DDP, "--steps", "8", "--hook", "bf16", "--device", "cuda"])
    assert proc.returncode == 0 and "ddp_train: OK" in proc.stdout, out


@pytest.mark.parametrize("ranks", [2, 4])
def test_fsdp2_matches_ddp(ranks):
    proc, out = _run(ranks, [FSDP, "--steps", "6"])
    assert proc.returncode == 0, out
    assert f"fsdp: OK ranks={ranks}" in proc.stdout, out


@pytest.mark.skipif(not GPU, reason="no GPU")
@pytest.mark.parametrize("script", ["ddp", "fsdp"])
def test_cuda_training(script):
    argv = [DDP, "--steps", "10", "--device", "cuda"] if script == "ddp" else [FSDP, "--steps", "6", "--device", "cuda"]
    proc, out = _run(2, argv)
    assert proc.returncode == 0, out
    assert ("ddp_train: OK" if script == "ddp" else "fsdp: OK") in proc.stdout and "device=cuda" in proc.stdout, out


def test_elastic_ddp_survives_a_kill_and_a_joiner():
    proc = subprocess.run([*harness.commlib_cli(), "elastic-run", "-n", "3", ELASTIC, "--kill-one", "--join-one",
                           "--steps", "30", "--kill-at", "8", "--join-at", "16"],
                          capture_output=True, text=True, timeout=300, env=harness.clean_env())
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    assert "killing myself" in out and "joined: first committed step" in out, out
    # every peer that ended has the same model and optimizer state (2 survivors + the joiner)
    finals = re.findall(r"done at step 30, loss [0-9.]+, state sha256 ([0-9a-f]{16})", out)
    assert len(finals) == 3 and len(set(finals)) == 1, out
    # a step that failed failed on every survivor alike
    failed = {}
    for peer, step in re.findall(r"\[(peer \S+) \(id \d+\)\] step (\d+): not committed", out):
        failed.setdefault(step, set()).add(peer)
    for step, peers in failed.items():
        assert len(peers) == 2, (step, peers, out)
    losses = [float(x) for x in re.findall(r"world \d+  loss ([0-9.]+)", out)]
    assert losses and losses[-1] < losses[0], out


class _FakeWork:
    def __init__(self, error):
        self.error = error

    def wait(self):
        if self.error is not None:
            raise self.error


class _FakeComm:
    """A one-peer stand-in for ElasticComm: records the all-reduces, fails the N-th."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def all_reduce(self, x, op, async_op, timeout=None, quantize=False):
        from collectives.elastic import PeerFailure
        self.calls.append((x.dtype, x.numel(), op))
        if len(self.calls) == self.fail_at:
            return _FakeWork(PeerFailure("a peer died (stand-in)"))
        x.mul_(2.0)  # visible: the "average" doubles the gradient
        return _FakeWork(None)


def test_elastic_ddp_buckets_per_dtype_and_a_failed_step_changes_nothing():
    import collectives.torch as ct
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4).double(), torch.nn.Linear(4, 4))
    comm = _FakeComm(fail_at=2)
    ddp = ct.ElasticDataParallel(model, comm, bucket_cap_mb=1)
    assert [[p.dtype for p in b] for b in ddp._buckets] == [[torch.float32] * 2, [torch.float64] * 2,
                                                            [torch.float32] * 2]

    def backward():
        x = torch.randn(3, 4)
        h = model[0](x).double()
        model[2](model[1](h).float()).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    local = backward()
    assert not ddp.should_commit() and "stand-in" in str(ddp.last_error) and ddp.step == 0
    for p, g in zip(model.parameters(), local):  # the failed step left the local gradients
        assert torch.equal(p.grad, g)
    assert [c[0] for c in comm.calls] == [torch.float32, torch.float64, torch.float32]  # every bucket started
    model.zero_grad(set_to_none=True)
    comm.calls.clear()
    comm.fail_at = None
    local = backward()
    assert ddp.should_commit() and ddp.last_error is None and ddp.step == 1
    for p, g in zip(model.parameters(), local):  # the all-reduced (here: doubled) gradients
        assert torch.equal(p.grad, 2 * g)
    with ddp.no_sync():
        backward()
    assert comm.calls and len(comm.calls) == 3  # no_sync started nothing new
