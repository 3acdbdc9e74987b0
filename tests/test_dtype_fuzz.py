"""Randomized datatype tests: commlib's own MPI_Pack/MPI_Unpack/MPI_Pack_size must be
byte-identical to the host MPI's for random nested derived datatypes, and bad input must
give the same error classes.

  * tests/c/dtype_fuzz.c under the interposer (MPI_* vs PMPI_* in one process): 4 seeds x
    5,000 trees (incl. MPI-4 _c constructors, darray, MPI_BOTTOM addressing); most packs
    must take commlib's fast path; also deeper trees, 2 ranks, COMMLIB_MAX_PIECES=1/3 and
    COMMLIB_NO_PACK=1 (byte-identical, nothing packed fast), plain mpiexec (checker sanity);
  * the same with COMMLIB_DISABLE=1 (everything passes through: fast=0);
  * tests/typegen.py trees through the Python bindings (commlib.native) against mpi4py,
    with the canonical pieces of native.register walked independently as a third opinion;
  * exact canonical forms of a few hand-written types (native.register);
  * tests/c/pack_errors.c (error classes, large-count forms, int overflow) under the
    interposer;
  * tests/c/pack_rows.c: every row kernel of the host engine (block sizes 1-300 and larger,
    near, far and negative strides, counts around the unrolled steps and the prefetch
    distance), pack and unpack, all of it packed by commlib itself;
  * tests/c/pack_race.c: the x faces whose rows race two loops (COMMLIB_ROW_RACE), each loop
    made the winner by the test hook, and the race counted.

Seeds: COMMLIB_FUZZ_SEEDS="1,2,3" overrides the C fuzzer's seeds, COMMLIB_FUZZ_TREES the trees
per seed, COMMLIB_PYFUZZ_SEEDS / COMMLIB_PYFUZZ_TREES the Python generator's.  Every failure
message names its seed and a command line that reproduces it (add --verbose to see every
tree; --large-count 0 / --no-long-double leave out the _c constructors / long double leaves
when triaging).  COMMLIB_TEST_PRELOAD=0 runs the C programs under plain mpiexec (no
interposer: fast=-1 is then expected) and skips the Python-binding tests.
"""
import os
import platform
import random
import re

import numpy as np
import pytest

from harness import build_c, run_mpi

PRELOAD = os.environ.get("COMMLIB_TEST_PRELOAD", "1") != "0"


def _ints(var, default):
    raw = os.environ.get(var)
    return [int(x) for x in raw.split(",") if x.strip()] if raw else default


FUZZ_SEEDS = _ints("COMMLIB_FUZZ_SEEDS", [20240611, 7, 424242, 99991])
FUZZ_TREES = int(os.environ.get("COMMLIB_FUZZ_TREES", "5000"))
PYFUZZ_SEEDS = _ints("COMMLIB_PYFUZZ_SEEDS", [11, 12, 13])
PYFUZZ_TREES = int(os.environ.get("COMMLIB_PYFUZZ_TREES", "1500"))

FUZZ_LINE = re.compile(r"^dtype_fuzz: seed=(?P<seed>\d+) trees=(?P<trees>\d+) "
                       r"mismatches=(?P<mism>\d+) fast=(?P<fast>-?\d+) "
                       r"fallback=(?P<fallback>-?\d+)$", re.M)
ERR_LINE = re.compile(r"^pack_errors: cases=(?P<cases>\d+) mismatches=(?P<mism>\d+)$", re.M)
RACE_LINE = re.compile(r"^pack_race: cases=(?P<cases>\d+) mismatches=(?P<mism>\d+) expected=(?P<expected>\d+) "
                       r"races=(?P<races>-?\d+) one=(?P<one>-?\d+) probed=(?P<probed>\d+) probed_24=(?P<probed_24>\d+) "
                       r"probes=(?P<probes>-?\d+) warm=(?P<warm>-?\d+)$", re.M)
ROWS_LINE = re.compile(r"^pack_rows: cases=(?P<cases>\d+) mismatches=(?P<mism>\d+) fast=(?P<fast>-?\d+)$",
                       re.M)


# ------------------------------------------------------------------------- C programs
@pytest.fixture(scope="module")
def fuzz_bin(tmp_path_factory):
    return build_c("tests/c/dtype_fuzz.c", tmp_path_factory.mktemp("dtype_fuzz"))


@pytest.fixture(scope="module")
def errors_bin(tmp_path_factory):
    return build_c("tests/c/pack_errors.c", tmp_path_factory.mktemp("pack_errors"))


def repro(binary, seed, trees, env=None, preload=PRELOAD, extra=()):
    envs = "".join(f"{k}={v} " for k, v in (env or {}).items())
    launch = "python -m commlib run -n 1 --" if preload else "mpiexec -n 1"
    return (f"reproduce: {envs}{launch} {binary} --seed {seed} --trees {trees} "
            f"{' '.join(extra)} --verbose").replace("  ", " ")


def run_fuzz(binary, seed, trees, env=None, preload=PRELOAD, extra=()):
    """Runs dtype_fuzz on one rank; returns (proc, summary match, output + reproducer)."""
    argv = [binary, "--seed", str(seed), "--trees", str(trees), *extra]
    proc = run_mpi(1, argv, env=env, preload=preload, timeout=240)
    out = (proc.stdout + proc.stderr)[-8000:] + "\n" + repro(binary, seed, trees, env, preload,
                                                             extra)
    found = FUZZ_LINE.findall(proc.stdout)
    assert len(found) == 1, \
        f"seed={seed}: no summary line, the fuzzer died (rc={proc.returncode})\n{out}"
    m = FUZZ_LINE.search(proc.stdout)
    assert int(m["seed"]) == seed and int(m["trees"]) == trees, m.group(0)
    return proc, m, out


@pytest.mark.parametrize("seed", FUZZ_SEEDS)
def test_c_fuzz_preloaded(fuzz_bin, seed):
    proc, m, out = run_fuzz(fuzz_bin, seed, FUZZ_TREES)
    assert int(m["mism"]) == 0, f"seed={seed}: {m.group(0)}\n{out}"
    assert proc.returncode == 0, f"seed={seed}: rc={proc.returncode}\n{out}"
    fast, fallback = int(m["fast"]), int(m["fallback"])
    if not PRELOAD:
        assert fast == -1 and fallback == -1, m.group(0)
        return
    assert fast >= 0 and fallback >= 0, f"seed={seed}: commlib_stat not found under the " \
                                        f"preload: {m.group(0)}"
    # every tree packs at least twice (incount 1 and 2..4)
    assert fast + fallback >= 2 * FUZZ_TREES, f"seed={seed}: pack calls not counted: {m.group(0)}"
    assert fast > 0.7 * (fast + fallback), \
        f"seed={seed}: commlib packed only {fast} of {fast + fallback} calls itself: {m.group(0)}"


def test_c_fuzz_total_trees():
    """The preloaded runs above cover at least 10,000 trees."""
    assert len(FUZZ_SEEDS) * FUZZ_TREES >= 10_000 or "COMMLIB_FUZZ_TREES" in os.environ


def test_c_fuzz_disabled(fuzz_bin):
    """COMMLIB_DISABLE=1: the interposer forwards everything, nothing is packed by commlib."""
    seed = FUZZ_SEEDS[0]
    proc, m, out = run_fuzz(fuzz_bin, seed, 1000, env={"COMMLIB_DISABLE": "1"})
    assert int(m["mism"]) == 0 and proc.returncode == 0, f"seed={seed}: {m.group(0)}\n{out}"
    if PRELOAD:
        assert int(m["fast"]) == 0, f"seed={seed}: COMMLIB_DISABLE=1 still packed fast: {m.group(0)}"
    else:
        assert int(m["fast"]) == -1


@pytest.mark.parametrize("knob", ["COMMLIB_MAX_PIECES=1", "COMMLIB_MAX_PIECES=3",
                                  "COMMLIB_NO_PACK=1"])
def test_c_fuzz_knobs(fuzz_bin, knob):
    """Fewer pieces allowed (more types left to the host MPI) and packing switched off:
    still byte-identical; COMMLIB_NO_PACK=1 packs nothing itself."""
    seed = FUZZ_SEEDS[-1] + 17
    name, value = knob.split("=")
    proc, m, out = run_fuzz(fuzz_bin, seed, 1500, env={name: value})
    assert int(m["mism"]) == 0 and proc.returncode == 0, f"seed={seed} {knob}: {m.group(0)}\n{out}"
    if PRELOAD and name == "COMMLIB_NO_PACK":
        assert int(m["fast"]) == 0 and int(m["fallback"]) >= 3000, f"{knob}: {m.group(0)}"
    elif PRELOAD:
        assert int(m["fallback"]) > 0 and int(m["fast"]) > 0, f"{knob}: {m.group(0)}"


def test_c_fuzz_two_ranks(fuzz_bin):
    """Every rank fuzzes its own stream (seed mixed with the rank)."""
    seed = FUZZ_SEEDS[0] + 2
    proc = run_mpi(2, [fuzz_bin, "--seed", str(seed), "--trees", "800"], preload=PRELOAD,
                   timeout=240)
    found = FUZZ_LINE.findall(proc.stdout)
    out = proc.stdout + proc.stderr
    assert len(found) == 2, f"seed={seed}: expected a summary line per rank\n{out[-8000:]}"
    for m in FUZZ_LINE.finditer(proc.stdout):
        assert int(m["mism"]) == 0, f"seed={seed} (2 ranks): {m.group(0)}\n{out[-8000:]}"
    assert proc.returncode == 0, out[-8000:]


def test_c_fuzz_plain_mpiexec(fuzz_bin):
    """Without the interposer MPI_Pack is PMPI_Pack: the checker must agree with itself."""
    seed = FUZZ_SEEDS[0] + 1
    proc, m, out = run_fuzz(fuzz_bin, seed, 1000, preload=False)
    assert int(m["mism"]) == 0 and proc.returncode == 0, f"seed={seed}: {m.group(0)}\n{out}"
    assert int(m["fast"]) == -1 and int(m["fallback"]) == -1, m.group(0)


def test_c_fuzz_deeper_trees(fuzz_bin):
    """Fewer, deeper trees (max depth 6)."""
    seed = 31337
    proc, m, out = run_fuzz(fuzz_bin, seed, 1500, extra=("--max-depth", "6"))
    assert int(m["mism"]) == 0 and proc.returncode == 0, f"seed={seed}: {m.group(0)}\n{out}"


@pytest.fixture(scope="module")
def rows_bin(tmp_path_factory):
    return build_c("tests/c/pack_rows.c", tmp_path_factory.mktemp("pack_rows"))


@pytest.mark.parametrize("tail_first,avx512,probe,cached,unpack_prefetch,gap_memcpy,aliased,page,calls,wide,few,"
                         "unpack_memcpy,long,aligned,unpack_probe,loads_first,aligned_stream", [
    ("0", "0", "0", "", "1", "0", "0", "0", "0", "1", "1", "1", "0", "1", "0", "1", "1"),
    ("1", "0", "0", "", "0", "1", "1", "1", "1", "0", "0", "0", "1", "0", "1", "0", "0"),
    ("0", "1", "0", "", "0", "0", "1", "0", "0", "1", "0", "1", "1", "1", "0", "0", "1"),
    ("1", "1", "0", "", "1", "1", "0", "1", "1", "0", "1", "0", "0", "0", "1", "1", "0"),
    ("1", "1", "1", "1", "0", "0", "1", "1", "0", "0", "1", "1", "1", "1", "1", "0", "0"),
    ("1", "0", "1", "0", "1", "1", "0", "1", "1", "1", "0", "0", "0", "0", "1", "1", "1"),
    ("0", "0", "1", "1", "1", "1", "1", "0", "1", "1", "1", "0", "0", "0", "1", "0", "1"),
    ("1", "0", "1", "", "0", "0", "0", "0", "0", "0", "0", "1", "1", "1", "0", "1", "0")])
def test_pack_rows_every_kernel(rows_bin, tail_first, avx512, probe, cached, unpack_prefetch, gap_memcpy, aliased,
                                page, calls, wide, few, unpack_memcpy, long, aligned, unpack_probe, loads_first,
                                aligned_stream):
    """COMMLIB_TAIL_FIRST, COMMLIB_AVX512, COMMLIB_ROW_PROBE, COMMLIB_UNPACK_PREFETCH,
    COMMLIB_GAP_MEMCPY, COMMLIB_ALIASED_ROWS and COMMLIB_PAGE_BLOCKS both ways: far rows of
    256 B-16 KiB copied last bytes first, 129-256-byte blocks with gaps packed in 64-byte loads,
    rows of 4 KiB+ after a timed first one through `rep movsb` (when it came from cache: the
    test hook gives the verdict, 1 or 0, or leaves it to the clock), 8-16-byte blocks unpacked
    without the prefetch, 16 a step from two bases, and blocks of up to 16 bytes a multiple of
    1 KiB apart packed one a step are AMD's (auto), blocks of 512 B+ with gaps packed by memcpy
    every CPU's (auto since stop 50),
    blocks of up to 8 bytes a page apart 4 a step after 64 timed ones (the same hook's verdict:
    1 takes the 4-a-step loop, 0 the 16), 12-, 16- and 24-byte blocks a multiple of 1 KiB apart
    by a memcpy call each (COMMLIB_ALIASED_CALLS), 24-byte blocks 32-127 bytes apart by 32-byte
    moves (COMMLIB_WIDE_ROWS) and under 8 rows of 256 B+ back to back by memcpy each
    (COMMLIB_FEW_ROWS, where tail-first is off; no CPU's auto since stop 48, so only forced),
    rows of 4 KiB+ a page apart unpacked by memcpy
    (COMMLIB_UNPACK_MEMCPY), blocks of up to 8 bytes 256 B-4 KiB apart in long rows packed with
    prefetches and 8-32-byte ones over 16-128 MiB by a memcpy call each (COMMLIB_LONG_ROWS; the
    test hook makes 64 blocks long, and those spans 4-32 KiB) and rows of 64 bytes and more
    a page apart unpacked with aligned stores (COMMLIB_ALIGNED_ROWS) the others' (auto), and 8-24-byte
    blocks far apart unpacked after 64 timed ones with or without the prefetch (COMMLIB_UNPACK_PROBE,
    the same hook's verdict: 1 without), Intel's, so each CPU would otherwise
    test one of the loops; and COMMLIB_LOADS_FIRST (65-256-byte blocks with gaps packed all loads
    first, in 32-byte moves; every x86-64 CPU's auto) and COMMLIB_ALIGNED_STREAM (128 B+ rows back
    to back stored aligned, with the streaming loop's prefetches; Intel's auto) both ways.
    (AVX512=1 on a CPU without AVX-512F runs the AVX2 loops: the case then repeats another.)"""
    if not PRELOAD and ("1" in (tail_first, avx512, probe, gap_memcpy, aliased, page, calls, wide, few,
                                    unpack_memcpy, long, aligned, unpack_probe, loads_first, aligned_stream)
                            or unpack_prefetch == "0"):
        pytest.skip("without the interposer there is no commlib loop to choose")
    env = {"COMMLIB_TAIL_FIRST": tail_first, "COMMLIB_AVX512": avx512, "COMMLIB_ROW_PROBE": probe,
           "COMMLIB_TEST_ROW_PROBE_CACHED": cached, "COMMLIB_UNPACK_PREFETCH": unpack_prefetch,
           "COMMLIB_GAP_MEMCPY": gap_memcpy, "COMMLIB_ALIASED_ROWS": aliased, "COMMLIB_PAGE_BLOCKS": page,
           "COMMLIB_ALIASED_CALLS": calls, "COMMLIB_WIDE_ROWS": wide, "COMMLIB_FEW_ROWS": few,
           "COMMLIB_UNPACK_MEMCPY": unpack_memcpy, "COMMLIB_LONG_ROWS": long, "COMMLIB_ALIGNED_ROWS": aligned,
           "COMMLIB_UNPACK_PROBE": unpack_probe, "COMMLIB_TEST_LONG_ROW_BLOCKS": "64",
           "COMMLIB_LOADS_FIRST": loads_first, "COMMLIB_ALIGNED_STREAM": aligned_stream}
    proc = run_mpi(1, [rows_bin], env=env, preload=PRELOAD, timeout=300)
    out = proc.stdout + proc.stderr
    m = ROWS_LINE.search(proc.stdout)
    assert m, f"no summary line (rc={proc.returncode})\n{out[-4000:]}"
    assert int(m["cases"]) > 80000, m.group(0)
    assert int(m["mism"]) == 0, "\n".join(proc.stdout.splitlines()[:40]) + "\n" + m.group(0)
    if PRELOAD:
        # every call on commlib's own loops: a kernel that packs wrong bytes can also make
        # commit's self-check forward the type to the host MPI, which would hide the bug
        assert int(m["fast"]) == int(m["cases"]), m.group(0)
    assert proc.returncode == 0, out[-4000:]


@pytest.fixture(scope="module")
def race_bin(tmp_path_factory):
    return build_c("tests/c/pack_race.c", tmp_path_factory.mktemp("pack_race"))


def run_race(race_bin, env):
    """tests/c/pack_race.c under env: its 144 faces byte for byte as the host MPI's; its summary line."""
    proc = run_mpi(1, [race_bin], env=env, preload=PRELOAD, timeout=300)
    out = proc.stdout + proc.stderr
    m = RACE_LINE.search(proc.stdout)
    assert m, f"no summary line (rc={proc.returncode})\n{out[-4000:]}"
    assert int(m["cases"]) == 144 and int(m["mism"]) == 0, "\n".join(proc.stdout.splitlines()[:40])
    assert proc.returncode == 0, out[-4000:]
    return m


@pytest.mark.parametrize("race,winner", [("1", "1"), ("1", "0"), ("1", ""), ("0", "")])
def test_pack_race_both_loops(race_bin, race, winner):
    """COMMLIB_ROW_RACE: x faces of 8- and 16-byte blocks 2064 bytes apart, 8 bytes 4112 apart
    and 2048 apart (never raced), with planes and rows a plane on both sides of the race's
    limits, each packed 6 times (the race's 4 pieces take both loops) byte for byte as the
    host MPI packs them whichever loop wins: one block a step (winner 1), the kernel's own
    (winner 0) or the faster by the clock (no hook); the probes' verdict "cached" by the test
    hook keeps one slot a shape, so the race ends on exactly the faces it should, and never
    runs with the knob off."""
    env = {"COMMLIB_ROW_RACE": race, "COMMLIB_TEST_ROW_RACE_WINNER": winner, "COMMLIB_PAGE_BLOCKS": "1",
           "COMMLIB_TEST_ROW_PROBE_CACHED": "1", "COMMLIB_LONG_ROWS": "1", "COMMLIB_ALIASED_CALLS": "0",
           "COMMLIB_ALIASED_ROWS": "0"}
    m = run_race(race_bin, env)
    if not PRELOAD:
        assert int(m["races"]) == -1, m.group(0)
        return
    expected, races, one = int(m["expected"]), int(m["races"]), int(m["one"])
    assert expected == 18, m.group(0)  # the program's own count of the faces in the race's reach
    if race == "0":
        assert races == 0 and one == 0, m.group(0)
        return
    assert races == expected, m.group(0)
    if winner == "1":
        assert one == races, m.group(0)
    elif winner == "0":
        assert one == 0, m.group(0)
    else:
        assert 0 <= one <= races, m.group(0)


@pytest.mark.parametrize("probe,cached", [("1", "1"), ("1", "0"), ("0", "1"), ("24", "1")])
def test_unpack_probe_both_ways(race_bin, probe, cached):
    """COMMLIB_UNPACK_PROBE: the same x faces unpacked (blocks of 8, 16 and 24 bytes 2064 and 2048
    bytes apart, rows of 31-67 blocks, 15-64 planes) byte for byte as the host MPI unpacks them,
    with the piece's first 64 blocks timed and the rest unpacked without the prefetch (verdict
    "cached", forced by the test hook) or with it (not cached); exactly the faces in the probe's
    reach are probed (rows of 64 blocks or more, 1024 blocks or more a face, under a page apart:
    36 of 144; with "24", what `auto` does on Intel's CPUs, those of 24-byte blocks: 12), none
    with the knob off."""
    env = {"COMMLIB_UNPACK_PROBE": probe, "COMMLIB_UNPACK_PREFETCH": "1", "COMMLIB_TEST_ROW_PROBE_CACHED": cached}
    m = run_race(race_bin, env)
    if not PRELOAD:
        assert int(m["probes"]) == -1, m.group(0)
        return
    probed, probes, warm = int(m["probed"]), int(m["probes"]), int(m["warm"])
    assert probed == 36 and int(m["probed_24"]) == 12, m.group(0)  # the program's own counts of the faces in reach
    if probe == "24":
        probed = int(m["probed_24"])
    if probe == "0" or platform.machine() != "x86_64":  # the probe's clock is x86-64's
        assert probes == 0 and warm == 0, m.group(0)
        return
    assert probes == probed, m.group(0)
    assert warm == (probes if cached == "1" else 0), m.group(0)


def test_pack_errors(errors_bin):
    proc = run_mpi(1, [errors_bin], preload=PRELOAD, timeout=120)
    out = proc.stdout + proc.stderr
    m = ERR_LINE.search(proc.stdout)
    assert m, f"no summary line (rc={proc.returncode})\n{out}"
    assert int(m["cases"]) >= 30, out
    assert int(m["mism"]) == 0, "\n".join(
        line for line in proc.stdout.splitlines() if not line.startswith("ok")) + "\n" + out[-4000:]
    assert proc.returncode == 0, out


# ------------------------------------------------------------------------- Python bindings
@pytest.fixture(scope="module")
def mpi():
    from mpi4py import MPI
    return MPI


@pytest.fixture(scope="module")
def native():
    if not PRELOAD:
        pytest.skip("COMMLIB_TEST_PRELOAD=0: the native library is not required")
    from commlib import native as mod
    return mod


def _normalized(pieces):
    """Pieces with count-1 dimensions dropped (they do not change the layout)."""
    out = []
    for p in pieces:
        dims = [[int(c), int(s)] for c, s in p["dims"] if int(c) != 1]
        out.append({"offset": int(p["offset"]), "block": int(p["block"]), "dims": dims})
    return out


def _pieces_gather(pieces, extent, count, buf, base):
    """Bytes of `count` elements gathered from buf (buffer pointer at byte `base`) in the order
    the canonical pieces describe: pieces in order, dims[0] fastest, elements `extent` apart.
    None when the pieces reach outside buf (outside the type's true extent)."""
    chunks = []
    for e in range(count):
        for p in pieces:
            offs = np.array([base + e * extent + int(p["offset"])], dtype=np.int64)
            for cnt, stride in p["dims"]:
                offs = (offs[None, :] + np.arange(int(cnt), dtype=np.int64)[:, None]
                        * int(stride)).ravel()
            idx = (offs[:, None] + np.arange(int(p["block"]), dtype=np.int64)[None, :]).ravel()
            if idx.size and (idx.min() < 0 or idx.max() >= buf.size):
                return None
            chunks.append(buf[idx])
    return np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)


def _overlaps(mpi, dtype, info, count, nbytes, base):
    """Does the type map of `count` elements write some byte twice?"""
    total = info.size * count
    if total == 0:
        return False
    dst = np.zeros(nbytes, np.uint8)
    src = np.full(total, 0xFF, np.uint8)
    view = memoryview(dst)[base:base + count * info.extent]
    dtype.Unpack(src, 0, view, mpi.COMM_WORLD)
    return int(np.count_nonzero(dst)) < total


def _check_python_tree(mpi, native, t, rng, stats):
    """Compares native.* with mpi4py for one generated type; returns a problem string or None."""
    from typegen import buffer_span
    dt = t.dtype
    info = t.info()
    reg = native.register(dt)
    try:
        for key in ("size", "extent", "lb", "true_lb", "true_extent"):
            if int(reg[key]) != getattr(info, key):
                return f"register()[{key!r}]={reg[key]} but MPI says {getattr(info, key)}"
        if not reg["supported"]:
            stats["unsupported"] += 1
            for fn in (lambda: native.pack(dt, np.zeros(64, np.uint8), 1, np.zeros(64, np.uint8)),
                       lambda: native.unpack(dt, np.zeros(64, np.uint8), 0,
                                             np.zeros(64, np.uint8), 1)):
                try:
                    fn()
                except native.UnsupportedType:
                    pass
                else:
                    return f"unsupported type ({reg['reason']}) did not raise UnsupportedType"
            return None
        stats["supported"] += 1
        for count in (1, rng.randint(2, 3)):
            ref_ps = dt.Pack_size(count, mpi.COMM_WORLD)
            ps = native.pack_size(dt, count)
            if ps != ref_ps:
                return f"count={count}: pack_size {ps} != host {ref_ps}"
            lo, hi = buffer_span(info, count)
            lo = min(lo, 0)
            hi = max(hi, count * info.extent)
            base = 8 - lo
            nbytes = base + hi + 8
            inbuf = np.frombuffer(rng.randbytes(nbytes), np.uint8).copy()
            pos0 = rng.randint(1, 24)
            out_init = rng.randbytes(pos0 + ref_ps + 8)
            out_ref = np.frombuffer(out_init, np.uint8).copy()
            # numpy arrays mostly; now and then plain buffers (bytes in, bytearray out)
            plain = rng.random() < 0.15
            out_mine = bytearray(out_init) if plain else out_ref.copy()
            view = memoryview(inbuf)[base:base + count * info.extent]
            p_ref = dt.Pack(view, out_ref[:pos0 + ref_ps], pos0, mpi.COMM_WORLD)
            p = native.pack(dt, bytes(inbuf) if plain else inbuf, count, out_mine,
                            position=pos0, offset=base)
            if plain:
                out_mine = np.frombuffer(bytes(out_mine), np.uint8)
            if p != p_ref:
                return f"count={count}: pack position {p} != host {p_ref} (start {pos0})"
            if not np.array_equal(out_mine, out_ref):
                bad = int(np.flatnonzero(out_mine != out_ref)[0])
                return f"count={count}: packed bytes differ from byte {bad} (start {pos0})"
            # the canonical pieces, walked independently, must give the same bytes
            g = _pieces_gather(reg["pieces"], info.extent, count, inbuf, base)
            if g is None or not np.array_equal(g, out_ref[pos0:p_ref]):
                return (f"count={count}: walking register()'s pieces does not reproduce the packed "
                        f"bytes; pieces={reg['pieces']}")
            # unpack the host-packed bytes into two copies of one random buffer
            packed = out_ref[:p_ref].copy()
            dst_ref = np.frombuffer(rng.randbytes(nbytes), np.uint8).copy()
            dst_mine = dst_ref.copy()
            q_ref = dt.Unpack(packed, pos0, memoryview(dst_ref)[base:base + count * info.extent],
                              mpi.COMM_WORLD)
            q = native.unpack(dt, packed, pos0, dst_mine, count, offset=base)
            if q != q_ref:
                return f"count={count}: unpack position {q} != host {q_ref}"
            if not np.array_equal(dst_mine, dst_ref):
                if _overlaps(mpi, dt, info, count, nbytes, base):
                    stats["overlap_skipped"] += 1
                    continue
                bad = int(np.flatnonzero(dst_mine != dst_ref)[0])
                return f"count={count}: unpacked bytes differ at buffer byte {bad} (base {base})"
        return None
    finally:
        native.forget(dt)


@pytest.mark.parametrize("seed", PYFUZZ_SEEDS)
def test_python_fuzz(mpi, native, seed):
    from typegen import TypeGen
    gen = TypeGen(seed, allow_nonpositive_extent=False)  # mpi4py counts elements by extent
    rng = random.Random(seed * 7919)
    stats = {"supported": 0, "unsupported": 0, "overlap_skipped": 0}
    failures = []
    for i in range(PYFUZZ_TREES):
        t = gen.generate()
        try:
            problem = _check_python_tree(mpi, native, t, rng, stats)
        finally:
            t.free()
        if problem:
            failures.append(f"tree {i}: {problem}\n    type: {t.desc}")
            if len(failures) >= 5:
                break
    assert not failures, f"typegen seed={seed}: {len(failures)} failing trees " \
                         f"({stats}):\n" + "\n".join(failures)
    total = stats["supported"] + stats["unsupported"]
    assert stats["supported"] > 0.7 * total, f"typegen seed={seed}: only {stats} supported"


def test_python_fuzz_total(mpi):
    assert len(PYFUZZ_SEEDS) * PYFUZZ_TREES >= 3000 or "COMMLIB_PYFUZZ_TREES" in os.environ


# ------------------------------------------------------------------------- exact canonical forms
def _single(native, dt, mpi, commit=True):
    if commit:
        dt.Commit()
    try:
        reg = native.register(dt)
    finally:
        native.forget(dt)
        dt.Free()
    assert reg["supported"], reg
    assert reg["reason"] is None, reg
    return reg


def test_canonical_vector(mpi, native):
    reg = _single(native, mpi.DOUBLE.Create_vector(4, 2, 5), mpi)
    assert _normalized(reg["pieces"]) == [{"offset": 0, "block": 16, "dims": [[4, 40]]}], reg
    assert (reg["size"], reg["extent"], reg["lb"]) == (64, (3 * 5 + 2) * 8, 0)


def test_canonical_contiguous_of_contiguous(mpi, native):
    inner = mpi.INT.Create_contiguous(3)
    outer = inner.Create_contiguous(5)
    inner.Free()
    reg = _single(native, outer, mpi)
    assert _normalized(reg["pieces"]) == [{"offset": 0, "block": 60, "dims": []}], reg


def test_canonical_subarray(mpi, native):
    dt = mpi.DOUBLE.Create_subarray([8, 8], [4, 2], [1, 3], order=mpi.ORDER_C)
    reg = _single(native, dt, mpi)
    assert _normalized(reg["pieces"]) == [{"offset": (1 * 8 + 3) * 8, "block": 16,
                                           "dims": [[4, 64]]}], reg
    assert reg["extent"] == 512 and reg["size"] == 64


def test_canonical_subarray_fortran(mpi, native):
    # Fortran order: dim 0 is contiguous; sub 2x4 at (3,1) of an 8x8 array
    dt = mpi.DOUBLE.Create_subarray([8, 8], [2, 4], [3, 1], order=mpi.ORDER_FORTRAN)
    reg = _single(native, dt, mpi)
    assert _normalized(reg["pieces"]) == [{"offset": (1 * 8 + 3) * 8, "block": 16,
                                           "dims": [[4, 64]]}], reg


def test_canonical_hvector_negative_stride(mpi, native):
    reg = _single(native, mpi.DOUBLE.Create_hvector(3, 1, -24), mpi)
    assert _normalized(reg["pieces"]) == [{"offset": 0, "block": 8, "dims": [[3, -24]]}], reg
    assert reg["lb"] == -48 and reg["true_lb"] == -48


def test_canonical_struct_double_int(mpi, native):
    dt = mpi.Datatype.Create_struct([1, 1], [0, 8], [mpi.DOUBLE, mpi.INT])
    reg = _single(native, dt, mpi)
    assert _normalized(reg["pieces"]) == [{"offset": 0, "block": 12, "dims": []}], reg
    assert reg["size"] == 12


def test_canonical_indexed_evenly_spaced(mpi, native):
    reg = _single(native, mpi.DOUBLE.Create_indexed([2, 2, 2], [0, 5, 10]), mpi)
    assert _normalized(reg["pieces"]) == [{"offset": 0, "block": 16, "dims": [[3, 40]]}], reg


def test_canonical_vector_of_vector(mpi, native):
    inner = mpi.INT.Create_vector(2, 1, 2)  # ints at 0 and 8, extent 12
    outer = inner.Create_hvector(3, 1, 48)
    inner.Free()
    reg = _single(native, outer, mpi)
    assert _normalized(reg["pieces"]) == [{"offset": 0, "block": 4,
                                           "dims": [[2, 8], [3, 48]]}], reg


def test_canonical_resized_struct_array(mpi, native):
    # a struct {double at 0, int at 8} resized to 16 bytes, contiguous x4 -> 4 blocks of 12
    st = mpi.Datatype.Create_struct([1, 1], [0, 8], [mpi.DOUBLE, mpi.INT])
    rs = st.Create_resized(0, 16)
    st.Free()
    arr = rs.Create_contiguous(4)
    rs.Free()
    reg = _single(native, arr, mpi)
    assert _normalized(reg["pieces"]) == [{"offset": 0, "block": 12, "dims": [[4, 16]]}], reg


def test_canonical_struct_with_gap(mpi, native):
    # two fields with a gap stay two pieces, in type-map order
    dt = mpi.Datatype.Create_struct([1, 2], [0, 12], [mpi.DOUBLE, mpi.SHORT])
    reg = _single(native, dt, mpi)
    assert _normalized(reg["pieces"]) == [{"offset": 0, "block": 8, "dims": []},
                                          {"offset": 12, "block": 4, "dims": []}], reg


def test_native_pack_bad_args(mpi, native):
    dt = mpi.DOUBLE.Create_vector(4, 2, 5).Commit()
    try:
        native.register(dt)
        inbuf = np.zeros(17 * 8, np.uint8)
        with pytest.raises(native.PackError):  # 64 bytes do not fit in 63
            native.pack(dt, inbuf, 1, np.zeros(63, np.uint8))
        with pytest.raises(native.PackError):  # room for the data but not after position 8
            native.pack(dt, inbuf, 1, np.zeros(64, np.uint8), position=8)
        with pytest.raises(native.PackError):
            native.unpack(dt, np.zeros(63, np.uint8), 0, np.zeros(17 * 8, np.uint8), 1)
        with pytest.raises(ValueError):
            native.pack(dt, inbuf, -1, np.zeros(64, np.uint8))
        assert native.pack(dt, inbuf, 1, np.zeros(64, np.uint8)) == 64
        assert native.pack_size(dt, 3) == 192
    finally:
        native.forget(dt)
        dt.Free()


def test_native_accepts_int_handle(mpi, native):
    """An int handle (as mpi4py reports it: Datatype.handle / MPI._handleof) works like the
    Datatype object."""
    dt = mpi.DOUBLE.Create_vector(4, 2, 5).Commit()
    try:
        by_obj = native.register(dt)
        native.forget(dt)
        by_int = native.register(dt.handle)
        assert by_int == by_obj
        src = np.arange(17, dtype=np.float64)
        out = np.zeros(8, np.float64)
        assert native.pack(dt.handle, src, 1, out) == 64
        assert out.tolist() == [0, 1, 5, 6, 10, 11, 15, 16]
    finally:
        native.forget(dt)
        dt.Free()
