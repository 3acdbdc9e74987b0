/* commlib public C API.
 *
 * The preload library exports these next to the MPI_* entry points so that a program
 * (or the Python bindings, through cffi) can query what the interposer did.  A program
 * that must run with and without the preload finds them with dlsym(RTLD_DEFAULT, ...).
 */
#ifndef COMMLIB_H
#define COMMLIB_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The library is built with hidden visibility; only the MPI_* entry points and these
 * functions are exported (internal calls then need no PLT indirection). */
#define COMMLIB_EXPORT __attribute__((visibility("default")))

/* Return codes of the commlib_type_* functions. */
enum {
    COMMLIB_OK = 0,
    COMMLIB_ERR_UNSUPPORTED = 1, /* the type did not reduce to strided pieces */
    COMMLIB_ERR_TRUNCATE = 2,    /* output (or input) buffer too small */
    COMMLIB_ERR_ARG = 3,         /* bad argument (negative count, NULL pointer, ...) */
    COMMLIB_ERR_UNKNOWN_TYPE = 4 /* handle not registered / not committed */
};

/* A counter by name ("pack.fast", "types.canonical", ...), or -1 for an unknown name. */
COMMLIB_EXPORT long long commlib_stat(const char *name);
/* All counters as one JSON object; returns the length written (truncated to len). */
COMMLIB_EXPORT size_t commlib_stats_json(char *buf, size_t len);

/* JSON: version, the MPI family/library/ABI this build targets, CUDA support. */
COMMLIB_EXPORT const char *commlib_build_info(void);
/* JSON list of the knobs: name, default, value in effect, meaning. */
COMMLIB_EXPORT size_t commlib_knobs_json(char *buf, size_t len);
/* JSON: whether the MPI takes device pointers, the send/receive method model in effect
 * (file or built-in, and why) and the methods it picks at a few sizes.  Reads the model
 * file on first use; call after MPI_Init, with the CUDA context of interest current. */
COMMLIB_EXPORT size_t commlib_model_json(char *buf, size_t len);
/* JSON: where device pack kernels come from - the route (COMMLIB_KERNELS), the embedded
 * fatbin and source sizes, the NVRTC found for run-time compiles, the cache folder. */
COMMLIB_EXPORT size_t commlib_kernels_json(char *buf, size_t len);

/* Type handles are passed as intptr_t so that callers need no mpi.h (an MPICH handle
 * is an int, an Open MPI handle a pointer; mpi4py's handle value fits both). */
COMMLIB_EXPORT int commlib_type_register(intptr_t handle, char *json, size_t len);
COMMLIB_EXPORT int commlib_type_forget(intptr_t handle);
COMMLIB_EXPORT int commlib_type_pack(intptr_t handle, const void *inbuf, int64_t incount, void *outbuf,
                      int64_t outsize, int64_t *position);
COMMLIB_EXPORT int commlib_type_unpack(intptr_t handle, const void *inbuf, int64_t insize, int64_t *position,
                        void *outbuf, int64_t outcount);
COMMLIB_EXPORT int commlib_type_pack_size(intptr_t handle, int64_t count, int64_t *size);

#ifdef __cplusplus
}
#endif
#endif
