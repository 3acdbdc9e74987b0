// What one driver call costs the host on this machine (median of many, microseconds):
// the calls a device message through commlib makes - pointer queries, launches, event
// record/query, a stream waiting for an event, an empty stream's synchronisation, a small
// copy and its wait.  Run with and without MPS (tests/gpu/session.sh, stage `costs`): the
// halo exchange's fixed cost per message is the sum of these.
//   nvcc -O2 -arch=sm_90 -o driver_costs tests/gpu/driver_costs.cu -lcuda
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "host_timing.h"

__global__ void empty_kernel(int *p) {
    if (p && threadIdx.x == 1024) *p = 1;  // never taken: keeps the launch real
}

// One launch carrying many messages' parameters (26 x 864 B, a halo's worth: kernel
// parameters may reach 32 KiB since CUDA 12.1 on Volta and newer) - what one unpack launch
// for all of a Waitall's receives would pass.
struct many_args {
    char bytes[26 * 864];
};
__global__ void many_kernel(const __grid_constant__ many_args a, int *p) {
    if (p && threadIdx.x == 1024) *p = a.bytes[blockIdx.x % sizeof a.bytes];
}


int main() {
    CHECK(cudaFree(0));
    CUdeviceptr d;
    CHECK(cuMemAlloc(&d, 1 << 20));
    void *pinned;
    CHECK(cuMemHostAlloc(&pinned, 1 << 20, 0));
    std::vector<char> host(1 << 20, 1);
    CUstream s;
    CHECK(cuStreamCreate(&s, CU_STREAM_DEFAULT));
    CUevent e, ipc_event;
    CHECK(cuEventCreate(&e, CU_EVENT_DISABLE_TIMING));
    CHECK(cuEventCreate(&ipc_event, CU_EVENT_DISABLE_TIMING | CU_EVENT_INTERPROCESS));
    unsigned type = 0;
    int managed = 0;
    CUcontext ctx;
    CUpointer_attribute attributes2[2] = {CU_POINTER_ATTRIBUTE_MEMORY_TYPE, CU_POINTER_ATTRIBUTE_IS_MANAGED};
    void *values2[2] = {&type, &managed};
    CUpointer_attribute attributes3[3] = {CU_POINTER_ATTRIBUTE_MEMORY_TYPE, CU_POINTER_ATTRIBUTE_IS_MANAGED,
                          CU_POINTER_ATTRIBUTE_CONTEXT};
    void *values3[3] = {&type, &managed, &ctx};
    std::printf("call                                        us (median)\n");
    std::printf("cuPointerGetAttributes(2) device pointer    %8.3f\n",
                median_us([&] { CHECK(cuPointerGetAttributes(2, attributes2, values2, d + 4096)); }));
    std::printf("cuPointerGetAttributes(3) device pointer    %8.3f\n",
                median_us([&] { CHECK(cuPointerGetAttributes(3, attributes3, values3, d + 4096)); }));
    std::printf("cuPointerGetAttributes(2) pageable host     %8.3f\n",
                median_us([&] { CHECK(cuPointerGetAttributes(2, attributes2, values2, (CUdeviceptr)host.data())); }));
    std::printf("cuPointerGetAttributes(2) pinned host       %8.3f\n",
                median_us([&] { CHECK(cuPointerGetAttributes(2, attributes2, values2, (CUdeviceptr)pinned)); }));
    CUcontext current;
    CHECK(cuCtxGetCurrent(&current));
    std::printf("cuCtxGetCurrent                             %8.3f\n",
                median_us([&] { CHECK(cuCtxGetCurrent(&ctx)); }));
    std::printf("cuCtxSetCurrent (the current one again)     %8.3f\n",
                median_us([&] { CHECK(cuCtxSetCurrent(current)); }));
    std::printf("cuEventRecord                               %8.3f\n",
                median_us([&] { CHECK(cuEventRecord(e, s)); }));
    std::printf("cuEventRecord (inter-process event)         %8.3f\n",
                median_us([&] { CHECK(cuEventRecord(ipc_event, s)); }));
    std::printf("cuStreamWaitEvent (inter-process event)     %8.3f\n",
                median_us([&] { CHECK(cuStreamWaitEvent(s, ipc_event, 0)); }));
    CHECK(cuStreamSynchronize(s));
    std::printf("cuEventQuery (done)                         %8.3f\n", median_us([&] { CHECK(cuEventQuery(e)); }));
    std::printf("cuStreamSynchronize (empty stream)          %8.3f\n",
                median_us([&] { CHECK(cuStreamSynchronize(s)); }));
    cudaStream_t rs = (cudaStream_t)s;
    int *never = nullptr;
    std::printf("kernel launch (empty, async)                %8.3f\n",
                median_us([&] { empty_kernel<<<1, 256, 0, rs>>>(never); }, 5000));
    CHECK(cuStreamSynchronize(s));
    static many_args many;
    std::printf("kernel launch, 22 KiB of parameters (async) %8.3f\n",
                median_us([&] { many_kernel<<<26, 256, 0, rs>>>(many, never); }, 5000));
    CHECK(cuStreamSynchronize(s));
    CHECK(cudaGetLastError());
    std::printf("kernel launch + cuStreamSynchronize         %8.3f\n", median_us([&] {
                    empty_kernel<<<1, 256, 0, rs>>>(never);
                    CHECK(cuStreamSynchronize(s));
                }));
    std::printf("kernel launch + record + query until done   %8.3f\n", median_us([&] {
                    empty_kernel<<<1, 256, 0, rs>>>(never);
                    CHECK(cuEventRecord(e, s));
                    while (cuEventQuery(e) == CUDA_ERROR_NOT_READY) {
                    }
                }));
    std::printf("cuMemcpyAsync 192 B D2H + cuStreamSync      %8.3f\n", median_us([&] {
                    CHECK(cuMemcpyAsync((CUdeviceptr)pinned, d, 192, s));
                    CHECK(cuStreamSynchronize(s));
                }));
    std::printf("cuMemcpyAsync 192 B D2D (async)             %8.3f\n",
                median_us([&] { CHECK(cuMemcpyAsync(d + 8192, d, 192, s)); }, 5000));
    CHECK(cuStreamSynchronize(s));
    // Stream memory operations: a flag written behind a pack and waited for by another
    // stream - what could replace the inter-process event per message (its record costs
    // the most of the event calls above).
    int memops = 0;
    CUdevice device;
    CHECK(cuCtxGetDevice(&device));
    CHECK(cuDeviceGetAttribute(&memops, CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS, device));
    std::printf("64-bit stream memory operations supported  %8d\n", memops);
    if (memops) {
        CUstream other;
        CHECK(cuStreamCreate(&other, CU_STREAM_NON_BLOCKING));
        CHECK(cuMemsetD8(d + 65536, 0, 8));
        cuuint64_t seq = 0;
        std::printf("cuStreamWriteValue64                        %8.3f\n",
                    median_us([&] { CHECK(cuStreamWriteValue64(s, d + 65536, ++seq, 0)); }));
        CHECK(cuStreamSynchronize(s));
        std::printf("cuStreamWaitValue64 (GEQ, already true)    %8.3f\n", median_us([&] {
                        CHECK(cuStreamWaitValue64(other, d + 65536, seq, CU_STREAM_WAIT_VALUE_GEQ));
                    }));
        CHECK(cuStreamSynchronize(other));
        std::printf("launch + write, other waits + launch + sync %8.3f\n", median_us([&] {
                        empty_kernel<<<1, 256, 0, rs>>>(never);
                        CHECK(cuStreamWriteValue64(s, d + 65536, ++seq, 0));
                        CHECK(cuStreamWaitValue64(other, d + 65536, seq, CU_STREAM_WAIT_VALUE_GEQ));
                        empty_kernel<<<1, 256, 0, (cudaStream_t)other>>>(never);
                        CHECK(cuStreamSynchronize(other));
                    }, 5000));
        std::printf("launch + ipc record, other waits + launch + sync %3.3f\n", median_us([&] {
                        empty_kernel<<<1, 256, 0, rs>>>(never);
                        CHECK(cuEventRecord(ipc_event, s));
                        CHECK(cuStreamWaitEvent(other, ipc_event, 0));
                        empty_kernel<<<1, 256, 0, (cudaStream_t)other>>>(never);
                        CHECK(cuStreamSynchronize(other));
                    }, 5000));
        CHECK(cuStreamDestroy(other));
    }
    CHECK(cudaGetLastError());
    return 0;
}
