#define _GNU_SOURCE
#include "driver.h"

#include <dlfcn.h>
#include <limits.h>
#include <link.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../util/log.h"
#include "commlib.h"

struct cuda_driver cuda_driver_table;
int cuda_driver_loaded;        /* 1 once every symbol resolved */
static uint64_t next_check;    /* while absent: when to look again (now_ticks) */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

/* Versioned names: the unsuffixed ones are the old ABI for these calls. */
#define SYMBOLS(X)                                                                           \
    X(cuInit, "cuInit") X(cuDriverGetVersion, "cuDriverGetVersion")                            \
    X(cuGetErrorString, "cuGetErrorString") X(cuPointerGetAttributes, "cuPointerGetAttributes") \
    X(cuCtxGetCurrent, "cuCtxGetCurrent") X(cuCtxSetCurrent, "cuCtxSetCurrent")                \
    X(cuCtxGetDevice, "cuCtxGetDevice") X(cuDeviceGetAttribute, "cuDeviceGetAttribute")        \
    X(cuDeviceGetName, "cuDeviceGetName")                                                      \
    X(cuModuleLoadData, "cuModuleLoadData") X(cuModuleGetFunction, "cuModuleGetFunction")      \
    X(cuModuleUnload, "cuModuleUnload")                                                      \
    X(cuLaunchKernel, "cuLaunchKernel") X(cuStreamCreate, "cuStreamCreate")                    \
    X(cuStreamSynchronize, "cuStreamSynchronize") X(cuMemcpyAsync, "cuMemcpyAsync")            \
    X(cuStreamQuery, "cuStreamQuery")                                                          \
    X(cuMemAlloc, "cuMemAlloc_v2") X(cuMemFree, "cuMemFree_v2")                                \
    X(cuMemHostAlloc, "cuMemHostAlloc") X(cuMemFreeHost, "cuMemFreeHost")                      \
    X(cuEventCreate, "cuEventCreate") X(cuEventRecord, "cuEventRecord")                        \
    X(cuEventQuery, "cuEventQuery") X(cuEventSynchronize, "cuEventSynchronize")                \
    X(cuEventDestroy, "cuEventDestroy_v2") X(cuStreamWaitEvent, "cuStreamWaitEvent")

/* The C library's dlopen (commlib's own, below, only watches it). */
static void *libc_dlopen(const char *file, int mode)
{
    static void *(*next)(const char *, int);
    void *(*f)(const char *, int) = __atomic_load_n(&next, __ATOMIC_ACQUIRE);
    if (!f) {
        *(void **)&f = dlsym(RTLD_NEXT, "dlopen");
        __atomic_store_n(&next, f, __ATOMIC_RELEASE);
    }
    return f(file, mode);
}

static int try_load(void)
{
    /* RTLD_NOLOAD: only a process that already uses CUDA can hold device memory. */
    void *handle = libc_dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (!handle) return 0;
#define RESOLVE(field, name)                                          \
    if (!(*(void **)&cuda_driver_table.field = dlsym(handle, name))) {           \
        commlib_log(LOG_WARN, "CUDA driver lacks %s; GPU support off", name); \
        return 0;                                                     \
    }
    SYMBOLS(RESOLVE)
#undef RESOLVE
    *(void **)&cuda_driver_table.cuIpcGetMemHandle = dlsym(handle, "cuIpcGetMemHandle");
    *(void **)&cuda_driver_table.cuIpcOpenMemHandle = dlsym(handle, "cuIpcOpenMemHandle_v2");
    *(void **)&cuda_driver_table.cuIpcCloseMemHandle = dlsym(handle, "cuIpcCloseMemHandle");
    *(void **)&cuda_driver_table.cuIpcGetEventHandle = dlsym(handle, "cuIpcGetEventHandle");
    *(void **)&cuda_driver_table.cuIpcOpenEventHandle = dlsym(handle, "cuIpcOpenEventHandle");
    *(void **)&cuda_driver_table.cuStreamWriteValue64 = dlsym(handle, "cuStreamWriteValue64_v2");
    *(void **)&cuda_driver_table.cuStreamWaitValue64 = dlsym(handle, "cuStreamWaitValue64_v2");
    if (cuda_driver_table.cuInit(0) != CUDA_SUCCESS) return 0;
    int version = 0;
    cuda_driver_table.cuDriverGetVersion(&version);
    commlib_log(LOG_INFO, "CUDA driver %d.%d found", version / 1000, version % 1000 / 10);
    return 1;
}

/* How commlib learns that libcuda.so.1 arrived, while it is absent:
 *
 * Preloaded (LD_PRELOAD, `commlib run`), libcommlib.so's own dlopen below comes first in
 * the process's symbol lookup, so every dlopen of the program passes through it - the
 * CUDA runtime loading libcuda.so.1, Python importing cupy or torch - and after each one
 * the next check looks again.  Between two dlopens a host-only call costs one load.
 *
 * Otherwise (the cffi bindings, loaded by dlopen into a process whose dlopen is libc's),
 * look again only after a few milliseconds, on the coarse clock (about 6 ns a call; the
 * time-stamp counter costs more).  That cannot miss a device buffer either: between the
 * moment a process loads libcuda and the moment its first device allocation exists lie
 * driver and context initialisation, tens of milliseconds at the least. */
int cuda_dlopen_watched = -1;          /* -1: not known yet; 1: every dlopen passes through ours */
unsigned cuda_dlopen_generation = 1;   /* successful dlopens seen by ours (+1) */
unsigned cuda_looked_at;               /* the generation the last look saw */

/* libc searches for a bare name along the path of the object that calls dlopen: its
 * RPATH or RUNPATH, $ORIGIN included.  Through the wrapper below that object would be
 * libcommlib.so, and a library that finds its own companions that way (libnvrtc loading
 * libnvrtc-builtins from its pip wheel's folder, torch's and cupy's libraries) would
 * fail.  So the caller's own search path (dlinfo lists it, expanded) is walked first. */
static void *dlopen_as(const void *caller, const char *file, int mode)
{
    Dl_info info;
    struct link_map *object = NULL;
    Dl_serinfo size;
    if (!dladdr1(caller, &info, (void **)&object, RTLD_DL_LINKMAP) || !object ||
        dlinfo(object, RTLD_DI_SERINFOSIZE, &size) != 0 || size.dls_size < sizeof size)
        return NULL;
    Dl_serinfo *paths = malloc(size.dls_size);
    void *handle = NULL;
    if (paths && dlinfo(object, RTLD_DI_SERINFOSIZE, paths) == 0 && dlinfo(object, RTLD_DI_SERINFO, paths) == 0)
        for (unsigned i = 0; i < paths->dls_cnt && !handle; i++) {
            char path[PATH_MAX];
            int n = snprintf(path, sizeof path, "%s/%s", paths->dls_serpath[i].dls_name, file);
            if (n > 0 && n < (int)sizeof path && access(path, F_OK) == 0) handle = libc_dlopen(path, mode);
        }
    free(paths);
    return handle;
}

COMMLIB_EXPORT void *dlopen(const char *file, int mode)
{
    void *handle = NULL;
    if (file && !strchr(file, '/')) {
        /* as libc: an object already loaded under that name first, then the caller's path,
         * then (below) the rest of the search - the linker cache */
        handle = libc_dlopen(file, mode | RTLD_NOLOAD);
        if (!handle) handle = dlopen_as(__builtin_return_address(0), file, mode);
        if (handle) dlerror(); /* the misses on the way are not the program's errors */
    }
    if (!handle) handle = libc_dlopen(file, mode);
    /* after the load: a look that sees the new generation finds the library there */
    if (handle) __atomic_add_fetch(&cuda_dlopen_generation, 1, __ATOMIC_RELEASE);
    return handle;
}

static int watched(void)
{
    int w = __atomic_load_n(&cuda_dlopen_watched, __ATOMIC_RELAXED);
    if (w < 0) {
        void *(*ours)(const char *, int) = dlopen;
        w = dlsym(RTLD_DEFAULT, "dlopen") == *(void **)&ours;
        __atomic_store_n(&cuda_dlopen_watched, w, __ATOMIC_RELAXED);
        commlib_log(LOG_DEBUG, "CUDA's arrival is noticed %s", w ? "at each dlopen" : "on a 5 ms clock");
    }
    return w;
}

static uint64_t now_ticks(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

#define RECHECK_TICKS 5000000u /* ns */

const struct cuda_driver *cuda_driver_slow(void)
{
    uint64_t now = 0;
    unsigned generation = 0;
    if (watched()) {
        generation = __atomic_load_n(&cuda_dlopen_generation, __ATOMIC_ACQUIRE);
        if (generation == __atomic_load_n(&cuda_looked_at, __ATOMIC_RELAXED)) return NULL;
    } else if ((now = now_ticks()) < __atomic_load_n(&next_check, __ATOMIC_RELAXED)) {
        return NULL;
    }
    pthread_mutex_lock(&lock);
    if (!cuda_driver_loaded) {
        __atomic_store_n(&cuda_looked_at, generation, __ATOMIC_RELAXED);
        if (try_load()) __atomic_store_n(&cuda_driver_loaded, 1, __ATOMIC_RELEASE);
        else __atomic_store_n(&next_check, now + RECHECK_TICKS, __ATOMIC_RELAXED);
    }
    pthread_mutex_unlock(&lock);
    return cuda_driver_loaded ? &cuda_driver_table : NULL;
}

int cuda_check(CUresult rc, const char *what)
{
    if (rc == CUDA_SUCCESS) return 1;
    const char *text = "unknown error";
    if (cuda_driver_loaded && cuda_driver_table.cuGetErrorString) cuda_driver_table.cuGetErrorString(rc, &text);
    commlib_log(LOG_ERROR, "%s failed: %s (%d)", what, text, rc);
    return 0;
}
