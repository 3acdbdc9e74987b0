"""Benchmarks run as programs: `commlib bench NAME ...` (see commlib.bench.pack)."""

import json
import subprocess
import time


def pass_environment(cmd, at, env, kind, variables, bind=None):
    """Puts `variables` into env and into the mpiexec command at index `at` (hydra: -genv,
    Open MPI: -x; other launchers pass the environment on themselves); Open MPI also gets
    --bind-to `bind`."""
    extra = []
    for name, value in variables.items():
        env[name] = value
        if kind == "hydra":
            extra += ["-genv", name, value]
        elif kind == "openmpi":
            extra += ["-x", f"{name}={value}"]
    if kind == "openmpi" and bind:
        extra += ["--bind-to", bind]
    cmd[at:at] = extra


def run_tagged(cmd, env, timeout, tags):
    """Runs a benchmark worker launch; returns (lines by tag, rc, stderr, wall seconds): every
    stdout line "TAG {json}" with TAG in `tags` is parsed ("META" keeps the last one, the
    others a list in order); rc None when it ran past `timeout`."""
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, rc = f"timed out after {timeout:.0f} s", None
    found = {tag: ({} if tag == "META" else []) for tag in tags}
    for line in out.splitlines():
        tag, _, rest = line.partition(" ")
        if tag in found:
            if tag == "META":
                found[tag] = json.loads(rest)
            elif tag == "NOTE":
                found[tag].append(rest)
            else:
                found[tag].append(json.loads(rest))
    return found, rc, err, time.monotonic() - start
