/* What a receive touches, as MPI defines it: a receive into (count, type) writes the bytes
 * of the type map of the elements that arrived - not the gaps between blocks, not what
 * lies past a short message - and reads nothing of the buffer.  Where commlib lets the
 * host MPI receive into a host copy of the program's buffer (device memory, or host
 * memory under COMMLIB_STAGE_HOST), the copy goes back through a typemap, so the program
 * sees exactly what a receive into its own buffer would have left, and a buffer sized
 * for the message (smaller than the type's extent) is never read or written past it.  An
 * operation that also reads its receive buffer (MPI_IN_PLACE) fills the copy the same
 * way: only the type map's bytes are read.
 *
 * The map is taken at the call, while the program's type is certainly alive (it may free
 * the type before a nonblocking operation completes): commlib's canonical form where the
 * type reduces (the pieces are in type-map order, the order the bytes of a message fill
 * an element), else the host MPI's own answer - PMPI_Unpack of one element, once with
 * every packed byte 0xff into a cleared buffer (which bytes it writes) and once per byte
 * of the packed position (where each of them sits in the message) - so that types commlib
 * leaves to the MPI (empty blocks, too many pieces, long double, ...) and messages ending
 * inside an element write exactly the bytes the MPI would. */
#ifndef COMMLIB_TRANSFER_TYPEMAP_H
#define COMMLIB_TRANSFER_TYPEMAP_H

#include <mpi.h>
#include <stdint.h>

#include "../cuda/device.h"
#include "../datatype/canonical.h"

/* Elements of one type the operation writes: `count` at byte displacement `displ` from
 * the buffer pointer, per block (vector collectives have one block per peer). */
struct typemap_block {
    int64_t displ, count;
};

struct typemap {
    int64_t size;          /* packed bytes per element (MPI_Type_size) */
    canonical_type *ct;    /* one element's blocks in type-map order (private copy) */
    /* From the host MPI's answer only: the element's runs with the packed position of
     * their first byte, ordered by it (a long double, for one, may fill fewer bytes
     * than it takes in the message); NULL for commlib's own canonical forms. */
    int64_t nruns;
    int64_t *run_offset, *run_length, *run_packed;
    int nblocks;
    struct typemap_block *blocks;
};

/* The map of `type` with no blocks yet; 1 on success, 0 when the type cannot be mapped
 * (an error of the MPI, or an element spanning more than TYPEMAP_MPI_SPAN_MAX bytes that
 * commlib does not reduce; logged). */
#define TYPEMAP_MPI_SPAN_MAX ((int64_t)64 << 20)
int typemap_init(struct typemap *m, MPI_Datatype type);
int typemap_add_block(struct typemap *m, int64_t displ, int64_t count);
void typemap_free(struct typemap *m);

/* Moves the bytes the blocks' elements occupy between the program's buffer and a host
 * copy of it (`copy` plays the buffer pointer): to_program 1 after a receive of
 * `received` packed bytes (-1: every element; the blocks fill in order), 0 to fill the
 * copy before an operation that reads the buffer.  dc: the program buffer's device
 * context (NULL: host memory).  1 on success. */
int typemap_copy(const struct typemap *m, struct device_context *dc, void *program, void *copy, int64_t received,
                 int to_program);

/* The same for `count` whole elements at byte displacement `displ` from the buffer
 * pointer, whatever the blocks (a partition of a partitioned request). */
int typemap_copy_elements(const struct typemap *m, struct device_context *dc, void *program, void *copy, int64_t displ,
                          int64_t count, int to_program);

/* Packed bytes of all blocks. */
int64_t typemap_bytes(const struct typemap *m);

#endif
