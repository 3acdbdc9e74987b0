#include "host_pack.h"

#include <stdlib.h>
#include <string.h>

#include "commlib.h"
#include "../util/config.h"
#include "../util/stats.h"

/* One row: `n` blocks of B bytes, `stride` apart on the typed side, dense on the packed
 * side.  A constant B turns memcpy into a single load/store pair.
 *
 * Blocks far apart (a halo's x face: 8-24 bytes every 2 KiB) cost a cache and a TLB miss
 * each; what counts is how many of them the core keeps in flight:
 *  - BATCH(B) blocks per iteration, unrolled and addressed from one base: fewer
 *    instructions per block, so more blocks fit in the out-of-order window (16 measured
 *    best up to 16 bytes, 8 above; left to itself GCC kept 8 x 24 bytes a loop, and the
 *    x faces of radius 3 were 20% slower);
 *  - far apart, packing blocks over 8 bytes prefetches PREFETCH_AHEAD blocks ahead: the
 *    hardware prefetcher does not follow one block per line or page.  Blocks of 1-8 bytes
 *    are not prefetched: the loads of the 16 unrolled blocks are already in flight together,
 *    and on the H200 host's Xeon (and this VM's) a loop of the kernel alone
 *    (native/bench/row_prefetch.c) took 1024 one-byte blocks 512 bytes apart
 *    in 1.47 us with the prefetches, 1.31 without, 128 8-byte blocks 0.147 against 0.102 us,
 *    and out of cache (64 Ki 8-byte blocks 2 KiB apart) 651 against 663 us: within noise.
 *    Unpacking prefetches blocks over 16 bytes (a quarter of 24-byte blocks straddle two
 *    lines), and blocks of 8-16 bytes 256 bytes to a page apart: on the H200 host's Xeon
 *    8-byte blocks unpacked out of cache went 1.3-2.2x faster with them at strides of
 *    256 B to 4 KiB (2064 B, a 256^3 halo grid's x face: 6.7 against 14 ns a block), warm
 *    from 20 % faster to 20 % slower by stride (native/bench/unpack_prefetch.c); the x
 *    faces unpacked cold went from 1.13x to 1.75x MPICH's speed (geomean), warm from 1.03x
 *    to 0.98x.  A page or more apart the prefetch costs a page walk of its own: 15-25 %
 *    slower warm, so not there.  (On an earlier dev VM's AMD EPYC within 5 % either way; on
 *    Zen 3 slower warm and out of cache: AMD CPUs unpack 8-16 bytes without it, below,
 *    COMMLIB_UNPACK_PREFETCH);
 *  - prefetcht0, not prefetchnta: on AMD Zen 4 a row that fits in L2 and is packed over
 *    and over (1024 one-byte blocks 512 bytes apart) went at 0.5-1.0x the host MPI with
 *    prefetchnta (the line leaves L2) and at 1.1x with prefetcht0. */
#define PREFETCH_AHEAD 16
#define FAR_APART(stride) ((stride) >= 256 || (stride) <= -256)
#define UNDER_A_PAGE(stride) ((stride) < 4096 && (stride) > -4096)
#define UNPACK_PREFETCH(B, stride) (FAR_APART(stride) && ((B) > 16 || ((B) >= 8 && UNDER_A_PAGE(stride))))
#define BATCH(B) ((B) <= 16 ? 16 : 8)
/* Blocks a multiple of 1 KiB apart land in the same few L1 sets (with 2 KiB, two of 64):
 * sixteen loads in flight evict each other's lines.  Where COMMLIB_ALIASED_ROWS is on
 * (auto: x86-64 CPUs, ../util/config.c) the row kernels of up to 16 bytes (1, 2, 4, 8, 12, 16)
 * pack one block a step with a prefetch 16 blocks ahead: on Zen 3, 65536 8-byte blocks 2 KiB
 * apart (a 256^3 grid's z face, 128 MiB) took 364 us so, 455 us 16 a step, 390 us in
 * MPICH's plain loop; on the dev VM's Xeon (stop 53) 616-665 us so, 771-825 us 16 a step
 * (the host MPIs' loops 667-856 us in the same processes); 16-byte blocks within 3 %. */
#define ALIASED(stride) ((stride) != 0 && ((stride) & 1023) == 0)
/* Where COMMLIB_ALIASED_CALLS is on (auto: off since stop 51; before, on for Intel's Xeons), blocks
 * of 12, 16 and 24 bytes: one block a step through a call of the C library's memcpy, as the host
 * MPIs pack them.  On the GPU host's Emerald Rapids (stop 51, `commlib bench pack --filter face_
 * --rounds 11 --repeat 3 --compare COMMLIB_ALIASED_CALLS=1 --compare COMMLIB_ALIASED_CALLS=0`, both
 * MPIs) face_z_t2 and face_z_t3 (16 and 24 bytes every 2 KiB) packed at 0.74x and 1.36x MPICH's with
 * the calls, 1.00x and 1.94x with the kernel's 16 or 8 a step and their prefetches; against Open MPI
 * 1.13x and 1.12x, 1.65x and 1.46x (the same loops without the prefetch, or one a step inline, within
 * a few percent of the kernel's).  On the dev VM's Xeon of stops 42-45 (Sapphire Rapids class)
 * the calls had won: a loop of the kernel alone (65536 blocks 2 KiB apart, 4 KiB pages, medians
 * of 41, separate processes) took 590-690 us so for 16- and 24-byte blocks, against 750-840 us
 * (best single round 420-650) 16 or 8 a step with their prefetches, 900-1000 one a step inlined,
 * 650-870 one a step with the prefetch 16 ahead (the AMD way), 740-940 in groups of 8 or 16
 * fenced apart, 820-1100 with 4-16 blocks kept in flight by a dependency: some limit of the
 * core's below the loads in flight (the page walks: two blocks a page) made more of them in
 * flight slower there, and the call's own instructions kept few enough.
 * (That loop was not committed; `commlib bench pack --filter face_z_t --rounds 11` with the knob
 * 0 and 1 shows the effect: README, issue 8.) */
static void *(*volatile aliased_copy)(void *, const void *, size_t) = memcpy;
/* Blocks of up to 8 bytes a page or more apart (a 512^3 grid's x face: 8 bytes every 4112),
 * each on a page of its own, so each a TLB miss.  On the dev VM's Xeon (AVX-512 and AMX:
 * Sapphire Rapids class) what is fastest depends on where the lines and page tables are.
 * From cache, fewer blocks in flight (`commlib bench pack --filter halo512_q1_r1_x_pack`,
 * against Open MPI: 0.84-0.90x 16 a step; 1932-1998 us and 1.03-1.08x 4 a step; 2001-2132 us
 * one a step; 2195-2201 us 2 a step); out of cache, more (x_pack_cold: 1.19-1.30x 16 a step,
 * 0.79-0.93x 4 a step, 0.55-0.69x one a step in 3 of 4 runs).  So where COMMLIB_PAGE_BLOCKS
 * is on (auto: CPUs other than AMD's, x86-64, ../util/config.c) a piece's first
 * PAGE_PROBE_BLOCKS blocks are packed 16 a step and timed: from cache they took 17-24 ns a
 * block there, out of cache 62-125 ns (21 tries each); under PAGE_WARM_NS a block the rest of
 * the piece goes 4 a step, else 16. */
#define PAGE_APART(stride) ((stride) >= 4096 || (stride) <= -4096)
/* Blocks of 12-24 bytes a page or more apart (a 512^3 grid's x face of radius 3: 24 bytes every
 * 4144) keep the kernel's 8 a step with the prefetch, packing and unpacking.  On the GPU host's
 * Emerald Rapids (stop 51, a measuring hook not kept; `--filter halo512_q1_r3_x --rounds 11
 * --repeat 2`) it packed them warm at 1.83x MPICH's and 1.70x Open MPI's, unpacked warm 0.99x and
 * 1.27x; without the prefetch 1.39x/1.13x and 1.10x/1.09x, 4 a step 1.43x/1.12x and 1.10x/1.20x,
 * one a step inline 1.37x/1.11x, by a memcpy call a block 1.22x/1.02x and 0.92x/1.00x, and every
 * other loop lost 12-50 % out of cache.  (Stop 50's whole runs had them at 0.87-0.90x: by process.) */
/* Blocks of up to 8 bytes 256 bytes to a page apart in long rows (a vector of 262144 4-byte
 * elements 512 bytes apart: 128 MiB), where COMMLIB_LONG_ROWS is on (auto: x86-64 CPUs other
 * than AMD's, ../util/config.c), are packed one a step with a prefetch 16 blocks ahead: one
 * load instruction walks the row, where the 16-a-step loop has 16, each seeing a stride of 16
 * blocks (perhaps past what the core's per-instruction stride prefetcher follows: not measured).
 * On the dev VM's Xeon (`commlib bench pack --filter _s512 --repeat 2`, Open MPI, stop 42):
 * vec_1MiB_b4_s512 0.91-0.93x Open MPI's pack 16 a step with the prefetch (stop 41's loop), 0.93x
 * one a step without it, 1.05-1.06x one a step with it, 1.00x by a memcpy call a block, 0.99x
 * with the prefetch 64 ahead; vec_1MiB_b1/b2_s512 1.40/1.33x -> 1.43/1.41x, vec_4MiB_b2/b4/b8_s512 1.29/1.29/1.20x ->
 * 1.40/1.33/1.25x.  Not in rows of 131072: one a step took vec_1MiB_b8_s512 (64 MiB) from
 * 0.93-0.94x to 0.89-0.90x (stop 41: 16 a step with the prefetch no better there either).  Why
 * the row's length decides was not measured.  COMMLIB_TEST_LONG_ROW_BLOCKS (a test hook) lowers
 * the length. */
#define LONG_ROW_BLOCKS 262144
static int64_t long_row_blocks;
static inline int64_t long_row_threshold(void)
{
    return test_number("COMMLIB_TEST_LONG_ROW_BLOCKS", &long_row_blocks, LONG_ROW_BLOCKS);
}
static inline int long_row(int64_t n, int64_t stride)
{
    return commlib_config.long_rows && n >= long_row_threshold() && !PAGE_APART(stride);
}
/* Where COMMLIB_LONG_ROWS is on, rows of 8- to 32-byte blocks 256 bytes to a page apart that
 * span 16 to 128 MiB (the long rows above aside) are packed by a call of the C library's memcpy
 * a block, as Open MPI packs them: the call's own instructions pace the loads.  On the dev VM's
 * Xeon (`commlib bench pack --filter _b8_s512` and `_b32_s512 --rounds 11`, Open MPI, variants
 * alternated in one build, 2 runs each, stop 43): vec_1MiB_b8_s512 (131072 blocks over 64 MiB)
 * 0.84-0.91x Open MPI's pack 16 a step (as before), 0.91-0.93x one a step with the prefetch 16
 * ahead, 0.93x calls with that prefetch, 0.78-0.84x one a step inline, 0.82-0.87x 4 a step and
 * 0.83-0.86x 2 a step, 0.97-0.99x by memcpy calls and 0.95-0.97x by calls of a function of ours
 * (so the call, not memcpy's code, makes the difference); hvec_ and subarr_ the same shape
 * alike.  The knob 0 and 1 alternated (2 pairs): vec_1MiB_b8_s512 0.81-0.84x -> 0.96-1.00x,
 * vec_1MiB_b32_s512 (16 MiB) 0.96-0.98x -> 0.99-1.00x, vec_4MiB_b32_s512 (64 MiB) 0.93-0.95x ->
 * 1.00-1.01x; against MPICH (which loops inline, slower) vec_1MiB_b8_s512 1.39-1.56x ->
 * 1.22-1.26x, vec_4MiB_b32_s512 2.21-2.28x -> 1.88-2.07x (README, issue 8).  Spans of 256 MiB
 * (vec_4MiB_b8_s512, a long row) went at 1.20-1.25x Open MPI 16 a step and 1.02-1.04x by calls,
 * and the 1 KiB vectors (from cache) at half speed by calls: not there.  12-24-byte blocks
 * were not measured (taken by the same reasoning); the test hook scales the spans as it scales
 * the long rows' length. */
#define CALL_ROW_MIN_SPAN ((int64_t)16 << 20)
#define CALL_ROW_MAX_SPAN ((int64_t)128 << 20)
static inline int call_row(int64_t block, int64_t n, int64_t stride)
{
    if (!commlib_config.long_rows || block < 8 || block > 32 || !FAR_APART(stride) || PAGE_APART(stride) ||
        (block <= 8 && long_row(n, stride)))
        return 0;
    int64_t span = n * (stride < 0 ? -stride : stride), scale = long_row_threshold();
    return span >= CALL_ROW_MIN_SPAN / LONG_ROW_BLOCKS * scale && span < CALL_ROW_MAX_SPAN / LONG_ROW_BLOCKS * scale;
}
#define PAGE_PROBE_BLOCKS 64
#define PAGE_WARM_NS 40
enum { PAGE_FIRST, PAGE_FEW, PAGE_MANY };
static __thread int page_probe; /* this thread's piece of blocks <= 8 bytes: PAGE_*, set by move_piece */
static int page_verdict(uint64_t ns, int64_t blocks);
/* The probes' clocks (this one, and the row probe's below): x86-64 only. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <time.h>
#include <x86intrin.h>
#define HAVE_ROW_PROBE 1
#define HAVE_PAGE_PROBE 1
static inline void probe_fence(void)
{
    _mm_mfence(); /* the copy's stores are done (an unpack's misses are its stores) */
    _mm_lfence(); /* and its loads */
}
static inline uint64_t probe_ticks(void)
{
    probe_fence();
    uint64_t t = __rdtsc();
    _mm_lfence(); /* and the next one's not begun */
    return t;
}
static inline uint64_t page_probe_ns(void)
{
    probe_fence();
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    _mm_lfence();
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}
static inline void copy_movsb(char *dst, const char *src, int64_t bytes)
{
    __asm__ volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(bytes) : : "memory");
}
#else
#define HAVE_ROW_PROBE 0
#define HAVE_PAGE_PROBE 0
#define probe_ticks() ((uint64_t)0)
#define page_probe_ns() ((uint64_t)0)
#define copy_movsb(dst, src, bytes) memcpy((dst), (src), (size_t)(bytes))
#endif

/* Rows of 8- or 16-byte blocks 256 B to a page apart (a 256^3 grid's x face of radius 1-2:
 * blocks every 2064 bytes), and 8-byte blocks a page or more apart that the page probe found
 * in cache (a 512^3 grid's x face): which loop packs them fastest is the CPU's affair, so where
 * COMMLIB_ROW_RACE is on (auto: x86-64) pieces of such rows race two loops - the row kernel's
 * own (16 a step, or the page probe's 4) and one block a step, MPICH's yaksa loop.  A shape
 * (block, stride, blocks a row, rows, and how fast its first 64 blocks came: log2 of their ns a
 * block, which tells a warm piece from a cold one) gets a slot of this thread's; its first
 * RACE_PIECES pieces take the two loops alternately, each piece timed whole, and every later
 * piece of that shape takes the loop of the faster piece (one a step only where it was 3 % faster:
 * where the two are within noise, the kernel's loop stays, as it was before the race).  Whole pieces, not rows: raced row
 * by row on the dev VM's Xeon, one a step's first 2-3 rows of 256 blocks ran 10-20 % faster than
 * the kernel's rows and its later ones 10-50 % slower (something in the core adapts to the
 * loop), so a race of rows picked one a step for pieces it packed 9-30 % slower.
 * GPU host's Xeon (Sapphire Rapids, H100 machine; `commlib bench pack --filter _x_pack_warm
 * --rounds 11`, MPICH, one a step forced by a test build and the kernels alternated, stop 45):
 * the 256^3 grids' x faces of radius 1 packed warm 0.91-0.92x MPICH's pack -> 0.97-1.03x,
 * radius 2 0.95-0.97x -> 1.03-1.08x, `halo512_q1_r1_x_pack_warm` 0.88-0.89x -> 1.00-1.01x
 * (commlib 2300 -> 2000-2066 us, MPICH's unchanged): one a step 7-13 % faster in commlib's own
 * time.  On the dev VM's Xeon the same loop was 5-9 % slower warm (stop 44) and 30 % slower out
 * of cache, so no one loop serves both CPUs.  Unpacking does not race: one a step was slower
 * on both. */
#define RACE_MIN_ROWS 16 /* pieces of fewer rows do not race */
#define RACE_PIECES 4    /* pieces a slot races, the two loops alternately */
#define RACE_SLOTS 32    /* shapes a thread keeps (a halo exchange packs a few; more than 32 in turn would race forever) */
#define RACE_MARGIN_PCT 97 /* one a step wins only under 97 % of the kernel's time: within noise, the kernel stays */
typedef struct {
    int64_t block, stride, n, rows; /* the shape */
    int bucket;                     /* log2 of its first 64 blocks' ns a block; -1: a page apart, cached */
    int pieces;                     /* pieces packed so far */
    int one;                        /* after the race: 1 where one a step won */
    uint64_t best[2];               /* each loop's fastest piece, ns */
} race_slot;
static __thread race_slot race_slots[RACE_SLOTS];
static __thread int race_used, race_next; /* slots filled; the one a new shape replaces */
enum { RACE_OFF, RACE_FIRST, RACE_ON };
static __thread int race_state;      /* this thread's piece: not racing, its first row to come, racing (move_piece) */
static __thread race_slot *race_now; /* the piece's slot while RACE_ON */
static __thread int race_loop;       /* the piece's loop: 1 one a step, 0 the kernel's */
static __thread int64_t race_rows;   /* the piece's rows */
static __thread uint64_t race_start; /* while its slot races: the piece's start (its first row's probe) */
static int race_winner = -2; /* COMMLIB_TEST_ROW_RACE_WINNER=0/1: a test's winner; -1 none */

static inline int test_race_winner(void) { return test_choice("COMMLIB_TEST_ROW_RACE_WINNER", &race_winner); }

/* The piece's first row is of this shape, its probe begun at `start`: its slot, and the loop the
 * piece takes (race_loop).  The clock is read again at the piece's end only while the slot races. */
static void race_enter(int64_t block, int64_t n, int64_t stride, int bucket, uint64_t start)
{
    race_slot *s = NULL;
    for (int i = 0; i < race_used && !s; i++) {
        race_slot *c = &race_slots[i];
        if (c->block == block && c->stride == stride && c->n == n && c->rows == race_rows && c->bucket == bucket) s = c;
    }
    if (!s) {
        s = race_used < RACE_SLOTS ? &race_slots[race_used++] : &race_slots[race_next];
        if (s == &race_slots[race_next]) race_next = (race_next + 1) % RACE_SLOTS;
        *s = (race_slot){block, stride, n, race_rows, bucket, 0, 0, {UINT64_MAX, UINT64_MAX}};
    }
    race_now = s;
    race_state = RACE_ON;
    race_loop = s->pieces < RACE_PIECES ? s->pieces & 1 : s->one;
    race_start = start;
}

/* The piece, whose slot still races, took `ns`. */
static void race_leave(uint64_t ns)
{
    race_slot *s = race_now;
    if (ns < s->best[race_loop]) s->best[race_loop] = ns;
    if (++s->pieces == RACE_PIECES) {
        s->one = test_race_winner() >= 0 ? test_race_winner() : s->best[1] < s->best[0] / 100 * RACE_MARGIN_PCT;
        stat_add(STAT_PACK_RACES, 1);
        if (s->one) stat_add(STAT_PACK_RACES_ONE, 1);
    }
}

/* log2 of ns a block, 0-63 (the test hook's verdict instead, where given: a fixed slot) */
static inline int race_bucket(uint64_t ns, int64_t blocks);
#define RACED_NEAR(B, n, stride)                                                                   \
    (HAVE_PAGE_PROBE && ((B) == 8 || (B) == 16) && FAR_APART(stride) && !PAGE_APART(stride) &&    \
     !ALIASED(stride) && race_state != RACE_OFF && !call_row(B, n, stride) && !long_row(n, stride))
/* One block a step, the race's second loop (the empty asm keeps GCC from unrolling it). */
#define ONE_A_STEP(B)                                                                              \
    for (; i < n; i++, packed += B, typed += stride) {                                             \
        memcpy(packed, typed, B);                                                                  \
        __asm__ volatile("" ::: "memory");                                                         \
    }
#ifdef __clang__
#define UNROLLED _Pragma("unroll 16")
#define FOUR _Pragma("unroll 4")
#else
#define UNROLLED _Pragma("GCC unroll 16")
#define FOUR _Pragma("GCC unroll 4")
#endif
/* Blocks under 8 bytes packed side by side: GCC merges the unrolled stores into one word
 * built by a chain of shifts, which made 1-byte blocks 16 bytes apart 0.75x the host MPI
 * instead of 1.2x.  An empty asm on the pointer keeps the stores apart. */
#define UNMERGED(B, p)                  \
    do {                                \
        if (B < 8) __asm__("" : "+r"(p)); \
    } while (0)

#define ROW_KERNELS(B)                                                                             \
    static void pack_row_##B(char *restrict packed, const char *restrict typed, int64_t n,        \
                             int64_t stride, int64_t block)                                        \
    {                                                                                              \
        enum { batch = BATCH(B) };                                                                 \
        (void)block;                                                                               \
        int64_t i = 0;                                                                             \
        if (HAVE_PAGE_PROBE && B <= 8 && PAGE_APART(stride) && commlib_config.page_blocks) {       \
            if (page_probe == PAGE_FIRST && n >= PAGE_PROBE_BLOCKS) {                              \
                uint64_t start = page_probe_ns();                                                  \
                for (; i < PAGE_PROBE_BLOCKS; i += 16, packed += 16 * B, typed += 16 * stride)      \
                    UNROLLED for (int k = 0; k < 16; k++) {                                        \
                        memcpy(packed + k * B, typed + k * stride, B);                             \
                        UNMERGED(B, packed);                                                       \
                    }                                                                              \
                page_probe = page_verdict(page_probe_ns() - start, PAGE_PROBE_BLOCKS);             \
                if (race_state == RACE_FIRST) {                                                    \
                    race_state = RACE_OFF;                                                         \
                    if (B == 8 && page_probe == PAGE_FEW) race_enter(B, n, stride, -1, start);     \
                }                                                                                  \
            }                                                                                      \
            if (page_probe == PAGE_FEW && race_state == RACE_ON && race_loop) ONE_A_STEP(B)        \
            if (page_probe == PAGE_FEW)                                                            \
                for (; i + 4 <= n; i += 4, packed += 4 * B, typed += 4 * stride)                   \
                    FOUR for (int k = 0; k < 4; k++) {                                             \
                        memcpy(packed + k * B, typed + k * stride, B);                             \
                        UNMERGED(B, packed);                                                       \
                    }                                                                              \
        }                                                                                          \
        if ((B > 8 && B <= 24 && ALIASED(stride) && commlib_config.aliased_calls) ||               \
            (B >= 8 && B <= 32 && call_row(B, n, stride))) {                                       \
            void *(*copy)(void *, const void *, size_t) = aliased_copy; /* never inlined */        \
            for (; i < n; i++, packed += B, typed += stride) copy(packed, typed, B);               \
        }                                                                                          \
        if ((B <= 16 && ALIASED(stride) && commlib_config.aliased_rows) ||                         \
            (B <= 8 && FAR_APART(stride) && long_row(n, stride))) /* one a step */                 \
            for (; i + PREFETCH_AHEAD < n; i++, packed += B, typed += stride) {                    \
                __builtin_prefetch(typed + PREFETCH_AHEAD * stride, 0, 3);                         \
                memcpy(packed, typed, B);                                                          \
                UNMERGED(B, packed);                                                               \
            }                                                                                      \
        if (RACED_NEAR(B, n, stride)) {                                                           \
            if (race_state == RACE_FIRST) {                                                        \
                race_state = RACE_OFF;                                                             \
                if (i == 0 && n >= PAGE_PROBE_BLOCKS) { /* the first 64 blocks timed: warm or cold */ \
                    uint64_t start = page_probe_ns();                                              \
                    for (; i < PAGE_PROBE_BLOCKS; i += 16, packed += 16 * B, typed += 16 * stride)  \
                        UNROLLED for (int k = 0; k < 16; k++) memcpy(packed + k * B, typed + k * stride, B); \
                    race_enter(B, n, stride, race_bucket(page_probe_ns() - start, PAGE_PROBE_BLOCKS), start); \
                }                                                                                  \
            }                                                                                      \
            if (race_state == RACE_ON && race_loop) ONE_A_STEP(B)                                  \
        }                                                                                          \
        if (FAR_APART(stride) && B > 8)                                                            \
            for (; i + PREFETCH_AHEAD + batch <= n;                                                \
                 i += batch, packed += batch * B, typed += batch * stride)                         \
                UNROLLED for (int k = 0; k < batch; k++) {                                         \
                    __builtin_prefetch(typed + (PREFETCH_AHEAD + k) * stride, 0, 3);               \
                    memcpy(packed + k * B, typed + k * stride, B);                                 \
                    UNMERGED(B, packed);                                                           \
                }                                                                                  \
        for (; i + batch <= n; i += batch, packed += batch * B, typed += batch * stride)           \
            UNROLLED for (int k = 0; k < batch; k++) {                                             \
                memcpy(packed + k * B, typed + k * stride, B);                                     \
                UNMERGED(B, packed);                                                               \
            }                                                                                      \
        for (; i < n; i++, packed += B, typed += stride) memcpy(packed, typed, B);                 \
    }                                                                                              \
    static void unpack_row_##B(char *restrict typed, const char *restrict packed, int64_t n,      \
                               int64_t stride, int64_t block)                                      \
    {                                                                                              \
        enum { batch = BATCH(B) };                                                                 \
        (void)block;                                                                               \
        int64_t i = 0;                                                                             \
        if (UNPACK_PREFETCH(B, stride))                                                            \
            for (; i + PREFETCH_AHEAD + batch <= n;                                                \
                 i += batch, packed += batch * B, typed += batch * stride)                         \
                UNROLLED for (int k = 0; k < batch; k++) {                                         \
                    __builtin_prefetch(typed + (PREFETCH_AHEAD + k) * stride, 1, 3);               \
                    memcpy(typed + k * stride, packed + k * B, B);                                 \
                }                                                                                  \
        for (; i + batch <= n; i += batch, packed += batch * B, typed += batch * stride)           \
            UNROLLED for (int k = 0; k < batch; k++) memcpy(typed + k * stride, packed + k * B, B);\
        for (; i < n; i++, packed += B, typed += stride) memcpy(typed, packed, B);                 \
    }

ROW_KERNELS(1)
ROW_KERNELS(2)
ROW_KERNELS(4)
ROW_KERNELS(8)
ROW_KERNELS(12)
ROW_KERNELS(16)
ROW_KERNELS(24)
ROW_KERNELS(32)
ROW_KERNELS(64)

/* Unpacking blocks of 8-16 bytes without the prefetch (COMMLIB_UNPACK_PREFETCH=0; auto: off on
 * AMD CPUs, ../util/config.c): the 16 blocks of an iteration as two halves of 8, the second
 * from its own base, so that both share the seven stride multiples.  Addressed from one base,
 * GCC keeps 15 multiples and reloads 5-6 of them from the stack every iteration.  On the dev
 * VM's Zen 3 (`commlib bench pack --filter x_unpack --rounds 11 --target-ms 20`, MPICH, this
 * knob 1 and 0 alternated, 5 runs each, per-shape medians), the x faces of a 256^3 grid
 * unpacked warm went from 0.91-1.13x MPICH's unpack to 1.12-1.14x with 8-byte blocks (2064
 * bytes apart), from 1.02-1.38x to 1.20-1.63x with 16-byte ones; out of cache from 1.05-1.08x
 * to 1.19-1.30x and from 1.13-1.25x to 1.34-1.46x.  Built apart (3 runs each), the three
 * slowest warm (0.88-1.00x) went to 0.97-1.07x with the prefetch alone off, to 0.89-0.98x with
 * the halves alone (prefetching), to 1.15-1.22x with both.  (Blocks under 256 bytes apart were
 * not prefetched before either: a loop alone unpacking 8-byte blocks 16-128 bytes apart took
 * 0.35-1.37 ns a block from two bases, 0.40-1.36 from one.)  Packing keeps one base: there the
 * halves cost the 512^3 grid's x face (8 bytes 4112 apart) 5-9 %.  On the H200 host's Xeon the
 * prefetch made these unpacks 1.3-2.2x faster out of cache (above), so Intel keeps it. */
#define UNPACK_HALVES(B)                                                                           \
    static void unpack_row_halves_##B(char *restrict typed, const char *restrict packed, int64_t n, \
                                      int64_t stride, int64_t block)                               \
    {                                                                                              \
        (void)block;                                                                               \
        int64_t i = 0;                                                                             \
        for (; i + 16 <= n; i += 16, packed += 16 * B, typed += 16 * stride) {                     \
            char *second = typed + 8 * stride;                                                     \
            __asm__("" : "+r"(second)); /* or GCC folds it back into 16 multiples of one base */  \
            UNROLLED for (int k = 0; k < 8; k++) memcpy(typed + k * stride, packed + k * B, B);    \
            UNROLLED for (int k = 0; k < 8; k++) memcpy(second + k * stride, packed + (8 + k) * B, B); \
        }                                                                                          \
        for (; i < n; i++, packed += B, typed += stride) memcpy(typed, packed, B);                 \
    }
UNPACK_HALVES(8)
UNPACK_HALVES(12)
UNPACK_HALVES(16)

/* Unpacking the x face's 8-24-byte blocks 256 bytes to a page apart, the prefetch above pays
 * out of cache only: on the GPU host's Xeon (Emerald Rapids, H100 machine, stop 49: `commlib
 * bench pack --filter _x_unpack --rounds 11 --repeat 3 --compare COMMLIB_UNPACK_PREFETCH=0
 * --compare COMMLIB_UNPACK_PREFETCH=1`, MPICH) the 256^3 grids' faces of radius 1-2 unpacked
 * cold at 0.95-1.10x MPICH's without it and 2.04-2.16x with it, warm at 1.00-1.07x without and
 * 0.86-1.05x with.  So where COMMLIB_UNPACK_PROBE is on (auto: 24-byte blocks on x86-64 CPUs other
 * than AMD's, below; ../util/config.c) the first PAGE_PROBE_BLOCKS blocks of a piece (of UNPACK_PROBE_MIN_BLOCKS or
 * more) are unpacked without the prefetch and timed: under UNPACK_WARM_NS a block the rest of
 * the piece goes without it (8-16 bytes: the halves' loop; 24: 8 a step), else with it.
 * `unpack.probes`, `unpack.probes_warm` and `unpack.probe_ns` count the probes, those found in
 * cache and their time.
 * The line: the probe's first 64 blocks took (`commlib bench pack --filter _x_unpack_warm`, then
 * `_cold`, the counters' means) 10.0 ns a block warm and 29.2 cold on that Xeon (with the line at
 * 8, the first try, only 27 % of the warm probes were under it: the x faces unpacked warm
 * 0.94-1.35x MPICH's, most still prefetched), 5.5-6.6 warm and 15-21 cold on the dev VM's Zen 3
 * with the prefetch forced on (where, the line at 8, the probe took the 256^3 grids' faces from
 * 1.458x to 1.518x MPICH's, `--filter halo256_q --repeat 2`, the warm x faces of radius 1 from
 * 0.89-1.13x to 1.09-1.21x).  14 lies between the Xeon's two.  At 14, on another start of that
 * Xeon (stop 50, the probe off and on, 3 runs each; 13.6 ns a block on average, 76 % of the probes
 * under the line) the 24-byte rows unpacked warm went from 0.91-1.04x MPICH's to 0.96-0.98x, cold
 * within noise, but the 8-16-byte ones warm from 1.08-1.34x (prefetched) to 0.96-1.00x - the
 * opposite of stop 49's start, where the prefetch had made them slower warm - and the geomean over
 * the 28 x unpacks from 1.319x to 1.241x.  So `auto` probes 24-byte blocks only; 8-16-byte ones
 * only where COMMLIB_UNPACK_PROBE=1 (unpack_probe_small). */
#define UNPACK_WARM_NS 14
/* Pieces of fewer blocks are prefetched unprobed: the probe's two clock reads and fences would
 * weigh on a piece of a few hundred nanoseconds (not measured), whose misses matter less. */
#define UNPACK_PROBE_MIN_BLOCKS 1024
enum { UNPACK_FIRST, UNPACK_WARM, UNPACK_COLD };
static __thread int unpack_probe; /* this thread's piece: UNPACK_*, set by move_piece */
static int unpack_verdict(uint64_t ns, int64_t blocks);
static void unpack_row_plain_24(char *restrict typed, const char *restrict packed, int64_t n, int64_t stride,
                                int64_t block)
{
    (void)block;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8, packed += 8 * 24, typed += 8 * stride)
        UNROLLED for (int k = 0; k < 8; k++) memcpy(typed + k * stride, packed + k * 24, 24);
    for (; i < n; i++, packed += 24, typed += stride) memcpy(typed, packed, 24);
}
#define UNPACK_PROBED(B, PLAIN)                                                                    \
    static void unpack_row_probed_##B(char *restrict typed, const char *restrict packed, int64_t n, \
                                      int64_t stride, int64_t block)                               \
    {                                                                                              \
        if (!UNPACK_PREFETCH(B, stride) || !UNDER_A_PAGE(stride)) {                                \
            unpack_row_##B(typed, packed, n, stride, block);                                       \
            return;                                                                                \
        }                                                                                          \
        if (unpack_probe == UNPACK_FIRST && n >= PAGE_PROBE_BLOCKS) {                              \
            uint64_t start = page_probe_ns();                                                      \
            PLAIN(typed, packed, PAGE_PROBE_BLOCKS, stride, block);                                \
            unpack_probe = unpack_verdict(page_probe_ns() - start, PAGE_PROBE_BLOCKS);             \
            typed += PAGE_PROBE_BLOCKS * stride, packed += PAGE_PROBE_BLOCKS * B, n -= PAGE_PROBE_BLOCKS; \
        }                                                                                          \
        if (unpack_probe == UNPACK_WARM) PLAIN(typed, packed, n, stride, block);                   \
        else unpack_row_##B(typed, packed, n, stride, block);                                      \
    }
UNPACK_PROBED(8, unpack_row_halves_8)
UNPACK_PROBED(12, unpack_row_halves_12)
UNPACK_PROBED(16, unpack_row_halves_16)
UNPACK_PROBED(24, unpack_row_plain_24)

/* Any other block of at least 16 bytes is copied inline, 64 bytes per step and at most
 * four moves for the rest (the last one overlapping the one before).  The C library's
 * memcpy per block was slower: out of cache, the 2 KiB rows of a halo face (z) went at
 * 0.62-0.75x the host MPI through it, and as slowly through a loop of 8-byte words, but
 * at 1.0-1.15x with 16- or 32-byte steps; in cache its call and size dispatch cost more
 * than the copy of a few lines.  With AVX2 the steps are 32 bytes wide: in cache,
 * 16-byte steps were up to 20% slower than glibc's memcpy on blocks of 512 bytes to
 * 2 KiB, and the y faces 10-15% slower. */
#define COPY_BLOCK(NAME, STEP, TARGET)                                                             \
    TARGET static inline void NAME(char *restrict dst, const char *restrict src, int64_t block)   \
    {                                                                                              \
        int64_t w = 0;                                                                             \
        for (; w + 64 <= block; w += 64) {                                                         \
            STEP(dst + w, src + w);                                                                \
            STEP(dst + w + 32, src + w + 32);                                                      \
            __asm__("" : "+r"(w)); /* or GCC turns the loop back into a call to memcpy */          \
        }                                                                                          \
        int64_t rest = block - w;                                                                  \
        if (rest > 32) {                                                                           \
            STEP(dst + w, src + w);                                                                \
            w += 32;                                                                               \
            rest -= 32;                                                                            \
        }                                                                                          \
        if (rest > 16) memcpy(dst + w, src + w, 16);                                               \
        if (rest > 0) memcpy(dst + block - 16, src + block - 16, 16);                              \
    }

/* Packing blocks far apart (a y face of radius 1: one 2 KiB row every 530 KB), each block
 * starts cold on its own pages, and the C library's memcpy takes the rows of 256 bytes and
 * more: it loads both ends of a block before the middle (a second miss in flight at once)
 * with the widest moves the CPU has.  Until stop 23 a loop of commlib's own loaded the last
 * 128 bytes first, then the rest in 32-byte moves - 1.4-1.6x faster out of cache than the
 * forward loop on AMD Zen 4 (measured against that loop, not against memcpy).  On Intel
 * Xeons (the dev VM, the H200 host) memcpy was faster: the y faces of radius 1 packed
 * (halo256/512, 1-4 quantities, warm and cold, `commlib bench pack --filter _r1_y_pack`)
 * went from 0.74-1.01x to 0.99-1.07x Open MPI's own pack and from 1.08-1.72x to
 * 1.05-2.21x MPICH's.  Smaller blocks stay inline (the call and the size dispatch cost
 * more than a few lines' copy). */
#define COPY_ISOLATED(NAME, TARGET)                                                                \
    TARGET static inline void NAME##_isolated(char *restrict dst, const char *restrict src,       \
                                              int64_t block)                                       \
    {                                                                                              \
        if (block < 256) NAME(dst, src, block);                                                    \
        else memcpy(dst, src, (size_t)block);                                                      \
    }

/* Rows that follow each other (a z face: 2 KiB rows 2 KiB + ghost cells apart) and large
 * dense blocks stream through memory: out of cache the core waits on its own misses, and a
 * prefetch of the source and (for writing) of the destination 256 bytes ahead keeps more of
 * them in flight.  1.05-1.2x a plain vector loop and 1.15-1.25x glibc's memcpy on 0.5-6 MiB
 * out of cache on Zen 4, and no slower in cache; further ahead (512, 1024) was slower.
 * Prefetches past the end of a buffer are harmless (they never fault).  On the GPU host's Emerald
 * Rapids (stop 51; `--filter _z_ --rounds 7 --repeat 2`, a measuring hook, commlib's own time) the
 * C library's memcpy a row took the z faces from cache in 0.85-1.04x this loop's time (one 1.31x),
 * out of cache in 1.03-1.50x; 128 bytes a step, loads first, was within a few percent of this loop.  A race of
 * this loop and memcpy per shape, its first pieces timed (commit 2c6916d, reverted), took the warm
 * z faces under 0.95x Open MPI's from 6 to 2 but the cold ones from 1.15-1.38x to 0.90-1.29x:
 * geomean 1.126x -> 1.092x; on the dev VM's Zen 3 it cost commlib's own time 5 % warm and 2 % cold
 * (`--filter _z_ --rounds 7 --target-ms 20 --repeat 2`, MPICH): the first row's time, its warm/cold
 * bucket, fell on both sides of a bucket's edge for one shape, so slots split and raced again.
 * What memcpy had over this loop from cache was its aligned stores: COMMLIB_ALIGNED_STREAM, below. */
#define STREAM_AHEAD 256
#define COPY_STREAM(NAME, STEP, TARGET)                                                            \
    TARGET static inline void NAME##_stream(char *restrict dst, const char *restrict src,         \
                                            int64_t block)                                         \
    {                                                                                              \
        int64_t w = 0;                                                                             \
        for (; w + 64 <= block; w += 64) {                                                         \
            __builtin_prefetch(src + w + STREAM_AHEAD, 0, 3);                                      \
            __builtin_prefetch(dst + w + STREAM_AHEAD, 1, 3);                                      \
            STEP(dst + w, src + w);                                                                \
            STEP(dst + w + 32, src + w + 32);                                                      \
            __asm__("" : "+r"(w));                                                                 \
        }                                                                                          \
        if (w < block) NAME(dst + w, src + w, block - w);                                          \
    }

#define STEP_PLAIN(dst, src) memcpy((dst), (src), 32) /* two 16-byte moves in baseline x86-64 */
COPY_BLOCK(copy_block, STEP_PLAIN, )
COPY_ISOLATED(copy_block, )
COPY_STREAM(copy_block, STEP_PLAIN, )

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define STEP_AVX2(dst, src) \
    _mm256_storeu_si256((__m256i *)(void *)(dst), _mm256_loadu_si256((const __m256i *)(const void *)(src)))
#define HAVE_AVX2_KERNELS 1
COPY_BLOCK(copy_block_avx2, STEP_AVX2, __attribute__((target("avx2"))))
COPY_ISOLATED(copy_block_avx2, __attribute__((target("avx2"))))
COPY_STREAM(copy_block_avx2, STEP_AVX2, __attribute__((target("avx2"))))

/* A row of 256 bytes or more with its last 128 bytes loaded first (two misses in flight
 * from the start, one at each end), then the rest forward.  For rows far from the ones
 * before them - a halo's y face: 1-3 rows of 2-4 KiB, then 530 KB to the next plane - this
 * is what the AMD parts want (COMMLIB_TAIL_FIRST, ../util/config.c): on the dev VM's Zen 5
 * (native/bench/row_groups.c) the y faces of a 256^3 grid went out of cache in 0.55-0.75x
 * the time of the forward and the streaming loops, 0.85-1.05x that of glibc's memcpy (which
 * also loads both ends first); Zen 4 had shown 1.4-1.6x over the forward loop.  On the
 * H200 host's Xeon memcpy won for isolated rows and the streaming loop for groups of them
 * (stop 28: memcpy for groups was 0.80-0.84x), so Intel keeps those; so does AMD's Zen 3 (stop
 * 46: with the next group asked for, COMMLIB_NEXT_GROUP, the forward loops took the y faces from
 * 0.97-0.99x Open MPI's to 1.15-1.16x, where tail first with it gave 1.06-1.09x).  The auto
 * choice tells Zen 4 and later from Zen 3 by AVX-512. */
__attribute__((target("avx2"))) static inline void copy_block_avx2_tail_first(char *restrict dst,
                                                                             const char *restrict src,
                                                                             int64_t block)
{
    const char *end = src + block;
    __m256i t0 = _mm256_loadu_si256((const __m256i *)(const void *)(end - 128));
    __m256i t1 = _mm256_loadu_si256((const __m256i *)(const void *)(end - 96));
    __m256i t2 = _mm256_loadu_si256((const __m256i *)(const void *)(end - 64));
    __m256i t3 = _mm256_loadu_si256((const __m256i *)(const void *)(end - 32));
    __asm__ volatile("" : "+x"(t0), "+x"(t1), "+x"(t2), "+x"(t3)); /* loaded before the loop */
    copy_block_avx2(dst, src, block - 128);
    char *tail = dst + block - 128;
    _mm256_storeu_si256((__m256i *)(void *)tail, t0);
    _mm256_storeu_si256((__m256i *)(void *)(tail + 32), t1);
    _mm256_storeu_si256((__m256i *)(void *)(tail + 64), t2);
    _mm256_storeu_si256((__m256i *)(void *)(tail + 96), t3);
}

/* Unpacking rows of 64 bytes and more a page or more apart (a 256^3 grid's y face of radius 1:
 * one 2 KiB row every 520 KiB; from 4 KiB COMMLIB_UNPACK_MEMCPY takes them first), where
 * COMMLIB_ALIGNED_ROWS is on (auto: x86-64 CPUs other than AMD's, ../util/config.c): the row's
 * first 32 bytes stored unaligned, everything after them up to its last 32 by stores aligned to
 * 32 bytes, the last 32 unaligned - as glibc's memcpy aligns its stores, in the forward loop's
 * order.  A grid from malloc starts 16 bytes past a page (glibc's chunk header), so every row
 * of it does, and every second 32-byte store of copy_block_avx2 splits a line.  On the dev VM's
 * Xeon, `commlib bench pack --filter r1_y_unpack --rounds 11`, the knob 0 and 1 alternated, 2
 * pairs each: against Open MPI halo256_q1_r1_y_unpack_warm 0.93x -> 1.09-1.10x, cold
 * 1.21-1.23x -> 1.18-1.19x, q2-q4 warm 1.02-1.07x -> 1.03-1.17x; against MPICH q1 warm
 * 1.36-1.39x -> 1.57-1.58x, q2-q3 warm 1.09-1.12x -> 1.06-1.08x, cold unchanged.  With a
 * prefetch of both sides 256 bytes ahead (as the streaming loop) q1 warm reached 1.13-1.17x but
 * every cold one lost 8-10 % and q2 warm fell to 0.97-1.00x: not taken.  Needs block >= 64. */
__attribute__((target("avx2"))) static inline void copy_aligned_avx2(char *restrict dst, const char *restrict src,
                                                                    int64_t block, const int prefetch)
{
    __m256i head = _mm256_loadu_si256((const __m256i *)(const void *)src);
    /* isolated rows load their last 32 bytes first; streaming rows after the loop (below) */
    __m256i tail = prefetch ? head : _mm256_loadu_si256((const __m256i *)(const void *)(src + block - 32));
    int64_t w = 32 - (int64_t)((uintptr_t)dst & 31); /* 1-32: [0, w) is the head's */
    _mm256_storeu_si256((__m256i *)(void *)dst, head);
    for (; w + 64 <= block; w += 64) {
        if (prefetch) {
            __builtin_prefetch(src + w + STREAM_AHEAD, 0, 3);
            __builtin_prefetch(dst + w + STREAM_AHEAD, 1, 3);
        }
        __m256i a = _mm256_loadu_si256((const __m256i *)(const void *)(src + w));
        __m256i b = _mm256_loadu_si256((const __m256i *)(const void *)(src + w + 32));
        _mm256_store_si256((__m256i *)(void *)(dst + w), a);
        _mm256_store_si256((__m256i *)(void *)(dst + w + 32), b);
        __asm__("" : "+r"(w)); /* or GCC turns the loop back into a call to memcpy */
    }
    if (w + 32 <= block)
        _mm256_store_si256((__m256i *)(void *)(dst + w), _mm256_loadu_si256((const __m256i *)(const void *)(src + w)));
    if (prefetch) tail = _mm256_loadu_si256((const __m256i *)(const void *)(src + block - 32));
    _mm256_storeu_si256((__m256i *)(void *)(dst + block - 32), tail); /* [w, block): fewer than 32 left */
}
__attribute__((target("avx2"))) static inline void copy_block_avx2_aligned(char *restrict dst,
                                                                          const char *restrict src,
                                                                          int64_t block)
{
    copy_aligned_avx2(dst, src, block, 0);
}
/* Rows of 128 bytes and more that follow each other (a z face: 2 KiB rows, 16-48 bytes of ghost
 * cells between them), where COMMLIB_ALIGNED_STREAM is on (auto: x86-64 CPUs other than AMD's):
 * the aligned loop above with the streaming loop's prefetches, the last 32 bytes loaded after the
 * loop (loaded first, as above, the z faces' cold unpacks on Zen 3 went from 1.171x MPICH's to
 * 0.997x; loaded last, 1.21x -> 1.16x).  A grid from malloc starts 16 bytes past a page and its
 * rows are 2064 bytes apart (256 doubles and 2 ghost cells), so the streaming loop's 32-byte moves
 * split a line every 64 bytes on both sides; glibc's memcpy (the host MPIs' copy of a row) aligns
 * its stores.  On the GPU host's Emerald Rapids (stop 52; `commlib bench pack --filter _z_ --rounds
 * 7 --target-ms 30 --repeat 2 --compare COMMLIB_ALIGNED_STREAM=0 --compare
 * COMMLIB_ALIGNED_STREAM=1`, Open MPI) halo256_q1_r1_z warm went from 0.91x/0.84x Open MPI's
 * pack/unpack to 1.12x/1.09x, the 28 warm z faces 1.022x -> 1.046x (under 0.95x: 2 -> 0), the 28
 * cold ones 1.239x -> 1.231x (each 1.14x or more); against MPICH (`--filter r1_z`) the warm
 * radius-1 faces 1.309x -> 1.426x, cold 1.286x -> 1.284x; the y faces of radius 2-3 (2-3 such rows
 * a plane, `--filter _y_`) within noise.  On the dev VM's Zen 3 (MPICH, `--filter _z_ --rounds 7
 * --target-ms 20 --repeat 2`) the whole z set went 1.568x -> 1.537x (cold 3-4 % slower, warm packs
 * 6 % faster, warm unpacks 8 % slower): AMD keeps the streaming loop. */
__attribute__((target("avx2"))) static inline void copy_block_avx2_stream_aligned(char *restrict dst,
                                                                                 const char *restrict src,
                                                                                 int64_t block)
{
    if (block >= 128) copy_aligned_avx2(dst, src, block, 1); /* 128: a guess, not measured */
    else copy_block_avx2_stream(dst, src, block);
}
#endif

#define ISOLATED(stride, block) ((stride) - (block) >= 4096 || (stride) < 0)
/* Rows that follow each other with less than a line between them (a z face's ghost
 * cells): 256 bytes ahead is the next bytes needed.  With wider gaps it would often be
 * a gap's line, fetched for nothing. */
#define STREAMING(stride, block) ((stride) >= (block) && (stride) - (block) < 64)

/* Rows alone or in groups of under 8 (a y face), the ones COMMLIB_TAIL_FIRST copies last
 * bytes first.  Above 16 KiB a row is a stream of its own. */
#define FAR_ROWS(n, stride, block) \
    ((block) >= 256 && (block) <= 16384 && ((n) < 8 || ISOLATED(stride, block)))

/* Rows of 256 bytes and more a page or more apart (a y face of radius 1: one 2 KiB row a plane,
 * the planes 530 KB apart), where COMMLIB_NEXT_GROUP is on (auto: x86-64): before a row is
 * copied, the first line of the next row is asked for (read for a pack, write for an unpack),
 * so that its TLB walk and first miss overlap this row's copy - what walk() does for groups of
 * rows below.  (The tail-first loops ask for every line of the next row instead: ROWS.)  On the
 * dev VM's Zen 3 (stop 47; `commlib bench pack --filter _y_ --rounds 11`, COMMLIB_TEST_NEXT_ROW=0
 * and 1 alternated - a measuring hook - 2 pairs each, per-shape geomeans) the 20 y shapes of
 * radius 1 went from 0.995x Open MPI's to 1.29x (cold packs 0.92-1.00x -> 1.31-1.49x, cold
 * unpacks 0.98-1.02x -> 1.30-1.66x, warm 0.95-1.08x -> 1.01-1.29x), all 59 y shapes from 1.70-1.80x
 * MPICH's to 1.92-1.97x.  native/bench/next_row.c (memcpy per 2 KiB row, 256 rows 530 KB apart,
 * out of cache): packed in 94-95 us without, 52-58 asking for the first line 1, 2 or 4 rows
 * ahead, 72-79 for the next row's first two lines, 85-91 for all its lines; unpacked 98-102 /
 * 53-56 / 81 / 96; in cache 33-39 us every way.  On the GPU host's Sapphire Rapids (stop 48,
 * MPICH, the hook alternated: `--filter r1_y`, 2 pairs, then `--filter r1_y_unpack`, 3 more) the
 * packs moved within noise (1.144x -> 1.145x over the 20 shapes), the 4 KiB rows unpacked cold by
 * memcpy went from 0.98x to 1.10x, but the 2 KiB rows unpacked cold through COPY##_aligned from
 * 1.10-1.13x to 1.06-1.08x: that loop (Intel's, COMMLIB_ALIGNED_ROWS) does not ask. */
#define NEXT_ROW(n, stride, block) (ISOLATED(stride, block) && (block) >= 256 && (n) > 1 && next_row_on())
#define ASK_NEXT_ROW(ahead, i, n, row, stride, WRITE)                                              \
    do {                                                                                           \
        if ((ahead) && (i) + 1 < (n)) __builtin_prefetch((row) + (stride), WRITE, 3);              \
    } while (0)
static int next_row_test = -2;
static inline int next_row_on(void)
{
    int t = test_choice("COMMLIB_TEST_NEXT_ROW", &next_row_test);
    return t >= 0 ? t : commlib_config.next_group;
}

/* Rows of 4 KiB and more, 8 or more to a piece (a 512^3 grid's z face; a y face's rows, 1-3 a
 * plane): from cache, `rep movsb` - what glibc's memcpy uses for these sizes, so what the
 * host MPIs call - beat every loop here on the dev VM's Zen 5 (a 512^3 grid's z faces, 4 KiB
 * rows, packed and unpacked again and again: 0.90-0.92x Open MPI's through the streaming loop;
 * a loop of 64-byte moves did no better); out of cache the loops beat it by 20-30 %.  Where
 * the rows are is not known ahead, so with COMMLIB_ROW_PROBE (../util/config.c; auto: AMD) the
 * piece's first row is copied by the loop and timed to its last load and store, in TSC
 * ticks: from cache - 6 bytes a tick or more - the piece's other rows go through `rep movsb`,
 * else through the loop (move_piece sets the piece's state, the row kernels keep it).
 * There (`commlib bench pack`'s z faces) first rows out of cache took 1-4.8 bytes a tick (95th
 * percentile), from cache mostly 7-16 (a slow one then keeps the loop: as fast as before).
 * Not below 4 KiB: glibc's memcpy itself loops there (to 2112 bytes), rows of 2 KiB copied
 * tail first measured 1.06-1.07x Open MPI's warm and 0.97-0.98x through `rep movsb`, and a
 * 256^3 grid's z face (2 KiB rows) unpacked in 7 us through either - but through `rep movsb`
 * in 14-20 us in 1 process of 4-8, by where its buffers lay. */
/* (probe_ticks and copy_movsb: with the probes' clocks, above) */
#define PROBE_MIN_BLOCK 4096
#define PROBE_MIN_ROWS 8
#define PROBE_BYTES_PER_TICK 6
enum { PROBE_OFF, PROBE_FIRST_ROW, PROBE_LOOP, PROBE_MOVSB };
static __thread int row_probe; /* this thread's piece of rows >= PROBE_MIN_BLOCK: PROBE_*, set by move_piece */
static int probe_verdict = -2; /* COMMLIB_TEST_ROW_PROBE_CACHED=1/0: a test's verdict; -1 none */

static inline int test_verdict(void) { return test_choice("COMMLIB_TEST_ROW_PROBE_CACHED", &probe_verdict); }

static inline int row_came_from_cache(int64_t block, uint64_t ticks)
{
    return test_verdict() >= 0 ? test_verdict() : (uint64_t)block >= PROBE_BYTES_PER_TICK * ticks;
}

static inline int race_bucket(uint64_t ns, int64_t blocks)
{
    uint64_t per = ns / (uint64_t)blocks;
    return test_verdict() >= 0 ? test_verdict() : per ? 63 - __builtin_clzll(per) : 0;
}

/* A piece's first `blocks` blocks took `ns`: whether they came from cache (under `line_ns` a
 * block), or the test hook's verdict where given. */
static inline int blocks_came_from_cache(uint64_t ns, int64_t blocks, int64_t line_ns)
{
    return test_verdict() >= 0 ? test_verdict() : ns < (uint64_t)(line_ns * blocks);
}

/* The first blocks of a piece of blocks a page apart took `ns`: PAGE_FEW when they came from
 * cache, else PAGE_MANY. */
static int page_verdict(uint64_t ns, int64_t blocks)
{
    return blocks_came_from_cache(ns, blocks, PAGE_WARM_NS) ? PAGE_FEW : PAGE_MANY;
}

/* The first blocks of an unpacked piece of blocks under a page apart took `ns`: UNPACK_WARM when
 * they came from cache (under UNPACK_WARM_NS a block, or COMMLIB_TEST_UNPACK_WARM_NS, a test hook
 * for measuring the line), else UNPACK_COLD; counted. */
static int64_t unpack_warm_ns;
static int unpack_verdict(uint64_t ns, int64_t blocks)
{
    int cached = blocks_came_from_cache(
        ns, blocks, test_number("COMMLIB_TEST_UNPACK_WARM_NS", &unpack_warm_ns, UNPACK_WARM_NS));
    stat_add(STAT_UNPACK_PROBES, 1);
    stat_add(STAT_UNPACK_PROBE_NS, ns);
    if (cached) stat_add(STAT_UNPACK_PROBES_WARM, 1);
    return cached ? UNPACK_WARM : UNPACK_COLD;
}

/* Rows far apart (ISOLATED: a y face of radius 1, one 2 KiB row every 530 KB) defeat the
 * hardware prefetchers: each row starts with misses on lines nobody asked for.  Copying one,
 * the loop below asks for every line of the next (read for a pack, write for an unpack, which
 * misses on its stores), so two rows' misses are in flight instead of one.  Rows of 4 KiB and
 * more take it only when the probe chose the loop (out of cache) or is off.  On the dev VM's
 * Zen 5 (`commlib bench pack --repeat 5`, per-shape medians), the y faces of radius 1 out of
 * cache against Open MPI: 256^3 grids packed at 0.94-0.99x -> 1.04-1.06x, unpacked at
 * 1.10-1.14x -> 1.25-1.28x, 512^3 packed 1.07x -> 1.22x; in cache unchanged (1.03-1.08x).
 * Against MPICH out of cache 2.4-2.8x -> 2.9-3.2x; in cache 5-10 % slower where the grid
 * outgrows L2 (2.0-2.1x -> 1.9x).  Every line: one in two (the other left to an
 * adjacent-line prefetcher) gained nothing, nor did asking two rows ahead, and timing the
 * first row to prefetch only out of cache (as the probe below does) lost half of the unpacks'
 * gain and won nothing in cache (3 processes each). */
#define PREFETCH_ROW(row, block, WRITE)                                                            \
    do {                                                                                           \
        for (int64_t line = 0; line < (block); line += 64)                                         \
            __builtin_prefetch((row) + line, WRITE, 3);                                            \
    } while (0)

/* n rows through KERNEL(DST, SRC, block) (`packed` and `typed` advance); with PROBE, the
 * piece's first row timed, and its rows by `rep movsb` when that one came from cache; rows
 * far apart with the next one asked for (only the tail-first callers have them: streaming
 * rows are less than a line apart).  WRITE: 1 when the typed side is written (unpacking). */
#define ROWS(PROBE, KERNEL, DST, SRC, WRITE)                                                       \
    do {                                                                                           \
        int64_t i = 0;                                                                             \
        int probing = PROBE && block >= PROBE_MIN_BLOCK && commlib_config.row_probe;               \
        if (probing && row_probe == PROBE_FIRST_ROW && n > 0) {                                    \
            uint64_t start = probe_ticks();                                                        \
            KERNEL(DST, SRC, block);                                                               \
            uint64_t ticks = probe_ticks() - start;                                                \
            i = 1, packed += block, typed += stride;                                               \
            row_probe = row_came_from_cache(block, ticks) ? PROBE_MOVSB : PROBE_LOOP;              \
        }                                                                                          \
        if (probing && row_probe == PROBE_MOVSB)                                                   \
            for (; i < n; i++, packed += block, typed += stride) copy_movsb(DST, SRC, block);      \
        else if (ISOLATED(stride, block))                                                          \
            for (; i < n; i++, packed += block, typed += stride) {                                 \
                if (i + 1 < n) PREFETCH_ROW(typed + stride, block, WRITE);                         \
                KERNEL(DST, SRC, block);                                                           \
            }                                                                                      \
        else                                                                                       \
            for (; i < n; i++, packed += block, typed += stride) KERNEL(DST, SRC, block);          \
    } while (0)

/* Packing blocks of 512 bytes and more with gaps of 64 bytes to 4 KiB between them (a vector of
 * 512-byte blocks 1 KiB apart; rows further apart and rows back to back have their own loops
 * above), where COMMLIB_GAP_MEMCPY is on (auto: on, ../util/config.c): the C library's
 * memcpy per block, whose stores are aligned, instead of the 32-byte loop.  On the dev VM's Zen 3
 * (`commlib bench pack --filter vec_ --rounds 11 --target-ms 20`, this knob 0 and 1 alternated,
 * 3 runs each, per-shape medians) the 1-4 MiB vectors of 512-byte blocks 1 KiB apart went from
 * 0.90x Debian's Open MPI's pack (memcpy per block) to 0.96-1.00x, and against the MPICH wheel
 * from 7.0x to 8.3x (4 MiB; 1 MiB 10.0x either way).  On the GPU host's Emerald Rapids (stop 50,
 * `--filter _s1024 --rounds 9 --repeat 2`, Open MPI) vec_1KiB_b512_s1024 went from 0.79x to 0.95x,
 * the 1 and 4 MiB vectors 1.04x -> 1.00x and 1.17x -> 1.20x: since then `auto` is on everywhere.
 * Unpacking keeps the loop (not measured). */
#define GAP_MEMCPY_MIN 512

/* Packing rows of 256 bytes to 16 KiB that follow each other, fewer than 8 at a time (a y face:
 * 1-3 rows of 2-4 KiB a plane, the planes far apart), where COMMLIB_FEW_ROWS is on (auto: off
 * since stop 48, ../util/config.c): the C library's memcpy per row, as the host MPIs copy them,
 * instead of the streaming loop.  On the GPU host's Sapphire Rapids (`--filter _y_ --rounds
 * 11`, MPICH, this knob and COMMLIB_NEXT_GROUP 0/1 in all four pairings, 3 rounds) the y faces
 * of radius 2-3 packed cold went at 0.95-1.11x MPICH's by memcpy and 1.34-1.40x by the loop (with
 * the next group asked for), warm 0.96-1.15x and 1.05-1.62x; on Zen 3 (`commlib bench pack
 * --filter _y_pack --rounds 11 --repeat 2 --compare COMMLIB_FEW_ROWS=0 --compare
 * COMMLIB_FEW_ROWS=1`, Open MPI) 1.213x against 1.179x by memcpy (stop 46: within noise).
 * Before stop 48 it was on for Intel: on the dev VM's Xeon (`commlib bench pack --filter _r
 * --rounds 7`, Open MPI, the knob 0 and 1 alternated, 2 runs each) the y faces of radius 2-3 packed cold went from 0.90-0.98x Open MPI's pack to
 * 0.96-1.05x (all but one run of one shape >= 1.00x), warm from 1.00-1.13x to 0.99-1.02x; the z
 * faces (256 rows a call) keep the streaming loop: 1.15-1.25x cold, 1.00-1.08x by memcpy.
 * Unpacking keeps it too: by memcpy the y faces of radius 2 unpacked cold went from 0.93-0.98x
 * to 1.00-1.05x, those of radius 3 from 1.05-1.11x to 0.95-1.06x. */
#define FEW_ROWS(n, block) ((n) < 8 && (block) >= 256 && (block) <= 16384)

/* Unpacking rows of 4 KiB and more at least a page apart (a 512^3 grid's y face of radius 1:
 * one 4 KiB row a plane), where COMMLIB_UNPACK_MEMCPY is on (auto: x86-64 CPUs other than
 * AMD's): the C library's memcpy per row instead of the 32-byte loop (why it is faster there was
 * not measured; glibc may take `rep movsb` at this size).  On the dev VM's Xeon (`commlib bench
 * pack --filter r1_y_unpack --rounds 11`, Open MPI, memcpy for such rows from 256 bytes by a
 * test build, 2 runs each way) `halo512_q1_r1_y_unpack_cold` went from 0.93x Open MPI's unpack to
 * 1.01-1.02x; the 2 KiB rows of a 256^3 grid went from 1.19-1.24x to 1.10-1.15x cold (and 0.92x
 * -> 1.00x, 1.03-1.07x -> 0.99-1.00x warm), so they keep the loop. */
#define UNPACK_MEMCPY_MIN 4096

#define CHUNK_KERNELS(SUFFIX, COPY, TARGET, TAIL_FIRST, WIDE, YMM, PROBE)                              \
    TARGET static void pack_row_chunks##SUFFIX(char *restrict packed, const char *restrict typed, \
                                               int64_t n, int64_t stride, int64_t block)          \
    {                                                                                              \
        if (TAIL_FIRST && FAR_ROWS(n, stride, block))                                              \
            ROWS(PROBE, COPY##_tail_first, packed, typed, 0);                                      \
        else if (ISOLATED(stride, block)) {                                                        \
            int ahead = NEXT_ROW(n, stride, block);                                                \
            for (int64_t i = 0; i < n; i++, packed += block, typed += stride) {                    \
                ASK_NEXT_ROW(ahead, i, n, typed, stride, 0);                                       \
                COPY##_isolated(packed, typed, block);                                             \
            }                                                                                      \
        }                                                                                          \
        else if (STREAMING(stride, block) && FEW_ROWS(n, block) && commlib_config.few_rows)          \
            for (int64_t i = 0; i < n; i++, packed += block, typed += stride)                      \
                memcpy(packed, typed, (size_t)block);                                              \
        else if (STREAMING(stride, block) && commlib_config.aligned_stream)                        \
            ROWS(PROBE, COPY##_stream_aligned, packed, typed, 0);                                  \
        else if (STREAMING(stride, block))                                                         \
            ROWS(PROBE, COPY##_stream, packed, typed, 0);                                          \
        else if (WIDE && block > 128 && block <= 256)                                              \
            for (int64_t i = 0; i < n; i++, packed += block, typed += stride)                      \
                copy_block_zmm(packed, typed, block);                                              \
        else if (YMM && block > 64 && block <= 256 && commlib_config.loads_first)                  \
            for (int64_t i = 0; i < n; i++, packed += block, typed += stride)                      \
                copy_block_ymm(packed, typed, block);                                              \
        else if (block >= GAP_MEMCPY_MIN && commlib_config.gap_memcpy)                             \
            for (int64_t i = 0; i < n; i++, packed += block, typed += stride)                      \
                memcpy(packed, typed, (size_t)block);                                              \
        else                                                                                       \
            for (int64_t i = 0; i < n; i++, packed += block, typed += stride) COPY(packed, typed, block); \
    }                                                                                              \
    TARGET static void unpack_row_chunks##SUFFIX(char *restrict typed, const char *restrict packed, \
                                                 int64_t n, int64_t stride, int64_t block)        \
    {                                                                                              \
        const int ahead = NEXT_ROW(n, stride, block);                                              \
        if (TAIL_FIRST && FAR_ROWS(n, stride, block))                                              \
            ROWS(PROBE, COPY##_tail_first, typed, packed, 1);                                      \
        else if (STREAMING(stride, block) && commlib_config.aligned_stream)                        \
            ROWS(PROBE, COPY##_stream_aligned, typed, packed, 1);                                  \
        else if (STREAMING(stride, block))                                                         \
            ROWS(PROBE, COPY##_stream, typed, packed, 1);                                          \
        else if (ISOLATED(stride, block) && block >= UNPACK_MEMCPY_MIN && commlib_config.unpack_memcpy) \
            for (int64_t i = 0; i < n; i++, packed += block, typed += stride) {                    \
                ASK_NEXT_ROW(ahead, i, n, typed, stride, 1);                                       \
                memcpy(typed, packed, (size_t)block);                                              \
            }                                                                                      \
        else if (ISOLATED(stride, block) && block >= 64 && commlib_config.aligned_rows)            \
            for (int64_t i = 0; i < n; i++, packed += block, typed += stride)                      \
                COPY##_aligned(typed, packed, block); /* no next row: see NEXT_ROW */               \
        else if (ahead)                                                                            \
            for (int64_t i = 0; i < n; i++, packed += block, typed += stride) {                    \
                ASK_NEXT_ROW(1, i, n, typed, stride, 1);                                           \
                COPY(typed, packed, block);                                                        \
            }                                                                                      \
        else                                                                                       \
            for (int64_t i = 0; i < n; i++, packed += block, typed += stride) COPY(typed, packed, block); \
    }

#ifdef HAVE_AVX2_KERNELS
/* Blocks of 129-256 bytes with gaps between them (a vector of 256-byte blocks 512 bytes
 * apart), where 64-byte moves are full speed (AMD Zen 4/5; COMMLIB_AVX512, ../util/config.c):
 * the block's first and last 128 bytes (overlapping when shorter) in four 64-byte loads, then
 * the four stores - the pattern of glibc's memcpy for this size on these CPUs.  Packing
 * 1-4 MiB of 256-byte blocks 512 bytes apart (`commlib bench pack --filter _b256_s512`) on
 * the dev VM's Zen 5 went from 0.90-0.95x Open MPI's pack to 1.02-1.05x (3 runs); the
 * forward loop of 32-byte moves above, the same loop in 64-byte moves, and the C library's
 * memcpy called per block from here all stayed at 0.90-0.95x.  512-byte blocks lost 5-10 %
 * this way (they keep the loop), as did 128-byte ones; unpacking was not measured and keeps
 * the loop. */
__attribute__((target("avx2,avx512f"))) static inline void copy_block_zmm(char *restrict dst,
                                                                        const char *restrict src,
                                                                        int64_t block)
{
    const char *end = src + block;
    char *dst_end = dst + block;
    __m512i a = _mm512_loadu_si512((const void *)src), b = _mm512_loadu_si512((const void *)(src + 64));
    __m512i c = _mm512_loadu_si512((const void *)(end - 128)), d = _mm512_loadu_si512((const void *)(end - 64));
    _mm512_storeu_si512((void *)dst, a);
    _mm512_storeu_si512((void *)(dst + 64), b);
    _mm512_storeu_si512((void *)(dst_end - 128), c);
    _mm512_storeu_si512((void *)(dst_end - 64), d);
}

/* Blocks of 65-256 bytes with gaps between them (vectors of 128- and 256-byte blocks 512 bytes
 * apart), where COMMLIB_LOADS_FIRST is on (auto: x86-64 with AVX2; ../util/config.c): all of a
 * block's loads before its stores, in 32-byte moves - its first and last 64 bytes (up to 128) or
 * 128 bytes, overlapping when shorter, as glibc's AVX2 memcpy copies these sizes - instead of the
 * forward loop's load, store, load, store.  On the GPU host's Emerald Rapids (stop 50, `commlib
 * bench pack --filter vec_1KiB --rounds 9 --repeat 2`, Open MPI, off and on through a measuring
 * hook, today `--compare COMMLIB_LOADS_FIRST=0 --compare COMMLIB_LOADS_FIRST=1`)
 * vec_1KiB_b128_s512 went from 0.99x Open MPI's pack (a memcpy per block) to 1.19x and
 * vec_1KiB_b256_s512 from 0.86x to 1.12x (COMMLIB_AVX512's 64-byte moves: 1.11x and 0.98x);
 * on the dev VM's Zen 3 (`--filter vec_ --rounds 9 --repeat 3`) from 1.06x to 1.32x and 1.22x,
 * the 1 MiB vectors 0.99x -> 1.12x (128 bytes) and 1.01x -> 1.04x (256), the 4 MiB ones 1.08x ->
 * 1.38x and 1.09x -> 1.04x (within the runs' spread, 1.01-1.12x against 1.01-1.05x).  Where
 * COMMLIB_AVX512 is on (Zen 4/5) blocks of 129-256 bytes keep its 64-byte moves (measured there);
 * 65-128 bytes come here (not measured on Zen 4/5).  Unpacking keeps the loop (not measured). */
#define LOAD_YMM(p) _mm256_loadu_si256((const __m256i *)(const void *)(p))
#define STORE_YMM(p, v) _mm256_storeu_si256((__m256i *)(void *)(p), (v))
__attribute__((target("avx2"))) static inline void copy_block_ymm(char *restrict dst, const char *restrict src,
                                                                 int64_t block)
{
    const char *end = src + block;
    char *dst_end = dst + block;
    if (block <= 128) {
        __m256i a = LOAD_YMM(src), b = LOAD_YMM(src + 32), c = LOAD_YMM(end - 64), d = LOAD_YMM(end - 32);
        STORE_YMM(dst, a), STORE_YMM(dst + 32, b), STORE_YMM(dst_end - 64, c), STORE_YMM(dst_end - 32, d);
        return;
    }
    __m256i a = LOAD_YMM(src), b = LOAD_YMM(src + 32), c = LOAD_YMM(src + 64), d = LOAD_YMM(src + 96);
    __m256i e = LOAD_YMM(end - 128), f = LOAD_YMM(end - 96), g = LOAD_YMM(end - 64), h = LOAD_YMM(end - 32);
    STORE_YMM(dst, a), STORE_YMM(dst + 32, b), STORE_YMM(dst + 64, c), STORE_YMM(dst + 96, d);
    STORE_YMM(dst_end - 128, e), STORE_YMM(dst_end - 96, f), STORE_YMM(dst_end - 64, g), STORE_YMM(dst_end - 32, h);
}
#endif

#ifndef HAVE_AVX2_KERNELS
#define copy_block_ymm copy_block /* not used: YMM is 0 without AVX2 */
#endif
#define copy_block_tail_first copy_block /* not used: tail first needs AVX2 */
#define copy_block_aligned copy_block /* not used: aligned rows need AVX2 */
#define copy_block_stream_aligned copy_block_stream /* not used: aligned rows need AVX2 */
CHUNK_KERNELS(, copy_block, , 0, 0, 0, 0)
#ifdef HAVE_AVX2_KERNELS
#define TARGET_AVX2 __attribute__((target("avx2")))
#define TARGET_AVX512 __attribute__((target("avx2,avx512f")))
CHUNK_KERNELS(_avx2, copy_block_avx2, TARGET_AVX2, 0, 0, 1, HAVE_ROW_PROBE)
CHUNK_KERNELS(_avx2_tail_first, copy_block_avx2, TARGET_AVX2, 1, 0, 1, HAVE_ROW_PROBE)
CHUNK_KERNELS(_avx512, copy_block_avx2, TARGET_AVX512, 0, 1, 1, HAVE_ROW_PROBE) /* unpacks as _avx2 does */
CHUNK_KERNELS(_avx512_tail_first, copy_block_avx2, TARGET_AVX512, 1, 1, 1, HAVE_ROW_PROBE)

/* Packing 24-byte blocks 32 to 127 bytes apart (a vector of 24-byte blocks 48 bytes apart):
 * one 32-byte load and store a block instead of a 16- and an 8-byte pair.  The load reads 8
 * bytes of the gap after the block (never past the next block's start); the store's last 8
 * bytes land in the next block's packed place, which that block's store then overwrites; a
 * row's last block moves by its own 24 bytes, so nothing past the row is read or written.
 * Unpacking cannot (it would write the gaps).  On the dev VM's Xeon, a loop of the kernel
 * alone (medians of 61): 1 MiB 48 bytes apart 118 against 135 us (Open MPI's pack 133),
 * 4 MiB 469 against 499 (484); 32 and 64 apart 3-9 % faster; 128 and 200 apart within 2 %,
 * so not there (COMMLIB_WIDE_ROWS; auto: x86-64 CPUs with AVX2 other than AMD's; that loop
 * was not committed: `commlib bench pack --filter _b24_s48 --rounds 11`, knob 0 and 1). */
#define WIDE_MIN_STRIDE 32
#define WIDE_MAX_STRIDE 127
TARGET_AVX2 static void pack_row_24_wide(char *restrict packed, const char *restrict typed, int64_t n,
                                         int64_t stride, int64_t block)
{
    if (stride < WIDE_MIN_STRIDE || stride > WIDE_MAX_STRIDE) {
        pack_row_24(packed, typed, n, stride, block);
        return;
    }
    int64_t i = 0;
    for (; i + 8 < n; i += 8, packed += 8 * 24, typed += 8 * stride)
        UNROLLED for (int k = 0; k < 8; k++)
            _mm256_storeu_si256((__m256i *)(void *)(packed + k * 24),
                                _mm256_loadu_si256((const __m256i *)(const void *)(typed + k * stride)));
    for (; i + 1 < n; i++, packed += 24, typed += stride)
        _mm256_storeu_si256((__m256i *)(void *)packed,
                            _mm256_loadu_si256((const __m256i *)(const void *)typed));
    if (i < n) memcpy(packed, typed, 24);
}
#endif

/* Blocks of 3, 5-7, 9-11 and 13-15 bytes: two overlapping moves (a byte loop would become
 * a call to memcpy). */
static inline void copy_short(char *restrict dst, const char *restrict src, int64_t block)
{
    if (block >= 8) {
        memcpy(dst, src, 8);
        memcpy(dst + block - 8, src + block - 8, 8);
    } else if (block >= 4) {
        memcpy(dst, src, 4);
        memcpy(dst + block - 4, src + block - 4, 4);
    } else if (block >= 2) {
        memcpy(dst, src, 2);
        memcpy(dst + block - 2, src + block - 2, 2);
    } else {
        *dst = *src;
    }
}

static void pack_row_short(char *restrict packed, const char *restrict typed, int64_t n, int64_t stride,
                           int64_t block)
{
    for (int64_t i = 0; i < n; i++, packed += block, typed += stride) copy_short(packed, typed, block);
}
static void unpack_row_short(char *restrict typed, const char *restrict packed, int64_t n, int64_t stride,
                             int64_t block)
{
    for (int64_t i = 0; i < n; i++, packed += block, typed += stride) copy_short(typed, packed, block);
}

typedef void (*row_fn)(char *, const char *, int64_t, int64_t, int64_t);

static void choose_rows(int64_t block, row_fn *pack, row_fn *unpack)
{
    commlib_config_init(); /* the CPU's choices (COMMLIB_UNPACK_PREFETCH, ...), which kernels also read */
    const int probed = HAVE_PAGE_PROBE && commlib_config.unpack_probe; /* unpacks whose prefetch a probe decides */
    switch (block) {
#define CASE(B)              \
    case B:                  \
        *pack = pack_row_##B; \
        *unpack = unpack_row_##B; \
        return;
        CASE(1) CASE(2) CASE(4) CASE(32) CASE(64)
#undef CASE
    case 24:
        *pack = pack_row_24;
        *unpack = probed ? unpack_row_probed_24 : unpack_row_24;
#ifdef HAVE_AVX2_KERNELS
        if (commlib_config.wide_rows && __builtin_cpu_supports("avx2")) *pack = pack_row_24_wide;
#endif
        return;
#define CASE(B)                                                                       \
    case B:                                                                           \
        *pack = pack_row_##B;                                                         \
        *unpack = !commlib_config.unpack_prefetch ? unpack_row_halves_##B                         \
                  : probed && commlib_config.unpack_probe_small ? unpack_row_probed_##B : unpack_row_##B; \
        return;
        CASE(8) CASE(12) CASE(16)
#undef CASE
    }
    if (block < 16) {
        *pack = pack_row_short;
        *unpack = unpack_row_short;
        return;
    }
#ifdef HAVE_AVX2_KERNELS
    if (__builtin_cpu_supports("avx2")) {
        int tail_first = commlib_config.tail_first;
        if (commlib_config.avx512) { /* set only where the CPU has AVX-512F */
            *pack = tail_first ? pack_row_chunks_avx512_tail_first : pack_row_chunks_avx512;
            *unpack = tail_first ? unpack_row_chunks_avx512_tail_first : unpack_row_chunks_avx512;
        } else {
            *pack = tail_first ? pack_row_chunks_avx2_tail_first : pack_row_chunks_avx2;
            *unpack = tail_first ? unpack_row_chunks_avx2_tail_first : unpack_row_chunks_avx2;
        }
        return;
    }
#endif
    *pack = pack_row_chunks;
    *unpack = unpack_row_chunks;
}

/* Small dense blocks are copied inline in 64-byte steps, larger ones by the C library's
 * memcpy, as the host MPIs do: the streaming loop above beat it out of cache (1.15-1.25x
 * on 0.5-6 MiB) but lost 7-19% in cache (one dense 512 B - 4 MiB block packed again and
 * again), the more common case for a single block. */
static void copy_dense(char *restrict dst, const char *restrict src, int64_t n)
{
    if (n >= 512) {
        memcpy(dst, src, (size_t)n);
        return;
    }
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) memcpy(dst + i, src + i, 64);
    if (i < n) memcpy(dst + i, src + i, (size_t)(n - i));
}

/* Walks the outer dimensions; the row kernel does dims[0].  `packed` advances.
 *
 * Groups of rows a page or more apart (a y face of radius 2-3: 2-3 rows of 2 KiB a plane, the
 * planes 530 KB apart), where COMMLIB_NEXT_GROUP is on (auto: x86-64, ../util/config.c):
 * before a group's rows are copied, the first line of the next group is asked for (read for a
 * pack, write for an unpack), so that its TLB walk and miss overlap this group's copy instead
 * of following it.  On the dev VM's Xeon (`commlib bench pack --filter _y_
 * --rounds 11`, Open MPI, the prefetch off and on alternated in one build, 2 pairs, stop 43) the
 * y faces of radius 2-3 packed out of cache went from 0.97-1.04x Open MPI's pack to 1.05-1.12x,
 * unpacked from 0.93-1.06x to 1.08-1.25x, unpacked warm from 1.01-1.13x to 1.04-1.13x; packed
 * warm 0.99-1.02x -> 0.97-1.03x (radius 2: 1-5 % slower); radius 1 within noise (one row a
 * plane: no group of rows to ask for; the row loops ask for the next row since stop 47,
 * NEXT_ROW).  The x and z faces: README, issue 8.  On the dev VM's Zen 3 (stop 46, the same
 * command, both MPIs, 2 pairs, with COMMLIB_TAIL_FIRST off as it now is there) the 59 y shapes
 * went from 0.97-0.99x Open MPI's to 1.15-1.16x (cold 0.97x -> 1.22x) and from 1.43-1.45x
 * MPICH's to 1.66-1.80x (the two changes together; this prefetch alone, tail first kept:
 * 1.06-1.09x and 1.52-1.53x); Zen 4 and 5 not measured. */
static void walk(const strided_piece *p, int dim, char *typed, char **packed, row_fn row, int packing)
{
    if (dim == 0) {
        int64_t n = p->ndims ? p->dims[0].count : 1, stride = p->ndims ? p->dims[0].stride : 0;
        if (packing) row(*packed, typed, n, stride, p->block);
        else row(typed, *packed, n, stride, p->block);
        *packed += n * p->block;
        return;
    }
    const stride_dim *d = &p->dims[dim];
    int ahead = dim == 1 && PAGE_APART(d->stride) && commlib_config.next_group;
    for (int64_t i = 0; i < d->count; i++) {
        char *group = typed + i * d->stride;
        if (ahead && i + 1 < d->count) { /* the next group's first line (a prefetch never faults) */
            if (packing) __builtin_prefetch(group + d->stride, 0, 3);
            else __builtin_prefetch(group + d->stride, 1, 3);
        }
        walk(p, dim - 1, group, packed, row, packing);
    }
}

static void move_piece(const strided_piece *p, char *typed_base, char **packed, int packing)
{
    char *typed = (char *)((uintptr_t)typed_base + (uintptr_t)p->offset);
    if (p->ndims == 0) { /* one dense block */
        if (packing) copy_dense(*packed, typed, p->block);
        else copy_dense(typed, *packed, p->block);
        *packed += p->block;
        return;
    }
    row_fn pack, unpack;
    choose_rows(p->block, &pack, &unpack);
    page_probe = PAGE_FIRST; /* blocks a page apart: the piece's first ones are timed */
    unpack_probe = UNPACK_COLD; /* unpacked blocks far apart: prefetched, unless the probe says otherwise */
    if (!packing && commlib_config.unpack_probe) { /* pieces large enough that the probe's clock is lost in them */
        int64_t blocks = 1;
        for (int d = 0; d < p->ndims && blocks < UNPACK_PROBE_MIN_BLOCKS; d++) blocks *= p->dims[d].count;
        if (blocks >= UNPACK_PROBE_MIN_BLOCKS) unpack_probe = UNPACK_FIRST;
    }
    race_state = RACE_OFF;
    if (HAVE_PAGE_PROBE && packing && commlib_config.row_race && p->block <= 16) { /* pieces of a shape race two loops */
        int64_t rows = 1;
        for (int d = 1; d < p->ndims; d++) rows *= p->dims[d].count;
        if (rows >= RACE_MIN_ROWS) race_state = RACE_FIRST, race_rows = rows;
    }
    if (commlib_config.row_probe && p->block >= PROBE_MIN_BLOCK) { /* a piece's own state (the
                                                           kernels look at it from that block size) */
        int64_t rows = 1;
        for (int d = 0; d < p->ndims && rows > 0 && rows < PROBE_MIN_ROWS; d++) rows *= p->dims[d].count;
        row_probe = rows >= PROBE_MIN_ROWS ? PROBE_FIRST_ROW : PROBE_OFF;
    }
    walk(p, p->ndims - 1, typed, packed, packing ? pack : unpack, packing);
    if (race_state == RACE_ON && race_now->pieces < RACE_PIECES) race_leave(page_probe_ns() - race_start);
    race_state = RACE_OFF;
}

void host_move(const canonical_type *ct, char *typed, int64_t count, char *packed, int packing)
{
    if (ct->npieces == 1 && count == 1) {
        move_piece(&ct->pieces[0], typed, &packed, packing);
        return;
    }
    strided_piece whole;
    if (canonical_single_piece(ct, count, &whole)) { /* the common case: one loop nest */
        move_piece(&whole, typed, &packed, packing);
        return;
    }
    for (int64_t i = 0; i < count; i++) {
        char *element = (char *)((uintptr_t)typed + (uintptr_t)(i * ct->extent));
        for (int j = 0; j < ct->npieces; j++) move_piece(&ct->pieces[j], element, &packed, packing);
    }
}

int pack_check(const canonical_type *ct, int64_t count, int64_t bufsize, const int64_t *position,
               const void *packed_buf, int64_t *bytes)
{
    if (ct->unsupported) return COMMLIB_ERR_UNSUPPORTED;
    if (count < 0 || !position || *position < 0 || bufsize < 0) return COMMLIB_ERR_ARG;
    if (__builtin_mul_overflow(count, ct->size, bytes)) return COMMLIB_ERR_ARG;
    if (*position > bufsize || bufsize - *position < *bytes) return COMMLIB_ERR_TRUNCATE;
    if (*bytes > 0 && !packed_buf) return COMMLIB_ERR_ARG;
    return COMMLIB_OK;
}

int host_pack_message(const canonical_type *ct, const void *inbuf, int64_t incount, void *outbuf,
                      int64_t outsize, int64_t *position)
{
    int64_t bytes;
    int rc = pack_check(ct, incount, outsize, position, outbuf, &bytes);
    if (rc != COMMLIB_OK) return rc;
    if (bytes > 0) host_move(ct, (char *)inbuf, incount, (char *)outbuf + *position, 1);
    *position += bytes;
    return COMMLIB_OK;
}

int host_unpack_message(const canonical_type *ct, const void *inbuf, int64_t insize, int64_t *position,
                        void *outbuf, int64_t outcount)
{
    int64_t bytes;
    int rc = pack_check(ct, outcount, insize, position, inbuf, &bytes);
    if (rc != COMMLIB_OK) return rc;
    if (bytes > 0) host_move(ct, (char *)outbuf, outcount, (char *)inbuf + *position, 0);
    *position += bytes;
    return COMMLIB_OK;
}
