/* The device pack kernels compiled at run time by NVRTC, for a build without nvcc or a
 * GPU the embedded fatbin does not serve (device_pack.c decides when).
 *
 * libnvrtc is found by dlopen, like the driver (native/cuda/driver.h): no CUDA headers
 * or libraries at build time.  The source is device_kernels.cu, embedded as text by
 * setup.py.  Compiled images are cached on disk, keyed by a hash of the source, the
 * options and the NVRTC version, so only the first process on a machine pays the
 * compile (seconds).
 */
#ifndef COMMLIB_PACK_NVRTC_H
#define COMMLIB_PACK_NVRTC_H

#include <stddef.h>

/* setup.py's generated file: the text of native/pack/device_kernels.cu (NUL-terminated). */
extern const char commlib_device_kernels_source[];
extern const size_t commlib_device_kernels_source_size; /* without the NUL */

/* What one compile is for: the target and options chosen for a device, and where its
 * result is cached. */
struct nvrtc_plan {
    int cubin;            /* 1: machine code for exactly this device; 0: PTX the driver compiles */
    char target[32];      /* "sm_90" or "compute_90" */
    char options[4][64];  /* passed to nvrtcCompileProgram */
    int noptions;
    char cache_path[4096]; /* "" when there is no cache directory */
    char library[4096];    /* the libnvrtc used */
    int major, minor;      /* its version */
};

/* The CUDA driver's version (cuDriverGetVersion): the NVRTC of its major version is
 * preferred, since a driver loads no machine code from a newer toolkit.  Before the
 * first nvrtc_plan_for. */
void nvrtc_prefer_driver(int cuda_version);

/* Loads NVRTC (once per process; COMMLIB_NVRTC first, then the search) and plans the
 * compile for compute capability cc (major * 10 + minor).  0, with the reason logged at
 * warn level, when NVRTC is absent or knows no architecture this device can run. */
int nvrtc_plan_for(int cc, struct nvrtc_plan *plan);

/* A valid cached image for the plan (malloc'ed, *bytes set), or NULL: absent, unreadable
 * or corrupt entries are ignored (the caller compiles and overwrites them). */
void *nvrtc_cache_read(const struct nvrtc_plan *plan, size_t *bytes);
/* Stores an image that loaded; failures only cost the next process a compile. */
void nvrtc_cache_write(const struct nvrtc_plan *plan, const void *image, size_t bytes);

/* Compiles the embedded source; a malloc'ed cubin or NUL-terminated PTX, or NULL with
 * NVRTC's compile log written at warn level. */
void *nvrtc_compile(const struct nvrtc_plan *plan, size_t *bytes);

/* JSON for `commlib info`: the NVRTC found (loading it if needed), the cache directory. */
size_t nvrtc_info_json(char *buf, size_t len);

#endif
