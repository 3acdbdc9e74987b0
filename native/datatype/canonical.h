/* Canonical strided form of an MPI datatype.
 *
 * A committed type becomes an ordered list of strided pieces.  Each piece is a
 * contiguous block of `block` bytes at `offset`, repeated over any number of
 * (count, stride) dimensions; dims[0] varies fastest.  Pieces and dimensions are kept
 * in type-map order, which is the order MPI_Pack writes bytes in, so the pack loops
 * need no other description.  Most real types (vector, subarray, regular indexed,
 * resized arrays of structs) reduce to a single piece.
 */
#ifndef COMMLIB_CANONICAL_H
#define COMMLIB_CANONICAL_H

#include <mpi.h>
#include <stdint.h>

#include "../util/stats.h"

#define CANONICAL_MAX_DIMS 32

typedef struct {
    int64_t count;
    int64_t stride; /* bytes; may be negative or zero */
} stride_dim;

typedef struct {
    int64_t offset; /* bytes from the buffer pointer to the first block */
    int64_t block;  /* contiguous bytes per block (> 0) */
    int ndims;
    stride_dim dims[CANONICAL_MAX_DIMS];
} strided_piece;

typedef struct canonical_type {
    enum type_reason unsupported; /* TYPE_REASON_NONE when the pieces below are valid */
    int64_t size;                 /* packed bytes per element (MPI_Type_size) */
    int64_t lb, extent;           /* stride between elements when count > 1 */
    int64_t true_lb, true_extent;
    int npieces;
    strided_piece *pieces;
} canonical_type;

/* Decodes a committed (or predefined) type with envelope/contents; never fails hard:
 * a type that does not reduce comes back with `unsupported` set and no pieces. */
canonical_type *canonical_type_create(MPI_Datatype type, int max_pieces);
void canonical_type_destroy(canonical_type *ct);

/* A one-line JSON description (for the Python bindings and debugging). */
size_t canonical_type_json(const canonical_type *ct, char *buf, size_t len);

/* The piece describing `count` consecutive elements, when the whole message is a single
 * strided piece (fills *out and returns 1), so the pack loop runs once. */
int canonical_single_piece(const canonical_type *ct, int64_t count, strided_piece *out);

/* A canonical form for blocks listed in type-map order (offset, length in bytes, relative
 * to the buffer pointer; empty blocks skipped), merged into strided pieces as the decoder
 * merges them; `extent` is the stride between elements.  NULL when out of memory. */
canonical_type *canonical_type_from_blocks(int64_t nblocks, const int64_t *offsets, const int64_t *lengths,
                                           int64_t extent);

/* The first `bytes` packed bytes of one element (0 < bytes <= ct->size) as a type of its
 * own, in type-map order: what a message ending inside an element fills.  Its pieces go
 * to `storage` (room for CANONICAL_PREFIX_MAX(ct)); 0 on overflow. */
int canonical_prefix(const canonical_type *ct, int64_t bytes, canonical_type *prefix, strided_piece *storage);
#define CANONICAL_PREFIX_MAX(ct) ((ct)->npieces + CANONICAL_MAX_DIMS + 1)

#endif
