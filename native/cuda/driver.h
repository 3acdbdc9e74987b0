/* The CUDA driver API, found at run time.
 *
 * commlib never links against CUDA: libcuda.so.1 is dlopen'ed the first time a buffer
 * might be device memory, and only when the process has already loaded it (a process
 * that never touched a GPU has no device memory to pass us).  The few types and
 * constants used are declared here, so the build needs no CUDA headers either.
 */
#ifndef COMMLIB_CUDA_DRIVER_H
#define COMMLIB_CUDA_DRIVER_H

#include <stddef.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct CUctx_st *CUcontext;
typedef struct CUmod_st *CUmodule;
typedef struct CUfunc_st *CUfunction;
typedef struct CUstream_st *CUstream;
typedef struct CUevent_st *CUevent;

#define CUDA_SUCCESS 0
#define CUDA_ERROR_NOT_READY 600 /* cuEventQuery: work still queued before the event */
#define CU_MEMORYTYPE_HOST 1
#define CU_MEMORYTYPE_DEVICE 2
#define CU_MEMORYTYPE_UNIFIED 4
#define CU_POINTER_ATTRIBUTE_CONTEXT 1
#define CU_POINTER_ATTRIBUTE_MEMORY_TYPE 2
#define CU_POINTER_ATTRIBUTE_DEVICE_POINTER 3
#define CU_POINTER_ATTRIBUTE_BUFFER_ID 7
#define CU_POINTER_ATTRIBUTE_IS_MANAGED 8
#define CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL 9
#define CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE 10
#define CU_POINTER_ATTRIBUTE_RANGE_START_ADDR 11
#define CU_POINTER_ATTRIBUTE_RANGE_SIZE 12
#define CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT 16
#define CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR 39
#define CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR 75
#define CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR 76
#define CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS 122
#define CU_STREAM_WAIT_VALUE_GEQ 0x0 /* until (int64_t)(*addr - value) >= 0 */
#define CU_STREAM_WRITE_VALUE_DEFAULT 0x0 /* with a memory fence before the write */
#define CU_MEMHOSTALLOC_PORTABLE 0x01
#define CU_MEMHOSTALLOC_DEVICEMAP 0x02
#define CU_STREAM_DEFAULT 0x0
#define CU_STREAM_LEGACY ((CUstream)0x1) /* the current context's legacy default stream */
#define CU_EVENT_DISABLE_TIMING 0x2
#define CU_EVENT_INTERPROCESS 0x4
#define CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS 0x1

typedef struct {
    char reserved[64];
} CUipcMemHandle;
typedef struct {
    char reserved[64];
} CUipcEventHandle;

struct cuda_driver {
    CUresult (*cuInit)(unsigned flags);
    CUresult (*cuDriverGetVersion)(int *version);
    CUresult (*cuGetErrorString)(CUresult error, const char **text);
    CUresult (*cuPointerGetAttributes)(unsigned count, int *attributes, void **data, CUdeviceptr ptr);
    CUresult (*cuCtxGetCurrent)(CUcontext *ctx);
    CUresult (*cuCtxSetCurrent)(CUcontext ctx);
    CUresult (*cuCtxGetDevice)(CUdevice *device);
    CUresult (*cuDeviceGetAttribute)(int *value, int attribute, CUdevice device);
    CUresult (*cuDeviceGetName)(char *name, int len, CUdevice device);
    CUresult (*cuModuleLoadData)(CUmodule *module, const void *image);
    CUresult (*cuModuleGetFunction)(CUfunction *function, CUmodule module, const char *name);
    CUresult (*cuModuleUnload)(CUmodule module);
    CUresult (*cuLaunchKernel)(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                               unsigned bz, unsigned shared_bytes, CUstream stream, void **params, void **extra);
    CUresult (*cuStreamCreate)(CUstream *stream, unsigned flags);
    CUresult (*cuStreamSynchronize)(CUstream stream);
    CUresult (*cuStreamQuery)(CUstream stream);
    CUresult (*cuMemcpyAsync)(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream stream);
    CUresult (*cuMemAlloc)(CUdeviceptr *ptr, size_t bytes);
    CUresult (*cuMemFree)(CUdeviceptr ptr);
    CUresult (*cuMemHostAlloc)(void **ptr, size_t bytes, unsigned flags);
    CUresult (*cuMemFreeHost)(void *ptr);
    CUresult (*cuEventCreate)(CUevent *event, unsigned flags);
    CUresult (*cuEventRecord)(CUevent event, CUstream stream);
    CUresult (*cuEventQuery)(CUevent event);
    CUresult (*cuEventSynchronize)(CUevent event);
    CUresult (*cuEventDestroy)(CUevent event);
    CUresult (*cuStreamWaitEvent)(CUstream stream, CUevent event, unsigned flags);
    /* optional (NULL when the driver lacks them): inter-process memory (transfer/ipc.h) */
    CUresult (*cuIpcGetMemHandle)(CUipcMemHandle *handle, CUdeviceptr ptr);
    CUresult (*cuIpcOpenMemHandle)(CUdeviceptr *ptr, CUipcMemHandle handle, unsigned flags);
    CUresult (*cuIpcCloseMemHandle)(CUdeviceptr ptr);
    CUresult (*cuIpcGetEventHandle)(CUipcEventHandle *handle, CUevent event);
    CUresult (*cuIpcOpenEventHandle)(CUevent *event, CUipcEventHandle handle);
    /* optional: stream memory operations (the _v2 forms, CUDA 11.7+) */
    CUresult (*cuStreamWriteValue64)(CUstream stream, CUdeviceptr addr, unsigned long long value, unsigned flags);
    CUresult (*cuStreamWaitValue64)(CUstream stream, CUdeviceptr addr, unsigned long long value, unsigned flags);
};

/* The driver when libcuda.so.1 is loaded in this process (NULL otherwise).  One load
 * once found; while CUDA is absent it looks again after each dlopen of the program
 * (preloaded) or at most every few milliseconds (driver.c says why). */
extern struct cuda_driver cuda_driver_table;
extern int cuda_driver_loaded;
/* driver.c: while absent and preloaded, no dlopen since the last look means still absent */
extern int cuda_dlopen_watched;
extern unsigned cuda_dlopen_generation, cuda_looked_at;
const struct cuda_driver *cuda_driver_slow(void);
static inline const struct cuda_driver *cuda_driver(void)
{
    if (__builtin_expect(__atomic_load_n(&cuda_driver_loaded, __ATOMIC_ACQUIRE), 1)) return &cuda_driver_table;
    if (__atomic_load_n(&cuda_dlopen_watched, __ATOMIC_RELAXED) == 1 &&
        __atomic_load_n(&cuda_dlopen_generation, __ATOMIC_ACQUIRE) == __atomic_load_n(&cuda_looked_at, __ATOMIC_RELAXED))
        return NULL;
    return cuda_driver_slow();
}

/* Logs a failed call (with the driver's text) and returns 0; returns 1 on success. */
int cuda_check(CUresult rc, const char *what);

#endif
