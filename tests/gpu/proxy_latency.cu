// What a small device message could cost without a copy and its synchronisation
// (issue 12's latency goal): a resident kernel that polls descriptors the CPU writes to
// pinned, device-mapped host memory, moves the bytes and writes a completion word back,
// timed against the driver's small copies.  Median round trip in microseconds.
//   nvcc -O2 -arch=sm_90 -o proxy_latency tests/gpu/proxy_latency.cu -lcuda
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "host_timing.h"

struct desc {
    unsigned long long seq, src, dst, bytes;
};

__global__ void proxy(volatile desc *d, volatile unsigned long long *done, int sleep_ns) {
    unsigned long long last = 0;
    for (;;) {
        unsigned long long s = d->seq;
        if (s == ~0ull) return;
        if (s == last) {
            if (sleep_ns) __nanosleep(sleep_ns);
            continue;
        }
        __threadfence_system();
        const unsigned long long *src = (const unsigned long long *)d->src;
        unsigned long long *dst = (unsigned long long *)d->dst;
        unsigned long long words = d->bytes / 8;
        for (unsigned long long i = 0; i < words; i++) ((volatile unsigned long long *)dst)[i] = ((volatile const unsigned long long *)src)[i];
        __threadfence_system();
        *done = s;
        last = s;
    }
}

// the median, with the 90th percentile printed before it
template <class F>
static double timed_us(F f) {
    double p90;
    double median = median_us(f, 20000, &p90);
    std::printf("  (p90 %.3f)", p90);
    return median;
}

int main() {
    CHECK(cudaFree(0));
    CUdeviceptr d;
    CHECK(cuMemAlloc(&d, 1 << 20));
    CHECK(cuMemsetD8(d, 7, 1 << 20));
    void *pinned;
    CHECK(cuMemHostAlloc(&pinned, 1 << 20, CU_MEMHOSTALLOC_DEVICEMAP | CU_MEMHOSTALLOC_PORTABLE));
    std::memset(pinned, 0, 1 << 20);
    CUstream s, ps;
    CHECK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    CHECK(cuStreamCreate(&ps, CU_STREAM_NON_BLOCKING));
    std::printf("operation                                     us (median)\n");
    std::printf("cuMemcpyAsync 8 B D2D + cuStreamSynchronize");
    std::printf(" %8.3f\n", timed_us([&] {
                    CHECK(cuMemcpyAsync(d + 8192, d, 8, s));
                    CHECK(cuStreamSynchronize(s));
                }));
    std::printf("cuMemcpyAsync 8 B D2H (pinned) + sync      ");
    std::printf(" %8.3f\n", timed_us([&] {
                    CHECK(cuMemcpyAsync((CUdeviceptr)pinned + 4096, d, 8, s));
                    CHECK(cuStreamSynchronize(s));
                }));
    std::printf("cuMemcpyAsync 8 B H2D (pinned) + sync      ");
    std::printf(" %8.3f\n", timed_us([&] {
                    CHECK(cuMemcpyAsync(d + 16384, (CUdeviceptr)pinned + 4096, 8, s));
                    CHECK(cuStreamSynchronize(s));
                }));
    // commlib's own stream is a blocking one (ordered with the legacy default stream)
    CUstream bs;
    CHECK(cuStreamCreate(&bs, CU_STREAM_DEFAULT));
    std::printf("the same 8 B D2H on a blocking stream      ");
    std::printf(" %8.3f\n", timed_us([&] {
                    CHECK(cuMemcpyAsync((CUdeviceptr)pinned + 4096, d, 8, bs));
                    CHECK(cuStreamSynchronize(bs));
                }));
    std::printf("the same 8 B H2D on a blocking stream      ");
    std::printf(" %8.3f\n", timed_us([&] {
                    CHECK(cuMemcpyAsync(d + 16384, (CUdeviceptr)pinned + 4096, 8, bs));
                    CHECK(cuStreamSynchronize(bs));
                }));
    unsigned long long stackbuf = 0;
    std::printf("cuMemcpyDtoH 8 B to pageable (sync)        ");
    std::printf(" %8.3f\n", timed_us([&] { CHECK(cuMemcpyDtoH(&stackbuf, d, 8)); }));
    std::printf("cuMemcpyHtoD 8 B from pageable (sync)      ");
    std::printf(" %8.3f\n", timed_us([&] { CHECK(cuMemcpyHtoD(d + 24576, &stackbuf, 8)); }));

    volatile desc *ring = (volatile desc *)pinned;
    volatile unsigned long long *done = (volatile unsigned long long *)((char *)pinned + 256);
    CUdeviceptr ring_d, done_d;
    CHECK(cuMemHostGetDevicePointer(&ring_d, pinned, 0));
    done_d = ring_d + 256;
    CUdeviceptr host_slot_d = ring_d + 8192;
    char *host_slot = (char *)pinned + 8192;
    for (int sleep_ns : {0, 100}) {
        ring->seq = 0;
        *done = 0;
        proxy<<<1, 1, 0, (cudaStream_t)ps>>>((desc *)ring_d, (unsigned long long *)done_d, sleep_ns);
        CHECK(cudaGetLastError());
        unsigned long long seq = 0;
        auto post = [&](CUdeviceptr src, CUdeviceptr dst, unsigned long long bytes) {
            ring->src = src;
            ring->dst = dst;
            ring->bytes = bytes;
            std::atomic_thread_fence(std::memory_order_seq_cst);
            ring->seq = ++seq;
            while (*done != seq) {
            }
        };
        struct {
            const char *what;
            CUdeviceptr src, dst;
            unsigned long long bytes;
        } cases[] = {
            {"proxy 8 B D2D", d, d + 8192, 8},
            {"proxy 8 B D2H (mapped)", d, host_slot_d, 8},
            {"proxy 8 B H2D (mapped)", host_slot_d, d + 16384, 8},
            {"proxy 256 B D2D", d, d + 8192, 256},
        };
        for (auto &c : cases) {
            std::printf("%-24s sleep %3d ns        ", c.what, sleep_ns);
            std::printf(" %8.3f\n", timed_us([&] { post(c.src, c.dst, c.bytes); }));
        }
        // the bytes did arrive
        std::memset(host_slot, 0, 8);
        post(d, host_slot_d, 8);
        if (*(unsigned long long *)host_slot != 0x0707070707070707ull) {
            std::fprintf(stderr, "proxy_latency: wrong bytes\n");
            return 1;
        }
        ring->seq = ~0ull;
        CHECK(cuStreamSynchronize(ps));
    }
    CHECK(cudaGetLastError());
    return 0;
}
