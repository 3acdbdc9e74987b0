/* Device pack engine: launches the kernels of device_kernels.cu, one per strided piece
 * (or one for the whole message when it is a single piece), on the context's stream.
 *
 * The kernels are loaded once per device context with cuModuleLoadData: the fatbin nvcc
 * built at install time (embedded by setup.py as commlib_device_image), or machine code
 * NVRTC compiles at run time from the embedded source (nvrtc.c); load_kernels chooses. */
#include "device_pack.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../util/config.h"
#include "../util/log.h"
#include "../util/stats.h"
#include "nvrtc.h"

extern const unsigned char commlib_device_image[];
extern const size_t commlib_device_image_size; /* 0: built without nvcc */

/* The kernels' parameter block; device_kernels.cu declares the same struct and checks
 * the same size. */
#define MOVE_ARGS_BYTES 840

struct fast_divisor {
    uint32_t multiplier, shift;
};

struct move_args {
    int64_t total_words, element_words, elements;
    int64_t typed_element_stride, packed_element_stride;
    int64_t block_words, ndims;
    int64_t count[CANONICAL_MAX_DIMS];
    int64_t stride[CANONICAL_MAX_DIMS];
    struct fast_divisor element_div, block_div, count_div[CANONICAL_MAX_DIMS];
};
_Static_assert(sizeof(struct move_args) == MOVE_ARGS_BYTES, "move_args must match device_kernels.cu");

#define THREADS_PER_BLOCK 256 /* the kernels' __launch_bounds__ */
#define UNROLL 4              /* words per thread per loop trip, as in the kernels */
#define N_WORD_SIZES 5        /* W = 1, 2, 4, 8, 16 */

/* The batched kernels' parameter block (device_kernels.cu declares the same structs). */
#define BATCH_DIMS 3
#define BATCH_JOBS 31
#define BATCH_ARGS_BYTES 3976

struct batch_job {
    char *typed, *packed;
    int64_t typed_element_stride, packed_element_stride;
    int64_t stride[BATCH_DIMS];
    uint32_t total_words, element_words, elements, block_words;
    uint16_t ndims, word_log2; /* word_log2: this job's W (a batch may mix them) */
    uint32_t count[BATCH_DIMS];
    struct fast_divisor element_div, block_div, count_div[BATCH_DIMS];
};
struct batch_args {
    int64_t njobs;
    struct batch_job jobs[BATCH_JOBS];
};
_Static_assert(sizeof(struct batch_job) == 128, "batch_job must match device_kernels.cu");
_Static_assert(sizeof(struct batch_args) == BATCH_ARGS_BYTES, "batch_args must match device_kernels.cu");

/* The one-pass copies' parameter block (device_kernels.cu: strided piece to strided piece). */
#define COPY_JOBS 15
#define COPY_ARGS_BYTES 3848
#define COPY_BLOCKS_PER_SM 5 /* their __launch_bounds__(256, 5) */
struct copy_job {
    struct batch_job from, to;
};
struct copy_args {
    int64_t njobs;
    struct copy_job jobs[COPY_JOBS];
};
_Static_assert(sizeof(struct copy_args) == COPY_ARGS_BYTES, "copy_args must match device_kernels.cu");

struct device_kernels {
    int loaded;
    CUmodule module;
    CUfunction move[2][N_WORD_SIZES][2]; /* [packing][log2 W][wide index math] */
    CUfunction batch[2][N_WORD_SIZES]; /* [packing][log2 W]: many moves in one launch */
    CUfunction batch_mixed[2];         /* [packing]: the same, each job its own W */
    CUfunction copy[N_WORD_SIZES];     /* [log2 W]: piece to piece, many in one launch */
};

static struct device_kernels unavailable; /* loaded = 0: looked once, no kernels */
static pthread_mutex_t load_lock = PTHREAD_MUTEX_INITIALIZER;
static char load_failure[256]; /* why the last image did not load (under load_lock) */
static const char *const route_name[] = {"auto", "fatbin", "nvrtc", "none"}; /* enum kernel_route */

/* Kernel `name` of the loaded module into *f; on a failure the module is unloaded. */
static int find_kernel(struct device_kernels *k, CUfunction *f, const char *name, const char *what)
{
    const struct cuda_driver *cu = cuda_driver();
    CUresult rc = cu->cuModuleGetFunction(f, k->module, name);
    if (rc == CUDA_SUCCESS) return 1;
    const char *text = "?";
    cu->cuGetErrorString(rc, &text);
    commlib_log(LOG_WARN, "device pack kernels from %s lack %s: %s (%d)", what, name, text, rc);
    cu->cuModuleUnload(k->module);
    k->module = NULL;
    return 0;
}

/* Loads an image (fatbin, cubin or PTX) into the current context and finds every
 * kernel.  A failure is not logged as an error: the caller has another way to go. */
static int load_image(struct device_kernels *k, const void *image, const char *what, int device)
{
    const struct cuda_driver *cu = cuda_driver();
    CUresult rc = cu->cuModuleLoadData(&k->module, image);
    if (rc != CUDA_SUCCESS) {
        const char *text = "?";
        cu->cuGetErrorString(rc, &text);
        snprintf(load_failure, sizeof load_failure, "%s (%d)", text, rc);
        commlib_log(LOG_INFO, "device pack kernels from %s do not load on device %d: %s", what, device, load_failure);
        k->module = NULL;
        return 0;
    }
    char name[40];
    for (int w = 0; w < N_WORD_SIZES; w++) {
        for (int packing = 0; packing < 2; packing++)
            for (int wide = 0; wide < 2; wide++) {
                snprintf(name, sizeof name, "commlib_%s_w%d%s", packing ? "pack" : "unpack", 1 << w,
                         wide ? "_wide" : "");
                if (!find_kernel(k, &k->move[packing][w][wide], name, what)) return 0;
            }
        for (int packing = 0; packing < 2; packing++) {
            snprintf(name, sizeof name, "commlib_%s_batch_w%d", packing ? "pack" : "unpack", 1 << w);
            if (!find_kernel(k, &k->batch[packing][w], name, what)) return 0;
        }
        snprintf(name, sizeof name, "commlib_copy_batch_w%d", 1 << w);
        if (!find_kernel(k, &k->copy[w], name, what)) return 0;
    }
    return find_kernel(k, &k->batch_mixed[1], "commlib_pack_batch_mixed", what) &&
           find_kernel(k, &k->batch_mixed[0], "commlib_unpack_batch_mixed", what);
}

/* The kernels compiled by NVRTC for this device (or taken from the disk cache). */
static int load_nvrtc(struct device_kernels *k, struct device_context *dc)
{
    const struct cuda_driver *cu = cuda_driver();
    int major = 0, minor = 0;
    if (!cuda_check(cu->cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dc->device),
                    "cuDeviceGetAttribute (compute capability)") ||
        !cuda_check(cu->cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dc->device),
                    "cuDeviceGetAttribute (compute capability)"))
        return 0;
    int version = 0;
    if (cu->cuDriverGetVersion(&version) == CUDA_SUCCESS) nvrtc_prefer_driver(version);
    struct nvrtc_plan plan;
    if (!nvrtc_plan_for(major * 10 + minor, &plan)) return 0;
    size_t bytes = 0;
    void *image = nvrtc_cache_read(&plan, &bytes);
    if (image) {
        int ok = load_image(k, image, plan.cache_path, dc->device);
        free(image);
        if (ok) {
            stat_add(STAT_KERNELS_CACHED, 1);
            commlib_log(LOG_INFO, "device pack kernels loaded on device %d from the NVRTC cache (%s, %zu bytes)",
                        dc->device, plan.cache_path, bytes);
            return 1;
        }
    }
    uint64_t start = stat_now_ns();
    image = nvrtc_compile(&plan, &bytes);
    if (!image) return 0;
    uint64_t ns = stat_now_ns() - start;
    stat_add(STAT_KERNELS_COMPILE_NS, ns);
    int ok = load_image(k, image, "NVRTC", dc->device);
    if (ok) {
        stat_add(STAT_KERNELS_NVRTC, 1);
        commlib_log(LOG_INFO, "device pack kernels loaded on device %d, compiled by NVRTC %d.%d (%s) for %s in %.2f s",
                    dc->device, plan.major, plan.minor, plan.library, plan.target, ns / 1e9);
        nvrtc_cache_write(&plan, image, bytes);
    } else {
        commlib_log(LOG_WARN, "device pack kernels compiled by NVRTC %d.%d for %s do not load on device %d",
                    plan.major, plan.minor, plan.target, dc->device);
    }
    free(image);
    return ok;
}

/* Where the kernels come from (COMMLIB_KERNELS): the fatbin nvcc built at install time,
 * else NVRTC at run time - for a build without nvcc, or a GPU newer than the fatbin's
 * machine code whose driver cannot take its PTX either.  Neither: device buffers are
 * staged through the host (pack_any.c), slower but correct. */
static struct device_kernels *load_kernels(struct device_context *dc)
{
    const struct cuda_driver *cu = cuda_driver();
    int route = commlib_config.kernels;
    if (!cu || route == KERNELS_NONE) {
        if (cu) commlib_log(LOG_INFO, "COMMLIB_KERNELS=none: device buffers are staged through the host");
        stat_add(STAT_KERNELS_NONE, 1);
        return &unavailable;
    }
    struct device_kernels *k = calloc(1, sizeof *k);
    if (!k || !cuda_check(cu->cuCtxSetCurrent(dc->context), "cuCtxSetCurrent")) {
        free(k);
        stat_add(STAT_KERNELS_NONE, 1);
        return &unavailable;
    }
    char fatbin_failure[sizeof load_failure + 32] = "";
    if (route != KERNELS_NVRTC && commlib_device_image_size) {
        if (load_image(k, commlib_device_image, "the embedded fatbin", dc->device)) {
            stat_add(STAT_KERNELS_FATBIN, 1);
            commlib_log(LOG_INFO, "device pack kernels loaded on device %d from the embedded fatbin (%zu bytes)",
                        dc->device, commlib_device_image_size);
            k->loaded = 1;
            return k;
        }
        snprintf(fatbin_failure, sizeof fatbin_failure, "; the fatbin: %s", load_failure);
    } else if (route == KERNELS_FATBIN) {
        commlib_log(LOG_WARN, "COMMLIB_KERNELS=fatbin, but this build has no fatbin (built without nvcc)");
    }
    if (route != KERNELS_FATBIN && load_nvrtc(k, dc)) {
        k->loaded = 1;
        return k;
    }
    commlib_log(LOG_WARN, "no device pack kernels on device %d: device buffers are staged through the host "
                          "(COMMLIB_KERNELS=%s%s)", dc->device, route_name[route], fatbin_failure);
    free(k);
    stat_add(STAT_KERNELS_NONE, 1);
    return &unavailable;
}

static struct device_kernels *kernels_of(struct device_context *dc)
{
    struct device_kernels *k = __atomic_load_n(&dc->kernels, __ATOMIC_ACQUIRE);
    if (!k) {
        pthread_mutex_lock(&load_lock);
        k = dc->kernels;
        if (!k) {
            k = load_kernels(dc);
            __atomic_store_n(&dc->kernels, (void *)k, __ATOMIC_RELEASE);
        }
        pthread_mutex_unlock(&load_lock);
    }
    return k->loaded ? k : NULL;
}

int device_pack_available(struct device_context *dc) { return dc && kernels_of(dc); }

size_t device_kernels_json(char *buf, size_t len)
{
    commlib_config_init();
    /* the length it needs, as snprintf: the caller retries with a larger buffer */
    size_t need = (size_t)snprintf(buf, len, "{\"route\":\"%s\",\"fatbin_bytes\":%zu,\"source_bytes\":%zu,\"runtime\":",
                                   route_name[commlib_config.kernels], commlib_device_image_size,
                                   commlib_device_kernels_source_size);
    need += nvrtc_info_json(buf + (need < len ? need : len), need < len ? len - need : 0);
    need += (size_t)snprintf(buf + (need < len ? need : len), need < len ? len - need : 0, "}");
    return need;
}

/* n / d == (umulhi(n, multiplier) + n) >> shift for every n < 2^31 and 1 <= d < 2^31
 * (round-up multiplier; the kernels' 32-bit path only takes word counts below 2^31).
 * Each costs a 64-bit division, and a held MPI_Pack or a burst send makes up to 5 for each
 * of its pieces (a halo exchange of 26 neighbours: ~500) from a few distinct values: each
 * thread keeps the last one found in each of 16 slots (d's Fibonacci hash).  The fake driver
 * (tests/c/fake_cuda.c) checks every divisor a launch carries. */
static struct fast_divisor fast_divisor_of(int64_t d)
{
    struct fast_divisor f = {0, 0};
    if (d < 1 || d >= (INT64_C(1) << 31)) return f; /* unused: the wide kernels divide */
    static __thread struct {
        int64_t d; /* 0: empty */
        struct fast_divisor f;
    } memo[16];
    unsigned at = (unsigned)(((uint64_t)d * UINT64_C(0x9E3779B97F4A7C15)) >> 60);
    if (memo[at].d == d) return memo[at].f;
    f.shift = d > 1 ? (uint32_t)(64 - __builtin_clzll((uint64_t)d - 1)) : 0; /* the least with 2^shift >= d */
    f.multiplier = (uint32_t)(((UINT64_C(1) << 32) * ((UINT64_C(1) << f.shift) - (uint64_t)d)) / (uint64_t)d + 1);
    memo[at].d = d;
    memo[at].f = f;
    return f;
}

/* Widest word W in {1, 2, 4, 8, 16} that divides every address the kernel touches. */
static int word_log2(uint64_t bits)
{
    int w = 4;
    while (w > 0 && (bits & ((UINT64_C(1) << w) - 1))) w--;
    return w;
}

/* The word size's log2 W for piece p of `elements` elements (the widest word that divides
 * every address the kernel touches), and the piece's block count in *blocks. */
static int piece_word_log2(const strided_piece *p, int64_t elements, int64_t typed_element_stride,
                           int64_t packed_element_stride, const char *typed, const char *packed, int64_t *blocks)
{
    int64_t n = 1;
    /* packed's bits: for a one-pass copy's job (no packed side), the other piece's (piece_bits) */
    uint64_t bits = (uint64_t)p->block | (uint64_t)(uintptr_t)typed | (uint64_t)(uintptr_t)packed;
    for (int d = 0; d < p->ndims; d++) {
        n *= p->dims[d].count;
        if (p->dims[d].count > 1) bits |= (uint64_t)p->dims[d].stride;
    }
    if (elements > 1) bits |= (uint64_t)typed_element_stride | (uint64_t)packed_element_stride;
    *blocks = n;
    return word_log2(bits);
}

/* The blocks to launch for total_words words: one wave of resident blocks at most (grid-stride
 * beyond that), fewer when there is less than a word per thread (the smallest messages launch a
 * single block); *wide: the index math must be 64-bit. */
static int64_t grid_of(const struct device_context *dc, int64_t total_words, int *wide)
{
    int64_t per_sm = dc->threads_per_sm >= THREADS_PER_BLOCK ? dc->threads_per_sm / THREADS_PER_BLOCK : 8;
    int64_t wave = (dc->sm_count > 0 ? dc->sm_count : 108) * per_sm;
    int64_t grid = (total_words + THREADS_PER_BLOCK - 1) / THREADS_PER_BLOCK;
    if (grid > wave) grid = wave;
    if (grid < 1) grid = 1;
    *wide = total_words + UNROLL * grid * THREADS_PER_BLOCK >= (INT64_C(1) << 31);
    return grid;
}

/* The kernel arguments that move piece p of `elements` elements (typed side
 * `typed_element_stride` apart, packed side `packed_element_stride` apart; typed and
 * packed point at the piece's first byte on each side): the word size's log2 in *w, the
 * blocks to launch in *grid, and whether the index math must be 64-bit in *wide. */
static void piece_args(const struct device_context *dc, const strided_piece *p, int64_t elements,
                       int64_t typed_element_stride, int64_t packed_element_stride, const char *typed,
                       const char *packed, struct move_args *a, int *w, int64_t *grid, int *wide)
{
    int64_t blocks;
    *w = piece_word_log2(p, elements, typed_element_stride, packed_element_stride, typed, packed, &blocks);
    memset(a, 0, sizeof *a);
    a->block_words = p->block >> *w;
    a->element_words = a->block_words * blocks;
    a->elements = elements;
    a->total_words = a->element_words * elements;
    a->typed_element_stride = typed_element_stride;
    a->packed_element_stride = packed_element_stride;
    a->ndims = p->ndims;
    for (int d = 0; d < p->ndims; d++) {
        a->count[d] = p->dims[d].count;
        a->stride[d] = p->dims[d].stride;
        a->count_div[d] = fast_divisor_of(a->count[d]);
    }
    a->element_div = fast_divisor_of(a->element_words);
    a->block_div = fast_divisor_of(a->block_words);
    *grid = grid_of(dc, a->total_words, wide);
}

/* One launch: piece p of `elements` elements (piece_args). */
static int launch_piece(struct device_context *dc, struct device_kernels *k, const strided_piece *p, int64_t elements,
                        int64_t typed_element_stride, int64_t packed_element_stride, char *typed, char *packed,
                        int packing)
{
    struct move_args a;
    int w, wide;
    int64_t grid;
    piece_args(dc, p, elements, typed_element_stride, packed_element_stride, typed, packed, &a, &w, &grid, &wide);
    if (a.total_words == 0) return 1;
    void *params[] = {&typed, &packed, &a};
    return cuda_check(cuda_driver()->cuLaunchKernel(k->move[packing][w][wide], (unsigned)grid, 1, 1,
                                                    THREADS_PER_BLOCK, 1, 1, 0, dc->stream, params, NULL),
                      "cuLaunchKernel (pack)");
}

/* Offsets may be absolute addresses (MPI_BOTTOM: typed is NULL). */
static char *at(const void *base, int64_t offset) { return (char *)((uintptr_t)base + (uintptr_t)offset); }

int device_pack_launch(struct device_context *dc, const canonical_type *ct, const void *typed, int64_t count,
                       void *packed, int packing)
{
    struct device_kernels *k = dc ? kernels_of(dc) : NULL;
    if (!k || ct->unsupported || count < 0) return 0;
    if (count == 0 || ct->size == 0) return 1;
    strided_piece whole;
    if (canonical_single_piece(ct, count, &whole)) /* the common case: one launch */
        return launch_piece(dc, k, &whole, 1, 0, 0, at(typed, whole.offset), packed, packing);
    int64_t prefix = 0; /* packed bytes of the pieces before this one, per element */
    for (int j = 0; j < ct->npieces; j++) {
        const strided_piece *p = &ct->pieces[j];
        if (!launch_piece(dc, k, p, count, ct->extent, ct->size, at(typed, p->offset), at(packed, prefix),
                          packing))
            return 0;
        int64_t bytes = p->block;
        for (int d = 0; d < p->ndims; d++) bytes *= p->dims[d].count;
        prefix += bytes;
    }
    return 1;
}

/* Deferred moves (device_unpack_deferred, device_pack_piece): this thread's jobs for one
 * context, a batch per direction, launched by device_deferred_flush (the device batch's
 * end): packs first, then unpacks (an unpack may read what a pack wrote).  A batch whose
 * jobs share one word size launches that size's kernel, one that mixes them (a halo's
 * 8-byte corners and 16-byte faces) the mixed kernel: one launch either way. */
struct deferred_moves {
    struct device_context *dc;
    struct device_kernels *k;
    int pending; /* jobs queued in all batches */
    int64_t bytes; /* what they move, since the last flush (device_deferred_bytes) */
    int launch_stat; /* what its launches count as: STAT_DEVICE_BATCH_LAUNCHES, or a queue's of
                        device_pack_queue_add (GPU-to-GPU bursts) or device_hold_queue_add */
    CUstream stream; /* its launches' stream (NULL: the context's) */
    struct batch_args batch[2];               /* [packing] */
    int64_t grid[2];                          /* blocks per job: the largest job's */
    unsigned words[2];                        /* bit log2 W for each word size among its jobs */
    struct copy_args copies[N_WORD_SIZES];    /* one-pass copies (device_copy_piece) [log2 W] */
    int64_t copy_grid[N_WORD_SIZES];
};
static __thread struct deferred_moves *deferred;

static int launch_batch(struct deferred_moves *q, int packing)
{
    struct batch_args *b = &q->batch[packing];
    if (!b->njobs) return 1;
    void *params[] = {b};
    unsigned words = q->words[packing];
    CUfunction f = words & (words - 1) ? q->k->batch_mixed[packing] : q->k->batch[packing][__builtin_ctz(words)];
    int ok = cuda_check(cuda_driver()->cuLaunchKernel(f, (unsigned)q->grid[packing],
                                                      (unsigned)b->njobs, 1, THREADS_PER_BLOCK, 1, 1, 0,
                                                      q->stream ? q->stream : q->dc->stream,
                                                      params, NULL),
                        "cuLaunchKernel (batched move)");
    stat_add(q->launch_stat ? (enum stat_counter)q->launch_stat : STAT_DEVICE_BATCH_LAUNCHES, 1);
    q->pending -= (int)b->njobs;
    b->njobs = 0;
    q->grid[packing] = 0;
    q->words[packing] = 0;
    return ok;
}

static int launch_copies(struct deferred_moves *q, int w)
{
    struct copy_args *c = &q->copies[w];
    if (!c->njobs) return 1;
    void *params[] = {c};
    int ok = cuda_check(cuda_driver()->cuLaunchKernel(q->k->copy[w], (unsigned)q->copy_grid[w], (unsigned)c->njobs, 1,
                                                      THREADS_PER_BLOCK, 1, 1, 0, q->dc->stream, params, NULL),
                        "cuLaunchKernel (one-pass copies)");
    stat_add(STAT_DEVICE_BATCH_LAUNCHES, 1);
    q->pending -= (int)c->njobs;
    c->njobs = 0;
    q->copy_grid[w] = 0;
    return ok;
}

int device_deferred_flush(void)
{
    struct deferred_moves *q = deferred;
    if (!q || !q->pending) return 1;
    const struct cuda_driver *cu = cuda_driver();
    CUcontext current = NULL;
    cu->cuCtxGetCurrent(&current);
    int ok = current == q->dc->context || cuda_check(cu->cuCtxSetCurrent(q->dc->context), "cuCtxSetCurrent");
    ok = launch_batch(q, 1) && ok;
    for (int w = 0; w < N_WORD_SIZES; w++) ok = launch_copies(q, w) && ok;
    ok = launch_batch(q, 0) && ok;
    q->pending = 0;
    q->bytes = 0;
    if (current != q->dc->context) cu->cuCtxSetCurrent(current);
    return ok;
}

int64_t device_deferred_bytes(void) { return deferred ? deferred->bytes : 0; }

/* A job for piece p, when the batched kernel can take it: the fields piece_args would give,
 * filled directly (a held MPI_Pack makes one per piece; piece_args' 840-byte block is the
 * single-launch kernels'). */
static int batch_job_of(const struct device_context *dc, const strided_piece *p, int64_t elements,
                        int64_t typed_element_stride, int64_t packed_element_stride, char *typed, char *packed,
                        struct batch_job *j, int *w, int64_t *grid)
{
    if (p->ndims > BATCH_DIMS) return 0;
    int64_t blocks;
    *w = piece_word_log2(p, elements, typed_element_stride, packed_element_stride, typed, packed, &blocks);
    int64_t block_words = p->block >> *w, element_words = block_words * blocks, total_words = element_words * elements;
    int wide;
    *grid = grid_of(dc, total_words, &wide);
    if (wide) return 0;
    memset(j, 0, sizeof *j);
    j->typed = typed;
    j->packed = packed;
    j->typed_element_stride = typed_element_stride;
    j->packed_element_stride = packed_element_stride;
    j->total_words = (uint32_t)total_words;
    j->element_words = (uint32_t)element_words;
    j->elements = (uint32_t)elements;
    j->block_words = (uint32_t)block_words;
    j->ndims = (uint16_t)p->ndims;
    j->word_log2 = (uint16_t)*w;
    j->element_div = fast_divisor_of(element_words);
    j->block_div = fast_divisor_of(block_words);
    for (int d = 0; d < p->ndims; d++) {
        j->count[d] = (uint32_t)p->dims[d].count;
        j->stride[d] = p->dims[d].stride;
        j->count_div[d] = fast_divisor_of(p->dims[d].count);
    }
    return 1;
}

/* Queues n jobs of one direction on q, which holds dc's jobs or none (all or none queued). */
static int queue_into(struct deferred_moves *q, struct device_context *dc, struct device_kernels *k, int packing,
                      const struct batch_job *jobs, const int64_t *grids, int n)
{
    q->dc = dc;
    q->k = k;
    for (int i = 0; i < n; i++) {
        struct batch_args *b = &q->batch[packing];
        /* a full unpack batch of this thread's batch may launch early (before queued packs it
           might read: flush them all); a full pack batch may launch before unpacks that come
           after it anyway, and the jobs of other queues do not depend on each other */
        if (b->njobs == BATCH_JOBS && !(packing || q != deferred ? launch_batch(q, packing) : device_deferred_flush()))
            return 0;
        b->jobs[b->njobs++] = jobs[i];
        if (grids[i] > q->grid[packing]) q->grid[packing] = grids[i];
        q->words[packing] |= 1u << jobs[i].word_log2;
        q->pending++;
        q->bytes += (int64_t)jobs[i].total_words << jobs[i].word_log2;
    }
    return 1;
}

/* Queues n jobs of one direction for dc on this thread's queue. */
static int queue_jobs(struct device_context *dc, struct device_kernels *k, int packing, const struct batch_job *jobs,
                      const int64_t *grids, int n)
{
    struct deferred_moves *q = deferred;
    if (!q && !(q = deferred = calloc(1, sizeof *q))) return 0;
    device_batch_set_flush(device_deferred_flush);
    if (q->pending && q->dc != dc && !device_deferred_flush()) return 0;
    if (!queue_into(q, dc, k, packing, jobs, grids, n)) return 0;
    stat_add(STAT_DEVICE_DEFERRED, (uint64_t)n);
    return 1;
}

/* The jobs moving `count` elements of ct between typed and packed, one per piece (or one
 * for the whole); 0 when the batched kernel does not take one of them. */
static int jobs_of(struct device_context *dc, const canonical_type *ct, void *typed, int64_t count, const void *packed,
                   struct batch_job *jobs, int64_t *grids)
{
    if (ct->unsupported || count <= 0 || ct->size == 0) return 0;
    strided_piece whole;
    int single = canonical_single_piece(ct, count, &whole);
    int n = single ? 1 : ct->npieces;
    if (n > BATCH_JOBS) return 0;
    int64_t prefix = 0;
    for (int i = 0; i < n; i++) { /* every piece must fit the batched kernel, or none is queued */
        const strided_piece *p = single ? &whole : &ct->pieces[i];
        char *t = at(typed, p->offset), *pk = at(packed, prefix);
        int w;
        if (single ? !batch_job_of(dc, p, 1, 0, 0, t, pk, &jobs[i], &w, &grids[i])
                   : !batch_job_of(dc, p, count, ct->extent, ct->size, t, pk, &jobs[i], &w, &grids[i]))
            return 0;
        int64_t bytes = p->block;
        for (int d = 0; d < p->ndims; d++) bytes *= p->dims[d].count;
        prefix += bytes;
    }
    return n;
}

static int deferring(struct device_context *dc) { return commlib_config.batch_unpack && dc && device_batch_open(); }

int device_unpack_deferred(struct device_context *dc, const canonical_type *ct, void *typed, int64_t count,
                           const void *packed)
{
    if (!deferring(dc)) return 0;
    struct device_kernels *k = kernels_of(dc);
    struct batch_job jobs[BATCH_JOBS];
    int64_t grids[BATCH_JOBS];
    int n = k ? jobs_of(dc, ct, typed, count, packed, jobs, grids) : 0;
    return n && queue_jobs(dc, k, 0, jobs, grids, n);
}

static int queue_add(struct deferred_moves **queue, struct device_context *dc, const canonical_type *ct,
                     const void *typed, int64_t count, void *packed, int packing, CUstream stream, int launch_stat)
{
    struct deferred_moves *q = *queue;
    struct device_kernels *k = dc ? kernels_of(dc) : NULL;
    struct batch_job jobs[BATCH_JOBS];
    int64_t grids[BATCH_JOBS];
    int n = k ? jobs_of(dc, ct, (void *)typed, count, packed, jobs, grids) : 0;
    if (!n || (q && q->pending && (q->dc != dc || q->stream != stream))) return 0;
    if (!q && !(q = *queue = calloc(1, sizeof *q))) return 0;
    q->launch_stat = launch_stat;
    q->stream = stream;
    return queue_into(q, dc, k, packing, jobs, grids, n);
}

int device_pack_queue_add(struct deferred_moves **queue, struct device_context *dc, const canonical_type *ct,
                          const void *typed, int64_t count, void *packed, CUstream stream)
{
    return queue_add(queue, dc, ct, typed, count, packed, 1, stream, STAT_P2P_IPC_BURST_LAUNCHES);
}

int device_hold_queue_add(struct deferred_moves **queue, struct device_context *dc, const canonical_type *ct,
                          void *typed, int64_t count, void *packed, int packing)
{
    return queue_add(queue, dc, ct, typed, count, packed, packing, NULL, STAT_DEVICE_HOLD_LAUNCHES);
}

int device_pack_queue_launch(struct deferred_moves *q)
{
    if (!q || !q->pending) return 1;
    const struct cuda_driver *cu = cuda_driver();
    CUcontext current = NULL;
    cu->cuCtxGetCurrent(&current);
    int ok = current == q->dc->context || cuda_check(cu->cuCtxSetCurrent(q->dc->context), "cuCtxSetCurrent");
    ok = launch_batch(q, 1) && ok;
    ok = launch_batch(q, 0) && ok;
    q->pending = 0;
    q->bytes = 0;
    if (current != q->dc->context) cu->cuCtxSetCurrent(current);
    return ok;
}

int device_pack_piece(struct device_context *dc, const strided_piece *p, const void *typed, void *packed)
{
    struct device_kernels *k = dc ? kernels_of(dc) : NULL;
    if (!k) return 0;
    struct batch_job job;
    int w;
    int64_t grid;
    if (deferring(dc) && batch_job_of(dc, p, 1, 0, 0, (char *)typed, packed, &job, &w, &grid))
        return queue_jobs(dc, k, 1, &job, &grid, 1);
    return launch_piece(dc, k, p, 1, 0, 0, (char *)typed, packed, 1);
}

/* The bits of every address, block and stride of piece p at `typed` (word_log2 of them: the
 * widest word that moves it). */
static uint64_t piece_bits(const strided_piece *p, const char *typed)
{
    uint64_t bits = (uint64_t)p->block | (uint64_t)(uintptr_t)typed;
    for (int d = 0; d < p->ndims; d++)
        if (p->dims[d].count > 1) bits |= (uint64_t)p->dims[d].stride;
    return bits;
}

static int64_t piece_bytes(const strided_piece *p)
{
    int64_t bytes = p->block;
    for (int d = 0; d < p->ndims; d++) bytes *= p->dims[d].count;
    return bytes;
}

int device_copy_piece(struct device_context *dc, const strided_piece *from, const void *src, const canonical_type *ct,
                      void *typed, int64_t count)
{
    struct device_kernels *k = dc ? kernels_of(dc) : NULL;
    strided_piece to;
    if (!k || ct->unsupported || count <= 0 || ct->size == 0 || !canonical_single_piece(ct, count, &to) ||
        piece_bytes(from) != piece_bytes(&to))
        return 0;
    char *dst = at(typed, to.offset);
    struct copy_job job;
    int w, w_to;
    int64_t grid, grid_to;
    /* each job's word fits both pieces: the other's bits stand in for its packed side */
    if (!batch_job_of(dc, from, 1, 0, 0, (char *)src, (char *)(uintptr_t)piece_bits(&to, dst), &job.from, &w, &grid) ||
        !batch_job_of(dc, &to, 1, 0, 0, dst, (char *)(uintptr_t)piece_bits(from, src), &job.to, &w_to, &grid_to) ||
        w != w_to || job.from.total_words != job.to.total_words)
        return 0;
    int64_t cap = (dc->sm_count > 0 ? dc->sm_count : 108) * COPY_BLOCKS_PER_SM;
    if (grid > cap) grid = cap;
    if (deferring(dc)) {
        struct deferred_moves *q = deferred;
        if (!q && !(q = deferred = calloc(1, sizeof *q))) return 0;
        device_batch_set_flush(device_deferred_flush);
        if (q->pending && q->dc != dc && !device_deferred_flush()) return 0;
        q->dc = dc;
        q->k = k;
        /* a full batch may launch at once: a copy reads the sender's memory, which nothing queued writes */
        if (q->copies[w].njobs == COPY_JOBS && !launch_copies(q, w)) return 0;
        q->copies[w].jobs[q->copies[w].njobs++] = job;
        if (grid > q->copy_grid[w]) q->copy_grid[w] = grid;
        q->pending++;
        q->bytes += (int64_t)job.from.total_words << w;
        stat_add(STAT_DEVICE_DEFERRED, 1);
        return 1;
    }
    /* launched now: after anything this thread still holds queued (nothing, without a batch) */
    struct copy_args *one = calloc(1, sizeof *one); /* the kernel reads the whole parameter block */
    if (!one || !device_deferred_flush()) {
        free(one);
        return 0;
    }
    one->njobs = 1;
    one->jobs[0] = job;
    void *params[] = {one};
    int ok = cuda_check(cuda_driver()->cuLaunchKernel(k->copy[w], (unsigned)grid, 1, 1, THREADS_PER_BLOCK, 1, 1, 0,
                                                      dc->stream, params, NULL),
                        "cuLaunchKernel (one-pass copy)");
    free(one);
    return ok;
}
