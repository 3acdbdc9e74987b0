/* How many device copies a staged device message costs: rank 0 sends 20 messages of 4096
 * MPI_BYTE and 20 of 1024 MPI_INT from device memory, rank 1 receives them into device
 * memory (both sides through commlib's staging) and checks every byte.  Under the stand-in
 * driver (tests/c/fake_cuda.c) with FAKE_CUDA_COUNTS=1 each process prints its copies at
 * exit: the caller checks that a contiguous message takes a copy or two, not one per
 * element (without pack kernels the receive side once copied each MPI_BYTE alone).
 * Output: "copies_per_message done failures=F"; exit status 1 on failure.  Two ranks. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "cuda_loader.h"

#define MESSAGES 20
#define BYTES 4096

static int rank, failures;

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (!cuda_load(0, NULL, 0)) {
        if (rank == 0) printf("copies_per_message: skipped (no CUDA driver)\n");
        MPI_Finalize();
        return 0;
    }
    CUdeviceptr buf;
    unsigned char *host = malloc(BYTES);
    CHECK(host && cu.cuMemAlloc(&buf, BYTES) == 0, "allocation failed");
    for (int m = 0; m < 2 * MESSAGES && !failures; m++) {
        MPI_Datatype type = m < MESSAGES ? MPI_BYTE : MPI_INT;
        int count = m < MESSAGES ? BYTES : BYTES / 4;
        if (rank == 0) {
            for (int i = 0; i < BYTES; i++) host[i] = (unsigned char)(i * 7 + m);
            cu.cuMemcpyHtoD(buf, host, BYTES);
            MPI_Send((void *)buf, count, type, 1, m, MPI_COMM_WORLD);
        } else if (rank == 1) {
            memset(host, 0, BYTES);
            cu.cuMemcpyHtoD(buf, host, BYTES);
            MPI_Recv((void *)buf, count, type, 0, m, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            cu.cuMemcpyDtoH(host, buf, BYTES);
            int wrong = 0;
            for (int i = 0; i < BYTES; i++) wrong += host[i] != (unsigned char)(i * 7 + m);
            CHECK(!wrong, "message %d: %d bytes wrong", m, wrong);
        }
    }
    cu.cuMemFree(buf);
    free(host);
    int all = 0;
    MPI_Allreduce(&failures, &all, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    MPI_Finalize();
    if (rank == 0) printf("copies_per_message done failures=%d\n", all);
    return all != 0;
}
