#include "pack_any.h"

#include <stdlib.h>
#include <string.h>


#include "../util/config.h"
#include "commlib.h"
#include "device_hold.h"
#include "device_pack.h"
#include "host_pack.h"

void typed_span(int64_t true_lb, int64_t true_extent, int64_t extent, int64_t count, int64_t *lo, int64_t *bytes)
{
    int64_t reach = count > 0 ? (count - 1) * extent : 0;
    *lo = true_lb + (reach < 0 ? reach : 0);
    *bytes = true_extent + (reach < 0 ? -reach : reach);
}

static void *at(const void *base, int64_t offset) { return (void *)((uintptr_t)base + (uintptr_t)offset); }

/* Without kernels, packing: one copy of the typed span to host memory (the type map's
 * first and last bytes bound it, so it lies in the program's allocation), the host
 * engine there. */
static int via_host_span(struct device_context *dc, const canonical_type *ct, void *typed, int64_t count, void *packed,
                         int64_t bytes, int packed_on_device)
{
    int64_t lo, span;
    typed_span(ct->true_lb, ct->true_extent, ct->extent, count, &lo, &span);
    char *host = malloc((size_t)span + (size_t)bytes);
    if (!host) return 0;
    char *host_packed = packed_on_device ? host + span : packed;
    int64_t position = 0;
    int ok = device_copy(dc, host, at(typed, lo), (size_t)span);
    if (ok) host_pack_message(ct, at(host, -lo), count, host_packed, bytes, &position);
    if (ok && packed_on_device) ok = device_copy(dc, packed, host_packed, (size_t)bytes);
    free(host);
    return ok;
}

/* Copies every block of one piece (dims[0] fastest) between device typed memory and the
 * packed bytes, one copy per block on the context's stream; *packed advances. */
static int piece_blocks(struct device_context *dc, const strided_piece *p, char *typed, char **packed, int packing)
{
    int64_t index[CANONICAL_MAX_DIMS] = {0};
    for (;;) {
        char *block = typed;
        for (int d = 0; d < p->ndims; d++) block += index[d] * p->dims[d].stride;
        if (!(packing ? device_copy_async(dc, *packed, block, (size_t)p->block)
                      : device_copy_async(dc, block, *packed, (size_t)p->block)))
            return 0;
        *packed += p->block;
        int d = 0;
        while (d < p->ndims && ++index[d] == p->dims[d].count) index[d++] = 0;
        if (d == p->ndims) return 1;
    }
}

/* Without kernels, unpacking: one copy per block of the type map, so that nothing between
 * or past the blocks is written (a buffer sized for its type map; bytes another stream
 * writes between the blocks). */
static int via_block_copies(struct device_context *dc, const canonical_type *ct, void *typed, int64_t count,
                            void *packed, int packing)
{
    char *next = packed;
    strided_piece whole; /* the whole message as one piece: its dense runs merged (MPI_BYTE x n: one copy, not n) */
    if (canonical_single_piece(ct, count, &whole)) {
        if (!piece_blocks(dc, &whole, at(typed, whole.offset), &next, packing)) return 0;
        return packing ? device_sync(dc) : device_settle(dc);
    }
    for (int64_t i = 0; i < count; i++) {
        char *element = at(typed, i * ct->extent);
        for (int j = 0; j < ct->npieces; j++)
            if (!piece_blocks(dc, &ct->pieces[j], at(element, ct->pieces[j].offset), &next, packing)) return 0;
    }
    return packing ? device_sync(dc) : device_settle(dc);
}

/* The host engine on CPU-addressable typed memory, packed bytes on the device, through
 * commlib's pinned staging. */
static int host_engine_device_packed(struct device_context *dc, const canonical_type *ct, void *typed, int64_t count,
                                     void *packed, int64_t bytes, int packing)
{
    char *pinned = device_pinned(dc, (size_t)bytes);
    int64_t position = 0;
    if (!pinned) return 0;
    if (!packing && !device_copy(dc, pinned, packed, (size_t)bytes)) return 0;
    if (packing) host_pack_message(ct, typed, count, pinned, bytes, &position);
    else host_unpack_message(ct, pinned, bytes, &position, typed, count);
    return !packing || device_copy(dc, packed, pinned, (size_t)bytes);
}

/* A kernel on device typed memory; the packed side is host memory, staged on the device. */
static int kernel_host_packed(struct device_context *dc, const canonical_type *ct, void *typed, int64_t count,
                              void *packed, int64_t bytes, int packing)
{
    void *scratch = (void *)(uintptr_t)device_scratch(dc, (size_t)bytes);
    if (!scratch) return 0;
    if (!packing && !device_copy_async(dc, scratch, packed, (size_t)bytes)) return 0;
    if (!device_pack_launch(dc, ct, typed, count, scratch, packing)) return 0;
    return packing ? device_copy(dc, packed, scratch, (size_t)bytes) : device_settle(dc);
}

/* COMMLIB_DEVICE_PACK_ASYNC: the kernel is left queued (device.h); a failed launch waits for
 * what was queued before it. */
static int launch_left_queued(struct device_context *dc, const canonical_type *ct, void *typed, int64_t count,
                              void *packed, int packing)
{
    if (!device_pack_launch(dc, ct, typed, count, packed, packing)) {
        device_sync(dc);
        return 0;
    }
    device_async_leave(dc);
    return 1;
}

/* packed is already offset by the position; at least one side is device memory.  Pinned
 * memory mapped into the device (commlib's own staging, cudaMallocHost) takes the kernel
 * directly - one launch, no copy: the "one-shot" pack of a staged send. */
__attribute__((noinline)) static int device_move(const canonical_type *ct, void *typed, enum buffer_kind typed_kind, int64_t count,
                       void *packed, enum buffer_kind packed_kind, int64_t bytes, int packing, int program_call)
{
    /* typed's first byte, as classified (typed itself may be MPI_BOTTOM, or before its allocation) */
    struct device_context *dc = device_context_of(typed_kind == BUFFER_DEVICE ? at(typed, ct->true_lb) : packed);
    if (!dc) return COMMLIB_ERR_ARG;
    device_lock(dc);
    int kernels = device_pack_available(dc), ok;
    int typed_gpu = typed_kind == BUFFER_DEVICE || typed_kind == BUFFER_MANAGED;
    int packed_gpu = packed_kind == BUFFER_DEVICE || packed_kind == BUFFER_MANAGED ||
                     (kernels && typed_kind == BUFFER_DEVICE && packed_kind == BUFFER_PINNED && buffer_device_mapped(packed));
    if (program_call && kernels && typed_kind == BUFFER_DEVICE && packed_kind == BUFFER_DEVICE && device_async_try(dc))
        /* COMMLIB_DEVICE_PACK_ASYNC: left queued, stream-ordered (device.h); with
           COMMLIB_DEVICE_PACK_HOLD held back and launched with others (device_hold.h) */
        ok = device_hold(dc, ct, typed, count, packed, bytes, packing) ||
             launch_left_queued(dc, ct, typed, count, packed, packing);
    else if (kernels && typed_gpu && packed_gpu)
        /* a result in device memory (an unpack's; a pack's into device memory): a batch
         * may wait for it later (device.h) */
        ok = device_pack_launch(dc, ct, typed, count, packed, packing) &&
             (packing && packed_kind != BUFFER_DEVICE ? device_sync(dc) : device_settle(dc));
    else if (kernels && typed_kind == BUFFER_DEVICE)
        ok = kernel_host_packed(dc, ct, typed, count, packed, bytes, packing);
    else if (typed_kind == BUFFER_DEVICE && packing)
        ok = via_host_span(dc, ct, typed, count, packed, bytes, packed_kind == BUFFER_DEVICE);
    else if (typed_kind == BUFFER_DEVICE)
        ok = via_block_copies(dc, ct, typed, count, packed, 0);
    else
        ok = host_engine_device_packed(dc, ct, typed, count, packed, bytes, packing);
    device_unlock(dc);
    return ok ? COMMLIB_OK : COMMLIB_ERR_ARG;
}

static int any_move(const canonical_type *ct, void *typed, int64_t count, void *packed_base, int64_t packed_size,
                    int64_t *position, int packing, int program_call)
{
    int64_t bytes;
    int rc = pack_check(ct, count, packed_size, position, packed_base, &bytes);
    if (rc != COMMLIB_OK) return rc;
    char *packed = (char *)packed_base + *position;
    if (bytes > 0) {
        /* with MPI_BOTTOM the pointer is 0: classify where the data actually is */
        enum buffer_kind typed_kind = BUFFER_HOST, packed_kind = BUFFER_HOST;
        if (commlib_config.gpu && cuda_driver()) { /* no CUDA in the process: host memory */
            packed_kind = buffer_kind_of(packed);
            typed_kind = buffer_kind_of(at(typed, ct->true_lb)); /* last: device_move asks for its context */
        }
        if (buffer_needs_device(typed_kind) || buffer_needs_device(packed_kind)) {
            rc = device_move(ct, typed, typed_kind, count, packed, packed_kind, bytes, packing, program_call);
            if (rc != COMMLIB_OK) return rc;
        } else if (ct->npieces == 1 && ct->pieces[0].ndims == 0 && (count == 1 || ct->extent == ct->size)) {
            /* one dense run (MPI_BYTE x n, adjacent blocks, contiguous elements): the copy
             * itself, as the host MPIs do.  Through host_move's walk such a pack cost 2-4 ns
             * more a call: on the H200 host's Xeon 8-256 B and 1 KiB packs went at 0.51-0.97x
             * MPICH's and Open MPI's, now 1.06-1.26x (commlib bench pack --filter dense). */
            char *run = at(typed, ct->pieces[0].offset);
            if (packing) memcpy(packed, run, (size_t)bytes);
            else memcpy(run, packed, (size_t)bytes);
        } else {
            host_move(ct, typed, count, packed, packing);
        }
    }
    *position += bytes;
    return COMMLIB_OK;
}

int any_pack_message(const canonical_type *ct, const void *inbuf, int64_t incount, void *outbuf, int64_t outsize,
                     int64_t *position)
{
    return any_move(ct, (void *)inbuf, incount, outbuf, outsize, position, 1, 0);
}

int any_unpack_message(const canonical_type *ct, const void *inbuf, int64_t insize, int64_t *position, void *outbuf,
                       int64_t outcount)
{
    return any_move(ct, outbuf, outcount, (void *)inbuf, insize, position, 0, 0);
}

int any_pack_call(const canonical_type *ct, const void *inbuf, int64_t incount, void *outbuf, int64_t outsize,
                  int64_t *position)
{
    return any_move(ct, (void *)inbuf, incount, outbuf, outsize, position, 1, 1);
}

int any_unpack_call(const canonical_type *ct, const void *inbuf, int64_t insize, int64_t *position, void *outbuf,
                    int64_t outcount)
{
    return any_move(ct, outbuf, outcount, (void *)inbuf, insize, position, 0, 1);
}
