/* Device memory as commlib sees it: what kind of memory a pointer is, and per device
 * context the stream, the loaded pack kernels and the staging buffers commlib uses.
 *
 * Ordering rule (the same as CUDA-aware MPIs): a buffer handed to an MPI call must be
 * ready when the call is made - the caller synchronises the work that writes a send
 * buffer, and reads a receive buffer only after the call completed.  commlib's stream
 * is a blocking stream, so work the caller queued on the legacy default stream is
 * ordered before commlib's anyway.
 */
#ifndef COMMLIB_CUDA_DEVICE_H
#define COMMLIB_CUDA_DEVICE_H

#include <stddef.h>
#include <stdint.h>

#include "driver.h"

enum buffer_kind {
    BUFFER_HOST,    /* ordinary host memory (or CUDA absent) */
    BUFFER_PINNED,  /* page-locked host memory known to CUDA (device can map it) */
    BUFFER_DEVICE,  /* device memory: not addressable by the CPU */
    BUFFER_MANAGED  /* managed (unified) memory: both can address it */
};

extern const char *const buffer_kind_name[4];

/* The kind of memory at p.  BUFFER_HOST, without any driver call, whenever CUDA is not
 * loaded in the process or p lies in the brk heap or the calling thread's stack.  The
 * heap test is inline (a small host MPI_Pack asks twice: ~10 ns a call as a function
 * with its once-guard, in a process where CUDA is loaded, as UCX loads it on GPU hosts). */
enum buffer_kind buffer_kind_of_slow(const void *p);
extern uintptr_t buffer_heap_start; /* 0 until found (device.c), then the brk heap's lowest address */
extern void *__curbrk __attribute__((weak)); /* glibc's program break (device.c says why not sbrk(0)) */
static inline enum buffer_kind buffer_kind_of(const void *p)
{
    uintptr_t a = (uintptr_t)p, start = __atomic_load_n(&buffer_heap_start, __ATOMIC_ACQUIRE);
    if (start && a >= start && &__curbrk && a < (uintptr_t)__atomic_load_n(&__curbrk, __ATOMIC_RELAXED))
        return BUFFER_HOST;
    return buffer_kind_of_slow(p);
}

/* Pinned host memory that kernels can address at the same pointer (mapped; under
 * unified addressing the device pointer equals the host one). */
int buffer_device_mapped(const void *p);

/* commlib's state for one device context. */
struct device_context {
    CUcontext context;
    int device;
    int sm_count, threads_per_sm;
    CUstream stream;
    void *kernels;        /* device_pack.c's loaded module, NULL until first use */
    CUdeviceptr scratch;  /* device staging, grown on demand */
    size_t scratch_bytes;
    void *pinned;         /* mapped pinned host staging, grown on demand */
    size_t pinned_bytes;
    /* COMMLIB_DEVICE_PACK_ASYNC (below): work left queued on `stream` without a wait, and
     * the event recorded behind it for other streams to wait for */
    unsigned long long async_ops, async_synced, async_recorded;
    int async_unrecorded; /* ops left queued since async_event was last recorded */
    CUevent async_event;
    /* waits for another process's work (transfer/ipc.c) queued on `stream`, and how many of
     * them a synchronisation of `stream` has seen through */
    unsigned long long peer_waits, peer_waits_synced;
};

/* The context owning device (or managed/pinned) pointer p, made current on this
 * thread; NULL when p is plain host memory or CUDA fails.  Right after buffer_kind_of(p)
 * in the same thread it asks the driver nothing (device.c). */
struct device_context *device_context_of(const void *p);
/* The context current on this thread (or the first one commlib met). */
struct device_context *device_context_current(void);
/* cuCtxSetCurrent(c), unless this thread's current context is known to be c (pointer_cache.h:
 * while CUPTI watches); 1 on success. */
int device_make_current(CUcontext c);

/* Staging buffers of at least `bytes`, owned by the context; valid until the next call
 * that asks for a larger one.  Callers serialise with device_lock(). */
CUdeviceptr device_scratch(struct device_context *dc, size_t bytes);
void *device_pinned(struct device_context *dc, size_t bytes);
void device_lock(struct device_context *dc);
void device_unlock(struct device_context *dc);

/* Copies between any two kinds of memory on the context's stream and waits. */
int device_copy(struct device_context *dc, void *dst, const void *src, size_t bytes);
/* The same without the wait (device_sync ends a series of them). */
int device_copy_async(struct device_context *dc, void *dst, const void *src, size_t bytes);
int device_sync(struct device_context *dc);
/* Waits for the program's own work on the current context's legacy default stream, if any
 * is left (cuStreamQuery first: nothing to wait for costs no synchronisation).  A copy from
 * pageable host memory (cuMemcpyHtoD) returns before its bytes land, cuMemset* and launches
 * at once: commlib's own streams are ordered after such work, another process reading the
 * memory is not (a direct GPU-to-GPU message, transfer/ipc.c).  Returns 1 when it waited,
 * 0 when nothing was left, -1 when CUDA failed. */
int device_legacy_settle(void);

/* One synchronisation for many completions.  Between device_batch_begin and
 * device_batch_end on one thread, device_settle(dc) - the end of an operation whose result
 * only the device reads until the batch ends (an unpack or a copy into device memory) -
 * leaves the work queued on the context's stream and notes the context; device_batch_end
 * waits for every context noted (0 when one of them reports a failure).  Without a batch
 * open, device_settle is device_sync.  Whatever such work reads from host memory (the
 * staging a receive arrived in) must stay untouched until the batch ended; device staging
 * may go back to its pool at once (everything on one context runs on its one stream, in
 * order).  A completion call over 26 staged receives costs one wait instead of 26. */
struct device_batch {
    struct device_batch *outer;
    unsigned long long id; /* unique per batch begun (device_batch_id) */
    int n;
    struct device_context *contexts[8];
    unsigned long long settled; /* operations left queued */
};
void device_batch_begin(struct device_batch *b);
int device_batch_end(struct device_batch *b);
/* A completion call that finishes its requests in rounds as they arrive (interpose/request.c):
 * the next round's work is a new batch id (a wait shared by one round's receives, ipc.c's
 * already_waited, covers only what had arrived before it); launch: what is queued launches
 * now, waited for at the end as ever. */
void device_batch_round(struct device_batch *b, int launch);
/* Closes the batch without waiting: the caller makes sure something waits later. */
void device_batch_abandon(struct device_batch *b);
int device_settle(struct device_context *dc);
/* Work that must be complete when it returns, inside a batch (a partition another thread
 * may be told arrived): device_batch_suspend() ... device_batch_resume(returned). */
struct device_batch *device_batch_suspend(void);
void device_batch_resume(struct device_batch *b);
/* 1 when a batch is open on this thread; the open batch's id (0: none) - a batch begun
 * later never has the same. */
int device_batch_open(void);
unsigned long long device_batch_id(void);
/* Work a layer above queues while a batch is open and launches itself (device_pack.h's
 * deferred unpacks): `flush` runs when a batch on this thread ends, is abandoned or
 * suspended, before anything is waited for.  Set once; it returns 0 on a failure. */
void device_batch_set_flush(int (*flush)(void));
/* Stream-ordered MPI_Pack/MPI_Unpack (COMMLIB_DEVICE_PACK_ASYNC=1, opt-in, never over a
 * CUDA-aware MPI).  An MPI_Pack or MPI_Unpack whose input and output are both device memory
 * returns once its kernel is queued on the context's stream, without waiting for it: the
 * result is ready for everything ordered after that stream - commlib's own later calls on
 * the context, and the program's work on the legacy default stream (commlib's stream is a
 * blocking one) - but a program reading it on a non-blocking stream or a per-thread default
 * stream must synchronise first (cudaDeviceSynchronize, or cudaStreamSynchronize of
 * cudaStreamLegacy).  What commlib does on other streams waits too: the GPU-to-GPU bursts'
 * stream waits for an event recorded behind such ops (device_async_order; recorded once per
 * burst, not per op), a sender whose buffer another process reads (direct GPU-to-GPU
 * messages) synchronises first (device_async_drain).  No op is left queued behind a wait for
 * another process's work (device_before_peer_wait): an event recorded after such a wait
 * would make the bursts - and through them other processes - wait for that process in turn;
 * the op waits synchronously instead, as without the knob, until the stream was synchronised.
 *
 * Only the program's own calls are such ops (pack/pack_any.h any_pack_call): commlib's
 * internal moves are acknowledged to another process or read elsewhere right after.
 *
 * device_async_try: called with device_lock held, before launching the op; 1 when it may
 * be left queued.  device_async_leave: after the launch (device_lock held), counts it. */
int device_async_try(struct device_context *dc);
void device_async_leave(struct device_context *dc);
/* Makes `other` wait for every op left queued so far (*seen: the last event record that
 * stream already waits for); 1 on success or when there is nothing to wait for. */
int device_async_order(struct device_context *dc, CUstream other, unsigned long long *seen);
/* Waits on the host for the ops left queued, if any (then also device_sync). */
int device_async_drain(struct device_context *dc);
/* A wait for another process's work is about to be queued on dc's stream (device_lock held). */
void device_before_peer_wait(struct device_context *dc);

/* device_copy into device memory, ended by device_settle. */
int device_copy_to_device(struct device_context *dc, void *dst, const void *src, size_t bytes);

#endif
