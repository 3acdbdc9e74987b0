/* Device pack engine: the same canonical strided form as the host engine, moved by GPU
 * kernels.  Kernels are compiled at install time by nvcc (when present) and embedded in
 * libcommlib.so, then loaded through the driver API on first use; a build without them
 * still handles device buffers, by staging through the host (see host_or_device_pack). */
#ifndef COMMLIB_DEVICE_PACK_H
#define COMMLIB_DEVICE_PACK_H

#include <stdint.h>

#include "../cuda/device.h"
#include "../datatype/canonical.h"

/* 1 when this build carries kernels and they load on dc's device. */
int device_pack_available(struct device_context *dc);

/* Queues the pack (packing=1: typed -> packed) or unpack (packing=0: packed -> typed) of
 * `count` elements on dc's stream.  Both pointers must be device-accessible (device,
 * managed, or mapped pinned host memory).  Returns 1 when queued; the caller syncs. */
int device_pack_launch(struct device_context *dc, const canonical_type *ct, const void *typed, int64_t count,
                       void *packed, int packing);

#endif
