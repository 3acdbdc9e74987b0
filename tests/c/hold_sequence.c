/* Held device MPI_Pack/MPI_Unpack (COMMLIB_DEVICE_PACK_HOLD=1, pack/device_hold.h) keep the
 * program's order.  Random sequences of MPI_Pack and MPI_Unpack on one device allocation -
 * the faces and halos of a grid in it, random vectors, contiguous runs, anywhere, so that
 * ops overlap each other's bytes - mirrored on a host copy through the host MPI's own
 * PMPI_Pack/PMPI_Unpack; between them the program's own CUDA calls: it writes bytes
 * (cuMemcpyHtoD, which must come after the held ops that read them) and reads the whole
 * allocation back (cuMemcpyDtoH), compared with the mirror.  Under the stand-in driver
 * (FAKE_CUDA_KERNELS=1 FAKE_CUDA_DEFER=1 FAKE_CUDA_BATCH_ORDER=reverse) a held op launched
 * late, or with one it depends on in the same launch, comes out as wrong bytes.
 *   hold_sequence [rounds] [seed]
 * Prints "hold_sequence: ops=N writes=W checks=C mismatches=M held=H launches=L overlaps=O". */
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_loader.h"

#define ARENA (96 * 1024)
#define GRID_AT 40960 /* the grid's place in the arena (any alignment works) */

typedef long long (*stat_fn)(const char *);
static uint64_t state;
static int rnd(int n)
{
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;
    return (int)(state % (uint64_t)n);
}

/* A box of a grid of (n+2r)^3 cells, q doubles each (q slowest), as halo3d's types. */
static MPI_Datatype box_type(int n, int r, int q, const int *lo, const int *len)
{
    int sizes[4] = {q, n + 2 * r, n + 2 * r, n + 2 * r}, sub[4] = {q, len[2], len[1], len[0]},
        starts[4] = {0, lo[2], lo[1], lo[0]};
    MPI_Datatype t;
    MPI_Type_create_subarray(4, sizes, sub, starts, MPI_ORDER_C, MPI_DOUBLE, &t);
    MPI_Type_commit(&t);
    return t;
}

static MPI_Datatype types[64];
static int ntypes, grid_types;

static void make_types(void)
{
    const int n = 6, r = 2, q = 2;
    for (int pass = 0; pass < 2; pass++) /* the halo's boxes and the interior's */
        for (int d = 0; d < 27; d++) {
            int dir[3] = {d % 3 - 1, d / 3 % 3 - 1, d / 9 - 1}, lo[3], len[3];
            if (!dir[0] && !dir[1] && !dir[2]) continue;
            if (rnd(2)) continue; /* half of them: 26 types in all, more or less */
            for (int k = 0; k < 3; k++) {
                if (!dir[k]) lo[k] = r, len[k] = n;
                else if (pass == 0) lo[k] = dir[k] < 0 ? 0 : n + r, len[k] = r;
                else lo[k] = dir[k] < 0 ? r : n, len[k] = r;
            }
            types[ntypes++] = box_type(n, r, q, lo, len);
        }
    grid_types = ntypes;
    for (int i = 0; i < 10; i++) { /* vectors of bytes, ints and doubles */
        MPI_Datatype base = i % 3 == 0 ? MPI_BYTE : i % 3 == 1 ? MPI_INT : MPI_DOUBLE, t;
        MPI_Type_vector(1 + rnd(12), 1 + rnd(4), 5 + rnd(9), base, &t);
        MPI_Type_commit(&t);
        types[ntypes++] = t;
    }
    MPI_Datatype t;
    MPI_Type_contiguous(200 + rnd(300), MPI_BYTE, &t);
    MPI_Type_commit(&t);
    types[ntypes++] = t;
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    int rounds = argc > 1 ? atoi(argv[1]) : 200;
    state = 0x2545f4914f6cdd1dull ^ (uint64_t)(argc > 2 ? atoll(argv[2]) : 1) * 0x9e3779b97f4a7c15ull;
    if (!cuda_load(0, NULL, 0)) {
        printf("hold_sequence: no CUDA driver\n");
        MPI_Finalize();
        return 2;
    }
    make_types();
    CUdeviceptr dev;
    unsigned char *mirror = malloc(ARENA), *back = malloc(ARENA), *scratch = malloc(ARENA);
    if (cu.cuMemAlloc(&dev, ARENA) || !mirror || !back || !scratch) return 3;
    char *d = (char *)(uintptr_t)dev;
    for (int i = 0; i < ARENA; i++) mirror[i] = (unsigned char)rnd(256);
    cu.cuMemcpyHtoD(dev, mirror, ARENA);
    long ops = 0, writes = 0, checks = 0, mismatches = 0;
    for (int round = 0; round < rounds; round++) {
        int burst = 1 + rnd(40);
        for (int k = 0; k < burst; k++) {
            MPI_Datatype t = types[rnd(ntypes)];
            int count = 1 + rnd(2), size;
            MPI_Aint lb, extent, true_lb, true_extent;
            MPI_Type_size(t, &size);
            MPI_Type_get_extent(t, &lb, &extent);
            MPI_Type_get_true_extent(t, &true_lb, &true_extent);
            long span = (long)(true_extent + (count - 1) * extent), bytes = (long)size * count;
            if (span + bytes > ARENA / 2) count = 1, span = (long)true_extent, bytes = size;
            /* the grid's boxes at the grid's place (mostly), anything else anywhere */
            long typed = rnd(ntypes) < grid_types && rnd(4) ? GRID_AT : rnd(ARENA - (int)span) - (long)true_lb;
            if (typed + true_lb < 0 || typed + true_lb + span > ARENA) continue;
            long packed = rnd(ARENA - (int)bytes);
            if (packed < typed + true_lb + span && typed + true_lb < packed + bytes) continue; /* an op's own sides apart */
            int packing = rnd(2), pos = 0, pos_ref = 0;
            if (packing) {
                MPI_Pack(d + typed, count, t, d + packed, (int)bytes, &pos, MPI_COMM_SELF);
                PMPI_Pack(mirror + typed, count, t, mirror + packed, (int)bytes, &pos_ref, MPI_COMM_SELF);
            } else {
                MPI_Unpack(d + packed, (int)bytes, &pos, d + typed, count, t, MPI_COMM_SELF);
                PMPI_Unpack(mirror + packed, (int)bytes, &pos_ref, mirror + typed, count, t, MPI_COMM_SELF);
            }
            if (pos != pos_ref) mismatches++;
            ops++;
        }
        if (rnd(3) == 0) { /* the program writes bytes that held ops may read or write */
            int at = rnd(ARENA - 512), n = 1 + rnd(512);
            for (int i = 0; i < n; i++) mirror[at + i] = scratch[i] = (unsigned char)rnd(256);
            cu.cuMemcpyHtoD(dev + (CUdeviceptr)at, scratch, (size_t)n);
            writes++;
        }
        if (rnd(2) == 0 || round == rounds - 1) {
            cu.cuMemcpyDtoH(back, dev, ARENA);
            checks++;
            for (int i = 0; i < ARENA; i++)
                if (back[i] != mirror[i]) {
                    if (mismatches < 5) fprintf(stderr, "hold_sequence: round %d: byte %d differs\n", round, i);
                    mismatches++;
                    memcpy(back, mirror, ARENA); /* start again from the mirror */
                    cu.cuMemcpyHtoD(dev, mirror, ARENA);
                    break;
                }
        }
    }
    stat_fn stat = (stat_fn)dlsym(RTLD_DEFAULT, "commlib_stat");
    printf("hold_sequence: ops=%ld writes=%ld checks=%ld mismatches=%ld held=%lld launches=%lld overlaps=%lld\n", ops,
           writes, checks, mismatches, stat ? stat("device.held") : -1, stat ? stat("device.hold_launches") : -1,
           stat ? stat("device.hold_overlaps") : -1);
    for (int i = 0; i < ntypes; i++) MPI_Type_free(&types[i]);
    cu.cuMemFree(dev);
    MPI_Finalize();
    return mismatches != 0;
}
