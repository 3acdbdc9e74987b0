/* Randomized derived-datatype fuzzer: MPI_Pack/MPI_Unpack/MPI_Pack_size (possibly
 * interposed by libcommlib.so) against PMPI_Pack/PMPI_Unpack/PMPI_Pack_size of the host MPI.
 *
 * usage: dtype_fuzz --seed S --trees N [--max-depth D] [--large-count P] [--verbose]
 *   --large-count P: probability that a node uses the MPI-4 _c constructor (default 0.06)
 *   --no-long-double: no LONG_DOUBLE / C_LONG_DOUBLE_COMPLEX / LONG_DOUBLE_INT leaves
 *
 * Every tree is a random nested datatype over all constructors (contiguous, vector, hvector,
 * indexed, hindexed, indexed_block, hindexed_block, struct, subarray, resized, dup), biased so
 * that most trees reduce to a regular strided form.  Each committed tree is packed with
 * incount 1 and a random incount 2..4 (and now and then 0), starting at a random nonzero
 * position, and the packed bytes, returned positions and the unpacked output buffers
 * (whole buffers, random-filled beforehand) are compared byte for byte.
 *
 * The last line is always
 *   dtype_fuzz: seed=S trees=N mismatches=M fast=F fallback=B
 * with F/B the commlib_stat("pack.fast"/"pack.fallback") deltas, or -1 without the preload.
 * Exit status 1 on any mismatch.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <mpi.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mpi3_compat.h"

/* ------------------------------------------------------------------ PRNG (splitmix64) */
static uint64_t rng_state;

static uint64_t rnd64(void)
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* uniform integer in [lo, hi] */
static long rint_in(long lo, long hi)
{
    if (hi <= lo) return lo;
    return lo + (long)(rnd64() % (uint64_t)(hi - lo + 1));
}

/* true with probability p */
static int chance(double p) { return (double)(rnd64() >> 11) * (1.0 / 9007199254740992.0) < p; }

static void fill_random(unsigned char *p, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t v = rnd64();
        memcpy(p + i, &v, 8);
    }
    if (i < n) {
        uint64_t v = rnd64();
        memcpy(p + i, &v, n - i);
    }
}

/* ------------------------------------------------------------------ small helpers */
static char *xfmt(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *xfmt(const char *fmt, ...)
{
    va_list ap;
    char *s = NULL;
    va_start(ap, fmt);
    if (vasprintf(&s, fmt, ap) < 0) {
        fprintf(stderr, "dtype_fuzz: out of memory\n");
        exit(2);
    }
    va_end(ap);
    return s;
}

/* append ",%ld" items of an array to a freshly allocated "[a,b,c]" string */
static char *fmt_ints(const int *v, int n)
{
    size_t cap = 16 + (size_t)n * 14, len = 0;
    char *s = malloc(cap);
    len += (size_t)snprintf(s + len, cap - len, "[");
    for (int i = 0; i < n; i++)
        len += (size_t)snprintf(s + len, cap - len, "%s%d", i ? "," : "", v[i]);
    snprintf(s + len, cap - len, "]");
    return s;
}

static char *fmt_aints(const MPI_Aint *v, int n)
{
    size_t cap = 16 + (size_t)n * 24, len = 0;
    char *s = malloc(cap);
    len += (size_t)snprintf(s + len, cap - len, "[");
    for (int i = 0; i < n; i++)
        len += (size_t)snprintf(s + len, cap - len, "%s%ld", i ? "," : "", (long)v[i]);
    snprintf(s + len, cap - len, "]");
    return s;
}

#define CHECK_MPI(call)                                                                    \
    do {                                                                                   \
        int rc_ = (call);                                                                  \
        if (rc_ != MPI_SUCCESS) {                                                          \
            fprintf(stderr, "dtype_fuzz: %s failed (rc=%d) at line %d\n", #call, rc_,      \
                    __LINE__);                                                             \
            MPI_Abort(MPI_COMM_WORLD, 2);                                                  \
        }                                                                                  \
    } while (0)

/* ------------------------------------------------------------------ type tree generation */
typedef struct {
    MPI_Datatype t;
    char *desc; /* malloc'ed */
} node_t;

typedef struct {
    MPI_Aint lb, extent, true_lb, true_extent;
    MPI_Count size;
} tinfo_t;

static void get_info(MPI_Datatype t, tinfo_t *ti)
{
    int sz;
    CHECK_MPI(MPI_Type_get_extent(t, &ti->lb, &ti->extent));
    CHECK_MPI(MPI_Type_get_true_extent(t, &ti->true_lb, &ti->true_extent));
    CHECK_MPI(MPI_Type_size(t, &sz));
    ti->size = sz;
}

/* All derived types created for the current tree (freed after the tree). */
#define MAX_CREATED 4096
static MPI_Datatype created[MAX_CREATED];
static int ncreated;

static void track(MPI_Datatype t)
{
    if (ncreated >= MAX_CREATED) {
        fprintf(stderr, "dtype_fuzz: too many types in one tree\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    created[ncreated++] = t;
}

#define FOOTPRINT_MAX (192 * 1024) /* per element: |extent|, true_extent and size */

typedef struct {
    MPI_Datatype t;
    const char *name;
} leaf_t;

/* --no-long-double: leave out LONG_DOUBLE, C_LONG_DOUBLE_COMPLEX and LONG_DOUBLE_INT leaves
 * (MPICH copies only the 10 value bytes of an x87 long double inside derived types) */
static int g_no_long_double;

static node_t make_leaf(int allow_pairs)
{
    static const leaf_t basic[] = {
        {MPI_CHAR, "CHAR"},   {MPI_BYTE, "BYTE"},     {MPI_SHORT, "SHORT"},
        {MPI_INT, "INT"},     {MPI_FLOAT, "FLOAT"},   {MPI_DOUBLE, "DOUBLE"},
        {MPI_INT64_T, "INT64_T"}, {MPI_C_DOUBLE_COMPLEX, "C_DOUBLE_COMPLEX"},
    };
    static const leaf_t pairs[] = {
        {MPI_DOUBLE_INT, "DOUBLE_INT"}, {MPI_SHORT_INT, "SHORT_INT"},
        {MPI_FLOAT_INT, "FLOAT_INT"},   {MPI_2INT, "2INT"},
        {MPI_LONG_INT, "LONG_INT"},     {MPI_LONG_DOUBLE_INT, "LONG_DOUBLE_INT"},
    };
    static const leaf_t rare[] = {
        {MPI_LONG_DOUBLE, "LONG_DOUBLE"}, {MPI_C_BOOL, "C_BOOL"},   {MPI_AINT, "AINT"},
        {MPI_PACKED, "PACKED"},           {MPI_WCHAR, "WCHAR"},     {MPI_UINT8_T, "UINT8_T"},
        {MPI_UNSIGNED_LONG_LONG, "UNSIGNED_LONG_LONG"}, {MPI_COUNT, "COUNT"},
        {MPI_C_LONG_DOUBLE_COMPLEX, "C_LONG_DOUBLE_COMPLEX"},
    };
    node_t n;
    const leaf_t *l = NULL;
    if (chance(0.04)) {
        l = &rare[rint_in(0, (long)(sizeof rare / sizeof rare[0]) - 1)];
    } else if (allow_pairs && chance(0.06)) {
        l = &pairs[rint_in(0, (long)(sizeof pairs / sizeof pairs[0]) - 1)];
    }
    if (l && g_no_long_double && strstr(l->name, "LONG_DOUBLE")) l = NULL;
    if (l) {
        n.t = l->t;
        n.desc = xfmt("%s", l->name);
    } else {
        const leaf_t *b = &basic[rint_in(0, (long)(sizeof basic / sizeof basic[0]) - 1)];
        n.t = b->t;
        n.desc = xfmt("%s", b->name);
    }
    return n;
}

enum {
    OP_CONTIG, OP_VECTOR, OP_HVECTOR, OP_INDEXED, OP_HINDEXED, OP_INDEXED_BLOCK,
    OP_HINDEXED_BLOCK, OP_STRUCT, OP_SUBARRAY, OP_RESIZED, OP_DUP, OP_DARRAY, NOPS
};

/* relative weights, regular trees / irregular trees */
static const int op_weight_regular[NOPS] = {12, 16, 12, 8, 6, 8, 6, 8, 12, 8, 4, 1};
static const int op_weight_irregular[NOPS] = {6, 8, 8, 12, 12, 8, 8, 14, 8, 10, 4, 3};

/* probability that a node uses the MPI-4 large-count constructor (MPI_Type_vector_c, ...);
 * --large-count P sets it */
static double g_large_p = COMMLIB_TEST_HAVE_LARGE_COUNT ? 0.06 : 0.0;

static MPI_Count *to_counts(const int *v, int n, MPI_Count *out)
{
    for (int i = 0; i < n; i++) out[i] = v[i];
    return out;
}

static int pick_op(int regular)
{
    const int *w = regular ? op_weight_regular : op_weight_irregular;
    int total = 0;
    for (int i = 0; i < NOPS; i++) total += w[i];
    int r = (int)rint_in(0, total - 1);
    for (int i = 0; i < NOPS; i++) {
        if (r < w[i]) return i;
        r -= w[i];
    }
    return OP_DUP;
}

static int g_max_depth = 4;
static int g_commit_inner; /* commit some intermediate types too */

static node_t gen(int depth, int regular);

/* a count in [1, hi], occasionally 0 */
static int rcount(int hi, int allow_zero)
{
    if (allow_zero && chance(0.02)) return 0;
    return (int)rint_in(1, hi);
}

/* a "unit" in bytes to space copies of a child apart without overlap */
static MPI_Aint child_span(const tinfo_t *ci)
{
    MPI_Aint u = ci->extent;
    if (u < 0) u = -u;
    if (ci->true_extent > u) u = ci->true_extent;
    if (u <= 0) u = 1;
    return u;
}

static node_t gen(int depth, int regular)
{
    double leaf_p = depth == 0 ? 0.0 : 0.25 + 0.15 * depth;
    if (depth >= g_max_depth || chance(leaf_p)) return make_leaf(!regular || chance(0.5));

    int op = pick_op(regular);
    node_t c = gen(depth + 1, regular);
    tinfo_t ci;
    get_info(c.t, &ci);
    MPI_Aint span = child_span(&ci);
    MPI_Aint ext = ci.extent;
    /* budget for counts so that the result stays within FOOTPRINT_MAX */
    long room = (long)(FOOTPRINT_MAX / (span > 0 ? span : 1));
    if (room < 1) room = 1;

    MPI_Datatype nt = MPI_DATATYPE_NULL;
    char *d = NULL;
    int large = chance(g_large_p); /* build this node with the _c constructor */
    const char *lc = large ? "_c" : "";

    switch (op) {
    case OP_CONTIG: {
        int cnt = rcount(room < 6 ? (int)room : 6, 1);
        if (large)
            CHECK_MPI(MPI_Type_contiguous_c(cnt, c.t, &nt));
        else
            CHECK_MPI(MPI_Type_contiguous(cnt, c.t, &nt));
        d = xfmt("contiguous%s(%d, %s)", lc, cnt, c.desc);
        break;
    }
    case OP_VECTOR: {
        int cnt = rcount(5, 1), bl = (int)rint_in(1, 3), stride;
        if (regular || chance(0.6))
            stride = bl + (int)rint_in(0, 3);
        else
            stride = (int)rint_in(0, bl + 3); /* may overlap or be 0 */
        if (chance(0.2)) stride = -stride;
        if ((long)cnt * (labs(stride) + bl) > room) cnt = bl = 1;
        if (large)
            CHECK_MPI(MPI_Type_vector_c(cnt, bl, stride, c.t, &nt));
        else
            CHECK_MPI(MPI_Type_vector(cnt, bl, stride, c.t, &nt));
        d = xfmt("vector%s(count=%d, bl=%d, stride=%d, %s)", lc, cnt, bl, stride, c.desc);
        break;
    }
    case OP_HVECTOR: {
        int cnt = rcount(5, 1), bl = (int)rint_in(1, 3);
        MPI_Aint stride;
        if (regular || chance(0.6)) {
            stride = (MPI_Aint)(bl + rint_in(0, 2)) * span;
            if (chance(0.3)) stride += rint_in(1, 7); /* unaligned padding */
            if (ext != span && ext > 0 && chance(0.3)) stride = (MPI_Aint)bl * ext; /* tiles */
        } else {
            stride = rint_in(0, (long)((bl + 2) * span));
        }
        if (chance(0.2)) stride = -stride;
        if ((long)cnt * (labs((long)stride) / span + bl + 1) > room) cnt = bl = 1;
        if (large)
            CHECK_MPI(MPI_Type_create_hvector_c(cnt, bl, stride, c.t, &nt));
        else
            CHECK_MPI(MPI_Type_create_hvector(cnt, bl, stride, c.t, &nt));
        d = xfmt("hvector%s(count=%d, bl=%d, stride=%ldB, %s)", lc, cnt, bl, (long)stride,
                 c.desc);
        break;
    }
    case OP_INDEXED:
    case OP_INDEXED_BLOCK:
    case OP_HINDEXED:
    case OP_HINDEXED_BLOCK: {
        int hetero = (op == OP_HINDEXED || op == OP_HINDEXED_BLOCK);
        int blockk = (op == OP_INDEXED_BLOCK || op == OP_HINDEXED_BLOCK);
        int cnt = rcount(5, 1);
        int bls[8];
        int idisp[8];
        MPI_Aint bdisp[8];
        int even = regular ? chance(0.85) : chance(0.3);
        int bl0 = (int)rint_in(1, 3);
        long cur = rint_in(-3, 3);
        long step = bl0 + rint_in(0, 3);
        if (chance(0.2)) step = -step;
        bls[0] = bl0; /* the shared blocklength, also when count is 0 */
        long padb = hetero && chance(0.3) ? rint_in(1, 5) : 0;
        if (step < 0) padb = -padb; /* keep evenly spaced blocks apart */
        for (int i = 0; i < cnt; i++) {
            if (even || blockk) {
                bls[i] = bl0;
            } else {
                bls[i] = (int)rint_in(regular ? 1 : 0, 3); /* zero-length blocks too */
            }
            if (even) {
                idisp[i] = (int)(cur + (long)i * step);
                bdisp[i] = (MPI_Aint)idisp[i] * span + (MPI_Aint)i * padb;
            } else if (chance(regular ? 0.9 : 0.7)) {
                /* increasing, non-overlapping, random gaps */
                idisp[i] = (int)cur;
                bdisp[i] = (MPI_Aint)cur * span + (i ? rint_in(0, 5) : 0);
                cur += bls[i] + rint_in(0, 4);
            } else {
                /* anywhere (may overlap, out of order, negative) */
                idisp[i] = (int)rint_in(-8, 8);
                bdisp[i] = (MPI_Aint)idisp[i] * span + rint_in(-3, 3);
            }
        }
        long reach = 0;
        for (int i = 0; i < cnt; i++) {
            long r = labs((long)idisp[i]) + 4;
            if (r > reach) reach = r;
        }
        if (reach * 2 > room) { /* too big: single block at 0 */
            cnt = 1;
            bls[0] = 1;
            idisp[0] = 0;
            bdisp[0] = 0;
        }
        char *sb = fmt_ints(bls, blockk ? 1 : cnt);
        char *sd = hetero ? fmt_aints(bdisp, cnt) : fmt_ints(idisp, cnt);
        MPI_Count cbls[8], cdisp[8];
        to_counts(bls, cnt, cbls);
        if (hetero)
            for (int i = 0; i < cnt; i++) cdisp[i] = bdisp[i];
        else
            to_counts(idisp, cnt, cdisp);
        switch (op) {
        case OP_INDEXED:
            if (large)
                CHECK_MPI(MPI_Type_indexed_c(cnt, cbls, cdisp, c.t, &nt));
            else
                CHECK_MPI(MPI_Type_indexed(cnt, bls, idisp, c.t, &nt));
            d = xfmt("indexed%s(count=%d, bls=%s, displs=%s, %s)", lc, cnt, sb, sd, c.desc);
            break;
        case OP_HINDEXED:
            if (large)
                CHECK_MPI(MPI_Type_create_hindexed_c(cnt, cbls, cdisp, c.t, &nt));
            else
                CHECK_MPI(MPI_Type_create_hindexed(cnt, bls, bdisp, c.t, &nt));
            d = xfmt("hindexed%s(count=%d, bls=%s, displsB=%s, %s)", lc, cnt, sb, sd, c.desc);
            break;
        case OP_INDEXED_BLOCK:
            if (large)
                CHECK_MPI(MPI_Type_create_indexed_block_c(cnt, bls[0], cdisp, c.t, &nt));
            else
                CHECK_MPI(MPI_Type_create_indexed_block(cnt, bls[0], idisp, c.t, &nt));
            d = xfmt("indexed_block%s(count=%d, bl=%d, displs=%s, %s)", lc, cnt, bls[0], sd,
                     c.desc);
            break;
        default:
            if (large)
                CHECK_MPI(MPI_Type_create_hindexed_block_c(cnt, bls[0], cdisp, c.t, &nt));
            else
                CHECK_MPI(MPI_Type_create_hindexed_block(cnt, bls[0], bdisp, c.t, &nt));
            d = xfmt("hindexed_block%s(count=%d, bl=%d, displsB=%s, %s)", lc, cnt, bls[0], sd,
                     c.desc);
            break;
        }
        free(sb);
        free(sd);
        break;
    }
    case OP_STRUCT: {
        int nf = (int)rint_in(1, 4);
        int bls[4];
        MPI_Aint disp[4];
        MPI_Datatype types[4];
        char *fdesc[4];
        int child_used = 0;
        int packed = regular ? chance(0.7) : chance(0.2);
        MPI_Aint end = 0;
        for (int i = 0; i < nf; i++) {
            node_t f;
            if (!child_used && (i == nf - 1 || chance(0.5))) {
                f = c;
                f.desc = xfmt("%s", c.desc);
                child_used = 1;
            } else {
                f = make_leaf(!regular || chance(0.3));
            }
            tinfo_t fi;
            get_info(f.t, &fi);
            bls[i] = (int)rint_in(1, 2);
            if (bls[i] * child_span(&fi) > FOOTPRINT_MAX / 4) bls[i] = 1;
            MPI_Aint fspan = (MPI_Aint)bls[i] * child_span(&fi);
            if (packed) {
                /* back to back: this field's true data starts where the previous ended */
                disp[i] = end - fi.true_lb;
                if (fi.extent > 0 && fi.extent != fi.true_extent) disp[i] = end - fi.lb;
            } else if (chance(regular ? 0.8 : 0.6)) {
                disp[i] = end - fi.true_lb + rint_in(1, 9); /* gap */
            } else {
                disp[i] = rint_in(-64, 64); /* anywhere, may overlap */
            }
            end = disp[i] + fi.true_lb + fspan;
            types[i] = f.t;
            fdesc[i] = f.desc;
        }
        size_t cap = 64;
        for (int i = 0; i < nf; i++) cap += strlen(fdesc[i]) + 64;
        char *s = malloc(cap);
        size_t len = (size_t)snprintf(s, cap, "struct%s(", lc);
        for (int i = 0; i < nf; i++)
            len += (size_t)snprintf(s + len, cap - len, "%s{bl=%d, disp=%ld, %s}", i ? ", " : "",
                                    bls[i], (long)disp[i], fdesc[i]);
        snprintf(s + len, cap - len, ")");
        for (int i = 0; i < nf; i++) free(fdesc[i]);
        if (large) {
            MPI_Count cb[4], cd[4];
            for (int i = 0; i < nf; i++) cb[i] = bls[i], cd[i] = disp[i];
            CHECK_MPI(MPI_Type_create_struct_c(nf, cb, cd, types, &nt));
        } else {
            CHECK_MPI(MPI_Type_create_struct(nf, bls, disp, types, &nt));
        }
        d = s;
        break;
    }
    case OP_SUBARRAY: {
        if (ext <= 0) { /* the array layout needs a positive extent */
            CHECK_MPI(MPI_Type_dup(c.t, &nt));
            d = xfmt("dup(%s)", c.desc);
            break;
        }
        int nd = (int)rint_in(1, 4);
        int sizes[4], subs[4], starts[4];
        long total = 1;
        for (int i = 0; i < nd; i++) {
            long lim = 6;
            while (lim > 1 && total * lim * (ext / span + 1) > room) lim--;
            sizes[i] = (int)rint_in(1, lim);
            total *= sizes[i];
            subs[i] = (int)rint_in(1, sizes[i]);
            if (regular && chance(0.3)) subs[i] = sizes[i]; /* full dims collapse */
            starts[i] = (int)rint_in(0, sizes[i] - subs[i]);
        }
        int order = chance(0.5) ? MPI_ORDER_C : MPI_ORDER_FORTRAN;
        if (large) {
            MPI_Count a1[4], a2[4], a3[4];
            CHECK_MPI(MPI_Type_create_subarray_c(nd, to_counts(sizes, nd, a1),
                                                 to_counts(subs, nd, a2),
                                                 to_counts(starts, nd, a3), order, c.t, &nt));
        } else {
            CHECK_MPI(MPI_Type_create_subarray(nd, sizes, subs, starts, order, c.t, &nt));
        }
        char *s1 = fmt_ints(sizes, nd), *s2 = fmt_ints(subs, nd), *s3 = fmt_ints(starts, nd);
        d = xfmt("subarray%s(%s, sizes=%s, subsizes=%s, starts=%s, %s)", lc,
                 order == MPI_ORDER_C ? "C" : "F", s1, s2, s3, c.desc);
        free(s1);
        free(s2);
        free(s3);
        break;
    }
    case OP_RESIZED: {
        MPI_Aint lb, nex;
        /* zero/negative extents (kind 5) only at the root: MPICH replicates a child of
         * negative extent with an internal stride that disagrees with the extent it reports
         * (contiguous(2, resized(extent -20)) reports extent 0 but places copies 40 bytes
         * apart), so nested ones make the host's own footprint unpredictable */
        int kind = (int)rint_in(0, regular ? 3 : (depth == 0 ? 5 : 4));
        switch (kind) {
        case 0: /* grow extent */
            lb = ci.lb;
            nex = ext + rint_in(1, (long)span + 8);
            break;
        case 1: /* shift lb down, keep data inside */
            lb = ci.true_lb - rint_in(1, (long)span);
            nex = ci.true_extent + (ci.true_lb - lb) + rint_in(0, 16);
            break;
        case 2: /* exact tight extent */
            lb = ci.true_lb;
            nex = ci.true_extent > 0 ? ci.true_extent : 1;
            break;
        case 3: /* shrink extent (copies may overlap when replicated) */
            lb = ci.lb;
            nex = ext > 1 ? rint_in(1, ext - 1) : 1;
            break;
        case 4: /* lb above the data */
            lb = ci.true_lb + rint_in(1, (long)span);
            nex = rint_in(1, (long)span * 2);
            break;
        default: /* zero or negative extent */
            lb = ci.lb + rint_in(-8, 8);
            nex = -rint_in(0, (long)span);
            break;
        }
        if (large)
            CHECK_MPI(MPI_Type_create_resized_c(c.t, lb, nex, &nt));
        else
            CHECK_MPI(MPI_Type_create_resized(c.t, lb, nex, &nt));
        d = xfmt("resized%s(lb=%ld, extent=%ld, %s)", lc, (long)lb, (long)nex, c.desc);
        break;
    }
    case OP_DARRAY: {
        /* one rank's block of a block/cyclic distributed array (a virtual process grid:
         * no communication); commlib leaves darray to the host MPI */
        if (ext <= 0) {
            CHECK_MPI(MPI_Type_dup(c.t, &nt));
            d = xfmt("dup(%s)", c.desc);
            break;
        }
        int nd = (int)rint_in(1, 3), gs[3], dist[3], dargs[3], ps[3], nprocs;
        long total = 1;
        for (int i = 0; i < nd; i++) {
            long lim = 8;
            while (lim > 1 && total * lim * (ext / span + 1) > room) lim--;
            gs[i] = (int)rint_in(1, lim);
            total *= gs[i];
            ps[i] = (int)rint_in(1, 2);
            int k = (int)rint_in(0, 3);
            dist[i] = k == 0 ? MPI_DISTRIBUTE_NONE
                             : (k == 1 ? MPI_DISTRIBUTE_BLOCK : MPI_DISTRIBUTE_CYCLIC);
            if (dist[i] == MPI_DISTRIBUTE_NONE) ps[i] = 1;
            dargs[i] = MPI_DISTRIBUTE_DFLT_DARG;
            if (dist[i] == MPI_DISTRIBUTE_CYCLIC && chance(0.5)) dargs[i] = (int)rint_in(1, 2);
        }
        nprocs = 1;
        for (int i = 0; i < nd; i++) nprocs *= ps[i];
        int r = (int)rint_in(0, nprocs - 1);
        int order = chance(0.5) ? MPI_ORDER_C : MPI_ORDER_FORTRAN;
        CHECK_MPI(MPI_Type_create_darray(nprocs, r, nd, gs, dist, dargs, ps, order, c.t, &nt));
        char *s1 = fmt_ints(gs, nd), *s2 = fmt_ints(dist, nd), *s3 = fmt_ints(dargs, nd),
             *s4 = fmt_ints(ps, nd);
        d = xfmt("darray(%s, size=%d, rank=%d, gsizes=%s, distribs=%s, dargs=%s, psizes=%s, %s)",
                 order == MPI_ORDER_C ? "C" : "F", nprocs, r, s1, s2, s3, s4, c.desc);
        free(s1);
        free(s2);
        free(s3);
        free(s4);
        break;
    }
    default: {
        CHECK_MPI(MPI_Type_dup(c.t, &nt));
        d = xfmt("dup(%s)", c.desc);
        break;
    }
    }
    track(nt);
    free(c.desc);

    tinfo_t ni;
    get_info(nt, &ni);
    MPI_Aint ae = ni.extent < 0 ? -ni.extent : ni.extent;
    if (ae > FOOTPRINT_MAX || ni.true_extent > FOOTPRINT_MAX || ni.size > FOOTPRINT_MAX) {
        /* too big: give back a leaf instead (the type stays tracked and is freed later) */
        free(d);
        return make_leaf(1);
    }
    if (g_commit_inner && chance(0.2)) CHECK_MPI(MPI_Type_commit(&nt));
    node_t r = {nt, d};
    return r;
}

/* ------------------------------------------------------------------ checking */
typedef long long (*stat_fn)(const char *);
static stat_fn commlib_stat_fn;

static long long stat_get(const char *name)
{
    return commlib_stat_fn ? commlib_stat_fn(name) : -1;
}

static long mismatches;
static int verbose;
#define MAX_REPORTS 5
static int nreports;

static void report(long tree, const char *desc, const tinfo_t *ti, int incount,
                   const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static void report(long tree, const char *desc, const tinfo_t *ti, int incount,
                   const char *fmt, ...)
{
    if (nreports >= MAX_REPORTS) return;
    if (nreports == MAX_REPORTS - 1) fprintf(stderr, "(further mismatches not shown)\n");
    nreports++;
    va_list ap;
    fprintf(stderr, "MISMATCH tree=%ld incount=%d: ", tree, incount);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr,
            "\n  type: %s\n  size=%lld lb=%ld extent=%ld true_lb=%ld true_extent=%ld\n", desc,
            (long long)ti->size, (long)ti->lb, (long)ti->extent, (long)ti->true_lb,
            (long)ti->true_extent);
}

static long first_diff(const unsigned char *a, const unsigned char *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (a[i] != b[i]) return (long)i;
    return -1;
}

/* Does the type map of incount elements write some byte twice? (unpack order is then
 * unspecified by MPI).  Unpacks all-0xff data into a zeroed buffer with PMPI_Unpack and counts
 * the bytes written. */
static int overlaps(MPI_Datatype t, int incount, size_t bufsize, MPI_Aint base_off,
                    MPI_Count total)
{
    unsigned char *dst = calloc(bufsize ? bufsize : 1, 1);
    unsigned char *src = malloc(total ? (size_t)total : 1);
    memset(src, 0xff, total ? (size_t)total : 1);
    int pos = 0;
    PMPI_Unpack(src, (int)total, &pos, dst + base_off, incount, t, MPI_COMM_WORLD);
    size_t written = 0;
    for (size_t i = 0; i < bufsize; i++) written += dst[i] != 0;
    free(dst);
    free(src);
    return (MPI_Count)written < total;
}

/* hindexed(1 block of `count` copies of t at the absolute address of ptr), committed: the
 * same bytes as (ptr, count, t), addressed from MPI_BOTTOM */
static MPI_Datatype bottom_type(MPI_Datatype t, int count, const void *ptr)
{
    MPI_Aint addr;
    MPI_Datatype w;
    CHECK_MPI(MPI_Get_address(ptr, &addr));
    CHECK_MPI(MPI_Type_create_hindexed(1, &count, &addr, t, &w));
    CHECK_MPI(MPI_Type_commit(&w));
    return w;
}

/* Runs the pack/unpack/pack_size comparison for one type and incount.  With `bottom`, the
 * buffers are addressed absolutely (MPI_BOTTOM and a hindexed wrapper holding the address). */
static void check_one(long tree, MPI_Datatype t, const char *desc, const tinfo_t *ti, int incount,
                      int bottom)
{
    /* byte span [lo, hi) of incount elements relative to the buffer pointer */
    MPI_Aint lo = 0, hi = 0;
    if (ti->size > 0 && incount > 0) {
        for (int i = 0; i < incount; i++) {
            MPI_Aint a = (MPI_Aint)i * ti->extent + ti->true_lb;
            MPI_Aint b = a + ti->true_extent;
            if (i == 0 || a < lo) lo = a;
            if (i == 0 || b > hi) hi = b;
        }
    }
    if (lo < -((MPI_Aint)1 << 40) || hi > ((MPI_Aint)1 << 40) || hi - lo > ((MPI_Aint)256 << 20) || ti->size * (MPI_Count)incount > ((MPI_Count)256 << 20)) {
        /* an MPI reporting absurd bounds (seen with Open MPI 4 for some types whose inner
         * type was freed) cannot be checked against a buffer; not a commlib decision */
        if (verbose) printf("  tree %ld incount=%d skipped: span %ld bytes\n", tree, incount, (long)(hi - lo));
        return;
    }
    size_t inspan = (size_t)(hi - lo) + 16;
    MPI_Aint base_off = 8 - lo; /* buf pointer = alloc + base_off */

    int ps_mine = -1, ps_host = -2;
    int rc1 = MPI_Pack_size(incount, t, MPI_COMM_WORLD, &ps_mine);
    int rc2 = PMPI_Pack_size(incount, t, MPI_COMM_WORLD, &ps_host);
    if (rc1 != rc2 || ps_mine != ps_host) {
        mismatches++;
        report(tree, desc, ti, incount, "MPI_Pack_size=%d (rc %d) vs PMPI_Pack_size=%d (rc %d)",
               ps_mine, rc1, ps_host, rc2);
        return;
    }
    MPI_Count total = ti->size * incount;
    int pos0 = (int)rint_in(1, 40);
    size_t outsize = (size_t)pos0 + (size_t)ps_host;

    unsigned char *in = malloc(inspan);
    unsigned char *out1 = malloc(outsize + 16);
    unsigned char *out2 = malloc(outsize + 16);
    fill_random(in, inspan);
    fill_random(out1, outsize + 16);
    memcpy(out2, out1, outsize + 16);

    /* what is handed to MPI: (buffer, count, type), or (MPI_BOTTOM, 1, wrapper) */
    const void *pin = in + base_off;
    int pcount = incount;
    MPI_Datatype ptype = t, w_in = MPI_DATATYPE_NULL, w_o1 = MPI_DATATYPE_NULL,
                 w_o2 = MPI_DATATYPE_NULL;
    if (bottom) {
        w_in = bottom_type(t, incount, in + base_off);
        pin = MPI_BOTTOM;
        pcount = 1;
        ptype = w_in;
    }

    int p1 = pos0, p2 = pos0;
    rc1 = MPI_Pack(pin, pcount, ptype, out1, (int)outsize, &p1, MPI_COMM_WORLD);
    rc2 = PMPI_Pack(pin, pcount, ptype, out2, (int)outsize, &p2, MPI_COMM_WORLD);
    int bad = 0;
    if (rc1 != rc2 || p1 != p2) {
        report(tree, desc, ti, incount, "MPI_Pack rc=%d position=%d vs PMPI_Pack rc=%d position=%d"
               " (start %d)", rc1, p1, rc2, p2, pos0);
        bad = 1;
    } else {
        long fd = first_diff(out1, out2, outsize + 16);
        if (fd >= 0) {
            report(tree, desc, ti, incount,
                   "MPI_Pack output differs at byte %ld (packed data starts at %d, packed size %lld)",
                   fd, pos0, (long long)total);
            bad = 1;
        }
    }
    if (verbose)
        printf("  tree %ld incount=%d%s pack_size=%d pos %d->%d%s\n", tree, incount,
               bottom ? " (MPI_BOTTOM)" : "", ps_host, pos0, p2, bad ? " MISMATCH" : "");

    if (!bad) {
        /* unpack the host-packed data into two copies of a random output buffer */
        unsigned char *o1 = malloc(inspan);
        unsigned char *o2 = malloc(inspan);
        unsigned char *o0 = malloc(inspan);
        fill_random(o0, inspan);
        memcpy(o1, o0, inspan);
        memcpy(o2, o0, inspan);
        int q1 = pos0, q2 = pos0;
        if (bottom) {
            w_o1 = bottom_type(t, incount, o1 + base_off);
            w_o2 = bottom_type(t, incount, o2 + base_off);
            rc1 = MPI_Unpack(out2, (int)outsize, &q1, MPI_BOTTOM, 1, w_o1, MPI_COMM_WORLD);
            rc2 = PMPI_Unpack(out2, (int)outsize, &q2, MPI_BOTTOM, 1, w_o2, MPI_COMM_WORLD);
        } else {
            rc1 = MPI_Unpack(out2, (int)outsize, &q1, o1 + base_off, incount, t, MPI_COMM_WORLD);
            rc2 = PMPI_Unpack(out2, (int)outsize, &q2, o2 + base_off, incount, t, MPI_COMM_WORLD);
        }
        if (memcmp(o2, o0, 8) != 0 || memcmp(o2 + inspan - 8, o0 + inspan - 8, 8) != 0) {
            /* the generator's span is wrong for this type (or the host MPI disagrees with
             * the extents it reports): the test itself is not sound here */
            report(tree, desc, ti, incount,
                   "PMPI_Unpack wrote outside the span computed from the type's extents");
            bad = 1;
        } else if (rc1 != rc2 || q1 != q2) {
            report(tree, desc, ti, incount,
                   "MPI_Unpack rc=%d position=%d vs PMPI_Unpack rc=%d position=%d (start %d)", rc1,
                   q1, rc2, q2, pos0);
            bad = 1;
        } else {
            long fd = first_diff(o1, o2, inspan);
            if (fd >= 0) {
                if (overlaps(t, incount, inspan, base_off, total)) {
                    if (verbose)
                        printf("  tree %ld: unpack differs on a self-overlapping type map"
                               " (order unspecified), ignored\n", tree);
                } else {
                    report(tree, desc, ti, incount,
                           "MPI_Unpack output differs at byte %ld of the buffer span (buf at %ld)",
                           fd, (long)base_off);
                    bad = 1;
                }
            }
        }
        free(o0);
        free(o1);
        free(o2);
    }
    if (bad) mismatches++;
    if (w_in != MPI_DATATYPE_NULL) CHECK_MPI(MPI_Type_free(&w_in));
    if (w_o1 != MPI_DATATYPE_NULL) CHECK_MPI(MPI_Type_free(&w_o1));
    if (w_o2 != MPI_DATATYPE_NULL) CHECK_MPI(MPI_Type_free(&w_o2));
    free(in);
    free(out1);
    free(out2);
}

int main(int argc, char **argv)
{
    unsigned long long seed = 1;
    long trees = 100;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--seed") && i + 1 < argc)
            seed = strtoull(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--trees") && i + 1 < argc)
            trees = strtol(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--max-depth") && i + 1 < argc)
            g_max_depth = (int)strtol(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--large-count") && i + 1 < argc)
            g_large_p = strtod(argv[++i], NULL);
        else if (!strcmp(argv[i], "--no-long-double"))
            g_no_long_double = 1;
        else if (!strcmp(argv[i], "--verbose"))
            verbose = 1;
        else {
            fprintf(stderr,
                    "usage: %s --seed S --trees N [--max-depth D] [--large-count P] "
                    "[--no-long-double] [--verbose]\n",
                    argv[0]);
            return 2;
        }
    }
    MPI_Init(&argc, &argv);
    int rank;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    rng_state = seed * 0x2545F4914F6CDD1Dull + (unsigned long long)rank;
    if (rank == 0) printf("dtype_fuzz: seed=%llu trees=%ld max_depth=%d\n", seed, trees, g_max_depth);
    fflush(stdout);

    commlib_stat_fn = (stat_fn)dlsym(RTLD_DEFAULT, "commlib_stat");
    long long fast0 = stat_get("pack.fast"), fb0 = stat_get("pack.fallback");

    for (long tr = 0; tr < trees; tr++) {
        ncreated = 0;
        int regular = chance(0.8);
        g_commit_inner = chance(0.1);
        int free_early = chance(0.3);
        int use_dup = chance(0.05);
        node_t n = gen(0, regular);
        MPI_Datatype t = n.t;
        int is_derived = ncreated > 0 && created[ncreated - 1] == t;
        if (!is_derived) {
            /* the root came back as a predefined leaf: wrap it in a contiguous(1) */
            MPI_Datatype w;
            CHECK_MPI(MPI_Type_contiguous(1, t, &w));
            track(w);
            char *d = xfmt("contiguous(1, %s)", n.desc);
            free(n.desc);
            n.desc = d;
            t = w;
        }
        /* root is the last tracked type; take it out of the list */
        ncreated--;
        if (free_early) {
            /* intermediate types may be freed before the root is committed and used */
            for (int i = 0; i < ncreated; i++) CHECK_MPI(MPI_Type_free(&created[i]));
            ncreated = 0;
        }
        CHECK_MPI(MPI_Type_commit(&t));
        int twice = chance(0.03);
        if (twice) CHECK_MPI(MPI_Type_commit(&t)); /* committing again is allowed (a no-op) */
        MPI_Datatype use = t, dupt = MPI_DATATYPE_NULL;
        int root_freed = 0;
        if (use_dup) {
            /* a dup of a committed type is committed: use it without committing it; the
             * original may even be freed first */
            CHECK_MPI(MPI_Type_dup(t, &dupt));
            use = dupt;
            if (chance(0.5)) {
                CHECK_MPI(MPI_Type_free(&t));
                root_freed = 1;
            }
        }
        char *desc = use_dup ? xfmt("dup-of-committed%s(%s)", root_freed ? "-original-freed" : "",
                                    n.desc)
                             : xfmt("%s%s", twice ? "[committed twice] " : "", n.desc);
        free(n.desc);

        tinfo_t ti;
        get_info(use, &ti);
        if (verbose)
            printf("tree %ld%s: %s\n  size=%lld lb=%ld extent=%ld true_lb=%ld true_extent=%ld\n",
                   tr, free_early ? " (inner freed)" : "", desc, (long long)ti.size, (long)ti.lb,
                   (long)ti.extent, (long)ti.true_lb, (long)ti.true_extent);

        check_one(tr, use, desc, &ti, 1, 0);
        check_one(tr, use, desc, &ti, (int)rint_in(2, 4), 0);
        if (chance(0.03)) check_one(tr, use, desc, &ti, 0, 0);
        if (chance(0.1)) {
            char *bd = xfmt("[MPI_BOTTOM + hindexed(1, {incount}, {absolute address})] %s", desc);
            check_one(tr, use, bd, &ti, (int)rint_in(1, 3), 1);
            free(bd);
        }

        free(desc);
        if (use_dup) CHECK_MPI(MPI_Type_free(&dupt));
        if (!root_freed) CHECK_MPI(MPI_Type_free(&t));
        for (int i = 0; i < ncreated; i++) CHECK_MPI(MPI_Type_free(&created[i]));
        ncreated = 0;
    }

    long long fast = stat_get("pack.fast"), fb = stat_get("pack.fallback");
    if (fast >= 0) fast -= fast0;
    if (fb >= 0) fb -= fb0;
    printf("dtype_fuzz: seed=%llu trees=%ld mismatches=%ld fast=%lld fallback=%lld\n", seed, trees,
           mismatches, fast, fb);
    fflush(stdout);
    MPI_Finalize();
    return mismatches ? 1 : 0;
}
