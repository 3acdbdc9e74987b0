/* Host pack engine: moves bytes between a typed buffer and a packed buffer following
 * the canonical strided form.  The innermost loop is specialised by block size. */
#ifndef COMMLIB_HOST_PACK_H
#define COMMLIB_HOST_PACK_H

#include <stdint.h>

#include "../datatype/canonical.h"

/* MPI_Pack / MPI_Unpack semantics on a canonical type: bounds and arguments checked,
 * *position advanced.  Returns COMMLIB_OK or COMMLIB_ERR_* (commlib.h) without touching
 * any byte when it fails, so the caller can hand the call to the host MPI instead. */
/* The argument and bounds checks of both: the packed byte count in *bytes, or an error. */
int pack_check(const canonical_type *ct, int64_t count, int64_t bufsize, const int64_t *position,
               const void *packed_buf, int64_t *bytes);

/* The loops alone, no checks: `count` elements between typed and packed memory. */
void host_move(const canonical_type *ct, char *typed, int64_t count, char *packed, int packing);

int host_pack_message(const canonical_type *ct, const void *inbuf, int64_t incount, void *outbuf,
                      int64_t outsize, int64_t *position);
int host_unpack_message(const canonical_type *ct, const void *inbuf, int64_t insize, int64_t *position,
                        void *outbuf, int64_t outcount);

#endif
