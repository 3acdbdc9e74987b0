/* Device pack engine: the same canonical strided form as the host engine, moved by GPU
 * kernels.  Kernels are compiled at install time by nvcc (when present) and embedded in
 * libcommlib.so, or compiled at run time by NVRTC from the embedded source, then loaded
 * through the driver API on first use; without either, device buffers are staged
 * through the host (pack_any.c). */
#ifndef COMMLIB_DEVICE_PACK_H
#define COMMLIB_DEVICE_PACK_H

#include <stdint.h>

#include "../cuda/device.h"
#include "../datatype/canonical.h"

/* 1 when kernels load on dc's device (the embedded fatbin, or NVRTC's: COMMLIB_KERNELS). */
int device_pack_available(struct device_context *dc);

/* JSON for `commlib info`: the route chosen, the fatbin and source sizes embedded, and
 * the NVRTC found for run-time compiles (loads it). */
size_t device_kernels_json(char *buf, size_t len);

/* Queues the pack (packing=1: typed -> packed) or unpack (packing=0: packed -> typed) of
 * `count` elements on dc's stream.  Both pointers must be device-accessible (device,
 * managed, or mapped pinned host memory).  Returns 1 when queued; the caller syncs. */
int device_pack_launch(struct device_context *dc, const canonical_type *ct, const void *typed, int64_t count,
                       void *packed, int packing);

/* Inside a device batch (cuda/device.h) on this thread: queues the unpack of `count`
 * elements from `packed` into `typed` (both device memory) and returns 1; the batch's end
 * launches all the unpacks queued on this thread in one kernel per word size (a
 * completion call's 26 receives: one or two launches instead of 26), before it waits.
 * `packed` must stay as it is until then.  0 (nothing queued): no batch open, no kernels,
 * or a piece the batched kernel does not take (over 3 dimensions, 64-bit index math) -
 * the caller unpacks as usual.  The caller notes dc with device_settle, as for any unpack. */
int device_unpack_deferred(struct device_context *dc, const canonical_type *ct, void *typed, int64_t count,
                           const void *packed);
/* The pack of one strided piece (p->offset ignored: `typed` is its first byte) into dense
 * bytes at `packed`, both device memory: inside a device batch queued for the batch's
 * launches like device_unpack_deferred (before every unpack of the batch), else launched.
 * 1 when queued or launched (the caller notes dc with device_settle); 0: no kernels. */
int device_pack_piece(struct device_context *dc, const strided_piece *p, const void *typed, void *packed);
/* One pass from a strided piece `from` at `src` (p->offset ignored; a GPU-to-GPU direct
 * message's piece in the sender's memory, mapped here) straight into `count` elements of ct
 * at `typed`, where device_pack_piece into scratch and an unpack of that are two passes over
 * the bytes (on an H200, 4 MiB of every other double: 7.3 us against 13.2,
 * tests/gpu/strided_passes.cu).  Inside a device batch queued for its launches (after its
 * packs, before its unpacks), else launched.  1 when queued or launched (the caller notes dc
 * with device_settle); 0, nothing done: no kernels, ct not one piece, the byte counts differ,
 * a piece over 3 dimensions or past 32-bit index math - move as before. */
int device_copy_piece(struct device_context *dc, const strided_piece *from, const void *src, const canonical_type *ct,
                      void *typed, int64_t count);
/* A queue of packs that any thread may launch later, in one kernel per word size
 * (transfer/ipc.c: GPU-to-GPU sends whose packs wait for the burst's last send).  The
 * caller serialises every use of one queue.  Queues the pack of `count` elements of ct
 * from `typed` into `packed` (device memory) for `stream` (one of dc's); the queue is
 * created on first use and holds one context's and stream's jobs at a time.  1 queued; 0
 * not taken (no kernels, a piece the batched kernel does not take, the queue holds other
 * jobs): pack as usual.  A full batch launches at once. */
struct deferred_moves;
int device_pack_queue_add(struct deferred_moves **queue, struct device_context *dc, const canonical_type *ct,
                          const void *typed, int64_t count, void *packed, CUstream stream);
/* The same for the program's held MPI_Pack (packing = 1) and MPI_Unpack (0) calls
 * (pack/device_hold.h), both directions in one queue, launched on the context's stream;
 * the caller makes sure the jobs are independent of each other. */
int device_hold_queue_add(struct deferred_moves **queue, struct device_context *dc, const canonical_type *ct,
                          void *typed, int64_t count, void *packed, int packing);
/* Launches every job queued, packs then unpacks (the queue's context made current
 * meanwhile); 1 on success. */
int device_pack_queue_launch(struct deferred_moves *queue);
/* Launches this thread's queued packs, then its queued unpacks (set as the device batch's
 * flush; a caller about to launch something that must come after them calls it too). */
int device_deferred_flush(void);
/* The bytes this thread's deferred moves queued since they last launched. */
int64_t device_deferred_bytes(void);

#endif
