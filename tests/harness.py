"""Helpers for tests that build C programs and run them under mpiexec.

Multi-rank tests launch `python -m commlib run -n N -- prog ...` (the interposer
preloaded) or the plain mpiexec (preload=False) as subprocesses, so that every rank
count runs inside one pytest process on any machine.
"""
import os
import subprocess
import sys

from commlib import paths

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
C_DIR = os.path.join(TESTS_DIR, "c")
ROOT = os.path.dirname(TESTS_DIR)


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
