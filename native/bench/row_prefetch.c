/* The prefetch question of native/pack/host_pack.c's row kernels, alone: one packing loop
 * of B-byte blocks `stride` apart as host_pack.c writes it (16 blocks unrolled; 8 for
 * 24-byte blocks), with its prefetches 16 blocks ahead, without them, and as a plain
 * loop, warm (packed over and over) and cold (after 256 MiB of other writes); best of 60
 * (cold 15) per variant, the variants interleaved.  The loop is a deliberate copy of
 * host_pack.c's ROW_KERNELS with the prefetch made a switch (there it is fixed per block
 * size); change both together.  Not built by setup.py:
 *
 *   gcc -O3 -o /tmp/row_prefetch native/bench/row_prefetch.c && /tmp/row_prefetch
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define UNROLLED _Pragma("GCC unroll 16")
#define UNMERGED(B, p)                    \
    do {                                  \
        if (B < 8) __asm__("" : "+r"(p)); \
    } while (0)

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

typedef void (*row_fn)(char *, const char *, int64_t, int64_t);

/* NAME_pf: with the prefetches, NAME_no: without, NAME_plain: a plain loop */
#define KERNELS(NAME, B, BATCH)                                                                   \
    static void NAME##_body(char *restrict packed, const char *restrict typed, int64_t n,        \
                            int64_t stride, int prefetch)                                         \
    {                                                                                             \
        enum { batch = BATCH, ahead = 16 };                                                       \
        int64_t i = 0;                                                                            \
        if (prefetch)                                                                             \
            for (; i + ahead + batch <= n; i += batch, packed += batch * B, typed += batch * stride) \
                UNROLLED for (int k = 0; k < batch; k++) {                                        \
                    __builtin_prefetch(typed + (ahead + k) * stride, 0, 3);                       \
                    memcpy(packed + k * B, typed + k * stride, B);                                \
                    UNMERGED(B, packed);                                                          \
                }                                                                                 \
        for (; i + batch <= n; i += batch, packed += batch * B, typed += batch * stride)          \
            UNROLLED for (int k = 0; k < batch; k++) {                                            \
                memcpy(packed + k * B, typed + k * stride, B);                                    \
                UNMERGED(B, packed);                                                              \
            }                                                                                     \
        for (; i < n; i++, packed += B, typed += stride) memcpy(packed, typed, B);                \
    }                                                                                             \
    __attribute__((noinline)) static void NAME##_pf(char *p, const char *t, int64_t n, int64_t s) \
    {                                                                                             \
        NAME##_body(p, t, n, s, 1);                                                               \
    }                                                                                             \
    __attribute__((noinline)) static void NAME##_no(char *p, const char *t, int64_t n, int64_t s) \
    {                                                                                             \
        NAME##_body(p, t, n, s, 0);                                                               \
    }                                                                                             \
    __attribute__((noinline)) static void NAME##_plain(char *restrict packed, const char *restrict typed, \
                                                       int64_t n, int64_t stride)                 \
    {                                                                                             \
        for (int64_t i = 0; i < n; i++) memcpy(packed + i * B, typed + i * stride, B);            \
    }

KERNELS(b1, 1, 16)
KERNELS(b2, 2, 16)
KERNELS(b8, 8, 16)
KERNELS(b24, 24, 8)

int main(void)
{
    enum { JUNK = 256 << 20 };
    char *junk = malloc(JUNK);
    memset(junk, 2, JUNK);
    static const struct {
        int block;
        row_fn variant[3];
    } kernels[] = {{1, {b1_pf, b1_no, b1_plain}},
                   {2, {b2_pf, b2_no, b2_plain}},
                   {8, {b8_pf, b8_no, b8_plain}},
                   {24, {b24_pf, b24_no, b24_plain}}};
    static const struct {
        int64_t packed_bytes, stride;
        int cold;
    } cases[] = {{1024, 512, 0}, {4 << 20, 512, 0}, {512 << 10, 2048, 1}, {512 << 10, 2048, 0}, {64 << 10, 2048, 1}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
        for (size_t k = 0; k < sizeof kernels / sizeof kernels[0]; k++) {
            int64_t block = kernels[k].block, n = cases[c].packed_bytes / block, stride = cases[c].stride;
            int cold = cases[c].cold;
            char *typed = malloc((size_t)(n * stride + 64)), *packed = malloc((size_t)(n * block));
            memset(typed, 1, (size_t)(n * stride));
            double best[3] = {1e9, 1e9, 1e9};
            for (int round = 0; round < (cold ? 15 : 60); round++)
                for (int v = 0; v < 3; v++) {
                    if (cold) memset(junk, round, JUNK);
                    int reps = cold ? 1 : n < 10000 ? 200 : 3;
                    double t = now();
                    for (int r = 0; r < reps; r++) kernels[k].variant[v](packed, typed, n, stride);
                    t = (now() - t) / reps;
                    if (t < best[v]) best[v] = t;
                }
            printf("B=%2d n=%8ld stride=%5ld %s  prefetch %9.3f us  none %9.3f  plain %9.3f  (pf/none %.2f)\n",
                   (int)block, (long)n, (long)stride, cold ? "cold" : "warm", best[0] * 1e6, best[1] * 1e6,
                   best[2] * 1e6, best[0] / best[1]);
            free(typed);
            free(packed);
        }
    free(junk);
    return 0;
}
