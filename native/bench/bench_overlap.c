/* Communication/computation overlap, OSU style (osu_iallreduce, osu_ibcast...), for
 * MPI_Iallreduce and MPI_Isend/MPI_Irecv pairs, on host and on device buffers.
 *
 * Per operation, buffer kind and size, on every rank:
 *   pure comm   time of post + wait, averaged over the iterations;
 *   compute     a dummy compute loop (a floating-point dependency chain, no memory
 *               traffic, no MPI calls) calibrated to last as long as the pure comm
 *               (the largest over the ranks), timed alone;
 *   overall     post, compute, wait;
 *   overlap %   max(0, 100 * (1 - (overall - compute) / pure comm)), at most 100.
 * Rank 0 prints the largest time over the ranks of each figure, and how many of the timed
 * overall iterations commlib's progress thread completed and its collective engine served
 * (its counters progress.completed and engine.iallreduce; -1 without commlib).  The program does not
 * know whether commlib is preloaded or a progress thread runs: `commlib bench overlap`
 * runs it once per configuration and puts the runs side by side.
 *
 * Isend/Irecv: rank r exchanges with r^1 (itself when r^1 does not exist); both post an
 * Irecv and an Isend of the same size and wait for both (MPI_Waitall).  Iallreduce:
 * doubles, MPI_SUM, separate send and receive buffers.  Every (operation, buffer, size)
 * first runs once on patterned data and checks the result ("verified").
 *
 * Device memory: cuMemAlloc through dlopen("libcuda.so.1") (no CUDA headers), device
 * rank % devices.  Without a driver or a device the device rows are left out (a "#"
 * note says so).  -H leaves them out always (the host MPI alone, when it cannot read
 * device memory).
 *
 * Output: "# key=value" lines, "# note" lines, then CSV (header first). */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct CUctx_st *CUcontext;

static struct {
    CUresult (*cuInit)(unsigned);
    CUresult (*cuDeviceGetCount)(int *);
    CUresult (*cuDeviceGet)(CUdevice *, int);
    CUresult (*cuDeviceGetName)(char *, int, CUdevice);
    CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *, CUdevice);
    CUresult (*cuCtxSetCurrent)(CUcontext);
    CUresult (*cuMemAlloc)(CUdeviceptr *, size_t);
    CUresult (*cuMemcpyHtoD)(CUdeviceptr, const void *, size_t);
    CUresult (*cuMemcpyDtoH)(void *, CUdeviceptr, size_t);
    CUresult (*cuMemFree)(CUdeviceptr);
} cu;

static int rank, nranks;

typedef long long (*stat_fn)(const char *);
static stat_fn commlib_stat;
static long long stat_value(const char *name) { return commlib_stat ? commlib_stat(name) : -1; }

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return 1e6 * (double)ts.tv_sec + 1e-3 * (double)ts.tv_nsec;
}

static double max_over_ranks(double v)
{
    double out = v;
    MPI_Allreduce(&v, &out, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    return out;
}

/* ------------------------------------------------------------------ CUDA */
static int cuda_open(char *name, size_t len)
{
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!lib) return 0;
#define SYM(field, sym) \
    if (!(*(void **)&cu.field = dlsym(lib, sym))) return 0;
    SYM(cuInit, "cuInit") SYM(cuDeviceGetCount, "cuDeviceGetCount") SYM(cuDeviceGet, "cuDeviceGet")
    SYM(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain")
    SYM(cuCtxSetCurrent, "cuCtxSetCurrent") SYM(cuMemAlloc, "cuMemAlloc_v2") SYM(cuMemcpyHtoD, "cuMemcpyHtoD_v2")
    SYM(cuMemcpyDtoH, "cuMemcpyDtoH_v2") SYM(cuMemFree, "cuMemFree_v2")
#undef SYM
    *(void **)&cu.cuDeviceGetName = dlsym(lib, "cuDeviceGetName"); /* optional (the tests' stand-in driver) */
    int count = 0;
    CUdevice device;
    CUcontext context;
    if (cu.cuInit(0) || cu.cuDeviceGetCount(&count) || count < 1) return 0;
    if (cu.cuDeviceGet(&device, rank % count) || cu.cuDevicePrimaryCtxRetain(&context, device) ||
        cu.cuCtxSetCurrent(context))
        return 0;
    if (!cu.cuDeviceGetName || cu.cuDeviceGetName(name, (int)len, device)) snprintf(name, len, "device %d", rank % count);
    return 1;
}

/* ---------------------------------------------------------------- buffers */
enum kind { HOST, DEVICE };
static const char *const kind_name[] = {"host", "device"};

struct buffers {
    enum kind kind;
    size_t bytes;
    void *send, *recv;
    double *host; /* staging for filling and checking device buffers */
};

static void *alloc(enum kind kind, size_t bytes)
{
    if (kind == HOST) return malloc(bytes);
    CUdeviceptr p = 0;
    return cu.cuMemAlloc(&p, bytes) ? NULL : (void *)(uintptr_t)p;
}

static void release(enum kind kind, void *p)
{
    if (kind == HOST) free(p);
    else if (p) cu.cuMemFree((CUdeviceptr)(uintptr_t)p);
}

static int to_buffer(enum kind kind, void *dst, const void *src, size_t bytes)
{
    if (kind == HOST) {
        memcpy(dst, src, bytes);
        return 1;
    }
    return !cu.cuMemcpyHtoD((CUdeviceptr)(uintptr_t)dst, src, bytes);
}

static int from_buffer(enum kind kind, void *dst, const void *src, size_t bytes)
{
    if (kind == HOST) {
        memcpy(dst, src, bytes);
        return 1;
    }
    return !cu.cuMemcpyDtoH(dst, (CUdeviceptr)(uintptr_t)src, bytes);
}

/* ------------------------------------------------------------- operations */
enum op { IALLREDUCE, ISEND_IRECV };
static const char *const op_name[] = {"iallreduce", "isend_irecv"};

static int partner(void) { return (rank ^ 1) < nranks ? rank ^ 1 : rank; }

static void post(enum op op, struct buffers *b, MPI_Request *reqs, int *n)
{
    int count = (int)(b->bytes / sizeof(double));
    if (op == IALLREDUCE) {
        MPI_Iallreduce(b->send, b->recv, count, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD, &reqs[0]);
        *n = 1;
    } else {
        MPI_Irecv(b->recv, count, MPI_DOUBLE, partner(), 7, MPI_COMM_WORLD, &reqs[0]);
        MPI_Isend(b->send, count, MPI_DOUBLE, partner(), 7, MPI_COMM_WORLD, &reqs[1]);
        *n = 2;
    }
}

static void wait_all(MPI_Request *reqs, int n) { MPI_Waitall(n, reqs, MPI_STATUSES_IGNORE); }

static double value_of(int sender, size_t i) { return (double)(sender + 1) + (double)(i % 1000); }

/* One operation on patterned data; 1 when every received double is right. */
static int verify(enum op op, struct buffers *b)
{
    size_t n = b->bytes / sizeof(double);
    for (size_t i = 0; i < n; i++) b->host[i] = value_of(rank, i);
    int ok = to_buffer(b->kind, b->send, b->host, b->bytes);
    for (size_t i = 0; i < n; i++) b->host[i] = -1;
    ok &= to_buffer(b->kind, b->recv, b->host, b->bytes);
    MPI_Request reqs[2];
    int count;
    post(op, b, reqs, &count);
    wait_all(reqs, count);
    ok &= from_buffer(b->kind, b->host, b->recv, b->bytes);
    for (size_t i = 0; ok && i < n; i++) {
        double want = 0;
        if (op == IALLREDUCE)
            for (int r = 0; r < nranks; r++) want += value_of(r, i);
        else
            want = value_of(partner(), i);
        ok = b->host[i] == want;
    }
    int all = ok;
    MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    return all;
}

/* ---------------------------------------------------------------- compute */
static volatile double sink;
static double loops_per_us;

static void compute(long loops)
{
    double a = 1.0, c = 1e-9;
    for (long i = 0; i < loops; i++) a = a * 0.9999999 + c;
    sink = a;
}

static void calibrate(void)
{
    long loops = 1 << 16;
    for (;;) {
        double t0 = now_us();
        compute(loops);
        double t = now_us() - t0;
        if (t > 20000) {
            loops_per_us = (double)loops / t;
            return;
        }
        loops *= 2;
    }
}

/* ---------------------------------------------------------------- measure */
struct result {
    int iters;
    double pure, compute, overall, post, wait, overlap;
    long long progress_completed, engine_served;
};

static int iterations_for(double one_us, double target_ms, int quick)
{
    int lo = quick ? 3 : 10, hi = quick ? 200 : 2000;
    double n = one_us > 0 ? target_ms * 1000.0 / one_us : hi;
    return n < lo ? lo : n > hi ? hi : (int)n;
}

static void measure(enum op op, struct buffers *b, double target_ms, int quick, struct result *r)
{
    MPI_Request reqs[2];
    int n;
    /* warm-up, and the length of one operation for the iteration count */
    double t0 = now_us();
    for (int i = 0; i < 2; i++) {
        post(op, b, reqs, &n);
        wait_all(reqs, n);
    }
    int iters = r->iters = iterations_for(max_over_ranks((now_us() - t0) / 2), target_ms, quick);

    MPI_Barrier(MPI_COMM_WORLD);
    t0 = now_us();
    for (int i = 0; i < iters; i++) {
        post(op, b, reqs, &n);
        wait_all(reqs, n);
    }
    r->pure = max_over_ranks((now_us() - t0) / iters);

    long loops = (long)(r->pure * loops_per_us);
    MPI_Barrier(MPI_COMM_WORLD);
    t0 = now_us();
    for (int i = 0; i < iters; i++) compute(loops);
    r->compute = max_over_ranks((now_us() - t0) / iters);

    long long before = stat_value("progress.completed"), served = stat_value("engine.iallreduce");
    double posting = 0, waiting = 0;
    MPI_Barrier(MPI_COMM_WORLD);
    t0 = now_us();
    for (int i = 0; i < iters; i++) {
        double a = now_us();
        post(op, b, reqs, &n);
        double c = now_us();
        compute(loops);
        double d = now_us();
        wait_all(reqs, n);
        posting += c - a;
        waiting += now_us() - d;
    }
    r->overall = max_over_ranks((now_us() - t0) / iters);
    r->post = max_over_ranks(posting / iters);
    r->wait = max_over_ranks(waiting / iters);
    r->progress_completed = before < 0 ? -1 : stat_value("progress.completed") - before;
    r->engine_served = served < 0 ? -1 : stat_value("engine.iallreduce") - served;
    double o = r->pure > 0 ? 100.0 * (1.0 - (r->overall - r->compute) / r->pure) : 0;
    r->overlap = o < 0 ? 0 : o > 100 ? 100 : o; /* past 100: the overall run beat the compute alone (noise) */
}

/* ------------------------------------------------------------------- main */
static int threads_named(const char *name)
{
    DIR *dir = opendir("/proc/self/task");
    if (!dir) return -1;
    int found = 0;
    for (struct dirent *e; (e = readdir(dir));) {
        if (e->d_name[0] == '.') continue;
        char path[300], comm[64] = "";
        snprintf(path, sizeof path, "/proc/self/task/%s/comm", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f) continue;
        if (fgets(comm, sizeof comm, f)) comm[strcspn(comm, "\n")] = 0;
        fclose(f);
        found += !strcmp(comm, name);
    }
    closedir(dir);
    return found;
}

static const char *level_name(int level)
{
    return level == MPI_THREAD_SINGLE       ? "single"
           : level == MPI_THREAD_FUNNELED   ? "funneled"
           : level == MPI_THREAD_SERIALIZED ? "serialized"
           : level == MPI_THREAD_MULTIPLE   ? "multiple"
                                            : "unknown";
}

static size_t parse_size(const char *s)
{
    char *end;
    double v = strtod(s, &end);
    if (*end == 'K' || *end == 'k') v *= 1 << 10;
    else if (*end == 'M' || *end == 'm') v *= 1 << 20;
    else if (*end == 'G' || *end == 'g') v *= 1 << 30;
    return (size_t)v;
}

static void usage(void)
{
    fprintf(stderr, "usage: bench_overlap [-q] [-H] [-t TARGET_MS] [-s SIZE,SIZE,...] [-o iallreduce,isend_irecv]\n"
                    "  -q  quick: 1 KiB, 64 KiB, 1 MiB and short runs; -H  host buffers only\n"
                    "  sizes in bytes, K/M/G suffixes; rounded down to whole doubles\n");
}

int main(int argc, char **argv)
{
    int quick = 0, host_only = 0, ops_mask = 3;
    double target_ms = 0;
    size_t sizes[64];
    int n_sizes = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-q")) quick = 1;
        else if (!strcmp(argv[i], "-H")) host_only = 1;
        else if (!strcmp(argv[i], "-t") && i + 1 < argc) target_ms = atof(argv[++i]);
        else if (!strcmp(argv[i], "-s") && i + 1 < argc) {
            for (char *tok = strtok(argv[++i], ","); tok && n_sizes < 64; tok = strtok(NULL, ","))
                if (parse_size(tok) >= sizeof(double)) sizes[n_sizes++] = parse_size(tok) / sizeof(double) * sizeof(double);
        } else if (!strcmp(argv[i], "-o") && i + 1 < argc) {
            const char *list = argv[++i];
            ops_mask = (strstr(list, "iallreduce") ? 1 : 0) | (strstr(list, "isend") ? 2 : 0);
        } else {
            usage();
            return 2;
        }
    }
    if (!n_sizes) {
        if (quick) {
            static const size_t q[] = {1 << 10, 64 << 10, 1 << 20};
            for (size_t i = 0; i < 3; i++) sizes[n_sizes++] = q[i];
        } else {
            for (size_t s = 1 << 10; s <= (size_t)64 << 20; s *= 4) sizes[n_sizes++] = s;
        }
    }
    if (target_ms <= 0) target_ms = quick ? 20 : 200;
    if (!ops_mask) {
        usage();
        return 2;
    }

    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_SINGLE, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    commlib_stat = (stat_fn)dlsym(RTLD_DEFAULT, "commlib_stat");
    char device[256] = "none";
    int have_cuda = !host_only && cuda_open(device, sizeof device);
    int all_cuda = have_cuda;
    MPI_Allreduce(&have_cuda, &all_cuda, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    int progress_threads = threads_named("commlib-prog");
    calibrate();
    size_t largest = 0;
    for (int i = 0; i < n_sizes; i++) largest = sizes[i] > largest ? sizes[i] : largest;

    if (rank == 0) {
        char version[MPI_MAX_LIBRARY_VERSION_STRING];
        int vlen = 0;
        PMPI_Get_library_version(version, &vlen);
        for (char *p = version; *p; p++)
            if (*p == '\n' || *p == '\r') *p = ' ';
        const char *progress = getenv("COMMLIB_PROGRESS"), *served = getenv("COMMLIB_ENGINE_IALLREDUCE");
        printf("# mpi_library=%.200s\n# ranks=%d\n# thread_level=%s\n# commlib_stat=%s\n# commlib_progress=%s\n"
               "# commlib_engine_iallreduce=%s\n# progress_thread=%d\n# device=%s\n# target_ms=%g\n"
               "# loops_per_us=%.1f\n",
               version, nranks, level_name(provided), commlib_stat ? "available" : "unavailable", progress ? progress : "",
               served ? served : "", progress_threads, all_cuda ? device : "none", target_ms, loops_per_us);
        if (host_only) printf("# device buffers not measured (-H)\n");
        else if (!all_cuda) printf("# no CUDA device on every rank: device buffers not measured\n");
        printf("op,buffer,bytes,iters,pure_us,compute_us,overall_us,overlap_pct,post_us,wait_us,verified,"
               "progress_completed,engine_served\n");
        fflush(stdout);
    }
    for (int k = HOST; k <= (all_cuda ? DEVICE : HOST); k++) {
        struct buffers b = {.kind = (enum kind)k};
        b.send = alloc(b.kind, largest);
        b.recv = alloc(b.kind, largest);
        b.host = malloc(largest);
        int ok = b.send && b.recv && b.host, all = ok;
        MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
        if (!all) {
            if (rank == 0) printf("# %s buffers of %zu bytes could not be allocated: skipped\n", kind_name[k], largest);
        } else {
            for (int op = IALLREDUCE; op <= ISEND_IRECV; op++) {
                if (!(ops_mask & (1 << op))) continue;
                for (int s = 0; s < n_sizes; s++) {
                    b.bytes = sizes[s];
                    int verified = verify((enum op)op, &b);
                    struct result r;
                    measure((enum op)op, &b, target_ms, quick, &r);
                    if (rank == 0) {
                        printf("%s,%s,%zu,%d,%.3f,%.3f,%.3f,%.2f,%.3f,%.3f,%s,%lld,%lld\n", op_name[op], kind_name[k],
                               b.bytes, r.iters, r.pure, r.compute, r.overall, r.overlap, r.post, r.wait,
                               verified ? "yes" : "no", r.progress_completed, r.engine_served);
                        fflush(stdout);
                    }
                }
            }
        }
        release(b.kind, b.send);
        release(b.kind, b.recv);
        free(b.host);
    }
    MPI_Finalize();
    return 0;
}
