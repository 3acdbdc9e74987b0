// Issue 12, 32^3 pack mode: can commlib hold the program's device MPI_Pack calls back and
// launch them together, flushing them at the entry of the program's next CUDA call?  CUPTI's
// runtime- and driver-API callbacks see every CUDA call of the process, so a flush there
// keeps the MPI contract: the held packs reach the GPU before any later work of the program
// that could touch their buffers.  This probe answers, on the
// machine, before commlib builds it:
//   1. correct: a "pack" held back (a copy of A to B) is flushed when the program launches a
//      kernel that overwrites A, and B has A's old contents (the legacy default stream orders
//      the flush, queued on a blocking stream at the callback, before the program's kernel);
//   2. cost: what the callbacks add to each CUDA call of the program (empty kernel launches
//      with and without the subscriber), and 26 held packs + one flush (subscribed) against
//      26 launches (not subscribed: today's device MPI_Pack calls).
//   nvcc -O2 -arch=sm_90 -o cupti_flush_probe tests/gpu/cupti_flush_probe.cu -L$CUDA/lib64 \
//        -L$CUDA/extras/CUPTI/lib64 -lcupti -lcuda -Xlinker -rpath,$CUDA/lib64:$CUDA/extras/CUPTI/lib64
// (stage `costs` of tests/gpu/session.sh; CUDA: the toolkit, /usr/local/cuda)
#include <cuda.h>
#include <cuda_runtime.h>
#include <cupti.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "host_timing.h"

struct job {
    const int *src;
    int *dst;
    int n;
};
struct jobs {
    job j[32];
    int count;
};

__global__ void copy_jobs(const __grid_constant__ jobs js)
{
    const job &j = js.j[blockIdx.y];
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < j.n; i += gridDim.x * blockDim.x) j.dst[i] = j.src[i];
}
__global__ void fill(int *p, int n, int value)
{
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) p[i] = value;
}
__global__ void empty_kernel(int *p)
{
    if (p && threadIdx.x == 1024) *p = 1;
}

static cudaStream_t held_stream;  // commlib's: a blocking stream
static CUfunction copy_fn;        // commlib launches through the driver API
static jobs held;                 // packs held back
static thread_local int in_flush; // commlib's own CUDA calls do not flush
static thread_local int in_runtime; // inside a runtime call: it flushed at its entry
static long flushes, callbacks;

static void flush()
{
    if (held.count == 0) return;
    in_flush = 1;
    void *args[] = {&held};
    if (cuLaunchKernel(copy_fn, 4, held.count, 1, 256, 1, 1, 0, held_stream, args, nullptr) != CUDA_SUCCESS) {
        std::fprintf(stderr, "cupti_flush_probe: the flush's launch failed\n");
        std::exit(1);
    }
    held.count = 0;
    flushes++;
    in_flush = 0;
}

// Runtime calls flush at their entry, before the runtime does anything; driver calls made
// outside a runtime call (a program on the driver API) flush at theirs.
static void CUPTIAPI on_call(void *, CUpti_CallbackDomain domain, CUpti_CallbackId, const void *data)
{
    const CUpti_CallbackData *d = static_cast<const CUpti_CallbackData *>(data);
    if (in_flush) return;
    if (domain == CUPTI_CB_DOMAIN_RUNTIME_API) {
        in_runtime += d->callbackSite == CUPTI_API_ENTER ? 1 : -1;
        if (d->callbackSite != CUPTI_API_ENTER || in_runtime != 1) return;
    } else if (d->callbackSite != CUPTI_API_ENTER || in_runtime) {
        return;
    }
    callbacks++;
    if (held.count) flush();
}

static void hold(const int *src, int *dst, int n)  // what a held MPI_Pack would do
{
    if (held.count == 32) flush();
    held.j[held.count++] = job{src, dst, n};
}

int main()
{
    CHECK(cudaSetDevice(0));
    CHECK(cudaStreamCreate(&held_stream));
    CHECK(cudaGetFuncBySymbol(&copy_fn, (const void *)copy_jobs));
    const int n = 1 << 16;
    int *a, *b;
    CHECK(cudaMalloc(&a, n * sizeof(int)));
    CHECK(cudaMalloc(&b, 26 * n * sizeof(int)));

    // the cost of a CUDA call without a subscriber (host_timing.h: median of 20 000)
    auto launch = [] { empty_kernel<<<1, 32>>>(nullptr); };
    double plain = median_us(launch);
    CHECK(cudaDeviceSynchronize());

    // 2. the 26 launches of device MPI_Pack calls today, and 26 held packs the next call flushes
    auto launches26 = [&] {
        for (int k = 0; k < 26; k++) {
            jobs one{};
            one.j[0] = job{a, b + k * n, 1024};
            one.count = 1;
            copy_jobs<<<dim3(4, 1), 256, 0, held_stream>>>(one);
        }
    };
    auto held26 = [&] {
        for (int k = 0; k < 26; k++) hold(a, b + k * n, 1024);
        empty_kernel<<<1, 32>>>(nullptr);  // the program's next call: flushes
    };
    double t26 = median_us(launches26, 2000);  // today: one launch per MPI_Pack, no CUPTI
    CHECK(cudaDeviceSynchronize());

    CUpti_SubscriberHandle subscriber;
    CUptiResult rc = cuptiSubscribe(&subscriber, (CUpti_CallbackFunc)on_call, nullptr);
    if (rc != CUPTI_SUCCESS) {
        const char *s = "?";
        cuptiGetResultString(rc, &s);
        std::printf("cuptiSubscribe refused: %s\n", s);
        return 1;
    }
    CHECK(cuptiEnableDomain(1, subscriber, CUPTI_CB_DOMAIN_DRIVER_API));
    CHECK(cuptiEnableDomain(1, subscriber, CUPTI_CB_DOMAIN_RUNTIME_API));
    double with_cb = median_us(launch);
    CHECK(cudaDeviceSynchronize());

    // 1. correctness: hold "packs" of A, then the program overwrites A with its own kernel
    int wrong = 0;
    for (int round = 0; round < 100; round++) {
        fill<<<64, 256>>>(a, n, round);                     // the program computes A
        for (int k = 0; k < 26; k++) hold(a, b + k * n, n); // 26 MPI_Pack calls, held
        fill<<<64, 256>>>(a, n, -1);                        // its next kernel: the flush runs first
        std::vector<int> check(n);
        CHECK(cudaMemcpy(check.data(), b + 25 * n, n * sizeof(int), cudaMemcpyDeviceToHost));
        for (int i = 0; i < n; i++) wrong += check[i] != round;
    }
    std::printf("held packs flushed before the program's next kernel: %s (%d wrong words in 100 rounds, "
                "%ld flushes)\n", wrong ? "NO" : "yes", wrong, flushes);

    double h26 = median_us(held26, 2000);
    CHECK(cudaDeviceSynchronize());
    std::printf("per CUDA call of the program: launch %.2f us without CUPTI, %.2f us with the callback "
                "(%ld callbacks)\n", plain, with_cb, callbacks);
    std::printf("26 pack launches %.1f us; 26 held + the flush at the next launch %.1f us (that launch included)\n",
                t26, h26);
    cuptiUnsubscribe(subscriber);
    return wrong ? 1 : 0;
}
