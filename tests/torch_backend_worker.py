"""One rank of tests/test_torch_backend.py: many cases of the "commlib" torch.distributed backend
(collectives/torch.py) in one mpiexec launch.

    commlib run -n N -- python torch_backend_worker.py --seed S --level full|light
                        --suites matrix,extras,async,groups,errors,coalescing,ddp [--init commlib]

Every rank runs the same list of cases (build_cases: names depend on the rank count, the level
and the suites, never on the rank, so that the pytest side computes the same list with plan()).
Inputs: each rank regenerates every rank's input from the seed, the case's name and the rank
(gen), and checks its own result against plain torch math on those inputs (reference).

Exactness: integer and bool results must be equal.  Float inputs are small integers (sum, avg,
premul), +-{1/2, 1, 2} (prod) or any value of the dtype (min, max), so that every float result
is exact too, except avg on a rank count that is not a power of two (one rounding of the
quotient: 1 ulp of the dtype allowed) and the DDP cases (see suite_ddp).

At the end rank 0 gathers (over mpi4py, not the backend under test) every rank's verdicts and
result hashes and prints one line per case

    case <name> ok
    case <name> FAIL <why>            (a rank failed, or the ranks' results differ)

then `summary ranks=.. cases=.. failed=.. seed=.. seconds=..`.  Rank 0 prints `running <name>`
on stderr before each case, so that a hang names its case.
"""
import argparse
import datetime
import functools
import hashlib
import os
import sys
import time
import zlib

FLOATS = ("float16", "bfloat16", "float32", "float64")
SINTS = ("int8", "int16", "int32", "int64")
UINTS = ("uint8", "uint16", "uint32", "uint64")
ALL_DTYPES = FLOATS + SINTS + UINTS + ("bool",)
LIGHT_DTYPES = ("bfloat16", "float32", "int64", "uint8", "uint32", "bool")
BITS = {"int8": 8, "int16": 16, "int32": 32, "int64": 64, "uint8": 8, "uint16": 16, "uint32": 32, "uint64": 64}
EPS = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7, "float32": 2.0 ** -23, "float64": 2.0 ** -52}
SUITES = ("matrix", "extras", "async", "groups", "errors", "coalescing", "ddp", "mixed")

torch = dist = None  # imported in main() (plan() must work without torch)


class Fail(Exception):
    pass


# A failed check is recorded and the case goes on, so that every rank issues the case's
# remaining operations (a rank that stopped early would pair its next operations with the
# others' leftovers).  need() ends the case (for what the rest cannot do without).
_soft = []


def expect(cond, why):
    if not cond:
        _soft.append(why)
    return bool(cond)


def need(cond, why):
    if not cond:
        raise Fail(why)


def expect_raises(fn, what, match=(), types=(Exception,)):
    """fn() must raise (one of types, with every string of match in its message, case-insensitive)."""
    try:
        fn()
    except types as e:
        text = f"{type(e).__name__}: {e}"
        for m in match:
            expect(m.lower() in text.lower(), f"{what}: the error {text[:300]!r} does not mention {m!r}")
        return e
    except Exception as e:  # noqa: BLE001
        _soft.append(f"{what}: raised {type(e).__name__}: {e} instead of {[t.__name__ for t in types]}")
        return e
    _soft.append(f"{what}: no error raised")
    return None


# ---------------------------------------------------------------------------------------
# dtypes, inputs, references

def T(dtype):
    return getattr(torch, dtype)


# PREMUL_SUM's factor reaches a Python backend only where torch's ReduceOp shows it (2.13 does,
# 2.11 does not: the backend then refuses PREMUL_SUM with NotImplementedError naming it)
def premul_ok():
    import torch.distributed as d  # (plan() runs before main() imports torch)
    return hasattr(d._make_nccl_premul_sum(2.0), "factor")


def valid_ops(dtype):
    if dtype in FLOATS:
        return ("sum", "avg", "min", "max", "prod") + (("premul",) if premul_ok() else ())
    if dtype == "bool":
        return ("sum", "min", "max", "prod", "band", "bor", "bxor")
    return ("sum", "avg", "min", "max", "prod", "band", "bor", "bxor")


def reduce_op(op, factor=0.5):
    if op == "premul":
        return dist._make_nccl_premul_sum(factor)
    return {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.AVG, "min": dist.ReduceOp.MIN,
            "max": dist.ReduceOp.MAX, "prod": dist.ReduceOp.PRODUCT, "band": dist.ReduceOp.BAND,
            "bor": dist.ReduceOp.BOR, "bxor": dist.ReduceOp.BXOR}[op]


def regime(op):
    return {"sum": "small", "avg": "small", "premul": "small", "prod": "prod"}.get(op, "full")


def generator(ctx, key, rank):
    return torch.Generator().manual_seed(zlib.crc32(f"{ctx.seed}/{key}/{rank}".encode()))


def gen(ctx, key, rank, dtype, shape, kind="full"):
    """Rank `rank`'s input of case `key` (every rank can make everyone's).  kind: "small"
    (integers -8..8, unsigned 0..16), "prod" (floats +-{1/2, 1, 2}, integers -3..3 / 0..3),
    "full" (any value of an integer dtype; floats uniform in -100..100 rounded to the dtype)."""
    g = generator(ctx, key, rank)
    shape = tuple(shape)
    if dtype == "bool":
        return torch.rand(shape, generator=g) < 0.6
    if dtype.startswith("complex"):
        re = torch.randint(-8, 9, shape, generator=g).to(torch.float64)
        im = torch.randint(-8, 9, shape, generator=g).to(torch.float64)
        return torch.complex(re, im).to(T(dtype))
    if dtype in FLOATS:
        if kind == "prod":
            vals = torch.tensor([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0], dtype=torch.float64)
            v = vals[torch.randint(0, 6, shape, generator=g)]
        elif kind == "small":
            v = torch.randint(-8, 9, shape, generator=g).to(torch.float64)
        else:
            v = torch.rand(shape, generator=g, dtype=torch.float64) * 200 - 100
        return v.to(T(dtype))
    signed = dtype in SINTS
    if kind == "small":
        v = torch.randint(-8 if signed else 0, 9 if signed else 17, shape, generator=g)
    elif kind == "prod":
        v = torch.randint(-3 if signed else 0, 4, shape, generator=g)
    elif BITS[dtype] < 64:
        lo = -(1 << (BITS[dtype] - 1)) if signed else 0
        v = torch.randint(lo, lo + (1 << BITS[dtype]), shape, generator=g)
    else:
        hi = torch.randint(-(1 << 31), 1 << 31, shape, generator=g)
        lo = torch.randint(0, 1 << 32, shape, generator=g)
        v = (hi << 32) | lo
    return from_key(v, dtype)


def as_key(t, dtype):
    """int64 (integers: uint64 by its bits), float64, complex128 or bool."""
    if dtype == "uint64":
        return t.view(torch.int64)
    if dtype in BITS:
        return t.to(torch.int64)
    if dtype.startswith("complex"):
        return t.to(torch.complex128)
    if dtype in FLOATS:
        return t.to(torch.float64)
    return t


def from_key(v, dtype):
    if dtype == "uint64":
        return v.view(torch.uint64)
    return v.to(T(dtype))  # (int64 -> a narrower integer wraps)


def reference(inputs, dtype, op, S, factor=0.5):
    """Plain torch's answer for the ranks' inputs: (tensor of dtype, float tolerance or None)."""
    if dtype == "bool":
        st = torch.stack(inputs)
        if op in ("sum", "max", "bor"):
            return st.any(0), None
        if op in ("prod", "min", "band"):
            return st.all(0), None
        return st.to(torch.int64).sum(0) % 2 == 1, None
    k = torch.stack([as_key(x, dtype) for x in inputs])
    if dtype in BITS:
        if op in ("min", "max"):
            flip = dtype == "uint64"  # order uint64 by its bits: flip the sign bit
            if flip:
                k = k ^ torch.tensor(-(1 << 63))
            r = k.amin(0) if op == "min" else k.amax(0)
            return from_key(r ^ torch.tensor(-(1 << 63)) if flip else r, dtype), None
        if op in ("band", "bor", "bxor"):
            fn = {"band": torch.bitwise_and, "bor": torch.bitwise_or, "bxor": torch.bitwise_xor}[op]
            return from_key(functools.reduce(fn, list(k)), dtype), None
        if op == "avg":  # integer avg: the sum divided by S, truncated toward zero
            return from_key(torch.div(k.sum(0), S, rounding_mode="trunc"), dtype), None
        return from_key(k.sum(0) if op == "sum" else k.prod(0), dtype), None
    if op == "premul":
        k = k * float(factor)
    if op in ("sum", "premul"):
        r = k.sum(0)
    elif op == "avg":
        r = k.sum(0) / S
    elif op == "prod":
        r = k.prod(0)
    else:
        r = k.amin(0) if op == "min" else k.amax(0)
    tol = None
    if op == "avg" and S & (S - 1):
        tol = EPS[dtype.replace("complex64", "float32").replace("complex128", "float64")]
    return r.to(T(dtype)), tol


def check(got, want, what, tol=None):
    """got must be want (tol: |got - want| <= tol * |want| elementwise)."""
    if not expect(got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape),
                  f"{what}: got {got.dtype} {tuple(got.shape)}, expected {want.dtype} {tuple(want.shape)}"):
        return False
    if tol is None:
        if torch.equal(got, want):
            return True
        g, w = got.reshape(-1), want.reshape(-1)
        bad = torch.nonzero(g != w).reshape(-1)
        i = int(bad[0]) if bad.numel() else 0
        _soft.append(f"{what}: {bad.numel()} of {g.numel()} elements differ; first at {i}: got {g[i].item()!r}, "
                     f"expected {w[i].item()!r}")
        return False
    g = got.to(torch.complex128 if got.is_complex() else torch.float64)
    w = want.to(g.dtype)
    err = (g - w).abs()
    bad = err > tol * w.abs() + 1e-300
    if bad.any():
        i = int(torch.nonzero(bad.reshape(-1))[0])
        _soft.append(f"{what}: {int(bad.sum())} of {g.numel()} elements off by more than {tol} relative; first at "
                     f"{i}: got {g.reshape(-1)[i].item()!r}, expected {w.reshape(-1)[i].item()!r}")
        return False
    return True


def digest(*tensors):
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().reshape(-1)
        if t.is_complex():
            t = torch.view_as_real(t).reshape(-1)
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class Ctx:
    def __init__(self, size, level, suites, seed=0, init="commlib"):
        self.size, self.level, self.suites, self.seed, self.init = size, level, list(suites), seed, init
        self.rank = None
        self.world = None  # mpi4py COMM_WORLD (the verdicts travel there, not over the backend)

    def dtypes(self):
        return ALL_DTYPES if self.level == "full" else LIGHT_DTYPES

    def inputs(self, key, dtype, shape, kind="full"):
        return [gen(self, key, q, dtype, shape, kind) for q in range(self.size)]


def build_cases(ctx):
    cases = []
    for suite in ctx.suites:
        cases += globals()["suite_" + suite](ctx)
    names = [n for n, _ in cases]
    assert len(names) == len(set(names)), "duplicate case names"
    return cases


def plan(size, level, suites, init="commlib"):
    return [name for name, _ in build_cases(Ctx(size, level, suites, init=init))]


# ---------------------------------------------------------------------------------------
# 1. every op x dtype x ReduceOp

def suite_matrix(ctx):
    S, cases = ctx.size, []
    for di, dtype in enumerate(ctx.dtypes()):
        for oi, op in enumerate(valid_ops(dtype)):
            cases.append((f"all_reduce/{dtype}/{op}", mk_all_reduce(ctx, dtype, op, (3, 5))))
            cases.append((f"reduce_scatter_tensor/{dtype}/{op}", mk_reduce_scatter_tensor(ctx, dtype, op, (4, 3))))
            cases.append((f"reduce_scatter/{dtype}/{op}", mk_reduce_scatter_list(ctx, dtype, op, (2, 3))))
            root = (di + oi) % S
            cases.append((f"reduce/{dtype}/{op}/root{root}", mk_reduce(ctx, dtype, op, (7,), root)))
        if ctx.level == "full":  # 40 kB: many chunks of the engine
            cases.append((f"all_reduce/{dtype}/sum/large",
                          mk_all_reduce(ctx, dtype, "sum", (40000 // T_size(dtype) + 3,))))
        cases.append((f"reduce_scatter_tensor/{dtype}/sum/stacked",
                      mk_reduce_scatter_tensor(ctx, dtype, "sum" if dtype != "bool" else "bor", (2, 3), stacked=True)))
        cases.append((f"all_gather/{dtype}", mk_all_gather(ctx, dtype, (2, 3))))
        cases.append((f"all_gather_into_tensor/{dtype}", mk_all_gather_into_tensor(ctx, dtype, (2, 3), False)))
        cases.append((f"all_gather_into_tensor/{dtype}/stacked", mk_all_gather_into_tensor(ctx, dtype, (2, 3), True)))
        for root in range(S):
            cases.append((f"broadcast/{dtype}/root{root}", mk_broadcast(ctx, dtype, (5, 2), root)))
        cases.append((f"all_to_all/{dtype}", mk_all_to_all_list(ctx, dtype, False)))
        cases.append((f"all_to_all_single/{dtype}", mk_all_to_all_single(ctx, dtype, False)))
        cases.append((f"all_to_all_single/{dtype}/uneven", mk_all_to_all_single(ctx, dtype, True)))
        root = di % S
        cases.append((f"gather/{dtype}/root{root}", mk_gather(ctx, dtype, (3, 2), root)))
        cases.append((f"scatter/{dtype}/root{(root + 1) % S}", mk_scatter(ctx, dtype, (3, 2), (root + 1) % S)))
        if S > 1:
            cases.append((f"send_recv/{dtype}/ring", mk_ring(ctx, dtype, (6,))))
    return cases


def T_size(dtype):
    return {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "bool": 1}.get(dtype, BITS.get(dtype, 8) // 8)


def mk_all_reduce(ctx, dtype, op, shape, factor=0.5, async_how=None):
    def fn(key):
        ins = ctx.inputs(key, dtype, shape, regime(op))
        want, tol = reference(ins, dtype, op, ctx.size, factor)
        x = ins[ctx.rank].clone()
        rop = reduce_op(op, factor)
        if async_how is None:
            expect(dist.all_reduce(x, op=rop) is None, "all_reduce returned something")
        else:
            w = dist.all_reduce(x, op=rop, async_op=True)
            if async_how == "wait":
                w.wait()
            else:
                v = w.get_future().wait()
                expect(isinstance(v, list) and len(v) == 1 and (v[0] is x or torch.equal(v[0], x)),
                       f"the future's value {v!r} is not [the tensor]")
            expect(w.is_completed(), "is_completed() is False after wait")
        check(x, want, "all_reduce", tol)
        return digest(x)
    return fn


def mk_reduce_scatter_tensor(ctx, dtype, op, out_shape, factor=0.5, stacked=False):
    S = ctx.size

    def fn(key):
        in_shape = (S, *out_shape) if stacked else (S * out_shape[0], *out_shape[1:])
        ins = ctx.inputs(key, dtype, in_shape, regime(op))
        want, tol = reference(ins, dtype, op, S, factor)
        want = want.reshape(S, *out_shape)[ctx.rank]
        x = ins[ctx.rank].clone()
        out = torch.full(out_shape, 1, dtype=T(dtype))
        dist.reduce_scatter_tensor(out, x, op=reduce_op(op, factor))
        check(out, want, "reduce_scatter_tensor", tol)
        check(x, ins[ctx.rank], "reduce_scatter_tensor's input (must not change)")
    return fn


def mk_reduce_scatter_list(ctx, dtype, op, shape, factor=0.5):
    S = ctx.size

    def fn(key):
        ins = ctx.inputs(key, dtype, (S, *shape), regime(op))
        want, tol = reference(ins, dtype, op, S, factor)
        mine = [ins[ctx.rank][q].clone() for q in range(S)]
        out = torch.zeros(shape, dtype=T(dtype))
        dist.reduce_scatter(out, mine, op=reduce_op(op, factor))
        check(out, want[ctx.rank], "reduce_scatter", tol)
        for q in range(S):
            check(mine[q], ins[ctx.rank][q], f"reduce_scatter's input {q} (must not change)")
    return fn


def mk_reduce(ctx, dtype, op, shape, root, factor=0.5):
    def fn(key):
        ins = ctx.inputs(key, dtype, shape, regime(op))
        want, tol = reference(ins, dtype, op, ctx.size, factor)
        x = ins[ctx.rank].clone()
        dist.reduce(x, dst=root, op=reduce_op(op, factor))
        if ctx.rank == root:
            check(x, want, "reduce at the root", tol)
        elif op != "premul":  # (a premul factor may scale a non-root's tensor: torch leaves it undefined)
            check(x, ins[ctx.rank], "reduce: a non-root's tensor changed")
    return fn


def mk_all_gather(ctx, dtype, shape):
    def fn(key):
        ins = ctx.inputs(key, dtype, shape)
        outs = [torch.zeros(shape, dtype=T(dtype)) for _ in range(ctx.size)]
        dist.all_gather(outs, ins[ctx.rank].clone())
        for q in range(ctx.size):
            check(outs[q], ins[q], f"all_gather block {q}")
        return digest(*outs)
    return fn


def mk_all_gather_into_tensor(ctx, dtype, shape, stacked):
    S = ctx.size

    def fn(key):
        ins = ctx.inputs(key, dtype, shape)
        out = torch.zeros((S, *shape) if stacked else (S * shape[0], *shape[1:]), dtype=T(dtype))
        dist.all_gather_into_tensor(out, ins[ctx.rank].clone())
        check(out, torch.stack(ins) if stacked else torch.cat(ins), "all_gather_into_tensor")
        return digest(out)
    return fn


def mk_broadcast(ctx, dtype, shape, root):
    def fn(key):
        ins = ctx.inputs(key, dtype, shape)
        x = ins[ctx.rank].clone()
        dist.broadcast(x, src=root)
        check(x, ins[root], f"broadcast from {root}")
        return digest(x)
    return fn


def mk_all_to_all_list(ctx, dtype, varied):
    """all_to_all of lists: block (p -> q) has shape (1 + (p + q) % 3, 2) when varied, else (3,)."""
    S = ctx.size

    def shp(p, q):
        return (1 + (p + q) % 3, 2) if varied else (3,)

    def fn(key):
        blocks = [[gen(ctx, f"{key}/{p}->{q}", p, dtype, shp(p, q)) for q in range(S)] for p in range(S)]
        me = ctx.rank
        outs = [torch.zeros(shp(q, me), dtype=T(dtype)) for q in range(S)]
        dist.all_to_all(outs, [b.clone() for b in blocks[me]])
        for q in range(S):
            check(outs[q], blocks[q][me], f"all_to_all block from {q}")
    return fn


def a2a_splits(S, p, q):
    """Rows rank p sends rank q in the uneven all_to_all_single (zero for some pairs)."""
    return (p * 2 + q * 3 + 1) % 4


def mk_all_to_all_single(ctx, dtype, uneven, noncontig=False, async_op=False):
    S = ctx.size

    def fn(key):
        me = ctx.rank
        if uneven:
            ins = ctx.inputs(key, dtype, (4 * S, 2))
            sends = [[ins[p][4 * q:4 * q + a2a_splits(S, p, q)] for q in range(S)] for p in range(S)]
            in_splits = [a2a_splits(S, me, q) for q in range(S)]
            out_splits = [a2a_splits(S, q, me) for q in range(S)]
            x = torch.cat(sends[me])
            want = torch.cat([sends[q][me] for q in range(S)])
        else:
            ins = ctx.inputs(key, dtype, (3 * S, 2))
            in_splits = out_splits = None
            x = ins[me].clone()
            want = torch.cat([ins[q][3 * me:3 * me + 3] for q in range(S)])
        if noncontig:  # every second row of a wider tensor, and an output of the same kind
            xs = torch.zeros((x.shape[0], 2 * x.shape[1]), dtype=x.dtype)
            xs[:, ::2] = x
            x = xs[:, ::2]
            outw = torch.zeros((want.shape[0], 2 * want.shape[1]), dtype=x.dtype)
            out = outw[:, 1::2]
            need(not x.is_contiguous() and not out.is_contiguous(), "views are contiguous")
        else:
            out = torch.zeros_like(want)
        w = dist.all_to_all_single(out, x, out_splits, in_splits, async_op=async_op)
        if async_op:
            w.wait()
        check(out, want, "all_to_all_single")
        if noncontig:
            expect(not outw[:, ::2].any(), "all_to_all_single wrote beside its non-contiguous output")
    return fn


def mk_gather(ctx, dtype, shape, root):
    def fn(key):
        ins = ctx.inputs(key, dtype, shape)
        outs = [torch.zeros(shape, dtype=T(dtype)) for _ in range(ctx.size)] if ctx.rank == root else None
        dist.gather(ins[ctx.rank].clone(), outs, dst=root)
        if ctx.rank == root:
            for q in range(ctx.size):
                check(outs[q], ins[q], f"gather block {q}")
    return fn


def mk_scatter(ctx, dtype, shape, root):
    def fn(key):
        blocks = [gen(ctx, key, q, dtype, shape) for q in range(ctx.size)]  # block q, made by the root
        out = torch.zeros(shape, dtype=T(dtype))
        dist.scatter(out, [b.clone() for b in blocks] if ctx.rank == root else None, src=root)
        check(out, blocks[ctx.rank], f"scatter from {root}")
    return fn


def mk_ring(ctx, dtype, shape, noncontig=False):
    S = ctx.size

    def fn(key):
        ins = ctx.inputs(key, dtype, shape)
        me = ctx.rank
        right, left = (me + 1) % S, (me - 1) % S
        w = dist.isend(ins[me].clone(), right)
        if noncontig:
            wide = torch.zeros((*shape, 2), dtype=T(dtype))
            out = wide[..., 1]
        else:
            out = torch.zeros(shape, dtype=T(dtype))
        src = dist.recv(out, src=left)
        w.wait()
        expect(src == left, f"recv returned {src}, not {left}")
        check(out, ins[left], f"recv from {left}")
        if noncontig:
            expect(not wide[..., 0].any(), "recv wrote beside its non-contiguous tensor")
    return fn


# ---------------------------------------------------------------------------------------
# 2. complex, premul factors, non-contiguous, empty and 0-d tensors, uneven exchanges, p2p

def suite_extras(ctx):
    S, cases = ctx.size, []
    light = ctx.level != "full"
    for dtype in ("complex64",) if light else ("complex64", "complex128"):
        for op in ("sum", "avg") + (("premul",) if premul_ok() else ()):
            cases.append((f"complex/all_reduce/{dtype}/{op}", mk_all_reduce(ctx, dtype, op, (3, 4))))
            cases.append((f"complex/reduce_scatter_tensor/{dtype}/{op}",
                          mk_reduce_scatter_tensor(ctx, dtype, op, (2, 3))))
        cases.append((f"complex/reduce_scatter/{dtype}/sum", mk_reduce_scatter_list(ctx, dtype, "sum", (3,))))
        cases.append((f"complex/reduce/{dtype}/sum", mk_reduce(ctx, dtype, "sum", (4,), S - 1)))
        cases.append((f"complex/all_gather/{dtype}", mk_all_gather(ctx, dtype, (3,))))
        cases.append((f"complex/all_gather_into_tensor/{dtype}", mk_all_gather_into_tensor(ctx, dtype, (3,), False)))
        cases.append((f"complex/broadcast/{dtype}", mk_broadcast(ctx, dtype, (4,), S - 1)))
        cases.append((f"complex/all_to_all_single/{dtype}", mk_all_to_all_single(ctx, dtype, False)))
        cases.append((f"complex/all_to_all/{dtype}", mk_all_to_all_list(ctx, dtype, False)))
        if S > 1:
            cases.append((f"complex/send_recv/{dtype}", mk_ring(ctx, dtype, (5,))))
    if not premul_ok():
        cases.append(("premul/refused", mk_premul_refused(ctx)))
    for dtype in (FLOATS if not light else ("bfloat16", "float32")) if premul_ok() else ():
        for how in ("0d", "1elem", "float3"):
            cases.append((f"premul/{dtype}/{how}/all_reduce", mk_premul(ctx, dtype, how, "all_reduce")))
            cases.append((f"premul/{dtype}/{how}/reduce_scatter_tensor",
                          mk_premul(ctx, dtype, how, "reduce_scatter_tensor")))
            cases.append((f"premul/{dtype}/{how}/reduce_scatter", mk_premul(ctx, dtype, how, "reduce_scatter")))
            cases.append((f"premul/{dtype}/{how}/reduce", mk_premul(ctx, dtype, how, "reduce")))
    for dtype in ("float32", "int16", "bool") if not light else ("float32",):
        for what in ("all_reduce", "all_reduce_async", "broadcast", "all_gather", "all_gather_into_tensor",
                     "reduce_scatter", "reduce_scatter_tensor", "reduce", "gather", "scatter", "all_to_all"):
            cases.append((f"noncontig/{what}/{dtype}", mk_noncontig(ctx, dtype, what)))
        cases.append((f"noncontig/all_to_all_single/{dtype}", mk_all_to_all_single(ctx, dtype, False, True)))
        cases.append((f"noncontig/all_to_all_single/{dtype}/uneven", mk_all_to_all_single(ctx, dtype, True, True)))
        if S > 1:
            cases.append((f"noncontig/recv/{dtype}", mk_ring(ctx, dtype, (3, 4), noncontig=True)))
    for dtype in ("float32", "int64") if not light else ("float32",):
        for what in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                     "reduce_scatter", "all_to_all_single", "reduce", "send_recv", "gather", "scatter"):
            if what != "send_recv" or S > 1:
                cases.append((f"empty/{what}/{dtype}", mk_empty(ctx, dtype, what)))
        for what in ("all_reduce", "broadcast", "all_gather"):
            cases.append((f"scalar/{what}/{dtype}", mk_scalar(ctx, dtype, what)))
    for dtype in ("float32", "bfloat16", "int8", "bool") if not light else ("float32", "bool"):
        cases.append((f"all_gather_into_tensor/{dtype}/in_place", mk_in_place(ctx, dtype, "all_gather_into_tensor")))
        cases.append((f"all_reduce/{dtype}/offset_view", mk_in_place(ctx, dtype, "all_reduce_offset")))
        cases.append((f"broadcast/{dtype}/offset_view", mk_in_place(ctx, dtype, "broadcast_offset")))
        cases.append((f"all_to_all/{dtype}/varied_blocks", mk_all_to_all_list(ctx, dtype, True)))
        cases.append((f"all_to_all_single/{dtype}/uneven/async", mk_all_to_all_single(ctx, dtype, True, False, True)))
    if S > 1:
        for root in sorted({0, S - 1}):
            cases.append((f"p2p/recv_any_source/root{root}", mk_any_source(ctx, root, False)))
            cases.append((f"p2p/irecv_any_source/root{root}", mk_any_source(ctx, root, True)))
        cases.append(("p2p/tags", mk_tags(ctx)))
        cases.append(("p2p/batch_isend_irecv", mk_batch_p2p(ctx)))
        cases.append(("p2p/isend_irecv_both_ways", mk_isend_irecv(ctx)))
    cases.append(("objects/all_gather_object", mk_objects(ctx, "all_gather_object")))
    cases.append(("objects/broadcast_object_list", mk_objects(ctx, "broadcast_object_list")))
    cases.append(("objects/gather_object", mk_objects(ctx, "gather_object")))
    cases.append(("objects/scatter_object_list", mk_objects(ctx, "scatter_object_list")))
    cases.append(("barrier", mk_barrier(ctx)))
    return cases


def mk_premul_refused(ctx):
    """A torch that hides PREMUL_SUM's factor: the backend refuses it, naming it, input untouched."""
    def fn(key):
        x = torch.arange(4, dtype=torch.float32)
        expect_raises(lambda: dist.all_reduce(x, op=dist._make_nccl_premul_sum(2.0)), "premul", ["PREMUL_SUM"],
                      types=(NotImplementedError,))
        check(x, torch.arange(4, dtype=torch.float32), "the input after a refused PREMUL_SUM")
    return fn


def mk_premul(ctx, dtype, how, what):
    """PREMUL_SUM with a tensor factor (0-d or one element, of the data's dtype) or a float."""
    S = ctx.size

    def fn(key):
        if how == "float3":
            factor, fval = 3.0, 3.0
        else:
            fval = 3.0 if how == "0d" else 0.25
            factor = torch.tensor(fval, dtype=T(dtype)) if how == "0d" else torch.tensor([fval], dtype=T(dtype))
        rop = dist._make_nccl_premul_sum(factor)
        if what == "all_reduce":
            ins = ctx.inputs(key, dtype, (6,), "small")
            want, _ = reference(ins, dtype, "premul", S, fval)
            x = ins[ctx.rank].clone()
            dist.all_reduce(x, op=rop)
            check(x, want, "all_reduce premul")
        elif what == "reduce_scatter_tensor":
            ins = ctx.inputs(key, dtype, (S * 3,), "small")
            want, _ = reference(ins, dtype, "premul", S, fval)
            out = torch.zeros(3, dtype=T(dtype))
            x = ins[ctx.rank].clone()
            dist.reduce_scatter_tensor(out, x, op=rop)
            check(out, want[3 * ctx.rank:3 * ctx.rank + 3], "reduce_scatter_tensor premul")
            check(x, ins[ctx.rank], "reduce_scatter_tensor premul's input (must not change)")
        elif what == "reduce_scatter":
            ins = ctx.inputs(key, dtype, (S, 3), "small")
            want, _ = reference(ins, dtype, "premul", S, fval)
            out = torch.zeros(3, dtype=T(dtype))
            dist.reduce_scatter(out, list(ins[ctx.rank].clone()), op=rop)
            check(out, want[ctx.rank], "reduce_scatter premul")
        else:
            ins = ctx.inputs(key, dtype, (5,), "small")
            want, _ = reference(ins, dtype, "premul", S, fval)
            x = ins[ctx.rank].clone()
            dist.reduce(x, dst=S - 1, op=rop)
            if ctx.rank == S - 1:
                check(x, want, "reduce premul at the root")
    return fn


def mk_noncontig(ctx, dtype, what):
    """The operation on strided views (a transposed or every-second-column view); the elements
    beside the view must stay as they were."""
    S, me = ctx.size, ctx.rank
    op = "sum" if dtype != "bool" else "bor"

    def view_of(t):
        """A non-contiguous view holding t, inside a wider tensor of ones/True (returned too)."""
        wide = torch.ones((*t.shape, 3), dtype=t.dtype)
        v = wide[..., 1]
        v.copy_(t)
        assert not v.is_contiguous()
        return v, wide

    def beside_intact(wide, what_):
        expect(bool((wide[..., 0] == 1).all()) and bool((wide[..., 2] == 1).all()),
               f"{what_} wrote beside its non-contiguous tensor")

    def fn(key):
        if what in ("all_reduce", "all_reduce_async"):
            ins = ctx.inputs(key, dtype, (5, 4), regime(op))
            want, _ = reference(ins, dtype, op, S)
            base = ins[me].t().contiguous()  # (4, 5); its .t() is (5, 4) non-contiguous
            x = base.t()
            need(not x.is_contiguous(), "transposed view is contiguous")
            if what == "all_reduce":
                dist.all_reduce(x, op=reduce_op(op))
            else:
                w = dist.all_reduce(x, op=reduce_op(op), async_op=True)
                v = w.get_future().wait()
                expect(v[0].data_ptr() == x.data_ptr() or torch.equal(v[0], want),
                       "the future's value is not the tensor")
            check(x, want, what)
            return digest(x)
        if what == "broadcast":
            ins = ctx.inputs(key, dtype, (4, 3))
            x, wide = view_of(ins[me])
            dist.broadcast(x, src=S - 1)
            check(x, ins[S - 1], "broadcast")
            beside_intact(wide, "broadcast")
        elif what == "all_gather":
            ins = ctx.inputs(key, dtype, (2, 3))
            x, _ = view_of(ins[me])
            views = [view_of(torch.zeros((2, 3), dtype=T(dtype))) for _ in range(S)]
            dist.all_gather([v for v, _ in views], x)
            for q, (v, wide) in enumerate(views):
                check(v, ins[q], f"all_gather block {q}")
                beside_intact(wide, "all_gather")
        elif what == "all_gather_into_tensor":
            ins = ctx.inputs(key, dtype, (3,))
            x, _ = view_of(ins[me])
            out, wide = view_of(torch.zeros(S * 3, dtype=T(dtype)))
            dist.all_gather_into_tensor(out, x)
            check(out, torch.cat(ins), "all_gather_into_tensor")
            beside_intact(wide, "all_gather_into_tensor")
        elif what == "reduce_scatter":
            ins = ctx.inputs(key, dtype, (S, 2, 3), regime(op))
            want, _ = reference(ins, dtype, op, S)
            out, wide = view_of(torch.zeros((2, 3), dtype=T(dtype)))
            dist.reduce_scatter(out, [view_of(ins[me][q])[0] for q in range(S)], op=reduce_op(op))
            check(out, want[me], "reduce_scatter")
            beside_intact(wide, "reduce_scatter")
        elif what == "reduce_scatter_tensor":
            ins = ctx.inputs(key, dtype, (S * 2, 3), regime(op))
            want, _ = reference(ins, dtype, op, S)
            x, _ = view_of(ins[me])
            out, wide = view_of(torch.zeros((2, 3), dtype=T(dtype)))
            dist.reduce_scatter_tensor(out, x, op=reduce_op(op))
            check(out, want[2 * me:2 * me + 2], "reduce_scatter_tensor")
            check(x, ins[me], "reduce_scatter_tensor's input (must not change)")
            beside_intact(wide, "reduce_scatter_tensor")
        elif what == "reduce":
            ins = ctx.inputs(key, dtype, (3, 2), regime(op))
            want, _ = reference(ins, dtype, op, S)
            x, wide = view_of(ins[me])
            dist.reduce(x, dst=0, op=reduce_op(op))
            check(x, want if me == 0 else ins[me], "reduce" if me == 0 else "reduce: a non-root's tensor changed")
            beside_intact(wide, "reduce")
        elif what == "gather":
            ins = ctx.inputs(key, dtype, (3,))
            x, _ = view_of(ins[me])
            views = [view_of(torch.zeros(3, dtype=T(dtype))) for _ in range(S)] if me == S - 1 else None
            dist.gather(x, [v for v, _ in views] if views else None, dst=S - 1)
            for q, (v, wide) in enumerate(views or ()):
                check(v, ins[q], f"gather block {q}")
                beside_intact(wide, "gather")
        elif what == "scatter":
            blocks = ctx.inputs(key, dtype, (3,))
            out, wide = view_of(torch.zeros(3, dtype=T(dtype)))
            dist.scatter(out, [view_of(b)[0] for b in blocks] if me == 0 else None, src=0)
            check(out, blocks[me], "scatter")
            beside_intact(wide, "scatter")
        elif what == "all_to_all":
            blocks = [[gen(ctx, f"{key}/{p}->{q}", p, dtype, (2,)) for q in range(S)] for p in range(S)]
            views = [view_of(torch.zeros(2, dtype=T(dtype))) for _ in range(S)]
            dist.all_to_all([v for v, _ in views], [view_of(b)[0] for b in blocks[me]])
            for q, (v, wide) in enumerate(views):
                check(v, blocks[q][me], f"all_to_all block from {q}")
                beside_intact(wide, "all_to_all")
    return fn


def mk_in_place(ctx, dtype, what):
    """all_gather_into_tensor whose input is this rank's block of the output (FSDP's way), and
    all_reduce / broadcast of a contiguous slice in the middle of a larger tensor (the
    elements around it stay)."""
    S, me = ctx.size, ctx.rank
    op = "sum" if dtype != "bool" else "bor"

    def fn(key):
        if what == "all_gather_into_tensor":
            ins = ctx.inputs(key, dtype, (5,))
            out = torch.zeros(S * 5, dtype=T(dtype))
            out[5 * me:5 * me + 5] = ins[me]
            dist.all_gather_into_tensor(out, out.narrow(0, 5 * me, 5))
            check(out, torch.cat(ins), "all_gather_into_tensor in place")
            return digest(out)
        ins = ctx.inputs(key, dtype, (7,), regime(op))
        big = torch.ones(20, dtype=T(dtype))
        big[6:13] = ins[me]
        x = big[6:13]
        need(x.is_contiguous() and x.storage_offset() == 6, "the slice is not an offset view")
        if what == "all_reduce_offset":
            dist.all_reduce(x, op=reduce_op(op))
            check(x, reference(ins, dtype, op, S)[0], "all_reduce of an offset view")
        else:
            dist.broadcast(x, src=S - 1)
            check(x, ins[S - 1], "broadcast of an offset view")
        expect(bool((big[:6] == 1).all()) and bool((big[13:] == 1).all()), f"{what} wrote beside its view")
        return digest(x)
    return fn


def mk_empty(ctx, dtype, what):
    S, me = ctx.size, ctx.rank

    def fn(key):
        e = torch.empty((0, 3), dtype=T(dtype))
        if what == "all_reduce":
            dist.all_reduce(e)
            expect(e.shape == (0, 3), "all_reduce changed an empty tensor's shape")
        elif what == "broadcast":
            dist.broadcast(e, src=S - 1)
        elif what == "all_gather":
            outs = [torch.empty((0, 3), dtype=T(dtype)) for _ in range(S)]
            dist.all_gather(outs, e)
        elif what == "all_gather_into_tensor":
            dist.all_gather_into_tensor(torch.empty((0, 3), dtype=T(dtype)), e)
        elif what == "reduce_scatter_tensor":
            dist.reduce_scatter_tensor(torch.empty((0, 3), dtype=T(dtype)), e)
        elif what == "reduce_scatter":
            dist.reduce_scatter(torch.empty(0, dtype=T(dtype)), [torch.empty(0, dtype=T(dtype)) for _ in range(S)])
        elif what == "all_to_all_single":
            dist.all_to_all_single(torch.empty(0, dtype=T(dtype)), torch.empty(0, dtype=T(dtype)))
        elif what == "reduce":
            dist.reduce(e, dst=0)
        elif what == "gather":
            dist.gather(e, [torch.empty((0, 3), dtype=T(dtype)) for _ in range(S)] if me == 0 else None, dst=0)
        elif what == "scatter":
            dist.scatter(e, [torch.empty((0, 3), dtype=T(dtype)) for _ in range(S)] if me == 0 else None, src=0)
        elif what == "send_recv":
            w = dist.isend(torch.empty(0, dtype=T(dtype)), (me + 1) % S)
            expect(dist.recv(torch.empty(0, dtype=T(dtype)), src=(me - 1) % S) == (me - 1) % S,
                   "recv of an empty tensor returned another source")
            w.wait()
        # the next operation still pairs up right
        ins = ctx.inputs(key, dtype, (4,), "small")
        x = ins[me].clone()
        dist.all_reduce(x, op=reduce_op("max"))
        check(x, reference(ins, dtype, "max", S)[0], f"an all_reduce after the empty {what}")
    return fn


def mk_scalar(ctx, dtype, what):
    S, me = ctx.size, ctx.rank

    def fn(key):
        ins = ctx.inputs(key, dtype, (), "small")
        x = ins[me].clone()
        if what == "all_reduce":
            dist.all_reduce(x)
            check(x, reference(ins, dtype, "sum", S)[0], "all_reduce of a 0-d tensor")
        elif what == "broadcast":
            dist.broadcast(x, src=S - 1)
            check(x, ins[S - 1], "broadcast of a 0-d tensor")
        else:
            outs = [torch.zeros((), dtype=T(dtype)) for _ in range(S)]
            dist.all_gather(outs, x)
            for q in range(S):
                check(outs[q], ins[q], f"all_gather of a 0-d tensor, block {q}")
    return fn


def mk_any_source(ctx, root, async_recv):
    """Every other rank sends the root a message it tells apart; the root receives them from any
    source, and each receive returns its sender."""
    S, me = ctx.size, ctx.rank

    def fn(key):
        ins = ctx.inputs(key, "int32", (6,))
        if me != root:
            dist.send(ins[me].clone(), root)
            dist.barrier()  # (a rank that went on to the next case could send the root its next message)
            return None
        seen = []
        try:
            for _ in range(S - 1):
                out = torch.zeros(6, dtype=torch.int32)
                if async_recv:
                    w = dist.irecv(out)  # src None: any source
                    w.wait()
                    src = w._source_rank()
                else:
                    src = dist.recv(out)
                if expect(isinstance(src, int) and 0 <= src < S and src != root, f"recv returned source {src!r}"):
                    check(out, ins[src], f"message from {src}")
                    seen.append(src)
            expect(sorted(seen) == [q for q in range(S) if q != root], f"senders {sorted(seen)}")
        finally:
            dist.barrier()  # (the senders wait there, also when a receive failed)
    return fn


def mk_tags(ctx):
    """Rank 0 sends tag 7 then tag 3 to rank 1, which receives tag 3 first."""
    me = ctx.rank

    def fn(key):
        a, b = gen(ctx, key, 0, "float32", (5,)), gen(ctx, key, 1, "float32", (5,))
        if me == 0:
            w1, w2 = dist.isend(a.clone(), 1, tag=7), dist.isend(b.clone(), 1, tag=3)
            w1.wait()
            w2.wait()
        elif me == 1:
            x3, x7 = torch.zeros(5), torch.zeros(5)
            expect(dist.recv(x3, src=0, tag=3) == 0, "recv's source")
            expect(dist.recv(x7, src=0, tag=7) == 0, "recv's source")
            check(x3, b, "the tag 3 message")
            check(x7, a, "the tag 7 message")
    return fn


def mk_batch_p2p(ctx):
    S, me = ctx.size, ctx.rank

    def fn(key):
        ins = ctx.inputs(key, "float64", (4,))
        from_left, from_right = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
        ops = [dist.P2POp(dist.isend, ins[me].clone(), (me + 1) % S),
               dist.P2POp(dist.isend, ins[me] * 2, (me - 1) % S),
               dist.P2POp(dist.irecv, from_left, (me - 1) % S),
               dist.P2POp(dist.irecv, from_right, (me + 1) % S)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        check(from_left, ins[(me - 1) % S], "batch_isend_irecv: from the left")
        check(from_right, ins[(me + 1) % S] * 2, "batch_isend_irecv: from the right")
    return fn


def mk_isend_irecv(ctx):
    S, me = ctx.size, ctx.rank

    def fn(key):
        ins = ctx.inputs(key, "int64", (3, 3))
        outs = [torch.zeros(3, 3, dtype=torch.int64) for _ in range(S)]
        works = [dist.irecv(outs[q], src=q) for q in range(S) if q != me]  # receives first
        works += [dist.isend(ins[me] + q, dst=q) for q in range(S) if q != me]
        for w in reversed(works):
            w.wait()
        for q in range(S):
            if q != me:
                check(outs[q], ins[q] + me, f"isend/irecv from {q}")
    return fn


def mk_objects(ctx, what):
    S, me = ctx.size, ctx.rank

    def obj(q):
        return {"rank": q, "text": "x" * (q * 7 + 1), "seed": ctx.seed % 1000}

    def fn(key):
        if what == "all_gather_object":
            out = [None] * S
            dist.all_gather_object(out, obj(me))
            expect(out == [obj(q) for q in range(S)], f"all_gather_object: {out!r}")
        elif what == "broadcast_object_list":
            lst = [obj(me), me] if me == S - 1 else [None, None]
            dist.broadcast_object_list(lst, src=S - 1)
            expect(lst == [obj(S - 1), S - 1], f"broadcast_object_list: {lst!r}")
        elif what == "gather_object":
            out = [None] * S if me == 0 else None
            dist.gather_object(obj(me), out, dst=0)
            if me == 0:
                expect(out == [obj(q) for q in range(S)], f"gather_object: {out!r}")
        else:
            out = [None]
            dist.scatter_object_list(out, [obj(q) for q in range(S)] if me == 0 else None, src=0)
            expect(out == [obj(me)], f"scatter_object_list: {out!r}")
    return fn


def mk_barrier(ctx):
    """A barrier holds every rank until the last one arrived: rank 0 arrives 0.3 s late."""
    def fn(key):
        if ctx.rank == 0:
            time.sleep(0.3)
        t0 = time.monotonic()
        dist.barrier()
        waited = time.monotonic() - t0
        times = ctx.world.allgather(waited)
        if ctx.size > 1:
            expect(min(times[1:]) > 0.2, f"barrier let ranks go before rank 0 came: waits {times}")
    return fn


# ---------------------------------------------------------------------------------------
# 3. async_op=True: wait(), get_future().value(), many in flight

def suite_async(ctx):
    cases = []
    for dtype in ("float32", "int32", "bfloat16"):
        cases.append((f"async/all_reduce/{dtype}/wait", mk_all_reduce(ctx, dtype, "sum", (10,), async_how="wait")))
        cases.append((f"async/all_reduce/{dtype}/future",
                      mk_all_reduce(ctx, dtype, "max", (10,), async_how="future")))
    cases.append(("async/every_op/wait", mk_async_every_op(ctx, "wait")))
    cases.append(("async/every_op/future", mk_async_every_op(ctx, "future")))
    cases.append(("async/every_op/wait_all_futures", mk_async_every_op(ctx, "wait_all")))
    cases.append(("async/many_in_flight", mk_async_many(ctx)))
    cases.append(("async/future_then", mk_async_then(ctx)))
    cases.append(("async/future_then_waits_for_another", mk_async_then_nested(ctx)))
    cases.append(("async/waits_beside_the_completion_thread", mk_async_stress(ctx)))
    return cases


def mk_async_every_op(ctx, how):
    """Every collective started with async_op=True before any is waited for; then each is waited
    (in reverse order) by wait(), by its future's wait() and value(), or by
    torch.futures.wait_all; each result checked."""
    S, me = ctx.size, ctx.rank

    def fn(key):
        checks, works = [], []
        ar = ctx.inputs(key + "/ar", "float32", (8,), "small")
        x = ar[me].clone()
        works.append(dist.all_reduce(x, async_op=True))
        checks.append(lambda: check(x, reference(ar, "float32", "sum", S)[0], "all_reduce"))
        bc = ctx.inputs(key + "/bc", "int64", (5,))
        y = bc[me].clone()
        works.append(dist.broadcast(y, src=S - 1, async_op=True))
        checks.append(lambda: check(y, bc[S - 1], "broadcast"))
        ag = ctx.inputs(key + "/ag", "float64", (3,))
        outs = [torch.zeros(3, dtype=torch.float64) for _ in range(S)]
        works.append(dist.all_gather(outs, ag[me].clone(), async_op=True))
        checks.append(lambda: [check(outs[q], ag[q], f"all_gather {q}") for q in range(S)])
        agt = torch.zeros(S * 3, dtype=torch.float64)
        works.append(dist.all_gather_into_tensor(agt, ag[me].clone(), async_op=True))
        checks.append(lambda: check(agt, torch.cat(ag), "all_gather_into_tensor"))
        rs = ctx.inputs(key + "/rs", "int32", (S * 2,), "small")
        rso = torch.zeros(2, dtype=torch.int32)
        works.append(dist.reduce_scatter_tensor(rso, rs[me].clone(), op=dist.ReduceOp.MIN, async_op=True))
        checks.append(lambda: check(rso, reference(rs, "int32", "min", S)[0][2 * me:2 * me + 2],
                                    "reduce_scatter_tensor"))
        rsl = torch.zeros(2, dtype=torch.int32)
        works.append(dist.reduce_scatter(rsl, list(rs[me].clone().view(S, 2)), async_op=True))
        checks.append(lambda: check(rsl, reference(rs, "int32", "sum", S)[0].view(S, 2)[me], "reduce_scatter"))
        a2 = ctx.inputs(key + "/a2", "int16", (S * 2,))
        a2o = torch.zeros(S * 2, dtype=torch.int16)
        works.append(dist.all_to_all_single(a2o, a2[me].clone(), async_op=True))
        checks.append(lambda: check(a2o, torch.cat([a2[q][2 * me:2 * me + 2] for q in range(S)]),
                                    "all_to_all_single"))
        a2l = [torch.zeros(2, dtype=torch.int16) for _ in range(S)]
        works.append(dist.all_to_all(a2l, list(a2[me].clone().view(S, 2)), async_op=True))
        checks.append(lambda: [check(a2l[q], a2[q].view(S, 2)[me], f"all_to_all {q}") for q in range(S)])
        rd = ctx.inputs(key + "/rd", "float16", (4,), "small")
        z = rd[me].clone()
        works.append(dist.reduce(z, dst=0, async_op=True))
        checks.append(lambda: check(z, reference(rd, "float16", "sum", S)[0] if me == 0 else rd[me], "reduce"))
        gl = [torch.zeros(4, dtype=torch.float16) for _ in range(S)] if me == S - 1 else None
        works.append(dist.gather(rd[me].clone(), gl, dst=S - 1, async_op=True))
        checks.append(lambda: [check(gl[q], rd[q], f"gather {q}") for q in range(S)] if gl else None)
        sc = torch.zeros(4, dtype=torch.float16)
        works.append(dist.scatter(sc, [r.clone() for r in rd] if me == 0 else None, src=0, async_op=True))
        checks.append(lambda: check(sc, rd[me], "scatter"))
        works.append(dist.barrier(async_op=True))
        checks.append(lambda: None)
        if how == "wait_all":
            torch.futures.wait_all([w.get_future() for w in works])
            for w in works:
                expect(w.is_completed(), "is_completed() is False after its future completed")
        else:
            for w in reversed(works):
                if how == "wait":
                    expect(w.wait() in (True, None), "wait() returned something odd")
                else:
                    fut = w.get_future()
                    fut.wait()
                    fut.value()  # raises if the operation failed
                    expect(fut.done(), "the future is not done after wait()")
                expect(w.is_completed(), "is_completed() is False after wait")
        if how == "future":
            expect(works[0].get_future().value()[0] is x or torch.equal(works[0].get_future().value()[0], x),
                   "all_reduce's future value is not [the tensor]")
        for c in checks:
            c()
        return digest(x, y, agt)
    return fn


def mk_async_many(ctx):
    """24 all_reduces (four ReduceOps) in flight together, waited for in reverse order, half by
    wait() and half by their futures."""
    S, ops = ctx.size, ("sum", "max", "min", "prod")

    def fn(key):
        ins = [ctx.inputs(f"{key}/{i}", "float32", (3 + i,), regime(ops[i % 4])) for i in range(24)]
        xs = [ins[i][ctx.rank].clone() for i in range(24)]
        works = [dist.all_reduce(xs[i], op=reduce_op(ops[i % 4]), async_op=True) for i in range(24)]
        for i in reversed(range(24)):
            if i % 2:
                works[i].wait()
            else:
                works[i].get_future().wait()
        for i in range(24):
            check(xs[i], reference(ins[i], "float32", ops[i % 4], S)[0], f"all_reduce {i} ({ops[i % 4]})")
        return digest(*xs)
    return fn


def mk_async_then(ctx):
    S = ctx.size

    def fn(key):
        ins = ctx.inputs(key, "float64", (6,), "small")
        x = ins[ctx.rank].clone()
        fut = dist.all_reduce(x, async_op=True).get_future().then(lambda f: f.value()[0] * 2)
        got = fut.wait()
        check(got, reference(ins, "float64", "sum", S)[0] * 2, "a future's then()")
    return fn


def mk_async_stress(ctx):
    """300 rounds of four async all_reduces waited for in reverse order: this thread waits (and
    starts operations) while the group's completion thread waits for the earlier ones."""
    S = ctx.size

    def fn(key):
        ins = ctx.inputs(key, "int32", (4, 8), "small")
        total = reference(ins, "int32", "sum", S)[0]
        bad = 0
        for r in range(300):
            xs = [ins[ctx.rank][i].clone() for i in range(4)]
            works = [dist.all_reduce(x, async_op=True) for x in xs]
            for w in reversed(works):
                w.wait()
            bad += sum(not torch.equal(xs[i], total[i]) for i in range(4))
        expect(bad == 0, f"{bad} of 1200 all_reduce results wrong")
    return fn


def mk_async_then_nested(ctx):
    """A future's callback that starts another all_reduce and waits for that one's future (as
    PowerSGD's hook does), two levels deep."""
    S = ctx.size

    def fn(key):
        ins = ctx.inputs(key, "float64", (6,), "small")
        x, y, z = (ins[ctx.rank].clone() for _ in range(3))

        def inner(f):
            return dist.all_reduce(z, op=dist.ReduceOp.MAX, async_op=True).get_future().wait()[0]

        def outer(f):
            return dist.all_reduce(y, async_op=True).get_future().then(inner).wait() + f.value()[0]

        got = dist.all_reduce(x, async_op=True).get_future().then(outer).wait()
        total = reference(ins, "float64", "sum", S)[0]
        check(x, total, "the first all_reduce")
        check(y, total, "the all_reduce of the callback")
        check(z, reference(ins, "float64", "max", S)[0], "the all_reduce of the callback's callback")
        check(got, reference(ins, "float64", "max", S)[0] + total, "the chain's value")
    return fn


# ---------------------------------------------------------------------------------------
# 4. new_group: subsets of the ranks

def group_layout(S):
    """The groups every rank creates (the same calls everywhere, in order)."""
    if S == 4:
        return [[1, 3], [0, 2], [0, 2, 3], [0, 1, 2, 3]]
    if S == 3:
        return [[0, 2], [1], [0, 1, 2]]
    if S == 2:
        return [[1], [0], [0, 1]]
    return [[0]]


def suite_groups(ctx):
    return [("groups/create", mk_groups_create(ctx))] + [
        (f"groups/{'-'.join(map(str, ranks))}/{what}", mk_group_op(ctx, gi, what))
        for gi, ranks in enumerate(group_layout(ctx.size))
        for what in ("all_reduce", "all_reduce_int", "all_gather", "all_gather_into_tensor", "broadcast",
                     "reduce_scatter_tensor", "all_to_all_single", "reduce", "send_recv", "recv_any_source",
                     "barrier")] + [
        ("groups/interleaved_with_world", mk_group_interleaved(ctx)),
        ("groups/destroy", mk_group_destroy(ctx))]


_groups = []


def mk_groups_create(ctx):
    def fn(key):
        del _groups[:]
        for ranks in group_layout(ctx.size):
            g = dist.new_group(ranks, backend="commlib")
            _groups.append((ranks, g))
            if ctx.rank in ranks:
                expect(dist.get_rank(g) == ranks.index(ctx.rank), f"get_rank(group {ranks}) = {dist.get_rank(g)}")
                expect(dist.get_world_size(g) == len(ranks), f"get_world_size(group {ranks})")
                expect(dist.get_process_group_ranks(g) == ranks, "get_process_group_ranks")
                expect(dist.get_backend(g) == "commlib", f"the group's backend is {dist.get_backend(g)}")
            else:
                expect(g == dist.GroupMember.NON_GROUP_MEMBER, f"a non-member got a group for {ranks}")
    return fn


def mk_group_op(ctx, gi, what):
    me = ctx.rank

    def fn(key):
        need(len(_groups) > gi, "the groups were not created")
        ranks, g = _groups[gi]
        if me not in ranks:
            return None
        n = len(ranks)
        ins = {q: gen(ctx, key, q, "float32", (n * 2,), "small") for q in ranks}
        mine = ins[me].clone()
        if what == "all_reduce":
            dist.all_reduce(mine, group=g)
            check(mine, sum(ins[q] for q in ranks), "all_reduce in the group")
        elif what == "all_reduce_int":
            iv = {q: gen(ctx, key, q, "int64", (5,)) for q in ranks}
            x = iv[me].clone()
            dist.all_reduce(x, op=dist.ReduceOp.BXOR, group=g)
            check(x, functools.reduce(torch.bitwise_xor, [iv[q] for q in ranks]), "all_reduce BXOR in the group")
        elif what == "all_gather":
            outs = [torch.zeros(n * 2) for _ in ranks]
            dist.all_gather(outs, mine, group=g)
            for i, q in enumerate(ranks):
                check(outs[i], ins[q], f"all_gather: rank {q}'s block")
        elif what == "all_gather_into_tensor":
            out = torch.zeros(n * n * 2)
            dist.all_gather_into_tensor(out, mine, group=g)
            check(out, torch.cat([ins[q] for q in ranks]), "all_gather_into_tensor in the group")
        elif what == "broadcast":
            src = ranks[-1]  # a global rank
            dist.broadcast(mine, src=src, group=g)
            check(mine, ins[src], f"broadcast from global rank {src}")
        elif what == "reduce_scatter_tensor":
            out = torch.zeros(2)
            dist.reduce_scatter_tensor(out, mine, group=g)
            i = ranks.index(me)
            check(out, sum(ins[q] for q in ranks)[2 * i:2 * i + 2], "reduce_scatter_tensor in the group")
        elif what == "all_to_all_single":
            out = torch.zeros(n * 2)
            dist.all_to_all_single(out, mine, group=g)
            i = ranks.index(me)
            check(out, torch.cat([ins[q][2 * i:2 * i + 2] for q in ranks]), "all_to_all_single in the group")
        elif what == "reduce":
            dst = ranks[0]
            dist.reduce(mine, dst=dst, op=dist.ReduceOp.MAX, group=g)
            check(mine, torch.stack([ins[q] for q in ranks]).amax(0) if me == dst else ins[me],
                  f"reduce to global rank {dst}")
        elif what == "send_recv":
            if n == 1:
                return None
            i = ranks.index(me)
            right, left = ranks[(i + 1) % n], ranks[(i - 1) % n]  # global ranks
            w = dist.isend(mine, right, group=g)
            out = torch.zeros(n * 2)
            src = dist.recv(out, src=left, group=g)
            w.wait()
            expect(src == left, f"recv in the group returned {src}, not global rank {left}")
            check(out, ins[left], f"recv from global rank {left}")
        elif what == "recv_any_source":
            if n == 1:
                return None
            root = ranks[-1]
            if me != root:
                dist.send(mine, root, group=g)
            else:
                seen = []
                try:
                    for _ in range(n - 1):
                        out = torch.zeros(n * 2)
                        src = dist.recv(out, group=g)  # any source: returns the sender's global rank
                        if expect(src in ranks and src != root, f"recv in group {ranks} returned {src!r}"):
                            check(out, ins[src], f"the message of global rank {src}")
                            seen.append(src)
                    expect(sorted(seen) == ranks[:-1], f"senders {sorted(seen)}")
                finally:
                    dist.barrier(group=g)
                return None
            dist.barrier(group=g)
        elif what == "barrier":
            dist.barrier(group=g)
        return None
    return fn


def mk_group_interleaved(ctx):
    """Async operations on the world and on the groups in flight together."""
    S, me = ctx.size, ctx.rank

    def fn(key):
        need(_groups, "the groups were not created")
        world_in = ctx.inputs(key, "int32", (4,), "small")
        xw = world_in[me].clone()
        works, checks = [dist.all_reduce(xw, async_op=True)], []
        for gi, (ranks, g) in enumerate(_groups):
            if me in ranks:
                gin = {q: gen(ctx, f"{key}/{gi}", q, "int32", (3,), "small") for q in ranks}
                x = gin[me].clone()
                works.append(dist.all_reduce(x, group=g, async_op=True))
                checks.append((x, sum(gin[q] for q in ranks), f"group {ranks}"))
        for w in reversed(works):
            w.wait()
        check(xw, reference(world_in, "int32", "sum", S)[0], "the world's all_reduce")
        for x, want, what in checks:
            check(x, want.to(torch.int32), what)
    return fn


def mk_group_destroy(ctx):
    """destroy_process_group(group) of every group; a new group afterwards works."""
    S, me = ctx.size, ctx.rank

    def fn(key):
        need(_groups, "the groups were not created")
        for ranks, g in _groups:
            if me in ranks:
                dist.destroy_process_group(g)
        del _groups[:]
        ranks = list(range(S - 1, -1, -2))[::-1]  # the last rank and every second one before it
        g = dist.new_group(ranks, backend="commlib")
        if me in ranks:
            ins = {q: gen(ctx, key, q, "int32", (4,)) for q in ranks}
            x = ins[me].clone()
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=g)
            check(x, torch.stack([ins[q] for q in ranks]).amax(0), f"all_reduce in a new group {ranks}")
            dist.destroy_process_group(g)
        ins = ctx.inputs(key + "/world", "int32", (4,))
        x = ins[me].clone()
        dist.all_reduce(x, op=dist.ReduceOp.MIN)
        check(x, torch.stack(ins).amin(0), "the world's all_reduce after the groups were destroyed")
    return fn


# ---------------------------------------------------------------------------------------
# 5. errors: clear exceptions, never a hang, and the group still works afterwards

def suite_errors(ctx):
    S = ctx.size
    cases = []
    if S > 1:
        for what in ("all_reduce", "all_reduce_async", "all_reduce_future", "all_reduce_dtype", "all_reduce_premul",
                     "all_reduce_noncontig", "broadcast",
                     "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather", "reduce"):
            cases.append((f"errors/mismatch/{what}", mk_mismatch(ctx, what)))
    for dtype, op in (("float32", "band"), ("bfloat16", "bor"), ("float64", "bxor"), ("float16", "band"),
                      ("bool", "avg")):
        for what in ("all_reduce", "reduce_scatter_tensor", "reduce"):
            cases.append((f"errors/op_dtype/{what}/{dtype}/{op}", mk_bad_op(ctx, dtype, op, what)))
    for op in ("max", "min", "prod"):
        for what in ("all_reduce", "reduce_scatter_tensor", "reduce_scatter", "reduce"):
            cases.append((f"errors/complex/{what}/{op}", mk_complex_bad_op(ctx, op, what)))
    if S > 1:
        for how in ("shorter", "longer"):
            cases.append((f"errors/all_to_all_single/splits_disagree/{how}", mk_splits_disagree(ctx, how)))
    cases.append(("errors/monitored_barrier", mk_monitored_barrier(ctx)))
    cases.append(("errors/wrong_list_lengths", mk_wrong_lengths(ctx)))
    return cases


def mk_mismatch(ctx, what):
    """Rank 0 passes another shape (or dtype) than the others: every rank raises, none hangs, and
    the next operation works."""
    S, me = ctx.size, ctx.rank

    def fn(key):
        n = 6 if me == 0 else 4
        engine_op = {"all_gather_into_tensor": "all_gather", "reduce_scatter_tensor": "reduce_scatter",
                     "reduce": "all_reduce"}.get(what, "all_reduce" if what.startswith("all_reduce") else what)
        words = ("MismatchError", engine_op, "not issue the same operation")
        if what.startswith("all_reduce"):
            if what == "all_reduce_dtype":
                x = torch.ones(4, dtype=torch.float32 if me == 0 else torch.float64)
            elif what == "all_reduce_noncontig":
                x = torch.arange(2 * n, dtype=torch.float32)[::2]
            else:
                x = torch.arange(n, dtype=torch.float32)
            before = x.clone()
            if what in ("all_reduce", "all_reduce_dtype", "all_reduce_noncontig"):
                expect_raises(lambda: dist.all_reduce(x), what, words)
            elif what == "all_reduce_premul":
                expect_raises(lambda: dist.all_reduce(x, op=dist._make_nccl_premul_sum(3.0)), what,
                              words if premul_ok() else ["PREMUL_SUM"])
            elif what == "all_reduce_async":
                w = dist.all_reduce(x, async_op=True)
                expect_raises(lambda: w.wait(), "all_reduce(async_op=True).wait()", words)
            else:
                w = dist.all_reduce(x, async_op=True)
                expect_raises(lambda: w.get_future().wait(), "all_reduce's future.wait()", words)
            check(x, before, "the input after a failed all_reduce (must hold what it held before)")
        elif what == "broadcast":
            expect_raises(lambda: dist.broadcast(torch.ones(n), src=0), what, words)
        elif what == "all_gather_into_tensor":
            expect_raises(lambda: dist.all_gather_into_tensor(torch.zeros(S * n), torch.ones(n)), what, words)
        elif what == "reduce_scatter_tensor":
            expect_raises(lambda: dist.reduce_scatter_tensor(torch.zeros(n), torch.ones(S * n)), what, words)
        elif what == "all_gather":
            expect_raises(lambda: dist.all_gather([torch.zeros(n) for _ in range(S)], torch.ones(n)), what, words)
        elif what == "reduce":
            x = torch.arange(n, dtype=torch.float32)
            expect_raises(lambda: dist.reduce(x, dst=S - 1, op=dist._make_nccl_premul_sum(2.0)), what,
                          words if premul_ok() else ["PREMUL_SUM"])
            check(x, torch.arange(n, dtype=torch.float32), "the input after a failed reduce (PREMUL_SUM)")
        ins = ctx.inputs(key, "int64", (5,))
        x = ins[me].clone()
        dist.all_reduce(x, op=dist.ReduceOp.BOR)
        check(x, reference(ins, "int64", "bor", S)[0], "the all_reduce after the failed one")
    return fn


def mk_bad_op(ctx, dtype, op, what):
    """A ReduceOp the dtype has no meaning for: an error naming the op and the dtype (raised on
    every rank before anything moves), and the next operation works."""
    S, me = ctx.size, ctx.rank

    def fn(key):
        x = torch.ones(S * 2, dtype=T(dtype))
        if what == "all_reduce":
            call = lambda: dist.all_reduce(x, op=reduce_op(op))  # noqa: E731
        elif what == "reduce_scatter_tensor":
            call = lambda: dist.reduce_scatter_tensor(torch.zeros(2, dtype=T(dtype)), x, op=reduce_op(op))  # noqa
        else:
            call = lambda: dist.reduce(x, dst=0, op=reduce_op(op))  # noqa: E731
        expect_raises(call, f"{what} {op} on {dtype}", (op, dtype))
        ins = ctx.inputs(key, "float32", (3,), "small")
        y = ins[me].clone()
        dist.all_reduce(y)
        check(y, reference(ins, "float32", "sum", S)[0], "the all_reduce after the refused one")
    return fn


def mk_complex_bad_op(ctx, op, what):
    """MAX / MIN / PRODUCT have no meaning on complex numbers (they would apply to the real and
    imaginary parts apart): refused, naming the op."""
    S, me = ctx.size, ctx.rank

    def fn(key):
        x = torch.ones(S * 2, dtype=torch.complex64)
        before = x.clone()
        rop = reduce_op(op)
        if what == "all_reduce":
            call = lambda: dist.all_reduce(x, op=rop)  # noqa: E731
        elif what == "reduce_scatter_tensor":
            call = lambda: dist.reduce_scatter_tensor(torch.zeros(2, dtype=torch.complex64), x, op=rop)  # noqa
        elif what == "reduce_scatter":
            call = lambda: dist.reduce_scatter(torch.zeros(2, dtype=torch.complex64), list(x.view(S, 2)), op=rop)  # noqa
        else:
            call = lambda: dist.reduce(x, dst=0, op=rop)  # noqa: E731
        name = {"max": "max", "min": "min", "prod": "prod"}[op]
        expect_raises(call, f"{what} {op} on complex64", (name, "complex"))
        check(x, before, "the input after the refused operation")
        ins = ctx.inputs(key, "complex64", (3,))
        y = ins[me].clone()
        dist.all_reduce(y)
        check(y, reference(ins, "complex64", "sum", S)[0], "the all_reduce after the refused one")
    return fn


def mk_splits_disagree(ctx, how):
    """Uneven all_to_all_single where rank 1 expects one row more (or less) from rank 0 than rank
    0 sends: rank 1 raises a MismatchError naming the receive, nobody hangs, and the next
    operation works (rank 0's send went out: it has nothing to report)."""
    S, me = ctx.size, ctx.rank

    def fn(key):
        in_splits = [1] * S
        out_splits = [1] * S
        if me == 0:
            in_splits[1] = 2
        if me == 1:
            out_splits[0] = 3 if how == "shorter" else 1
        x = torch.ones(sum(in_splits), 2)
        out = torch.zeros(sum(out_splits), 2)
        call = lambda: dist.all_to_all_single(out, x, out_splits, in_splits)  # noqa: E731
        if me == 1:
            expect_raises(call, "all_to_all_single with splits its sender disagrees with",
                          ("MismatchError", "recv", "rank 0"))
        else:
            call()
        ins = ctx.inputs(key, "float32", (3,), "small")
        y = ins[me].clone()
        dist.all_reduce(y)
        check(y, reference(ins, "float32", "sum", S)[0], "the all_reduce after the failed exchange")
    return fn


def mk_monitored_barrier(ctx):
    def fn(key):
        expect_raises(lambda: dist.monitored_barrier(timeout=datetime.timedelta(seconds=5)), "monitored_barrier",
                      ("monitored_barrier",))
        dist.barrier()
    return fn


def mk_wrong_lengths(ctx):
    S = ctx.size

    def fn(key):
        expect_raises(lambda: dist.all_gather([torch.zeros(2) for _ in range(S + 1)], torch.ones(2)),
                      "all_gather with size+1 outputs", ("gather", f"{S + 1} output"))
        expect_raises(lambda: dist.reduce_scatter(torch.zeros(2), [torch.ones(2) for _ in range(S + 1)]),
                      "reduce_scatter with size+1 inputs", ("reduce_scatter", f"{S + 1} input"))
        expect_raises(lambda: dist.all_to_all([torch.zeros(2) for _ in range(S + 1)],
                                              [torch.ones(2) for _ in range(S + 1)]),
                      "all_to_all with size+1 blocks", ("all_to_all",))
        expect_raises(lambda: dist.all_to_all_single(torch.zeros(S * 2), torch.ones(S * 2), [2] * S, [1] * S),
                      "all_to_all_single with split sizes that do not cover the input", ("split",))
        dist.barrier()
    return fn


# ---------------------------------------------------------------------------------------
# 6. coalescing

def suite_coalescing(ctx):
    return [("coalescing/all_reduce/async", mk_coalescing(ctx, "all_reduce", True, None)),
            ("coalescing/all_reduce/sync", mk_coalescing(ctx, "all_reduce", False, None)),
            ("coalescing/all_reduce/device", mk_coalescing(ctx, "all_reduce", True, "cpu")),
            ("coalescing/all_gather_into_tensor", mk_coalescing(ctx, "all_gather_into_tensor", True, None)),
            ("coalescing/reduce_scatter_tensor", mk_coalescing(ctx, "reduce_scatter_tensor", True, None)),
            ("coalescing/p2p_device", mk_coalescing(ctx, "p2p", True, "cpu")),
            ("coalescing/all_reduce_coalesced", mk_coalesced_api(ctx, "all_reduce_coalesced")),
            ("coalescing/all_gather_coalesced", mk_coalesced_api(ctx, "all_gather_coalesced")),
            ("functional/all_reduce", mk_functional(ctx, "all_reduce")),
            ("functional/all_gather_tensor", mk_functional(ctx, "all_gather_tensor")),
            ("functional/reduce_scatter_tensor", mk_functional(ctx, "reduce_scatter_tensor"))]


def mk_coalescing(ctx, what, async_ops, device):
    S, me = ctx.size, ctx.rank

    def fn(key):
        ins = [ctx.inputs(f"{key}/{i}", "float32", (S * (i + 1),), "small") for i in range(3)]
        dev = torch.device(device) if device else None
        if what == "all_reduce":
            xs = [ins[i][me].clone() for i in range(3)]
            with dist._coalescing_manager(device=dev, async_ops=async_ops) as cm:
                for x in xs:
                    dist.all_reduce(x, op=dist.ReduceOp.MAX)
            if async_ops:
                cm.wait()
            for i in range(3):
                check(xs[i], reference(ins[i], "float32", "max", S)[0], f"coalesced all_reduce {i}")
            return digest(*xs)
        if what == "all_gather_into_tensor":
            outs = [torch.zeros(S * S * (i + 1)) for i in range(3)]
            with dist._coalescing_manager(device=dev, async_ops=async_ops) as cm:
                for i in range(3):
                    dist.all_gather_into_tensor(outs[i], ins[i][me].clone())
            cm.wait()
            for i in range(3):
                check(outs[i], torch.cat(ins[i]), f"coalesced all_gather_into_tensor {i}")
            return digest(*outs)
        if what == "reduce_scatter_tensor":
            outs = [torch.zeros(i + 1) for i in range(3)]
            with dist._coalescing_manager(device=dev, async_ops=async_ops) as cm:
                for i in range(3):
                    dist.reduce_scatter_tensor(outs[i], ins[i][me].clone())
            cm.wait()
            for i in range(3):
                want = reference(ins[i], "float32", "sum", S)[0]
                check(outs[i], want[(i + 1) * me:(i + 1) * (me + 1)], f"coalesced reduce_scatter_tensor {i}")
            return None
        # p2p inside a coalescing manager with a device (what batch_isend_irecv does)
        if S == 1:
            return None
        out = torch.zeros(S)
        with dist._coalescing_manager(device=dev, async_ops=True) as cm:
            dist.isend(ins[0][me].clone(), (me + 1) % S)
            dist.irecv(out, (me - 1) % S)
        cm.wait()
        check(out, ins[0][(me - 1) % S], "coalesced p2p")
        return None
    return fn


def mk_coalesced_api(ctx, what):
    S, me = ctx.size, ctx.rank

    def fn(key):
        ins = [ctx.inputs(f"{key}/{i}", "float64", (i + 2,), "small") for i in range(3)]
        if what == "all_reduce_coalesced":
            xs = [ins[i][me].clone() for i in range(3)]
            dist.all_reduce_coalesced(xs)
            for i in range(3):
                check(xs[i], reference(ins[i], "float64", "sum", S)[0], f"all_reduce_coalesced {i}")
        else:
            outs = [[torch.zeros(i + 2, dtype=torch.float64) for i in range(3)] for _ in range(S)]
            dist.all_gather_coalesced(outs, [ins[i][me].clone() for i in range(3)])
            for q in range(S):
                for i in range(3):
                    check(outs[q][i], ins[i][q], f"all_gather_coalesced rank {q} tensor {i}")
    return fn


def mk_functional(ctx, what):
    """torch.distributed._functional_collectives (what torch.compile'd code calls)."""
    S, me = ctx.size, ctx.rank

    def fn(key):
        import torch.distributed._functional_collectives as funcol
        ins = ctx.inputs(key, "float32", (S * 2,), "small")
        group = dist.group.WORLD
        if what == "all_reduce":
            got = funcol.wait_tensor(funcol.all_reduce(ins[me].clone(), "sum", group))
            check(got, reference(ins, "float32", "sum", S)[0], "functional all_reduce")
        elif what == "all_gather_tensor":
            got = funcol.wait_tensor(funcol.all_gather_tensor(ins[me].clone(), 0, group))
            check(got, torch.cat(ins), "functional all_gather_tensor")
        else:
            got = funcol.wait_tensor(funcol.reduce_scatter_tensor(ins[me].clone(), "sum", 0, group))
            check(got, reference(ins, "float32", "sum", S)[0][2 * me:2 * me + 2], "functional reduce_scatter_tensor")
    return fn


# ---------------------------------------------------------------------------------------
# 7. DDP over the commlib group

DDP_VARIANTS = ("plain", "no_sync", "find_unused", "small_buckets", "bucket_view", "allreduce_hook",
                "fp16_hook", "bf16_hook", "powersgd")
DDP_STEPS = 3
GLOBAL_BATCH = 24  # splits evenly at 2, 3 and 4 ranks


def suite_ddp(ctx):
    import torch as t
    # torch's PowerSGD hook calls torch.cuda.synchronize(the tensors' device) whenever CUDA is
    # available, which fails for CPU tensors (torch's own bug, gloo alike): on a GPU machine
    # PowerSGD is trained on CUDA by test_torch_training instead
    variants = [v for v in DDP_VARIANTS if not (v == "powersgd" and t.cuda.is_available())]
    return [(f"ddp/{v}", mk_ddp(ctx, v)) for v in variants]


def _net(branch, unused):
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = nn.Linear(8, 16)
            self.l2 = nn.Linear(16, 4)
            self.branch = nn.Linear(16, 16) if branch else None  # used on even steps only
            self.unused = nn.Linear(4, 4) if unused else None  # never used

        def forward(self, x, step=0):
            h = torch.relu(self.l1(x))
            if self.branch is not None and step % 2 == 0:
                h = torch.relu(self.branch(h))
            return self.l2(h)
    return Net()


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def mk_ddp(ctx, variant):
    """A small MLP under DDP over the commlib group, each rank on its slice of the global batch;
    after every step the parameters are the same bytes on every rank (their hashes, gathered
    over mpi4py) and, except with the lossy hooks, within 1e-5 (relative) of one process
    training on the global batch.  fp16/bf16 hooks: the reference runs the hook's arithmetic
    (_compressed_reference_grads); the largest difference within LOSSY_TOL of the largest
    parameter.  PowerSGD
    (rank 1, compression from the third step): the first two steps within 1e-5, then identical
    across ranks and off the uncompressed run (the hook really compresses)."""
    S, me = ctx.size, ctx.rank

    def fn(key):
        from torch.nn.parallel import DistributedDataParallel as DDP
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
        branch = unused = variant == "find_unused"
        steps = 5 if variant == "powersgd" else DDP_STEPS + (1 if variant == "find_unused" else 0)
        torch.manual_seed(ctx.seed + 1000 * me)  # every rank starts elsewhere: DDP broadcasts rank 0's
        model = _net(branch, unused)
        torch.manual_seed(ctx.seed)
        ref = _net(branch, unused)
        torch.manual_seed(ctx.seed + 0)  # rank 0's start
        start = _net(branch, unused)
        ref.load_state_dict(start.state_dict())
        kw = {}
        if variant == "find_unused":
            kw["find_unused_parameters"] = True
        if variant in ("small_buckets", "bucket_view"):
            kw["bucket_cap_mb"] = 0.0005  # ~500 bytes: a bucket or two per layer
        if variant == "bucket_view":
            kw["gradient_as_bucket_view"] = True
        ddp = DDP(model, **kw)
        check(_flat(ddp.module), _flat(start), "DDP's start (rank 0's parameters, broadcast)")
        state = None
        if variant == "allreduce_hook":
            ddp.register_comm_hook(None, default_hooks.allreduce_hook)
        elif variant == "fp16_hook":
            ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif variant == "bf16_hook":
            # (DDP refuses bf16_compress_hook by its name where torch has no CUDA + NCCL; the hook
            # itself only casts to bfloat16 around an all_reduce of the group's backend)
            def bf16_hook_on_cpu(state_, bucket):
                return default_hooks.bf16_compress_hook(state_, bucket)
            ddp.register_comm_hook(None, bf16_hook_on_cpu)
        elif variant == "powersgd":
            state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1,
                                                start_powerSGD_iter=2, min_compression_rate=0.5,
                                                use_error_feedback=True, warm_start=True)
            ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
        lossy = variant in ("fp16_hook", "bf16_hook")
        half = torch.float16 if variant == "fp16_hook" else torch.bfloat16
        tol = LOSSY_TOL.get(variant, 1e-5)
        b = GLOBAL_BATCH // S
        micro = 2 if variant == "no_sync" else 1
        for step in range(steps):
            g = torch.Generator().manual_seed(ctx.seed * 31 + step)
            X = torch.randn(micro, GLOBAL_BATCH, 8, generator=g)
            Y = torch.randn(micro, GLOBAL_BATCH, 4, generator=g)
            opt.zero_grad()
            ref_opt.zero_grad()
            for m in range(micro):
                xs, ys = X[m, me * b:(me + 1) * b], Y[m, me * b:(me + 1) * b]
                ctxm = ddp.no_sync() if m < micro - 1 else _null()
                with ctxm:
                    torch.nn.functional.mse_loss(ddp(xs, step=step), ys).backward()
                if lossy:
                    _compressed_reference_grads(ref, X[m], Y[m], step, S, b, half)
                else:
                    torch.nn.functional.mse_loss(ref(X[m], step=step), Y[m]).backward()
            opt.step()
            ref_opt.step()
            flat, want = _flat(ddp.module), _flat(ref)
            hashes = ctx.world.allgather(digest(flat))
            expect(len(set(hashes)) == 1, f"step {step}: the ranks' parameters differ: {hashes}")
            expect(bool(torch.isfinite(flat).all()), f"step {step}: parameters not finite")
            if variant != "powersgd" or step < 2:
                err = _off(flat, want, lossy)
                if os.environ.get("COMMLIB_TEST_VERBOSE") and me == 0:
                    print(f"{key} step {step}: {err:.3g} off", file=sys.stderr, flush=True)
                expect(err <= tol, f"step {step}: the parameters are {err:.3g} off one process's training on the "
                                   f"global batch (allowed {tol}, {'of the largest' if lossy else 'relative'})")
            if variant == "find_unused":
                check(ddp.module.unused.weight.detach(), start.unused.weight.detach(), "the unused layer")
        if variant == "powersgd":
            err = _off(flat, want, False)
            expect(err > 1e-5, f"PowerSGD's training is the uncompressed one ({err:.3g} off): the hook did not "
                               "compress")
            expect(state.iter >= steps, f"PowerSGDState.iter = {state.iter}")
        return digest(flat)
    return fn


# The lossy hooks' reference runs the hook's arithmetic itself (below), so the ranks' parameters
# follow it to within the rounding the order of the sum may change: one unit in the last place of
# a gradient element, times the learning rate, per step - far under these bounds (of the largest
# parameter).  Against uncompressed training the bound would have to cover a ReLU that the
# rounding flips, which moves a parameter by as much as the gradient itself (a seed of CI did).
LOSSY_TOL = {"fp16_hook": 1e-5, "bf16_hook": 1e-4}


def _compressed_reference_grads(ref, X, Y, step, S, b, half):
    """ref's gradients as DDP's fp16/bf16 compress hooks make them for S ranks on slices of b
    of the batch: each rank's gradient cast to half and divided by S there, the S summed in half
    (rounded after every addition, as commlib reduces half types), and cast back."""
    total = None
    for r in range(S):
        for p in ref.parameters():
            p.grad = None
        torch.nn.functional.mse_loss(ref(X[r * b:(r + 1) * b], step=step), Y[r * b:(r + 1) * b]).backward()
        part = [p.grad.to(half).div_(S) for p in ref.parameters()]
        total = part if total is None else [t.add_(q) for t, q in zip(total, part)]
    for p, t in zip(ref.parameters(), total):
        p.grad = t.to(p.dtype)


def _off(got, want, of_largest):
    """How far got is from want: elementwise relative (below 1e-3 in magnitude: absolute / 1e-3),
    or the largest difference relative to the largest parameter (the lossy hooks round every
    gradient to 8 or 11 bits, which moves a small parameter by much of itself)."""
    if of_largest:
        return ((got - want).abs().max() / want.abs().max()).item()
    return ((got - want).abs() / want.abs().clamp_min(1e-3)).max().item()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------
# 8. init_process_group("cpu:gloo,cuda:commlib"): CPU tensors go to gloo

def suite_mixed(ctx):
    cases = [("mixed/backends", mk_mixed_backends(ctx))]
    for what in ("all_reduce", "all_reduce_async", "broadcast", "all_gather", "all_gather_into_tensor",
                 "reduce_scatter_tensor", "all_to_all_single", "send_recv", "barrier",
                 "commlib_backend_routes_cpu_to_gloo", "commlib_subgroup"):
        if what != "send_recv" or ctx.size > 1:
            cases.append((f"mixed/{what}", mk_mixed_op(ctx, what)))
    return cases


def mk_mixed_backends(ctx):
    """torch makes the commlib group the whole group (a Python process group replaces torch's
    wrapper); it holds gloo for the CPU, and CPU operations never reach commlib's engine."""
    def fn(key):
        import collectives.torch as ct
        from collectives.mpi import stat
        expect(dist.get_backend() == "cpu:gloo,cuda:commlib", f"get_backend() = {dist.get_backend()!r}")
        pg = dist.group.WORLD
        need(isinstance(pg, ct.ProcessGroupCommlib), f"the group is a {type(pg).__name__}")
        cpu = pg._others.get("cpu")
        expect(type(cpu).__name__ == "ProcessGroupGloo", f"the CPU backend is {type(cpu).__name__}")
        before = stat("engine.ops")
        x = torch.ones(4)
        dist.all_reduce(x)
        dist.broadcast(x, src=0)
        dist.all_gather_into_tensor(torch.zeros(4 * ctx.size), x)
        expect(stat("engine.ops") == before, f"{stat('engine.ops') - before} CPU operations reached the engine")
        check(x, torch.full((4,), float(ctx.size)), "all_reduce")
    return fn


def mk_mixed_op(ctx, what):
    S, me = ctx.size, ctx.rank

    def fn(key):
        ins = ctx.inputs(key, "float32", (S * 3,), "small")
        x = ins[me].clone()
        total = reference(ins, "float32", "sum", S)[0]
        if what == "all_reduce":
            dist.all_reduce(x)
            check(x, total, "all_reduce")
        elif what == "all_reduce_async":
            w = dist.all_reduce(x, op=dist.ReduceOp.MAX, async_op=True)
            w.wait()
            check(x, reference(ins, "float32", "max", S)[0], "all_reduce MAX async")
        elif what == "broadcast":
            dist.broadcast(x, src=S - 1)
            check(x, ins[S - 1], "broadcast")
        elif what == "all_gather":
            outs = [torch.zeros(S * 3) for _ in range(S)]
            dist.all_gather(outs, x)
            for q in range(S):
                check(outs[q], ins[q], f"all_gather {q}")
        elif what == "all_gather_into_tensor":
            out = torch.zeros(S * S * 3)
            dist.all_gather_into_tensor(out, x)
            check(out, torch.cat(ins), "all_gather_into_tensor")
        elif what == "reduce_scatter_tensor":
            out = torch.zeros(3)
            dist.reduce_scatter_tensor(out, x)
            check(out, total[3 * me:3 * me + 3], "reduce_scatter_tensor")
        elif what == "all_to_all_single":
            out = torch.zeros(S * 3)
            dist.all_to_all_single(out, x)
            check(out, torch.cat([ins[q][3 * me:3 * me + 3] for q in range(S)]), "all_to_all_single")
        elif what == "send_recv":
            w = dist.isend(x, (me + 1) % S)
            out = torch.zeros(S * 3)
            expect(dist.recv(out, src=(me - 1) % S) == (me - 1) % S, "recv's source")
            w.wait()
            check(out, ins[(me - 1) % S], "recv")
        elif what == "barrier":
            dist.barrier()
        elif what == "commlib_backend_routes_cpu_to_gloo":
            # the commlib backend itself, handed CPU tensors, passes them to gloo
            from collectives.mpi import stat
            before = stat("engine.ops")
            w = dist.group.WORLD.allreduce([x])
            w.wait()
            check(x, total, "the commlib backend's allreduce of a CPU tensor")
            expect(stat("engine.ops") == before, "the CPU allreduce reached commlib's engine")
        elif what == "commlib_subgroup":
            g = dist.new_group(list(range(S)), backend="commlib")
            expect(dist.get_backend(g) == "commlib", f"the group's backend is {dist.get_backend(g)}")
            from collectives.mpi import stat
            before = stat("engine.ops")
            dist.all_reduce(x, op=dist.ReduceOp.MIN, group=g)
            expect(stat("engine.ops") > before, "the commlib group's all_reduce did not reach commlib's engine")
            check(x, reference(ins, "float32", "min", S)[0], "all_reduce MIN over a commlib group")
            y = torch.zeros(S)
            dist.all_reduce(y, group=g)
            dist.destroy_process_group(g)
    return fn


# ---------------------------------------------------------------------------------------

def import_torch():
    """Binds the module's torch and dist (plan() works without them)."""
    global torch, dist
    import torch as _torch
    import torch.distributed as _dist
    torch, dist = _torch, _dist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--level", choices=("full", "light"), default="full")
    ap.add_argument("--suites", default="matrix")
    ap.add_argument("--init", default="commlib")
    args = ap.parse_args()
    suites = [s for s in args.suites.split(",") if s]

    import_torch()
    torch.set_num_threads(1)
    import collectives
    import collectives.torch  # noqa: F401 - registers "commlib", fills RANK / WORLD_SIZE from MPI
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    dist.init_process_group(args.init, timeout=datetime.timedelta(seconds=60))
    ctx = Ctx(world.Get_size(), args.level, suites, args.seed, args.init)
    ctx.rank, ctx.world = world.Get_rank(), world
    if ctx.rank == 0:
        print(f"seed {args.seed} ranks {ctx.size} init {args.init} backend {dist.get_backend()} "
              f"torch {torch.__version__}", flush=True)
        print(f"collectives {os.path.dirname(os.path.abspath(collectives.__file__))}", flush=True)

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
        print(f"summary ranks={ctx.size} cases={len(verdicts)} failed={failed} seed={args.seed} "
              f"seconds={time.monotonic() - t_start:.1f}", flush=True)
    failed = world.bcast(failed, root=0)
    world.Barrier()
    if failed:
        # a failed case may have left an operation that never ends: leave without waiting for it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
