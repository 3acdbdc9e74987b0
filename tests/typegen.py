"""Seeded random MPI derived-datatype trees (mpi4py), the Python twin of tests/c/dtype_fuzz.c.

    gen = TypeGen(seed=123)
    t = gen.generate()          # GeneratedType(dtype, desc, regular)
    ... t.dtype is committed; t.desc describes the tree ...
    t.free()

Every constructor is used: contiguous, vector, hvector, indexed, hindexed, indexed_block,
hindexed_block, struct, subarray (C and Fortran order, 1-4 dims), resized and dup, over
CHAR, BYTE, SHORT, INT, FLOAT, DOUBLE, INT64_T, C_DOUBLE_COMPLEX leaves, now and then the
pair types (DOUBLE_INT, SHORT_INT, ...), which have holes, and rarely others (LONG_DOUBLE,
C_BOOL, AINT, PACKED, ...; allow_long_double=False leaves out the x87 long double ones).  Most trees ("regular" ones) are
built from choices that reduce to a strided form (regular vectors, subarrays, evenly spaced
indexed, back-to-back structs); the rest may be irregular (random displacements, gaps,
overlaps, zero-length blocks, zero or negative extents).  Intermediate types are freed as
soon as the next level is built, so only the returned type needs freeing.
"""
import random
from dataclasses import dataclass

from mpi4py import MPI

FOOTPRINT_MAX = 192 * 1024  # per element: |extent|, true extent and size stay below this

BASIC_LEAVES = [
    ("CHAR", MPI.CHAR), ("BYTE", MPI.BYTE), ("SHORT", MPI.SHORT), ("INT", MPI.INT),
    ("FLOAT", MPI.FLOAT), ("DOUBLE", MPI.DOUBLE), ("INT64_T", MPI.INT64_T),
    ("C_DOUBLE_COMPLEX", MPI.C_DOUBLE_COMPLEX),
]
PAIR_LEAVES = [
    ("DOUBLE_INT", MPI.DOUBLE_INT), ("SHORT_INT", MPI.SHORT_INT),
    ("FLOAT_INT", MPI.FLOAT_INT), ("2INT", MPI.TWOINT),
    ("LONG_INT", MPI.LONG_INT), ("LONG_DOUBLE_INT", MPI.LONG_DOUBLE_INT),
]
RARE_LEAVES = [
    ("LONG_DOUBLE", MPI.LONG_DOUBLE), ("C_BOOL", MPI.C_BOOL), ("AINT", MPI.AINT),
    ("PACKED", MPI.PACKED), ("WCHAR", MPI.WCHAR), ("UINT8_T", MPI.UINT8_T),
    ("UNSIGNED_LONG_LONG", MPI.UNSIGNED_LONG_LONG), ("COUNT", MPI.COUNT),
    ("C_LONG_DOUBLE_COMPLEX", MPI.C_LONG_DOUBLE_COMPLEX),
]

OPS = ["contig", "vector", "hvector", "indexed", "hindexed", "indexed_block",
       "hindexed_block", "struct", "subarray", "resized", "dup"]
WEIGHTS_REGULAR = [12, 16, 12, 8, 6, 8, 6, 8, 12, 8, 4]
WEIGHTS_IRREGULAR = [6, 8, 8, 12, 12, 8, 8, 14, 8, 10, 4]


@dataclass
class Info:
    lb: int
    extent: int
    true_lb: int
    true_extent: int
    size: int

    @classmethod
    def of(cls, dt):
        lb, ext = dt.Get_extent()
        tlb, text = dt.Get_true_extent()
        return cls(lb, ext, tlb, text, dt.Get_size())

    @property
    def span(self):
        """Bytes that keep copies of the type apart without overlap."""
        return max(abs(self.extent), self.true_extent, 1)


@dataclass
class GeneratedType:
    dtype: MPI.Datatype
    desc: str
    regular: bool

    def info(self):
        return Info.of(self.dtype)

    def free(self):
        if self.dtype != MPI.DATATYPE_NULL:
            self.dtype.Free()


class _Node:
    __slots__ = ("dtype", "desc", "derived")

    def __init__(self, dtype, desc, derived):
        self.dtype, self.desc, self.derived = dtype, desc, derived

    def release(self):
        if self.derived:
            self.dtype.Free()
            self.derived = False


class TypeGen:
    """Random datatype trees from one seed (the same seed gives the same trees)."""

    def __init__(self, seed, max_depth=4, regular_p=0.8, allow_pairs=True,
                 allow_nonpositive_extent=True, allow_long_double=True):
        self.seed = seed
        self.allow_long_double = allow_long_double
        self.rng = random.Random(seed)
        self.max_depth = max_depth
        self.regular_p = regular_p
        self.allow_pairs = allow_pairs
        self.allow_nonpositive_extent = allow_nonpositive_extent

    # -- helpers -----------------------------------------------------------------------
    def _chance(self, p):
        return self.rng.random() < p

    def _ri(self, lo, hi):
        return lo if hi <= lo else self.rng.randint(lo, hi)

    def _leaf(self, allow_pairs):
        pick = None
        if self._chance(0.04):
            pick = self.rng.choice(RARE_LEAVES)
        elif allow_pairs and self.allow_pairs and self._chance(0.06):
            pick = self.rng.choice(PAIR_LEAVES)
        if pick and not self.allow_long_double and "LONG_DOUBLE" in pick[0]:
            pick = None
        name, dt = pick or self.rng.choice(BASIC_LEAVES)
        return _Node(dt, name, False)

    def _count(self, hi, allow_zero=True):
        if allow_zero and self._chance(0.02):
            return 0
        return self._ri(1, hi)

    # -- generation --------------------------------------------------------------------
    def generate(self):
        """A new committed random type; the caller frees it (GeneratedType.free)."""
        regular = self._chance(self.regular_p)
        node = self._gen(0, regular)
        if not node.derived:
            inner = node
            node = _Node(inner.dtype.Create_contiguous(1), f"contiguous(1, {inner.desc})", True)
        node.dtype.Commit()
        return GeneratedType(node.dtype, node.desc, regular)

    def _gen(self, depth, regular):
        leaf_p = 0.0 if depth == 0 else 0.25 + 0.15 * depth
        if depth >= self.max_depth or self._chance(leaf_p):
            return self._leaf(not regular or self._chance(0.5))
        w = WEIGHTS_REGULAR if regular else WEIGHTS_IRREGULAR
        op = self.rng.choices(OPS, weights=w)[0]
        child = self._gen(depth + 1, regular)
        ci = Info.of(child.dtype)
        self._depth = depth
        new, desc = getattr(self, "_op_" + op)(child, ci, regular)
        child.release()
        ni = Info.of(new)
        if (abs(ni.extent) > FOOTPRINT_MAX or ni.true_extent > FOOTPRINT_MAX
                or ni.size > FOOTPRINT_MAX):
            new.Free()
            return self._leaf(True)
        if not self.allow_nonpositive_extent and ni.extent <= 0:
            new.Free()
            return self._leaf(False)
        return _Node(new, desc, True)

    def _room(self, ci):
        return max(1, FOOTPRINT_MAX // ci.span)

    def _op_contig(self, c, ci, regular):
        n = self._count(min(self._room(ci), 6))
        return c.dtype.Create_contiguous(n), f"contiguous({n}, {c.desc})"

    def _op_vector(self, c, ci, regular):
        cnt, bl = self._count(5), self._ri(1, 3)
        if regular or self._chance(0.6):
            stride = bl + self._ri(0, 3)
        else:
            stride = self._ri(0, bl + 3)
        if self._chance(0.2):
            stride = -stride
        if cnt * (abs(stride) + bl) > self._room(ci):
            cnt = bl = 1
        return (c.dtype.Create_vector(cnt, bl, stride),
                f"vector(count={cnt}, bl={bl}, stride={stride}, {c.desc})")

    def _op_hvector(self, c, ci, regular):
        cnt, bl = self._count(5), self._ri(1, 3)
        span = ci.span
        if regular or self._chance(0.6):
            stride = (bl + self._ri(0, 2)) * span
            if self._chance(0.3):
                stride += self._ri(1, 7)
            if ci.extent != span and ci.extent > 0 and self._chance(0.3):
                stride = bl * ci.extent
        else:
            stride = self._ri(0, (bl + 2) * span)
        if self._chance(0.2):
            stride = -stride
        if cnt * (abs(stride) // span + bl + 1) > self._room(ci):
            cnt = bl = 1
        return (c.dtype.Create_hvector(cnt, bl, stride),
                f"hvector(count={cnt}, bl={bl}, stride={stride}B, {c.desc})")

    def _indexed_common(self, c, ci, regular, hetero, blockk):
        span = ci.span
        cnt = self._count(5)
        even = self._chance(0.85 if regular else 0.3)
        bl0 = self._ri(1, 3)
        cur = self._ri(-3, 3)
        step = bl0 + self._ri(0, 3)
        if self._chance(0.2):
            step = -step
        padb = self._ri(1, 5) if hetero and self._chance(0.3) else 0
        if step < 0:
            padb = -padb
        bls, idisp, bdisp = [], [], []
        for i in range(cnt):
            bls.append(bl0 if (even or blockk) else self._ri(1 if regular else 0, 3))
            if even:
                d = cur + i * step
                idisp.append(d)
                bdisp.append(d * span + i * padb)
            elif self._chance(0.9 if regular else 0.7):
                idisp.append(cur)
                bdisp.append(cur * span + (self._ri(0, 5) if i else 0))
                cur += bls[i] + self._ri(0, 4)
            else:
                d = self._ri(-8, 8)
                idisp.append(d)
                bdisp.append(d * span + self._ri(-3, 3))
        reach = max([abs(d) + 4 for d in idisp], default=0)
        if reach * 2 > self._room(ci):
            cnt, bls, idisp, bdisp = 1, [1], [0], [0]
        return cnt, bls, idisp, bdisp

    def _op_indexed(self, c, ci, regular):
        cnt, bls, idisp, _ = self._indexed_common(c, ci, regular, False, False)
        return (c.dtype.Create_indexed(bls, idisp),
                f"indexed(count={cnt}, bls={bls}, displs={idisp}, {c.desc})")

    def _op_hindexed(self, c, ci, regular):
        cnt, bls, _, bdisp = self._indexed_common(c, ci, regular, True, False)
        return (c.dtype.Create_hindexed(bls, bdisp),
                f"hindexed(count={cnt}, bls={bls}, displsB={bdisp}, {c.desc})")

    def _op_indexed_block(self, c, ci, regular):
        cnt, bls, idisp, _ = self._indexed_common(c, ci, regular, False, True)
        bl = bls[0] if bls else 1
        return (c.dtype.Create_indexed_block(bl, idisp),
                f"indexed_block(count={cnt}, bl={bl}, displs={idisp}, {c.desc})")

    def _op_hindexed_block(self, c, ci, regular):
        cnt, bls, _, bdisp = self._indexed_common(c, ci, regular, True, True)
        bl = bls[0] if bls else 1
        return (c.dtype.Create_hindexed_block(bl, bdisp),
                f"hindexed_block(count={cnt}, bl={bl}, displsB={bdisp}, {c.desc})")

    def _op_struct(self, c, ci, regular):
        nf = self._ri(1, 4)
        packed = self._chance(0.7 if regular else 0.2)
        used = False
        end = 0
        bls, disps, types, descs = [], [], [], []
        for i in range(nf):
            if not used and (i == nf - 1 or self._chance(0.5)):
                f, used = c, True
            else:
                f = self._leaf(not regular or self._chance(0.3))
            fi = Info.of(f.dtype)
            bl = self._ri(1, 2)
            if bl * fi.span > FOOTPRINT_MAX // 4:
                bl = 1
            if packed:
                d = end - fi.true_lb
                if fi.extent > 0 and fi.extent != fi.true_extent:
                    d = end - fi.lb
            elif self._chance(0.8 if regular else 0.6):
                d = end - fi.true_lb + self._ri(1, 9)
            else:
                d = self._ri(-64, 64)
            end = d + fi.true_lb + bl * fi.span
            bls.append(bl)
            disps.append(d)
            types.append(f.dtype)
            descs.append(f"{{bl={bl}, disp={d}, {f.desc}}}")
        new = MPI.Datatype.Create_struct(bls, disps, types)
        return new, "struct(" + ", ".join(descs) + ")"

    def _op_subarray(self, c, ci, regular):
        if ci.extent <= 0:
            return c.dtype.Dup(), f"dup({c.desc})"
        nd = self._ri(1, 4)
        room = self._room(ci)
        sizes, subs, starts = [], [], []
        total = 1
        for _ in range(nd):
            lim = 6
            while lim > 1 and total * lim * (ci.extent // ci.span + 1) > room:
                lim -= 1
            n = self._ri(1, lim)
            total *= n
            s = self._ri(1, n)
            if regular and self._chance(0.3):
                s = n
            sizes.append(n)
            subs.append(s)
            starts.append(self._ri(0, n - s))
        order = MPI.ORDER_C if self._chance(0.5) else MPI.ORDER_FORTRAN
        oname = "C" if order == MPI.ORDER_C else "F"
        return (c.dtype.Create_subarray(sizes, subs, starts, order=order),
                f"subarray({oname}, sizes={sizes}, subsizes={subs}, starts={starts}, {c.desc})")

    def _op_resized(self, c, ci, regular):
        span, ext = ci.span, ci.extent
        # zero/negative extents only at the root (see dtype_fuzz.c: MPICH places copies of a
        # nested negative-extent child with a stride other than the extent it reports)
        kind = self._ri(0, 3 if regular else (5 if self._depth == 0 else 4))
        if kind == 0:
            lb, nex = ci.lb, ext + self._ri(1, span + 8)
        elif kind == 1:
            lb = ci.true_lb - self._ri(1, span)
            nex = ci.true_extent + (ci.true_lb - lb) + self._ri(0, 16)
        elif kind == 2:
            lb, nex = ci.true_lb, max(ci.true_extent, 1)
        elif kind == 3:
            lb, nex = ci.lb, (self._ri(1, ext - 1) if ext > 1 else 1)
        elif kind == 4:
            lb, nex = ci.true_lb + self._ri(1, span), self._ri(1, span * 2)
        else:
            lb, nex = ci.lb + self._ri(-8, 8), -self._ri(0, span)
        return (c.dtype.Create_resized(lb, nex),
                f"resized(lb={lb}, extent={nex}, {c.desc})")

    def _op_dup(self, c, ci, regular):
        return c.dtype.Dup(), f"dup({c.desc})"


def buffer_span(info, count):
    """[lo, hi) byte range, relative to the buffer pointer, touched by `count` elements."""
    if info.size == 0 or count == 0:
        return 0, 0
    starts = [i * info.extent + info.true_lb for i in range(count)]
    return min(starts), max(starts) + info.true_extent


if __name__ == "__main__":  # print a few trees: python tests/typegen.py SEED [N]
    import sys
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    g = TypeGen(seed)
    for _ in range(n):
        t = g.generate()
        print(("R " if t.regular else "I ") + t.desc, t.info())
        t.free()
