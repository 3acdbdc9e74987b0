/* The unpack prefetch question of native/pack/host_pack.c (UNPACK_PREFETCH), alone:
 * unpacking 8-byte blocks S bytes apart (rows of 512, 64 Ki blocks, as an x face of a halo
 * grid is unpacked) with the 16-block unrolled loop, with and without a write prefetch 16
 * blocks ahead; warm (unpacked over and over) and cold (after reading 600 MiB); best of 9,
 * the variants interleaved.  Not built by setup.py:
 *
 *   gcc -O3 -o /tmp/unpack_prefetch native/bench/unpack_prefetch.c && /tmp/unpack_prefetch
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ROW 512      /* blocks per row */
#define BLOCKS 65536 /* blocks per timed pass (fewer when they would not fit) */
#define SPAN (512ul << 20)
#define EVICT (600ul << 20)

static double now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec * 1e-3;
}

/* host_pack.c's unpack_row_8 without the prefetch ... */
static void unpack_plain(char *restrict typed, const char *restrict packed, int64_t n, int64_t stride)
{
    int64_t i = 0;
    for (; i + 16 <= n; i += 16, packed += 128, typed += 16 * stride)
        _Pragma("GCC unroll 16") for (int k = 0; k < 16; k++) memcpy(typed + k * stride, packed + k * 8, 8);
    for (; i < n; i++, packed += 8, typed += stride) memcpy(typed, packed, 8);
}

/* ... and with it */
static void unpack_prefetch(char *restrict typed, const char *restrict packed, int64_t n, int64_t stride)
{
    int64_t i = 0;
    for (; i + 32 <= n; i += 16, packed += 128, typed += 16 * stride)
        _Pragma("GCC unroll 16") for (int k = 0; k < 16; k++) {
            __builtin_prefetch(typed + (16 + k) * stride, 1, 3);
            memcpy(typed + k * stride, packed + k * 8, 8);
        }
    for (; i + 16 <= n; i += 16, packed += 128, typed += 16 * stride)
        _Pragma("GCC unroll 16") for (int k = 0; k < 16; k++) memcpy(typed + k * stride, packed + k * 8, 8);
    for (; i < n; i++, packed += 8, typed += stride) memcpy(typed, packed, 8);
}

typedef void (*unpack_fn)(char *, const char *, int64_t, int64_t);

static double sink;

static void evict(const char *buf)
{
    double s = 0;
    for (size_t i = 0; i < EVICT; i += 64) s += buf[i];
    sink += s;
}

static void pass(unpack_fn f, char *grid, const char *packed, long blocks, long stride)
{
    for (long b = 0; b < blocks; b += ROW) f(grid + b * stride, packed + b * 8, ROW, stride);
}

int main(void)
{
    char *grid = malloc(SPAN), *other = malloc(EVICT), *packed = malloc(BLOCKS * 8);
    if (!grid || !other || !packed) return 1;
    memset(grid, 1, SPAN);
    memset(other, 3, EVICT);
    memset(packed, 2, BLOCKS * 8);
    static const long strides[] = {256, 512, 1024, 2064, 3000, 4112};
    unpack_fn variants[2] = {unpack_plain, unpack_prefetch};
    printf("8-byte blocks unpacked, %d-block rows, up to %d blocks; best of 9, ns per block\n", ROW, BLOCKS);
    for (size_t si = 0; si < sizeof strides / sizeof *strides; si++) {
        long stride = strides[si], blocks = BLOCKS;
        if ((size_t)(blocks * stride) > SPAN) blocks = (long)(SPAN / stride) / ROW * ROW;
        double warm[2] = {1e30, 1e30}, cold[2] = {1e30, 1e30};
        for (int r = 0; r < 9; r++)
            for (int v = 0; v < 2; v++) {
                pass(variants[v], grid, packed, blocks, stride);
                double t0 = now_us();
                for (int k = 0; k < 5; k++) pass(variants[v], grid, packed, blocks, stride);
                double ns = (now_us() - t0) / 5 * 1e3 / blocks;
                if (ns < warm[v]) warm[v] = ns;
                evict(other);
                t0 = now_us();
                pass(variants[v], grid, packed, blocks, stride);
                ns = (now_us() - t0) * 1e3 / blocks;
                if (ns < cold[v]) cold[v] = ns;
            }
        printf("stride %5ld: warm %.2f -> %.2f with prefetch   cold %.2f -> %.2f\n", stride, warm[0], warm[1],
               cold[0], cold[1]);
    }
    printf("(sink %g)\n", sink);
    return 0;
}
