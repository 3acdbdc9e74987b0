"""One rank of tests/test_mpicomm.py: runs many MPIComm cases in one mpiexec launch.

    mpiexec -n N python mpicomm_worker.py --seed S --level full|light --kinds numpy,torch
                                          --suites matrix,async,partitioned,errors,init [--transport shm]

Every rank runs the same list of cases (build_cases: the names depend on the rank count, the
level, the buffer kinds and the suites, never on the rank, so that the pytest side computes
the same list with plan()).  Inputs: each rank regenerates every rank's input from the seed,
the case's name and the rank (gen), and checks its own result against numpy's answer.
At the end rank 0 gathers every rank's verdicts and result hashes and prints one line per case

    case <name> ok
    case <name> FAIL <why>            (a rank failed, or the ranks' results differ in a byte)

then `summary ranks=.. transport=.. cases=.. failed=.. seed=..`.  Rank 0 prints
`running <name>` on stderr before each case, so that a hang names its case.

Tolerances (floats; the engine reduces in an order of its own): with u the dtype's epsilon
(2^-10 float16, 2^-7 bfloat16, 2^-23 float32, 2^-52 float64) and S the rank count,
sum: |got - exact| <= S * u * sum|x_q|; avg: that / S + u * |exact|; prod: S * u * |exact|;
min, max: exact (NaN propagates).  float16/bfloat16 results are widened to float64 and
compared to the float64 answer on their (rounded) inputs.  Integers and bool: exact (sum and
prod wrap in the dtype; avg is the wrapped sum divided by S, truncated toward zero).
bfloat16 travels as uint16 bits on the numpy side (torch tensors; numpy via ml_dtypes when
it is installed).
"""
import argparse
import hashlib
import os
import sys
import time
import zlib

import numpy as np

FLOATS = ("float16", "bfloat16", "float32", "float64")
INTS = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
ALL_DTYPES = FLOATS + INTS + ("bool",)
LIGHT_DTYPES = ("float16", "bfloat16", "float32", "float64", "int8", "uint16", "int64", "bool")
EPS = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7, "float32": 2.0 ** -23, "float64": 2.0 ** -52}
TINY = {"float16": 2.0 ** -24, "bfloat16": 2.0 ** -133, "float32": 2.0 ** -149, "float64": 5e-324}
LARGE_BYTES = 40000  # with COMMLIB_ENGINE_CHUNK_KB=4 / SLICE_KB=4: ten chunks and more
WAIT = 60.0  # seconds any single wait may take before the case fails (a hang is a failure)

SUITES = ("matrix", "async", "partitioned", "errors", "init", "gpu", "exchange")


class Fail(Exception):
    pass


# A check that fails is recorded and the case goes on, so that a rank whose check failed still
# issues the case's remaining operations: one that stopped early would pair its next
# operations with the others' leftovers, and every later case would fail for nothing.
# need() is for what the rest of the case cannot do without (it ends the case).
_soft = []


def expect(cond, why):
    if not cond:
        _soft.append(why)
    return bool(cond)


def need(cond, why):
    if not cond:
        raise Fail(why)


def soft(fn, *args):
    """fn(*args), a Fail recorded instead of raised."""
    try:
        return fn(*args)
    except Fail as e:
        _soft.append(str(e))
        return None


def expect_raises(types, fn, what, match=None):
    """fn() must raise one of types (and not a MismatchError unless asked); returns the error,
    or None (recorded as a failure)."""
    from collectives import MismatchError
    try:
        fn()
    except types as e:
        if MismatchError not in (types if isinstance(types, tuple) else (types,)):
            expect(not isinstance(e, MismatchError), f"{what}: a MismatchError ({e}) where no communication should happen")
        if match is not None:
            expect(match in str(e), f"{what}: message {str(e)!r} does not mention {match!r}")
        return e
    except Exception as e:  # noqa: BLE001
        _soft.append(f"{what}: raised {type(e).__name__}: {e} instead of {_names(types)}")
        return None
    _soft.append(f"{what}: no error raised (expected {_names(types)})")
    return None


def _names(types):
    return "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))


# ---------------------------------------------------------------------------------------
# dtypes, buffer kinds, inputs, references

def have_ml_dtypes():
    try:
        import ml_dtypes  # noqa: F401
        return True
    except ImportError:
        return False


def kind_dtypes(kind, level):
    dts = ALL_DTYPES if level == "full" else LIGHT_DTYPES
    if kind == "cupy" or (kind == "numpy" and not have_ml_dtypes()):
        dts = tuple(d for d in dts if d != "bfloat16")
    return dts


def valid_ops(dtype):
    if dtype in FLOATS:
        return ("sum", "avg", "min", "max", "prod")
    if dtype == "bool":
        return ("sum", "min", "max", "prod", "band", "bor", "bxor")
    return ("sum", "avg", "min", "max", "prod", "band", "bor", "bxor")


def np_dtype(dtype):
    """The numpy dtype of the test's own copies (bfloat16: its uint16 bits)."""
    return np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)


def f32_to_bf16_bits(x32):
    """Round to nearest even (NaN: a quiet NaN)."""
    x32 = np.asarray(x32, np.float32)
    bits = x32.view(np.uint32).astype(np.uint64)
    out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x32), np.uint16(0x7FC0), out).astype(np.uint16)


def widen(a, dtype):
    """float64 values of a float dtype's array (bfloat16 as uint16 bits)."""
    if dtype == "bfloat16":
        return (np.asarray(a).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return np.asarray(a).astype(np.float64)


def seed_of(seed, key, rank):
    return np.random.default_rng([seed, zlib.crc32(key.encode()), rank + 1])


def gen(seed, key, rank, dtype, shape, op="sum"):
    """Rank `rank`'s input of case `key` (every rank can make everyone's)."""
    rng = seed_of(seed, key, rank)
    shape = tuple(shape)
    if dtype in FLOATS:
        if op == "prod":
            v = rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape)
        else:
            v = rng.uniform(-2.0, 2.0, shape)
        if dtype == "bfloat16":
            return f32_to_bf16_bits(np.asarray(v, np.float32)).reshape(shape)
        return np.asarray(v).astype(dtype).reshape(shape)
    if dtype == "bool":
        return np.asarray(rng.random(shape) < 0.7).reshape(shape)
    info = np.iinfo(dtype)
    return np.asarray(rng.integers(info.min, info.max, size=shape, dtype=np.dtype(dtype), endpoint=True)).reshape(shape)


def reference(stack, dtype, op, S):
    """numpy's answer for a stack (S, ...) of the ranks' inputs: (values, tolerance) where
    values are float64 for floats (tolerance an array) and the dtype's own for the rest
    (tolerance None: exact)."""
    if dtype == "bool":
        fn = {"sum": np.logical_or, "max": np.logical_or, "bor": np.logical_or, "prod": np.logical_and,
              "min": np.logical_and, "band": np.logical_and, "bxor": np.logical_xor}[op]
        return fn.reduce(stack, axis=0), None
    if dtype in INTS:
        dt = np.dtype(dtype)
        if op in ("sum", "avg"):
            total = np.add.reduce(stack, axis=0, dtype=dt)  # wraps
            if op == "sum":
                return total, None
            if dt.kind == "u":
                return (total // S).astype(dt), None
            t = total.astype(np.int64)
            q = t // S
            q = q + (((t % S) != 0) & (t < 0))  # floor -> toward zero
            return q.astype(dt), None
        if op == "prod":
            return np.multiply.reduce(stack, axis=0, dtype=dt), None
        fn = {"min": np.minimum, "max": np.maximum, "band": np.bitwise_and, "bor": np.bitwise_or,
              "bxor": np.bitwise_xor}[op]
        return fn.reduce(stack, axis=0), None
    v = widen(stack, dtype)
    u, tiny = EPS[dtype], TINY[dtype]
    with np.errstate(invalid="ignore"):
        if op == "sum":
            return v.sum(0), S * u * np.abs(v).sum(0) + tiny
        if op == "avg":
            ref = v.sum(0) / S
            return ref, u * np.abs(v).sum(0) + u * np.abs(ref) + tiny
        if op == "prod":
            ref = v.prod(0)
            return ref, S * u * np.abs(ref) + tiny
        return (np.minimum if op == "min" else np.maximum).reduce(v, axis=0), np.zeros(v.shape[1:])


def check_values(got, want, tol, dtype, what):
    """got (the result as numpy, dtype's own) against reference()'s (want, tol)."""
    expect(got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}")
    if tol is None:
        want = np.asarray(want).astype(np_dtype(dtype))
        if got.tobytes() != want.tobytes():
            bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
            i = int(bad[0]) if bad.size else 0
            raise Fail(f"{what}: {bad.size} of {got.size} elements differ; first at {i}: got "
                       f"{got.reshape(-1)[i]!r}, expected {want.reshape(-1)[i]!r}")
        return
    g = widen(got, dtype)
    nan_g, nan_w = np.isnan(g), np.isnan(want)
    if not np.array_equal(nan_g, nan_w):
        i = int(np.flatnonzero((nan_g != nan_w).reshape(-1))[0])
        raise Fail(f"{what}: NaN where none is expected or the reverse, at {i}: got {g.reshape(-1)[i]!r}, "
                   f"expected {want.reshape(-1)[i]!r}")
    with np.errstate(invalid="ignore"):
        err = np.where(nan_w, 0.0, np.abs(g - want))
    badmask = err > tol
    if badmask.any():
        i = int(np.flatnonzero(badmask.reshape(-1))[0])
        raise Fail(f"{what}: {int(badmask.sum())} of {g.size} elements off; first at {i}: got "
                   f"{g.reshape(-1)[i]!r}, expected {want.reshape(-1)[i]!r} (tolerance {tol.reshape(-1)[i]!r})")


def check_bytes(got, want, what):
    expect(got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}")
    if got.tobytes() != np.ascontiguousarray(want).tobytes():
        bad = np.flatnonzero(got.reshape(-1).view(np.uint8) != np.ascontiguousarray(want).reshape(-1).view(np.uint8)
                             ) if got.dtype == np.bool_ else np.flatnonzero(got.reshape(-1) != want.reshape(-1))
        i = int(bad[0]) if bad.size else 0
        raise Fail(f"{what}: {bad.size} of {got.size} elements differ; first at {i}: got "
                   f"{got.reshape(-1)[i]!r}, expected {want.reshape(-1)[i]!r}")


def digest(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


class Buffers:
    """numpy <-> the buffer kinds (numpy, torch CPU, cupy, torch CUDA)."""

    def __init__(self, kinds):
        self.torch = self.cupy = self.ml_dtypes = None
        if any(k.startswith("torch") for k in kinds):
            import torch
            self.torch = torch
        if "cupy" in kinds:
            import cupy
            self.cupy = cupy
        if have_ml_dtypes():
            import ml_dtypes
            self.ml_dtypes = ml_dtypes

    def to(self, a, dtype, kind):
        """A new buffer of `kind` holding the numpy array a (bfloat16: uint16 bits)."""
        a = np.array(a, order="C", copy=True)  # (ascontiguousarray would make a 0-d array 1-d)
        if kind == "numpy":
            return a.view(self.ml_dtypes.bfloat16) if dtype == "bfloat16" else a
        if kind in ("torch", "torch-cuda"):
            t = self.torch.from_numpy(a)
            if dtype == "bfloat16":
                t = t.view(self.torch.bfloat16)
            return t.to("cuda") if kind == "torch-cuda" else t
        if kind == "cupy":
            return self.cupy.asarray(a)
        raise ValueError(kind)

    def np(self, x, dtype):
        """The numpy copy of a buffer (bfloat16: uint16 bits)."""
        mod = type(x).__module__
        if mod.startswith("torch"):
            t = x.detach().to("cpu")
            if dtype == "bfloat16":
                return t.view(self.torch.int16).numpy().view(np.uint16).copy()
            return t.numpy().copy()
        if mod.startswith("cupy"):
            return self.cupy.asnumpy(x)
        return x.view(np.uint16).copy() if dtype == "bfloat16" else np.array(x)

    @staticmethod
    def library(x):
        mod = type(x).__module__
        return "torch" if mod.startswith("torch") else "cupy" if mod.startswith("cupy") else "numpy"

    def is_cuda(self, x):
        mod = type(x).__module__
        return mod.startswith("cupy") or (mod.startswith("torch") and x.device.type == "cuda")


# ---------------------------------------------------------------------------------------
# the cases

class Ctx:
    def __init__(self, size, level, kinds, suites, seed=0, transport="shm"):
        self.size, self.level, self.kinds, self.suites = size, level, list(kinds), list(suites)
        self.seed, self.transport = seed, transport
        self.rank = None
        self.comm = None
        self.buf = None

    def large(self, dtype):
        return LARGE_BYTES // np_dtype(dtype).itemsize + 5


def shape_name(shape):
    return "x".join(map(str, shape)) if shape else "scalar"


def rows_split(rows, parts):
    base, extra = divmod(rows, parts)
    return [base + (i < extra) for i in range(parts)]


def build_cases(ctx):
    """(name, fn) for every case, the same list on every rank."""
    cases = []
    for suite in ctx.suites:
        cases += globals()["suite_" + suite](ctx)
    names = [n for n, _ in cases]
    assert len(names) == len(set(names)), "duplicate case names"
    return cases


def plan(size, level, kinds, suites):
    return [name for name, _ in build_cases(Ctx(size, level, kinds, suites))]


# -- 1. the op x dtype x kind matrix ---------------------------------------------------------

def suite_matrix(ctx):
    S = ctx.size
    cases = []
    for kind in ctx.kinds:
        for dtype in kind_dtypes(kind, ctx.level):
            L = ctx.large(dtype)
            for op in valid_ops(dtype):
                for shape in [(0,), (1,), (4 * S + 1,), (L,)]:
                    cases.append((f"all_reduce/{kind}/{dtype}/{op}/{shape_name(shape)}",
                                  mk_all_reduce(ctx, kind, dtype, op, shape)))
                for i, rows in enumerate([0, 1, 2 * S + 1, L // 3]):
                    for use_out in ((False, True) if i == 2 else (i % 2 == 1,)):
                        name = f"reduce_scatter/{kind}/{dtype}/{op}/{rows}x3" + ("/out" if use_out else "")
                        cases.append((name, mk_reduce_scatter(ctx, kind, dtype, op, (rows, 3), use_out)))
            if dtype in FLOATS:  # min/max propagate NaN
                for op in ("min", "max"):
                    cases.append((f"all_reduce/{kind}/{dtype}/{op}/nan", mk_nan(ctx, kind, dtype, op, False)))
                    cases.append((f"reduce_scatter/{kind}/{dtype}/{op}/nan", mk_nan(ctx, kind, dtype, op, True)))
            for shape in [(), (0,), (1,), (S + 2, 3), (L,)]:
                cases.append((f"all_gather/{kind}/{dtype}/{shape_name(shape)}", mk_all_gather(ctx, kind, dtype, shape, False)))
            cases.append((f"all_gather/{kind}/{dtype}/{S + 2}x3/out", mk_all_gather(ctx, kind, dtype, (S + 2, 3), True)))
            for root in range(S):
                cases.append((f"broadcast/{kind}/{dtype}/root{root}/{4 * S + 1}", mk_broadcast(ctx, kind, dtype, root, (4 * S + 1,))))
            for i, shape in enumerate([(0,), (1,), (2, L // 2)]):
                root = (i + 1) % S
                cases.append((f"broadcast/{kind}/{dtype}/root{root}/{shape_name(shape)}", mk_broadcast(ctx, kind, dtype, root, shape)))
            for k, shape in enumerate([(0, 3), (S,), (3 * S, 2), (S * (L // S // 2), 2)]):
                for use_out in ((False, True) if k == 2 else (False,)):
                    name = f"all_to_all/{kind}/{dtype}/{shape_name(shape)}" + ("/out" if use_out else "")
                    cases.append((name, mk_all_to_all(ctx, kind, dtype, shape, use_out)))
            if S > 1:
                for shape in [(0,), (1,), (4 * S + 1,), (L,)]:
                    cases.append((f"sendrecv/{kind}/{dtype}/ring/{shape_name(shape)}", mk_ring(ctx, kind, dtype, shape)))
                for shape in [(5, 3), (L,)]:
                    cases.append((f"sendrecv/{kind}/{dtype}/any_source/{shape_name(shape)}", mk_any_source(ctx, kind, dtype, shape)))
        if S > 1:
            cases.append((f"sendrecv/{kind}/tags", mk_tags(ctx, kind)))
        if S == 2:  # a + b has one rounding whatever the order: the bytes are known exactly
            for dtype in ("float16", "bfloat16"):
                if dtype in kind_dtypes(kind, ctx.level):
                    for op in ("sum", "avg", "prod"):
                        cases.append((f"all_reduce/{kind}/{dtype}/{op}/exact_2_ranks", mk_exact_pair(ctx, kind, dtype, op)))
        cases.append((f"views/{kind}", mk_views(ctx, kind)))
        cases.append((f"barrier/{kind}", mk_barrier(ctx)))
    return cases


# (rank 0's, rank 1's) values that test rounding, overflow and subnormals
PAIR_SPECIALS = {
    ("float16", "sum"): [(60000, 60000), (-60000, -60000), (65504, 16), (2 ** -24, 2 ** -24), (1, 2 ** -11),
                         (1 + 2 ** -10, 2 ** -11), (0.1, -0.1), (-2 ** -24, 2 ** -25)],
    ("bfloat16", "sum"): [(3e38, 3e38), (-3e38, -3e38), (1, 2 ** -8), (1 + 2 ** -7, 2 ** -8), (2 ** -133, 2 ** -133),
                          (0.1, -0.1)],
    ("float16", "prod"): [(300, 300), (-300, 300), (2 ** -12, 2 ** -12), (2 ** -13, 2 ** -13), (-2 ** -13, 2 ** -13),
                          (1 + 2 ** -10, 1 + 2 ** -10)],
    ("bfloat16", "prod"): [(1e20, 1e20), (2 ** -66, 2 ** -66), (2 ** -70, 2 ** -70), (1 + 2 ** -7, 1 + 2 ** -7)],
}
PAIR_SPECIALS[("float16", "avg")] = PAIR_SPECIALS[("float16", "sum")]
PAIR_SPECIALS[("bfloat16", "avg")] = PAIR_SPECIALS[("bfloat16", "sum")]


def round_to(dtype, v32):
    """float32 values rounded to nearest even in dtype (its numpy form)."""
    v32 = np.asarray(v32, np.float32)
    if dtype == "bfloat16":
        return f32_to_bf16_bits(v32)
    with np.errstate(over="ignore"):
        return v32.astype(np.float16)


def mk_exact_pair(ctx, kind, dtype, op):
    """Two ranks: float16/bfloat16 a OP b is float32 a OP b rounded once to nearest even (avg:
    that, then halved and rounded), bit for bit, overflow to inf and subnormals included."""
    def run(key):
        stack = _stack(ctx, key, dtype, (301,), op)
        for i, (a, b) in enumerate(PAIR_SPECIALS[(dtype, op)]):
            stack[0, i], stack[1, i] = round_to(dtype, a), round_to(dtype, b)
        a32, b32 = (widen(stack[q], dtype).astype(np.float32) for q in (0, 1))
        with np.errstate(over="ignore"):
            want = round_to(dtype, a32 * b32 if op == "prod" else a32 + b32)
            if op == "avg":
                want = round_to(dtype, widen(want, dtype).astype(np.float32) / np.float32(2))
        x = ctx.buf.to(stack[ctx.rank], dtype, kind)
        ctx.comm.all_reduce(x, op=op)
        got = ctx.buf.np(x, dtype)
        check_bytes(got.view(np.uint16), want.view(np.uint16), f"{dtype} {op} of two ranks (as uint16 bits)")
        return digest(got)
    return run


def mk_views(ctx, kind):
    """Buffers that are views into larger arrays (an offset, many chunks): the operations
    write exactly their elements, never the guard elements around them."""
    def run(key):
        S, r = ctx.size, ctx.rank
        dt, g = "int32", 37
        n = ctx.large(dt)
        stack = _stack(ctx, key, dt, (n,))
        guard = np.full(g, -7, np.int32)

        def padded(a):
            return ctx.buf.to(np.concatenate([guard, a.reshape(-1), guard]), dt, kind)

        big = padded(stack[r])
        v = big[g:g + n]
        ctx.comm.all_reduce(v, op="bxor")
        soft(check_bytes, ctx.buf.np(big, dt), np.concatenate([guard, np.bitwise_xor.reduce(stack, axis=0), guard]),
             "all_reduce of a view (with the guards)")
        rows = rows_split(n, S)
        lo = sum(rows[:r])
        outbig = padded(np.zeros(rows[r], np.int32))
        res = ctx.comm.reduce_scatter(ctx.buf.to(stack[r], dt, kind), op="max", out=outbig[g:g + rows[r]])
        expect(ctx.buf.np(res, dt).shape == (rows[r],), "reduce_scatter into a view: result shape")
        soft(check_bytes, ctx.buf.np(outbig, dt),
             np.concatenate([guard, np.maximum.reduce(stack[:, lo:lo + rows[r]], axis=0), guard]),
             "reduce_scatter into a view (with the guards)")
        m = 5
        gbig = padded(np.zeros(S * m, np.int32))
        ctx.comm.all_gather(ctx.buf.to(stack[r, :m], dt, kind), out=gbig[g:g + S * m].reshape(S, m))
        soft(check_bytes, ctx.buf.np(gbig, dt), np.concatenate([guard, stack[:, :m].reshape(-1), guard]),
             "all_gather into a view (with the guards)")
        bbig = padded(stack[r])
        ctx.comm.broadcast(bbig[g:g + n], root=S - 1)
        soft(check_bytes, ctx.buf.np(bbig, dt), np.concatenate([guard, stack[S - 1], guard]),
             "broadcast of a view (with the guards)")
        return None
    return run


def _stack(ctx, key, dtype, shape, op="sum"):
    return np.stack([gen(ctx.seed, key, q, dtype, shape, op) for q in range(ctx.size)]) if ctx.size else None


def mk_all_reduce(ctx, kind, dtype, op, shape):
    def run(key):
        stack = _stack(ctx, key, dtype, shape, op)
        x = ctx.buf.to(stack[ctx.rank], dtype, kind)
        res = ctx.comm.all_reduce(x, op=op)
        expect(res is x, "all_reduce did not return its input")
        got = ctx.buf.np(x, dtype)
        want, tol = reference(stack, dtype, op, ctx.size)
        check_values(got, want, tol, dtype, "all_reduce")
        return digest(got)
    return run


def mk_reduce_scatter(ctx, kind, dtype, op, shape, use_out):
    def run(key):
        S, r = ctx.size, ctx.rank
        stack = _stack(ctx, key, dtype, shape, op)
        mine = stack[r].copy()
        x = ctx.buf.to(mine, dtype, kind)
        rows = rows_split(shape[0], S)
        lo = sum(rows[:r])
        out = None
        if use_out:  # junk in it: every element must be written
            out = ctx.buf.to(gen(ctx.seed, key + "/junk", r, dtype, (rows[r], *shape[1:])), dtype, kind)
        res = ctx.comm.reduce_scatter(x, op=op, out=out)
        if use_out:
            expect(res is out, "reduce_scatter(out=) did not return out")
        expect(ctx.buf.library(res) == kind.split("-")[0], f"result is a {type(res).__name__}")
        got = ctx.buf.np(res, dtype)
        want, tol = reference(stack[:, lo:lo + rows[r]], dtype, op, S)
        check_values(got, want, tol, dtype, f"reduce_scatter rows {lo}:{lo + rows[r]}")
        check_bytes(ctx.buf.np(x, dtype), mine, "reduce_scatter changed its input")
        return None
    return run


def mk_nan(ctx, kind, dtype, op, scatter):
    def run(key):
        S, r = ctx.size, ctx.rank
        n = 6 * (S + 1) + 1
        stack = _stack(ctx, key, dtype, (n,), op)
        nan = f32_to_bf16_bits(np.float32("nan")) if dtype == "bfloat16" else np_dtype(dtype).type("nan")
        for q in range(S):  # rank q: NaN where i % (S+1) == q; i % (S+1) == S: no NaN anywhere
            stack[q, q::S + 1] = nan
        x = ctx.buf.to(stack[r], dtype, kind)
        want, tol = reference(stack, dtype, op, S)
        expect(np.isnan(want).sum() == len(range(0, n)) - len(range(S, n, S + 1)), "test setup: NaN count")
        if scatter:
            rows = rows_split(n, S)
            lo = sum(rows[:r])
            got = ctx.buf.np(ctx.comm.reduce_scatter(x, op=op), dtype)
            check_values(got, want[lo:lo + rows[r]], tol[lo:lo + rows[r]], dtype, "reduce_scatter with NaN")
            return None
        ctx.comm.all_reduce(x, op=op)
        got = ctx.buf.np(x, dtype)
        check_values(got, want, tol, dtype, "all_reduce with NaN")
        return digest(got)
    return run


def mk_all_gather(ctx, kind, dtype, shape, use_out):
    def run(key):
        S, r = ctx.size, ctx.rank
        stack = _stack(ctx, key, dtype, shape)
        x = ctx.buf.to(stack[r], dtype, kind)
        out = ctx.buf.to(gen(ctx.seed, key + "/junk", r, dtype, (S, *shape)), dtype, kind) if use_out else None
        res = ctx.comm.all_gather(x, out=out)
        if use_out:
            expect(res is out, "all_gather(out=) did not return out")
        expect(ctx.buf.library(res) == kind.split("-")[0], f"result is a {type(res).__name__}")
        expect(ctx.buf.is_cuda(res) == ctx.buf.is_cuda(x), "result on another device")
        got = ctx.buf.np(res, dtype)
        check_bytes(got, stack, "all_gather")
        check_bytes(ctx.buf.np(x, dtype), stack[r], "all_gather changed its input")
        return digest(got)
    return run


def mk_broadcast(ctx, kind, dtype, root, shape):
    def run(key):
        stack = _stack(ctx, key, dtype, shape)  # non-roots hold other values: each must be overwritten
        x = ctx.buf.to(stack[ctx.rank], dtype, kind)
        res = ctx.comm.broadcast(x, root=root)
        expect(res is x, "broadcast did not return its input")
        got = ctx.buf.np(x, dtype)
        check_bytes(got, stack[root], f"broadcast from {root}")
        return digest(got)
    return run


def mk_all_to_all(ctx, kind, dtype, shape, use_out):
    def run(key):
        S, r = ctx.size, ctx.rank
        stack = _stack(ctx, key, dtype, shape)
        b = shape[0] // S
        x = ctx.buf.to(stack[r], dtype, kind)
        out = ctx.buf.to(gen(ctx.seed, key + "/junk", r, dtype, shape), dtype, kind) if use_out else None
        res = ctx.comm.all_to_all(x, out=out)
        if use_out:
            expect(res is out, "all_to_all(out=) did not return out")
        want = np.concatenate([stack[q, r * b:(r + 1) * b] for q in range(S)])
        check_bytes(ctx.buf.np(res, dtype), want.reshape(shape), "all_to_all")
        check_bytes(ctx.buf.np(x, dtype), stack[r], "all_to_all changed its input")
        return None
    return run


def mk_ring(ctx, kind, dtype, shape):
    """Rank r sends to r+1 and receives from r-1; even ranks send first, odd ranks receive
    first (so that messages above the eager limit cannot deadlock with sequential operations)."""
    def run(key):
        S, r = ctx.size, ctx.rank
        nxt, prv = (r + 1) % S, (r - 1) % S
        mine = gen(ctx.seed, key, r, dtype, shape)
        x = ctx.buf.to(mine, dtype, kind)
        y = ctx.buf.to(gen(ctx.seed, key + "/junk", r, dtype, shape), dtype, kind)
        if r % 2 == 0:
            expect(ctx.comm.send(x, nxt) is None, "send returned something")
            src = ctx.comm.recv(y, prv)
        else:
            src = ctx.comm.recv(y, prv)
            expect(ctx.comm.send(x, nxt) is None, "send returned something")
        expect(src == prv, f"recv returned {src!r}, the sender is {prv}")
        check_bytes(ctx.buf.np(y, dtype), gen(ctx.seed, key, prv, dtype, shape), f"recv from {prv}")
        check_bytes(ctx.buf.np(x, dtype), mine, "send changed its input")
        return None
    return run


def mk_any_source(ctx, kind, dtype, shape):
    """Every other rank sends to rank 0, which receives with src=None (and the default)."""
    def run(key):
        S, r = ctx.size, ctx.rank
        if r == 0:
            seen = []
            for i in range(S - 1):
                y = ctx.buf.to(gen(ctx.seed, key + "/junk", i, dtype, shape), dtype, kind)
                src = ctx.comm.recv(y, None) if i % 2 == 0 else ctx.comm.recv(y)
                need(isinstance(src, int) and 1 <= src < S and src not in seen, f"recv(src=None) returned {src!r} (seen {seen})")
                seen.append(src)
                soft(check_bytes, ctx.buf.np(y, dtype), gen(ctx.seed, key, src, dtype, shape), f"message from {src}")
        else:
            ctx.comm.send(ctx.buf.to(gen(ctx.seed, key, r, dtype, shape), dtype, kind), 0)
        # No rank sends the next case's messages before rank 0 took all of these (a receive
        # from any source would rightly take a message of the next case).
        ctx.comm.barrier()
        return None
    return run


def mk_tags(ctx, kind):
    """Rank 1 sends tag 7 then tag 3 (small messages); rank 0 receives tag 3 first."""
    def run(key):
        r = ctx.rank
        a = gen(ctx.seed, key + "/a", 1, "int32", (16,))
        b = gen(ctx.seed, key + "/b", 1, "int32", (16,))
        if r == 1:
            w1 = ctx.comm.send(ctx.buf.to(a, "int32", kind), 0, tag=7, async_op=True)
            w2 = ctx.comm.send(ctx.buf.to(b, "int32", kind), 0, tag=3, async_op=True)
            w1.wait(WAIT)
            w2.wait(WAIT)
        elif r == 0:
            yb = ctx.buf.to(np.zeros(16, np.int32), "int32", kind)
            ya = ctx.buf.to(np.zeros(16, np.int32), "int32", kind)
            expect(ctx.comm.recv(yb, 1, tag=3) == 1, "recv(tag=3) source")
            expect(ctx.comm.recv(ya, None, tag=7) == 1, "recv(src=None, tag=7) source")
            check_bytes(ctx.buf.np(yb, "int32"), b, "the tag-3 message")
            check_bytes(ctx.buf.np(ya, "int32"), a, "the tag-7 message")
        return None
    return run


def mk_barrier(ctx):
    """Nobody leaves the barrier before the last rank entered it (rank 0, late): the ranks share
    one node, so their monotonic clocks compare."""
    def run(key):
        from mpi4py import MPI
        comm, r = ctx.comm, ctx.rank
        expect(comm.barrier() is None, "barrier returned something")
        entered = 0.0
        if r == 0:
            time.sleep(0.2)
            entered = time.monotonic()
        w = comm.barrier(async_op=True)
        expect(w.wait(WAIT) is None, "barrier's wait returned something")
        left = time.monotonic()
        expect(w.is_completed() and w.exception() is None, "a finished barrier's is_completed/exception")
        times = MPI.COMM_WORLD.allgather((entered, left))
        if r != 0:
            expect(left >= times[0][0], f"left the barrier {times[0][0] - left:.3f} s before rank 0 entered it")
        return None
    return run


# -- 3. many operations in flight --------------------------------------------------------------

def suite_async(ctx):
    cases = [("async/20_all_reduce_random_wait_order", mk_async_many(ctx, "numpy")),
             ("async/every_kind_reverse_wait", mk_async_kinds(ctx)),
             ("async/issue_order_same_buffer", mk_async_order(ctx)),
             ("async/partitioned_timeout_then_ready", mk_async_part_timeout(ctx)),
             ("async/queued_behind_partitioned", mk_async_behind_partitioned(ctx))]
    if "torch" in ctx.kinds:
        cases.insert(1, ("async/20_all_reduce_random_wait_order/torch", mk_async_many(ctx, "torch")))
    if ctx.size > 1:
        cases += [("async/timeout_while_a_rank_is_late", mk_async_timeout(ctx)),
                  ("async/mismatch_reported_by_wait_and_exception", mk_async_mismatch(ctx))]
    return cases


def _async_specs(ctx, key):
    rng = np.random.default_rng([ctx.seed, zlib.crc32(key.encode())])  # the same on every rank
    dts = [d for d in ALL_DTYPES if d != "bfloat16"]
    specs = []
    for i in range(20):
        dtype = dts[i % len(dts)]
        ops = valid_ops(dtype)
        op = ops[int(rng.integers(len(ops)))]
        count = int(rng.choice([0, 1, int(rng.integers(2, 200)), int(rng.integers(200, 3 * ctx.large(dtype)))]))
        specs.append((dtype, op, count))
    return specs


def mk_async_many(ctx, kind):
    def run(key):
        S, r = ctx.size, ctx.rank
        specs = _async_specs(ctx, key)
        stacks, xs, works = [], [], []
        for i, (dtype, op, count) in enumerate(specs):
            stack = _stack(ctx, f"{key}/{i}", dtype, (count,), op)
            x = ctx.buf.to(stack[r], dtype, kind)
            w = ctx.comm.all_reduce(x, op=op, async_op=True)
            expect(isinstance(w.is_completed(), bool), "is_completed() is not a bool")
            stacks.append(stack)
            xs.append(x)
            works.append(w)
        for i, w in enumerate(works):
            e = w.exception()
            expect(e is None, f"op {i}: exception() {e!r} before anything failed")
        order = np.random.default_rng([ctx.seed, r]).permutation(len(works))  # each rank its own order
        for i in order:
            dtype, op, count = specs[i]
            res = works[i].wait(timeout=WAIT)
            expect(res is xs[i], f"op {i}: wait() did not return the tensor")
            expect(works[i].is_completed() is True, f"op {i}: is_completed() after wait")
            expect(works[i].exception() is None, f"op {i}: exception() after a success")
            want, tol = reference(stacks[i], dtype, op, S)
            soft(check_values, ctx.buf.np(xs[i], dtype), want, tol, dtype, f"op {i} ({dtype} {op} {count})")
            expect(works[i].wait(timeout=WAIT) is xs[i], f"op {i}: a second wait()")
        return digest(np.concatenate([ctx.buf.np(x, d).view(np.uint8).reshape(-1) for x, (d, _, _) in zip(xs, specs)]))
    return run


def mk_async_kinds(ctx):
    """One async operation of every kind in flight, waited in reverse order."""
    def run(key):
        S, r = ctx.size, ctx.rank
        comm = ctx.comm
        n = 3 * S + 2
        st = {k: _stack(ctx, f"{key}/{k}", "float64" if k != "a2a" else "int32", (n * 4,) if k != "a2a" else (S * 5,))
              for k in ("ar", "rs", "ag", "bc", "a2a")}
        ar = st["ar"][r].copy()
        rs = st["rs"][r].copy()
        bc = st["bc"][r].copy()
        works = [("ar", comm.all_reduce(ar, op="max", async_op=True)),
                 ("rs", comm.reduce_scatter(rs, op="min", async_op=True)),
                 ("ag", comm.all_gather(st["ag"][r].copy(), async_op=True)),
                 ("bar", comm.barrier(async_op=True)),
                 ("bc", comm.broadcast(bc, root=S - 1, async_op=True)),
                 ("a2a", comm.all_to_all(st["a2a"][r].copy(), async_op=True))]
        if S > 1:
            y = np.zeros(7)
            nxt, prv = (r + 1) % S, (r - 1) % S
            works.append(("send", comm.send(np.full(7, float(r)), nxt, async_op=True)))
            works.append(("recv", comm.recv(y, prv, async_op=True)))
        results = {}
        for name, w in reversed(works):
            results[name] = w.wait(timeout=WAIT)
            expect(w.is_completed(), f"{name}: is_completed() after wait")
        expect(results["ar"] is ar, "all_reduce's wait result")
        check_bytes(ar, np.maximum.reduce(st["ar"], axis=0), "all_reduce max")
        rows = rows_split(n * 4, S)
        lo = sum(rows[:r])
        check_bytes(results["rs"], np.minimum.reduce(st["rs"][:, lo:lo + rows[r]], axis=0), "reduce_scatter min")
        check_bytes(results["ag"], st["ag"], "all_gather")
        expect(results["bar"] is None, "barrier's wait result")
        expect(results["bc"] is bc, "broadcast's wait result")
        check_bytes(bc, st["bc"][S - 1], "broadcast")
        check_bytes(results["a2a"], np.concatenate([st["a2a"][q, r * 5:(r + 1) * 5] for q in range(S)]), "all_to_all")
        if S > 1:
            expect(results["send"] is None, "send's wait result")
            expect(results["recv"] == prv, f"recv's wait returned {results['recv']!r}, not the sender {prv}")
            check_bytes(y, np.full(7, float(prv)), "recv")
        return None
    return run


def mk_async_order(ctx):
    """Two async all_reduces of one buffer run in issue order even if the later is waited first:
    sum then prod gives sum**S (the other order: S * prod)."""
    def run(key):
        S, r = ctx.size, ctx.rank
        stack = _stack(ctx, key, "int64", (257,))
        x = stack[r].copy()
        w1 = ctx.comm.all_reduce(x, op="sum", async_op=True)
        w2 = ctx.comm.all_reduce(x, op="prod", async_op=True)
        w2.wait(timeout=WAIT)
        expect(w1.is_completed(), "the earlier operation is not complete after the later one's wait")
        w1.wait(timeout=WAIT)
        total = np.add.reduce(stack, axis=0, dtype=np.int64)
        want = np.ones_like(total)
        for _ in range(S):
            want = want * total
        check_bytes(x, want, "sum then prod")
        return digest(x)
    return run


def mk_async_part_timeout(ctx):
    """wait(timeout) of an operation that cannot finish yet raises Timeout and it goes on."""
    def run(key):
        from collectives import CollectiveError, Timeout
        S, r = ctx.size, ctx.rank
        stack = _stack(ctx, key, "float64", (40,))
        x = stack[r].copy()
        p = ctx.comm.all_reduce_partitioned(x, 2)
        t0 = time.monotonic()
        e = expect_raises(Timeout, lambda: p.wait(timeout=0.05), "wait(timeout=0.05) with no part ready")
        expect(e is None or isinstance(e, CollectiveError), "Timeout is not a CollectiveError")
        expect(time.monotonic() - t0 < 5, "wait(timeout=0.05) took seconds")
        expect_raises(Timeout, lambda: p.wait(0, timeout=0.05), "wait(0, timeout=0.05) with no part ready")
        expect(p.is_completed() is False and p.is_completed(0) is False, "is_completed() of a part never readied")
        expect(p.exception() is None, "exception() of an unfinished operation")
        p.ready_range(0, 2)
        expect(p.wait(timeout=WAIT) is x, "wait() after the Timeout")
        want, tol = reference(stack, "float64", "sum", S)
        check_values(x, want, tol, "float64", "all_reduce after a Timeout")
        return digest(x)
    return run


def mk_async_behind_partitioned(ctx):
    """An operation issued after a partitioned one waits for it (issue order), and both finish
    once its parts are ready."""
    def run(key):
        from collectives import Timeout
        r = ctx.rank
        sx = _stack(ctx, key + "/x", "int64", (100,))
        sy = _stack(ctx, key + "/y", "int64", (50,))
        x, y = sx[r].copy(), sy[r].copy()
        p = ctx.comm.all_reduce_partitioned(x, 3, op="min")
        w = ctx.comm.all_reduce(y, op="max", async_op=True)
        expect_raises(Timeout, lambda: w.wait(timeout=0.1), "wait() of an operation queued behind unready parts")
        expect(w.is_completed() is False, "an operation queued behind unready parts completed")
        soft(check_bytes, y, sy[r], "the queued operation wrote its buffer before its turn")
        p.ready_range(0, 3)
        expect(w.wait(timeout=WAIT) is y, "the queued operation's wait()")
        expect(p.is_completed() is True, "the partitioned operation is not complete after the later one's wait")
        p.wait(timeout=WAIT)
        soft(check_bytes, x, np.minimum.reduce(sx, axis=0), "the partitioned all_reduce")
        soft(check_bytes, y, np.maximum.reduce(sy, axis=0), "the queued all_reduce")
        return digest(np.concatenate([x, y]))
    return run


def mk_async_timeout(ctx):
    """Rank 0 waits with a short timeout while the others start 0.5 s late."""
    def run(key):
        from collectives import Timeout
        S, r = ctx.size, ctx.rank
        stack = _stack(ctx, key, "float32", (1000,))
        x = stack[r].copy()
        if r != 0:
            time.sleep(0.5)
        w = ctx.comm.all_reduce(x, async_op=True)
        if r == 0:
            expect_raises(Timeout, lambda: w.wait(timeout=0.05), "wait(timeout=0.05) while the others are late")
            expect(w.is_completed() is False, "is_completed() while the others are late")
            expect(w.exception() is None, "exception() of an unfinished operation")
        expect(w.wait(timeout=WAIT) is x, "wait() after the Timeout")
        want, tol = reference(stack, "float32", "sum", S)
        check_values(x, want, tol, "float32", "all_reduce")
        return digest(x)
    return run


def mk_async_mismatch(ctx):
    def run(key):
        from collectives import MismatchError
        S, r = ctx.size, ctx.rank
        x = np.arange(5 + (r == 0), dtype=np.float64)
        before = x.copy()
        w = ctx.comm.all_reduce(x, async_op=True)
        expect_raises(MismatchError, lambda: w.wait(timeout=WAIT), "wait() of a mismatched all_reduce")
        expect(w.is_completed() is True, "is_completed() after the failure")
        e = w.exception()
        expect(isinstance(e, MismatchError), f"exception() is {e!r}")
        expect_raises(MismatchError, lambda: w.wait(timeout=WAIT), "a second wait()")
        soft(check_bytes, x, before, "the failed all_reduce wrote its buffer")
        y = np.full(4, float(r))
        ctx.comm.all_reduce(y)
        check_bytes(y, np.full(4, float(sum(range(S)))), "the next all_reduce")
        return None
    return run


# -- 4. partitioned ------------------------------------------------------------------------

PART_CASES = [("float32", "sum", 1003), ("int32", "max", 517), ("float64", "avg", 2049), ("int64", "bxor", 7)]


def suite_partitioned(ctx):
    cases = []
    for dtype, op, n in PART_CASES:
        for mode in ("random", "pipeline", "ranges"):
            cases.append((f"partitioned/all_reduce/{dtype}/{op}/{n}/{mode}", mk_part_all_reduce(ctx, dtype, op, n, 7, mode)))
    cases.append(("partitioned/all_reduce/float32/sum/1000/parts1", mk_part_all_reduce(ctx, "float32", "sum", 1000, 1, "random")))
    cases.append(("partitioned/all_reduce/bad_indices", mk_part_bad_indices(ctx)))
    cases.append(("partitioned/bad_partitions", mk_part_bad_partitions(ctx)))
    for mode in ("random", "pipeline"):
        cases.append((f"partitioned/all_gather/int16/{mode}", mk_part_all_gather(ctx, "int16", 301, 5, mode)))
    cases.append(("partitioned/reduce_scatter/float64/sum", mk_part_reduce_scatter(ctx, "float64", "sum", 5)))
    cases.append(("partitioned/reduce_scatter/int32/max", mk_part_reduce_scatter(ctx, "int32", "max", 3)))
    return cases


def _ready_loop(ctx, p, P, mode):
    """Calls ready in this rank's way; the last rank is slower (sleeps before its ready calls).
    fill(i) was done by the caller's callback before part i is declared ready."""
    r, S = ctx.rank, ctx.size
    slow = r == S - 1 and S > 1
    if mode == "random":
        order = [int(i) for i in np.random.default_rng([ctx.seed, 99, r]).permutation(P)]
        for i in order:
            if slow:
                time.sleep(0.01)
            yield ("ready", i)
    elif mode == "pipeline":  # ready(i) then wait(i) at once
        for i in range(P):
            if slow:
                time.sleep(0.01)
            yield ("ready", i)
            yield ("wait", i)
    else:  # ranges: an empty range, then the upper half, then the lower half
        k = P // 2
        yield ("range", (k, k))
        if slow:
            time.sleep(0.05)
        yield ("range", (k, P))
        if slow:
            time.sleep(0.05)
        yield ("range", (0, k))


def _parts(n, P):
    sizes = rows_split(n, P)
    starts = np.cumsum([0] + sizes)
    return [(int(starts[i]), int(starts[i + 1])) for i in range(P)]


def mk_part_all_reduce(ctx, dtype, op, n, P, mode):
    def run(key):
        from collectives.mpi import PartitionedWork
        S, r = ctx.size, ctx.rank
        stack = _stack(ctx, key, dtype, (n,), op)
        want, tol = reference(stack, dtype, op, S)
        x = np.zeros(n, np_dtype(dtype))  # filled part by part, each before its ready
        p = ctx.comm.all_reduce_partitioned(x, P, op=op)
        need(isinstance(p, PartitionedWork), f"all_reduce_partitioned(partitions={P}) returned a {type(p).__name__}")
        parts = _parts(n, P)
        expect(p.is_completed(0) is False, "part 0 complete before any ready")
        done = set()
        for what, arg in _ready_loop(ctx, p, P, mode):
            if what == "ready":
                lo, hi = parts[arg]
                x[lo:hi] = stack[r, lo:hi]
                p.ready(arg)
            elif what == "range":
                for i in range(*arg):
                    a, b = parts[i]
                    x[a:b] = stack[r, a:b]
                p.ready_range(*arg)
            else:
                lo, hi = parts[arg]
                expect(p.wait(arg, timeout=WAIT) is x, f"wait({arg}) did not return the tensor")
                soft(check_values, x[lo:hi], want[lo:hi], None if tol is None else tol[lo:hi], dtype, f"part {arg} after wait({arg})")
                done.add(arg)
        for i in range(P):
            if i not in done:
                lo, hi = parts[i]
                p.wait(i, timeout=WAIT)
                expect(p.is_completed(i), f"is_completed({i}) after wait({i})")
                soft(check_values, x[lo:hi], want[lo:hi], None if tol is None else tol[lo:hi], dtype, f"part {i} after wait({i})")
        expect(p.wait(timeout=WAIT) is x, "wait() did not return the tensor")
        expect(p.is_completed() is True and p.exception() is None, "is_completed()/exception() at the end")
        check_values(x, want, tol, dtype, "the whole buffer")
        return digest(x)
    return run


def mk_part_bad_indices(ctx):
    def run(key):
        S, r = ctx.size, ctx.rank
        P, n = 4, 64
        stack = _stack(ctx, key, "float64", (n,))
        x = stack[r].copy()
        p = ctx.comm.all_reduce_partitioned(x, P)
        bad = [("ready(P)", lambda: p.ready(P)), ("ready(-1)", lambda: p.ready(-1)),
               ("ready_range(-1, 1)", lambda: p.ready_range(-1, 1)), ("ready_range(0, P+1)", lambda: p.ready_range(0, P + 1)),
               ("ready_range(3, 2)", lambda: p.ready_range(3, 2)), ("wait(P)", lambda: p.wait(P, timeout=1)),
               ("wait(-1)", lambda: p.wait(-1, timeout=1)), ("ready_after(P, stream)", lambda: p.ready_after(P, object())),
               ("ready_after(-1, stream)", lambda: p.ready_after(-1, object()))]
        for what, fn in bad:
            expect_raises(ValueError, fn, what)
        expect_raises(TypeError, lambda: p.ready_after(0, object()), "ready_after(0, not an event)")
        p.ready(1)
        p.ready_range(2, P)
        p.ready(0)
        expect(p.wait(timeout=WAIT) is x, "wait() after the bad calls")
        want, tol = reference(stack, "float64", "sum", S)
        check_values(x, want, tol, "float64", "all_reduce after the bad calls")
        return digest(x)
    return run


def mk_part_bad_partitions(ctx):
    def run(key):
        x = np.zeros(10)
        ops0 = _engine_ops()
        for parts in (0, -1, 2.5, None):
            for name, fn in (("all_reduce_partitioned", lambda: ctx.comm.all_reduce_partitioned(x, parts)),
                             ("all_gather_partitioned", lambda: ctx.comm.all_gather_partitioned(x, parts)),
                             ("reduce_scatter_partitioned", lambda: ctx.comm.reduce_scatter_partitioned(x, parts))):
                expect_raises(ValueError, fn, f"{name}(partitions={parts!r})")
        expect(_engine_ops() == ops0, "a refused partitioned call started an engine operation")
        _check_next(ctx, key)
        return None
    return run


def mk_part_all_gather(ctx, dtype, n, P, mode):
    def run(key):
        S, r = ctx.size, ctx.rank
        stack = _stack(ctx, key, dtype, (n,))
        x = np.zeros(n, np_dtype(dtype))
        p = ctx.comm.all_gather_partitioned(x, P)
        parts = _parts(n, P)
        done = set()
        for what, i in _ready_loop(ctx, p, P, mode):
            lo, hi = parts[i]
            if what == "ready":
                x[lo:hi] = stack[r, lo:hi]
                p.ready(i)
            else:
                out = p.wait(i, timeout=WAIT)
                soft(check_bytes, out[:, lo:hi], stack[:, lo:hi], f"part {i} of every block after wait({i})")
                done.add(i)
        out = p.wait(timeout=WAIT)
        expect(out.shape == (S, n), f"out shape {out.shape}")
        check_bytes(out, stack, "all_gather_partitioned")
        return digest(out)
    return run


def mk_part_reduce_scatter(ctx, dtype, op, P):
    def run(key):
        S, r = ctx.size, ctx.rank
        shape = (4 * S + 1, 3)
        stack = _stack(ctx, key, dtype, shape, op)
        rows = rows_split(shape[0], S)
        lo = sum(rows[:r])
        want, tol = reference(stack[:, lo:lo + rows[r]], dtype, op, S)
        x = stack[r].copy()
        p = ctx.comm.reduce_scatter_partitioned(x, P, op=op)
        order = [int(i) for i in np.random.default_rng([ctx.seed, 7, r]).permutation(P)]
        for i in order:
            if r == S - 1:
                time.sleep(0.01)
            p.ready(i)
        parts = _parts(rows[r] * 3, P)  # part i of this rank's share, in elements
        for i in range(P):
            out = p.wait(i, timeout=WAIT)
            a, b = parts[i]
            soft(check_values, out.reshape(-1)[a:b], want.reshape(-1)[a:b], None if tol is None else tol.reshape(-1)[a:b],
                         dtype, f"part {i} of the share")
        out = p.wait(timeout=WAIT)
        check_values(out, want, tol, dtype, "reduce_scatter_partitioned")
        return None
    return run


# -- 5. errors -----------------------------------------------------------------------------

def _engine_ops():
    from collectives import mpi
    return mpi.stat("engine.ops")


def _check_next(ctx, key, what="the next all_reduce"):
    """Every rank: an all_reduce that must match and be right (a bad call that had reached the
    engine would have shifted the sequence)."""
    r = ctx.rank
    stack = _stack(ctx, key + "/next", "int64", (9,))
    y = stack[r].copy()
    ctx.comm.all_reduce(y, op="bxor")
    check_bytes(y, np.bitwise_xor.reduce(stack, axis=0), what)


def suite_errors(ctx):
    S = ctx.size
    cases = []
    if S > 1:
        for name in MISMATCHES:
            cases.append((f"errors/mismatch/{name}", mk_mismatch(ctx, name)))
        cases.append(("errors/mismatch/partitions", mk_mismatch_partitioned(ctx)))
        cases.append(("errors/recv_size_differs", mk_recv_size(ctx)))
    for name in BAD_ARGS:
        cases.append((f"errors/bad_args/{name}", mk_bad_args(ctx, name)))
    if "torch" in ctx.kinds:
        cases.append(("errors/bad_args/torch", mk_bad_args(ctx, "torch")))
    cases.append(("errors/read_only_inputs_accepted", mk_read_only_inputs(ctx)))
    for name in ("all_reduce", "reduce_scatter"):
        cases.append((f"errors/byte_swapped/{name}", mk_byte_swapped(ctx, name)))
    return cases


def mk_byte_swapped(ctx, what):
    """A numpy array in the other byte order: refused (TypeError/ValueError, on every rank,
    without communication) or reduced right - never reduced as if it were native."""
    def run(key):
        S, r = ctx.size, ctx.rank
        for dt in (">f4", ">i8") if sys.byteorder == "little" else ("<f4", "<i8"):
            stack = _stack(ctx, f"{key}/{dt}", np.dtype(dt).newbyteorder("=").name, (4 * S,)).astype(dt)
            x = stack[r].copy()
            try:
                if what == "all_reduce":
                    ctx.comm.all_reduce(x, op="max")
                    got = x
                else:
                    got = ctx.comm.reduce_scatter(x, op="max")
            except (TypeError, ValueError) as e:
                from collectives import MismatchError
                expect(not isinstance(e, MismatchError), f"{dt}: a MismatchError: {e}")
                continue
            want = np.maximum.reduce(stack, axis=0)[4 * r:4 * r + 4] if what == "reduce_scatter" else np.maximum.reduce(stack, axis=0)
            expect(np.array_equal(np.asarray(got, dtype=np.dtype(dt).newbyteorder("=")), want),
                   f"{what} of a {dt} array: {np.asarray(got).tolist()[:4]}..., expected {want.tolist()[:4]}... "
                   "(neither refused nor right)")
        _check_next(ctx, key)
        return None
    return run


MISMATCHES = {
    # name: f(comm, rank, size) -> (in-place buffer or out, call)
    "all_reduce_count": lambda c, r, S: (np.ones(5 + (r == 0)), lambda x: c.all_reduce(x)),
    "all_reduce_shape_same_count": lambda c, r, S: (np.ones((2, 3) if r == 0 else (3, 2)), lambda x: c.all_reduce(x)),
    "all_reduce_dtype_same_size": lambda c, r, S: (np.ones(6, np.float32 if r == 0 else np.int32), lambda x: c.all_reduce(x)),
    "all_reduce_dtype": lambda c, r, S: (np.ones(6, np.float32 if r == 0 else np.float64), lambda x: c.all_reduce(x)),
    "all_reduce_op": lambda c, r, S: (np.ones(6), lambda x: c.all_reduce(x, op="max" if r == 0 else "sum")),
    "all_reduce_empty_vs_one": lambda c, r, S: (np.ones(0 if r == 0 else 1), lambda x: c.all_reduce(x)),
    "broadcast_root": lambda c, r, S: (np.full(6, float(r)), lambda x: c.broadcast(x, root=0 if r == 0 else 1)),
    "broadcast_count": lambda c, r, S: (np.full(6 + (r == 0), float(r)), lambda x: c.broadcast(x, root=0)),
    "broadcast_dtype": lambda c, r, S: (np.full(6, r, np.int64 if r == 0 else np.float64), lambda x: c.broadcast(x, root=0)),
    # reduce_scatter: the buffer is out (junk in it, which must stay)
    "reduce_scatter_rows": lambda c, r, S: (np.full((2 + (r == 0), 2), -1.0),
                                            lambda out: c.reduce_scatter(np.ones((2 * S + (r == 0), 2)), out=out)),
    "reduce_scatter_op": lambda c, r, S: (np.full((2, 2), -1.0),
                                          lambda out: c.reduce_scatter(np.ones((2 * S, 2)), op="min" if r == 0 else "sum", out=out)),
    "all_gather_shape": lambda c, r, S: (None, lambda out: c.all_gather(np.ones(3 + (r == 0)))),
    "all_gather_dtype": lambda c, r, S: (None, lambda out: c.all_gather(np.ones(3, np.int16 if r == 0 else np.uint16))),
    "all_to_all_rows": lambda c, r, S: (None, lambda out: c.all_to_all(np.ones(S * (2 + (r == 0))))),
    "kind_all_gather_vs_all_reduce": lambda c, r, S: (np.ones(4), lambda x: c.all_gather(x) if r == 0 else c.all_reduce(x)),
    "kind_barrier_vs_all_reduce_empty": lambda c, r, S: (np.ones(0), lambda x: c.barrier() if r == 0 else c.all_reduce(x)),
    "kind_broadcast_vs_all_reduce": lambda c, r, S: (np.ones(4), lambda x: c.broadcast(x, 0) if r == 0 else c.all_reduce(x)),
}


def mk_mismatch(ctx, name):
    """Rank 0 differs from the others: MismatchError on every rank, no buffer written, and the
    next all_reduce works."""
    def run(key):
        from collectives import MismatchError
        buf, call = MISMATCHES[name](ctx.comm, ctx.rank, ctx.size)
        before = None if buf is None else buf.copy()
        e = expect_raises(MismatchError, lambda: call(buf), name)
        expect(e is None or isinstance(e, ValueError), "MismatchError is not a ValueError")
        if buf is not None:
            soft(check_bytes, buf, before, "the failed operation wrote the buffer")
        _check_next(ctx, key)
        return None
    return run


def mk_mismatch_partitioned(ctx):
    def run(key):
        from collectives import MismatchError
        r = ctx.rank
        P = 2 if r == 0 else 3
        x = np.full(12, float(r))
        p = ctx.comm.all_reduce_partitioned(x, P)
        p.ready_range(0, P)
        expect_raises(MismatchError, lambda: p.wait(timeout=WAIT), "partitions differ")
        soft(check_bytes, x, np.full(12, float(r)), "the failed operation wrote the buffer")
        _check_next(ctx, key)
        return None
    return run


def mk_recv_size(ctx):
    """A receive whose buffer is larger, then smaller, than the message: MismatchError on the
    receiver; the sender's send succeeds; the communicator works afterwards."""
    def run(key):
        from collectives import MismatchError
        r = ctx.rank
        if r == 1:
            ctx.comm.send(np.arange(5, dtype=np.int32), 0)
            ctx.comm.send(np.arange(5, dtype=np.int32), 0)
        elif r == 0:
            expect_raises(MismatchError, lambda: ctx.comm.recv(np.zeros(8, np.int32), 1), "recv of 5 into 8 elements")
            expect_raises(MismatchError, lambda: ctx.comm.recv(np.zeros(3, np.int32), 1), "recv of 5 into 3 elements")
        _check_next(ctx, key)
        return None
    return run


def _bad_calls(ctx, name):
    """(description, exception type, fn) - the calls rank 0 makes alone."""
    c, S, r = ctx.comm, ctx.size, ctx.rank
    x = np.ones(4 * S)
    noncontig = np.ones(8 * S)[::2]
    ro = np.ones(4 * S)
    ro.flags.writeable = False
    if name == "ops":
        return [("unknown op", ValueError, lambda: c.all_reduce(x, op="mean")),
                ("op None", ValueError, lambda: c.all_reduce(x, op=None)),
                ("band on float64", ValueError, lambda: c.all_reduce(x, op="band")),
                ("bor on float32", ValueError, lambda: c.all_reduce(np.ones(3, np.float32), op="bor")),
                ("bxor on float16", ValueError, lambda: c.all_reduce(np.ones(3, np.float16), op="bxor")),
                ("avg on bool", ValueError, lambda: c.all_reduce(np.ones(3, bool), op="avg")),
                ("reduce_scatter unknown op", ValueError, lambda: c.reduce_scatter(x, op="mean")),
                ("reduce_scatter band on float", ValueError, lambda: c.reduce_scatter(x, op="band")),
                ("all_reduce_partitioned band on float", ValueError, lambda: c.all_reduce_partitioned(x, 2, op="band"))]
    if name == "layout":
        return [("all_reduce non-contiguous", ValueError, lambda: c.all_reduce(noncontig)),
                ("reduce_scatter non-contiguous", ValueError, lambda: c.reduce_scatter(noncontig)),
                ("all_gather non-contiguous", ValueError, lambda: c.all_gather(noncontig)),
                ("broadcast non-contiguous", ValueError, lambda: c.broadcast(noncontig)),
                ("all_to_all non-contiguous", ValueError, lambda: c.all_to_all(noncontig)),
                ("send non-contiguous", ValueError, lambda: c.send(noncontig, (r + 1) % S)) if S > 1 else None,
                ("recv non-contiguous", ValueError, lambda: c.recv(noncontig, None)),
                ("Fortran-order 2-D", ValueError, lambda: c.all_reduce(np.asfortranarray(np.ones((3, 4))))),
                ("all_reduce read-only", ValueError, lambda: c.all_reduce(ro)),
                ("broadcast read-only", ValueError, lambda: c.broadcast(ro)),
                ("recv read-only", ValueError, lambda: c.recv(ro, None)),
                ("all_reduce_partitioned read-only", ValueError, lambda: c.all_reduce_partitioned(ro, 2)),
                ("complex dtype", TypeError, lambda: c.all_reduce(np.ones(3, np.complex64))),
                ("object dtype", TypeError, lambda: c.all_gather(np.array([1, "a"], dtype=object))),
                ("a list", TypeError, lambda: c.all_reduce([1.0, 2.0])),
                ("a scalar", TypeError, lambda: c.broadcast(3.0))]
    if name == "out":
        return [("reduce_scatter out shape", ValueError, lambda: c.reduce_scatter(x, out=np.ones(5))),
                ("reduce_scatter out dtype", ValueError, lambda: c.reduce_scatter(x, out=np.ones(4, np.float32))),
                ("reduce_scatter out read-only", ValueError, lambda: c.reduce_scatter(x, out=ro[:4])),
                ("reduce_scatter of a 0-d array", ValueError, lambda: c.reduce_scatter(np.ones(()))),
                ("all_gather out shape", ValueError, lambda: c.all_gather(x, out=np.ones((S, 4 * S + 1)))),
                ("all_gather out dtype", ValueError, lambda: c.all_gather(x, out=np.ones((S, 4 * S), np.int64))),
                ("all_gather out non-contiguous", ValueError, lambda: c.all_gather(x, out=np.ones((S, 8 * S))[:, ::2])),
                ("all_to_all out shape", ValueError, lambda: c.all_to_all(x, out=np.ones(4 * S + S))),
                ("all_to_all out dtype", ValueError, lambda: c.all_to_all(x, out=np.ones(4 * S, np.float16)))]
    if name == "ranks":
        calls = [("broadcast root=size", ValueError, lambda: c.broadcast(x, root=S)),
                 ("broadcast root=-1", ValueError, lambda: c.broadcast(x, root=-1)),
                 ("broadcast root=0.0", ValueError, lambda: c.broadcast(x, root=0.0)),
                 ("broadcast root=None", ValueError, lambda: c.broadcast(x, root=None)),
                 ("send dst=size", ValueError, lambda: c.send(x, S)),
                 ("send dst=-1", ValueError, lambda: c.send(x, -1)),
                 ("recv src=size", ValueError, lambda: c.recv(x, S)),
                 ("recv src=-1", ValueError, lambda: c.recv(x, -1)),
                 ("send to self", ValueError, lambda: c.send(x, r)),
                 ("recv from self", ValueError, lambda: c.recv(x, r)),
                 ("async send to self", ValueError, lambda: c.send(x, r, async_op=True)),
                 ("all_to_all of a 0-d array", ValueError, lambda: c.all_to_all(np.ones(())))]
        if S > 1:
            calls.append(("all_to_all rows not divisible", ValueError, lambda: c.all_to_all(np.ones((S + 1, 2)))))
            calls.append(("all_to_all 1 row", ValueError, lambda: c.all_to_all(np.ones(1))))
        return calls
    if name == "torch":
        import torch
        t = torch.ones(4, 4)
        return [("torch non-contiguous all_reduce", ValueError, lambda: c.all_reduce(t.t())),
                ("torch non-contiguous all_gather", ValueError, lambda: c.all_gather(t[:, 1])),
                ("torch complex", TypeError, lambda: c.all_reduce(torch.ones(3, dtype=torch.complex64))),
                ("torch band on float", ValueError, lambda: c.all_reduce(t, op="band")),
                ("torch out for a numpy input", TypeError, lambda: c.all_gather(np.ones(3), out=torch.ones(S, 3, dtype=torch.float64))),
                ("numpy out for a torch input", TypeError, lambda: c.reduce_scatter(torch.ones(2 * S, dtype=torch.float64), out=np.ones(2))),
                ("torch out of another dtype", ValueError, lambda: c.all_gather(torch.ones(3), out=torch.ones(S, 3, dtype=torch.float64)))]
    raise KeyError(name)


BAD_ARGS = ("ops", "layout", "out", "ranks")


def mk_bad_args(ctx, name):
    """Rank 0 alone makes each bad call: the documented error, on the caller's side, with no
    engine operation started; then every rank's next all_reduce still matches."""
    def run(key):
        calls = [c for c in _bad_calls(ctx, name) if c is not None]
        if ctx.rank == 0:
            ops0 = _engine_ops()
            for what, etype, fn in calls:
                expect_raises(etype, fn, what)
            expect(_engine_ops() == ops0, f"the refused calls started {_engine_ops() - ops0} engine operations")
        _check_next(ctx, key)
        return None
    return run


def mk_read_only_inputs(ctx):
    """Inputs that are only read may be read-only arrays."""
    def run(key):
        S, r = ctx.size, ctx.rank
        stack = _stack(ctx, key, "int32", (2 * S, 3))
        x = stack[r].copy()
        x.flags.writeable = False
        soft(check_bytes, ctx.comm.reduce_scatter(x, op="max"), np.maximum.reduce(stack, axis=0)[2 * r:2 * r + 2], "reduce_scatter")
        soft(check_bytes, ctx.comm.all_gather(x), stack, "all_gather")
        soft(check_bytes, ctx.comm.all_to_all(x), np.concatenate([stack[q, 2 * r:2 * r + 2] for q in range(S)]), "all_to_all")
        if S > 1:
            if r == 0:
                ctx.comm.send(x, 1)
            elif r == 1:
                y = np.zeros_like(x)
                ctx.comm.recv(y, 0)
                check_bytes(y, stack[0], "recv of a read-only send")
        return None
    return run


# -- 6. init and communicators ---------------------------------------------------------------

def suite_init(ctx):
    cases = [("init/picks_mpicomm", mk_init(ctx)), ("init/transport_used", mk_transport(ctx))]
    if ctx.size > 1:
        cases.append(("init/sub_communicator", mk_subcomm(ctx)))
    cases.append(("init/closed_communicator", mk_closed(ctx)))
    return cases


def mk_init(ctx):
    def run(key):
        import collectives
        from collectives.mpi import MPIComm
        from mpi4py import MPI
        c = ctx.comm
        expect(type(c) is MPIComm, f"collectives.init() made a {type(c).__name__}")
        expect(collectives.default() is c, "collectives.default() is not the init() communicator")
        w = MPI.COMM_WORLD
        expect((c.rank, c.size) == (w.Get_rank(), w.Get_size()), f"rank/size {(c.rank, c.size)} vs the world's")
        if ctx.size > 1:
            expect(c.transport == ctx.transport, f"transport {c.transport!r}, expected {ctx.transport!r}")
        else:  # one rank moves no data: either name will do
            expect(c.transport in ("shm", "mpi"), f"transport {c.transport!r}")
        return None
    return run


def mk_transport(ctx):
    """The transport the communicator names is the one that moved the data."""
    def run(key):
        from collectives import mpi
        before = {k: mpi.stat(f"engine.{k}_steps") for k in ("shm", "mpi")}
        x = np.ones(10000)
        ctx.comm.all_reduce(x)
        check_bytes(x, np.full(10000, float(ctx.size)), "all_reduce")
        moved = {k: mpi.stat(f"engine.{k}_steps") - before[k] for k in ("shm", "mpi")}
        if ctx.size > 1:
            other = "mpi" if ctx.transport == "shm" else "shm"
            expect(moved[ctx.transport] > 0 and moved[other] == 0, f"steps per transport {moved} on a {ctx.transport} communicator")
        return None
    return run


def mk_subcomm(ctx):
    """MPIComm over a split of the world, interleaved with the world communicator."""
    def run(key):
        from collectives.mpi import MPIComm
        from mpi4py import MPI
        S, r = ctx.size, ctx.rank
        split = MPI.COMM_WORLD.Split(r % 2, r)
        sub = MPIComm(split)
        try:
            members = [q for q in range(S) if q % 2 == r % 2]
            expect((sub.rank, sub.size) == (members.index(r), len(members)), f"sub rank/size {(sub.rank, sub.size)}")
            x = np.full(5, r, np.int64)
            w = sub.all_reduce(x, async_op=True)
            y = np.full(3, r, np.int64)
            ctx.comm.all_reduce(y)
            w.wait(timeout=WAIT)
            soft(check_bytes, x, np.full(5, sum(members), np.int64), "all_reduce on the sub-communicator")
            soft(check_bytes, y, np.full(3, sum(range(S)), np.int64), "all_reduce on the world meanwhile")
            g = sub.all_gather(np.array([r], np.int32))
            soft(check_bytes, g, np.array(members, np.int32).reshape(-1, 1), "all_gather on the sub-communicator")
        finally:
            sub.close()
            split.Free()
        return None
    return run


def mk_closed(ctx):
    def run(key):
        from collectives import CollectiveError
        from collectives.mpi import MPIComm
        from mpi4py import MPI
        c2 = MPIComm(MPI.COMM_WORLD)
        x = np.full(3, 1.0)
        c2.all_reduce(x)
        soft(check_bytes, x, np.full(3, float(ctx.size)), "all_reduce on a second communicator")
        c2.close()
        c2.close()  # twice is fine
        expect_raises(CollectiveError, lambda: c2.all_reduce(x), "all_reduce on a closed communicator", match="closed")
        _check_next(ctx, key)
        return None
    return run


# -- GPU: stream order, partitions released by CUDA events ---------------------------------

def suite_gpu(ctx):
    cases = []
    for kind in ctx.kinds:
        if kind not in ("cupy", "torch-cuda"):
            continue
        cases.append((f"gpu/{kind}/reads_after_queued_work", mk_gpu_stream_order(ctx, kind)))
        cases.append((f"gpu/{kind}/async_then_later_work", mk_gpu_async_then_work(ctx, kind)))
        for how in ("event", "stream"):
            cases.append((f"gpu/{kind}/ready_after_{how}", mk_gpu_ready_after(ctx, kind, how)))
    return cases


def _gpu(ctx, kind):
    """(module, the current stream, a new side stream, a delay on a stream) of a GPU kind."""
    if kind == "torch-cuda":
        torch = ctx.buf.torch
        return (torch, torch.cuda.current_stream(), torch.cuda.Stream(),
                lambda: torch.cuda._sleep(50_000_000))  # some tens of ms of GPU time
    cupy = ctx.buf.cupy

    def delay():  # a chain of kernels on the current stream
        a = cupy.ones(1 << 22, cupy.float32)
        for _ in range(40):
            a = cupy.sqrt(a * a + 1.0)
    return cupy, cupy.cuda.get_current_stream(), cupy.cuda.Stream(non_blocking=True), delay


def _use_stream(kind, stream):
    import contextlib
    if kind == "torch-cuda":
        import torch
        return torch.cuda.stream(stream)
    return stream if hasattr(stream, "__enter__") else contextlib.nullcontext()


def mk_gpu_stream_order(ctx, kind):
    """all_reduce reads its input after the work queued on the current stream before the call
    (a delayed copy into it), and the result is there for the stream's later work."""
    def run(key):
        S, r = ctx.size, ctx.rank
        stack = _stack(ctx, key, "float32", (1 << 16,))
        src = ctx.buf.to(stack[r], "float32", kind)
        x = ctx.buf.to(np.zeros(1 << 16, np.float32), "float32", kind)
        mod, cur, side, delay = _gpu(ctx, kind)
        delay()
        x[...] = src  # queued behind the delay on the current stream
        ctx.comm.all_reduce(x)
        y = x * 1  # later work on the current stream
        want, tol = reference(stack, "float32", "sum", S)
        check_values(ctx.buf.np(y, "float32"), want, tol, "float32", "all_reduce after queued work")
        return digest(ctx.buf.np(x, "float32"))
    return run


def mk_gpu_async_then_work(ctx, kind):
    def run(key):
        r = ctx.rank
        stack = _stack(ctx, key, "float64", (1 << 15,))
        x = ctx.buf.to(stack[r], "float64", kind)
        w = ctx.comm.all_reduce(x, op="max", async_op=True)
        res = w.wait(timeout=WAIT)
        expect(res is x, "wait() did not return the tensor")
        y = x + 0  # ordered after the result by wait()
        check_bytes(ctx.buf.np(y, "float64"), np.maximum.reduce(stack, axis=0), "async all_reduce max on the GPU")
        return None
    return run


def mk_gpu_ready_after(ctx, kind, how):
    """Part i is written on a side stream behind a delay; ready_after(i, event or stream)
    releases it once that work is done (the caller does not wait)."""
    def run(key):
        r = ctx.rank
        P, n = 4, 4096
        stack = _stack(ctx, key, "int32", (n,))
        src = ctx.buf.to(stack[r], "int32", kind)
        x = ctx.buf.to(np.zeros(n, np.int32), "int32", kind)
        mod, cur, side, delay = _gpu(ctx, kind)
        parts = _parts(n, P)
        side.wait_stream(cur) if kind == "torch-cuda" else side.wait_event(cur.record())
        p = ctx.comm.all_reduce_partitioned(x, P, op="sum")
        for i in range(P):
            lo, hi = parts[i]
            with _use_stream(kind, side):
                delay()
                x[lo:hi] = src[lo:hi]
                if how == "event":
                    ev = mod.cuda.Event() if kind == "torch-cuda" else mod.cuda.Event(disable_timing=True)
                    ev.record(side)
                    p.ready_after(i, ev)
                else:
                    p.ready_after(i, side)
        expect(p.wait(timeout=WAIT) is x, "wait() did not return the tensor")
        check_bytes(ctx.buf.np(x, "int32"), np.add.reduce(stack, axis=0, dtype=np.int32), f"ready_after({how})")
        return None
    return run


# -- known hang: a ring exchange with both ranks sending first ------------------------------

def suite_exchange(ctx):
    return [(f"exchange/send_first/{n}", mk_exchange(ctx, n)) for n in (100, 100000)]


def mk_exchange(ctx, n):
    """Each rank starts an async send to its neighbour, then a receive from the other
    neighbour (the torch.distributed isend/irecv pattern); 800 kB passes any eager limit."""
    def run(key):
        S, r = ctx.size, ctx.rank
        x = np.full(n, r, np.int64)
        y = np.zeros(n, np.int64)
        ws = ctx.comm.send(x, (r + 1) % S, async_op=True)
        wr = ctx.comm.recv(y, (r - 1) % S, async_op=True)
        src = wr.wait(timeout=5)
        ws.wait(timeout=5)
        expect(src == (r - 1) % S, f"recv returned {src}")
        check_bytes(y, np.full(n, (r - 1) % S, np.int64), "recv")
        return None
    return run


# ---------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--level", choices=("full", "light"), default="full")
    ap.add_argument("--kinds", default="numpy")
    ap.add_argument("--suites", default="matrix,async,partitioned,errors,init")
    ap.add_argument("--transport", default="shm")
    args = ap.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    suites = [s for s in args.suites.split(",") if s]

    from mpi4py import MPI
    import collectives
    world = MPI.COMM_WORLD
    comm = collectives.init()
    ctx = Ctx(world.Get_size(), args.level, kinds, suites, args.seed, args.transport)
    ctx.rank, ctx.comm = world.Get_rank(), comm
    if "cupy" in kinds or "torch-cuda" in kinds:
        ndev = 0
        if "cupy" in kinds:
            import cupy
            ndev = cupy.cuda.runtime.getDeviceCount()
            cupy.cuda.Device(ctx.rank % ndev).use()
        if "torch-cuda" in kinds:
            import torch
            ndev = torch.cuda.device_count()
            torch.cuda.set_device(ctx.rank % ndev)
    ctx.buf = Buffers(kinds)
    if ctx.rank == 0:
        print(f"seed {args.seed} ranks {ctx.size} transport {comm.transport} kinds {','.join(kinds)}", flush=True)

    verdicts = []
    t_start = time.monotonic()
    for name, fn in build_cases(ctx):
        if ctx.rank == 0:
            print("running", name, file=sys.stderr, flush=True)
        del _soft[:]
        try:
            h = fn(name)
            why = "; ".join(_soft) if _soft else None
            verdicts.append((name, why, None if why else h))
        except Fail as e:
            verdicts.append((name, "; ".join(_soft + [str(e)]), None))
        except Exception as e:  # noqa: BLE001
            verdicts.append((name, "; ".join(_soft + [f"{type(e).__name__}: {e}"]), None))
        if verdicts[-1][1] is not None:
            print(f"rank {ctx.rank}: case {name} FAIL {verdicts[-1][1]}", file=sys.stderr, flush=True)

    everyone = world.gather(verdicts, root=0)
    failed = 0
    if ctx.rank == 0:
        for i, (name, _, _) in enumerate(verdicts):
            whys = []
            for q, v in enumerate(everyone):
                if len(v) <= i or v[i][0] != name:
                    whys.append(f"rank {q} ran other cases")
                elif v[i][1] is not None:
                    whys.append(f"rank {q}: {v[i][1]}")
            if not whys:
                hashes = {v[i][2] for v in everyone}
                if len(hashes) > 1:
                    whys.append(f"the ranks' results differ: {[v[i][2] for v in everyone]}")
            if whys:
                failed += 1
                print(f"case {name} FAIL {' | '.join(whys)}".replace("\n", " "), flush=True)
            else:
                print(f"case {name} ok", flush=True)
        print(f"summary ranks={ctx.size} transport={comm.transport} cases={len(verdicts)} failed={failed} "
              f"seed={args.seed} seconds={time.monotonic() - t_start:.1f}", flush=True)
    failed = world.bcast(failed, root=0)
    world.Barrier()
    if failed:
        # A failed case may have left an operation that never ends (a hang the test caught
        # with a timeout): leave without waiting for it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    comm.close()


if __name__ == "__main__":
    main()
