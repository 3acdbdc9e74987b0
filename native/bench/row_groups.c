/* How to copy rows of 2-4 KiB that lie far from each other - a halo grid's y face: 1-3 rows
 * of N doubles, then a jump of a whole plane - against rows back to back (a z face), out of
 * cache and warm, four ways: the C library's memcpy (what Open MPI calls per block), a
 * forward loop of 32-byte moves, that loop prefetching 256 bytes ahead (host_pack.c's
 * streaming copy) and the last 128 bytes loaded first, then the rest forward (host_pack.c's
 * copy_block_avx2_tail_first, COMMLIB_TAIL_FIRST).  The grid is double a[Q][N+2R]^3, x
 * fastest, as in examples/halo3d.c; pack reads the interior strip next to the low side,
 * unpack writes the halo strip.  Per face, the variants interleaved, REPS rounds: cold is
 * the median of single passes after reading 256 MiB, warm the best of 5 passes right after.
 * Not built by setup.py:
 *
 *   gcc -O2 -o /tmp/row_groups native/bench/row_groups.c && /tmp/row_groups [REPS] [y|z] [N]
 *
 * Output: one line per face and direction, "variant cold/warm" in microseconds.
 * Dev VM, AMD EPYC Zen 5, 2026-12-04, N=256, cold, the 12 faces' range (us): y faces memcpy
 * 38-494, forward 56-731, streaming 61-752, tail first 42-469 (unpacks 0.85-0.95x memcpy's
 * time); z faces memcpy 35-450, forward 27-339, streaming 28-323, tail first 27-346. */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define EVICT (256ul << 20)
#define MAX_REPS 64

static double now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static volatile double sink;
static char *evict_buf;

static void evict(void)
{
    double s = 0;
    for (size_t i = 0; i < EVICT; i += 64) s += evict_buf[i];
    sink += s;
}

#define STEP(d, s) _mm256_storeu_si256((__m256i *)(void *)(d), _mm256_loadu_si256((const __m256i *)(const void *)(s)))

__attribute__((target("avx2"))) static inline void copy_forward(char *restrict dst, const char *restrict src,
                                                                int64_t block)
{
    int64_t w = 0;
    for (; w + 64 <= block; w += 64) {
        STEP(dst + w, src + w);
        STEP(dst + w + 32, src + w + 32);
        __asm__("" : "+r"(w));
    }
    for (; w + 32 <= block; w += 32) STEP(dst + w, src + w);
    if (w < block) memcpy(dst + w, src + w, (size_t)(block - w));
}

__attribute__((target("avx2"))) static void copy_stream(char *restrict dst, const char *restrict src, int64_t block)
{
    int64_t w = 0;
    for (; w + 64 <= block; w += 64) {
        __builtin_prefetch(src + w + 256, 0, 3);
        __builtin_prefetch(dst + w + 256, 1, 3);
        STEP(dst + w, src + w);
        STEP(dst + w + 32, src + w + 32);
        __asm__("" : "+r"(w));
    }
    if (w < block) copy_forward(dst + w, src + w, block - w);
}

__attribute__((target("avx2"))) static void copy_tail_first(char *restrict dst, const char *restrict src,
                                                             int64_t block)
{
    const char *end = src + block;
    __m256i t0 = _mm256_loadu_si256((const __m256i *)(const void *)(end - 128));
    __m256i t1 = _mm256_loadu_si256((const __m256i *)(const void *)(end - 96));
    __m256i t2 = _mm256_loadu_si256((const __m256i *)(const void *)(end - 64));
    __m256i t3 = _mm256_loadu_si256((const __m256i *)(const void *)(end - 32));
    __asm__ volatile("" : "+x"(t0), "+x"(t1), "+x"(t2), "+x"(t3));
    copy_forward(dst, src, block - 128);
    char *tail = dst + block - 128;
    _mm256_storeu_si256((__m256i *)(void *)tail, t0);
    _mm256_storeu_si256((__m256i *)(void *)(tail + 32), t1);
    _mm256_storeu_si256((__m256i *)(void *)(tail + 64), t2);
    _mm256_storeu_si256((__m256i *)(void *)(tail + 96), t3);
}

static void copy_memcpy(char *restrict dst, const char *restrict src, int64_t block)
{
    memcpy(dst, src, (size_t)block);
}

typedef void (*copy_fn)(char *, const char *, int64_t);
static const copy_fn copies[] = {copy_memcpy, copy_forward, copy_stream, copy_tail_first};
static const char *names[] = {"memcpy", "forward", "streaming", "tail-first"};
enum { VARIANTS = 4 };

static int N, Q, R, z_face;
static int64_t row_bytes, row_stride, plane_stride, q_stride;
static char *grid, *packed_buf;

/* One face, packed (typed -> packed_buf) or unpacked, every row through `copy`. */
static void face(copy_fn copy, int unpack)
{
    char *packed = packed_buf;
    int64_t lo = unpack ? 0 : R; /* the halo strip, or the interior strip next to it */
    int planes = z_face ? R : N, rows = z_face ? N : R;
    char *first = grid + (z_face ? lo * plane_stride + R * row_stride : R * plane_stride + lo * row_stride) + R * 8;
    for (int q = 0; q < Q; q++)
        for (int p = 0; p < planes; p++)
            for (int r = 0; r < rows; r++, packed += row_bytes) {
                char *row = first + q * q_stride + p * plane_stride + r * row_stride;
                if (unpack) copy(row, packed, row_bytes);
                else copy(packed, row, row_bytes);
            }
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    int reps = argc > 1 ? atoi(argv[1]) : 15;
    z_face = argc > 2 && argv[2][0] == 'z';
    N = argc > 3 ? atoi(argv[3]) : 256;
    if (reps < 1 || reps > MAX_REPS || N < 16) {
        fprintf(stderr, "usage: row_groups [REPS 1-%d] [y|z] [N >= 16]\n", MAX_REPS);
        return 2;
    }
    evict_buf = malloc(EVICT);
    memset(evict_buf, 1, EVICT);
    printf("# %s faces of N=%d grids, %d rounds; per variant: cold median / warm best, us\n", z_face ? "z" : "y", N,
           reps);
    for (Q = 1; Q <= (N > 256 ? 1 : 4); Q += 3)
        for (R = 1; R <= 3; R++) {
            int64_t g = N + 2 * R;
            row_bytes = N * 8;
            row_stride = g * 8;
            plane_stride = g * row_stride;
            q_stride = g * plane_stride;
            grid = aligned_alloc(4096, (size_t)(q_stride * Q));
            packed_buf = aligned_alloc(4096, (size_t)(row_bytes * R * N * Q));
            if (!grid || !packed_buf) return 2;
            memset(grid, 2, (size_t)(q_stride * Q));
            memset(packed_buf, 3, (size_t)(row_bytes * R * N * Q));
            for (int unpack = 0; unpack < 2; unpack++) {
                double cold[VARIANTS][MAX_REPS], warm[VARIANTS];
                for (int v = 0; v < VARIANTS; v++) warm[v] = 1e30;
                for (int rep = 0; rep < reps; rep++)
                    for (int v = 0; v < VARIANTS; v++) {
                        evict();
                        double t0 = now_ns();
                        face(copies[v], unpack);
                        cold[v][rep] = now_ns() - t0;
                        t0 = now_ns();
                        for (int k = 0; k < 5; k++) face(copies[v], unpack);
                        double w = (now_ns() - t0) / 5;
                        if (w < warm[v]) warm[v] = w;
                    }
                printf("q%d r%d %-6s", Q, R, unpack ? "unpack" : "pack");
                for (int v = 0; v < VARIANTS; v++) {
                    qsort(cold[v], (size_t)reps, sizeof(double), cmp_double);
                    printf("  %s %.0f/%.0f", names[v], cold[v][reps / 2] / 1e3, warm[v] / 1e3);
                }
                printf("\n");
                fflush(stdout);
            }
            free(grid);
            free(packed_buf);
        }
    return 0;
}
