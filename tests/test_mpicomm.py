"""MPIComm (collectives/mpi.py) against its docstrings, the specification.

Each multi-rank test is one mpiexec launch of tests/mpicomm_worker.py, which runs many cases
and prints `case <name> ok|FAIL <why>` per case (see its docstring: inputs, references,
tolerances).  Here the list of cases the launch must have run (mpicomm_worker.plan) is
compared with what it printed, and every case must pass, except the known bugs below, each
of which has an xfail(strict=True) test of its own: when a bug is fixed its test XPASSes,
which fails the run until the entry is removed.

Launches: 1, 2, 3 and 4 ranks x the two transports (shm, the default on one node, and
COMMLIB_ENGINE_TRANSPORT=mpi), every op x dtype x buffer kind (numpy, torch CPU when torch
imports) at 2 and 4 ranks, a lighter dtype subset at 1 and 3; small chunk knobs
(COMMLIB_ENGINE_CHUNK_KB=4, SLICE_KB=4, SMALL_KB=1) so that a 40 kB buffer is many chunks
and slices.  Plus: default knobs, the thread-less engine (MPI4PY_RC_THREAD_LEVEL=serialized),
the `commlib run` launcher, cupy / torch CUDA buffers (skipped without a GPU), ElasticComm.

The seed is printed by each test (and is in every failure message); COMMLIB_TEST_SEED=N
reruns with it.
"""
import importlib.util
import os
import random
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

import harness
import mpicomm_worker as worker
from commlib import paths

WORKER = os.path.join(harness.TESTS_DIR, "mpicomm_worker.py")
SEED = int(os.environ.get("COMMLIB_TEST_SEED", random.randrange(1 << 30)))
SMALL_CHUNKS = {"COMMLIB_ENGINE_CHUNK_KB": "4", "COMMLIB_ENGINE_SLICE_KB": "4", "COMMLIB_ENGINE_SMALL_KB": "1"}
SUITES = ["matrix", "async", "partitioned", "errors", "init"]
LAUNCH_TIMEOUT = 180  # seconds per launch; each takes 3-15 s on two cores


def have(module):
    return importlib.util.find_spec(module) is not None


CPU_KINDS = ["numpy"] + (["torch"] if have("torch") else [])

LAUNCHES = [(ranks, transport, "full" if ranks in (2, 4) else "light")
            for transport in ("shm", "mpi") for ranks in (1, 2, 3, 4)]

# Bugs the cases found (see the report of the commit that added them).  id: (regex over case
# names, (ranks, transport) -> whether the bug shows there, reason).
KNOWN_BUGS = {}  # none open: add an entry (regex, applies(ranks, transport), reason) when one is found


def known_bug(name, ranks, transport):
    for bug, (pattern, applies, _) in KNOWN_BUGS.items():
        if re.search(pattern, name) and applies(ranks, transport):
            return bug
    return None


# -- launching ---------------------------------------------------------------------------------

class Launch:
    def __init__(self, cmd, rc, out, err, timed_out):
        self.cmd, self.rc, self.out, self.err, self.timed_out = cmd, rc, out, err, timed_out
        self.cases = {}  # name -> None (ok) or why
        self.order = []
        self.summary = None
        for line in out.splitlines():
            m = re.match(r"case (\S+) (ok|FAIL)(?: (.*))?$", line)
            if m:
                self.cases[m.group(1)] = None if m.group(2) == "ok" else (m.group(3) or "")
                self.order.append(m.group(1))
            elif line.startswith("summary "):
                self.summary = dict(kv.split("=", 1) for kv in line.split()[1:])

    def context(self):
        """What a failure message shows: the seed, the command, the end of the output."""
        err = "\n".join(line for line in self.err.splitlines() if not line.startswith("running "))
        last = [line for line in self.err.splitlines() if line.startswith("running ")][-1:]
        return (f"seed {SEED}; command: {' '.join(self.cmd)}\nrc={self.rc} timed_out={self.timed_out} "
                f"last case started: {last}\nstdout tail:\n{self.out[-3000:]}\nstderr tail:\n{err[-3000:]}")


def run_launch(ranks, transport, level, kinds, suites, tmp_dir, extra_env=None, launcher="mpiexec",
               knobs=SMALL_CHUNKS, timeout=LAUNCH_TIMEOUT):
    env = harness.clean_env(PYTHONFAULTHANDLER="1", **knobs)
    for k in ("COMMLIB_ENGINE_TRANSPORT", "COMMLIB_ENGINE_CHUNK_KB", "COMMLIB_ENGINE_SLICE_KB",
              "COMMLIB_ENGINE_SMALL_KB", "MPI4PY_RC_THREAD_LEVEL"):
        if k not in knobs:
            env.pop(k, None)
    if transport == "mpi":
        env["COMMLIB_ENGINE_TRANSPORT"] = "mpi"
    env.update(extra_env or {})
    argv = [sys.executable, WORKER, "--seed", str(SEED), "--level", level, "--kinds", ",".join(kinds),
            "--suites", ",".join(suites), "--transport", transport]
    if launcher == "commlib":
        cmd = [*harness.commlib_cli(), "run", "-n", str(ranks), "--", *argv]
    else:
        cmd = [paths.mpiexec(), "-n", str(ranks), *argv]
    # cwd outside the checkout: the ranks import the installed package.  A session of its
    # own, so that a hang is ended with every rank, not only the launcher.
    proc = subprocess.Popen(cmd, cwd=str(tmp_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
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


_launches = {}


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """The standard launches, each run once (the bug tests read the same results)."""
    def get(ranks, transport, level):
        key = (ranks, transport)
        if key not in _launches:
            _launches[key] = run_launch(ranks, transport, level, CPU_KINDS, SUITES,
                                        tmp_path_factory.mktemp(f"mpicomm{ranks}{transport}"))
        return _launches[key]
    return get


def check_launch(launch, expected, ranks, transport, allow_known=True):
    """Every expected case ran, in the launch's output, and passed (known bugs aside)."""
    assert not launch.timed_out, "the launch hung\n" + launch.context()
    assert launch.summary is not None, "no summary line\n" + launch.context()
    missing = [n for n in expected if n not in launch.cases]
    extra = [n for n in launch.cases if n not in set(expected)]
    assert not missing and not extra, f"missing cases {missing[:20]}, unexpected {extra[:20]}\n" + launch.context()
    assert launch.order == list(expected), "cases ran in another order\n" + launch.context()
    failures = {n: why for n, why in launch.cases.items() if why is not None}
    assert int(launch.summary["failed"]) == len(failures) and int(launch.summary["cases"]) == len(expected)
    assert launch.rc == (1 if failures else 0), launch.context()
    if allow_known:
        failures = {n: why for n, why in failures.items() if not known_bug(n, ranks, transport)}
    assert not failures, (f"{len(failures)} of {len(expected)} cases failed:\n" +
                          "\n".join(f"  {n}: {why[:500]}" for n, why in list(failures.items())[:40]) +
                          "\n" + launch.context())


# -- the tests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ranks,transport,level", LAUNCHES, ids=[f"{n}ranks-{t}" for n, t, _ in LAUNCHES])
def test_mpicomm_cases(launches, ranks, transport, level):
    print("seed", SEED)
    launch = launches(ranks, transport, level)
    expected = worker.plan(ranks, level, CPU_KINDS, SUITES)
    # (CI installs no torch: the numpy cases alone)
    assert len(expected) > (750 if level == "full" else 450) * len(CPU_KINDS)
    check_launch(launch, expected, ranks, transport)
    assert launch.summary["transport"] == (transport if ranks > 1 else launch.summary["transport"])


@pytest.mark.parametrize("bug", [pytest.param(b, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[b][2]))
                                 for b in sorted(KNOWN_BUGS)])
def test_known_bug(launches, bug):
    """Passes (XPASS, an error under strict) once the bug is fixed: then remove its entry."""
    print("seed", SEED)
    pattern, applies, reason = KNOWN_BUGS[bug]
    seen, failed = 0, []
    for ranks, transport, level in LAUNCHES:
        if not applies(ranks, transport):
            continue
        launch = launches(ranks, transport, level)
        for name, why in launch.cases.items():
            if re.search(pattern, name):
                seen += 1
                if why is not None:
                    failed.append(f"{ranks} ranks {transport}: {name}: {why[:300]}")
    assert seen, f"no case matches {pattern}"
    assert not failed, f"{reason}\n" + "\n".join(failed[:10])


VARIANTS = {
    # the engine's default chunk, slice and small-message sizes
    "default-knobs-2ranks-shm": dict(ranks=2, transport="shm", knobs={}, suites=SUITES),
    "default-knobs-3ranks-mpi": dict(ranks=3, transport="mpi", knobs={}, suites=["matrix", "async"]),
    # MPI_THREAD_SERIALIZED: no engine thread, operations move only inside test/wait
    "no-engine-thread-3ranks-shm": dict(ranks=3, transport="shm", knobs=SMALL_CHUNKS,
                                        env={"MPI4PY_RC_THREAD_LEVEL": "serialized"},
                                        suites=["async", "partitioned", "errors"]),
    "no-engine-thread-2ranks-mpi": dict(ranks=2, transport="mpi", knobs=SMALL_CHUNKS,
                                        env={"MPI4PY_RC_THREAD_LEVEL": "serialized"},
                                        suites=["async", "partitioned", "errors"]),
    # `commlib run` (the interposer preloaded into the ranks) rather than the plain mpiexec
    "commlib-run-2ranks-shm": dict(ranks=2, transport="shm", knobs=SMALL_CHUNKS, launcher="commlib",
                                   suites=["async", "errors", "init"]),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mpicomm_variant(variant, tmp_path):
    print("seed", SEED)
    v = VARIANTS[variant]
    kinds = ["numpy"]
    launch = run_launch(v["ranks"], v["transport"], "light", kinds, v["suites"], tmp_path, extra_env=v.get("env"),
                        launcher=v.get("launcher", "mpiexec"), knobs=v["knobs"])
    check_launch(launch, worker.plan(v["ranks"], "light", kinds, v["suites"]), v["ranks"], v["transport"])


GPU_KINDS = {"cupy": "cupy", "torch-cuda": "torch"}


@pytest.mark.parametrize("kind", list(GPU_KINDS))
def test_gpu_buffers(kind, tmp_path):
    """cupy arrays and torch CUDA tensors: the light matrix, stream order, ready_after."""
    if harness.gpu_count() == 0:
        pytest.skip("no GPU on this machine")
    if not have(GPU_KINDS[kind]):
        pytest.skip(f"{GPU_KINDS[kind]} is not installed")
    if kind == "torch-cuda":
        import torch
        if not torch.cuda.is_available():
            pytest.skip("this torch has no CUDA")
    print("seed", SEED)
    suites = ["matrix", "gpu"]
    for transport in ("shm", "mpi"):
        launch = run_launch(2, transport, "light", [kind], suites, tmp_path, timeout=300)
        check_launch(launch, worker.plan(2, "light", [kind], suites), 2, transport)


def test_exchange_with_sends_first_does_not_hang(tmp_path):
    """torch.distributed's isend/irecv exchange: every rank starts an async send to its neighbour,
    then a receive; small (100) and large (100000 int64) messages, 5 s allowed for each."""
    print("seed", SEED)
    suites = ["exchange"]
    launch = run_launch(2, "shm", "light", ["numpy"], suites, tmp_path, timeout=60)
    check_launch(launch, worker.plan(2, "light", ["numpy"], suites), 2, "shm", allow_known=False)


def test_elastic_comm_answers_size_and_names_what_it_lacks(monkeypatch):
    """collectives.init() picks ElasticComm when COMMLIB_ELASTIC_COORDINATOR is set; it answers
    size (and all_reduce), and every operation the elastic engine lacks raises
    NotImplementedError naming that operation."""
    import collectives
    import collectives.elastic as el
    monkeypatch.setenv("COMMLIB_ELASTIC_TIMEOUT", "2.0")
    monkeypatch.setenv("COMMLIB_ELASTIC_QUIET", "1")
    with el.Coordinator(0, secret="mpicomm-test", min_peers=1) as co:
        monkeypatch.setenv("COMMLIB_ELASTIC_COORDINATOR", co.address)
        monkeypatch.setenv("COMMLIB_SECRET", "mpicomm-test")
        comm = collectives.init()
        try:
            assert type(comm) is el.ElasticComm
            assert collectives.default() is comm
            assert (comm.size, comm.rank) == (1, 0)
            x = np.arange(6.0)
            comm.all_reduce(x)
            assert np.array_equal(x, np.arange(6.0))
            a = np.zeros(4)
            calls = {"reduce_scatter": lambda: comm.reduce_scatter(a), "all_gather": lambda: comm.all_gather(a),
                     "broadcast": lambda: comm.broadcast(a, root=0), "all_to_all": lambda: comm.all_to_all(a),
                     "send": lambda: comm.send(a, 0), "recv": lambda: comm.recv(a, 0),
                     "barrier": lambda: comm.barrier()}
            for name, call in calls.items():
                with pytest.raises(NotImplementedError, match=rf"\b{name}\b"):
                    call()
            assert np.array_equal(a, np.zeros(4))
            comm.all_reduce(x, op="max")  # still works afterwards
            assert np.array_equal(x, np.arange(6.0))
        finally:
            comm.close()


def test_init_refuses_an_unknown_backend():
    import collectives
    with pytest.raises(ValueError, match="nccl"):
        collectives.init(backend="nccl")


# -- the worker's oracle (what every case is checked against) ---------------------------------

def test_reference_semantics():
    """reference() says what the docstrings say: integers wrap, integer avg truncates toward
    zero, bool sum/max are or, prod/min and; float min/max propagate NaN."""
    ref = worker.reference
    i8 = np.array([[127, -128, -7, 7, 100], [1, -1, 0, 0, 100]], np.int8)
    assert ref(i8, "int8", "sum", 2)[0].tolist() == [-128, 127, -7, 7, -56]
    assert ref(i8, "int8", "avg", 2)[0].tolist() == [-64, 63, -3, 3, -28]  # wrapped sum, then / 2 toward zero
    assert ref(i8, "int8", "prod", 2)[0].tolist() == [127, -128, 0, 0, 16]
    u8 = np.array([[255, 3], [1, 4]], np.uint8)
    assert ref(u8, "uint8", "sum", 2)[0].tolist() == [0, 7] and ref(u8, "uint8", "avg", 2)[0].tolist() == [0, 3]
    i64 = np.array([[np.iinfo(np.int64).min, -5], [0, 0], [0, 0]], np.int64)
    assert ref(i64, "int64", "avg", 3)[0].tolist() == [np.iinfo(np.int64).min // 3 + 1, -1]
    b = np.array([[True, True, False, False], [True, False, True, False]])
    assert ref(b, "bool", "sum", 2)[0].tolist() == [True, True, True, False]
    assert ref(b, "bool", "max", 2)[0].tolist() == [True, True, True, False]
    assert ref(b, "bool", "prod", 2)[0].tolist() == [True, False, False, False]
    assert ref(b, "bool", "min", 2)[0].tolist() == [True, False, False, False]
    assert ref(b, "bool", "bxor", 2)[0].tolist() == [False, True, True, False]
    f = np.array([[1.0, np.nan, 3.0], [2.0, 0.0, np.nan]], np.float32)
    want, tol = ref(f, "float32", "min", 2)
    assert np.isnan(want[1:]).all() and want[0] == 1.0 and not tol.any()


def test_the_checks_reject_what_they_should():
    """check_values: a float32 sum one part in 10^4 off fails, within the tolerance passes; an
    integer one off fails; NaN in the wrong place fails; bfloat16 bits round to nearest even."""
    stack = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    want, tol = worker.reference(stack, "float32", "sum", 2)
    worker.check_values(np.array([4.0, 6.0], np.float32), want, tol, "float32", "t")
    worker.check_values(np.array([4.0, np.nextafter(np.float32(6), np.float32(7))], np.float32), want, tol,
                        "float32", "t")
    with pytest.raises(worker.Fail):
        worker.check_values(np.array([4.0, 6.0006], np.float32), want, tol, "float32", "t")
    with pytest.raises(worker.Fail):
        worker.check_values(np.array([4.0, np.nan], np.float32), want, tol, "float32", "t")
    with pytest.raises(worker.Fail):
        worker.check_values(np.array([4, 7], np.int32), np.array([4, 6], np.int32), None, "int32", "t")
    with pytest.raises(worker.Fail):
        worker.check_bytes(np.array([True, False]), np.array([True, True]), "t")
    bits = worker.f32_to_bf16_bits(np.array([1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, np.nan], np.float32))
    assert bits[:3].tolist() == [0x3F80, 0x3F80, 0x3F82] and (bits[3] & 0x7F80) == 0x7F80
    assert worker.widen(bits[:1], "bfloat16").tolist() == [1.0]


def test_plan_is_the_same_list_everywhere():
    """Names never depend on the rank (every rank runs the same sequence) and are unique."""
    for ranks in (1, 2, 3, 4):
        names = worker.plan(ranks, "full", ["numpy", "torch"], SUITES + ["gpu"])
        assert len(names) == len(set(names))
        assert all(" " not in n for n in names)
