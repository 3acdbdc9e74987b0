// Probe of the memory floor for tiny strided blocks (GPU machine only; not part of the
// package).  Gathers n one-byte (or W-byte) blocks spaced `stride` bytes apart into a dense
// buffer, for strides 1..1024, with a plain load, a streaming load and a non-allocating
// load, and with the L2 fetch granularity limit at its default, 64 and 32 bytes.  If the
// time per block stops growing at stride 128 and equals a full read of the span's lines,
// the hardware moves whole 128-byte lines: that, not the kernel, bounds tiny-block packing.
//   nvcc -O3 -arch=sm_90 -o line_floor line_floor.cu && ./line_floor
#include <cstdio>
#include <cstdint>
#include <cuda_runtime.h>

#define CHECK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); return 1; } } while (0)

template <int MODE, typename T>
__global__ void __launch_bounds__(256) gather(const char *__restrict__ src, T *__restrict__ dst, uint32_t n, uint32_t stride)
{
    uint32_t threads = gridDim.x * blockDim.x;
    for (uint32_t base = blockIdx.x * blockDim.x + threadIdx.x; base < n; base += 4 * threads) {
        T v[4];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            uint32_t i = base + k * threads;
            if (i < n) {
                const T *p = reinterpret_cast<const T *>(src + (uint64_t)i * stride);
                if (MODE == 0) v[k] = *p;
                else if (MODE == 1) v[k] = __ldcs(p);
                else v[k] = __ldg(p);
            }
        }
#pragma unroll
        for (int k = 0; k < 4; k++) {
            uint32_t i = base + k * threads;
            if (i < n) dst[i] = v[k];
        }
    }
}

__global__ void read_all(const uint4 *__restrict__ src, uint4 *dst, uint64_t n)
{
    uint4 acc = {0, 0, 0, 0};
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        uint4 v = __ldcs(src + i);
        acc.x ^= v.x; acc.y ^= v.y; acc.z ^= v.z; acc.w ^= v.w;
    }
    if (acc.x == 0x12345678u && acc.y == 1) dst[0] = acc;
}

template <int MODE, typename T>
static float time_gather(const char *src, void *dst, uint32_t n, uint32_t stride, int grid)
{
    cudaEvent_t a, b;
    cudaEventCreate(&a); cudaEventCreate(&b);
    gather<MODE, T><<<grid, 256>>>(src, (T *)dst, n, stride);
    cudaEventRecord(a);
    const int iters = 20;
    for (int i = 0; i < iters; i++) gather<MODE, T><<<grid, 256>>>(src, (T *)dst, n, stride);
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms; cudaEventElapsedTime(&ms, a, b);
    cudaEventDestroy(a); cudaEventDestroy(b);
    return ms * 1000 / iters;
}

int main()
{
    int sms; cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    cudaDeviceProp prop; cudaGetDeviceProperties(&prop, 0);
    int grid = sms * 8;
    const uint32_t n = 4u << 20; // blocks: 4 MiB of 1-byte blocks, TEMPI's largest total
    size_t span = (size_t)n * 1024 + 64;
    char *src; void *dst;
    CHECK(cudaMalloc(&src, span)); CHECK(cudaMalloc(&dst, (size_t)n * 8));
    CHECK(cudaMemset(src, 1, span));
    size_t l2limit = 0; cudaDeviceGetLimit(&l2limit, cudaLimitMaxL2FetchGranularity);
    printf("device %s, %d SMs, L2 fetch granularity limit default %zu B\n", prop.name, sms, l2limit);
    double seq_gbps = 0; // full read of 512 MiB for the line-rate reference
    {
        uint64_t words = (512ull << 20) / 16;
        cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
        read_all<<<grid, 256>>>((const uint4 *)src, (uint4 *)dst, words);
        cudaEventRecord(a);
        for (int i = 0; i < 20; i++) read_all<<<grid, 256>>>((const uint4 *)src, (uint4 *)dst, words);
        cudaEventRecord(b); cudaEventSynchronize(b);
        float ms; cudaEventElapsedTime(&ms, a, b);
        double us = ms * 1000 / 20;
        seq_gbps = (512.0 * 1048576) / us / 1e3;
        printf("sequential read 512 MiB: %.1f us = %.0f GB/s (128-byte lines: %.2f G lines/s)\n", us,
               (512.0 * 1048576) / us / 1e3, (512.0 * 1048576 / 128) / us / 1e3);
    }
    printf("limit | load | W | stride | us | packed GB/s | blocks G/s | bytes of DRAM per block at the sequential rate\n");
    size_t limits[] = {0, 64, 32};
    for (size_t li = 0; li < 3; li++) {
        if (limits[li]) CHECK(cudaDeviceSetLimit(cudaLimitMaxL2FetchGranularity, limits[li]));
        size_t got = 0; cudaDeviceGetLimit(&got, cudaLimitMaxL2FetchGranularity);
        uint32_t strides[] = {1, 8, 16, 32, 64, 128, 256, 512, 1024};
        for (int mode = 0; mode < 3; mode++)
            for (int si = 0; si < 9; si++) {
                uint32_t s = strides[si];
                float us = mode == 0 ? time_gather<0, uint8_t>(src, dst, n, s, grid)
                         : mode == 1 ? time_gather<1, uint8_t>(src, dst, n, s, grid)
                                     : time_gather<2, uint8_t>(src, dst, n, s, grid);
                printf("%5zu | %s | 1 | %4u | %8.1f | %7.1f | %6.2f | %5.0f\n", got, mode == 0 ? "plain" : mode == 1 ? "cs   " : "ldg  ",
                       s, us, n / us / 1e3, n / us / 1e3, seq_gbps / (n / us / 1e3));
            }
        for (uint32_t w8s : {64u, 128u, 512u}) {
            float us = time_gather<0, uint64_t>(src, dst, n / 8, w8s, grid);
            printf("%5zu | plain | 8 | %4u | %8.1f | %7.1f | %6.2f | %5.0f\n", got, w8s, us, (double)n / us / 1e3,
                   n / 8 / us / 1e3, seq_gbps / (n / 8 / us / 1e3));
        }
    }
    CHECK(cudaGetLastError());
    return 0;
}
