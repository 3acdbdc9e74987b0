/* Held device MPI_Pack/MPI_Unpack (COMMLIB_DEVICE_PACK_HOLD=1, opt-in; implies
 * COMMLIB_DEVICE_PACK_ASYNC).  A halo exchange in pack mode makes 26 MPI_Pack and 26
 * MPI_Unpack calls between device buffers; stream-ordered (COMMLIB_DEVICE_PACK_ASYNC) each
 * still costs a kernel launch, 4-5 us under MPS, ~220 us an exchange at 32^3.  Held, the
 * program's calls only queue their jobs; they are launched together - one kernel per
 * direction and word size - at the entry of the next CUDA call of the process that is not a
 * mere query (cuda/cupti.h: the program's kernel, copy or synchronisation, or commlib's own
 * launch, copy, event record or wait, e.g. the send of a packed buffer), at MPI_Finalize,
 * or before an op whose bytes overlap a held op's (below).  Nothing can reach device memory
 * without such a call, so the results are where the async mode's are when anything looks:
 * queued on commlib's blocking stream, ordered before the legacy default stream's later
 * work and commlib's (the same contract as COMMLIB_DEVICE_PACK_ASYNC, device.h).
 *
 * Held ops are independent of each other: an op that writes bytes a held op reads or
 * writes, or reads bytes a held op writes, first launches everything held.  Overlap is
 * decided exactly for two single strided pieces whose strides nest (a subarray of one
 * grid: a face and the halo beside it), otherwise from the bytes' spans (conservatively).
 *
 * Without CUPTI (not found, or a profiler holds its one subscription) ops are not held:
 * the async mode's per-op launch, with a warning. */
#ifndef COMMLIB_DEVICE_HOLD_H
#define COMMLIB_DEVICE_HOLD_H

#include <stdint.h>

#include "../cuda/device.h"
#include "../datatype/canonical.h"

/* device_lock(dc) held, device_async_try(dc) true, both sides device memory, bytes > 0:
 * 1 when the move of `count` elements (packing: typed -> packed) is held (counted as an op
 * left queued: device_async_leave); 0 when the caller launches it itself. */
int device_hold(struct device_context *dc, const canonical_type *ct, void *typed, int64_t count, void *packed,
                int64_t bytes, int packing);
/* MPI_Finalize: launches what is held and stops watching CUDA calls. */
void device_hold_finalize(void);

#endif
