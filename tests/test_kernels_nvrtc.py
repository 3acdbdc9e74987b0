"""Where the device pack kernels come from: the embedded nvcc fatbin, or NVRTC at run time
(native/pack/nvrtc.c), chosen by COMMLIB_KERNELS, with a disk cache of compiled images.

Without a GPU, tests/c/device_pack_c.c (MPI_Pack / MPI_Unpack on device memory, every
byte compared with PMPI_Pack of host copies) runs against two stand-ins:
tests/c/fake_cuda.c with FAKE_CUDA_KERNELS set, which loads fatbins and fake_nvrtc images
and runs commlib's kernels on the CPU (so the bytes check the launches too), and
tests/c/fake_nvrtc.c, which records the options and source commlib compiles with.  With a
real libnvrtc on the machine (or COMMLIB_TEST_NVRTC=/path/to/libnvrtc.so) the embedded
source is also compiled for real.  On a GPU (tests at the end) the NVRTC route must give
the same bytes as the fatbin.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from harness import TESTS_DIR, build_c, clean_env, commlib_cli, gpu_count, run_mpi

SOURCE = os.path.join(os.path.dirname(TESTS_DIR), "native", "pack", "device_kernels.cu")
SUMMARY = re.compile(r"^device_pack_c: cases=(?P<cases>\d+) mismatches=(?P<mismatches>\d+) .*pack_fast=(?P<fast>-?\d+) "
                     r".*kernels_fatbin=(?P<fatbin>-?\d+) kernels_nvrtc=(?P<nvrtc>-?\d+) "
                     r"kernels_cached=(?P<cached>-?\d+) kernels_none=(?P<none>-?\d+)", re.M)


def has_fatbin():
    from commlib import _build_info
    return bool(getattr(_build_info, "DEVICE_KERNELS", False))


@pytest.fixture(scope="module")
def tools(tmp_path_factory, fake_cuda_env):
    out = tmp_path_factory.mktemp("nvrtc_tools")
    try:
        lib = build_c("tests/c/fake_nvrtc.c", out, extra_flags=["-shared", "-fPIC", "-Wl,-soname,libnvrtc.so.12"])
    except RuntimeError as e:
        pytest.skip(f"the fake NVRTC does not build here: {e}")
    nvrtc = os.path.join(str(out), "libnvrtc.so.12")
    shutil.copy(lib, nvrtc)
    return {"exe": build_c("tests/c/device_pack_c.c", out), "nvrtc": nvrtc, "cuda_env": fake_cuda_env}


class Run:
    def __init__(self, proc, record):
        self.proc, self.record = proc, record
        self.out = proc.stdout + proc.stderr
        m = SUMMARY.search(proc.stdout)
        assert m, f"no summary line (rc={proc.returncode})\n{self.out[-6000:]}"
        self.counts = {k: int(v) for k, v in m.groupdict().items()}
        fails = "\n".join(line for line in proc.stdout.splitlines() if line.startswith("FAIL"))
        assert self.counts["mismatches"] == 0 and proc.returncode == 0, f"{fails[:4000]}\n{proc.stderr[-4000:]}"
        assert self.counts["cases"] >= 500 and self.counts["fast"] > 0, self.out[-4000:]

    def compiles(self):
        """The options of each compile fake_nvrtc saw, oldest first."""
        path = os.path.join(self.record, "compiles.txt")
        return open(path).read().splitlines() if os.path.exists(path) else []

    def kernels(self):
        """fatbin/nvrtc/cached/none: how this process's device context got its kernels."""
        got = [k for k in ("fatbin", "nvrtc", "cached", "none") if self.counts[k]]
        assert len(got) == 1 and self.counts[got[0]] == 1, self.counts
        return got[0]


def run(tools, tmp_path, ranks=1, **env):
    """device_pack_c under commlib with the stand-ins; the cache in tmp_path/cache."""
    record = tmp_path / "record"
    record.mkdir(exist_ok=True)
    full = clean_env(**tools["cuda_env"], COMMLIB_NVRTC=tools["nvrtc"], XDG_CACHE_HOME=str(tmp_path / "cache"),
                     FAKE_NVRTC_RECORD=str(record), COMMLIB_LOG="info", FAKE_CUDA_KERNELS="1")
    for k, v in env.items():  # None: leave the variable out
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    argv = [*commlib_cli(), "run", "-n", str(ranks), "--", tools["exe"]]
    proc = subprocess.run(argv, capture_output=True, text=True, env=full, timeout=300)
    return Run(proc, str(record)) if ranks == 1 else proc


def cache_files(tmp_path):
    return sorted(glob.glob(str(tmp_path / "cache" / "commlib" / "kernels-*")))


@pytest.mark.skipif(not has_fatbin(), reason="built without nvcc: no fatbin")
def test_auto_takes_the_fatbin_when_it_loads(tools, tmp_path):
    r = run(tools, tmp_path)
    assert r.kernels() == "fatbin", r.out[-3000:]
    assert "loaded on device 0 from the embedded fatbin" in r.proc.stderr
    assert r.compiles() == [] and cache_files(tmp_path) == []


def test_auto_compiles_with_nvrtc_then_uses_the_cache(tools, tmp_path):
    """The fatbin does not load (a GPU newer than it, or no fatbin): NVRTC compiles the
    embedded source for the device's exact architecture; the next process takes the cache."""
    r = run(tools, tmp_path, FAKE_CUDA_KERNELS="nvrtc", COMMLIB_STATS="1")
    assert r.kernels() == "nvrtc", r.out[-3000:]
    if has_fatbin():
        assert "from the embedded fatbin do not load" in r.proc.stderr
    assert r.compiles() == ["--gpu-architecture=sm_90 --std=c++17 --ptxas-options=-O3"]
    with open(SOURCE, "rb") as f, open(os.path.join(r.record, "source.cu"), "rb") as g:
        assert g.read() == f.read(), "NVRTC was not given native/pack/device_kernels.cu"
    assert re.search(r"compiled by NVRTC 12\.4 \(.*libnvrtc\.so\.12\) for sm_90 in [0-9.]+ s", r.proc.stderr), r.out
    assert re.search(r"kernels fatbin=0 nvrtc=1 cached=0 none=0", r.out), r.out[-3000:]  # COMMLIB_STATS line
    files = cache_files(tmp_path)
    assert len(files) == 1 and files[0].endswith("-sm_90.cubin"), files

    again = run(tools, tmp_path, FAKE_CUDA_KERNELS="nvrtc")
    assert again.kernels() == "cached" and len(again.compiles()) == 1, again.out[-3000:]
    assert f"from the NVRTC cache ({files[0]}" in again.proc.stderr


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "flipped"])
def test_a_damaged_cache_entry_is_rebuilt(tools, tmp_path, damage):
    run(tools, tmp_path, FAKE_CUDA_KERNELS="nvrtc")
    [entry] = cache_files(tmp_path)
    data = open(entry, "rb").read()
    bad = {"garbage": b"\x00not a kernel image" * 8, "truncated": data[:len(data) - 3], "empty": b"",
           "flipped": data[:-2] + bytes([data[-2] ^ 0x20]) + data[-1:]}[damage]
    with open(entry, "wb") as f:
        f.write(bad)
    r = run(tools, tmp_path, FAKE_CUDA_KERNELS="nvrtc")
    assert r.kernels() == "nvrtc" and len(r.compiles()) == 2, r.out[-3000:]
    assert "ignoring the damaged kernel cache entry" in r.proc.stderr
    assert open(entry, "rb").read() == data  # rewritten whole
    assert run(tools, tmp_path, FAKE_CUDA_KERNELS="nvrtc").kernels() == "cached"


def test_nvrtc_knob_compiles_even_with_a_fatbin(tools, tmp_path):
    r = run(tools, tmp_path, COMMLIB_KERNELS="nvrtc")  # the fake would load the fatbin
    assert r.kernels() == "nvrtc" and len(r.compiles()) == 1, r.out[-3000:]
    assert "embedded fatbin" not in r.proc.stderr


def test_compile_failure_stages_through_the_host(tools, tmp_path):
    """A failed compile is logged with NVRTC's log at warn level (the default) and the
    device buffers are staged through the host: same bytes, nothing cached."""
    r = run(tools, tmp_path, COMMLIB_KERNELS="nvrtc", FAKE_NVRTC_FAIL="1", COMMLIB_LOG=None)
    assert r.kernels() == "none" and len(r.compiles()) == 1
    err = r.proc.stderr
    assert re.search(r"warning: NVRTC 12\.4 \(.*\) failed to compile the device pack kernels for sm_90: "
                     r"NVRTC_ERROR_COMPILATION", err), err
    assert "warning: nvrtc: device_kernels.cu(1): error: fake_nvrtc refuses to compile" in err, err
    assert "warning: no device pack kernels on device 0: device buffers are staged through the host" in err
    assert cache_files(tmp_path) == []


def test_none_stages_through_the_host(tools, tmp_path):
    r = run(tools, tmp_path, COMMLIB_KERNELS="none")
    assert r.kernels() == "none" and r.compiles() == []
    assert "COMMLIB_KERNELS=none: device buffers are staged through the host" in r.proc.stderr


def test_fatbin_knob_never_compiles(tools, tmp_path):
    r = run(tools, tmp_path, COMMLIB_KERNELS="fatbin", FAKE_CUDA_KERNELS="nvrtc")  # the fatbin does not load
    assert r.kernels() == "none" and r.compiles() == [], r.out[-3000:]
    assert "staged through the host (COMMLIB_KERNELS=fatbin" in r.proc.stderr
    if has_fatbin():  # the reason the fatbin failed, at warn level
        assert "(COMMLIB_KERNELS=fatbin; the fatbin: fake_cuda error (200))" in r.proc.stderr
    else:
        assert "COMMLIB_KERNELS=fatbin, but this build has no fatbin" in r.proc.stderr


@pytest.mark.parametrize("cc,archs,target", [
    ("86", "75,80,86,90", "sm_86"),            # known exactly: machine code
    ("100", "75,80,90", "compute_90"),         # newer than this NVRTC: PTX of its newest, the driver compiles
    ("89", "75,80,90", "compute_80"),          # unknown, in between: PTX of the newest at or below
])
def test_architecture_choice(tools, tmp_path, cc, archs, target):
    r = run(tools, tmp_path, COMMLIB_KERNELS="nvrtc", FAKE_CUDA_CC=cc, FAKE_NVRTC_ARCHS=archs)
    assert r.kernels() == "nvrtc", r.out[-3000:]
    [options] = r.compiles()
    assert options.split()[0] == f"--gpu-architecture={target}"
    assert ("--ptxas-options=-O3" in options) == target.startswith("sm_")
    [entry] = cache_files(tmp_path)
    assert entry.endswith(f"-{target}.{'cubin' if target.startswith('sm_') else 'ptx'}")


def test_no_architecture_the_device_runs(tools, tmp_path):
    r = run(tools, tmp_path, COMMLIB_KERNELS="nvrtc", FAKE_CUDA_CC="70", FAKE_NVRTC_ARCHS="75,80")
    assert r.kernels() == "none" and r.compiles() == []
    assert "compiles for no architecture that sm_70 runs" in r.proc.stderr


def _nvrtc_found(env):
    """The NVRTC `commlib info`'s search finds with this environment (None: none)."""
    code = "import json; from commlib import native; print(json.dumps(native.kernels()))"
    # cwd outside the checkout: `-c` puts the cwd first on sys.path, and the source tree of a
    # clean clone has no built library
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60,
                          cwd=TESTS_DIR)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])["runtime"]


def _search_env(**extra):
    env = clean_env(**extra)
    for k in ("COMMLIB_NVRTC", "CUDA_HOME", "CUDA_PATH", "VIRTUAL_ENV", "CONDA_PREFIX"):
        if k not in extra:
            env.pop(k, None)
    return env


def test_no_nvrtc_stages_through_the_host(tools, tmp_path):
    if _nvrtc_found(_search_env())["nvrtc"]:
        pytest.skip("this machine has an NVRTC the search finds")
    r = run(tools, tmp_path, COMMLIB_KERNELS="nvrtc", COMMLIB_NVRTC=str(tmp_path / "missing" / "libnvrtc.so.12"),
            CUDA_HOME=None, CUDA_PATH=None, VIRTUAL_ENV=None, CONDA_PREFIX=None)
    assert r.kernels() == "none" and r.compiles() == []
    assert "does not load" in r.proc.stderr and "no NVRTC to compile the device pack kernels" in r.proc.stderr


@pytest.mark.parametrize("layout", ["wheel13", "wheel12", "cuda_home"])
def test_search_finds_the_usual_places(tools, tmp_path, layout):
    if _nvrtc_found(_search_env())["nvrtc"]:
        pytest.skip("this machine has an NVRTC the search finds first")
    site = tmp_path / "venv" / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    where, name, env = {
        "wheel13": (site / "nvidia" / "cu13" / "lib", "libnvrtc.so.13", {"VIRTUAL_ENV": str(tmp_path / "venv")}),
        "wheel12": (site / "nvidia" / "cuda_nvrtc" / "lib", "libnvrtc.so.12", {"VIRTUAL_ENV": str(tmp_path / "venv")}),
        "cuda_home": (tmp_path / "cuda" / "lib64", "libnvrtc.so.12", {"CUDA_HOME": str(tmp_path / "cuda")}),
    }[layout]
    where.mkdir(parents=True)
    shutil.copy(tools["nvrtc"], where / name)
    found = _nvrtc_found(_search_env(**env))
    assert found["nvrtc"] == str(where / name) and found["nvrtc_version"] == "12.4", found


def test_source_includes_nothing_under_nvrtc():
    """NVRTC has no C library headers: every #include of device_kernels.cu must sit in a
    branch that __CUDACC_RTC__ leaves out (a real NVRTC checks it for real below, where
    there is one; this catches it in CI, where there is none)."""
    stack = []  # per open #if: is its current branch taken under NVRTC (None: unknown)
    for number, line in enumerate(open(SOURCE), 1):
        words = line.split()
        if not words or not words[0].startswith("#"):
            continue
        directive = words[0].lstrip("#") or (words[1] if len(words) > 1 else "")
        rest = words[1:] if words[0] != "#" else words[2:]
        if directive in ("ifdef", "ifndef") and rest and rest[0] == "__CUDACC_RTC__":
            stack.append(directive == "ifdef")
        elif directive.startswith("if"):
            stack.append(None)
        elif directive == "else" and stack:
            stack[-1] = None if stack[-1] is None else not stack[-1]
        elif directive == "endif" and stack:
            stack.pop()
        elif directive == "include":
            assert False in stack, f"device_kernels.cu:{number}: {line.strip()} is seen by NVRTC"


def test_nvcc_builds_the_source_where_nvcc_is():
    """setup.py falls back to a build without a fatbin when nvcc fails, so a source edit
    that nvcc rejects (the source serves NVRTC too) would pass unnoticed: where nvcc is,
    the build must carry its fatbin."""
    from commlib import _build_info
    given = os.environ.get("COMMLIB_NVCC")
    if given == "0" or os.environ.get("COMMLIB_DEVICE_FATBIN"):
        pytest.skip("COMMLIB_NVCC=0 or COMMLIB_DEVICE_FATBIN: no nvcc build wanted")
    nvcc = given or shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc")
                                             else None)
    if not nvcc:
        pytest.skip("no nvcc on this machine")
    assert _build_info.DEVICE_KERNELS, f"nvcc is here ({nvcc}) but the build has no fatbin: {_build_info.DEVICE_KERNELS_NOTE}"


def test_preloaded_dlopen_searches_the_callers_runpath(tmp_path):
    """Preloaded, commlib's dlopen stands between every library and libc's: a bare name
    must still be found along the calling library's RUNPATH ($ORIGIN), as NVRTC's wheel
    finds libnvrtc-builtins beside itself (it failed to compile under `commlib run`)."""
    from commlib import paths
    libs = tmp_path / "libs"
    libs.mkdir()
    for kind, name, flags in (("INNER", "libcommlib_test_inner.so", []),
                              ("OUTER", "libcommlib_test_outer.so", ["-Wl,-rpath,$ORIGIN", "-Wl,--enable-new-dtags"])):
        build_dir = tmp_path / kind
        build_dir.mkdir()
        shutil.copy(build_c("tests/c/dlopen_runpath.c", build_dir, extra_flags=[f"-D{kind}", "-shared", "-fPIC", *flags]),
                    libs / name)
    exe = build_c("tests/c/dlopen_runpath.c", tmp_path)
    for preload in ("", paths.preload_library()):
        env = clean_env(LD_PRELOAD=preload)
        proc = subprocess.run([exe, str(libs / "libcommlib_test_outer.so")], capture_output=True, text=True, env=env,
                              timeout=60)
        assert proc.returncode == 0 and "inner=42" in proc.stdout, f"LD_PRELOAD={preload!r}: {proc.stdout}{proc.stderr}"


def test_info_says_where_kernels_come_from(tools):
    from commlib import _build_info
    assert _build_info.DEVICE_KERNELS_SOURCE
    env = clean_env(COMMLIB_NVRTC=tools["nvrtc"], COMMLIB_KERNELS="nvrtc")
    proc = subprocess.run([*commlib_cli(), "info"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "pack kernels" in line]
    assert any("NVRTC only (COMMLIB_KERNELS=nvrtc)" in line for line in lines), lines
    assert any(f"run time: NVRTC 12.4 at {tools['nvrtc']}" in line for line in lines), lines
    assert any(("nvcc fatbin embedded" if has_fatbin() else "no fatbin") in line for line in lines), lines


def test_ranks_compiling_at_once_share_one_cache_entry(tools, tmp_path):
    proc = run(tools, tmp_path, ranks=2, FAKE_CUDA_KERNELS="nvrtc")
    found = SUMMARY.findall(proc.stdout)
    assert proc.returncode == 0 and len(found) == 2 and all(m[1] == "0" for m in found), proc.stdout + proc.stderr
    assert len(cache_files(tmp_path)) == 1  # renamed into place: no temporary left
    assert run(tools, tmp_path, FAKE_CUDA_KERNELS="nvrtc").kernels() == "cached"


def _real_nvrtc():
    given = os.environ.get("COMMLIB_TEST_NVRTC")
    if given:
        return given
    return _nvrtc_found(_search_env(**{k: os.environ[k] for k in ("CUDA_HOME", "CUDA_PATH", "VIRTUAL_ENV", "CONDA_PREFIX")
                                       if k in os.environ}))["nvrtc"]


def test_a_real_nvrtc_compiles_the_embedded_source(tools, tmp_path):
    """The source compiles under NVRTC (no C library headers there).  The fake driver
    cannot load real machine code, so the kernels are then staged, with a warning."""
    real = _real_nvrtc()
    if not real:
        pytest.skip("no real NVRTC here (COMMLIB_TEST_NVRTC=/path/to/libnvrtc.so)")
    for cc in ("90", "80"):
        r = run(tools, tmp_path, COMMLIB_KERNELS="nvrtc", COMMLIB_NVRTC=real, FAKE_CUDA_CC=cc, FAKE_CUDA_KERNELS=None)
        assert "failed to compile" not in r.proc.stderr, r.proc.stderr[-6000:]
        assert re.search(rf"compiled by NVRTC [0-9.]+ for sm_{cc} do not load", r.proc.stderr), r.proc.stderr[-3000:]
        assert r.kernels() == "none"


# --- on a GPU -------------------------------------------------------------------------

def _gpu_with_nvrtc():
    if gpu_count() < 1:
        pytest.skip("no GPU (libcuda.so.1 with a device)")
    real = _real_nvrtc()
    if not real:
        pytest.skip("no NVRTC on this GPU machine (pip install nvidia-cuda-nvrtc, or COMMLIB_TEST_NVRTC=...)")
    return real


def test_gpu_nvrtc_kernels_pack_like_the_host_mpi(tmp_path):
    """device_pack_c on the GPU with kernels compiled at run time, then from the cache."""
    real = _gpu_with_nvrtc()
    exe = build_c("tests/c/device_pack_c.c", tmp_path)
    env = {"COMMLIB_KERNELS": "nvrtc", "COMMLIB_NVRTC": real, "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "COMMLIB_LOG": "info"}
    for want in ("nvrtc", "cached"):
        proc = run_mpi(1, [exe], env=env, timeout=600)
        m = SUMMARY.search(proc.stdout)
        assert m, proc.stdout[-4000:] + proc.stderr[-4000:]
        assert int(m["mismatches"]) == 0 and proc.returncode == 0, proc.stdout[-6000:]
        assert int(m[want]) == 1, proc.stderr[-4000:]
        print(next((line for line in proc.stderr.splitlines() if "device pack kernels loaded" in line), ""))


BYTES_SCRIPT = r"""
import random, sys
import cupy as cp, numpy as np
from mpi4py import MPI
from commlib import native
from typegen import TypeGen, buffer_span
seed, trees, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
gen, rng, chunks = TypeGen(seed, allow_nonpositive_extent=False), random.Random(seed), []
for i in range(trees):
    t = gen.generate()
    if native.register(t.dtype)["supported"]:
        info, count = t.info(), rng.randint(1, 3)
        lo, hi = buffer_span(info, count)
        lo, hi = min(lo, 0), max(hi, count * info.extent)
        typed = cp.asarray(np.frombuffer(rng.randbytes(hi - lo + 16), np.uint8))
        packed = cp.zeros(info.size * count + 8, cp.uint8)
        pos = native.pack(t.dtype, typed, count, packed, position=3, offset=8 - lo)
        back = cp.asarray(np.frombuffer(rng.randbytes(hi - lo + 16), np.uint8))
        native.unpack(t.dtype, packed, 3, back, count, offset=8 - lo)
        chunks += [np.int64([i, pos]).tobytes(), packed.get().tobytes(), back.get().tobytes()]
    native.forget(t.dtype)
    t.free()
open(out, "wb").write(b"".join(chunks))
print("kernels", native.stat("kernels.fatbin"), native.stat("kernels.nvrtc"), native.stat("kernels.cached"))
"""


def test_gpu_nvrtc_bytes_equal_the_fatbin_bytes(tmp_path):
    """The same random trees packed and unpacked on the GPU by the fatbin's kernels and by
    NVRTC's: every byte equal."""
    real = _gpu_with_nvrtc()
    pytest.importorskip("cupy")
    if not has_fatbin():
        pytest.skip("built without nvcc: no fatbin to compare with")
    seed = int(os.environ.get("COMMLIB_NVRTC_SEED", "4242"))
    print(f"seed={seed}")
    script = tmp_path / "bytes.py"
    script.write_text(BYTES_SCRIPT)
    results = {}
    for route, expect in (("fatbin", "kernels 1 0 0"), ("nvrtc", "kernels 0 1 0")):
        out = tmp_path / f"{route}.bin"
        env = clean_env(COMMLIB_KERNELS=route, COMMLIB_NVRTC=real, XDG_CACHE_HOME=str(tmp_path / "cache"),
                        PYTHONPATH=os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p))
        proc = subprocess.run([sys.executable, str(script), str(seed), "400", str(out)], capture_output=True,
                              text=True, env=env, timeout=600)
        assert proc.returncode == 0 and expect in proc.stdout, f"seed={seed} {route}:\n{proc.stdout}{proc.stderr[-4000:]}"
        results[route] = out.read_bytes()
    assert len(results["fatbin"]) > 100000, len(results["fatbin"])
    assert results["fatbin"] == results["nvrtc"], f"seed={seed}: NVRTC's kernels give other bytes than the fatbin's"


def test_heap_memory_is_classified_without_a_driver_call(tools, tmp_path):
    """The brk heap and the caller's stack are host memory: commlib packs between small
    malloc'd buffers and between local arrays without a pointer query (two per MPI_Pack
    before, a driver call with a lock each), while managed memory, which the driver maps
    elsewhere, is still asked about and packed right."""
    r = run(tools, tmp_path)
    m = re.search(r"^device_pack_c: host_queries=(-?\d+) managed_queries=(-?\d+)$", r.proc.stdout, re.M)
    assert m, r.out[-3000:]
    assert int(m[1]) == 0 and int(m[2]) > 0, m[0]
