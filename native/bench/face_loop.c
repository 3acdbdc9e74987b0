/* One x face of an N^3 grid of doubles with ghost cells ((N+2)^3; W doubles a block, 2064
 * bytes apart for N = 256, 4112 for 512) packed over and over by MPI_Pack, in batches: the best
 * call of each batch, and how many row races (COMMLIB_ROW_RACE, pack/host_pack.c) ended in it
 * and how many one block a step won (commlib_stat "pack.races", "pack.races_one_a_step").
 * With COLD 1 the caches are flushed (512 MiB written) before each call; with HOST 1 the host
 * MPI's own PMPI_Pack runs instead.  Under the preload (LD_PRELOAD=$(commlib lib)) it shows which
 * loop the race picks on this CPU and what that costs or gains; alternate COMMLIB_ROW_RACE=0/1,
 * or force a winner with COMMLIB_TEST_ROW_RACE_WINNER=0/1:
 *
 *   mpicc -O2 -o /tmp/face_loop native/bench/face_loop.c -ldl
 *   LD_PRELOAD=$(commlib lib) /tmp/face_loop N W [REPS [HOST [COLD]]]     (REPS: calls a batch, 50)
 *
 * Output: "batch B best US us races R one O", 8 batches.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef long long (*stat_fn)(const char *);

static double now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec * 1e-3;
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    if (argc < 3) {
        fprintf(stderr, "usage: %s N W [REPS [HOST [COLD]]]\n", argv[0]);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    int n = atoi(argv[1]), w = atoi(argv[2]), reps = argc > 3 ? atoi(argv[3]) : 50;
    int host = argc > 4 && atoi(argv[4]), cold = argc > 5 && atoi(argv[5]);
    int sizes[3] = {n + 2, n + 2, n + 2}, sub[3] = {n, n, w}, starts[3] = {1, 1, 1};
    MPI_Datatype face;
    MPI_Type_create_subarray(3, sizes, sub, starts, MPI_ORDER_C, MPI_DOUBLE, &face);
    MPI_Type_commit(&face);
    size_t span = (size_t)sizes[0] * sizes[1] * sizes[2] * sizeof(double), flush_len = (size_t)512 << 20;
    char *grid = malloc(span), *flush = cold ? malloc(flush_len) : NULL;
    int packed_size = 0;
    MPI_Pack_size(1, face, MPI_COMM_WORLD, &packed_size);
    char *out = malloc((size_t)packed_size);
    if (!grid || !out || (cold && !flush)) {
        fprintf(stderr, "face_loop: out of memory\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    memset(grid, 1, span);
    if (cold) memset(flush, 0, flush_len);
    stat_fn stat = (stat_fn)dlsym(RTLD_DEFAULT, "commlib_stat");
    for (int b = 0; b < 8; b++) {
        long long races0 = stat ? stat("pack.races") : -1, one0 = stat ? stat("pack.races_one_a_step") : -1;
        double best = 1e300;
        for (int i = 0; i < reps; i++) {
            if (cold)
                for (size_t k = 0; k < flush_len; k += 64) flush[k]++;
            int pos = 0;
            double t = now_us();
            if (host) PMPI_Pack(grid, 1, face, out, packed_size, &pos, MPI_COMM_WORLD);
            else MPI_Pack(grid, 1, face, out, packed_size, &pos, MPI_COMM_WORLD);
            t = now_us() - t;
            if (t < best) best = t;
        }
        printf("batch %d best %.0f us races %lld one %lld\n", b, best, stat ? stat("pack.races") - races0 : -1,
               stat ? stat("pack.races_one_a_step") - one0 : -1);
    }
    free(grid), free(out), free(flush);
    MPI_Type_free(&face);
    MPI_Finalize();
    return 0;
}
