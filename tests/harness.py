"""Helpers for tests that build C programs and run them under mpiexec.

Multi-rank tests launch `python -m commlib run -n N -- prog ...` (the interposer
preloaded) or the plain mpiexec (preload=False) as subprocesses, so that every rank
count runs inside one pytest process on any machine.
"""
import ctypes
import os
import re
import shutil
import subprocess
import sys
import threading

from commlib import paths

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
C_DIR = os.path.join(TESTS_DIR, "c")
ROOT = os.path.dirname(TESTS_DIR)


class Pumped:
    """A child process whose stdout and stderr lines are collected as they come (a thread per
    pipe, so a chatty child never blocks on a full pipe): .proc, .lines, .err, .threads."""

    def __init__(self, proc):
        self.proc = proc
        self.lines, self.err = [], []
        self.threads = [threading.Thread(target=self._pump, args=(proc.stdout, self.lines), daemon=True),
                        threading.Thread(target=self._pump, args=(proc.stderr, self.err), daemon=True)]
        for t in self.threads:
            t.start()

    @staticmethod
    def _pump(stream, into):
        for line in stream:
            into.append(line)


def clean_env(**extra):
    """The environment for a child process.  Always pass one: a test process that has
    initialised MPI in-process (mpi4py) carries the MPI's own variables in its C
    environment - Open MPI's singleton sets OMPI_* there - and a child launched with
    the inherited environment takes itself for part of that job; os.environ is the
    Python-side copy taken at start-up, without them."""
    env = dict(os.environ)
    env.update(extra)
    return env


def build_c(src, out_dir, extra_flags=()):
    """Compile one C file with the MPI compiler wrapper; returns the binary's path."""
    src = src if os.path.isabs(src) else os.path.join(ROOT, src)
    out = os.path.join(str(out_dir), os.path.splitext(os.path.basename(src))[0])
    cmd = [paths.mpicc(), "-O2", "-g", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-o", out, src,
           *extra_flags, "-lm", "-ldl"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"compile failed: {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    return out


def commlib_cli():
    """The installed `commlib` command (never `python -m` from the checkout, which would
    import the unbuilt source tree instead of the installed package)."""
    script = os.path.join(os.path.dirname(sys.executable), "commlib")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "commlib"]


def run_mpi(n, argv, env=None, preload=True, timeout=300):
    """Run argv on n ranks; returns CompletedProcess with text stdout/stderr."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    if preload:
        cmd = [*commlib_cli(), "run", "-n", str(n), "--", *argv]
    else:
        cmd = [paths.mpiexec(), "-n", str(n), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)


def gpu_count():
    """CUDA devices on this machine (0 without a driver)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def fake_cuda_env(out_dir):
    """Environment giving programs tests/c/fake_cuda.c as libcuda.so.1: "device" memory
    the CPU cannot touch, so any access that bypasses the driver's copies crashes.  The
    device paths run in CI this way, without a GPU."""
    lib = build_c("tests/c/fake_cuda.c", out_dir, extra_flags=["-shared", "-fPIC", "-Wl,-soname,libcuda.so.1"])
    shutil.copy(lib, os.path.join(str(out_dir), "libcuda.so.1"))
    path = os.pathsep.join(p for p in (str(out_dir), os.environ.get("LD_LIBRARY_PATH")) if p)
    return {"LD_LIBRARY_PATH": path}


def run_typegen(seed, trees, env, stat):
    """tests/ipc_typegen.py on 2 ranks (random datatype trees sent from device memory against
    the host MPI's delivery of the same bytes from host memory): asserts no mismatch and
    returns (trees compared, rank 0's and 1's `stat=N` counters - the route that was to carry
    them), the output for messages."""
    script = os.path.join(TESTS_DIR, "ipc_typegen.py")
    proc = run_mpi(2, [sys.executable, script, str(seed), str(trees)], env={"COMMLIB_STATS": "1", **env}, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "MISMATCH" not in out, out
    m = re.search(r"ipc_typegen: seed=\d+ trees=(\d+) mismatches=0", proc.stdout)
    assert m, out
    return int(m[1]), [int(n) for n in re.findall(re.escape(stat) + r"=(\d+)", proc.stderr)], out
