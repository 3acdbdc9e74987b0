/* Rows far apart (a halo grid's y face of radius 1: one row of N doubles a plane, the planes
 * (N+2)^2 doubles apart) copied by the C library's memcpy, with and without asking for rows
 * ahead before each copy (host_pack.c's NEXT_ROW, COMMLIB_NEXT_GROUP): nothing, the first line
 * of the row 1, 2 or 4 ahead, the first two lines of the next row, or every line of it (what
 * the tail-first loops ask for).  Pack reads the rows into a dense buffer, unpack writes them
 * back.  The variants interleaved, REPS rounds: cold is the median of single passes after
 * reading 64 MiB, warm the median of passes right after another.  Not built by setup.py:
 *
 *   gcc -O2 -o /tmp/next_row native/bench/next_row.c && /tmp/next_row [REPS] [N] [ROW STRIDE]
 *
 * ROW and STRIDE (bytes) replace the halo face's rows: `/tmp/next_row 41 256 6144 524288` is
 * `commlib bench pack`'s face_y_t3 (6 KiB rows of a 256^3 grid without ghost cells).
 *
 * Output: one line per direction and cache state, each variant's median in microseconds.
 * Dev VM, AMD EPYC Zen 3, 2026-12-07, N=256, REPS=41, two runs (us): pack cold none 94-95,
 * 1/2/4 ahead 52-58, two lines 72-79, every line 85-91; unpack cold none 98-102, 1/2/4 ahead
 * 53-56, two lines 81, every line 96; warm 33-39 for every variant. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define EVICT (64ul << 20)
#define MAX_REPS 101

enum { NONE, AHEAD1, AHEAD2, AHEAD4, TWO_LINES, EVERY_LINE, VARIANTS };
static const char *names[VARIANTS] = {"none", "1-ahead", "2-ahead", "4-ahead", "two-lines", "every-line"};

static double now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static void ask(const char *row, int write, size_t bytes)
{
    for (size_t line = 0; line < bytes; line += 64) {
        if (write) __builtin_prefetch(row + line, 1, 3);
        else __builtin_prefetch(row + line, 0, 3);
    }
}

/* One pass over the face: n rows of `row` bytes, `stride` apart, to or from `dense`. */
static void pass(int variant, char *grid, char *dense, size_t n, size_t row, size_t stride, int unpack)
{
    static const size_t ahead[VARIANTS] = {0, 1, 2, 4, 1, 1};
    size_t d = ahead[variant], lines = variant == TWO_LINES ? 128 : variant == EVERY_LINE ? row : 64;
    for (size_t i = 0; i < n; i++) {
        char *typed = grid + i * stride;
        if (d && i + d < n) ask(typed + d * stride, unpack, lines);
        if (unpack) memcpy(typed, dense + i * row, row);
        else memcpy(dense + i * row, typed, row);
    }
}

static int by_value(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    int reps = argc > 1 ? atoi(argv[1]) : 41;
    size_t n = argc > 2 ? (size_t)atol(argv[2]) : 256;
    int given = argc > 4; /* rows of ROW bytes STRIDE apart from the grid's start */
    size_t row = given ? (size_t)atol(argv[3]) : n * 8, stride = given ? (size_t)atol(argv[4]) : (n + 2) * (n + 2) * 8;
    if (reps < 1 || reps > MAX_REPS || n < 2 || row < 64 || stride < row) {
        fprintf(stderr, "usage: next_row [REPS 1-%d] [N >= 2] [ROW >= 64 STRIDE >= ROW]\n", MAX_REPS);
        return 2;
    }
    size_t span = stride * n + row;
    char *grid = aligned_alloc(4096, (span + 4095) / 4096 * 4096), *dense = aligned_alloc(4096, n * row);
    char *evict = malloc(EVICT);
    if (!grid || !dense || !evict) return 1;
    memset(grid, 1, span), memset(dense, 2, n * row), memset(evict, 3, EVICT);
    char *face = given ? grid : grid + (n + 2) * 8 + 8; /* or the interior row next to the low y side */
    static double t[2][2][VARIANTS][MAX_REPS];
    volatile char sink = 0;
    for (int r = 0; r < reps; r++)
        for (int unpack = 0; unpack < 2; unpack++)
            for (int v = 0; v < VARIANTS; v++)
                for (int cold = 1; cold >= 0; cold--) {
                    if (cold)
                        for (size_t i = 0; i < EVICT; i += 64) sink += evict[i];
                    else pass(v, face, dense, n, row, stride, unpack); /* warm: right after a pass */
                    double t0 = now_ns();
                    pass(v, face, dense, n, row, stride, unpack);
                    t[unpack][cold][v][r] = now_ns() - t0;
                }
    for (int unpack = 0; unpack < 2; unpack++)
        for (int cold = 1; cold >= 0; cold--) {
            printf("%-6s %-4s", unpack ? "unpack" : "pack", cold ? "cold" : "warm");
            for (int v = 0; v < VARIANTS; v++) {
                qsort(t[unpack][cold][v], (size_t)reps, sizeof(double), by_value);
                printf("  %s %.1f", names[v], t[unpack][cold][v][reps / 2] / 1e3);
            }
            printf("\n");
        }
    return sink == 42;
}
