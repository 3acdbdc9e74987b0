/* Device allocations remembered while CUPTI watches the process's CUDA calls.
 *
 * Each MPI call on a device buffer asks the driver what the pointer is (cuPointerGetAttributes:
 * a call with a lock, 0.1-0.15 us on the H200 host); a halo exchange of 26 messages in pack
 * mode asks 156 times.  An allocation's kind and context change only through a CUDA call that
 * allocates, frees or maps memory.  While CUPTI calls commlib back at every CUDA call
 * (cupti.h; COMMLIB_DEVICE_PACK_HOLD=1 subscribes) those calls are seen, so the answers for
 * device allocations are kept - by the allocation's range, from the same query - and all are
 * forgotten at the entry and at the exit of any such call (cupti.c names them).  Without
 * CUPTI nothing is kept: every classification asks the driver, as before.
 * COMMLIB_POINTER_CACHE=0 turns it off. */
#ifndef COMMLIB_CUDA_POINTER_CACHE_H
#define COMMLIB_CUDA_POINTER_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "driver.h"

/* CUPTI began (empty, on unless COMMLIB_POINTER_CACHE=0) / stopped watching (off, empty). */
void pointer_cache_start(void);
void pointer_cache_stop(void);
/* A CUDA call that may allocate, free or map memory: everything kept is forgotten. */
void pointer_cache_forget(void);

/* 1 while answers are kept. */
int pointer_cache_on(void);
/* The device allocation holding p, when kept: 1 and its context. */
int pointer_cache_find(const void *p, CUcontext *context);
/* Read before a query; pointer_cache_add keeps its answer only if nothing was forgotten since
 * (a free on another thread between the two). */
uint64_t pointer_cache_generation(void);
void pointer_cache_add(uint64_t generation, CUdeviceptr start, size_t size, CUcontext context);

/* The context this thread made current through device_make_current (cuda/device.h), kept
 * while CUPTI watches: every call that may change the calling thread's current context (cupti.c
 * names them: set, push, pop, create, cudaSetDevice...) forgets that thread's, one that may end
 * a context (destroy, primary-context release and reset, cudaDeviceReset...) every thread's.
 * A device halo exchange set the same context ~160 times (0.05 us each on the H100 host). */
void pointer_cache_context_switched(int every_thread);
/* 1 when the current context is kept while CUPTI watches (COMMLIB_POINTER_CACHE on, no
 * COMMLIB_TEST_CONTEXT_EACH=1): the switching calls' callbacks must then stay on. */
int pointer_cache_context_kept(void);
/* 1 when this thread's current context is known to be c. */
int pointer_cache_current_is(CUcontext c);
/* This thread just made c current (after the call: its own callbacks have run). */
void pointer_cache_note_current(CUcontext c);

#endif
