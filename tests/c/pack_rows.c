/* Every row kernel of the host pack engine against the host MPI: MPI_Pack / MPI_Unpack
 * (commlib when preloaded) and PMPI_Pack / PMPI_Unpack of byte hvectors, over every block
 * size from 1 to 300 and some larger ones, strides near (the blocks a few bytes apart) and
 * far (past the prefetching threshold, negative too), and block counts around the kernels'
 * unrolled steps and prefetch distance (and the unpack probe's 1024); each also nested once
 * more (an hvector of them), so that a row follows another.  And dense runs of the same sizes (one memcpy per call in
 * the engine): contiguous, displaced, resized apart and below, 1 and 3 elements.  Packing
 * starts at an odd position.
 *
 * Packed bytes and positions must match; unpacking goes into two copies of one random
 * buffer, which must be identical afterwards (gaps between blocks untouched).
 *
 * The last line is always
 *   pack_rows: cases=N mismatches=M fast=F
 * with F the commlib_stat("pack.fast") + ("unpack.fast") delta, or -1 without the preload.
 * Exit status 1 on any mismatch.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define START 3 /* packing starts here: the packed side is not aligned */

static uint64_t rng_state = 0x5eed;

static uint64_t rnd64(void)
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void fill_random(unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)rnd64();
}

typedef long long (*stat_fn)(const char *name);

static long cases, mismatches;

/* `count` elements of a type over a buffer of `span` bytes, the type's first byte at `origin`. */
static void check_count(MPI_Datatype t, int count, const char *what, size_t span, long origin)
{
    int size = 0;
    PMPI_Pack_size(count, t, MPI_COMM_WORLD, &size);
    size_t out_len = (size_t)size + START + 64;
    unsigned char *in = malloc(span), *a = malloc(out_len), *b = malloc(out_len);
    unsigned char *u1 = malloc(span), *u2 = malloc(span);
    if (!in || !a || !b || !u1 || !u2) {
        fprintf(stderr, "pack_rows: out of memory\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    fill_random(in, span);
    memset(a, 0xa5, out_len);
    memset(b, 0xa5, out_len);
    int pa = START, pb = START;
    int ra = MPI_Pack(in + origin, count, t, a, (int)out_len, &pa, MPI_COMM_WORLD);
    int rb = PMPI_Pack(in + origin, count, t, b, (int)out_len, &pb, MPI_COMM_WORLD);
    cases++;
    if (ra != rb || pa != pb || memcmp(a, b, out_len)) {
        mismatches++;
        printf("MISMATCH pack %s: rc %d/%d position %d/%d\n", what, ra, rb, pa, pb);
    }
    fill_random(u1, span);
    memcpy(u2, u1, span);
    fill_random(a + START, (size_t)size);
    pa = pb = START;
    ra = MPI_Unpack(a, (int)out_len, &pa, u1 + origin, count, t, MPI_COMM_WORLD);
    rb = PMPI_Unpack(a, (int)out_len, &pb, u2 + origin, count, t, MPI_COMM_WORLD);
    cases++;
    if (ra != rb || pa != pb || memcmp(u1, u2, span)) {
        long first = -1;
        for (size_t i = 0; i < span && first < 0; i++)
            if (u1[i] != u2[i])
                first = (long)i;
        mismatches++;
        printf("MISMATCH unpack %s: rc %d/%d position %d/%d first differing byte %ld\n", what, ra,
               rb, pa, pb, first);
    }
    free(in);
    free(a);
    free(b);
    free(u1);
    free(u2);
}

static void check(MPI_Datatype t, const char *what, size_t span, long origin)
{
    check_count(t, 1, what, span, origin);
}

/* One dense run of n bytes per element (the engine's memcpy path, pack_any.c): contiguous,
 * at a displacement, resized to a larger extent (elements apart: not one run past the first)
 * and to a lower bound below the data; 1 and 3 elements. */
static void sweep_dense(int n)
{
    MPI_Datatype contig, shifted, spaced, low;
    int disp = 5, len = n;
    char what[96];
    MPI_Type_contiguous(n, MPI_BYTE, &contig);
    MPI_Type_commit(&contig);
    MPI_Type_create_hindexed(1, &len, (MPI_Aint[]){disp}, MPI_BYTE, &shifted);
    MPI_Type_commit(&shifted);
    MPI_Type_create_resized(contig, 0, n + 7, &spaced);
    MPI_Type_commit(&spaced);
    MPI_Type_create_resized(contig, -4, n, &low);
    MPI_Type_commit(&low);
    for (int count = 1; count <= 3; count += 2) {
        snprintf(what, sizeof what, "%d x contiguous(%d, MPI_BYTE)", count, n);
        check_count(contig, count, what, (size_t)count * n + 1, 0);
        snprintf(what, sizeof what, "%d x hindexed(1, %d at %d, MPI_BYTE)", count, n, disp);
        check_count(shifted, count, what, (size_t)count * n + disp + 1, 0);
        snprintf(what, sizeof what, "%d x resized(contiguous(%d), 0, %d)", count, n, n + 7);
        check_count(spaced, count, what, (size_t)count * (n + 7) + 1, 0);
        snprintf(what, sizeof what, "%d x resized(contiguous(%d), -4, %d)", count, n, n);
        check_count(low, count, what, (size_t)count * n + 1, 0);
    }
    MPI_Type_free(&low);
    MPI_Type_free(&spaced);
    MPI_Type_free(&shifted);
    MPI_Type_free(&contig);
}

/* count blocks of `block` bytes `stride` apart, alone and as rows of a 2-row hvector. */
static void sweep_one(int block, long stride, int count)
{
    MPI_Datatype row, two;
    char what[96];
    long reach = (long)(count - 1) * (stride < 0 ? -stride : stride) + block;
    long origin = stride < 0 ? (long)(count - 1) * -stride : 0;
    MPI_Type_create_hvector(count, block, stride, MPI_BYTE, &row);
    MPI_Type_commit(&row);
    snprintf(what, sizeof what, "hvector(%d, %d, %ld, MPI_BYTE)", count, block, stride);
    check(row, what, (size_t)reach + 1, origin);
    /* the second row starts one byte past the first's reach: rows do not overlap */
    long row_stride = reach + 1;
    MPI_Type_create_hvector(2, 1, row_stride, row, &two);
    MPI_Type_commit(&two);
    snprintf(what, sizeof what, "hvector(2, 1, %ld, hvector(%d, %d, %ld, MPI_BYTE))", row_stride,
             count, block, stride);
    check(two, what, (size_t)(row_stride + reach + 1), origin);
    MPI_Type_free(&two);
    MPI_Type_free(&row);
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    stat_fn stat = (stat_fn)dlsym(RTLD_DEFAULT, "commlib_stat");
    long long fast0 = stat ? stat("pack.fast") + stat("unpack.fast") : -1;
    static const int counts[] = {1, 3, 4, 5, 7, 8, 9, 33, 35, 36, 37, 40, 41, 71, 100};
    static const int big_blocks[] = {320, 511, 512, 513, 1000, 2048, 2056, 2112, 4096, 4104, 6000, 16384, 16400};
    int blocks[300 + sizeof big_blocks / sizeof *big_blocks], n_blocks = 0;
    for (int b = 1; b <= 300; b++)
        blocks[n_blocks++] = b;
    for (size_t i = 0; i < sizeof big_blocks / sizeof *big_blocks; i++)
        blocks[n_blocks++] = big_blocks[i];
    for (int i = 0; i < n_blocks; i++) {
        int b = blocks[i];
        /* near (gaps of 1 byte, of a block), far (>= 256 bytes), far and negative; blocks of
         * up to 24 bytes also a multiple of 1 KiB apart (COMMLIB_ALIASED_ROWS up to 16 bytes,
         * COMMLIB_ALIASED_CALLS 12, 16, 24), those of up to 16 a page apart backwards
         * (COMMLIB_PAGE_BLOCKS: from 64 blocks, the first 64 timed) */
        long strides[] = {b + 1, 2L * b + 3, b + 256, b + 4101, -(b + 300), 2048, -1024, -(b + 4101)};
        size_t skipped = b > 24 ? 3 : b > 16 ? 1 : 0;
        for (size_t s = 0; s < sizeof strides / sizeof *strides - skipped; s++)
            for (size_t c = 0; c < sizeof counts / sizeof *counts; c++) {
                /* large blocks: fewer counts, the kernels' steps are inside a block */
                if (b > 300 && counts[c] > 9 && counts[c] != 37)
                    continue;
                if (b > 16 && counts[c] == 71) /* the page-apart kernels' count */
                    continue;
                sweep_one(b, strides[s], counts[c]);
            }
    }
    /* rows long enough for the unpack probe (COMMLIB_UNPACK_PROBE: pieces of 1024 blocks and
     * more, the first 64 timed, the rest with or without the prefetch): 8-24-byte blocks far
     * apart, backwards too */
    static const int probe_blocks[] = {8, 12, 16, 24}, probe_counts[] = {1024, 1031, 1100};
    for (size_t i = 0; i < sizeof probe_blocks / sizeof *probe_blocks; i++) {
        int b = probe_blocks[i];
        long strides[] = {b + 256, -(b + 300), 2064};
        for (size_t s = 0; s < sizeof strides / sizeof *strides; s++)
            for (size_t c = 0; c < sizeof probe_counts / sizeof *probe_counts; c++)
                sweep_one(b, strides[s], probe_counts[c]);
    }
    /* 24-byte blocks at the edges of COMMLIB_WIDE_ROWS' strides (32-127: 32-byte moves) */
    static const long wide_strides[] = {31, 32, 33, 127, 128};
    for (size_t s = 0; s < sizeof wide_strides / sizeof *wide_strides; s++)
        for (size_t c = 0; c < sizeof counts / sizeof *counts; c++)
            sweep_one(24, wide_strides[s], counts[c]);
    for (int i = 0; i < n_blocks; i++)
        sweep_dense(blocks[i]);
    long long fast = stat ? stat("pack.fast") + stat("unpack.fast") - fast0 : -1;
    printf("pack_rows: cases=%ld mismatches=%ld fast=%lld\n", cases, mismatches, fast);
    MPI_Finalize();
    return mismatches ? 1 : 0;
}
