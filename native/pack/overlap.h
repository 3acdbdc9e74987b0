/* Whether two strided pieces may share a byte (overlap.c says how), for held device
 * MPI_Pack/MPI_Unpack (device_hold.h): an op that may touch what a held op touches
 * launches what is held first.  A held op is tested against up to 63 others, so what the
 * test needs of each piece is computed once (piece_view). */
#ifndef COMMLIB_PACK_OVERLAP_H
#define COMMLIB_PACK_OVERLAP_H

#include <stdint.h>

#include "../datatype/canonical.h"

#define PIECE_VIEW_ARCS 4 /* arcs kept, for the first strides of count > 1 */

/* A piece at its base as the test sees it: its span [lo, hi) (empty: no bytes) and, for
 * its first strides, its arc modulo the stride's size m (whole: the arc covers the circle). */
struct piece_view {
    uintptr_t base, lo, hi;
    int empty, narcs;
    uint64_t m[PIECE_VIEW_ARCS], start[PIECE_VIEW_ARCS], length[PIECE_VIEW_ARCS];
    int whole[PIECE_VIEW_ARCS];
};

void piece_view_init(struct piece_view *v, const strided_piece *p, uintptr_t base);
/* 1 when some byte of piece a (viewed by va, at the base va was made with) may also be one
 * of piece b's; 0: certainly none. */
int views_may_overlap(const strided_piece *a, const struct piece_view *va, const strided_piece *b,
                      const struct piece_view *vb);
/* The same, for pieces not viewed yet (tests/c/hold_overlap.c checks it). */
int pieces_may_overlap(const strided_piece *a, uintptr_t a_base, const strided_piece *b, uintptr_t b_base);

#endif
