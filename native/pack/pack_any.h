/* MPI_Pack / MPI_Unpack on any kind of memory: host buffers go to the host engine;
 * when either side is device memory the device engine runs (kernels straight into
 * device or mapped pinned memory, or through a staging buffer), and a build or device
 * without kernels stages the typed span through the host. */
#ifndef COMMLIB_PACK_ANY_H
#define COMMLIB_PACK_ANY_H

#include <stdint.h>

#include "../cuda/device.h"
#include "../datatype/canonical.h"

int any_pack_message(const canonical_type *ct, const void *inbuf, int64_t incount, void *outbuf, int64_t outsize,
                     int64_t *position);
int any_unpack_message(const canonical_type *ct, const void *inbuf, int64_t insize, int64_t *position, void *outbuf,
                       int64_t outcount);
/* The same for the program's own calls (MPI_Pack, MPI_Unpack, commlib.native.pack/unpack): with
 * COMMLIB_DEVICE_PACK_ASYNC a device-to-device one may return with its kernel still queued
 * (cuda/device.h).  commlib's own uses above always finish their work: what they move is
 * acknowledged to another process or read on another stream right after. */
int any_pack_call(const canonical_type *ct, const void *inbuf, int64_t incount, void *outbuf, int64_t outsize,
                  int64_t *position);
int any_unpack_call(const canonical_type *ct, const void *inbuf, int64_t insize, int64_t *position, void *outbuf,
                    int64_t outcount);

/* Bytes [*lo, *lo + *bytes) relative to the buffer pointer that `count` elements of a
 * type with these bounds touch. */
void typed_span(int64_t true_lb, int64_t true_extent, int64_t extent, int64_t count, int64_t *lo, int64_t *bytes);

/* Whether memory of this kind needs the device path (the CPU cannot address it). */
static inline int buffer_needs_device(enum buffer_kind kind) { return kind == BUFFER_DEVICE; }

#endif
