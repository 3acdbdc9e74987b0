/* bench_p2p: point-to-point latency and bandwidth between two ranks, osu_latency /
 * osu_bw style, in host memory (run under the plain host MPI: the latency baseline) or in
 * device memory (-d; run with libcommlib.so preloaded), where rank 0 also times
 * device-to-device cuMemcpyAsync + cuStreamSynchronize of the same bytes alone (the
 * bandwidth baseline).  Driven by commlib/bench/p2p.py (`commlib bench p2p`).
 *
 * Layouts: contiguous (MPI_BYTE) and strided: MPI_Type_vector(n, 1, 2, MPI_DOUBLE), every
 * other double (the real parts of an interleaved complex array, one field of two
 * interleaved ones); the message size is the payload, the buffer spans twice that.
 *
 * latency    ping-pong of MPI_Send / MPI_Recv; half the round trip, median of the timed
 *            round trips (and the minimum)
 * bandwidth  rank 0 posts a window of MPI_Isend (one buffer per message, W of them), rank 1
 *            as many MPI_Irecv, both MPI_Waitall, rank 1 answers with a 1-byte message in
 *            host memory; the median time of one window from the first MPI_Isend to the
 *            answer (bytes/s = W * size / time)
 * memcpy     (-d, rank 0 alone) one copy + synchronisation (latency) and W copies + one
 *            synchronisation (bandwidth), device to device
 * memcpy2d   (-d, strided layout, rank 0 alone) the same by the driver's 2D copy in the strided
 *            layout itself (cuMemcpy2DAsync, rows of 8 bytes 16 apart): what touching every
 *            other double costs the GPU without MPI
 *
 * Every measurement is verified: first untimed round trips / a window whose bytes follow a
 * pattern of size, iteration and message, checked by the receiver byte by byte (the
 * strided layout's gaps must keep the receiver's poison); then the receive buffers are
 * poisoned again, the timed loop runs, and the receivers check what it left.
 * BENCH_P2P_CORRUPT=1 flips one received byte on rank 1 before its first check (to test
 * that a mismatch fails the run).
 *
 * No CUDA headers or libraries: the driver API is found with dlopen("libcuda.so.1").
 * Output on stdout (rank 0): '#' lines (key=value, or notes; "# MISMATCH ..." from either
 * rank), then CSV with a header, one line per measurement.  "# commlib_ipc_env=R0,R1" is
 * the COMMLIB_IPC each rank found in its environment ("unset" without one): the caller sets
 * it per run, and this line shows what really reached the ranks.
 * Usage: bench_p2p [-d] [-i] [-g] [-s SIZES] [-l LAYOUTS] [-t TARGET_MS] [-n MIN_ITERS] [-w WINDOW]
 *                  [-c WINDOW_MIB]
 *   -d  device memory (cuMemAlloc), and the memcpy rows     -g  rank r uses GPU r % count
 *   -i  device memory, rows labelled device-ipc and no memcpy rows (the -d run has them):
 *       the run under COMMLIB_IPC=1, GPU to GPU through CUDA IPC
 *   -s  message sizes in bytes, multiples of 8 (default 8,16,...,64 MiB)
 *   -l  contiguous,strided (default both)   -t  time per measurement (default 100 ms)
 *   -n  at least this many timed iterations (default 10)    -w  window (default 64)
 *   -c  the window's buffers span at most this many MiB per side (default 256): fewer
 *       messages per window for large sizes
 * Exit status: 0 all verified, 1 a mismatch, 2 error, 77 -d without a CUDA device. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct CUctx_st *CUcontext;
typedef struct CUstream_st *CUstream;
/* the driver's CUDA_MEMCPY2D, field for field */
struct memcpy2d {
    size_t src_x, src_y;
    int src_type; /* CUmemorytype: 2 device */
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
#define MEMORY_DEVICE 2

static struct {
    CUresult (*cuInit)(unsigned);
    CUresult (*cuDeviceGetCount)(int *);
    CUresult (*cuDeviceGet)(CUdevice *, int);
    CUresult (*cuDeviceGetName)(char *, int, CUdevice);
    CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *, CUdevice);
    CUresult (*cuCtxSetCurrent)(CUcontext);
    CUresult (*cuMemAlloc)(CUdeviceptr *, size_t);
    CUresult (*cuMemFree)(CUdeviceptr);
    CUresult (*cuMemcpyHtoD)(CUdeviceptr, const void *, size_t);
    CUresult (*cuMemcpyDtoH)(void *, CUdeviceptr, size_t);
    CUresult (*cuMemcpyAsync)(CUdeviceptr, CUdeviceptr, size_t, CUstream);
    CUresult (*cuMemcpy2DAsync)(const struct memcpy2d *, CUstream);
    CUresult (*cuStreamSynchronize)(CUstream);
} cu;

#define TAG_DATA 1
#define TAG_ACK 2
#define TAG_VERDICT 3
#define POISON 0xa5
#define GAP_FILL 0x3c
#define VERIFY_ROUNDS 2
#define MAX_SIZES 64

static int rank;

static void fail(const char *what, const char *why)
{
    fprintf(stderr, "bench_p2p: rank %d: %s failed: %s\n", rank, what, why);
    PMPI_Abort(MPI_COMM_WORLD, 2);
}

static void check(CUresult rc, const char *what)
{
    if (rc == 0) return;
    char why[32];
    snprintf(why, sizeof why, "CUDA error %d", rc);
    fail(what, why);
}

static void check_mpi(int rc, const char *what)
{
    if (rc == MPI_SUCCESS) return;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    PMPI_Error_string(rc, msg, &len);
    fail(what, msg);
}

/* 1 with a context current on GPU (spread ? rank % count : 0), its name in `name`. */
static int cuda_open(int spread, char *name, int len)
{
    void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!h) return 0;
#define SYM(field, sym) \
    if (!(*(void **)&cu.field = dlsym(h, sym))) return 0;
    SYM(cuInit, "cuInit") SYM(cuDeviceGetCount, "cuDeviceGetCount") SYM(cuDeviceGet, "cuDeviceGet")
    SYM(cuDeviceGetName, "cuDeviceGetName") SYM(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain")
    SYM(cuCtxSetCurrent, "cuCtxSetCurrent") SYM(cuMemAlloc, "cuMemAlloc_v2") SYM(cuMemFree, "cuMemFree_v2")
    SYM(cuMemcpyHtoD, "cuMemcpyHtoD_v2") SYM(cuMemcpyDtoH, "cuMemcpyDtoH_v2") SYM(cuMemcpyAsync, "cuMemcpyAsync")
    SYM(cuMemcpy2DAsync, "cuMemcpy2DAsync_v2") SYM(cuStreamSynchronize, "cuStreamSynchronize")
#undef SYM
    int count = 0;
    CUdevice dev;
    CUcontext ctx;
    if (cu.cuInit(0) || cu.cuDeviceGetCount(&count) || count < 1) return 0;
    if (cu.cuDeviceGet(&dev, spread ? rank % count : 0) || cu.cuDevicePrimaryCtxRetain(&ctx, dev) ||
        cu.cuCtxSetCurrent(ctx))
        return 0;
    cu.cuDeviceGetName(name, len, dev);
    return 1;
}

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* A buffer MPI sees (device or host memory) and its host image for filling and checking. */
struct buffer {
    char *ptr;      /* what MPI gets */
    char *image;    /* host: the same memory; device: a host copy */
    size_t bytes;
    int device;
};

static void buffer_alloc(struct buffer *b, size_t bytes, int device)
{
    b->bytes = bytes;
    b->device = device;
    b->image = malloc(bytes ? bytes : 1);
    if (!b->image) fail("malloc", "out of host memory");
    if (device) {
        CUdeviceptr d;
        check(cu.cuMemAlloc(&d, bytes ? bytes : 1), "cuMemAlloc");
        b->ptr = (char *)(uintptr_t)d;
    } else {
        b->ptr = b->image;
    }
}

static void buffer_free(struct buffer *b)
{
    if (b->device) cu.cuMemFree((CUdeviceptr)(uintptr_t)b->ptr);
    free(b->image);
}

static void upload(struct buffer *b, size_t off, size_t n)
{
    if (b->device) check(cu.cuMemcpyHtoD((CUdeviceptr)(uintptr_t)(b->ptr + off), b->image + off, n), "cuMemcpyHtoD");
}

static void download(struct buffer *b, size_t off, size_t n)
{
    if (b->device) check(cu.cuMemcpyDtoH(b->image + off, (CUdeviceptr)(uintptr_t)(b->ptr + off), n), "cuMemcpyDtoH");
}

/* One message: `bytes` of payload; strided: every other double of twice the span. */
struct layout {
    const char *name;
    int strided;
    size_t bytes, span, slot; /* payload, buffer bytes one message covers, bytes between messages */
    MPI_Datatype type;
    int count;
};

static void layout_make(struct layout *l, const char *name, size_t bytes)
{
    l->name = name;
    l->strided = !strcmp(name, "strided");
    l->bytes = bytes;
    if (l->strided) {
        int n = (int)(bytes / 8);
        check_mpi(MPI_Type_vector(n, 1, 2, MPI_DOUBLE, &l->type), "MPI_Type_vector");
        check_mpi(MPI_Type_commit(&l->type), "MPI_Type_commit");
        l->count = 1;
        l->span = bytes * 2 - 8;
        l->slot = bytes * 2;
    } else {
        l->type = MPI_BYTE;
        l->count = (int)bytes;
        l->span = l->slot = bytes;
    }
}

static unsigned char pattern(size_t j, unsigned seed)
{
    uint32_t x = (uint32_t)j * 0x9e3779b1u + seed * 0x85ebca6bu;
    x ^= x >> 15;
    x *= 0x2c1b3c6du;
    x ^= x >> 12;
    return (unsigned char)x;
}

static unsigned seed_of(size_t bytes, int iteration, int message)
{
    return (unsigned)bytes * 31u + (unsigned)iteration * 1009u + (unsigned)message * 7919u + 1u;
}

/* Payload byte j's offset in a message's span. */
static size_t payload_offset(const struct layout *l, size_t j)
{
    return l->strided ? (j / 8) * 16 + j % 8 : j;
}

/* The sender's messages 0..messages-1: pattern of (size, iteration, message), gaps filled. */
static void fill(struct buffer *b, const struct layout *l, int iteration, int messages)
{
    for (int m = 0; m < messages; m++) {
        char *base = b->image + (size_t)m * l->slot;
        if (l->strided) memset(base, GAP_FILL, l->slot);
        unsigned seed = seed_of(l->bytes, iteration, m);
        for (size_t j = 0; j < l->bytes; j++) base[payload_offset(l, j)] = (char)pattern(j, seed);
    }
    upload(b, 0, (size_t)messages * l->slot);
}

static void poison(struct buffer *b, const struct layout *l, int messages)
{
    memset(b->image, POISON, (size_t)messages * l->slot);
    upload(b, 0, (size_t)messages * l->slot);
}

static int corrupt_pending;

/* Mismatches in the receiver's messages 0..messages-1 (the first one reported). */
static int verify(struct buffer *b, const struct layout *l, int iteration, int messages, const char *memory,
                  const char *op)
{
    download(b, 0, (size_t)messages * l->slot);
    if (corrupt_pending) {
        corrupt_pending = 0;
        b->image[payload_offset(l, l->bytes / 2)] ^= 0x40;
    }
    for (int m = 0; m < messages; m++) {
        const unsigned char *base = (const unsigned char *)b->image + (size_t)m * l->slot;
        unsigned seed = seed_of(l->bytes, iteration, m);
        for (size_t off = 0; off < l->slot; off++) {
            int payload = !l->strided || (off % 16 < 8 && off < l->span);
            size_t j = l->strided ? (off / 16) * 8 + off % 8 : off;
            unsigned char want = payload ? pattern(j, seed) : POISON;
            if (base[off] == want) continue;
            char line[512];
            snprintf(line, sizeof line,
                     "# MISMATCH %s %s %s %zu bytes: rank %d, message %d of the window, byte %zu of its "
                     "buffer (%s): got 0x%02x, expected 0x%02x (iteration %d)\n",
                     memory, l->name, op, l->bytes, rank, m, off, payload ? "payload" : "a gap, must be untouched",
                     base[off], want, iteration);
            fputs(line, stdout);
            fputs(line + 2, stderr);
            fflush(stdout);
            return 1;
        }
    }
    return 0;
}

/* Rank 1's mismatches, added to rank 0's. */
static int combine(int mine)
{
    int theirs = 0;
    if (rank == 1) check_mpi(MPI_Send(&mine, 1, MPI_INT, 0, TAG_VERDICT, MPI_COMM_WORLD), "MPI_Send (verdict)");
    else check_mpi(MPI_Recv(&theirs, 1, MPI_INT, 1, TAG_VERDICT, MPI_COMM_WORLD, MPI_STATUS_IGNORE), "MPI_Recv (verdict)");
    return mine + theirs;
}

static int iterations_for(double target_ns, double one_ns, int min_iters, int max_iters)
{
    double n = target_ns / (one_ns > 1 ? one_ns : 1);
    int iters = n > max_iters ? max_iters : (int)n;
    if (iters < min_iters) iters = min_iters;
    check_mpi(MPI_Bcast(&iters, 1, MPI_INT, 0, MPI_COMM_WORLD), "MPI_Bcast"); /* rank 0's estimate counts */
    return iters;
}

static double round_trip(struct buffer *send, struct buffer *recv, const struct layout *l)
{
    double t0 = now_ns();
    if (rank == 0) {
        check_mpi(MPI_Send(send->ptr, l->count, l->type, 1, TAG_DATA, MPI_COMM_WORLD), "MPI_Send");
        check_mpi(MPI_Recv(recv->ptr, l->count, l->type, 1, TAG_DATA, MPI_COMM_WORLD, MPI_STATUS_IGNORE), "MPI_Recv");
    } else {
        check_mpi(MPI_Recv(recv->ptr, l->count, l->type, 0, TAG_DATA, MPI_COMM_WORLD, MPI_STATUS_IGNORE), "MPI_Recv");
        check_mpi(MPI_Send(send->ptr, l->count, l->type, 0, TAG_DATA, MPI_COMM_WORLD), "MPI_Send");
    }
    return now_ns() - t0;
}

static MPI_Request *requests;

static double window(struct buffer *send, struct buffer *recv, const struct layout *l, int w)
{
    char ack = 0;
    double t0 = now_ns();
    if (rank == 0) {
        for (int m = 0; m < w; m++)
            check_mpi(MPI_Isend(send->ptr + (size_t)m * l->slot, l->count, l->type, 1, TAG_DATA, MPI_COMM_WORLD,
                                &requests[m]), "MPI_Isend");
        check_mpi(MPI_Waitall(w, requests, MPI_STATUSES_IGNORE), "MPI_Waitall");
        check_mpi(MPI_Recv(&ack, 1, MPI_BYTE, 1, TAG_ACK, MPI_COMM_WORLD, MPI_STATUS_IGNORE), "MPI_Recv (ack)");
    } else {
        for (int m = 0; m < w; m++)
            check_mpi(MPI_Irecv(recv->ptr + (size_t)m * l->slot, l->count, l->type, 0, TAG_DATA, MPI_COMM_WORLD,
                                &requests[m]), "MPI_Irecv");
        check_mpi(MPI_Waitall(w, requests, MPI_STATUSES_IGNORE), "MPI_Waitall");
        check_mpi(MPI_Send(&ack, 1, MPI_BYTE, 0, TAG_ACK, MPI_COMM_WORLD), "MPI_Send (ack)");
    }
    return now_ns() - t0;
}

static double *times;
static int times_cap;

static void print_row(const char *memory, const struct layout *l, const char *op, int iters, int w, double med,
                      double lo, int mismatches)
{
    if (rank != 0) return;
    printf("%s,%s,%s,%zu,%zu,%d,%d,%.1f,%.1f,%s\n", memory, l->name, op, l->bytes, l->span, iters, w, med, lo,
           mismatches ? "MISMATCH" : "ok");
    fflush(stdout);
}

static double lowest(const double *v, int n)
{
    double lo = v[0];
    for (int i = 1; i < n; i++)
        if (v[i] < lo) lo = v[i];
    return lo;
}

/* Ping-pong: verified round trips, then timed ones; the receivers check what they got. */
static int measure_latency(const char *memory, struct buffer *send, struct buffer *recv, const struct layout *l,
                           double target_ns, int min_iters)
{
    int bad = 0, peer_iteration = 0;
    for (int k = 0; k < VERIFY_ROUNDS; k++) {
        /* rank 0 sends iteration 2k, rank 1 answers with 2k+1 */
        int mine = 2 * k + rank, theirs = 2 * k + 1 - rank;
        fill(send, l, mine, 1);
        poison(recv, l, 1);
        round_trip(send, recv, l);
        bad += verify(recv, l, theirs, 1, memory, "latency");
        peer_iteration = theirs;
    }
    double warm = 0;
    for (int k = 0; k < 3; k++) warm = round_trip(send, recv, l);
    int iters = iterations_for(target_ns, warm, min_iters, times_cap);
    poison(recv, l, 1);
    MPI_Barrier(MPI_COMM_WORLD);
    for (int i = 0; i < iters; i++) times[i] = round_trip(send, recv, l) / 2;
    bad += verify(recv, l, peer_iteration, 1, memory, "latency");
    bad = combine(bad);
    double lo = lowest(times, iters);
    print_row(memory, l, "latency", iters, 1, median(times, iters), lo, bad);
    return bad;
}

/* Windows of w messages: a verified window, then timed ones; rank 1 checks every message. */
static int measure_bandwidth(const char *memory, struct buffer *send, struct buffer *recv, const struct layout *l,
                             int w, double target_ns, int min_iters)
{
    int bad = 0;
    if (rank == 0) fill(send, l, 0, w);
    else poison(recv, l, w);
    window(send, recv, l, w);
    if (rank == 1) bad += verify(recv, l, 0, w, memory, "bandwidth");
    double warm = 0;
    for (int k = 0; k < 2; k++) warm = window(send, recv, l, w);
    int reps = iterations_for(target_ns, warm, min_iters, times_cap);
    if (rank == 1) poison(recv, l, w);
    MPI_Barrier(MPI_COMM_WORLD);
    for (int i = 0; i < reps; i++) times[i] = window(send, recv, l, w);
    if (rank == 1) bad += verify(recv, l, 0, w, memory, "bandwidth");
    bad = combine(bad);
    double lo = lowest(times, reps);
    print_row(memory, l, "bandwidth", reps, w, median(times, reps), lo, bad);
    return bad;
}

/* `copies` messages of l copied device to device and synchronised: contiguous ones by
 * cuMemcpyAsync, strided ones by the driver's own 2D copy (rows of one double, 16 bytes apart) */
static void copy_all(CUdeviceptr d, CUdeviceptr s, const struct layout *l, int copies)
{
    for (int m = 0; m < copies; m++) {
        CUdeviceptr to = d + (size_t)m * l->slot, from = s + (size_t)m * l->slot;
        if (l->strided) {
            struct memcpy2d c = {.src_type = MEMORY_DEVICE, .src_device = from, .src_pitch = 16,
                                 .dst_type = MEMORY_DEVICE, .dst_device = to, .dst_pitch = 16,
                                 .width = 8, .height = l->bytes / 8};
            check(cu.cuMemcpy2DAsync(&c, NULL), "cuMemcpy2DAsync");
        } else {
            check(cu.cuMemcpyAsync(to, from, l->bytes, NULL), "cuMemcpyAsync");
        }
    }
    check(cu.cuStreamSynchronize(NULL), "cuStreamSynchronize");
}

/* Rank 0 alone: device-to-device copies of the same bytes (rank 1 waits at the barrier):
 * "memcpy" contiguous, "memcpy2d" in l's strided layout. */
static int measure_memcpy(struct buffer *src, struct buffer *dst, const struct layout *l, int w, double target_ns,
                          int min_iters)
{
    int bad = 0;
    const char *label = l->strided ? "memcpy2d" : "memcpy";
    if (rank == 0) {
        CUdeviceptr s = (CUdeviceptr)(uintptr_t)src->ptr, d = (CUdeviceptr)(uintptr_t)dst->ptr;
        for (int op = 0; op < 2; op++) {
            int copies = op == 0 ? 1 : w;
            fill(src, l, 0, copies);
            poison(dst, l, copies);
            double one = 0;
            for (int k = 0; k < 3; k++) {
                double t0 = now_ns();
                copy_all(d, s, l, copies);
                one = now_ns() - t0;
            }
            double n = target_ns / (one > 1 ? one : 1);
            int iters = n > times_cap ? times_cap : n < min_iters ? min_iters : (int)n;
            poison(dst, l, copies);
            for (int i = 0; i < iters; i++) {
                double t0 = now_ns();
                copy_all(d, s, l, copies);
                times[i] = now_ns() - t0;
            }
            int wrong = verify(dst, l, 0, copies, label, op == 0 ? "latency" : "bandwidth");
            bad += wrong;
            double lo = lowest(times, iters);
            print_row(label, l, op == 0 ? "latency" : "bandwidth", iters, copies, median(times, iters), lo, wrong);
        }
    }
    MPI_Barrier(MPI_COMM_WORLD);
    return bad;
}

static int parse_sizes(const char *text, size_t *sizes)
{
    int n = 0;
    const char *p = text;
    while (*p) {
        char *end;
        unsigned long long v = strtoull(p, &end, 10);
        if (end == p || v < 8 || v % 8 || v > (1ull << 31) - 8 || n == MAX_SIZES) return -1;
        sizes[n++] = (size_t)v;
        p = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') return -1;
    }
    return n;
}

static void usage(void)
{
    fprintf(stderr, "usage: bench_p2p [-d] [-i] [-g] [-s SIZES] [-l contiguous,strided] [-t TARGET_MS] [-n MIN_ITERS] "
                    "[-w WINDOW] [-c WINDOW_MIB]\n");
}

int main(int argc, char **argv)
{
    int device = 0, ipc = 0, spread = 0, min_iters = 10, max_window = 64, opt;
    double target_ms = 100;
    long long window_mib = 256;
    size_t sizes[MAX_SIZES];
    int n_sizes = 0;
    for (size_t s = 8; s <= (64u << 20); s *= 2) sizes[n_sizes++] = s;
    const char *layouts = "contiguous,strided";
    while ((opt = getopt(argc, argv, "digs:l:t:n:w:c:")) != -1) {
        switch (opt) {
        case 'd': device = 1; break;
        case 'i': device = ipc = 1; break;
        case 'g': spread = 1; break;
        case 's': n_sizes = parse_sizes(optarg, sizes); break;
        case 'l': layouts = optarg; break;
        case 't': target_ms = atof(optarg); break;
        case 'n': min_iters = atoi(optarg); break;
        case 'w': max_window = atoi(optarg); break;
        case 'c': window_mib = atoll(optarg); break;
        default: usage(); return 2;
        }
    }
    int contiguous = strstr(layouts, "contiguous") != NULL, strided = strstr(layouts, "strided") != NULL;
    if (n_sizes < 1 || target_ms <= 0 || min_iters < 1 || max_window < 1 || window_mib < 1 || !(contiguous || strided)) {
        usage();
        return 2;
    }
    MPI_Init(&argc, &argv);
    int nranks;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    if (nranks != 2) {
        if (rank == 0) fprintf(stderr, "bench_p2p: run on two ranks (got %d)\n", nranks);
        MPI_Finalize();
        return 2;
    }
    const char *corrupt = getenv("BENCH_P2P_CORRUPT");
    corrupt_pending = rank == 1 && corrupt && *corrupt && strcmp(corrupt, "0");
    long long (*commlib_stat)(const char *) = (long long (*)(const char *))dlsym(RTLD_DEFAULT, "commlib_stat");
    size_t (*stats_json)(char *, size_t) = (size_t (*)(char *, size_t))dlsym(RTLD_DEFAULT, "commlib_stats_json");
    const char *memory = ipc ? "device-ipc" : device ? "device" : "host";
    /* What reached each rank (a launcher may or may not pass the caller's environment on). */
    char my_ipc_env[32], ipc_env[2][32];
    const char *knob = getenv("COMMLIB_IPC");
    snprintf(my_ipc_env, sizeof my_ipc_env, "%s", knob ? knob : "unset");
    for (char *p = my_ipc_env; *p; p++)
        if (*p == ',' || *p == ' ' || *p == '\n') *p = '_';
    check_mpi(MPI_Gather(my_ipc_env, (int)sizeof my_ipc_env, MPI_CHAR, ipc_env, (int)sizeof my_ipc_env, MPI_CHAR, 0,
                         MPI_COMM_WORLD), "MPI_Gather (COMMLIB_IPC)");

    char name[256] = "none";
    if (device) {
        int have = cuda_open(spread, name, sizeof name), everyone = 0;
        MPI_Allreduce(&have, &everyone, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
        if (!everyone) {
            if (rank == 0) printf("# no CUDA device: nothing measured\n");
            MPI_Finalize();
            return 77;
        }
    }
    if (rank == 0) {
        char version[MPI_MAX_LIBRARY_VERSION_STRING];
        int vlen = 0;
        PMPI_Get_library_version(version, &vlen);
        for (char *p = version; *p; p++)
            if (*p == '\n' || *p == '\r') *p = ' ';
        printf("# mpi_library=%.200s\n# memory=%s\n# device=%s\n# commlib=%s\n# target_ms=%g\n# min_iters=%d\n"
               "# window=%d\n# window_mib=%lld\n# commlib_ipc_env=%s,%s\n",
               version, memory, name, commlib_stat ? "preloaded" : "absent", target_ms, min_iters, max_window,
               window_mib, ipc_env[0], ipc_env[1]);
        if (device && !commlib_stat)
            printf("# commlib is not preloaded: device pointers go to the host MPI as they are\n");
    }

    size_t cap = (size_t)window_mib << 20, side = 0;
    for (int i = 0; i < n_sizes; i++) {
        for (int s = 0; s < 2; s++) {
            size_t slot = sizes[i] * (s ? 2 : 1);
            if ((s ? !strided : !contiguous)) continue;
            size_t w = cap / slot < (size_t)max_window ? cap / slot : (size_t)max_window;
            if (w < 1) w = 1;
            if (w * slot > side) side = w * slot;
        }
    }
    struct buffer send, recv;
    buffer_alloc(&send, side, device);
    buffer_alloc(&recv, side, device);
    times_cap = 100000;
    times = malloc(sizeof(double) * (size_t)times_cap);
    requests = malloc(sizeof(MPI_Request) * (size_t)max_window);
    if (!times || !requests) fail("malloc", "out of host memory");
    if (rank == 0) {
        printf("memory,layout,op,bytes,span_bytes,iters,window,time_ns,min_ns,verified\n");
        fflush(stdout);
    }

    double target_ns = target_ms * 1e6;
    int bad = 0;
    for (int i = 0; i < n_sizes; i++) {
        for (int s = 0; s < 2; s++) {
            if (s ? !strided : !contiguous) continue;
            struct layout l;
            layout_make(&l, s ? "strided" : "contiguous", sizes[i]);
            size_t w = cap / l.slot < (size_t)max_window ? cap / l.slot : (size_t)max_window;
            if (w < 1) w = 1;
            if (device && !ipc && (s == 0 || !contiguous)) { /* the copies move the payload bytes, contiguous */
                struct layout plain;
                layout_make(&plain, "contiguous", sizes[i]);
                size_t wc = cap / plain.slot < (size_t)max_window ? cap / plain.slot : (size_t)max_window;
                bad += measure_memcpy(&send, &recv, &plain, wc < 1 ? 1 : (int)wc, target_ns, min_iters);
            }
            if (device && !ipc && l.strided) /* the driver's own strided copy: the layout's baseline */
                bad += measure_memcpy(&send, &recv, &l, (int)w, target_ns, min_iters);
            bad += measure_latency(memory, &send, &recv, &l, target_ns, min_iters);
            bad += measure_bandwidth(memory, &send, &recv, &l, (int)w, target_ns, min_iters);
            if (l.strided) MPI_Type_free(&l.type);
        }
    }
    if (rank == 0 && stats_json) {
        char stats[16384];
        if (stats_json(stats, sizeof stats) > 0) {
            for (char *p = stats; *p; p++)
                if (*p == '\n') *p = ' ';
            printf("# commlib_stats=%s\n", stats);
        }
    }
    buffer_free(&send);
    buffer_free(&recv);
    free(times);
    free(requests);
    MPI_Finalize();
    return bad ? 1 : 0;
}
