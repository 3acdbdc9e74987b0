/* How fast 8-byte blocks far apart are gathered, batch after batch, by four loops: a call of
 * the C library's memcpy a block (Open MPI's pack of such blocks, and commlib's where
 * COMMLIB_ALIASED_CALLS / COMMLIB_LONG_ROWS choose it), one block a step inline (MPICH's yaksa
 * loop), 4 a step and 16 a step unrolled (host_pack.c's row kernels); and a fifth that only
 * loads the blocks, one a step (l: no stores at all).  A 256^3 grid's faces
 * are such rows: the z face of radius 1 (65536 blocks 2 KiB apart, 128 MiB) and the x face
 * (2064 apart with ghost cells).  SEQUENCE names the loop of each batch, in order (c, 1, 4,
 * s, l); a batch is REPS passes over the blocks, and its best pass is printed, so that a line
 * shows how the speed of one loop moves over time in one process, and how a loop run before
 * another (the other side of `commlib bench pack`, in the same process) changes it.
 *
 *   gcc -O2 -o /tmp/block_modes native/bench/block_modes.c
 *   /tmp/block_modes [SEQUENCE [STRIDE [BLOCKS [REPS]]]]     (default cccc 2048 65536 20)
 *
 * Output: one line per batch, "loop best_us mean_us".
 *
 * Dev VM (a Firecracker guest: Intel Xeon with AVX-512 and AMX, 4 KiB pages, no THP; 2026-12-06),
 * blocks 2048 apart (best pass of each batch, us):
 *   cccccccccccccccc     488-540 in every batch, 6 processes
 *   ssssssssssssssss     532-667 or 884-992, changing from batch to batch (4-12 slow of 16)
 *   1111111111111111     524-613 (two processes' first one or two batches 931-1082)
 *   4444444444444444     530-685, 1-7 batches of 16 at 787-984
 *   ccccscccc            c 497-520 before, 829-966 after (s itself 529-539), 3 of 3
 *   cccc1cccc            c 505-520 before, 827-973 after, 3 of 3 (one from the 2nd batch)
 *   cccc4cccc            the same in 2 of 3
 * So after an inline loop over these blocks the `memcpy` loop of the same process runs at half
 * speed, batch after batch, where a process running only it never does.  The state is the
 * core's: a `memcpy` process (REPS 200) beside a `ssssss` one on the other core kept 522-561, but
 * with both pinned to one core (`taskset -c 0`) it went to 819-985 while the other ran, in one of
 * two tries also for good after it ended.  The state also comes and goes with the hour: the
 * figures above are from 17:40-18:30 UTC; at about 20:00 `ccccscccc` kept c at 495-620 in 3 of 3 and
 * `cccclcccc` went slow after l in 1 of 5.  What it is was not found (no PMU in the guest).
 * `commlib bench pack` runs both sides in one process, so for such shapes (`face_z_t1`) the
 * ratio reports this state as much as the loops: against Open MPI (a call a block) 0.77-1.08x
 * with commlib's 16 a step,
 * where both sides ran 800-1050 us; 0.96-0.99x, both 490-620 us, with a call a block on both
 * sides (knob changed by a test build).  At 2064 apart (a 256^3 halo grid's x face, ghost
 * cells) no such state: memcpy 410-480, 16 a step 419-446, one a step 395-412, 4 a step 404-430
 * - but in `commlib bench pack` one a step took the x faces of radius 1 packed cold from
 * 1.19-1.76x to 1.02-1.09x MPICH's pack (warm within noise), so 16 a step stays. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec * 1e-3;
}

static void *(*volatile copy_call)(void *, const void *, size_t) = memcpy; /* never inlined */
static long blocks = 65536, stride = 2048;

__attribute__((noinline)) static void by_calls(char *packed, const char *typed)
{
    for (long i = 0; i < blocks; i++, packed += 8, typed += stride) copy_call(packed, typed, 8);
}

static volatile uint64_t sink;
__attribute__((noinline)) static void loads_only(char *packed, const char *typed)
{
    (void)packed;
    uint64_t sum = 0;
    for (long i = 0; i < blocks; i++, typed += stride) {
        uint64_t v;
        memcpy(&v, typed, 8);
        sum += v;
        __asm__ volatile("" ::: "memory");
    }
    sink = sum;
}

__attribute__((noinline)) static void one_a_step(char *restrict packed, const char *restrict typed)
{
    for (long i = 0; i < blocks; i++, packed += 8, typed += stride) {
        memcpy(packed, typed, 8);
        __asm__ volatile("" ::: "memory"); /* or GCC unrolls it */
    }
}

#define UNROLLED_LOOP(NAME, K)                                                                     \
    __attribute__((noinline)) static void NAME(char *restrict packed, const char *restrict typed) \
    {                                                                                              \
        long i = 0;                                                                                \
        for (; i + K <= blocks; i += K, packed += K * 8, typed += K * stride)                      \
            _Pragma("GCC unroll 16") for (int k = 0; k < K; k++)                                   \
                memcpy(packed + k * 8, typed + k * stride, 8);                                     \
        for (; i < blocks; i++, packed += 8, typed += stride) memcpy(packed, typed, 8);            \
    }
UNROLLED_LOOP(four_a_step, 4)
UNROLLED_LOOP(sixteen_a_step, 16)

int main(int argc, char **argv)
{
    const char *sequence = argc > 1 ? argv[1] : "cccc";
    if (argc > 2) stride = atol(argv[2]);
    if (argc > 3) blocks = atol(argv[3]);
    int reps = argc > 4 ? atoi(argv[4]) : 20;
    if (stride < 8 || blocks < 1 || reps < 1) {
        fprintf(stderr, "usage: block_modes [SEQUENCE of c 1 4 s l [STRIDE >= 8 [BLOCKS [REPS]]]]\n");
        return 2;
    }
    size_t grid_bytes = (size_t)blocks * (size_t)stride + 4096;
    char *grid = malloc(grid_bytes), *packed = malloc((size_t)blocks * 8);
    if (!grid || !packed) {
        fprintf(stderr, "block_modes: out of memory\n");
        return 1;
    }
    memset(grid, 1, grid_bytes);
    memset(packed, 0, (size_t)blocks * 8);
    for (const char *q = sequence; *q; q++) {
        void (*loop)(char *, const char *) = *q == 'c' ? by_calls : *q == '1' ? one_a_step
                                           : *q == '4' ? four_a_step : *q == 's' ? sixteen_a_step
                                           : *q == 'l' ? loads_only : NULL;
        if (!loop) {
            fprintf(stderr, "block_modes: '%c' is not a loop (c 1 4 s l)\n", *q);
            return 2;
        }
        double best = 1e300, sum = 0;
        for (int r = 0; r < reps; r++) {
            double start = now_us();
            loop(packed, grid + 8); /* the first interior cell, as a face starts */
            double t = now_us() - start;
            sum += t;
            if (t < best) best = t;
        }
        printf("%c %.0f %.0f\n", *q, best, sum / reps);
    }
    long check = 0; /* every pass wrote the same bytes: the grid's ones (none if only l ran) */
    int stored = strpbrk(sequence, "c14s") != NULL;
    for (long i = 0; i < blocks * 8; i++) check += packed[i] != (stored ? 1 : 0);
    if (check) {
        fprintf(stderr, "block_modes: %ld packed bytes wrong\n", check);
        return 1;
    }
    return 0;
}
