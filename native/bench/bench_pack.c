/* bench_pack: MPI_Pack and MPI_Unpack (commlib when libcommlib.so is preloaded) against
 * PMPI_Pack and PMPI_Unpack (always the host MPI), timed in the same process, interleaved,
 * over the shapes of the pack benchmark: the faces of a 256^3 double array, byte vectors with
 * stride 2x the block, TEMPI's grid of byte vectors with stride 512, and the faces of the halo
 * example's grids (examples/halo3d.c), packed and unpacked, warm and out of cache.
 *
 * One rank. Output on stdout: '#' comment lines, then CSV with a header, one line per shape.
 * Warm shapes: the median over the rounds of the per-call time of a batch of repeated calls
 * (ns).  Cold shapes: the median over the rounds of one call each, the last-level cache
 * evicted (untimed) before every call by reading twice its size (at least 64 MiB).
 *
 * Usage: bench_pack [-q] [-t TARGET_MS] [-r ROUNDS] [-m MAX_EXTENT_MIB] [-f SUBSTRING] [-p PAGES] [-l]
 *   -q  quick (target 10 ms, 5 rounds)     -t  time per implementation per shape (60 ms)
 *   -r  A/B rounds per shape (31)          -m  skip shapes whose input extent (a halo shape:
 *                                              its whole grid) is larger (1200: the 512^3
 *                                              grids, 1.09 and 1.11 GB, fit)
 *   -f  only shapes whose name contains SUBSTRING                -l  list shapes and exit
 *   -p  default|huge|small: the typed buffers' pages (below, at advise_pages; default:
 *       $BENCH_PACK_PAGES, else default)
 *
 * Halo shapes: halo<N>_q<Q>_r<R>_<axis>_<op>_<cache>, the grid of the halo example with an
 * N^3 interior, Q quantities and halo radius R: double a[Q][N+2R][N+2R][N+2R], x fastest.
 * <op> pack packs the interior strip next to the low side of <axis> (R layers of N x N
 * cells, every quantity), unpack unpacks into the halo strip on that side, as the example's
 * --mode pack does.  Grids: N=256 with Q 1..4 and R 1..3, and N=512 with Q=1 and R 1 and 3.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MAX_SHAPES 256
#define MAX_GRIDS 16
#define FACE_N 256
#define OUT_SLACK 64 /* output bytes past the packed size, checked to stay untouched */
#define MIN_EVICT_BYTES (64LL << 20)

/* A grid of the halo example: q quantities of (n+2r)^3 doubles, x fastest. */
struct grid {
    int n, q, r;
    long long bytes;
};

struct shape {
    char name[64];
    const char *kind;        /* face, vector, hvector, subarray, halo */
    MPI_Datatype type;
    int unpack;              /* MPI_Unpack into the typed buffer instead of MPI_Pack from it */
    int cold;                /* the last-level cache is evicted before every timed call */
    int grid;                /* index in grids of the halo grid it works on; -1: the shared input */
    long long total_bytes;   /* packed size of one element of the type */
    long long block_bytes;   /* longest contiguous run */
    long long stride_bytes;  /* distance between runs (0: contiguous) */
    long long extent_bytes;  /* input bytes the type reaches (true lb + true extent) */
    char commlib_type[64];   /* what commlib made of the type at commit (from its counters) */
};

static struct shape shapes[MAX_SHAPES];
static int n_shapes;
static struct grid grids[MAX_GRIDS];
static int n_grids;
static const char *filter; /* -f: only shapes whose name contains it */

typedef long long (*stat_fn)(const char *name);
typedef size_t (*stats_json_fn)(char *buf, size_t len);
static stat_fn commlib_stat;
static stats_json_fn commlib_stats_json;

/* commlib's reasons, as its counters name them ("fallback.<reason>", "unsupported.<reason>");
 * a name commlib does not know reads -1 and is left out. */
static const char *const fallback_reasons[] = {
    "no-pack-knob", "unknown-type", "unsupported-type", "bad-argument", "truncate",
};
static const char *const type_reasons[] = {
    "combiner", "predefined-with-holes", "too-many-pieces", "too-many-dims", "large-count",
    "overflow", "mpi-error",
};
#define N_FALLBACK_REASONS (int)(sizeof fallback_reasons / sizeof *fallback_reasons)
#define N_TYPE_REASONS (int)(sizeof type_reasons / sizeof *type_reasons)

static long long stat_value(const char *name)
{
    return commlib_stat ? commlib_stat(name) : -1;
}

static void stat_values(const char *prefix, const char *const *names, int n, long long *out)
{
    char key[64];
    for (int i = 0; i < n; i++) {
        snprintf(key, sizeof key, "%s%s", prefix, names[i]);
        out[i] = stat_value(key);
    }
}

/* "name=delta;..." for the counters that moved (empty when none did). */
static void moved(char *buf, size_t len, const char *const *names, int n, const long long *before,
                  const long long *after)
{
    size_t used = 0;
    buf[0] = 0;
    for (int i = 0; i < n && used < len; i++)
        if (before[i] >= 0 && after[i] > before[i])
            used += (size_t)snprintf(buf + used, len - used, "%s%s=%lld", used ? ";" : "",
                                     names[i], after[i] - before[i]);
}

static void die_mpi(int rc, const char *what)
{
    if (rc == MPI_SUCCESS)
        return;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    PMPI_Error_string(rc, msg, &len);
    fprintf(stderr, "bench_pack: %s failed: %s\n", what, msg);
    PMPI_Abort(MPI_COMM_WORLD, 2);
}

static void *alloc_or_die(size_t bytes, const char *what)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "bench_pack: cannot allocate %zu bytes for %s\n", bytes, what);
        PMPI_Abort(MPI_COMM_WORLD, 2);
    }
    return p;
}

/* -p: how the typed buffers (the shared input, each halo grid) are paged.  A block a page or
 * more apart (a 512^3 grid's x face) costs a TLB miss a block in 4 KiB pages, none in 2 MiB
 * ones, so which the kernel gave decides such a face's speed.  "default" leaves it to the
 * kernel's transparent huge page setting (malloc's large buffers are mmaps: under "always"
 * they get 2 MiB pages where free ones are at hand, under "madvise" 4 KiB ones), "huge" asks
 * for 2 MiB pages (MADV_HUGEPAGE), "small" for 4 KiB (MADV_NOHUGEPAGE).  Either way the
 * buffer keeps malloc's placement (16 bytes past a page): only its pages change. */
enum { PAGES_DEFAULT, PAGES_HUGE, PAGES_SMALL };
static int page_policy = PAGES_DEFAULT;
static const char *const page_policy_names[] = {"default", "huge", "small"};

static void advise_pages(void *p, size_t bytes)
{
    if (page_policy == PAGES_DEFAULT)
        return;
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t lo = ((uintptr_t)p + page - 1) & ~(page - 1), hi = ((uintptr_t)p + bytes) & ~(page - 1);
    if (hi <= lo)
        return;
#if defined(MADV_HUGEPAGE) && defined(MADV_NOHUGEPAGE)
    if (madvise((void *)lo, hi - lo, page_policy == PAGES_HUGE ? MADV_HUGEPAGE : MADV_NOHUGEPAGE))
        printf("# pages: madvise(%s) failed on %zu bytes: the kernel's default paging stands\n",
               page_policy == PAGES_HUGE ? "MADV_HUGEPAGE" : "MADV_NOHUGEPAGE", (size_t)(hi - lo));
#else
    printf("# pages: no MADV_HUGEPAGE here: the kernel's default paging stands\n");
#endif
}

/* Bytes of [p, p + bytes) in transparent huge pages: /proc/self/smaps' AnonHugePages summed
 * over the mappings that overlap it (madvise splits the buffer's mapping at its page-aligned
 * part), at most `bytes`; -1 when unknown.  Exact for a buffer malloc took from mmap (every
 * large one: the grids, the input); a small one shares the heap's mapping, whose huge pages
 * all count. */
static long long huge_page_bytes(const void *p, long long bytes)
{
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f)
        return -1;
    char line[512];
    int inside = 0;
    long long sum = -1, kib;
    uintptr_t a = (uintptr_t)p, b = a + (uintptr_t)bytes;
    while (fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        char c;
        if (sscanf(line, "%lx-%lx %c", &lo, &hi, &c) == 3)
            inside = lo < b && hi > a;
        else if (inside && sscanf(line, "AnonHugePages: %lld", &kib) == 1)
            sum = (sum < 0 ? 0 : sum) + (kib << 10);
    }
    fclose(f);
    return sum > bytes ? bytes : sum;
}

/* The kernel's transparent huge page setting ("always", "madvise", "never"; "unknown"). */
static const char *thp_setting(void)
{
    static char word[16] = "unknown";
    FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    char line[128];
    if (f && fgets(line, sizeof line, f)) {
        char *a = strchr(line, '['), *b = a ? strchr(a, ']') : NULL;
        if (b && b - a - 1 < (long)sizeof word) {
            memcpy(word, a + 1, (size_t)(b - a - 1));
            word[b - a - 1] = 0;
        }
    }
    if (f)
        fclose(f);
    return word;
}

static void grid_name(char *out, size_t len, int g)
{
    snprintf(out, len, "halo%d_q%d_r%d", grids[g].n, grids[g].q, grids[g].r);
}

static void report_pages(const char *what, const void *p, long long bytes, const char *when)
{
    printf("# pages %s %s: %lld of %lld bytes in huge pages\n", what, when, huge_page_bytes(p, bytes), bytes);
}

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static const char *size_label(long long bytes)
{
    static char buf[32];
    if (bytes >= (1 << 20) && bytes % (1 << 20) == 0)
        snprintf(buf, sizeof buf, "%lldMiB", bytes >> 20);
    else if (bytes >= 1024 && bytes % 1024 == 0)
        snprintf(buf, sizeof buf, "%lldKiB", bytes >> 10);
    else
        snprintf(buf, sizeof buf, "%lldB", bytes);
    return buf;
}

static struct shape *new_shape(void)
{
    if (n_shapes == MAX_SHAPES) {
        fprintf(stderr, "bench_pack: too many shapes\n");
        PMPI_Abort(MPI_COMM_WORLD, 2);
    }
    struct shape *s = &shapes[n_shapes++];
    memset(s, 0, sizeof *s);
    s->grid = -1;
    return s;
}

static void finish_shape(struct shape *s)
{
    long long canonical0 = stat_value("types.canonical");
    long long reasons0[N_TYPE_REASONS], reasons1[N_TYPE_REASONS];
    stat_values("unsupported.", type_reasons, N_TYPE_REASONS, reasons0);
    die_mpi(MPI_Type_commit(&s->type), "MPI_Type_commit");
    long long canonical1 = stat_value("types.canonical");
    stat_values("unsupported.", type_reasons, N_TYPE_REASONS, reasons1);
    char why[40];
    moved(why, sizeof why, type_reasons, N_TYPE_REASONS, reasons0, reasons1);
    if (!commlib_stat)
        snprintf(s->commlib_type, sizeof s->commlib_type, "n/a");
    else if (why[0])
        snprintf(s->commlib_type, sizeof s->commlib_type, "unsupported:%s", why);
    else if (canonical0 >= 0 && canonical1 > canonical0)
        snprintf(s->commlib_type, sizeof s->commlib_type, "canonical");
    else
        snprintf(s->commlib_type, sizeof s->commlib_type, "unknown");
    MPI_Aint lb, extent;
    die_mpi(PMPI_Type_get_true_extent(s->type, &lb, &extent), "MPI_Type_get_true_extent");
    s->extent_bytes = (long long)(lb + extent);
    int size;
    die_mpi(PMPI_Type_size(s->type, &size), "MPI_Type_size");
    s->total_bytes = size;
}

/* Face of thickness t orthogonal to axis (0: x, slowest; 2: z, fastest) of a 256^3 array of
 * doubles in C order, starting at index 1 on that axis (the first interior layer). */
static void add_face(int axis, int t)
{
    struct shape *s = new_shape();
    int sizes[3] = {FACE_N, FACE_N, FACE_N}, subsizes[3] = {FACE_N, FACE_N, FACE_N};
    int starts[3] = {0, 0, 0};
    subsizes[axis] = t;
    starts[axis] = 1;
    snprintf(s->name, sizeof s->name, "face_%c_t%d", "xyz"[axis], t);
    if (filter && !strstr(s->name, filter)) {
        n_shapes--;
        return;
    }
    s->kind = "face";
    die_mpi(MPI_Type_create_subarray(3, sizes, subsizes, starts, MPI_ORDER_C, MPI_DOUBLE,
                                     &s->type), "MPI_Type_create_subarray");
    long long d = sizeof(double), n = FACE_N;
    if (axis == 0) {
        s->block_bytes = t * n * n * d;
        s->stride_bytes = 0;
    } else if (axis == 1) {
        s->block_bytes = t * n * d;
        s->stride_bytes = n * n * d;
    } else {
        s->block_bytes = t * d;
        s->stride_bytes = n * d;
    }
    finish_shape(s);
}

/* A 2D object of bytes: floor(target/block) blocks of `block` bytes, `stride` bytes apart,
 * built as a vector, an hvector or a subarray. */
static void add_2d(const char *kind, long long target, int block, int stride, long long max_extent)
{
    int count = (int)(target / block);
    long long extent = (long long)(count - 1) * stride + block;
    if (strcmp(kind, "subarray") == 0)
        extent = (long long)count * stride;
    char name[64];
    snprintf(name, sizeof name, "%s_%s_b%d_s%d",
             strcmp(kind, "vector") == 0 ? "vec" : strcmp(kind, "hvector") == 0 ? "hvec" : "subarr",
             size_label(target), block, stride);
    if (filter && !strstr(name, filter))
        return;
    if (extent > max_extent) {
        printf("# skipped %s: input extent %lld bytes > limit %lld (-m)\n", name, extent, max_extent);
        return;
    }
    struct shape *s = new_shape();
    snprintf(s->name, sizeof s->name, "%s", name);
    s->kind = kind;
    s->block_bytes = block;
    s->stride_bytes = stride;
    if (strcmp(kind, "vector") == 0) {
        die_mpi(MPI_Type_vector(count, block, stride, MPI_BYTE, &s->type), "MPI_Type_vector");
    } else if (strcmp(kind, "hvector") == 0) {
        die_mpi(MPI_Type_create_hvector(count, block, stride, MPI_BYTE, &s->type),
                "MPI_Type_create_hvector");
    } else {
        int sizes[2] = {count, stride}, subsizes[2] = {count, block}, starts[2] = {0, 0};
        die_mpi(MPI_Type_create_subarray(2, sizes, subsizes, starts, MPI_ORDER_C, MPI_BYTE,
                                         &s->type), "MPI_Type_create_subarray");
    }
    finish_shape(s);
}

/* One contiguous run of `bytes` (a message's header, a small array of doubles): the per-call
 * cost of MPI_Pack itself, the copy being a few cycles. */
static void add_dense(int bytes)
{
    char name[64];
    snprintf(name, sizeof name, "dense_%s", size_label(bytes));
    if (filter && !strstr(name, filter))
        return;
    struct shape *s = new_shape();
    snprintf(s->name, sizeof s->name, "%s", name);
    s->kind = "dense";
    s->block_bytes = bytes;
    s->stride_bytes = 0;
    die_mpi(MPI_Type_contiguous(bytes / 8, MPI_DOUBLE, &s->type), "MPI_Type_contiguous");
    finish_shape(s);
}

/* The halo example's strip on the low side of axis (0: x, the fastest), as its region_type
 * builds it: R layers of the interior (start R) to pack, the halo (start 0) to unpack into. */
static MPI_Datatype halo_strip(const struct grid *g, int axis, int halo)
{
    int e = g->n + 2 * g->r, dim = 3 - axis; /* x is the last (fastest) C dimension */
    int sizes[4] = {g->q, e, e, e}, subsizes[4] = {g->q, g->n, g->n, g->n};
    int starts[4] = {0, g->r, g->r, g->r};
    subsizes[dim] = g->r;
    starts[dim] = halo ? 0 : g->r;
    MPI_Datatype t;
    die_mpi(MPI_Type_create_subarray(4, sizes, subsizes, starts, MPI_ORDER_C, MPI_DOUBLE, &t),
            "MPI_Type_create_subarray");
    return t;
}

/* Every face of one halo grid: axis x, y, z; pack, unpack; warm, cold.  Skipped when the
 * grid is larger than max_extent. */
static void add_halo_grid(int n, int q, int r, long long max_extent)
{
    long long e = n + 2 * r;
    struct grid g = {n, q, r, q * e * e * e * (long long)sizeof(double)};
    char prefix[32];
    snprintf(prefix, sizeof prefix, "halo%d_q%d_r%d_", n, q, r);
    int index = -1, skipped = 0;
    for (int axis = 0; axis < 3; axis++)
        for (int unpack = 0; unpack <= 1; unpack++)
            for (int cold = 0; cold <= 1; cold++) {
                char name[64];
                snprintf(name, sizeof name, "%s%c_%s_%s", prefix, "xyz"[axis],
                         unpack ? "unpack" : "pack", cold ? "cold" : "warm");
                if (filter && !strstr(name, filter))
                    continue;
                if (g.bytes > max_extent) {
                    skipped = 1;
                    continue;
                }
                if (index < 0) {
                    if (n_grids == MAX_GRIDS) {
                        fprintf(stderr, "bench_pack: too many grids\n");
                        PMPI_Abort(MPI_COMM_WORLD, 2);
                    }
                    index = n_grids;
                    grids[n_grids++] = g;
                }
                struct shape *s = new_shape();
                snprintf(s->name, sizeof s->name, "%s", name);
                s->kind = "halo";
                s->unpack = unpack;
                s->cold = cold;
                s->grid = index;
                s->type = halo_strip(&g, axis, unpack);
                long long d = sizeof(double);
                s->block_bytes = (axis == 0 ? r : n) * d;
                s->stride_bytes = e * d;
                finish_shape(s);
            }
    if (skipped)
        printf("# skipped %s*: grid of %lld bytes > limit %lld (-m)\n", prefix, g.bytes,
               max_extent);
}

static void build_shapes(long long max_extent)
{
    static const long long targets[] = {1 << 10, 1 << 20, 4 << 20};
    static const int halo_blocks[] = {1, 8, 24, 64, 512};
    static const int tempi_blocks[] = {1, 2, 4, 8, 32, 64, 128, 256, 512};

    /* thickness 3: face_z_t3 is the shape, 65536 blocks of 24 bytes 2 KiB apart */
    for (int t = 1; t <= 3; t++)
        for (int axis = 0; axis < 3; axis++)
            add_face(axis, t);
    for (size_t i = 0; i < sizeof targets / sizeof *targets; i++)
        for (size_t j = 0; j < sizeof halo_blocks / sizeof *halo_blocks; j++) {
            int b = halo_blocks[j];
            add_2d("vector", targets[i], b, b * 2 < 16 ? 16 : b * 2, max_extent);
        }
    for (size_t i = 0; i < sizeof targets / sizeof *targets; i++)
        for (size_t j = 0; j < sizeof tempi_blocks / sizeof *tempi_blocks; j++)
            add_2d("vector", targets[i], tempi_blocks[j], 512, max_extent);
    static const int dense_bytes[] = {8, 64, 256};
    for (size_t i = 0; i < sizeof dense_bytes / sizeof *dense_bytes; i++)
        add_dense(dense_bytes[i]);
    /* The same object built two other ways: the canonical form should not care. */
    add_2d("hvector", 1 << 20, 8, 512, max_extent);
    add_2d("subarray", 1 << 20, 8, 512, max_extent);
    /* The halo example's faces at sizes where the grid is far larger than the last-level
     * cache: every block of a face is a cache (and TLB) miss when cold. */
    for (int q = 1; q <= 4; q++)
        for (int r = 1; r <= 3; r++)
            add_halo_grid(256, q, r, max_extent);
    add_halo_grid(512, 1, 1, max_extent);
    add_halo_grid(512, 1, 3, max_extent);
}

/* Per-call ns of k calls on one element of the shape's type; host != 0 takes PMPI_*.  Packing,
 * typed is the input and packed the output; unpacking, the other way round. */
static double time_batch(int host, const struct shape *s, void *typed, void *packed, int size,
                         long k)
{
    double t0 = now_ns();
    if (s->unpack) {
        if (host) {
            for (long i = 0; i < k; i++) {
                int pos = 0;
                PMPI_Unpack(packed, size, &pos, typed, 1, s->type, MPI_COMM_WORLD);
            }
        } else {
            for (long i = 0; i < k; i++) {
                int pos = 0;
                MPI_Unpack(packed, size, &pos, typed, 1, s->type, MPI_COMM_WORLD);
            }
        }
    } else if (host) {
        for (long i = 0; i < k; i++) {
            int pos = 0;
            PMPI_Pack(typed, 1, s->type, packed, size, &pos, MPI_COMM_WORLD);
        }
    } else {
        for (long i = 0; i < k; i++) {
            int pos = 0;
            MPI_Pack(typed, 1, s->type, packed, size, &pos, MPI_COMM_WORLD);
        }
    }
    return (now_ns() - t0) / (double)k;
}

/* Reads a buffer twice the last-level cache, one word per line: what the timed call then
 * touches comes from memory, as after a compute phase over a large grid. */
static uint64_t *evict_buf;
static size_t evict_words;
static volatile uint64_t evict_sink;

static void evict(void)
{
    uint64_t sum = 0;
    for (size_t i = 0; i < evict_words; i += 64 / sizeof *evict_buf)
        sum += evict_buf[i];
    evict_sink += sum;
}

/* Bytes of the last-level cache cpu 0 has (one instance: the cache the benchmark runs
 * against).  Linux's sysfs first: in a virtual machine sysconf(_SC_LEVEL3_CACHE_SIZE) may
 * report what CPUID says of the host (320 MiB on a 32 MiB EPYC guest). 0 when unknown. */
static long long last_level_cache_bytes(void)
{
    long long best = 0;
    int best_level = 0;
    for (int i = 0; i < 8; i++) {
        char path[96], text[32];
        long long level = 0, size = 0;
        const char *const files[2] = {"level", "size"};
        long long *values[2] = {&level, &size};
        for (int f = 0; f < 2; f++) {
            snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/%s", i, files[f]);
            FILE *fp = fopen(path, "r");
            if (!fp)
                break;
            char *end = NULL;
            if (fgets(text, sizeof text, fp))
                *values[f] = strtoll(text, &end, 10);
            if (f == 1 && end && (*end == 'K' || *end == 'k'))
                size <<= 10;
            else if (f == 1 && end && (*end == 'M' || *end == 'm'))
                size <<= 20;
            fclose(fp);
        }
        if (level > best_level && size > 0) {
            best_level = (int)level;
            best = size;
        }
    }
    if (best > 0)
        return best;
    long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    return l3 > 0 ? l3 : 0;
}

/* One call, with the cache evicted before it (not timed). */
static double time_cold(int host, const struct shape *s, void *typed, void *packed, int size)
{
    evict();
    return time_batch(host, s, typed, packed, size, 1);
}

/* Calls per batch so that one batch takes about batch_ns.  Both sides get batches of the
 * same length in time: on a shared machine a longer batch catches more interference, so
 * unequal batches would bias the ratio.  The estimate is the fastest of three tries, so
 * that one interrupted try does not shrink the batch. */
static long calibrate(int host, const struct shape *s, void *typed, void *packed, int size,
                      double batch_ns, double *per_call)
{
    long k = 1;
    double t = time_batch(host, s, typed, packed, size, k);
    while (t * (double)k < batch_ns / 8 && k < (1L << 30)) {
        double grow = (batch_ns / 4) / (t * (double)k + 1.0);
        k = (long)((double)k * (grow < 2 ? 2 : grow > 1000 ? 1000 : grow));
        t = time_batch(host, s, typed, packed, size, k);
    }
    for (int i = 0; i < 2; i++) {
        double again = time_batch(host, s, typed, packed, size, k);
        if (again < t)
            t = again;
    }
    *per_call = t;
    long want = (long)(batch_ns / (t > 1.0 ? t : 1.0));
    return want < 1 ? 1 : want;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n)
{
    qsort(v, n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* The halo grids' contents: word i of the grid is a function of i, so the whole grid can be
 * checked after an unpack without keeping a copy of it. */
static uint64_t pattern_word(uint64_t i)
{
    uint64_t z = i * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull; /* splitmix64 */
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Index of the first word of the grid that differs from the pattern, or -1. */
static long long pattern_mismatch(const uint64_t *g, size_t words)
{
    for (size_t i = 0; i < words; i++)
        if (g[i] != pattern_word(i))
            return (long long)i;
    return -1;
}

/* commlib packs (at position 0 and at an odd position: several pieces packed one after the
 * other into one message) the same bytes as the host MPI, and writes nothing outside its
 * range.  Returns 1 when it did, else prints why. */
static int verify_pack(const struct shape *s, void *typed, unsigned char *out_a, unsigned char *out_b,
                       int outsize)
{
    for (int start = 0; start <= 3; start += 3) {
        size_t span = (size_t)outsize + OUT_SLACK;
        memset(out_a, 0xa5, span);
        memset(out_b, 0x5a, span);
        int pos_a = start, pos_b = start;
        int rc_a = MPI_Pack(typed, 1, s->type, out_a, start + outsize, &pos_a, MPI_COMM_WORLD);
        int rc_b = PMPI_Pack(typed, 1, s->type, out_b, start + outsize, &pos_b, MPI_COMM_WORLD);
        long long first = -1, overrun = -1;
        for (int j = start; j < pos_a && j < pos_b; j++)
            if (out_a[j] != out_b[j]) {
                first = j;
                break;
            }
        for (size_t j = 0; j < span; j++)
            if ((j < (size_t)start || j >= (size_t)pos_a) && out_a[j] != 0xa5) {
                overrun = (long long)j;
                break;
            }
        if (rc_a == MPI_SUCCESS && rc_b == MPI_SUCCESS && pos_a == pos_b &&
            pos_a == start + (int)s->total_bytes && first < 0 && overrun < 0)
            continue;
        printf("# MISMATCH %s (start position %d): rc commlib=%d host=%d, position commlib=%d "
               "host=%d expected=%lld, first differing byte=%lld, first byte written outside "
               "the packed range=%lld\n", s->name, start, rc_a, rc_b, pos_a, pos_b,
               start + s->total_bytes, first, overrun);
        return 0;
    }
    return 1;
}

/* commlib unpacks (at position 0 and at an odd position) into a patterned halo grid: the
 * host MPI's pack of the strip then reads back exactly the bytes unpacked; after the host
 * MPI unpacks the strip's original contents, the whole grid is the pattern again, so
 * commlib wrote nothing outside the strip.  src, orig, check: outsize + OUT_SLACK bytes.
 * Leaves the grid holding the pattern.  Returns 1 when it did, else prints why. */
static int verify_unpack(const struct shape *s, uint64_t *grid, size_t grid_words, unsigned char *src,
                         unsigned char *orig, unsigned char *check, int outsize)
{
    int pos = 0, ok = 1;
    die_mpi(PMPI_Pack(grid, 1, s->type, orig, outsize, &pos, MPI_COMM_WORLD), "PMPI_Pack");
    for (int start = 0; start <= 3 && ok; start += 3) {
        for (long long j = 0; j < s->total_bytes; j++)
            src[start + j] = (unsigned char)(pattern_word((uint64_t)(j / 8) + 977 * (start + 1)) >> (8 * (j % 8)));
        int pos_a = start;
        int rc_a = MPI_Unpack(src, start + outsize, &pos_a, grid, 1, s->type, MPI_COMM_WORLD);
        pos = 0;
        die_mpi(PMPI_Pack(grid, 1, s->type, check, outsize, &pos, MPI_COMM_WORLD), "PMPI_Pack");
        long long first = -1;
        for (long long j = 0; j < s->total_bytes; j++)
            if (check[j] != src[start + j]) {
                first = j;
                break;
            }
        if (rc_a == MPI_SUCCESS && pos_a == start + (int)s->total_bytes && first < 0)
            continue;
        printf("# MISMATCH %s (start position %d): rc commlib=%d, position commlib=%d expected=%lld, "
               "first packed byte not in the strip after the unpack=%lld\n", s->name, start, rc_a,
               pos_a, start + s->total_bytes, first);
        ok = 0;
    }
    pos = 0;
    die_mpi(PMPI_Unpack(orig, outsize, &pos, grid, 1, s->type, MPI_COMM_WORLD), "PMPI_Unpack");
    long long stray = pattern_mismatch(grid, grid_words);
    if (ok && stray >= 0) {
        printf("# MISMATCH %s: the grid differs outside the strip after the unpack, first at byte "
               "%lld\n", s->name, stray * 8);
        ok = 0;
    }
    if (stray >= 0) /* the next shapes of this grid start from the pattern */
        for (size_t i = 0; i < grid_words; i++)
            grid[i] = pattern_word(i);
    return ok;
}

static void usage(void)
{
    fprintf(stderr, "usage: bench_pack [-q] [-t TARGET_MS] [-r ROUNDS] [-m MAX_EXTENT_MIB] "
                    "[-f SUBSTRING] [-p default|huge|small] [-l]\n");
}

int main(int argc, char **argv)
{
    double target_ms = 60;
    int rounds = 31, list_only = 0;
    long long max_extent_mib = 1200;
    int opt;
    const char *pages = getenv("BENCH_PACK_PAGES"); /* -p's default: so --compare can set it */
    while ((opt = getopt(argc, argv, "qt:r:m:f:p:l")) != -1) {
        switch (opt) {
        case 'q': target_ms = 10; rounds = 5; break;
        case 't': target_ms = atof(optarg); break;
        case 'r': rounds = atoi(optarg); break;
        case 'm': max_extent_mib = atoll(optarg); break;
        case 'f': filter = optarg; break;
        case 'l': list_only = 1; break;
        case 'p': pages = optarg; break;
        default: usage(); return 2;
        }
    }
    if (pages && *pages) {
        page_policy = -1;
        for (int i = 0; i < 3; i++)
            if (!strcmp(pages, page_policy_names[i]))
                page_policy = i;
        if (page_policy < 0) {
            fprintf(stderr, "bench_pack: pages '%s': default, huge or small\n", pages);
            return 2;
        }
    }
    if (target_ms <= 0 || rounds < 1 || max_extent_mib < 1) {
        usage();
        return 2;
    }

    MPI_Init(&argc, &argv);
    int nranks;
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    if (nranks != 1) {
        fprintf(stderr, "bench_pack: run on one rank (got %d)\n", nranks);
        PMPI_Abort(MPI_COMM_WORLD, 2);
    }
    commlib_stat = (stat_fn)dlsym(RTLD_DEFAULT, "commlib_stat");
    commlib_stats_json = (stats_json_fn)dlsym(RTLD_DEFAULT, "commlib_stats_json");

    char version[MPI_MAX_LIBRARY_VERSION_STRING];
    int vlen = 0;
    PMPI_Get_library_version(version, &vlen);
    for (char *p = version; *p; p++)
        if (*p == '\n' || *p == '\r')
            *p = ' ';
    printf("# mpi_library=%.200s\n", version);
    printf("# commlib_stat=%s\n", commlib_stat ? "available" : "unavailable");
    printf("# target_ms=%g\n# rounds=%d\n# max_extent_mib=%lld\n", target_ms, rounds,
           max_extent_mib);
    printf("# thp=%s\n# pages=%s\n", thp_setting(), page_policy_names[page_policy]);

    build_shapes(max_extent_mib << 20);

    if (list_only) {
        for (int i = 0; i < n_shapes; i++)
            printf("%s\n", shapes[i].name);
        MPI_Finalize();
        return 0;
    }

    /* One input buffer for every shape but the halo ones (which bring their own grid),
     * filled with a pattern in which misplaced bytes show. */
    long long in_bytes = 0, out_bytes = 0;
    int any_cold = 0;
    for (int i = 0; i < n_shapes; i++) {
        if (shapes[i].grid < 0 && shapes[i].extent_bytes > in_bytes)
            in_bytes = shapes[i].extent_bytes;
        any_cold |= shapes[i].cold;
        int pack_size = 0;
        die_mpi(PMPI_Pack_size(1, shapes[i].type, MPI_COMM_WORLD, &pack_size), "PMPI_Pack_size");
        if (shapes[i].total_bytes > out_bytes)
            out_bytes = shapes[i].total_bytes;
        if (pack_size > out_bytes)
            out_bytes = pack_size;
    }
    size_t in_words = (size_t)(in_bytes + 7) / 8;
    uint64_t *in = in_words ? alloc_or_die(in_words * 8, "the input") : NULL;
    size_t out_span = (size_t)out_bytes + OUT_SLACK;
    unsigned char *out_a = alloc_or_die(out_span, "the output");
    unsigned char *out_b = alloc_or_die(out_span, "the output");
    unsigned char *out_c = alloc_or_die(out_span, "the output"); /* unpack checks */
    if (in)
        advise_pages(in, in_words * 8);
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < in_words; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        in[i] = x;
    }
    if (in)
        report_pages("input", in, (long long)in_words * 8, "filled");
    if (any_cold) {
        long long llc = last_level_cache_bytes(), bytes = 2 * llc;
        if (bytes < MIN_EVICT_BYTES)
            bytes = MIN_EVICT_BYTES;
        evict_words = (size_t)bytes / sizeof *evict_buf;
        evict_buf = alloc_or_die((size_t)bytes, "the cache eviction");
        memset(evict_buf, 1, (size_t)bytes);
        printf("# llc_bytes=%lld\n# evict_bytes=%lld\n", llc, bytes);
    }

    double batch_ns = target_ms * 1e6 / rounds;
    double *t_commlib = malloc(sizeof(double) * rounds), *t_host = malloc(sizeof(double) * rounds);
    printf("name,kind,op,cache,total_bytes,block_bytes,stride_bytes,extent_bytes,grid_bytes,"
           "commlib_ns,host_ns,commlib_min_ns,host_min_ns,rounds,commlib_batch,host_batch,"
           "commlib_calls,stat_calls,stat_fast,stat_fallback,fallback_reasons,commlib_type,"
           "identical\n");
    fflush(stdout);

    int mismatches = 0, grid_now = -1;
    uint64_t *grid = NULL;
    size_t grid_words = 0;
    for (int i = 0; i < n_shapes; i++) {
        const struct shape *s = &shapes[i];
        if (s->grid >= 0 && in) { /* the shared input's shapes come first */
            report_pages("input", in, (long long)in_words * 8, "done");
            free(in);
            in = NULL;
        }
        if (s->grid != grid_now) { /* one halo grid in memory at a time */
            char name[32];
            if (grid) {
                grid_name(name, sizeof name, grid_now);
                report_pages(name, grid, (long long)grid_words * 8, "done");
            }
            free(grid);
            grid = NULL;
            grid_now = s->grid;
            if (grid_now >= 0) {
                grid_words = (size_t)grids[grid_now].bytes / 8;
                grid = alloc_or_die(grid_words * 8, "a halo grid");
                advise_pages(grid, grid_words * 8);
                for (size_t j = 0; j < grid_words; j++)
                    grid[j] = pattern_word(j);
                grid_name(name, sizeof name, grid_now);
                report_pages(name, grid, (long long)grid_words * 8, "filled");
            }
        }
        void *typed = s->grid >= 0 ? (void *)grid : (void *)in;
        int outsize = (int)s->total_bytes;
        int outsize_host = 0;
        die_mpi(PMPI_Pack_size(1, s->type, MPI_COMM_WORLD, &outsize_host), "PMPI_Pack_size");
        if (outsize_host > outsize)
            outsize = outsize_host;

        /* Verify first, also warming both paths (commlib may build its plan on first use). */
        int identical = s->unpack ? verify_unpack(s, grid, grid_words, out_a, out_b, out_c, outsize)
                                  : verify_pack(s, typed, out_a, out_b, outsize);
        mismatches += !identical;
        /* Both sides move through one packed buffer: unpacking, they read the same packed bytes
         * (the last ones verified); packing, they write the same buffer.  Two buffers, even
         * traded every two rounds, favoured one side (where a buffer lies - its pages, its cache
         * sets - showed up as that side's speed): a dense 4 MiB pack - memcpy on both sides -
         * measured 0.96-0.97x in 3 runs on the dev VM's Zen 3, 1.00x with the buffers' first
         * assignment swapped, 0.99-1.01x with one buffer (stop 37). */
        unsigned char *packed = out_a;

        long long calls0 = stat_value(s->unpack ? "unpack.calls" : "pack.calls");
        long long fast0 = stat_value(s->unpack ? "unpack.fast" : "pack.fast");
        long long fallback0 = stat_value(s->unpack ? "unpack.fallback" : "pack.fallback");
        long long why0[N_FALLBACK_REASONS], why1[N_FALLBACK_REASONS];
        long k_a = 1, k_b = 1;
        int r_eff = rounds;
        if (s->cold) {
            stat_values("fallback.", fallback_reasons, N_FALLBACK_REASONS, why0);
            for (int r = 0; r < r_eff; r++) {
                /* ABBA order: a drift affects both sides alike */
                if (r % 2 == 0) {
                    t_commlib[r] = time_cold(0, s, typed, packed, outsize);
                    t_host[r] = time_cold(1, s, typed, packed, outsize);
                } else {
                    t_host[r] = time_cold(1, s, typed, packed, outsize);
                    t_commlib[r] = time_cold(0, s, typed, packed, outsize);
                }
            }
        } else {
            double per_a, per_b;
            k_a = calibrate(0, s, typed, packed, outsize, batch_ns, &per_a);
            k_b = calibrate(1, s, typed, packed, outsize, batch_ns, &per_b);
            /* Single calls longer than a batch: fewer rounds, but at least 5 of each (the
             * target is then overrun: a median of fewer samples says too little). */
            double slowest = per_a > per_b ? per_a : per_b;
            if (slowest * rounds > target_ms * 1e6) {
                r_eff = (int)(target_ms * 1e6 / slowest);
                if (r_eff < 5)
                    r_eff = rounds < 5 ? rounds : 5;
            }
            calls0 = stat_value(s->unpack ? "unpack.calls" : "pack.calls");
            fast0 = stat_value(s->unpack ? "unpack.fast" : "pack.fast");
            fallback0 = stat_value(s->unpack ? "unpack.fallback" : "pack.fallback");
            stat_values("fallback.", fallback_reasons, N_FALLBACK_REASONS, why0);
            for (int r = 0; r < r_eff; r++) {
                if (r % 2 == 0) {
                    t_commlib[r] = time_batch(0, s, typed, packed, outsize, k_a);
                    t_host[r] = time_batch(1, s, typed, packed, outsize, k_b);
                } else {
                    t_host[r] = time_batch(1, s, typed, packed, outsize, k_b);
                    t_commlib[r] = time_batch(0, s, typed, packed, outsize, k_a);
                }
            }
        }
        if (s->unpack) { /* the strip's own contents again (verify_unpack left them in out_b) */
            int pos = 0;
            die_mpi(PMPI_Unpack(out_b, outsize, &pos, grid, 1, s->type, MPI_COMM_WORLD),
                    "PMPI_Unpack");
        }
        /* Counters over the timed rounds only, so that they compare with calls made there. */
        long long calls1 = stat_value(s->unpack ? "unpack.calls" : "pack.calls");
        long long fast1 = stat_value(s->unpack ? "unpack.fast" : "pack.fast");
        long long fallback1 = stat_value(s->unpack ? "unpack.fallback" : "pack.fallback");
        stat_values("fallback.", fallback_reasons, N_FALLBACK_REASONS, why1);
        char why[128];
        moved(why, sizeof why, fallback_reasons, N_FALLBACK_REASONS, why0, why1);
        long long commlib_calls = (long long)k_a * r_eff;
        double min_a = t_commlib[0], min_b = t_host[0];
        for (int r = 1; r < r_eff; r++) {
            if (t_commlib[r] < min_a) min_a = t_commlib[r];
            if (t_host[r] < min_b) min_b = t_host[r];
        }
        double med_a = median(t_commlib, r_eff), med_b = median(t_host, r_eff);
        printf("%s,%s,%s,%s,%lld,%lld,%lld,%lld,%lld,%.1f,%.1f,%.1f,%.1f,%d,%ld,%ld,%lld,%lld,"
               "%lld,%lld,%s,%s,%s\n",
               s->name, s->kind, s->unpack ? "unpack" : "pack", s->cold ? "cold" : "warm",
               s->total_bytes, s->block_bytes, s->stride_bytes, s->extent_bytes,
               s->grid >= 0 ? grids[s->grid].bytes : 0, med_a, med_b, min_a, min_b, r_eff, k_a,
               k_b, commlib_calls, calls0 >= 0 && calls1 >= 0 ? calls1 - calls0 : -1,
               fast0 >= 0 && fast1 >= 0 ? fast1 - fast0 : -1,
               fallback0 >= 0 && fallback1 >= 0 ? fallback1 - fallback0 : -1, why,
               s->commlib_type, identical ? "ok" : "MISMATCH");
        fflush(stdout);
    }

    if (commlib_stats_json) {
        char json[4096];
        size_t len = commlib_stats_json(json, sizeof json);
        if (len < sizeof json)
            printf("# commlib_stats=%s\n", json);
    }
    for (int i = 0; i < n_shapes; i++)
        MPI_Type_free(&shapes[i].type);
    free(t_commlib);
    free(t_host);
    if (in)
        report_pages("input", in, (long long)in_words * 8, "done");
    if (grid) {
        char name[32];
        grid_name(name, sizeof name, grid_now);
        report_pages(name, grid, (long long)grid_words * 8, "done");
    }
    free(in);
    free(grid);
    free(evict_buf);
    free(out_a);
    free(out_b);
    free(out_c);
    MPI_Finalize();
    return mismatches ? 1 : 0;
}
