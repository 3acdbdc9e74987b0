/* A stand-in for libcuda.so.1 on machines without a GPU, so CI runs the device paths:
 * "device" memory is address space the CPU cannot touch (PROT_NONE - any access that
 * bypasses the copy functions segfaults), its bytes kept in a shadow mapping that the
 * copy functions translate to.  Managed and pinned allocations are ordinary memory,
 * reported as such by cuPointerGetAttributes.  No kernels: module loading fails, so
 * commlib takes its no-kernel routes.  Built with -shared -Wl,-soname,libcuda.so.1 and
 * found through LD_LIBRARY_PATH.  commlib needs every symbol native/cuda/driver.c
 * resolves: add one here when that list grows.
 *
 * A copy that reaches past the device allocation it starts in fails with
 * CUDA_ERROR_ILLEGAL_ADDRESS (and a line on stderr), as a real device faults.
 *
 * FAKE_CUDA_HOST_VISIBLE=1: device memory is ordinary readable memory instead (still
 * reported as device memory), so that a host MPI "believed" CUDA-aware
 * (COMMLIB_CUDA_AWARE=1) can be handed device pointers in tests.  FAKE_CUDA_NAME sets
 * the device name (default "fake_cuda").
 *
 * With FAKE_CUDA_KERNELS=1 it loads the images of tests/c/fake_nvrtc.c and nvcc fatbins
 * (FAKE_CUDA_KERNELS=nvrtc: only the former, as for a GPU newer than the fatbin) and runs
 * commlib's pack kernels on the CPU: the launch parameters are decoded as the kernels in
 * native/pack/device_kernels.cu read them, word by word, so the bytes that come back
 * check commlib's launches too.  FAKE_CUDA_CC=90 sets the compute capability.
 *
 * FAKE_CUDA_DEFER=1: copies and kernels run when something waits for the stream (stream
 * or event synchronisation, an event query, a synchronous copy, a free), in the order they
 * were queued, reading their sources then - as a GPU may - so that host staging reused
 * or freed before the wait shows up as wrong bytes.  fake_cuda_pending() (exported)
 * tells how much is queued, fake_cuda_stream_syncs() how many cuStreamSynchronize calls
 * were made, fake_cuda_pointer_queries() how many cuPointerGetAttributes.
 *
 * FAKE_CUDA_COPY_GBPS=G (with FAKE_CUDA_DEFER=1): a copy engine of G GB/s.  Each queued copy
 * ends n / G after the previous one (or after it was queued); an event recorded behind them
 * is not ready (cuEventQuery: CUDA_ERROR_NOT_READY) until the last one ended, and whatever
 * waits - a stream or event synchronisation, a synchronous copy, a free - sleeps until then.
 * Kernels take no time.  So benchmarks on a machine without a GPU show what overlaps copies
 * with other work (pipelined staging) and what waits for them in turn; the figures are
 * of this emulated device, not of any GPU.
 *
 * FAKE_CUDA_PAGEABLE_LAG=1: cuMemcpyHtoD returns before its bytes land, as a real driver's
 * copy from pageable host memory may (its DMA from the driver's staging still running): they
 * land when work is next queued on any stream (stream order: the legacy default stream comes
 * before commlib's blocking streams) or something waits (synchronisations, synchronous
 * copies, a free); until then cuStreamQuery says CUDA_ERROR_NOT_READY.  Another process that
 * reads the memory through an IPC mapping meanwhile sees the old bytes.
 *
 * FAKE_CUDA_BATCH_ORDER=reverse: the jobs of a batched launch run last to first (a GPU runs
 * them in any order), so that jobs that depend on each other show up as wrong bytes.
 *
 * It also stands in for libcupti (COMMLIB_CUPTI=<this library>): cuptiSubscribe,
 * cuptiEnableDomain, cuptiEnableCallback, cuptiGetCallbackName, cuptiUnsubscribe,
 * cuptiGetResultString; the subscriber is called at the entry of every cu* call above with
 * the call's name (driver domain; there is no runtime) unless its callback was turned off,
 * and commlib's COMMLIB_DEVICE_PACK_HOLD relies on those calls.  FAKE_CUPTI_BUSY=1: the
 * subscription is refused (CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED), as under a
 * profiler.  FAKE_CUDA_COUNTS counts the callbacks (cupti_callbacks). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <time.h>
#include <unistd.h>
#include <stddef.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
#define EXPORT __attribute__((visibility("default")))
#define DEVICE_BYTES (1ull << 30)

static char *device, *shadow;
static int shadow_fd = -1;
static size_t device_used;
static struct range { char *p; size_t n; int managed; } ranges[4096]; /* pinned and managed */
static int nranges;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

/* FAKE_CUDA_COUNTS=1: at exit, each process prints how often the calls that cost a GPU
 * time (launches, copies, waits, event calls, pointer queries) were made. */
enum { C_LAUNCH, C_COPY_ASYNC, C_COPY_SYNC, C_STREAM_SYNC, C_EVENT_RECORD, C_EVENT_QUERY, C_EVENT_SYNC,
       C_STREAM_WAIT, C_POINTER_ATTRS, C_WRITE_VALUE, C_WAIT_VALUE, C_CUPTI_CALLBACKS, C_CTX_SET, C_COUNTERS };
static const char *const counter_names[C_COUNTERS] = {"launch", "memcpy_async", "memcpy_sync", "stream_sync",
                                                      "event_record", "event_query", "event_sync", "stream_wait_event",
                                                      "pointer_attributes", "write_value", "wait_value",
                                                      "cupti_callbacks", "ctx_set"};
static unsigned long long counters[C_COUNTERS];
#define COUNT(c) __atomic_add_fetch(&counters[c], 1, __ATOMIC_RELAXED)

/* The CUPTI stand-in (header): CUpti_CallbackData's layout, the driver domain (1) only. */
struct cupti_data {
    int site; /* CUPTI_API_ENTER */
    const char *function;
    const void *params;
    void *result;
    const char *symbol;
    void *context;
    uint32_t context_uid;
    uint64_t *correlation_data;
    uint32_t correlation_id;
};
typedef void (*cupti_callback)(void *, int, uint32_t, const void *);
static cupti_callback cupti_subscriber;
static void *cupti_userdata;
static int cupti_driver_domain;
/* callback ids: 1 + the index here (cuptiGetCallbackName); a call not listed has id 0 */
static const char *const api_names[] = {
    "cuInit", "cuGetExportTable", "cuDriverGetVersion", "cuGetErrorString", "cuDeviceGetCount", "cuDeviceGet",
    "cuDevicePrimaryCtxRetain", "cuCtxSetCurrent", "cuCtxGetCurrent", "cuCtxGetDevice", "cuDeviceGetName",
    "cuDeviceGetAttribute", "cuPointerGetAttributes", "cuModuleLoadData", "cuModuleUnload", "cuModuleGetFunction",
    "cuLaunchKernel", "cuStreamCreate", "cuStreamSynchronize", "cuMemcpyAsync", "cuMemcpy2DAsync_v2",
    "cuMemcpyHtoD_v2", "cuMemcpyDtoH_v2", "cuMemAlloc_v2", "cuIpcGetMemHandle", "cuIpcOpenMemHandle_v2",
    "cuIpcCloseMemHandle", "cuMemAllocManaged", "cuMemFree_v2", "cuMemHostAlloc", "cuMemFreeHost", "cuEventCreate",
    "cuIpcGetEventHandle", "cuIpcOpenEventHandle", "cuEventRecord", "cuEventQuery", "cuEventSynchronize",
    "cuEventDestroy_v2", "cuStreamWriteValue64_v2", "cuStreamWaitValue64_v2", "cuStreamWaitEvent", "cuStreamQuery",
    "cuCtxSynchronize"};
#define N_API (sizeof api_names / sizeof *api_names)
static int cupti_off[N_API + 1]; /* cuptiEnableCallback(0, ...) */
static void api_entry(const char *name)
{
    cupti_callback f = __atomic_load_n(&cupti_subscriber, __ATOMIC_ACQUIRE);
    if (!f || !__atomic_load_n(&cupti_driver_domain, __ATOMIC_ACQUIRE)) return;
    uint32_t cbid = 0;
    for (uint32_t i = 0; i < N_API && !cbid; i++)
        if (!strcmp(api_names[i], name)) cbid = i + 1;
    if (__atomic_load_n(&cupti_off[cbid], __ATOMIC_ACQUIRE)) return;
    COUNT(C_CUPTI_CALLBACKS);
    struct cupti_data d = {.site = 0, .function = name};
    f(cupti_userdata, 1, cbid, &d); /* calls the callback makes call back too, as CUPTI's do */
}
EXPORT int cuptiGetCallbackName(int domain, uint32_t cbid, const char **name)
{
    if (domain != 1 || cbid < 1 || cbid > N_API) return 1; /* CUPTI_ERROR_INVALID_PARAMETER */
    *name = api_names[cbid - 1];
    return 0;
}
EXPORT int cuptiEnableCallback(uint32_t enable, void *subscriber, int domain, uint32_t cbid)
{
    if (subscriber != (void *)&cupti_subscriber || domain != 1 || cbid < 1 || cbid > N_API) return 1;
    __atomic_store_n(&cupti_off[cbid], !enable, __ATOMIC_RELEASE);
    return 0;
}
#define API_ENTRY() api_entry(__func__)
EXPORT int cuptiSubscribe(void **subscriber, cupti_callback callback, void *userdata)
{
    const char *busy = getenv("FAKE_CUPTI_BUSY");
    if ((busy && !strcmp(busy, "1")) || __atomic_load_n(&cupti_subscriber, __ATOMIC_ACQUIRE)) return 39;
    cupti_userdata = userdata;
    __atomic_store_n(&cupti_subscriber, callback, __ATOMIC_RELEASE);
    *subscriber = (void *)&cupti_subscriber;
    return 0;
}
EXPORT int cuptiEnableDomain(uint32_t enable, void *subscriber, int domain)
{
    if (subscriber != (void *)&cupti_subscriber) return 1;
    if (domain == 1) __atomic_store_n(&cupti_driver_domain, (int)enable, __ATOMIC_RELEASE);
    return 0;
}
EXPORT int cuptiUnsubscribe(void *subscriber)
{
    if (subscriber != (void *)&cupti_subscriber) return 1;
    __atomic_store_n(&cupti_driver_domain, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&cupti_subscriber, NULL, __ATOMIC_RELEASE);
    memset(cupti_off, 0, sizeof cupti_off);
    return 0;
}
EXPORT int cuptiGetResultString(int result, const char **text)
{
    *text = result == 39 ? "CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED" : "fake_cupti error";
    return 0;
}
static void print_counts(void)
{
    char line[512];
    int n = snprintf(line, sizeof line, "fake_cuda counts pid=%d", (int)getpid());
    for (int i = 0; i < C_COUNTERS && n < (int)sizeof line; i++)
        n += snprintf(line + n, sizeof line - (size_t)n, " %s=%llu", counter_names[i], counters[i]);
    fprintf(stderr, "%s\n", line);
}
__attribute__((constructor)) static void counts_at_exit(void)
{
    if (getenv("FAKE_CUDA_COUNTS") && atoi(getenv("FAKE_CUDA_COUNTS")) > 0) atexit(print_counts);
}
static char context_object;
static __thread void *current;

static void *real(CUdeviceptr p)
{
    char *c = (char *)(uintptr_t)p;
    return device && c >= device && c < device + DEVICE_BYTES ? shadow + (c - device) : c;
}

/* 0 plain host, 1 pinned, 2 device or managed */
static int kind_of(CUdeviceptr p, int *managed)
{
    char *c = (char *)(uintptr_t)p;
    int kind = 0;
    *managed = 0;
    pthread_mutex_lock(&lock);
    if (device && c >= device && c < device + device_used) kind = 2;
    for (int i = 0; i < nranges && !kind; i++)
        if (ranges[i].p && c >= ranges[i].p && c < ranges[i].p + ranges[i].n) {
            kind = ranges[i].managed ? 2 : 1;
            *managed = ranges[i].managed;
        }
    pthread_mutex_unlock(&lock);
    return kind;
}

static int track(void *p, size_t n, int managed)
{
    pthread_mutex_lock(&lock);
    int slot = 0;
    while (slot < nranges && ranges[slot].p) slot++; /* a freed slot first */
    int ok = p && slot < 4096;
    if (ok) ranges[slot] = (struct range){p, n, managed};
    if (ok && slot == nranges) nranges++;
    pthread_mutex_unlock(&lock);
    return ok ? 0 : 2;
}

/* Returns the tracked size (0: not tracked). */
static size_t untrack(void *p)
{
    size_t n = 0;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < nranges; i++)
        if (ranges[i].p == p) {
            ranges[i].p = NULL;
            n = ranges[i].n;
        }
    pthread_mutex_unlock(&lock);
    return n;
}

/* Managed and pinned allocations are mapped, as the real driver maps them: never in the
 * brk heap, which commlib takes for host memory without asking (native/cuda/device.c). */
static void *map_host(size_t n)
{
    void *q = mmap(NULL, n ? n : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return q == MAP_FAILED ? NULL : q;
}
static void unmap_host(void *p)
{
    size_t n = untrack(p);
    if (n) munmap(p, n);
}

EXPORT CUresult cuInit(unsigned flags)
{
    API_ENTRY();
    (void)flags;
    pthread_mutex_lock(&lock);
    if (!device) {
        /* A real driver's first cuInit takes tens of milliseconds (more with the context
         * that follows); commlib, when not preloaded, looks for a loaded driver at most
         * every 5 ms and relies on that gap before device memory can exist.  Preloaded it
         * watches dlopen instead: FAKE_CUDA_INIT_MS=0 checks that it needs no gap. */
        const char *ms = getenv("FAKE_CUDA_INIT_MS");
        long init_ms = ms && *ms ? atol(ms) : 50;
        struct timespec initialising = {init_ms / 1000, init_ms % 1000 * 1000000};
        nanosleep(&initialising, NULL);
        int anonymous = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
        /* the bytes live in a memory file, so that another process can map an allocation
         * (cuIpcOpenMemHandle below) */
        shadow_fd = memfd_create("fake_cuda_device", 0);
        if (shadow_fd < 0 || ftruncate(shadow_fd, (off_t)DEVICE_BYTES)) shadow_fd = -1;
        const char *visible = getenv("FAKE_CUDA_HOST_VISIBLE");
        int shared = MAP_SHARED | MAP_NORESERVE;
        if (visible && !strcmp(visible, "1")) {
            device = shadow = mmap(NULL, DEVICE_BYTES, PROT_READ | PROT_WRITE, shared, shadow_fd, 0);
        } else {
            device = mmap(NULL, DEVICE_BYTES, PROT_NONE, anonymous, -1, 0);
            shadow = mmap(NULL, DEVICE_BYTES, PROT_READ | PROT_WRITE, shared, shadow_fd, 0);
        }
    }
    pthread_mutex_unlock(&lock);
    return device == MAP_FAILED || shadow == MAP_FAILED ? 3 : 0;
}
/* NVRTC 13 opens libcuda.so.1 itself and asks for the driver's private tables: none here. */
EXPORT CUresult cuGetExportTable(const void **table, const void *id) { API_ENTRY(); (void)id; *table = NULL; return 500; }
EXPORT CUresult cuDriverGetVersion(int *version) { API_ENTRY(); *version = 12040; return 0; }
EXPORT CUresult cuGetErrorString(CUresult error, const char **text) { API_ENTRY(); (void)error; *text = "fake_cuda error"; return 0; }
EXPORT CUresult cuDeviceGetCount(int *count) { API_ENTRY(); *count = 1; return 0; }
EXPORT CUresult cuDeviceGet(int *device_out, int ordinal) { API_ENTRY(); *device_out = ordinal; return 0; }
EXPORT CUresult cuDevicePrimaryCtxRetain(void **ctx, int dev) { API_ENTRY(); (void)dev; *ctx = &context_object; return 0; }
EXPORT CUresult cuCtxSetCurrent(void *ctx)
{
    API_ENTRY();
    COUNT(C_CTX_SET);
    current = ctx;
    return 0;
}
EXPORT unsigned long long fake_cuda_context_sets(void) { return __atomic_load_n(&counters[C_CTX_SET], __ATOMIC_RELAXED); }
EXPORT CUresult cuCtxGetCurrent(void **ctx) { API_ENTRY(); *ctx = current; return 0; }
EXPORT CUresult cuCtxGetDevice(int *dev) { API_ENTRY(); *dev = 0; return 0; }
EXPORT CUresult cuDeviceGetName(char *name, int len, int dev)
{
    API_ENTRY();
    (void)dev;
    const char *fake = getenv("FAKE_CUDA_NAME");
    strncpy(name, fake && *fake ? fake : "fake_cuda", (size_t)len);
    name[len - 1] = 0;
    return 0;
}
EXPORT CUresult cuDeviceGetAttribute(int *value, int attribute, int dev)
{
    API_ENTRY();
    (void)dev;
    const char *cc = getenv("FAKE_CUDA_CC");
    int capability = cc ? atoi(cc) : 90;
    if (attribute == 75) *value = capability / 10;      /* COMPUTE_CAPABILITY_MAJOR */
    else if (attribute == 76) *value = capability % 10; /* COMPUTE_CAPABILITY_MINOR */
    else if (attribute == 122) *value = !getenv("FAKE_CUDA_NO_MEMOPS"); /* CAN_USE_64_BIT_STREAM_MEM_OPS */
    else *value = 64;
    return 0;
}

static int allocation_index(CUdeviceptr p);
static CUdeviceptr allocation_start(int a);
static size_t allocation_size(int a);
EXPORT CUresult cuPointerGetAttributes(unsigned n, int *attributes, void **data, CUdeviceptr p)
{
    API_ENTRY();
    COUNT(C_POINTER_ATTRS);
    int managed, kind = kind_of(p, &managed);
    int a = kind == 2 && !managed ? allocation_index(p) : -1; /* device memory: its allocation */
    for (unsigned i = 0; i < n; i++) switch (attributes[i]) {
        case 1: *(void **)data[i] = kind ? &context_object : NULL; break;   /* CONTEXT */
        case 2: *(unsigned *)data[i] = (unsigned)kind; break;               /* MEMORY_TYPE */
        case 7: *(unsigned long long *)data[i] = a >= 0 ? (unsigned long long)a + 1 : 0; break; /* BUFFER_ID */
        case 8: *(int *)data[i] = managed; break;                           /* IS_MANAGED */
        case 9: *(int *)data[i] = 0; break;                                 /* DEVICE_ORDINAL */
        case 10: *(int *)data[i] = a >= 0; break;                           /* IS_LEGACY_CUDA_IPC_CAPABLE */
        case 11: *(CUdeviceptr *)data[i] = a >= 0 ? allocation_start(a) : 0; break; /* RANGE_START_ADDR */
        case 12: *(size_t *)data[i] = a >= 0 ? allocation_size(a) : 0; break;       /* RANGE_SIZE */
        default: break;
        }
    return 0;
}

/* The kernels' parameter block (device_kernels.cu's struct move_args, 840 bytes). */
struct fast_divisor { uint32_t multiplier, shift; };
struct move_args {
    int64_t total_words, element_words, elements, typed_element_stride, packed_element_stride, block_words, ndims;
    int64_t count[32], stride[32];
    struct fast_divisor element_div, block_div, count_div[32];
};
_Static_assert(sizeof(struct move_args) == 840, "move_args as in device_kernels.cu");

/* The batched unpack's parameter block (device_kernels.cu's struct batch_args). */
struct batch_job {
    char *typed, *packed;
    int64_t typed_element_stride, packed_element_stride, stride[3];
    uint32_t total_words, element_words, elements, block_words;
    uint16_t ndims, word_log2;
    uint32_t count[3];
    struct fast_divisor element_div, block_div, count_div[3];
};
struct batch_args { int64_t njobs; struct batch_job jobs[31]; };
_Static_assert(sizeof(struct batch_args) == 3976, "batch_args as in device_kernels.cu");
/* The one-pass copies' parameter block (device_kernels.cu's struct copy_args). */
struct copy_args { int64_t njobs; struct { struct batch_job from, to; } jobs[15]; };
_Static_assert(sizeof(struct copy_args) == 3848, "copy_args as in device_kernels.cu");

static char module_object;
/* the CUfunction handles: [packing][log2 W][wide, or 2: batched]; copies[log2 W]; the
 * batches of mixed word sizes [packing] (word 0: each job's own) */
static struct kernel { int packing, word, wide, batch; } kernels[2][5][3], copies[5], mixed[2];

EXPORT CUresult cuModuleLoadData(void **module, const void *image)
{
    API_ENTRY();
    const char *mode = getenv("FAKE_CUDA_KERNELS");
    static const unsigned char fatbin_magic[4] = {0x50, 0xed, 0x55, 0xba};
    int ours = !memcmp(image, "FAKE-CUDA-IMAGE\n", 16);
    int fatbin = !memcmp(image, fatbin_magic, 4);
    if (!mode || !(ours || (fatbin && strcmp(mode, "nvrtc")))) return 200; /* CUDA_ERROR_INVALID_IMAGE */
    *module = &module_object;
    return 0;
}
EXPORT CUresult cuModuleUnload(void *module) { API_ENTRY(); return module == &module_object ? 0 : 400; }
EXPORT CUresult cuModuleGetFunction(void **f, void *module, const char *name)
{
    API_ENTRY();
    int word = 0, n = 0;
    char kind[8] = "", rest[8] = "";
    int batch = 0;
    if (module != &module_object) return 500;
    if (!strcmp(name, "commlib_pack_batch_mixed") || !strcmp(name, "commlib_unpack_batch_mixed")) {
        int packing = name[8] == 'p';
        mixed[packing] = (struct kernel){packing, 0, 0, 1};
        *f = &mixed[packing];
        return 0;
    }
    if (sscanf(name, "commlib_copy_batch_w%d%n", &word, &n) == 1 && !name[n]) { /* commlib_copy_batch_wW */
        int log2 = __builtin_ctz((unsigned)word | 32);
        if (word != 1 << log2 || log2 > 4) return 500;
        copies[log2] = (struct kernel){0, word, 0, 1};
        *f = &copies[log2];
        return 0;
    }
    if (sscanf(name, "commlib_%6[a-z]_batch_w%d%n", kind, &word, &n) == 2) { /* commlib_(un)pack_batch_wW */
        batch = 1;
    } else if (sscanf(name, "commlib_%6[a-z]_w%d%n", kind, &word, &n) != 2) {
        return 500;
    }
    if (!batch && name[n] && sscanf(name + n, "_%7s", rest) != 1) return 500;
    int packing = !strcmp(kind, "pack"), wide = !strcmp(rest, "wide"), log2 = __builtin_ctz((unsigned)word | 32);
    if ((!packing && strcmp(kind, "unpack")) || (name[n] && !wide) || word != 1 << log2 || log2 > 4) return 500;
    struct kernel *k = &kernels[packing][log2][batch ? 2 : wide];
    *k = (struct kernel){packing, word, wide, batch};
    *f = k;
    return 0;
}

/* Byte offsets of word i (w bytes) on the packed and the typed side, as the kernels compute them. */
static int64_t typed_offset(const struct move_args *a, int64_t i, int64_t w, int64_t *packed_at)
{
    int64_t e = a->elements == 1 ? 0 : i / a->element_words, r = i - e * a->element_words, in_block = 0;
    if (packed_at) *packed_at = e * a->packed_element_stride + r * w;
    if (a->ndims == 0) {
        in_block = r;
        r = 0;
    } else if (a->block_words > 1) {
        in_block = r % a->block_words;
        r /= a->block_words;
    }
    int64_t typed_at = e * a->typed_element_stride + in_block * w;
    for (int d = 0; d < a->ndims; d++) {
        int64_t index = d == a->ndims - 1 ? r : r % a->count[d];
        typed_at += index * a->stride[d];
        r /= a->count[d];
    }
    return typed_at;
}

/* One launch of commlib_(un)pack_wW: every word of the launch, in order. */
static void run_kernel(const struct kernel *k, char *typed, char *packed, const struct move_args *a)
{
    int64_t w = k->word;
    for (int64_t i = 0; i < a->total_words; i++) {
        int64_t packed_at, typed_at = typed_offset(a, i, w, &packed_at);
        char *t = real((CUdeviceptr)(uintptr_t)(typed + typed_at)), *p = real((CUdeviceptr)(uintptr_t)(packed + packed_at));
        memcpy(k->packing ? p : t, k->packing ? t : p, (size_t)w);
    }
}

/* One job of commlib_copy_batch_wW: word i from `from`'s typed side to `to`'s. */
static void run_copy(const struct kernel *k, char *src, const struct move_args *from, char *dst, const struct move_args *to)
{
    int64_t w = k->word;
    for (int64_t i = 0; i < from->total_words; i++)
        memcpy(real((CUdeviceptr)(uintptr_t)(dst + typed_offset(to, i, w, NULL))),
               real((CUdeviceptr)(uintptr_t)(src + typed_offset(from, i, w, NULL))), (size_t)w);
}

/* FAKE_CUDA_COPY_GBPS: when the emulated copy engine is free again (CLOCK_MONOTONIC ns). */
static double copy_gbps = -1;
static uint64_t engine_free_ns;
static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}
static int timed(void)
{
    if (copy_gbps < 0) copy_gbps = getenv("FAKE_CUDA_COPY_GBPS") ? atof(getenv("FAKE_CUDA_COPY_GBPS")) : 0;
    return copy_gbps > 0;
}
static void sleep_until(uint64_t ns)
{
    for (uint64_t t = now_ns(); t < ns; t = now_ns()) {
        struct timespec d = {0, (long)(ns - t > 50000 ? ns - t - 20000 : 0)};
        if (d.tv_nsec) nanosleep(&d, NULL);
    }
}

/* FAKE_CUDA_PAGEABLE_LAG: synchronous host-to-device copies whose bytes have not landed. */
static struct lagged {
    CUdeviceptr dst;
    size_t n;
    char *bytes;
} *lagged;
static size_t nlagged, lag_room;
static pthread_mutex_t lag_lock = PTHREAD_MUTEX_INITIALIZER;
static int lagging(void)
{
    static int mode = -1;
    if (mode < 0) mode = getenv("FAKE_CUDA_PAGEABLE_LAG") && atoi(getenv("FAKE_CUDA_PAGEABLE_LAG")) > 0;
    return mode;
}
static void land(void)
{
    pthread_mutex_lock(&lag_lock);
    for (size_t i = 0; i < nlagged; i++) {
        memcpy(real(lagged[i].dst), lagged[i].bytes, lagged[i].n);
        free(lagged[i].bytes);
    }
    nlagged = 0;
    pthread_mutex_unlock(&lag_lock);
}
static int lag(CUdeviceptr dst, const void *src, size_t n)
{
    char *bytes = malloc(n ? n : 1);
    if (!bytes) return 0;
    memcpy(bytes, src, n);
    pthread_mutex_lock(&lag_lock);
    if (nlagged == lag_room) {
        lag_room = lag_room ? 2 * lag_room : 64;
        lagged = realloc(lagged, lag_room * sizeof *lagged);
        if (!lagged) abort();
    }
    lagged[nlagged++] = (struct lagged){dst, n, bytes};
    pthread_mutex_unlock(&lag_lock);
    return 1;
}
static size_t lag_pending(void)
{
    pthread_mutex_lock(&lag_lock);
    size_t n = nlagged;
    pthread_mutex_unlock(&lag_lock);
    return n;
}

/* FAKE_CUDA_DEFER: the queue (one for every stream, which only orders things more). */
struct deferred {
    int is_kernel; /* 2: a one-pass copy, from typed to to_typed */
    CUdeviceptr dst, src;
    size_t n;
    const struct kernel *k;
    char *typed, *packed, *to_typed;
    struct move_args args, to_args;
};
static struct deferred *queue;
static size_t queued, queue_room;
static unsigned long long stream_syncs;
static pthread_mutex_t queue_lock = PTHREAD_MUTEX_INITIALIZER;
static int deferring(void)
{
    static int mode = -1;
    if (mode < 0) mode = getenv("FAKE_CUDA_DEFER") && atoi(getenv("FAKE_CUDA_DEFER")) > 0;
    return mode;
}
static void enqueue(const struct deferred *d)
{
    land();
    pthread_mutex_lock(&queue_lock);
    if (queued == queue_room) {
        queue_room = queue_room ? 2 * queue_room : 64;
        queue = realloc(queue, queue_room * sizeof *queue);
        if (!queue) abort();
    }
    queue[queued++] = *d;
    if (timed() && !d->is_kernel) {
        uint64_t start = now_ns() > engine_free_ns ? now_ns() : engine_free_ns;
        engine_free_ns = start + (uint64_t)((double)d->n / copy_gbps);
    }
    pthread_mutex_unlock(&queue_lock);
}
/* A wait for everything queued: with the emulated copy engine, until it is free. */
static void drain(void);
static void wait_all(void)
{
    land();
    if (timed()) {
        pthread_mutex_lock(&queue_lock);
        uint64_t until = engine_free_ns;
        pthread_mutex_unlock(&queue_lock);
        sleep_until(until);
    }
    drain();
}
static void drain(void)
{
    pthread_mutex_lock(&queue_lock);
    for (size_t i = 0; i < queued; i++) {
        const struct deferred *d = &queue[i];
        if (d->is_kernel == 2) run_copy(d->k, d->typed, &d->args, d->to_typed, &d->to_args);
        else if (d->is_kernel) run_kernel(d->k, d->typed, d->packed, &d->args);
        else memmove(real(d->dst), real(d->src), d->n);
    }
    queued = 0;
    pthread_mutex_unlock(&queue_lock);
}
EXPORT size_t fake_cuda_pending(void)
{
    pthread_mutex_lock(&queue_lock);
    size_t n = queued;
    pthread_mutex_unlock(&queue_lock);
    return n;
}
EXPORT unsigned long long fake_cuda_pointer_queries(void) { return __atomic_load_n(&counters[C_POINTER_ATTRS], __ATOMIC_RELAXED); }
EXPORT unsigned long long fake_cuda_stream_syncs(void) { return __atomic_load_n(&stream_syncs, __ATOMIC_RELAXED); }

/* The kernels' 32-bit quotient, (umulhi(n, multiplier) + n) >> shift in 32-bit arithmetic,
 * right for n = 0, 1, around multiples of d and up to `below` (the launch's largest index):
 * a wrong fast divisor fails the launch here as it would corrupt data on a GPU. */
static int divisor_ok(int64_t d, struct fast_divisor f, int64_t below)
{
    if (d < 1 || d >= (INT64_C(1) << 31)) return 1; /* the wide kernels divide */
    if (below > (INT64_C(1) << 31)) below = INT64_C(1) << 31;
    int64_t probes[] = {0, 1, d - 1, d, d + 1, 2 * d - 1, 2 * d, below - 1, (below - 1) / d * d, (below - 1) / d * d - 1};
    for (size_t i = 0; i < sizeof probes / sizeof *probes; i++) {
        int64_t n = probes[i];
        if (n < 0 || n >= below) continue;
        uint32_t hi = (uint32_t)(((uint64_t)(uint32_t)n * f.multiplier) >> 32);
        uint32_t q = f.shift >= 32 ? 0 : (uint32_t)(hi + (uint32_t)n) >> f.shift;
        if ((int64_t)q != n / d) {
            fprintf(stderr, "fake_cuda: fast divisor of %lld (multiplier %u, shift %u) gives %u for %lld\n",
                    (long long)d, f.multiplier, f.shift, q, (long long)n);
            return 0;
        }
    }
    return 1;
}
static int divisors_ok(const struct move_args *a, int64_t ndims, const struct fast_divisor *element_div,
                       const struct fast_divisor *block_div, const struct fast_divisor *count_div)
{
    if (a->total_words >= (INT64_C(1) << 31)) return 1;
    int ok = divisor_ok(a->element_words, *element_div, a->total_words) &&
             divisor_ok(a->block_words, *block_div, a->element_words);
    for (int64_t d = 0; d < ndims && ok; d++) ok = divisor_ok(a->count[d], count_div[d], a->total_words);
    return ok;
}

/* A batched job's fields as the plain kernels' parameter block; 0 when it has too many dims
 * or a wrong fast divisor. */
static int args_of_job(const struct batch_job *j, struct move_args *a)
{
    memset(a, 0, sizeof *a);
    a->total_words = j->total_words;
    a->element_words = j->element_words;
    a->elements = j->elements;
    a->typed_element_stride = j->typed_element_stride;
    a->packed_element_stride = j->packed_element_stride;
    a->block_words = j->block_words;
    a->ndims = j->ndims;
    if (j->ndims > 3) return 0;
    for (uint32_t d = 0; d < j->ndims; d++) {
        a->count[d] = j->count[d];
        a->stride[d] = j->stride[d];
    }
    return divisors_ok(a, j->ndims, &j->element_div, &j->block_div, j->count_div);
}

/* commlib_copy_batch_wW: job y copies from its `from` piece to its `to` piece, as many words. */
static CUresult launch_copies(const struct kernel *k, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                              unsigned bz, unsigned shared, void **params)
{
    const struct copy_args *c = params[0];
    if (gx < 1 || gy < 1 || (int64_t)gy < c->njobs || c->njobs < 1 || c->njobs > 15 || gz != 1 || bx != 256 ||
        by != 1 || bz != 1 || shared != 0)
        return 1;
    for (int64_t y = 0; y < c->njobs; y++) {
        struct deferred d = {.is_kernel = 2, .k = k, .typed = c->jobs[y].from.typed, .to_typed = c->jobs[y].to.typed};
        if (!args_of_job(&c->jobs[y].from, &d.args) || !args_of_job(&c->jobs[y].to, &d.to_args) ||
            d.args.total_words != d.to_args.total_words)
            return 1;
        if (deferring()) enqueue(&d);
        else run_copy(k, d.typed, &d.args, d.to_typed, &d.to_args);
    }
    return 0;
}

/* commlib_(un)pack_batch_wW: job y of the batch is a move of its own (the grid's y), of
 * W-byte words, which the job says too; commlib_(un)pack_batch_mixed: of the job's words. */
static CUresult launch_batch(const struct kernel *k, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                             unsigned bz, unsigned shared, void **params)
{
    const struct batch_args *b = params[0];
    if (gx < 1 || gy < 1 || (int64_t)gy < b->njobs || b->njobs > 31 || gz != 1 || bx != 256 || by != 1 || bz != 1 ||
        shared != 0)
        return 1;
    const char *order = getenv("FAKE_CUDA_BATCH_ORDER");
    int reverse = order && !strcmp(order, "reverse");
    for (int64_t i = 0; i < b->njobs; i++) {
        const struct batch_job *j = &b->jobs[reverse ? b->njobs - 1 - i : i];
        struct move_args a;
        if (!args_of_job(j, &a) || j->word_log2 > 4) return 1;
        const struct kernel *jk = &kernels[k->packing][j->word_log2][2]; /* its word size's */
        if (!jk->word || (k->word && k->word != jk->word)) return 1;
        if (deferring()) {
            struct deferred d = {.is_kernel = 1, .k = jk, .typed = j->typed, .packed = j->packed, .args = a};
            enqueue(&d);
        } else {
            run_kernel(jk, j->typed, j->packed, &a);
        }
    }
    return 0;
}

EXPORT CUresult cuLaunchKernel(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                               unsigned shared, void *stream, void **params, void **extra)
{
    API_ENTRY();
    COUNT(C_LAUNCH);
    land();
    /* FAKE_CUDA_STRICT_CONTEXT=1: no launch without a current context, as on a real driver
     * (CUDA_ERROR_INVALID_CONTEXT) - a caller that wrongly believes one current fails */
    static int strict = -1;
    if (strict < 0) strict = getenv("FAKE_CUDA_STRICT_CONTEXT") && atoi(getenv("FAKE_CUDA_STRICT_CONTEXT")) > 0;
    if (strict && !current) return 201;
    (void)stream, (void)extra;
    const struct kernel *k = f;
    if (k >= &copies[0] && k <= &copies[4] && k->word) return launch_copies(k, gx, gy, gz, bx, by, bz, shared, params);
    if ((k == &mixed[0] || k == &mixed[1]) && k->batch) return launch_batch(k, gx, gy, gz, bx, by, bz, shared, params);
    if (k < &kernels[0][0][0] || k > &kernels[1][4][2] || !k->word) return 98; /* CUDA_ERROR_INVALID_HANDLE */
    if (k->batch) return launch_batch(k, gx, gy, gz, bx, by, bz, shared, params);
    /* the kernels' __launch_bounds__(256) and 1-D grids */
    if (gx < 1 || gy != 1 || gz != 1 || bx != 256 || by != 1 || bz != 1 || shared != 0) return 1;
    const struct move_args *a = params[2];
    if (!k->wide && a->total_words >= (INT64_C(1) << 31)) return 1; /* the 32-bit index math would wrap */
    if (!k->wide && !divisors_ok(a, a->ndims, &a->element_div, &a->block_div, a->count_div)) return 1;
    if (deferring()) {
        struct deferred d = {.is_kernel = 1, .k = k, .typed = *(char **)params[0], .packed = *(char **)params[1]};
        d.args = *a; /* parameters are copied at the launch, as CUDA does */
        enqueue(&d);
        return 0;
    }
    run_kernel(k, *(char **)params[0], *(char **)params[1], a);
    return 0;
}
EXPORT CUresult cuStreamCreate(void **stream, unsigned flags) { API_ENTRY(); (void)flags; *stream = &context_object; return 0; }
EXPORT CUresult cuStreamSynchronize(void *stream)
{
    API_ENTRY();
    COUNT(C_STREAM_SYNC);
    (void)stream;
    __atomic_add_fetch(&stream_syncs, 1, __ATOMIC_RELAXED);
    wait_all();
    return 0;
}
EXPORT CUresult cuStreamQuery(void *stream)
{
    API_ENTRY();
    (void)stream; /* one queue for every stream */
    return lag_pending() || fake_cuda_pending() ? 600 /* CUDA_ERROR_NOT_READY */ : 0;
}
EXPORT CUresult cuCtxSynchronize(void)
{
    API_ENTRY();
    COUNT(C_STREAM_SYNC);
    __atomic_add_fetch(&stream_syncs, 1, __ATOMIC_RELAXED);
    wait_all();
    return 0;
}
/* Device allocations in address order (they are never reused), so that a copy reaching
 * past its allocation fails as a real device's illegal-address fault would. */
#define MAX_ALLOCATIONS (1 << 16)
static struct allocation { char *p; size_t n; } allocations[MAX_ALLOCATIONS];
static int nallocations;

/* The last allocation starting at or before c, -1 if none (caller holds lock). */
static int last_starting_at_or_before(const char *c)
{
    int lo = 0, hi = nallocations - 1, found = -1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (allocations[mid].p <= c) {
            found = mid;
            lo = mid + 1;
        } else {
            hi = mid - 1;
        }
    }
    return found;
}

/* The allocation p lies in (allocations never overlap nor move): its index, -1 if none. */
static int allocation_index(CUdeviceptr p)
{
    char *c = (char *)(uintptr_t)p;
    pthread_mutex_lock(&lock);
    int found = last_starting_at_or_before(c);
    if (found >= 0 && c >= allocations[found].p + allocations[found].n) found = -1;
    pthread_mutex_unlock(&lock);
    return found;
}
static CUdeviceptr allocation_start(int a) { return (CUdeviceptr)(uintptr_t)allocations[a].p; }
static size_t allocation_size(int a) { return allocations[a].n; }

/* 0 unless [p, p + n) starts in device memory and leaves its allocation. */
static int outside_allocation(CUdeviceptr p, size_t n)
{
    char *c = (char *)(uintptr_t)p;
    if (!device || c < device || c >= device + DEVICE_BYTES || !n) return 0;
    pthread_mutex_lock(&lock);
    int found = last_starting_at_or_before(c);
    int outside = nallocations < MAX_ALLOCATIONS &&
                  (found < 0 || c + n > allocations[found].p + allocations[found].n);
    pthread_mutex_unlock(&lock);
    if (outside) fprintf(stderr, "fake_cuda: a copy of %zu bytes at device+%td leaves its allocation\n", n, c - device);
    return outside;
}

#define ILLEGAL_ADDRESS 700
EXPORT CUresult cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, void *stream)
{
    API_ENTRY();
    COUNT(C_COPY_ASYNC);
    land();
    (void)stream;
    if (outside_allocation(dst, n) || outside_allocation(src, n)) return ILLEGAL_ADDRESS;
    if (deferring()) {
        enqueue(&(struct deferred){.dst = dst, .src = src, .n = n});
        return 0;
    }
    memmove(real(dst), real(src), n);
    return 0;
}
/* The driver's CUDA_MEMCPY2D, device to device only (bench_p2p's strided baseline); done at
 * once, after the work queued before it. */
struct memcpy2d {
    size_t src_x, src_y;
    int src_type;
    const void *src_host;
    CUdeviceptr src_device;
    void *src_array;
    size_t src_pitch, dst_x, dst_y;
    int dst_type;
    void *dst_host;
    CUdeviceptr dst_device;
    void *dst_array;
    size_t dst_pitch, width, height;
};
EXPORT CUresult cuMemcpy2DAsync_v2(const struct memcpy2d *c, void *stream)
{
    API_ENTRY();
    COUNT(C_COPY_ASYNC);
    (void)stream;
    if (c->src_type != 2 || c->dst_type != 2 || c->width > c->src_pitch || c->width > c->dst_pitch) return 1;
    if (!c->height || !c->width) return 0;
    CUdeviceptr src = c->src_device + c->src_y * c->src_pitch + c->src_x;
    CUdeviceptr dst = c->dst_device + c->dst_y * c->dst_pitch + c->dst_x;
    size_t src_span = (c->height - 1) * c->src_pitch + c->width, dst_span = (c->height - 1) * c->dst_pitch + c->width;
    if (outside_allocation(dst, dst_span) || outside_allocation(src, src_span)) return ILLEGAL_ADDRESS;
    wait_all();
    for (size_t r = 0; r < c->height; r++)
        memmove(real(dst + r * c->dst_pitch), real(src + r * c->src_pitch), c->width);
    return 0;
}
EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n)
{
    API_ENTRY();
    COUNT(C_COPY_SYNC);
    wait_all(); /* synchronous copies wait for the work queued before them */
    if (outside_allocation(dst, n)) return ILLEGAL_ADDRESS;
    if (lagging() && lag(dst, src, n)) return 0;
    memcpy(real(dst), src, n);
    return 0;
}
EXPORT CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n)
{
    API_ENTRY();
    COUNT(C_COPY_SYNC);
    wait_all();
    if (outside_allocation(src, n)) return ILLEGAL_ADDRESS;
    memcpy(dst, real(src), n);
    return 0;
}
EXPORT CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n)
{
    API_ENTRY();
    pthread_mutex_lock(&lock);
    int ok = device && device_used + n <= DEVICE_BYTES;
    if (ok) {
        *p = (CUdeviceptr)(uintptr_t)(device + device_used);
        if (nallocations < MAX_ALLOCATIONS) allocations[nallocations++] = (struct allocation){device + device_used, n};
        device_used += (n + 255) & ~(size_t)255; /* never reused: a stale pointer stays device memory */
    }
    pthread_mutex_unlock(&lock);
    return ok ? 0 : 2;
}
/* Inter-process memory: the handle names the exporting process's memory file and the
 * allocation's place in it; the importer maps those pages into a fresh range of its own
 * device address space (so its copies and kernels reach them as any device memory). */
struct fake_ipc_handle {
    char magic[8];
    int pid, fd;
    size_t offset, bytes;
};
_Static_assert(sizeof(struct fake_ipc_handle) <= 64, "fits a CUipcMemHandle");
EXPORT CUresult cuIpcGetMemHandle(void *handle, CUdeviceptr p)
{
    API_ENTRY();
    char *c = (char *)(uintptr_t)p;
    if (!device || shadow_fd < 0 || c < device || c >= device + device_used) return 1; /* INVALID_VALUE */
    size_t bytes = 0;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < nallocations; i++)
        if (allocations[i].p == c) bytes = allocations[i].n;
    pthread_mutex_unlock(&lock);
    if (!bytes) return 1; /* not the start of an allocation */
    struct fake_ipc_handle h = {"FAKEIPC", getpid(), shadow_fd, (size_t)(c - device), bytes};
    memset(handle, 0, 64);
    memcpy(handle, &h, sizeof h);
    return 0;
}
typedef struct {
    char reserved[64];
} CUipcMemHandle;
EXPORT CUresult cuIpcOpenMemHandle_v2(CUdeviceptr *p, CUipcMemHandle handle, unsigned flags)
{
    API_ENTRY();
    (void)flags;
    struct fake_ipc_handle h;
    memcpy(&h, handle.reserved, sizeof h);
    if (memcmp(h.magic, "FAKEIPC", 8) || !device) return 400; /* INVALID_HANDLE */
    if (h.pid == getpid()) return 201;                      /* INVALID_CONTEXT: not in the exporter */
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/fd/%d", h.pid, h.fd);
    int fd = open(path, O_RDWR);
    if (fd < 0) return 400;
    size_t page = (size_t)sysconf(_SC_PAGESIZE), lead = h.offset % page;
    size_t length = (lead + h.bytes + page - 1) / page * page;
    pthread_mutex_lock(&lock);
    size_t start = (device_used + page - 1) / page * page; /* a range of pages of our own */
    int ok = start + length <= DEVICE_BYTES && nallocations < MAX_ALLOCATIONS &&
             mmap(shadow + start, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, (off_t)(h.offset - lead)) !=
                 MAP_FAILED;
    if (ok) {
        *p = (CUdeviceptr)(uintptr_t)(device + start + lead);
        allocations[nallocations++] = (struct allocation){device + start + lead, h.bytes};
        device_used = start + length;
    }
    pthread_mutex_unlock(&lock);
    close(fd);
    return ok ? 0 : 2;
}
EXPORT CUresult cuIpcCloseMemHandle(CUdeviceptr p)
{
    API_ENTRY();
    char *c = (char *)(uintptr_t)p;
    return device && c >= device && c < device + device_used ? 0 : 1;
}
EXPORT CUresult cuMemAllocManaged(CUdeviceptr *p, size_t n, unsigned flags)
{
    API_ENTRY();
    (void)flags;
    void *q = map_host(n);
    *p = (CUdeviceptr)(uintptr_t)q;
    return track(q, n ? n : 1, 1);
}
EXPORT CUresult cuMemFree_v2(CUdeviceptr p)
{
    API_ENTRY();
    wait_all(); /* frees wait for the device */
    int managed;
    if (kind_of(p, &managed) == 2 && managed) unmap_host((void *)(uintptr_t)p);
    return 0;
}
EXPORT CUresult cuMemHostAlloc(void **p, size_t n, unsigned flags)
{
    API_ENTRY();
    (void)flags;
    *p = map_host(n);
    return track(*p, n ? n : 1, 0);
}
EXPORT CUresult cuMemFreeHost(void *p)
{
    API_ENTRY();
    wait_all();
    if (p) unmap_host(p);
    return 0;
}
/* An inter-process event (flag 0x4) stands for work another process waits for: with
 * FAKE_CUDA_DEFER its record runs the queue, since no other process can. */
static char ipc_event_object;
/* FAKE_CUDA_COPY_GBPS: an event of its own, ready when the copies queued before its record end. */
struct timed_event {
    char tag[8];
    uint64_t ready_ns;
};
static struct timed_event *timed_event(void *event)
{
    struct timed_event *e = event;
    return e && event != &ipc_event_object && event != &context_object && !memcmp(e->tag, "FAKETEV", 8) ? e : NULL;
}
EXPORT CUresult cuEventCreate(void **event, unsigned flags)
{
    API_ENTRY();
    *event = flags & 0x4 ? &ipc_event_object : &context_object;
    if (!(flags & 0x4) && timed()) {
        struct timed_event *e = calloc(1, sizeof *e);
        if (!e) return 2; /* CUDA_ERROR_OUT_OF_MEMORY */
        memcpy(e->tag, "FAKETEV", 8);
        *event = e;
    }
    return 0;
}
EXPORT CUresult cuIpcGetEventHandle(void *handle, void *event)
{
    API_ENTRY();
    if (event != &ipc_event_object) return 1; /* INVALID_VALUE: not created inter-process */
    memset(handle, 0, 64);
    memcpy(handle, "FAKEEVT", 8);
    return 0;
}
EXPORT CUresult cuIpcOpenEventHandle(void **event, CUipcMemHandle handle)
{
    API_ENTRY();
    if (memcmp(handle.reserved, "FAKEEVT", 8)) return 400;
    *event = &ipc_event_object;
    return 0;
}
EXPORT CUresult cuEventRecord(void *event, void *stream)
{
    API_ENTRY();
    COUNT(C_EVENT_RECORD);
    land();
    (void)stream;
    struct timed_event *e = timed_event(event);
    if (e) {
        pthread_mutex_lock(&queue_lock);
        e->ready_ns = engine_free_ns;
        pthread_mutex_unlock(&queue_lock);
    }
    if (event == &ipc_event_object) drain();
    return 0;
}
EXPORT CUresult cuEventQuery(void *event)
{
    API_ENTRY();
    COUNT(C_EVENT_QUERY);
    struct timed_event *e = timed_event(event);
    if (e && now_ns() < e->ready_ns) return 600; /* CUDA_ERROR_NOT_READY */
    drain();
    return 0;
}
EXPORT CUresult cuEventSynchronize(void *event)
{
    API_ENTRY();
    COUNT(C_EVENT_SYNC);
    struct timed_event *e = timed_event(event);
    if (e) sleep_until(e->ready_ns);
    else wait_all();
    drain();
    return 0;
}
EXPORT CUresult cuEventDestroy_v2(void *event)
{
    API_ENTRY();
    struct timed_event *e = timed_event(event);
    if (e) memset(e->tag, 0, sizeof e->tag), free(e);
    return 0;
}
/* Stream memory operations (FAKE_CUDA_NO_MEMOPS=1: the device says it has none).  A write
 * runs what is queued before it (FAKE_CUDA_DEFER), then stores; with nothing asynchronous
 * here, a stream's wait for a value is the caller waiting until the value is there (another
 * process's write, through an IPC mapping) - up to 60 s, then CUDA_ERROR_LAUNCH_TIMEOUT. */
EXPORT CUresult cuStreamWriteValue64_v2(void *stream, CUdeviceptr addr, unsigned long long value, unsigned flags)
{
    API_ENTRY();
    COUNT(C_WRITE_VALUE);
    land();
    (void)stream;
    (void)flags;
    if (getenv("FAKE_CUDA_NO_MEMOPS") || (addr & 7) || outside_allocation(addr, 8)) return 1;
    drain();
    __atomic_store_n((unsigned long long *)real(addr), value, __ATOMIC_RELEASE);
    return 0;
}
EXPORT CUresult cuStreamWaitValue64_v2(void *stream, CUdeviceptr addr, unsigned long long value, unsigned flags)
{
    API_ENTRY();
    COUNT(C_WAIT_VALUE);
    land();
    (void)stream;
    if (getenv("FAKE_CUDA_NO_MEMOPS") || flags != 0 || (addr & 7) || outside_allocation(addr, 8)) return 1; /* GEQ only */
    uint64_t give_up = now_ns() + 60000000000ull;
    while ((long long)(__atomic_load_n((unsigned long long *)real(addr), __ATOMIC_ACQUIRE) - value) < 0) {
        if (now_ns() > give_up) return 702;
        struct timespec d = {0, 2000};
        nanosleep(&d, NULL);
    }
    return 0;
}
EXPORT CUresult cuStreamWaitEvent(void *stream, void *event, unsigned flags)
{
    API_ENTRY();
    COUNT(C_STREAM_WAIT);
    land();
    (void)stream;
    (void)event;
    (void)flags;
    return 0;
}
