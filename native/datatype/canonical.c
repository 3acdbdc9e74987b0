/* Decode a datatype (envelope/contents) into the canonical strided form.
 *
 * The type tree is walked bottom-up; every node yields a piece list in type-map order.
 * Appending a piece tries to merge it into the previous one (adjacent blocks, another
 * instance of the previous piece's outermost dimension, or a new outer dimension), and
 * every piece is normalised: count-1 dimensions dropped, a dimension whose stride equals
 * the block folded into the block, and two dimensions that describe one longer stride
 * merged.  Dimensions are never reordered: pack order is type-map order.
 */
#include "canonical.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    strided_piece *v;
    int n, cap, max;
    enum type_reason fail;
} piece_list;

static void list_fail(piece_list *l, enum type_reason r)
{
    if (l->fail == TYPE_REASON_NONE) l->fail = r;
}

static void list_free(piece_list *l)
{
    free(l->v);
    l->v = NULL;
    l->n = l->cap = 0;
}

static int dims_equal(const stride_dim *a, const stride_dim *b, int n)
{
    for (int i = 0; i < n; i++)
        if (a[i].count != b[i].count || a[i].stride != b[i].stride) return 0;
    return 1;
}

static void remove_dim(strided_piece *p, int i)
{
    memmove(&p->dims[i], &p->dims[i + 1], (size_t)(p->ndims - i - 1) * sizeof(stride_dim));
    p->ndims--;
}

/* Returns 0 when a size overflows 64 bits. */
static int normalize(strided_piece *p)
{
    for (;;) {
        for (int i = 0; i < p->ndims; i++)
            if (p->dims[i].count == 1) remove_dim(p, i--);
        if (p->ndims > 0 && p->dims[0].stride == p->block) {
            if (__builtin_mul_overflow(p->block, p->dims[0].count, &p->block)) return 0;
            remove_dim(p, 0);
            continue;
        }
        int merged = 0;
        for (int i = 0; i + 1 < p->ndims && !merged; i++) {
            int64_t span, count;
            if (__builtin_mul_overflow(p->dims[i].count, p->dims[i].stride, &span)) return 0;
            if (p->dims[i + 1].stride != span) continue;
            if (__builtin_mul_overflow(p->dims[i].count, p->dims[i + 1].count, &count)) return 0;
            p->dims[i].count = count;
            remove_dim(p, i + 1);
            merged = 1;
        }
        if (!merged) return 1;
    }
}

/* Offset just past the last instance of a's outermost dimension. */
static int next_outer(const strided_piece *a, int64_t *next)
{
    const stride_dim *top = &a->dims[a->ndims - 1];
    int64_t span;
    return !__builtin_mul_overflow(top->count, top->stride, &span) &&
           !__builtin_add_overflow(a->offset, span, next);
}

/* Merges b into a when the pair is one strided piece; 1 when merged. */
static int try_merge(strided_piece *a, const strided_piece *b)
{
    int64_t next;
    if (a->ndims == 0 && b->ndims == 0 && b->offset == a->offset + a->block) {
        a->block += b->block; /* adjacent blocks */
        return 1;
    }
    if (a->block != b->block) return 0;
    if (a->ndims > 0 && a->ndims == b->ndims + 1 && dims_equal(a->dims, b->dims, b->ndims) &&
        next_outer(a, &next) && b->offset == next) {
        a->dims[a->ndims - 1].count++; /* b is the next instance of a's outer dimension */
        return normalize(a);
    }
    if (a->ndims > 0 && a->ndims == b->ndims && dims_equal(a->dims, b->dims, a->ndims - 1) &&
        a->dims[a->ndims - 1].stride == b->dims[a->ndims - 1].stride && next_outer(a, &next) &&
        b->offset == next) {
        a->dims[a->ndims - 1].count += b->dims[a->ndims - 1].count; /* b continues a's outer dimension */
        return normalize(a);
    }
    if (a->ndims == b->ndims && a->ndims < CANONICAL_MAX_DIMS && dims_equal(a->dims, b->dims, a->ndims)) {
        strided_piece merged = *a; /* two copies of one shape: a new outer dimension */
        if (__builtin_sub_overflow(b->offset, a->offset, &merged.dims[merged.ndims].stride)) return 0;
        merged.dims[merged.ndims++].count = 2;
        if (!normalize(&merged)) return 0;
        *a = merged;
        return 1;
    }
    return 0;
}

static void list_append(piece_list *l, const strided_piece *in)
{
    if (l->fail) return;
    if (in->block == 0) return;
    for (int i = 0; i < in->ndims; i++)
        if (in->dims[i].count == 0) return;
    strided_piece p = *in;
    if (!normalize(&p)) return list_fail(l, TYPE_REASON_OVERFLOW);
    if (l->n > 0 && try_merge(&l->v[l->n - 1], &p)) return;
    if (l->n >= l->max) return list_fail(l, TYPE_REASON_TOO_MANY_PIECES);
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 4;
        strided_piece *v = realloc(l->v, (size_t)cap * sizeof *v);
        if (!v) return list_fail(l, TYPE_REASON_TOO_MANY_PIECES);
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = p;
}

/* Appends `count` copies of `in`, copy i shifted by shift + i * stride. */
static void list_replicate(piece_list *out, const piece_list *in, int64_t count, int64_t stride, int64_t shift)
{
    if (in->fail) return list_fail(out, in->fail);
    /* Empty parts (count 0, block length 0, size-0 children) carry no data, but MPIs
     * disagree on how they shape bounds and the stride between elements. */
    if (count <= 0 || in->n == 0) return list_fail(out, TYPE_REASON_EMPTY_PART);
    if (in->n == 1) {
        strided_piece p = in->v[0];
        if (__builtin_add_overflow(p.offset, shift, &p.offset)) return list_fail(out, TYPE_REASON_OVERFLOW);
        if (count > 1) {
            if (p.ndims == CANONICAL_MAX_DIMS) return list_fail(out, TYPE_REASON_TOO_MANY_DIMS);
            p.dims[p.ndims++] = (stride_dim){count, stride};
        }
        return list_append(out, &p);
    }
    /* Several pieces interleave copy by copy; bounded, since each copy adds pieces
     * unless it merges, and a huge irregular count is left to the host MPI. */
    if (count > (int64_t)out->max * 4) return list_fail(out, TYPE_REASON_TOO_MANY_PIECES);
    for (int64_t i = 0; i < count && !out->fail; i++) {
        for (int j = 0; j < in->n; j++) {
            strided_piece p = in->v[j];
            int64_t move;
            if (__builtin_mul_overflow(i, stride, &move) || __builtin_add_overflow(move, shift, &move) ||
                __builtin_add_overflow(p.offset, move, &p.offset))
                return list_fail(out, TYPE_REASON_OVERFLOW);
            list_append(out, &p);
        }
    }
}

static int type_extent(MPI_Datatype t, int64_t *extent)
{
    MPI_Count lb, ext;
    if (PMPI_Type_get_extent_x(t, &lb, &ext) != MPI_SUCCESS) return 0;
    *extent = (int64_t)ext;
    return 1;
}

static int is_named(MPI_Datatype t)
{
    int combiner;
#if MPI_VERSION >= 4 /* the classic query refuses types built by large-count constructors */
    MPI_Count ni, na, nc, nd;
    if (PMPI_Type_get_envelope_c(t, &ni, &na, &nc, &nd, &combiner) != MPI_SUCCESS) return 1;
#else
    int ni, na, nd;
    if (PMPI_Type_get_envelope(t, &ni, &na, &nd, &combiner) != MPI_SUCCESS) return 1;
#endif
    return combiner == MPI_COMBINER_NAMED
#ifdef MPI_COMBINER_F90_REAL
           || combiner == MPI_COMBINER_F90_REAL || combiner == MPI_COMBINER_F90_COMPLEX ||
           combiner == MPI_COMBINER_F90_INTEGER
#endif
        ;
}

/* The arguments of one constructor, in the layout of the classic (int) get_contents:
 * large-count constructors (MPI 4) move counts into their own array, which is mapped
 * back here so that one decoder serves both. */
typedef struct {
    int combiner;
    int64_t *iv; /* integers */
    int64_t *av; /* addresses */
    MPI_Datatype *types;
    int ni, na, nd;
} contents;

static void contents_free(contents *c)
{
    for (int i = 0; i < c->nd; i++)
        if (!is_named(c->types[i])) PMPI_Type_free(&c->types[i]);
    free(c->iv);
    free(c->av);
    free(c->types);
}

static enum type_reason get_contents(MPI_Datatype t, contents *c)
{
    memset(c, 0, sizeof *c);
#if MPI_VERSION >= 4
    MPI_Count ni, na, nc, nd;
    if (PMPI_Type_get_envelope_c(t, &ni, &na, &nc, &nd, &c->combiner) != MPI_SUCCESS) return TYPE_REASON_MPI_ERROR;
#else
    int ni, na, nd, nc = 0;
    if (PMPI_Type_get_envelope(t, &ni, &na, &nd, &c->combiner) != MPI_SUCCESS) return TYPE_REASON_MPI_ERROR;
#endif
    if (c->combiner == MPI_COMBINER_NAMED) return TYPE_REASON_NONE;
    int *ints = malloc(sizeof(int) * (size_t)(ni + 1));
    MPI_Aint *addrs = malloc(sizeof(MPI_Aint) * (size_t)(na + 1));
    MPI_Count *counts = malloc(sizeof(MPI_Count) * (size_t)(nc + 1));
    c->types = malloc(sizeof(MPI_Datatype) * (size_t)(nd + 1));
    enum type_reason rc = TYPE_REASON_NONE;
    if (!ints || !addrs || !counts || !c->types) {
        rc = TYPE_REASON_MPI_ERROR;
        goto out;
    }
#if MPI_VERSION >= 4
    if (PMPI_Type_get_contents_c(t, ni, na, nc, nd, ints, addrs, counts, c->types) != MPI_SUCCESS) {
#else
    if (PMPI_Type_get_contents(t, ni, na, nd, ints, addrs, c->types) != MPI_SUCCESS) {
#endif
        rc = TYPE_REASON_MPI_ERROR;
        goto out;
    }
    c->nd = (int)nd;
    if (nc == 0) {
        c->ni = (int)ni;
        c->na = (int)na;
        c->iv = malloc(sizeof(int64_t) * (size_t)(ni + 1));
        c->av = malloc(sizeof(int64_t) * (size_t)(na + 1));
        if (!c->iv || !c->av) {
            rc = TYPE_REASON_MPI_ERROR;
            goto out;
        }
        for (int i = 0; i < ni; i++) c->iv[i] = ints[i];
        for (int i = 0; i < na; i++) c->av[i] = addrs[i];
        goto out;
    }
    /* Large-count layout: counts hold what ints (and for h* constructors possibly the
     * addresses) held; subarray keeps ndims and order in ints. */
    c->iv = malloc(sizeof(int64_t) * (size_t)(nc + ni + 1));
    c->av = malloc(sizeof(int64_t) * (size_t)(nc + na + 1));
    if (!c->iv || !c->av) {
        rc = TYPE_REASON_MPI_ERROR;
        goto out;
    }
    int64_t n = counts[0];
    switch (c->combiner) {
    case MPI_COMBINER_CONTIGUOUS:
    case MPI_COMBINER_VECTOR:
    case MPI_COMBINER_INDEXED:
    case MPI_COMBINER_INDEXED_BLOCK:
        for (MPI_Count i = 0; i < nc; i++) c->iv[i] = counts[i];
        c->ni = (int)nc;
        break;
    case MPI_COMBINER_HVECTOR:
    case MPI_COMBINER_HINDEXED:
    case MPI_COMBINER_HINDEXED_BLOCK:
    case MPI_COMBINER_STRUCT: {
        /* counts: count, block length(s), then byte displacements unless in addrs */
        int64_t nint = c->combiner == MPI_COMBINER_HVECTOR || c->combiner == MPI_COMBINER_HINDEXED_BLOCK ? 2 : n + 1;
        int64_t naddr = c->combiner == MPI_COMBINER_HVECTOR ? 1 : n;
        if (nc < nint || (na == 0 && nc != nint + naddr) || (na != 0 && na != naddr)) {
            rc = TYPE_REASON_LARGE_COUNT;
            goto out;
        }
        for (int64_t i = 0; i < nint; i++) c->iv[i] = counts[i];
        for (int64_t i = 0; i < naddr; i++) c->av[i] = na ? addrs[i] : counts[nint + i];
        c->ni = (int)nint;
        c->na = (int)naddr;
        break;
    }
    case MPI_COMBINER_SUBARRAY:
        if (ni != 2 || nc != 3 * (MPI_Count)ints[0]) {
            rc = TYPE_REASON_LARGE_COUNT;
            goto out;
        }
        c->iv[0] = ints[0];
        for (MPI_Count i = 0; i < nc; i++) c->iv[1 + i] = counts[i];
        c->iv[1 + nc] = ints[1];
        c->ni = (int)(nc + 2);
        break;
    case MPI_COMBINER_RESIZED:
    case MPI_COMBINER_DUP:
        break; /* arguments not needed: extents come from the MPI */
    default:
        rc = TYPE_REASON_COMBINER;
    }
out:
    free(ints);
    free(addrs);
    free(counts);
    if (rc != TYPE_REASON_NONE && c->types && !c->nd) {
        free(c->types);
        c->types = NULL;
    }
    return rc;
}

static void decode(MPI_Datatype t, piece_list *out, int depth);

/* Appends child data replicated `count` times (stride = child extent * stride_mult or bytes). */
static void append_child(piece_list *out, MPI_Datatype child, int64_t count, int64_t stride, int64_t shift, int depth)
{
    piece_list sub = {.max = out->max};
    decode(child, &sub, depth + 1);
    list_replicate(out, &sub, count, stride, shift);
    list_free(&sub);
}

static int scaled(int64_t a, int64_t b, int64_t *r) { return !__builtin_mul_overflow(a, b, r); }

static void decode_subarray(const contents *c, piece_list *out, int64_t old_extent, int depth)
{
    int nd = (int)c->iv[0];
    const int64_t *sizes = c->iv + 1, *subsizes = c->iv + 1 + nd, *starts = c->iv + 1 + 2 * nd;
    int c_order = c->iv[1 + 3 * nd] == MPI_ORDER_C;
    piece_list cur = {.max = out->max};
    decode(c->types[0], &cur, depth + 1);
    int64_t stride = old_extent;
    for (int k = 0; k < nd && !cur.fail; k++) {
        int d = c_order ? nd - 1 - k : k; /* the fastest-varying dimension first */
        int64_t shift;
        piece_list next = {.max = out->max};
        if (!scaled(starts[d], stride, &shift)) list_fail(&next, TYPE_REASON_OVERFLOW);
        else list_replicate(&next, &cur, subsizes[d], stride, shift);
        list_free(&cur);
        cur = next;
        if (!scaled(stride, sizes[d], &stride)) list_fail(&cur, TYPE_REASON_OVERFLOW);
    }
    list_replicate(out, &cur, 1, 0, 0);
    list_free(&cur);
}

static void decode(MPI_Datatype t, piece_list *out, int depth)
{
    if (out->fail) return;
    if (depth > 64) return list_fail(out, TYPE_REASON_TOO_MANY_DIMS);
    contents c;
    enum type_reason rc = get_contents(t, &c);
    if (rc != TYPE_REASON_NONE) {
        contents_free(&c);
        return list_fail(out, rc);
    }
    int64_t ext = 0, stride, shift;
    if (c.combiner != MPI_COMBINER_NAMED && c.nd > 0 && !type_extent(c.types[0], &ext)) {
        contents_free(&c);
        return list_fail(out, TYPE_REASON_MPI_ERROR);
    }
    switch (c.combiner) {
    case MPI_COMBINER_NAMED: {
        MPI_Count size, tlb, text;
        /* x87 long double fills 10 of its 16 bytes; MPICH copies only those 10 inside
         * derived types, so a byte-identical pack must leave these to the host MPI. */
        if (t == MPI_LONG_DOUBLE || t == MPI_C_LONG_DOUBLE_COMPLEX || t == MPI_LONG_DOUBLE_INT) {
            list_fail(out, TYPE_REASON_PADDED_ELEMENT);
            break;
        }
        if (PMPI_Type_size_x(t, &size) != MPI_SUCCESS || PMPI_Type_get_true_extent_x(t, &tlb, &text) != MPI_SUCCESS) {
            list_fail(out, TYPE_REASON_MPI_ERROR);
        } else if (size > 0) {
            /* Pair types such as MPI_SHORT_INT have a gap between their members. */
            if (tlb != 0 || text != size) list_fail(out, TYPE_REASON_NAMED_HOLES);
            else list_append(out, &(strided_piece){.offset = 0, .block = (int64_t)size});
        }
        break;
    }
    case MPI_COMBINER_DUP:
    case MPI_COMBINER_RESIZED: /* same data; the new extent is asked of the MPI by users */
        append_child(out, c.types[0], 1, 0, 0, depth);
        break;
    case MPI_COMBINER_CONTIGUOUS:
        append_child(out, c.types[0], c.iv[0], ext, 0, depth);
        break;
    case MPI_COMBINER_VECTOR:
    case MPI_COMBINER_HVECTOR: {
        piece_list block = {.max = out->max};
        append_child(&block, c.types[0], c.iv[1], ext, 0, depth);
        if (c.combiner == MPI_COMBINER_VECTOR ? !scaled(c.iv[2], ext, &stride) : (stride = c.av[0], 0))
            list_fail(out, TYPE_REASON_OVERFLOW);
        else list_replicate(out, &block, c.iv[0], stride, 0);
        list_free(&block);
        break;
    }
    case MPI_COMBINER_INDEXED:
    case MPI_COMBINER_HINDEXED:
    case MPI_COMBINER_INDEXED_BLOCK:
    case MPI_COMBINER_HINDEXED_BLOCK:
    case MPI_COMBINER_STRUCT: {
        int64_t n = c.iv[0];
        int blocked = c.combiner == MPI_COMBINER_INDEXED_BLOCK || c.combiner == MPI_COMBINER_HINDEXED_BLOCK;
        int bytes = c.combiner == MPI_COMBINER_HINDEXED || c.combiner == MPI_COMBINER_HINDEXED_BLOCK ||
                    c.combiner == MPI_COMBINER_STRUCT;
        const int64_t *displs = bytes ? c.av : c.iv + (blocked ? 2 : 1 + n);
        /* Decode each distinct child once: struct fields often share a type. */
        piece_list child = {.max = out->max};
        decode(c.types[0], &child, depth + 1);
        for (int64_t i = 0; i < n && !out->fail; i++) {
            MPI_Datatype type_i = c.combiner == MPI_COMBINER_STRUCT ? c.types[i] : c.types[0];
            int64_t ext_i = ext;
            if (c.combiner == MPI_COMBINER_STRUCT && i > 0 && type_i != c.types[i - 1]) {
                list_free(&child);
                child = (piece_list){.max = out->max};
                decode(type_i, &child, depth + 1);
            }
            if (c.combiner == MPI_COMBINER_STRUCT && !type_extent(type_i, &ext_i)) {
                list_fail(out, TYPE_REASON_MPI_ERROR);
                break;
            }
            int64_t blocklen = blocked ? c.iv[1] : c.iv[1 + i];
            if (bytes) shift = displs[i];
            else if (!scaled(displs[i], ext_i, &shift)) {
                list_fail(out, TYPE_REASON_OVERFLOW);
                break;
            }
            list_replicate(out, &child, blocklen, ext_i, shift);
        }
        list_free(&child);
        break;
    }
    case MPI_COMBINER_SUBARRAY:
        decode_subarray(&c, out, ext, depth);
        break;
    default: /* darray, f90 parameterised types, value-index pairs, future combiners */
        list_fail(out, TYPE_REASON_COMBINER);
    }
    contents_free(&c);
}

/* The pieces must span exactly the true bounds the MPI reports.  Some MPIs place
 * copies of negative-stride or negative-extent children differently from the type map
 * the standard defines (Open MPI 4 for vectors with negative strides, MPICH for nested
 * negative extents); such types are left to the host MPI so that its output stands. */
/* [*lo, *hi): the bytes n pieces reach, relative to the element pointer; 0 on overflow. */
static int pieces_reach(const strided_piece *pieces, int n, int64_t *lo, int64_t *hi)
{
    *lo = INT64_MAX;
    *hi = INT64_MIN;
    for (int i = 0; i < n; i++) {
        const strided_piece *p = &pieces[i];
        int64_t first = p->offset, last = p->offset + p->block;
        for (int d = 0; d < p->ndims; d++) {
            int64_t reach;
            if (__builtin_mul_overflow(p->dims[d].count - 1, p->dims[d].stride, &reach)) return 0;
            if (reach < 0) first += reach;
            else last += reach;
        }
        *lo = first < *lo ? first : *lo;
        *hi = last > *hi ? last : *hi;
    }
    return 1;
}

static int bounds_agree(const canonical_type *ct)
{
    if (ct->npieces == 0) return ct->size == 0;
    int64_t lo, hi;
    return pieces_reach(ct->pieces, ct->npieces, &lo, &hi) && lo == ct->true_lb && hi - lo == ct->true_extent;
}

canonical_type *canonical_type_create(MPI_Datatype type, int max_pieces)
{
    canonical_type *ct = calloc(1, sizeof *ct);
    if (!ct) return NULL;
    MPI_Count size, lb, extent, tlb, text;
    if (PMPI_Type_size_x(type, &size) != MPI_SUCCESS || PMPI_Type_get_extent_x(type, &lb, &extent) != MPI_SUCCESS ||
        PMPI_Type_get_true_extent_x(type, &tlb, &text) != MPI_SUCCESS) {
        ct->unsupported = TYPE_REASON_MPI_ERROR;
        return ct;
    }
    ct->size = size;
    ct->lb = lb;
    ct->extent = extent;
    ct->true_lb = tlb;
    ct->true_extent = text;
    piece_list list = {.max = max_pieces};
    decode(type, &list, 0);
    if (list.fail) {
        ct->unsupported = list.fail;
        list_free(&list);
        return ct;
    }
    ct->npieces = list.n;
    ct->pieces = list.v;
    if (!bounds_agree(ct)) { /* never pack differently from what the MPI believes */
        ct->unsupported = TYPE_REASON_MPI_DISAGREES;
        ct->npieces = 0;
        ct->pieces = NULL;
        free(list.v);
    }
    return ct;
}

void canonical_type_destroy(canonical_type *ct)
{
    if (!ct) return;
    free(ct->pieces);
    free(ct);
}

int canonical_single_piece(const canonical_type *ct, int64_t count, strided_piece *out)
{
    if (ct->npieces != 1) return 0;
    const strided_piece *p = &ct->pieces[0];
    out->offset = p->offset; /* only the dimensions in use: this runs on every call */
    out->block = p->block;
    out->ndims = p->ndims;
    memcpy(out->dims, p->dims, (size_t)p->ndims * sizeof(stride_dim));
    if (count == 1) return 1;
    if (out->ndims == CANONICAL_MAX_DIMS) return 0;
    out->dims[out->ndims++] = (stride_dim){count, ct->extent};
    return normalize(out);
}

#define APPEND(...) \
    (used += (size_t)snprintf(buf + (used < len ? used : len), used < len ? len - used : 0, __VA_ARGS__))

size_t canonical_type_json(const canonical_type *ct, char *buf, size_t len)
{
    size_t used = 0;
    APPEND("{\"supported\":%s,\"reason\":", ct->unsupported ? "false" : "true");
    if (ct->unsupported) APPEND("\"%s\"", type_reason_name[ct->unsupported]);
    else APPEND("null");
    APPEND(",\"size\":%lld,\"lb\":%lld,\"extent\":%lld,\"true_lb\":%lld,\"true_extent\":%lld,\"pieces\":[",
           (long long)ct->size, (long long)ct->lb, (long long)ct->extent, (long long)ct->true_lb,
           (long long)ct->true_extent);
    for (int i = 0; i < ct->npieces; i++) {
        const strided_piece *p = &ct->pieces[i];
        APPEND("%s{\"offset\":%lld,\"block\":%lld,\"dims\":[", i ? "," : "", (long long)p->offset, (long long)p->block);
        for (int d = 0; d < p->ndims; d++)
            APPEND("%s[%lld,%lld]", d ? "," : "", (long long)p->dims[d].count, (long long)p->dims[d].stride);
        APPEND("]}");
    }
    APPEND("]}");
    return used;
}

canonical_type *canonical_type_from_blocks(int64_t nblocks, const int64_t *offsets, const int64_t *lengths,
                                           int64_t extent)
{
    canonical_type *ct = calloc(1, sizeof *ct);
    if (!ct) return NULL;
    piece_list list = {.max = INT_MAX};
    int64_t lo = INT64_MAX, hi = INT64_MIN, size = 0;
    for (int64_t i = 0; i < nblocks && !list.fail; i++) {
        if (lengths[i] <= 0) continue;
        strided_piece p = {.offset = offsets[i], .block = lengths[i]};
        list_append(&list, &p);
        lo = offsets[i] < lo ? offsets[i] : lo;
        hi = offsets[i] + lengths[i] > hi ? offsets[i] + lengths[i] : hi;
        size += lengths[i];
    }
    if (list.fail) {
        list_free(&list);
        free(ct);
        return NULL;
    }
    ct->size = size;
    ct->lb = ct->true_lb = size ? lo : 0;
    ct->true_extent = size ? hi - lo : 0;
    ct->extent = extent;
    ct->npieces = list.n;
    ct->pieces = list.v;
    return ct;
}

/* The first k blocks of p (dims[0] varies fastest) as at most ndims + 1 pieces; returns
 * how many were written and leaves *offset at block k. */
static int first_blocks(const strided_piece *p, int64_t k, int64_t *offset, strided_piece *out)
{
    int n = 0;
    *offset = p->offset;
    for (int d = p->ndims - 1; d >= 0 && k > 0; d--) {
        int64_t inner = 1;
        for (int i = 0; i < d; i++) inner *= p->dims[i].count;
        int64_t q = k / inner;
        if (q == 0) continue;
        strided_piece s = {.offset = *offset, .block = p->block, .ndims = d + 1};
        memcpy(s.dims, p->dims, (size_t)d * sizeof(stride_dim));
        s.dims[d] = (stride_dim){q, p->dims[d].stride};
        normalize(&s);
        out[n++] = s;
        *offset += q * p->dims[d].stride;
        k -= q * inner;
    }
    return n;
}

int canonical_prefix(const canonical_type *ct, int64_t bytes, canonical_type *prefix, strided_piece *out)
{
    *prefix = (canonical_type){.size = bytes, .extent = ct->extent, .pieces = out};
    int n = 0;
    for (int j = 0; j < ct->npieces && bytes > 0; j++) {
        const strided_piece *p = &ct->pieces[j];
        int64_t blocks = 1;
        for (int d = 0; d < p->ndims; d++) blocks *= p->dims[d].count;
        if (bytes >= blocks * p->block) { /* the whole piece */
            out[n++] = *p;
            bytes -= blocks * p->block;
            continue;
        }
        int64_t offset;
        n += first_blocks(p, bytes / p->block, &offset, out + n);
        if (bytes % p->block) out[n++] = (strided_piece){.offset = offset, .block = bytes % p->block};
        break;
    }
    int64_t lo = 0, hi = 0;
    if (n && !pieces_reach(out, n, &lo, &hi)) return 0;
    prefix->npieces = n;
    prefix->lb = prefix->true_lb = lo;
    prefix->true_extent = hi - lo;
    return 1;
}
