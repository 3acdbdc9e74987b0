/* The start of the paired device tests (ipc_p2p.c, ipc_small.c, pipeline_p2p.c): MPI up,
 * errors returned, the CUDA driver loaded on every rank (tests/c/cuda_loader.h) and an even
 * rank count, for pairs (r, r ^ 1).  Returns 1 to go on; 0 after printing "NAME: skipped
 * (why)" on rank 0 and finalizing MPI. */
#ifndef TESTS_PAIRS_START_H
#define TESTS_PAIRS_START_H

#include <mpi.h>
#include <stdio.h>

#include "cuda_loader.h"

static int pairs_start(int *argc, char ***argv, const char *name, int *rank, int *size)
{
    MPI_Init(argc, argv);
    MPI_Comm_rank(MPI_COMM_WORLD, rank);
    MPI_Comm_size(MPI_COMM_WORLD, size);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    int have = cuda_load(*rank, NULL, 0), all = 0;
    MPI_Allreduce(&have, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (all && *size % 2 == 0) return 1;
    if (!*rank) printf("%s: skipped (%s)\n", name, all ? "odd rank count" : "no CUDA device");
    MPI_Finalize();
    return 0;
}

#endif
