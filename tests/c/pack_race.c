/* The row race of the host pack engine (COMMLIB_ROW_RACE, pack/host_pack.c): x faces of 3D
 * grids of doubles - blocks of 8 or 16 bytes 2064 bytes apart (a 256^3 grid's ghost-celled
 * rows), 8 bytes 4112 apart (a page and more: 512^3), 8 bytes 2048 apart (1 KiB multiples,
 * never raced) - with the face's rows (its planes) and blocks a row on both sides of the
 * race's limits (16 rows; 64 blocks a row, the probe's).  Each face is packed PACKS times
 * (the race takes the first 4: both loops run) by MPI_Pack (commlib when preloaded) and
 * PMPI_Pack (the host MPI), at an odd position, and must match every time; then unpacked by
 * both into copies of one random grid, which must match.
 *
 * The last line is always
 *   pack_race: cases=N mismatches=M expected=E races=R one=O probed=PE probed_24=P24 probes=P warm=W
 * E: the faces whose race should end where COMMLIB_ROW_RACE is on and the probes' verdict is
 * "cached" (COMMLIB_TEST_ROW_PROBE_CACHED=1: one slot a shape); R and O: the
 * commlib_stat("pack.races") and ("pack.races_one_a_step") deltas (-1 without the preload).
 * PE: the faces whose unpack COMMLIB_UNPACK_PROBE times (8-24-byte blocks under a page apart,
 * rows of 64 blocks or more, 1024 blocks or more a face; 8-16 bytes only where
 * COMMLIB_UNPACK_PREFETCH is on); P24: those of 24-byte blocks (COMMLIB_UNPACK_PROBE=24 and Intel's
 * auto probe only these); P and W: the
 * commlib_stat("unpack.probes") and ("unpack.probes_warm") deltas (-1 without the preload).
 * Exit status 1 on a mismatch.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define START 5
#define PACKS 6

typedef long long (*stat_fn)(const char *name);
static long cases, mismatches, expected, probed, probed_24;
static uint64_t rng = 0x7ace;

static void fill_random(unsigned char *p, size_t n) /* n: a multiple of 8 */
{
    for (size_t i = 0; i < n; i += 8) {
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        uint64_t v = rng ^ (rng >> 29);
        memcpy(p + i, &v, 8);
    }
}

/* The face of `zs` planes of `ys` rows of `w` doubles of a grid of (zs+2, ys+3, x) doubles. */
static void one_face(int x, int ys, int zs, int w)
{
    int sizes[3] = {zs + 2, ys + 3, x}, sub[3] = {zs, ys, w}, starts[3] = {1, 2, 1};
    MPI_Datatype face;
    MPI_Type_create_subarray(3, sizes, sub, starts, MPI_ORDER_C, MPI_DOUBLE, &face);
    MPI_Type_commit(&face);
    size_t span = (size_t)sizes[0] * sizes[1] * sizes[2] * sizeof(double);
    int packed_size = 0;
    PMPI_Pack_size(1, face, MPI_COMM_WORLD, &packed_size);
    size_t out_len = (size_t)packed_size + START + 8; /* a byte past the end must stay untouched */
    unsigned char *grid = malloc(span), *a = malloc(out_len), *b = malloc(out_len);
    unsigned char *u1 = malloc(span), *u2 = malloc(span);
    if (!grid || !a || !b || !u1 || !u2) {
        fprintf(stderr, "pack_race: out of memory\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    fill_random(grid, span);
    int bad = 0, pa = START, pb = START;
    for (int k = 0; k < PACKS && !bad; k++) {
        memset(a, 0xa5, out_len);
        memset(b, 0x5a, out_len);
        pa = pb = START;
        MPI_Pack(grid, 1, face, a, (int)out_len, &pa, MPI_COMM_WORLD);
        PMPI_Pack(grid, 1, face, b, (int)out_len, &pb, MPI_COMM_WORLD);
        bad = pa != pb || memcmp(a + START, b + START, (size_t)packed_size) || a[0] != 0xa5 ||
              a[START + packed_size] != 0xa5;
    }
    fill_random(u1, span);
    memcpy(u2, u1, span);
    int ua = START, ub = START;
    MPI_Unpack(b, (int)out_len, &ua, u1, 1, face, MPI_COMM_WORLD);
    PMPI_Unpack(b, (int)out_len, &ub, u2, 1, face, MPI_COMM_WORLD);
    bad |= ua != ub || memcmp(u1, u2, span);
    cases++;
    if (bad) {
        mismatches++;
        printf("MISMATCH x=%d ys=%d zs=%d w=%d (positions %d/%d, %d/%d)\n", x, ys, zs, w, pa, pb, ua, ub);
    }
    long stride = (long)x * sizeof(double);
    int block = w * (int)sizeof(double);
    int aliased = stride % 1024 == 0, page = stride >= 4096;
    if (zs >= 16 && ys >= 64 && !aliased && ((!page && (block == 8 || block == 16)) || (page && block == 8)))
        expected++;
    if (!page && ys >= 64 && ys * zs >= 1024) { /* host_pack.c's UNPACK_PROBE_MIN_BLOCKS */
        probed++;
        if (block == 24) probed_24++;
    }
    free(grid), free(a), free(b), free(u1), free(u2);
    MPI_Type_free(&face);
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    stat_fn stat = (stat_fn)dlsym(RTLD_DEFAULT, "commlib_stat");
    long long races0 = stat ? stat("pack.races") : -1, one0 = stat ? stat("pack.races_one_a_step") : -1;
    long long probes0 = stat ? stat("unpack.probes") : -1, warm0 = stat ? stat("unpack.probes_warm") : -1;
    static const int xs[] = {258, 514, 256}; /* 2064, 4112 and 2048 bytes apart */
    static const int rows_a_plane[] = {31, 63, 64, 67};
    static const int planes[] = {15, 16, 17, 64};
    for (size_t i = 0; i < sizeof xs / sizeof *xs; i++)
        for (int w = 1; w <= 3; w++)
            for (size_t r = 0; r < sizeof rows_a_plane / sizeof *rows_a_plane; r++)
                for (size_t p = 0; p < sizeof planes / sizeof *planes; p++)
                    one_face(xs[i], rows_a_plane[r], planes[p], w);
    long long races = stat ? stat("pack.races") - races0 : -1, one = stat ? stat("pack.races_one_a_step") - one0 : -1;
    long long probes = stat ? stat("unpack.probes") - probes0 : -1, warm = stat ? stat("unpack.probes_warm") - warm0 : -1;
    printf("pack_race: cases=%ld mismatches=%ld expected=%ld races=%lld one=%lld probed=%ld probed_24=%ld "
           "probes=%lld warm=%lld\n",
           cases, mismatches, expected, races, one, probed, probed_24, probes, warm);
    MPI_Finalize();
    return mismatches ? 1 : 0;
}
