/* Pack / unpack kernels of the device engine: one launch moves one strided piece of the
 * canonical form (canonical.h) over every element of the message.
 *
 * Built by setup.py with `nvcc -fatbin` into an image embedded in libcommlib.so and
 * loaded through the driver API (device_pack.c); nothing here is linked against.  The
 * text itself is embedded too, and compiled at run time by NVRTC (nvrtc.c) for a GPU
 * the fatbin does not serve or a build without nvcc: so this one source must compile
 * under both, and include nothing NVRTC lacks (it has no C library headers).
 *
 * Each thread moves W-byte words (W = 1, 2, 4, 8 or 16: the widest power of two that
 * divides the block, every stride and both base addresses, chosen by the host).  The
 * flat word index of the launch decomposes into (element, block index over the piece's
 * dimensions, word within the block); consecutive threads take consecutive words, so the
 * packed side is always coalesced, and the typed side too wherever blocks are longer
 * than one word.  Each thread first loads UNROLL words, then stores them: several loads
 * in flight per thread are what keeps memory busy when every block is its own 32-byte
 * sector (tiny blocks at a large stride), where bandwidth is bound by sectors, not bytes.
 *
 * Index math is 32-bit whenever the word count fits (`commlib_pack_w8`), with divisions
 * by the dimension counts done as multiply-high by host-computed constants; a 64-bit
 * variant (`commlib_pack_w8_wide`) takes larger messages.  Byte offsets are 64-bit in
 * both, and strides may be negative or zero.
 */
#ifdef __CUDACC_RTC__
/* NVRTC: no <stdint.h>; the widths CUDA guarantees on every platform it supports. */
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#else
#include <stdint.h>
#endif

/* The launch parameters, passed by value.  device_pack.c declares the same struct; both
 * sides check the size (MOVE_ARGS_BYTES) and every field is 8 or 4 bytes wide, so the
 * layout cannot differ between the C and the CUDA compiler. */
#define MOVE_DIMS 32 /* CANONICAL_MAX_DIMS */
#define MOVE_ARGS_BYTES 840

struct fast_divisor {
    uint32_t multiplier, shift; /* n / d == (umulhi(n, multiplier) + n) >> shift, n < 2^31 */
};

struct move_args {
    int64_t total_words;           /* words this launch moves (all elements) */
    int64_t element_words;         /* words of the piece per element */
    int64_t elements;              /* elements of the message (1 when merged into dims) */
    int64_t typed_element_stride;  /* bytes between elements on the typed side (extent) */
    int64_t packed_element_stride; /* bytes between elements on the packed side (size) */
    int64_t block_words;           /* words per contiguous block */
    int64_t ndims;                 /* dimensions of the piece, dims[0] fastest */
    int64_t count[MOVE_DIMS];
    int64_t stride[MOVE_DIMS];     /* bytes on the typed side */
    struct fast_divisor element_div, block_div, count_div[MOVE_DIMS];
};
static_assert(sizeof(move_args) == MOVE_ARGS_BYTES, "move_args layout");

#define UNROLL 4

template <int W> struct word_of;
template <> struct word_of<1> { typedef uint8_t type; };
template <> struct word_of<2> { typedef uint16_t type; };
template <> struct word_of<4> { typedef uint32_t type; };
template <> struct word_of<8> { typedef unsigned long long type; }; /* __ldcs has no unsigned long form */
template <> struct word_of<16> { typedef uint4 type; };

/* Quotient of n by the divisor behind d (fast) or by `divisor` (wide). */
__device__ __forceinline__ uint32_t quotient(uint32_t n, int64_t, fast_divisor d)
{
    return (__umulhi(n, d.multiplier) + n) >> d.shift;
}
__device__ __forceinline__ uint64_t quotient(uint64_t n, int64_t divisor, fast_divisor)
{
    return n / (uint64_t)divisor;
}

/* Element of word i, and the word's index r within the element.  Args: move_args, or a
 * batched launch's batch_job (the same fields, narrower). */
template <typename Index, typename Args>
__device__ __forceinline__ Index split_element(Index i, const Args &a, Index &r)
{
    if (a.elements == 1) {
        r = i;
        return 0;
    }
    Index e = quotient(i, a.element_words, a.element_div);
    r = i - e * (Index)a.element_words;
    return e;
}

/* Byte offset of word i on the packed side: dense within each element. */
template <int W, typename Index, typename Args>
__device__ __forceinline__ int64_t packed_offset(Index i, const Args &a)
{
    Index r, e = split_element(i, a, r);
    return (int64_t)e * a.packed_element_stride + (int64_t)r * W;
}

/* Byte offset of word i on the typed side: (element, block over the dims, word). */
template <int W, typename Index, typename Args>
__device__ __forceinline__ int64_t typed_offset(Index i, const Args &a)
{
    Index r, e = split_element(i, a, r), w = 0;
    if (a.ndims == 0) { /* one dense block */
        w = r;
        r = 0;
    } else if (a.block_words > 1) {
        Index q = quotient(r, a.block_words, a.block_div);
        w = r - q * (Index)a.block_words;
        r = q;
    }
    int64_t at = (int64_t)e * a.typed_element_stride + (int64_t)w * W;
    int last = (int)a.ndims - 1;
    for (int d = 0; d < last; d++) {
        Index q = quotient(r, a.count[d], a.count_div[d]);
        at += (int64_t)(r - q * (Index)a.count[d]) * a.stride[d];
        r = q;
    }
    if (last >= 0) at += (int64_t)r * a.stride[last];
    return at;
}

/* Loads UNROLL words, then stores them.  Only the value is held between the two loops:
 * each side's offset is computed where it is used (the packed one is cheap), which keeps
 * the kernels at or near 32 registers, full occupancy with 256-thread blocks.  Loads are
 * streaming (evict-first): every byte is read once, and for isolated bytes at a large
 * stride they moved ~8 % more blocks per second than plain loads on an H200
 * (tests/gpu/line_floor.cu).  `first`: this thread's first word, `threads`: how many threads
 * share the move. */
template <int W, typename Index, bool PACKING, typename Args>
__device__ __forceinline__ void move(char *__restrict__ typed, char *__restrict__ packed, const Args &a, Index first,
                                     Index threads)
{
    typedef typename word_of<W>::type word;
    const Index total = (Index)a.total_words;
    for (Index base = first; base < total; base += UNROLL * threads) {
        word v[UNROLL];
#pragma unroll
        for (int k = 0; k < UNROLL; k++) {
            Index i = base + (Index)k * threads;
            if (i < total) {
                const char *from = PACKING ? typed + typed_offset<W>(i, a) : packed + packed_offset<W>(i, a);
                v[k] = __ldcs(reinterpret_cast<const word *>(from)); /* read once: evict first */
            }
        }
#pragma unroll
        for (int k = 0; k < UNROLL; k++) {
            Index i = base + (Index)k * threads;
            if (i < total) {
                char *to = PACKING ? packed + packed_offset<W>(i, a) : typed + typed_offset<W>(i, a);
                *reinterpret_cast<word *>(to) = v[k];
            }
        }
    }
}

/* Many packs or unpacks in one launch (a completion call's receives: one launch instead of
 * one per message, device_pack.h): job blockIdx.y of the batch, each job on up to gridDim.x blocks
 * (fewer when it has less than a word per thread), 32-bit index math only, pieces of at
 * most BATCH_DIMS dimensions.  Parameters stay within the 4 KiB every driver takes. */
#define BATCH_DIMS 3
#define BATCH_JOBS 31
#define BATCH_ARGS_BYTES 3976

struct batch_job {
    char *typed, *packed;
    int64_t typed_element_stride, packed_element_stride;
    int64_t stride[BATCH_DIMS];
    uint32_t total_words, element_words, elements, block_words;
    uint16_t ndims, word_log2; /* word_log2: W of this job (a batch mixes them) */
    uint32_t count[BATCH_DIMS];
    struct fast_divisor element_div, block_div, count_div[BATCH_DIMS];
};
struct batch_args {
    int64_t njobs;
    batch_job jobs[BATCH_JOBS];
};
static_assert(sizeof(batch_job) == 128, "batch_job layout");
static_assert(sizeof(batch_args) == BATCH_ARGS_BYTES, "batch_args layout");

/* A job is read in place from the parameter block (indexed by blockIdx.y): without
 * __grid_constant__ (CUDA 11.7, sm_70) a dynamically indexed parameter is copied to every
 * thread's local memory first - correct, only slower. */
#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ > 11 || (__CUDACC_VER_MAJOR__ == 11 && __CUDACC_VER_MINOR__ >= 7)) && \
    (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700)
#define GRID_CONSTANT __grid_constant__
#else
#define GRID_CONSTANT
#endif

template <int W, bool PACKING>
__device__ __forceinline__ void move_batch(const batch_args &b)
{
    if ((int64_t)blockIdx.y >= b.njobs) return;
    const batch_job &j = b.jobs[blockIdx.y];
    uint32_t wanted = (j.total_words + blockDim.x - 1) / blockDim.x;
    uint32_t blocks = wanted < gridDim.x ? wanted : gridDim.x;
    if (blockIdx.x >= blocks) return;
    move<W, uint32_t, PACKING>(j.typed, j.packed, j, blockIdx.x * blockDim.x + threadIdx.x, blocks * blockDim.x);
}

/* A batch of several word sizes: each job moves its own W (word_log2), the same for all of
 * a block's threads, so one launch serves a halo's 8-byte corners and 16-byte faces.  The
 * host launches it only for batches that mix: its 16-byte path spills a few registers
 * more than commlib_pack_batch_w16's under the same 32-register bound (sm_90: 40 bytes,
 * not 16). */
template <bool PACKING>
__device__ __forceinline__ void move_batch_mixed(const batch_args &b)
{
    if ((int64_t)blockIdx.y >= b.njobs) return;
    switch (b.jobs[blockIdx.y].word_log2) {
    case 0: move_batch<1, PACKING>(b); break;
    case 1: move_batch<2, PACKING>(b); break;
    case 2: move_batch<4, PACKING>(b); break;
    case 3: move_batch<8, PACKING>(b); break;
    default: move_batch<16, PACKING>(b); break;
    }
}

/* One message from the sender's strided piece straight into the receiver's (a GPU-to-GPU
 * direct message, transfer/ipc.h), where packing into scratch and unpacking that would be
 * two passes over the bytes: job blockIdx.y moves word i from `from` at from.typed +
 * typed_offset(i, from) to `to` at to.typed + typed_offset(i, to) (both jobs describe the
 * same number of words; their `packed` is unused).  Otherwise as move_batch, but with two
 * offsets per word it needs up to 48 registers: 5 blocks of 256 per SM, not 8 (with 8 it
 * spilled), and the host sizes its grid for that (COPY_BLOCKS_PER_SM). */
#define COPY_JOBS 15
#define COPY_ARGS_BYTES 3848

struct copy_job {
    batch_job from, to;
};
struct copy_args {
    int64_t njobs;
    copy_job jobs[COPY_JOBS];
};
static_assert(sizeof(copy_args) == COPY_ARGS_BYTES, "copy_args layout");

template <int W>
__device__ __forceinline__ void copy_batch(const copy_args &b)
{
    typedef typename word_of<W>::type word;
    if ((int64_t)blockIdx.y >= b.njobs) return;
    const copy_job &j = b.jobs[blockIdx.y];
    uint32_t wanted = (j.from.total_words + blockDim.x - 1) / blockDim.x;
    uint32_t blocks = wanted < gridDim.x ? wanted : gridDim.x;
    if (blockIdx.x >= blocks) return;
    const uint32_t total = j.from.total_words, threads = blocks * blockDim.x;
    for (uint32_t base = blockIdx.x * blockDim.x + threadIdx.x; base < total; base += UNROLL * threads) {
        word v[UNROLL];
#pragma unroll
        for (int k = 0; k < UNROLL; k++) {
            uint32_t i = base + (uint32_t)k * threads;
            if (i < total) v[k] = __ldcs(reinterpret_cast<const word *>(j.from.typed + typed_offset<W>(i, j.from)));
        }
#pragma unroll
        for (int k = 0; k < UNROLL; k++) {
            uint32_t i = base + (uint32_t)k * threads;
            if (i < total) *reinterpret_cast<word *>(j.to.typed + typed_offset<W>(i, j.to)) = v[k];
        }
    }
}

#define KERNELS(W)                                                                                       \
    extern "C" __global__ void __launch_bounds__(256, 8) commlib_pack_w##W(char *typed, char *packed,        \
                                                                         const move_args a)               \
    {                                                                                                    \
        move<W, uint32_t, true>(typed, packed, a, blockIdx.x * blockDim.x + threadIdx.x,                 \
                                gridDim.x * blockDim.x);                                                 \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256, 8) commlib_unpack_w##W(char *typed, char *packed,      \
                                                                           const move_args a)             \
    {                                                                                                    \
        move<W, uint32_t, false>(typed, packed, a, blockIdx.x * blockDim.x + threadIdx.x,                \
                                 gridDim.x * blockDim.x);                                                \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256) commlib_pack_w##W##_wide(char *typed, char *packed, \
                                                                                const move_args a)        \
    {                                                                                                    \
        move<W, uint64_t, true>(typed, packed, a, (uint64_t)blockIdx.x * blockDim.x + threadIdx.x,       \
                                (uint64_t)gridDim.x * blockDim.x);                                       \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256) commlib_unpack_w##W##_wide(char *typed,            \
                                                                                  char *packed,           \
                                                                                  const move_args a)      \
    {                                                                                                    \
        move<W, uint64_t, false>(typed, packed, a, (uint64_t)blockIdx.x * blockDim.x + threadIdx.x,      \
                                 (uint64_t)gridDim.x * blockDim.x);                                      \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256, 8) commlib_pack_batch_w##W(                            \
        const GRID_CONSTANT batch_args b)                                                                \
    {                                                                                                    \
        move_batch<W, true>(b);                                                                          \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256, 8) commlib_unpack_batch_w##W(                          \
        const GRID_CONSTANT batch_args b)                                                                \
    {                                                                                                    \
        move_batch<W, false>(b);                                                                         \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256, 5) commlib_copy_batch_w##W(                            \
        const GRID_CONSTANT copy_args b)                                                                 \
    {                                                                                                    \
        copy_batch<W>(b);                                                                                \
    }

KERNELS(1)
KERNELS(2)
KERNELS(4)
KERNELS(8)
KERNELS(16)

extern "C" __global__ void __launch_bounds__(256, 8) commlib_pack_batch_mixed(const GRID_CONSTANT batch_args b)
{
    move_batch_mixed<true>(b);
}
extern "C" __global__ void __launch_bounds__(256, 8) commlib_unpack_batch_mixed(const GRID_CONSTANT batch_args b)
{
    move_batch_mixed<false>(b);
}
