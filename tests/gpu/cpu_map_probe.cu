// Can the CPU address device memory on this machine?  Issue 12's latency goal (an 8-byte
// device message within 2x the host MPI's ~1 us) needs it: every other route costs a copy
// or a launch and its completion (tests/gpu/proxy_latency.cu: 5.5-7 us).  Asks the routes a
// user-space library has, without a kernel module of its own:
//   - GDRCopy's kernel module (/dev/gdrdrv): maps BAR1 pages of device memory to the CPU;
//   - a dma-buf of device memory (cuMemGetHandleForAddressRange) mapped with mmap;
//   - a virtual-memory-API allocation exported as a POSIX fd, mapped with mmap.
// Prints one line per route.  nvcc -o /tmp/cpu_map_probe tests/gpu/cpu_map_probe.cu -lcuda
#include <cuda.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static const char *err(CUresult rc)
{
    const char *s = "?";
    cuGetErrorName(rc, &s);
    return s;
}

static void try_map(const char *what, int fd, size_t bytes)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        printf("%-34s mmap refused: %s\n", what, strerror(errno));
        return;
    }
    volatile unsigned long long *w = (volatile unsigned long long *)p;
    w[0] = 0x1234;
    printf("%-34s MAPPED: the CPU wrote and read back %llx\n", what, (unsigned long long)w[0]);
    munmap(p, bytes);
}

int main()
{
    printf("%-34s %s\n", "/dev/gdrdrv (GDRCopy's module)", access("/dev/gdrdrv", F_OK) == 0 ? "present" : "absent");
    if (cuInit(0) != CUDA_SUCCESS) return 1;
    CUdevice dev;
    CUcontext ctx;
    cuDeviceGet(&dev, 0);
    cuDevicePrimaryCtxRetain(&ctx, dev);
    cuCtxSetCurrent(ctx);
    int driver = 0, dmabuf = 0;
    cuDriverGetVersion(&driver);
    cuDeviceGetAttribute(&dmabuf, CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED, dev);
    printf("%-34s %d, dma-buf supported %d\n", "driver API version", driver, dmabuf);

    size_t bytes = 2 << 20;
    CUdeviceptr d;
    CUresult rc = cuMemAlloc(&d, bytes);
    if (rc != CUDA_SUCCESS) return 1;
    int fd = -1;
    rc = cuMemGetHandleForAddressRange(&fd, d, bytes, CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD, 0);
    if (rc != CUDA_SUCCESS) printf("%-34s export refused: %s\n", "dma-buf of cuMemAlloc memory", err(rc));
    else try_map("dma-buf of cuMemAlloc memory", fd, bytes);
    if (fd >= 0) close(fd);

    CUmemAllocationProp prop = {};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = dev;
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    size_t granularity = 0;
    cuMemGetAllocationGranularity(&granularity, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM);
    size_t vmm_bytes = granularity > bytes ? granularity : bytes;
    CUmemGenericAllocationHandle h;
    rc = cuMemCreate(&h, vmm_bytes, &prop, 0);
    if (rc == CUDA_SUCCESS) {
        fd = -1;
        rc = cuMemExportToShareableHandle(&fd, h, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0);
        if (rc != CUDA_SUCCESS) printf("%-34s export refused: %s\n", "VMM allocation's POSIX fd", err(rc));
        else try_map("VMM allocation's POSIX fd", fd, vmm_bytes);
        if (fd >= 0) close(fd);
        CUdeviceptr v;
        if (cuMemAddressReserve(&v, vmm_bytes, 0, 0, 0) == CUDA_SUCCESS && cuMemMap(v, vmm_bytes, 0, h, 0) == CUDA_SUCCESS) {
            fd = -1;
            rc = cuMemGetHandleForAddressRange(&fd, v, vmm_bytes, CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD, 0);
            if (rc != CUDA_SUCCESS) printf("%-34s export refused: %s\n", "dma-buf of a VMM mapping", err(rc));
            else try_map("dma-buf of a VMM mapping", fd, vmm_bytes);
            if (fd >= 0) close(fd);
            cuMemUnmap(v, vmm_bytes);
            cuMemAddressFree(v, vmm_bytes);
        }
        cuMemRelease(h);
    } else {
        printf("%-34s cuMemCreate: %s\n", "VMM allocation", err(rc));
    }
    cuMemFree(d);
    return 0;
}
