/* The CUDA driver for the test programs, found at run time: no CUDA headers or libraries
 * at build time, so they build on any machine, and under tests/c/fake_cuda.c (the
 * stand-in driver CI uses) the same calls reach the stand-in. */
#ifndef TESTS_CUDA_LOADER_H
#define TESTS_CUDA_LOADER_H

#include <dlfcn.h>
#include <stddef.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct CUctx_st *CUcontext;
#define CU_MEM_ATTACH_GLOBAL 1

static struct {
    CUresult (*cuInit)(unsigned);
    CUresult (*cuDeviceGetCount)(int *);
    CUresult (*cuDeviceGet)(CUdevice *, int);
    CUresult (*cuDeviceGetName)(char *, int, CUdevice);
    CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *, CUdevice);
    CUresult (*cuCtxSetCurrent)(CUcontext);
    CUresult (*cuCtxGetCurrent)(CUcontext *);
    CUresult (*cuMemAlloc)(CUdeviceptr *, size_t);
    CUresult (*cuMemAllocManaged)(CUdeviceptr *, size_t, unsigned);
    CUresult (*cuMemcpyHtoD)(CUdeviceptr, const void *, size_t);
    CUresult (*cuMemcpyDtoH)(void *, CUdeviceptr, size_t);
    CUresult (*cuMemFree)(CUdeviceptr);
} cu;

/* Loads the driver and makes device (index % devices) current in its primary context;
 * name (if given) gets the device's name.  0 without a driver or a device. */
static int cuda_load(int index, char *name, int len)
{
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!lib) return 0;
#define SYM(field, symbol) \
    if (!(*(void **)&cu.field = dlsym(lib, symbol))) return 0;
    SYM(cuInit, "cuInit") SYM(cuDeviceGetCount, "cuDeviceGetCount") SYM(cuDeviceGet, "cuDeviceGet")
    SYM(cuDeviceGetName, "cuDeviceGetName") SYM(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain")
    SYM(cuCtxSetCurrent, "cuCtxSetCurrent") SYM(cuCtxGetCurrent, "cuCtxGetCurrent") SYM(cuMemAlloc, "cuMemAlloc_v2")
    SYM(cuMemAllocManaged, "cuMemAllocManaged") SYM(cuMemcpyHtoD, "cuMemcpyHtoD_v2")
    SYM(cuMemcpyDtoH, "cuMemcpyDtoH_v2") SYM(cuMemFree, "cuMemFree_v2")
#undef SYM
    int count = 0;
    CUdevice device;
    CUcontext context;
    if (cu.cuInit(0) || cu.cuDeviceGetCount(&count) || count < 1 || cu.cuDeviceGet(&device, index % count) ||
        cu.cuDevicePrimaryCtxRetain(&context, device) || cu.cuCtxSetCurrent(context))
        return 0;
    if (name) cu.cuDeviceGetName(name, len, device);
    return 1;
}

#endif
