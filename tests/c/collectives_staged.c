/* Collectives whose buffers commlib stages (device memory on a GPU machine; host memory
 * under COMMLIB_STAGE_HOST=1 on any machine).  Every result is checked against values
 * computed here, and the gaps of derived types must survive the copy back.
 * Prints "collectives: ranks=P checks=N failures=F staged=S". */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int checks, failures;

static void expect(int ok, const char *what, int rank)
{
    checks++;
    if (!ok) {
        failures++;
        fprintf(stderr, "rank %d: FAILED %s\n", rank, what);
    }
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    long long (*stat)(const char *) = (long long (*)(const char *))dlsym(RTLD_DEFAULT, "commlib_stat");

    /* Allreduce, out of place and in place */
    double in[8], out[8];
    for (int i = 0; i < 8; i++) in[i] = rank + i;
    MPI_Allreduce(in, out, 8, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    int ok = 1;
    for (int i = 0; i < 8; i++) ok &= out[i] == size * (size - 1) / 2.0 + size * i;
    expect(ok, "allreduce", rank);
    MPI_Allreduce(MPI_IN_PLACE, in, 8, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    ok = 1;
    for (int i = 0; i < 8; i++) ok &= in[i] == size - 1 + i;
    expect(ok, "allreduce in place", rank);

    /* Reduce to the last rank; other ranks' receive buffers are left untouched */
    int mine[4] = {rank, 2 * rank, 3 * rank, 1}, sum[4] = {-7, -7, -7, -7};
    MPI_Reduce(mine, sum, 4, MPI_INT, MPI_SUM, size - 1, MPI_COMM_WORLD);
    int tri = size * (size - 1) / 2;
    if (rank == size - 1) expect(sum[0] == tri && sum[1] == 2 * tri && sum[2] == 3 * tri && sum[3] == size, "reduce", rank);
    else expect(sum[0] == -7 && sum[3] == -7, "reduce leaves non-root buffers alone", rank);

    /* Bcast of every other double: the gaps keep their own values */
    double strided[16];
    for (int i = 0; i < 16; i++) strided[i] = rank == 0 ? 100 + i : -1000 - rank;
    MPI_Datatype every_other;
    MPI_Type_vector(8, 1, 2, MPI_DOUBLE, &every_other);
    MPI_Type_commit(&every_other);
    MPI_Bcast(strided, 1, every_other, 0, MPI_COMM_WORLD);
    ok = 1;
    for (int i = 0; i < 16; i++) ok &= strided[i] == (i % 2 == 0 || rank == 0 ? 100 + i : -1000 - rank);
    expect(ok, "bcast with a vector type keeps the gaps", rank);

    /* Allgather and Alltoall */
    int *gathered = malloc(sizeof(int) * 2 * size), pair[2] = {rank, rank * rank};
    MPI_Allgather(pair, 2, MPI_INT, gathered, 2, MPI_INT, MPI_COMM_WORLD);
    ok = 1;
    for (int r = 0; r < size; r++) ok &= gathered[2 * r] == r && gathered[2 * r + 1] == r * r;
    expect(ok, "allgather", rank);
    int *to = malloc(sizeof(int) * size), *from = malloc(sizeof(int) * size);
    for (int r = 0; r < size; r++) to[r] = 1000 * rank + r;
    MPI_Alltoall(to, 1, MPI_INT, from, 1, MPI_INT, MPI_COMM_WORLD);
    ok = 1;
    for (int r = 0; r < size; r++) ok &= from[r] == 1000 * r + rank;
    expect(ok, "alltoall", rank);

    /* Alltoallv: rank r sends r+1 ints to everyone, placed with a gap of one */
    int *scount = malloc(sizeof(int) * size), *sdispl = malloc(sizeof(int) * size);
    int *rcount = malloc(sizeof(int) * size), *rdispl = malloc(sizeof(int) * size);
    int *sv = malloc(sizeof(int) * (size_t)(rank + 1)), total = 0;
    for (int i = 0; i <= rank; i++) sv[i] = rank * 10 + i;
    for (int r = 0; r < size; r++) {
        scount[r] = rank + 1;
        sdispl[r] = 0;
        rcount[r] = r + 1;
        rdispl[r] = total;
        total += r + 2;
    }
    int *rv = malloc(sizeof(int) * (size_t)total);
    for (int i = 0; i < total; i++) rv[i] = -5;
    MPI_Alltoallv(sv, scount, sdispl, MPI_INT, rv, rcount, rdispl, MPI_INT, MPI_COMM_WORLD);
    ok = 1;
    for (int r = 0; r < size; r++) {
        for (int i = 0; i <= r; i++) ok &= rv[rdispl[r] + i] == r * 10 + i;
        ok &= rv[rdispl[r] + r + 1] == -5; /* the gap */
    }
    expect(ok, "alltoallv", rank);

    /* Neighbour exchanges on a periodic ring */
    MPI_Comm ring;
    int dims[1] = {size}, periods[1] = {1};
    MPI_Cart_create(MPI_COMM_WORLD, 1, dims, periods, 0, &ring);
    int left = (rank + size - 1) % size, right = (rank + 1) % size;
    int nsend[2] = {rank * 2, rank * 2 + 1}, nrecv[2] = {-1, -1}, ones[2] = {1, 1}, nd[2] = {0, 1};
    MPI_Neighbor_alltoallv(nsend, ones, nd, MPI_INT, nrecv, ones, nd, MPI_INT, ring);
    /* from the left neighbour its "up" value, from the right its "down" value */
    expect(nrecv[0] == left * 2 + 1 && nrecv[1] == right * 2, "neighbor_alltoallv", rank);
    MPI_Aint bd[2] = {0, sizeof(int)};
    MPI_Datatype types[2] = {MPI_INT, MPI_INT};
    nrecv[0] = nrecv[1] = -1;
    MPI_Neighbor_alltoallw(nsend, ones, bd, types, nrecv, ones, bd, types, ring);
    expect(nrecv[0] == left * 2 + 1 && nrecv[1] == right * 2, "neighbor_alltoallw", rank);

    long long staged = stat ? stat("collective.staged") : -1;
    int all_failures = 0;
    MPI_Allreduce(&failures, &all_failures, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (rank == 0) printf("collectives: ranks=%d checks=%d failures=%d staged=%lld\n", size, checks, all_failures, staged);
    MPI_Type_free(&every_other);
    MPI_Comm_free(&ring);
    free(gathered); free(to); free(from); free(scount); free(sdispl); free(rcount); free(rdispl); free(sv); free(rv);
    MPI_Finalize();
    return all_failures ? 1 : 0;
}
