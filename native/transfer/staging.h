/* Staging buffers for device transfers: host (malloc), pinned host (cuMemHostAlloc,
 * mapped) and device memory, kept in small pools because pinned and device allocation
 * cost milliseconds and a fresh malloc of megabytes faults in every page again.  Several
 * nonblocking operations are in flight at once, so each takes a buffer of its own. */
#ifndef COMMLIB_STAGING_H
#define COMMLIB_STAGING_H

#include <stddef.h>

#include "../cuda/device.h"

enum staging_kind { STAGING_HOST, STAGING_PINNED, STAGING_DEVICE, STAGING_KINDS };

/* A buffer of at least `need` bytes of `kind` (for pinned and device memory, dc's
 * context or some context current on this thread); *size gets its capacity and *got_kind
 * the kind it really is: pinned memory that cannot be had becomes malloc memory (slower,
 * still right); device memory that cannot be had is NULL, the caller takes another way. */
void *staging_get(struct device_context *dc, int kind, size_t need, size_t *size, int *got_kind);
/* Gives a buffer back to its pool (any thread); the pool keeps the largest few. */
void staging_put(int kind, void *p, size_t size, struct device_context *dc);

#endif
