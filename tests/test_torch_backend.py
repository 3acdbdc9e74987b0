"""The "commlib" torch.distributed backend (collectives/torch.py) against plain torch math.

Each multi-rank test is one launch, with the installed `commlib` CLI (`commlib run -n N`), of
tests/torch_backend_worker.py, which runs many cases and prints `case <name> ok|FAIL <why>` per
case (see its docstring: inputs, references, exactness).  Here the list of cases the launch must
have run (torch_backend_worker.plan) is compared with what it printed, and every case must pass.

Launches: the op x dtype x ReduceOp matrix plus the extras (complex, PREMUL_SUM factors,
non-contiguous, empty and 0-d tensors, uneven all_to_all, p2p from any source, objects), async
work, new_group subsets, errors and the coalescing manager / functional collectives at 2 and 4
ranks (every dtype) and at 3 ranks (a lighter dtype subset); DDP at 2 and 4 ranks;
init_process_group("cpu:gloo,cuda:commlib") at 2 ranks; one rank; the engine's MPI transport
with small chunks.  The ranks start in a temporary
directory, so that they import the installed package, never the checkout.

The seed is printed by each test (and is in every failure message); COMMLIB_TEST_SEED=N reruns
with it.
"""
import os
import random
import re
import signal
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed")
pytest.importorskip("mpi4py")

import harness  # noqa: E402
import torch_backend_worker as worker  # noqa: E402

WORKER = os.path.join(harness.TESTS_DIR, "torch_backend_worker.py")
SEED = int(os.environ.get("COMMLIB_TEST_SEED", random.randrange(1 << 30)))
LAUNCH_TIMEOUT = 150  # seconds per launch; each takes 4-20 s on two cores
OPS = ["matrix", "extras", "async", "groups", "errors", "coalescing"]

LAUNCHES = {
    "2ranks": dict(ranks=2, level="full", suites=OPS),
    "4ranks": dict(ranks=4, level="full", suites=OPS),
    "3ranks": dict(ranks=3, level="light", suites=OPS),
    "ddp-2ranks": dict(ranks=2, level="full", suites=["ddp"]),
    "ddp-4ranks": dict(ranks=4, level="full", suites=["ddp"]),
    "gloo-cpu-2ranks": dict(ranks=2, level="light", suites=["mixed"], init="cpu:gloo,cuda:commlib"),
    "1rank": dict(ranks=1, level="light", suites=OPS + ["ddp"]),
    # the engine over MPI point-to-point instead of shared memory, in chunks of 4 kB: the
    # 40 kB tensors move in many pieces
    "2ranks-mpi-transport-small-chunks": dict(ranks=2, level="light", suites=OPS, env={
        "COMMLIB_ENGINE_TRANSPORT": "mpi", "COMMLIB_ENGINE_CHUNK_KB": "4", "COMMLIB_ENGINE_SLICE_KB": "4",
        "COMMLIB_ENGINE_SMALL_KB": "1"}),
}


class Launch:
    def __init__(self, cmd, rc, out, err, timed_out):
        self.cmd, self.rc, self.out, self.err, self.timed_out = cmd, rc, out, err, timed_out
        self.cases = {}  # name -> None (ok) or why
        self.order = []
        self.summary = None
        self.package = None
        for line in out.splitlines():
            m = re.match(r"case (\S+) (ok|FAIL)(?: (.*))?$", line)
            if m:
                self.cases[m.group(1)] = None if m.group(2) == "ok" else (m.group(3) or "")
                self.order.append(m.group(1))
            elif line.startswith("summary "):
                self.summary = dict(kv.split("=", 1) for kv in line.split()[1:])
            elif line.startswith("collectives "):
                self.package = line.split(" ", 1)[1]

    def context(self):
        """What a failure message shows: the seed, the command, the end of the output."""
        lines = self.err.splitlines()
        err = "\n".join(ln for ln in lines if not ln.startswith("running ") and "Warning" not in ln
                        and "return func(" not in ln)
        last = [ln for ln in lines if ln.startswith("running ")][-1:]
        return (f"seed {SEED}; command: {' '.join(self.cmd)}\nrc={self.rc} timed_out={self.timed_out} "
                f"last case started: {last}\nstdout tail:\n{self.out[-3000:]}\nstderr tail:\n{err[-3000:]}")


def child_env(extra=None):
    env = harness.clean_env(PYTHONFAULTHANDLER="1", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "TORCH_DISTRIBUTED_DEBUG", "COMMLIB_ENGINE_TRANSPORT", "COMMLIB_ENGINE_CHUNK_KB",
              "COMMLIB_ENGINE_SLICE_KB", "COMMLIB_ENGINE_SMALL_KB", "MPI4PY_RC_THREAD_LEVEL"):
        env.pop(k, None)
    env.update(extra or {})
    # the ranks import the installed package: no path into the checkout
    path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
            if p and not os.path.abspath(p).startswith(harness.ROOT)]
    if path:
        env["PYTHONPATH"] = os.pathsep.join(path)
    else:
        env.pop("PYTHONPATH", None)
    return env


def run_launch(ranks, level, suites, tmp_dir, init="commlib", env=None, timeout=LAUNCH_TIMEOUT):
    argv = [sys.executable, WORKER, "--seed", str(SEED), "--level", level, "--suites", ",".join(suites),
            "--init", init]
    cmd = [*harness.commlib_cli(), "run", "-n", str(ranks), "--", *argv]
    # cwd outside the checkout; a session of its own, so that a hang is ended with every rank
    proc = subprocess.Popen(cmd, cwd=str(tmp_dir), env=child_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
    return Launch(cmd, proc.returncode, out, err, timed_out)


def check_launch(launch, expected):
    """Every expected case ran, in order, and passed; the ranks imported the installed package."""
    assert not launch.timed_out, "the launch hung\n" + launch.context()
    assert launch.summary is not None, "no summary line\n" + launch.context()
    # the ranks import the package this pytest imports (the installed one; an editable install is
    # the checkout itself, as on the GPU machine), never the source tree by accident of the cwd
    import collectives
    installed = os.path.dirname(os.path.abspath(collectives.__file__))
    assert launch.package and os.path.abspath(launch.package) == installed, \
        f"the ranks imported collectives from {launch.package}, not the installed {installed}\n" + launch.context()
    missing = [n for n in expected if n not in launch.cases]
    extra = [n for n in launch.cases if n not in set(expected)]
    assert not missing and not extra, f"missing cases {missing[:20]}, unexpected {extra[:20]}\n" + launch.context()
    assert launch.order == list(expected), "cases ran in another order\n" + launch.context()
    failures = {n: why for n, why in launch.cases.items() if why is not None}
    assert int(launch.summary["failed"]) == len(failures) and int(launch.summary["cases"]) == len(expected)
    assert not failures, (f"{len(failures)} of {len(expected)} cases failed:\n" +
                          "\n".join(f"  {n}: {why[:600]}" for n, why in list(failures.items())[:40]) +
                          "\n" + launch.context())
    assert launch.rc == 0, launch.context()


@pytest.mark.parametrize("launch_id", list(LAUNCHES))
def test_torch_backend(launch_id, tmp_path):
    print("seed", SEED)
    spec = LAUNCHES[launch_id]
    init = spec.get("init", "commlib")
    expected = worker.plan(spec["ranks"], spec["level"], spec["suites"], init)
    launch = run_launch(spec["ranks"], spec["level"], spec["suites"], tmp_path, init, spec.get("env"))
    print(launch.summary)
    check_launch(launch, expected)


# -- the worker's oracle (what every case is checked against) ---------------------------------

@pytest.fixture(scope="module")
def w():
    worker.import_torch()
    return worker


def test_plan_names_are_unique_and_cover_every_op(w):
    """Names never depend on the rank (every rank runs the same sequence) and are unique; the full
    matrix has every dtype x every ReduceOp it supports for each reduction."""
    for ranks in (1, 2, 3, 4):
        names = w.plan(ranks, "full", w.SUITES)
        assert len(names) == len(set(names)) and all(" " not in n for n in names)
    names = set(w.plan(4, "full", OPS))
    for dtype in w.ALL_DTYPES:
        for op in w.valid_ops(dtype):
            for what in ("all_reduce", "reduce_scatter_tensor", "reduce_scatter"):
                assert f"{what}/{dtype}/{op}" in names
        for what in ("all_gather", "all_gather_into_tensor", "all_to_all", "all_to_all_single",
                     "all_to_all_single/{}/uneven", "send_recv/{}/ring", "broadcast/{}/root3"):
            assert (what.format(dtype) if "{}" in what else f"{what}/{dtype}") in names
    assert len(w.valid_ops("float32")) == 6 and len(w.valid_ops("int8")) == 8 and len(w.valid_ops("bool")) == 7


def test_reference_semantics(w):
    """reference(): integers wrap in their dtype, integer avg truncates toward zero, uint64
    orders by its unsigned value, bool sum/max are or, prod/min and, bxor parity."""
    t = torch
    i8 = [t.tensor([127, -128, -7, 7], dtype=t.int8), t.tensor([1, -1, 0, 0], dtype=t.int8)]
    assert w.reference(i8, "int8", "sum", 2)[0].tolist() == [-128, 127, -7, 7]
    assert w.reference([t.tensor([-7, 7, 5]), t.tensor([0, 0, 0])], "int64", "avg", 2)[0].tolist() == [-3, 3, 2]
    big = t.tensor([-1], dtype=t.int64).view(t.uint64)  # 2**64 - 1
    one = t.tensor([1], dtype=t.uint64)
    assert w.reference([big, one], "uint64", "max", 2)[0].view(t.int64).tolist() == [-1]
    assert w.reference([big, one], "uint64", "min", 2)[0].view(t.int64).tolist() == [1]
    assert w.reference([big, one], "uint64", "sum", 2)[0].view(t.int64).tolist() == [0]
    u16 = [t.tensor([0xFFFF, 3], dtype=t.int64).to(t.uint16), t.tensor([2, 5], dtype=t.int64).to(t.uint16)]
    assert w.reference(u16, "uint16", "sum", 2)[0].to(t.int64).tolist() == [1, 8]
    assert w.reference(u16, "uint16", "bxor", 2)[0].to(t.int64).tolist() == [0xFFFD, 6]
    b = [t.tensor([True, True, False, False]), t.tensor([True, False, True, False]),
         t.tensor([True, False, False, False])]
    assert w.reference(b, "bool", "sum", 3)[0].tolist() == [True, True, True, False]
    assert w.reference(b, "bool", "min", 3)[0].tolist() == [True, False, False, False]
    assert w.reference(b, "bool", "bxor", 3)[0].tolist() == [True, True, True, False]
    f = [t.tensor([1.0, -2.0], dtype=t.bfloat16), t.tensor([2.0, 4.0], dtype=t.bfloat16)]
    assert w.reference(f, "bfloat16", "premul", 2, 0.5)[0].tolist() == [1.5, 1.0]
    want, tol = w.reference(f + [f[0]], "bfloat16", "avg", 3)
    assert tol == 2.0 ** -7 and want.dtype == t.bfloat16
    assert w.reference(f, "bfloat16", "avg", 2)[1] is None  # exact where S is a power of two


def test_inputs_are_exact_and_reproducible(w):
    """Every rank makes the same inputs for every rank; small floats sum exactly in float16 /
    bfloat16 at 4 ranks; the full-range integers reach both ends of the dtype."""
    ctx = w.Ctx(4, "full", OPS, seed=5)
    a = ctx.inputs("k", "bfloat16", (50,), "small")
    assert all(torch.equal(x, y) for x, y in zip(a, ctx.inputs("k", "bfloat16", (50,), "small")))
    assert not torch.equal(a[0], a[1])
    exact = torch.stack([x.double() for x in a]).sum(0)
    assert torch.equal(torch.stack(a).sum(0, dtype=torch.bfloat16).double(), exact)
    u = torch.cat(ctx.inputs("k", "uint64", (2000,))).view(torch.int64)
    assert (u < 0).any() and (u > 0).any()  # values above 2**63 (negative as int64) and below
    i8 = torch.cat(ctx.inputs("k", "int8", (2000,)))
    assert int(i8.min()) < -120 and int(i8.max()) > 120


def test_check_rejects_what_it_should(w):
    """check(): one ulp off fails an exact check, a dtype or shape change fails, a tolerance
    admits what it should and no more."""
    t = torch
    del w._soft[:]
    x = t.tensor([1.0, 2.0], dtype=t.float16)
    assert w.check(x, x.clone(), "same")
    assert not w.check(t.tensor([1.0, 2.001953125], dtype=t.float16), x, "one ulp")
    assert not w.check(x.float(), x, "dtype")
    assert not w.check(x[:1], x, "shape")
    assert not w.check(t.tensor([5, 6], dtype=t.uint32), t.tensor([5, 7], dtype=t.uint32), "uint32")
    assert len(w._soft) == 4
    del w._soft[:]
    assert w.check(t.tensor([1.0, 2.001953125], dtype=t.float16), x, "within", tol=2.0 ** -10)
    assert not w.check(t.tensor([1.0, 2.00390625], dtype=t.float16), x, "beyond", tol=2.0 ** -10)
    del w._soft[:]
