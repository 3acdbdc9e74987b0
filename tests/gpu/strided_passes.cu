// GPU time of the passes a strided GPU-to-GPU message makes (issue 12, the strided 4 MiB
// goal): `commlib bench p2p`'s strided layout (MPI_Type_vector(n, 1, 2, MPI_DOUBLE), every
// other double) read from the sender's buffer is packed into scratch by commlib's kernel,
// then unpacked into the receiver's buffer - two passes.  Timed here with events, out of L2
// (buffers rotate over 2 GiB): the device-to-device memcpy of the payload, commlib's pack and
// unpack kernels alone and one after the other, and one pass strided to strided (a plain
// kernel, and commlib's one-pass copy, device_pack.h device_copy_piece), each on its own.  Median of 50 batches of 16 moves, microseconds per move.
//   nvcc -O3 -arch=sm_90 -o strided_passes tests/gpu/strided_passes.cu -lcuda
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../../native/pack/device_kernels.cu"

#define CHECK(x)                                                                         \
    do {                                                                                 \
        cudaError_t e_ = (x);                                                            \
        if (e_ != cudaSuccess) {                                                         \
            std::fprintf(stderr, "strided_passes: %s: %s (line %d)\n", #x, cudaGetErrorString(e_), __LINE__); \
            std::exit(1);                                                                \
        }                                                                                \
    } while (0)

// one pass: every other double of src into the same places of dst, as commlib's move loop
__global__ void __launch_bounds__(256, 8) strided_to_strided(const unsigned long long *__restrict__ src,
                                                             unsigned long long *__restrict__ dst, uint32_t words) {
    uint32_t threads = gridDim.x * blockDim.x;
    for (uint32_t base = blockIdx.x * blockDim.x + threadIdx.x; base < words; base += UNROLL * threads) {
        unsigned long long v[UNROLL];
#pragma unroll
        for (int k = 0; k < UNROLL; k++) {
            uint32_t i = base + k * threads;
            if (i < words) v[k] = __ldcs(src + 2ull * i);
        }
#pragma unroll
        for (int k = 0; k < UNROLL; k++) {
            uint32_t i = base + k * threads;
            if (i < words) dst[2ull * i] = v[k];
        }
    }
}

int main(int argc, char **argv) {
    const size_t payload = (argc > 1 ? std::atoll(argv[1]) : 4) << 20;  // MiB
    const uint32_t words = (uint32_t)(payload / 8);
    const int nbuf = (int)std::max<size_t>(8, (size_t)(2048ull << 20) / (2 * payload) / 2);
    int sms = 0, threads_per_sm = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    CHECK(cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, 0));
    std::vector<char *> span_a(nbuf), span_b(nbuf), dense_a(nbuf), dense_b(nbuf);
    for (int i = 0; i < nbuf; i++) {
        CHECK(cudaMalloc(&span_a[i], 2 * payload));
        CHECK(cudaMalloc(&span_b[i], 2 * payload));
        CHECK(cudaMalloc(&dense_a[i], payload));
        CHECK(cudaMalloc(&dense_b[i], payload));
        CHECK(cudaMemset(span_a[i], i + 1, 2 * payload));
        CHECK(cudaMemset(dense_a[i], i + 1, payload));
    }
    // commlib's launch for this piece (device_pack.c piece_args): W = 8, one dimension
    move_args a = {};
    a.total_words = words;
    a.element_words = words;
    a.elements = 1;
    a.block_words = 1;
    a.ndims = 1;
    a.count[0] = words;
    a.stride[0] = 16;
    long long grid = std::min<long long>((words + 255) / 256, (long long)sms * (threads_per_sm / 256));
    cudaEvent_t e0, e1;
    CHECK(cudaEventCreate(&e0));
    CHECK(cudaEventCreate(&e1));
    const int per_batch = 16, batches = 50;
    int next = 0;
    auto time = [&](const char *what, auto op) {
        for (int i = 0; i < per_batch; i++) op(next++ % nbuf);  // warm-up
        std::vector<float> t;
        for (int b = 0; b < batches; b++) {
            CHECK(cudaEventRecord(e0));
            for (int i = 0; i < per_batch; i++) op(next++ % nbuf);
            CHECK(cudaEventRecord(e1));
            CHECK(cudaEventSynchronize(e1));
            float ms;
            CHECK(cudaEventElapsedTime(&ms, e0, e1));
            t.push_back(ms * 1000 / per_batch);
        }
        CHECK(cudaGetLastError());
        std::nth_element(t.begin(), t.begin() + batches / 2, t.end());
        float us = t[batches / 2];
        std::printf("%-44s %8.2f us  %7.0f GB/s of payload\n", what, us, payload / (us * 1e3));
    };
    std::printf("payload %zu MiB, strided span %zu MiB, %d buffer sets, grid %lld x 256\n", payload >> 20,
                (2 * payload) >> 20, nbuf, grid);
    time("memcpy D2D of the payload (dense)", [&](int i) { CHECK(cudaMemcpyAsync(dense_b[i], dense_a[i], payload, cudaMemcpyDeviceToDevice)); });
    time("commlib pack kernel (strided -> dense)", [&](int i) {
        commlib_pack_w8<<<(unsigned)grid, 256>>>(span_a[i], dense_b[i], a);
    });
    time("commlib unpack kernel (dense -> strided)", [&](int i) {
        commlib_unpack_w8<<<(unsigned)grid, 256>>>(span_b[i], dense_a[i], a);
    });
    time("pack then unpack (the GPU-to-GPU strided message)", [&](int i) {
        commlib_pack_w8<<<(unsigned)grid, 256>>>(span_a[i], dense_b[i], a);
        commlib_unpack_w8<<<(unsigned)grid, 256>>>(span_b[i], dense_b[i], a);
    });
    time("one pass strided -> strided", [&](int i) {
        strided_to_strided<<<(unsigned)grid, 256>>>((const unsigned long long *)span_a[i], (unsigned long long *)span_b[i], words);
    });
    // commlib's one-pass kernel (device_pack.c device_copy_piece): one job, 5 blocks per SM
    static copy_args c;
    c.njobs = 1;
    for (batch_job *j : {&c.jobs[0].from, &c.jobs[0].to}) {
        j->total_words = words;
        j->element_words = words;
        j->elements = 1;
        j->block_words = 1;
        j->ndims = 1;
        j->count[0] = words;
        j->stride[0] = 16;
    }
    long long copy_grid = std::min<long long>((words + 255) / 256, (long long)sms * 5);
    time("commlib one-pass kernel (strided -> strided)", [&](int i) {
        c.jobs[0].from.typed = span_a[i];
        c.jobs[0].to.typed = span_b[i];
        commlib_copy_batch_w8<<<dim3((unsigned)copy_grid, 1), 256>>>(c);
    });
    // dense messages (a contiguous direct message): the copy engine against the one-pass
    // kernel with dense jobs (16-byte words), one message a launch and 15 a launch
    static copy_args dense;
    dense.njobs = 1;
    for (int m = 0; m < COPY_JOBS; m++)
        for (batch_job *j : {&dense.jobs[m].from, &dense.jobs[m].to}) {
            j->total_words = (uint32_t)(payload / 16);
            j->element_words = j->total_words;
            j->elements = 1;
            j->block_words = j->total_words;
            j->ndims = 0;
        }
    long long dense_grid = std::min<long long>((payload / 16 + 255) / 256, (long long)sms * 5);
    time("commlib one-pass kernel, dense (1 a launch)", [&](int i) {
        dense.njobs = 1;
        dense.jobs[0].from.typed = dense_a[i];
        dense.jobs[0].to.typed = dense_b[i];
        commlib_copy_batch_w16<<<dim3((unsigned)dense_grid, 1), 256>>>(dense);
    });
    time("memcpy D2D x 15 (per message)", [&](int i) {
        for (int m = 0; m < COPY_JOBS; m++)
            CHECK(cudaMemcpyAsync(dense_b[(i + m) % nbuf], dense_a[(i + m) % nbuf], payload, cudaMemcpyDeviceToDevice));
    });
    time("commlib one-pass kernel, dense, 15 a launch (per 15)", [&](int i) {
        dense.njobs = COPY_JOBS;
        for (int m = 0; m < COPY_JOBS; m++) {
            dense.jobs[m].from.typed = dense_a[(i + m) % nbuf];
            dense.jobs[m].to.typed = dense_b[(i + m) % nbuf];
        }
        commlib_copy_batch_w16<<<dim3((unsigned)dense_grid, COPY_JOBS), 256>>>(dense);
    });
    // the bytes: the fused pass and pack + unpack leave the same receiver buffer
    CHECK(cudaMemset(span_b[0], 0, 2 * payload));
    CHECK(cudaMemset(span_b[1], 0, 2 * payload));
    CHECK(cudaMemset(span_a[0], 0x5a, 2 * payload));
    commlib_pack_w8<<<(unsigned)grid, 256>>>(span_a[0], dense_b[0], a);
    commlib_unpack_w8<<<(unsigned)grid, 256>>>(span_b[0], dense_b[0], a);
    strided_to_strided<<<(unsigned)grid, 256>>>((const unsigned long long *)span_a[0], (unsigned long long *)span_b[1], words);
    CHECK(cudaMemset(span_b[2], 0, 2 * payload));
    c.jobs[0].from.typed = span_a[0];
    c.jobs[0].to.typed = span_b[2];
    commlib_copy_batch_w8<<<dim3((unsigned)copy_grid, 1), 256>>>(c);
    std::vector<char> x(2 * payload), y(2 * payload), z(2 * payload);
    CHECK(cudaMemcpy(x.data(), span_b[0], 2 * payload, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(y.data(), span_b[1], 2 * payload, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(z.data(), span_b[2], 2 * payload, cudaMemcpyDeviceToHost));
    if (x != y || x != z || x[0] != 0x5a || x[8] != 0) {
        std::fprintf(stderr, "strided_passes: results differ\n");
        return 1;
    }
    return 0;
}
