/* Whether two strided pieces may share a byte (pack/overlap.h, for pack/device_hold.h).  No state;
 * tests/c/hold_overlap.c checks it against the byte sets themselves.
 *
 * Sound, not exact: 0 only when no byte is shared.  Beyond the spans, for each stride M of
 * either piece: the addresses of a piece, taken modulo M, lie on an arc of the circle of M
 * bytes - from its base, as long as its block plus the reach of its dimensions whose stride
 * is not a multiple of M (those that are vanish modulo M).  Two pieces whose arcs do not meet
 * for some M have no address in common.  For subarrays of one grid this separates every two
 * boxes that do not intersect: along the axis that separates them, M = the next stride up
 * (the x faces of a halo and its interior by the row, M = the row's stride; y faces by the
 * plane's). */
#include "overlap.h"

/* The arc of piece p at base modulo m: start, length; 0 when it covers the whole circle. */
static int arc(const strided_piece *p, uintptr_t base, uint64_t m, uint64_t *start, uint64_t *length)
{
    int64_t low = 0, high = p->block;
    for (int d = 0; d < p->ndims; d++) {
        int64_t s = p->dims[d].stride, c = p->dims[d].count;
        if (c <= 1 || s % (int64_t)m == 0) continue;
        int64_t reach = (c - 1) * s;
        if (reach < 0) low += reach;
        else high += reach;
        if (high - low >= (int64_t)m) return 0;
    }
    if (high - low >= (int64_t)m) return 0;
    *start = (uint64_t)(base + (uintptr_t)low) % m;
    *length = (uint64_t)(high - low);
    return 1;
}

static uint64_t modulus(const stride_dim *d) { return (uint64_t)(d->stride < 0 ? -d->stride : d->stride); }

void piece_view_init(struct piece_view *v, const strided_piece *p, uintptr_t base)
{
    int64_t low = 0, high = p->block;
    v->base = base;
    v->empty = 0;
    v->narcs = 0;
    for (int d = 0; d < p->ndims; d++) {
        if (p->dims[d].count <= 0) v->empty = 1; /* no bytes */
        int64_t reach = (p->dims[d].count - 1) * p->dims[d].stride;
        if (reach < 0) low += reach;
        else high += reach;
    }
    v->lo = base + (uintptr_t)low;
    v->hi = base + (uintptr_t)high;
    for (int d = 0; d < p->ndims && v->narcs < PIECE_VIEW_ARCS; d++) {
        uint64_t m = modulus(&p->dims[d]);
        if (p->dims[d].count <= 1 || m <= 1) continue;
        int k = v->narcs++;
        v->m[k] = m;
        v->whole[k] = !arc(p, base, m, &v->start[k], &v->length[k]);
    }
}

/* The arc of a viewed piece modulo m: kept when m is one of its first strides. */
static int arc_of(const strided_piece *p, const struct piece_view *v, uint64_t m, uint64_t *start, uint64_t *length)
{
    for (int k = 0; k < v->narcs; k++)
        if (v->m[k] == m) {
            *start = v->start[k];
            *length = v->length[k];
            return !v->whole[k];
        }
    return arc(p, v->base, m, start, length);
}

/* Starts below m: the distances around the circle without a division. */
static int apart_modulo(const strided_piece *a, const struct piece_view *va, const strided_piece *b,
                        const struct piece_view *vb, uint64_t m)
{
    uint64_t sa, la, sb, lb;
    if (m <= 1 || !arc_of(a, va, m, &sa, &la) || !arc_of(b, vb, m, &sb, &lb)) return 0;
    uint64_t ab = sb + m - sa, ba = sa + m - sb;
    if (ab >= m) ab -= m;
    if (ba >= m) ba -= m;
    return ab >= la && ba >= lb;
}

int views_may_overlap(const strided_piece *a, const struct piece_view *va, const strided_piece *b,
                      const struct piece_view *vb)
{
    if (va->empty || vb->empty) return 0;
    if (va->hi <= vb->lo || vb->hi <= va->lo) return 0;
    const strided_piece *both[2] = {a, b};
    for (int k = 0; k < 2; k++)
        for (int d = 0; d < both[k]->ndims; d++)
            if (both[k]->dims[d].count > 1 && apart_modulo(a, va, b, vb, modulus(&both[k]->dims[d])))
                return 0;
    return 1;
}

int pieces_may_overlap(const strided_piece *a, uintptr_t a_base, const strided_piece *b, uintptr_t b_base)
{
    struct piece_view va, vb;
    piece_view_init(&va, a, a_base);
    piece_view_init(&vb, b, b_base);
    return views_may_overlap(a, &va, b, &vb);
}
