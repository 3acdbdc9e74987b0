/* pieces_may_overlap (native/pack/overlap.c), which decides whether a held device MPI_Pack
 * or MPI_Unpack must wait for another (COMMLIB_DEVICE_PACK_HOLD, pack/device_hold.h):
 *   1. never 0 for two pieces that share a byte (random pieces: blocks, counts, strides of
 *      any sign, bases; the byte sets compared), or the held ops would run in any order;
 *   2. 0 for every two disjoint boxes of a halo exchange's grid - the 26 faces, edges and
 *      corners of the halo and of the interior, Q quantities, radius 1-3 - or every op would
 *      launch what is held (no batching).
 * Prints "hold_overlap: random=N shared=S unsound=0 boxes=B disjoint=D missed=0". */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../native/pack/overlap.c"

#define SPACE 8192

static uint64_t state = 0x9e3779b97f4a7c15ull;
static int64_t rnd(int64_t n)
{
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;
    return (int64_t)(state % (uint64_t)n);
}

/* marks the bytes of p at base (offset from `space`); 0 when one falls outside */
static int mark(const strided_piece *p, int64_t base, unsigned char *bytes)
{
    int64_t index[CANONICAL_MAX_DIMS] = {0};
    for (;;) {
        int64_t at = base;
        for (int d = 0; d < p->ndims; d++) at += index[d] * p->dims[d].stride;
        if (at < 0 || at + p->block > SPACE) return 0;
        memset(bytes + at, 1, (size_t)p->block);
        int d = 0;
        while (d < p->ndims && ++index[d] == p->dims[d].count) index[d++] = 0;
        if (d == p->ndims) return 1;
    }
}

static void random_piece(strided_piece *p)
{
    static const int64_t grid_strides[] = {16, 48, 96, 192, 384, 768};
    memset(p, 0, sizeof *p);
    p->block = 1 + rnd(40);
    p->ndims = (int)rnd(6); /* past PIECE_VIEW_ARCS: arcs computed as needed */
    for (int d = 0; d < p->ndims; d++) {
        p->dims[d].count = 1 + rnd(5);
        int64_t s = rnd(2) ? grid_strides[rnd(6)] : 1 + rnd(300);
        p->dims[d].stride = rnd(5) ? s : -s;
    }
}

static int random_pairs(int n, int *shared)
{
    static unsigned char a_bytes[SPACE], b_bytes[SPACE];
    static char space[SPACE];
    int unsound = 0;
    *shared = 0;
    for (int i = 0; i < n; i++) {
        strided_piece a, b;
        random_piece(&a);
        random_piece(&b);
        int64_t ab = rnd(SPACE), bb = rnd(SPACE);
        memset(a_bytes, 0, sizeof a_bytes);
        memset(b_bytes, 0, sizeof b_bytes);
        if (!mark(&a, ab, a_bytes) || !mark(&b, bb, b_bytes)) {
            i--;
            continue;
        }
        int common = 0;
        for (int k = 0; k < SPACE && !common; k++) common = a_bytes[k] && b_bytes[k];
        *shared += common;
        /* the base's residues matter: the pieces at the space's real addresses */
        if (common && !pieces_may_overlap(&a, (uintptr_t)space + ab, &b, (uintptr_t)space + bb)) {
            if (unsound++ < 5)
                fprintf(stderr, "hold_overlap: UNSOUND a block=%lld ndims=%d b block=%lld ndims=%d\n",
                        (long long)a.block, a.ndims, (long long)b.block, b.ndims);
        }
    }
    return unsound;
}

/* A box [lo, lo+len) per axis (x, y, z, q) of a grid of X*Y*Z*Q doubles as the canonical
 * form has it: full rows merged with the axis above, single steps dropped. */
struct box {
    int lo[4], len[4];
};
static void piece_of(const struct box *b, const int *size, strided_piece *p, int64_t *offset)
{
    int64_t stride[4] = {8, 8LL * size[0], 8LL * size[0] * size[1], 8LL * size[0] * size[1] * size[2]};
    memset(p, 0, sizeof *p);
    *offset = 0;
    for (int k = 0; k < 4; k++) *offset += b->lo[k] * stride[k];
    p->block = 8LL * b->len[0];
    int k = 1;
    int64_t covered = size[0];
    while (k < 4 && p->block == 8 * covered && p->ndims == 0) { /* full rows: one run with the next axis */
        p->block *= b->len[k];
        covered *= size[k];
        k++;
    }
    for (; k < 4; k++)
        if (b->len[k] > 1) {
            p->dims[p->ndims].count = b->len[k];
            p->dims[p->ndims].stride = stride[k];
            p->ndims++;
        }
}

static int boxes_meet(const struct box *a, const struct box *b)
{
    for (int k = 0; k < 4; k++)
        if (a->lo[k] + a->len[k] <= b->lo[k] || b->lo[k] + b->len[k] <= a->lo[k]) return 0;
    return 1;
}

/* The 26 halo boxes and the 26 interior boxes sent to the neighbours of a cube of n cells. */
static int halo_boxes(int n, int r, int q, struct box *out)
{
    int m = 0;
    for (int pass = 0; pass < 2; pass++) /* 0: halo (received), 1: interior (sent) */
        for (int dz = -1; dz <= 1; dz++)
            for (int dy = -1; dy <= 1; dy++)
                for (int dx = -1; dx <= 1; dx++) {
                    if (!dx && !dy && !dz) continue;
                    int dir[3] = {dx, dy, dz};
                    struct box b;
                    for (int k = 0; k < 3; k++) {
                        if (!dir[k]) b.lo[k] = r, b.len[k] = n;
                        else if (pass == 0) b.lo[k] = dir[k] < 0 ? 0 : n + r, b.len[k] = r;
                        else b.lo[k] = dir[k] < 0 ? r : n, b.len[k] = r;
                    }
                    b.lo[3] = 0, b.len[3] = q;
                    out[m++] = b;
                }
    return m;
}

static int grid_boxes(int *pairs, int *disjoint)
{
    int missed = 0;
    struct box boxes[52];
    *pairs = *disjoint = 0;
    for (int n = 2; n <= 9; n++)
        for (int r = 1; r <= 3; r++)
            for (int q = 1; q <= 4; q++) {
                int size[4] = {n + 2 * r, n + 2 * r, n + 2 * r, q};
                int m = halo_boxes(n, r, q, boxes);
                uintptr_t grid = (uintptr_t)0x7f0000001000ull + 8u * (uintptr_t)rnd(512); /* any alignment */
                for (int i = 0; i < m; i++)
                    for (int j = 0; j < m; j++) {
                        strided_piece a, b;
                        int64_t ao, bo;
                        piece_of(&boxes[i], size, &a, &ao);
                        piece_of(&boxes[j], size, &b, &bo);
                        int meet = boxes_meet(&boxes[i], &boxes[j]);
                        int says = pieces_may_overlap(&a, grid + (uintptr_t)ao, &b, grid + (uintptr_t)bo);
                        (*pairs)++;
                        *disjoint += !meet;
                        if (meet && !says) missed += 1000000; /* unsound: never */
                        if (!meet && says && missed++ < 5)
                            fprintf(stderr, "hold_overlap: boxes %d and %d apart (n=%d r=%d q=%d), said overlapping\n",
                                    i, j, n, r, q);
                    }
            }
    return missed;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 200000, shared, pairs, disjoint;
    int unsound = random_pairs(n, &shared);
    int missed = grid_boxes(&pairs, &disjoint);
    printf("hold_overlap: random=%d shared=%d unsound=%d boxes=%d disjoint=%d missed=%d\n", n, shared, unsound, pairs,
           disjoint, missed);
    return unsound || missed;
}
