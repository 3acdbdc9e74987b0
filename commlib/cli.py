"""`commlib` command line: run | lib | info | example | bench."""
import argparse
import ctypes
import importlib
import os
import shutil
import subprocess
import sys

from commlib import __version__, paths

# `commlib bench NAME`: the modules commlib/bench/NAME.py, in the order the usage lists them.
BENCHMARKS = ("pack", "halo", "p2p", "overlap", "allreduce", "pipeline", "ddp", "elastic_wire", "diloco")
BENCHMARK_LIST = ", ".join("pack [--device]" if name == "pack" else name for name in BENCHMARKS)

USAGE = f"""usage: commlib COMMAND ...

  run [-n N] [--] PROG [ARGS]   mpiexec PROG with the interposer preloaded on every rank
                                (other mpiexec options go before a `--`)
  lib                           print the path of the preload library (for LD_PRELOAD)
  info                          version, the MPI built for, CUDA, CUDA-awareness, the method
                                model in effect, the knobs
  measure [--quick] [--output F]  time the device send/receive methods on this machine and
                                write the model file the library reads (see --help)
  example NAME                  print the path of a built C example (e.g. halo3d)
  bench NAME [ARGS]             run a benchmark: {BENCHMARK_LIST}
"""

# The elastic all-reduce's launchers (commlib/elastic_cli.py).
USAGE += """  coordinator --port P --secret-file F [--standby-of HOST:PORT]
                                         elastic all-reduce coordinator (foreground), or a standby
  elastic-run -n N [--standby] SCRIPT [ARGS]
                                         a coordinator (and a standby) and N peers of SCRIPT here
"""


def launcher_kind(mpiexec):
    """'hydra' (MPICH), 'openmpi' or 'unknown': they take environment options differently."""
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30)
        text = out.stdout + out.stderr
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if "HYDRA" in text.upper():
        return "hydra"
    if "Open MPI" in text or "OpenRTE" in text or "Open RTE" in text:
        return "openmpi"
    return "unknown"


def split_run_args(args):
    """[-n N] [mpiexec options --] PROG ARGS -> (mpiexec options, program argv)."""
    if "--" in args:
        cut = args.index("--")
        return args[:cut], args[cut + 1:]
    opts, i = [], 0
    while i < len(args) and args[i] in ("-n", "-np"):
        if i + 1 >= len(args):
            raise SystemExit(f"commlib run: {args[i]} needs a number")
        opts += args[i:i + 2]
        i += 2
    return opts, args[i:]


def run_command(args, env=None):
    """The argv and environment that `commlib run` executes."""
    opts, program = split_run_args(args)
    if not program:
        raise SystemExit("commlib run: no program given\n" + USAGE)
    env = dict(os.environ if env is None else env)
    # The ranks run what this shell would run: Open MPI's mpiexec, started by its absolute
    # path (as here), puts its own prefix's bin first on the ranks' PATH, so a bare
    # `python3` became /usr/bin/python3 instead of the virtual environment's.
    if "/" not in program[0]:
        found = shutil.which(program[0], path=env.get("PATH", os.defpath))
        if found:
            program = [os.path.abspath(found), *program[1:]]
    mpiexec = paths.mpiexec()
    preload = paths.preload_library()
    current = env.get("LD_PRELOAD", "")
    value = preload + (":" + current if current and preload not in current.split(":") else "")
    kind = launcher_kind(mpiexec)
    # Only the ranks get the library, not the launcher and its proxies.
    if kind == "hydra":
        extra = ["-genv", "LD_PRELOAD", value]
    elif kind == "openmpi":
        extra = ["-x", f"LD_PRELOAD={value}"] + [arg for k in sorted(env) if k.startswith("COMMLIB_")
                                                 for arg in ("-x", k)]
    else:
        extra = []
        env["LD_PRELOAD"] = value
    return [mpiexec, *opts, *extra, *program], env


def cmd_run(args):
    argv, env = run_command(args)
    sys.stdout.flush()
    os.execve(argv[0], argv, env)


def cuda_status():
    """Whether a CUDA driver can be loaded on this machine, and its version."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "not found (no GPU support needed on this machine)"
    version = ctypes.c_int(0)
    if cuda.cuDriverGetVersion(ctypes.byref(version)) == 0:
        return f"driver found, CUDA {version.value // 1000}.{version.value % 1000 // 10}"
    return "driver found"


def kernels_status(k):
    """Lines for `commlib info`: the fatbin built in, NVRTC for run-time compiles."""
    nvrtc = k["runtime"]
    fatbin = (f"nvcc fatbin embedded ({k['fatbin_bytes']} bytes)" if k["fatbin_bytes"]
              else "no fatbin (built without nvcc)")
    if nvrtc["nvrtc"]:
        runtime = f"NVRTC {nvrtc['nvrtc_version']} at {nvrtc['nvrtc']}, compiled kernels cached in {nvrtc['cache_dir']}"
    else:
        runtime = "no NVRTC found (set COMMLIB_NVRTC=/path/to/libnvrtc.so)"
    use = {"auto": "the fatbin, NVRTC where it does not load", "fatbin": "the fatbin only",
           "nvrtc": "NVRTC only", "none": "none: device buffers staged through the host"}[k["route"]]
    return [f"{use} (COMMLIB_KERNELS={k['route']})", fatbin, f"run time: {runtime}"]


def cmd_info(_args):
    from commlib import native
    info = native.build_info()
    print(f"commlib {__version__}")
    print(f"  preload library : {paths.preload_library()}")
    print(f"  built for       : {info['mpi_family']} {info['mpi_impl_version']} (MPI {info['mpi_standard']}, "
          f"{info['handle_bytes']}-byte handles)")
    try:
        mpiexec = paths.mpiexec()
        print(f"  mpiexec         : {mpiexec} ({launcher_kind(mpiexec)})")
    except FileNotFoundError as e:
        print(f"  mpiexec         : {e}")
    print(f"  CUDA            : {cuda_status()}")
    for line in kernels_status(native.kernels()):
        print(f"  pack kernels    : {line}")
    print_model()
    print("  knobs (COMMLIB_*, read at MPI_Init; a CPU choice shows what it came to here):")
    for knob in native.knobs():
        mark = "" if knob["value"] == knob["default"] else "   <- set"
        value = knob["value"]
        if "in_effect" in knob:
            value = f"{value} ({'on' if knob['in_effect'] else 'off'})"
        print(f"    {knob['name']:<22} = {value:<10} (default {knob['default']}){mark}")
    return 0


def print_model():
    """CUDA-awareness and the method model as the library sees them in an MPI process
    (a one-rank probe under `commlib run`: the MPI answers only once initialised)."""
    from commlib import measure
    try:
        m = measure.probe(timeout=60)
    except Exception as e:  # info must answer whatever the MPI does
        print(f"  methods         : (the probe failed: {str(e).splitlines()[0][:200]})")
        return
    print(f"  CUDA-aware MPI  : {'yes' if m['cuda_aware'] else 'no'} ({m['cuda_aware_how']})")
    source = f"file {m['path']}" if m["model"] == "file" else f"built-in ({m['note']})"
    print(f"  method model    : {source}")
    if m["model"] == "file":
        print(f"                    {m['note']}")
    picks = {}
    for c in m["choices"]:
        picks.setdefault((c["direction"], c["layout"]), []).append(f"{c['bytes'] // 1024}K:{c['method']}")
    forced = "" if m["method"] == "auto" else f" (COMMLIB_METHOD={m['method']})"
    print(f"  methods chosen{forced}:")
    for (direction, layout), items in picks.items():
        print(f"    {direction} {layout:<8} {' '.join(items)}")


def cmd_bench(args):
    if not args or args[0] in ("-h", "--help"):
        print(f"usage: commlib bench NAME [ARGS]   (NAME: {', '.join(BENCHMARKS)})")
        return 0 if args else 2
    try:
        if args[0].startswith("_") or not args[0].isidentifier():  # _overlap_python: a benchmark's own ranks
            raise ModuleNotFoundError(args[0])
        module = importlib.import_module(f"commlib.bench.{args[0]}")
    except ModuleNotFoundError:
        print(f"commlib bench: unknown benchmark {args[0]!r}", file=sys.stderr)
        return 2
    return module.main(args[1:])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command in ("coordinator", "elastic-run"):
            from commlib import elastic_cli
            return (elastic_cli.cmd_coordinator if command == "coordinator" else elastic_cli.cmd_elastic_run)(rest)
        if command == "run":
            return cmd_run(rest)
        if command == "lib":
            print(paths.preload_library())
            return 0
        if command == "info":
            return cmd_info(rest)
        if command == "example":
            parser = argparse.ArgumentParser(prog="commlib example")
            parser.add_argument("name")
            print(paths.example_binary(parser.parse_args(rest).name))
            return 0
        if command == "bench":
            return cmd_bench(rest)
        if command == "measure":
            from commlib import measure
            return measure.main(rest)
        if command in ("--version", "version"):
            print(__version__)
            return 0
    except FileNotFoundError as e:
        print(f"commlib: {e}", file=sys.stderr)
        return 1
    print(f"commlib: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2
