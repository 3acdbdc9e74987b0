/* CUPTI's API callbacks: commlib told at the entry of every CUDA call of the process.
 *
 * COMMLIB_DEVICE_PACK_HOLD (pack/device_hold.h) holds the program's device MPI_Pack and
 * MPI_Unpack calls back and launches them together; what makes that correct is that no CUDA
 * work can reach their buffers without a CUDA call - the program's own (a kernel, a copy, a
 * synchronisation) or commlib's (a send's copy, an event a burst waits for) - and CUPTI,
 * NVIDIA's profiling interface, calls back at the entry of each one, runtime and driver API,
 * in the calling thread, before the call does anything.  There the held work is launched.
 *
 * libcupti is loaded at run time (COMMLIB_CUPTI, else the sonames, CUDA_HOME, CUDA_PATH,
 * /usr/local/cuda); its few types are declared in cupti.c, so the build needs no CUDA
 * headers.  CUPTI admits one subscriber per process: under a profiler that holds it (Nsight
 * Systems, torch's profiler while it runs), cupti_watch fails and the caller does without. */
#ifndef COMMLIB_CUDA_CUPTI_H
#define COMMLIB_CUDA_CUPTI_H

/* Subscribes once (later calls return the first one's answer): on_call(function) runs at the
 * entry of every CUDA call but those that only ask (pointer and device attributes, the
 * current context, an event's state: they cannot observe device memory) and, for the
 * runtime API, once per outermost call (not again for the driver calls it makes); never
 * inside cupti_quiet_begin/end on the same thread.  1 when watching. */
int cupti_watch(void (*on_call)(const char *function));
/* Why cupti_watch failed ("" before it was asked, or when it did not). */
const char *cupti_failure(void);
/* Unsubscribes (MPI_Finalize); a later cupti_watch subscribes again. */
void cupti_unwatch(void);
/* commlib's own CUDA calls that must not call back (the launch of held work itself, and
 * the calls of the path that holds it); nests. */
void cupti_quiet_begin(void);
void cupti_quiet_end(void);

#endif
