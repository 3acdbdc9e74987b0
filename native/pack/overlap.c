/* Whether two strided pieces may share a byte (pack/device_hold.h).  No state;
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
#include <stdint.h>

#include "../datatype/canonical.h"
#include "device_hold.h"

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

static int apart_modulo(const strided_piece *a, uintptr_t a_base, const strided_piece *b, uintptr_t b_base, int64_t m)
{
    uint64_t sa, la, sb, lb;
    if (m <= 1 || !arc(a, a_base, (uint64_t)m, &sa, &la) || !arc(b, b_base, (uint64_t)m, &sb, &lb)) return 0;
    return (sb + (uint64_t)m - sa) % (uint64_t)m >= la && (sa + (uint64_t)m - sb) % (uint64_t)m >= lb;
}

int pieces_may_overlap(const strided_piece *a, uintptr_t a_base, const strided_piece *b, uintptr_t b_base)
{
    const strided_piece *both[2] = {a, b};
    uintptr_t lo[2], hi[2];
    for (int k = 0; k < 2; k++) {
        int64_t low = 0, high = both[k]->block;
        for (int d = 0; d < both[k]->ndims; d++) {
            if (both[k]->dims[d].count <= 0) return 0; /* no bytes */
            int64_t reach = (both[k]->dims[d].count - 1) * both[k]->dims[d].stride;
            if (reach < 0) low += reach;
            else high += reach;
        }
        lo[k] = (k ? b_base : a_base) + (uintptr_t)low;
        hi[k] = (k ? b_base : a_base) + (uintptr_t)high;
    }
    if (hi[0] <= lo[1] || hi[1] <= lo[0]) return 0;
    for (int k = 0; k < 2; k++)
        for (int d = 0; d < both[k]->ndims; d++) {
            int64_t s = both[k]->dims[d].stride;
            if (both[k]->dims[d].count > 1 && apart_modulo(a, a_base, b, b_base, s < 0 ? -s : s)) return 0;
        }
    return 1;
}
