/* Many staged device receives completed by one call: a halo's 26 faces posted as
 * MPI_Irecv into device memory with a strided type, completed by MPI_Waitall (round 0 and
 * 1), MPI_Testall polling (round 2) and MPI_Waitsome (round 3).  Rank 1 sends from host
 * memory.  After each completion call the received bytes are copied back and checked
 * (strided elements hold the message, the gaps the sentinel they were filled with).
 *
 * Under the stand-in driver (tests/c/fake_cuda.c) it also reads the stand-in's counters:
 * with FAKE_CUDA_DEFER=1 nothing may still be queued when a completion call returns, and
 * "syncs" reports how many stream synchronisations each MPI_Waitall made (the caller
 * checks that they do not grow with the number of messages).
 * Output: lines "round R call C syncs S pending P", then "batch_recv done failures=F";
 * exit status 1 on failure.  Two ranks. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "cuda_loader.h"

#define MESSAGES 26
#define ELEMENTS 64 /* vector: 64 blocks of 3 doubles, stride 5 */
#define SPAN (ELEMENTS * 5)

static int rank, failures;

static unsigned long long (*fake_syncs)(void);
static size_t (*fake_pending)(void);

static double value(int round, int message, int i) { return round * 100000.0 + message * 1000.0 + i; }

static void report(int round, const char *call, unsigned long long before)
{
    unsigned long long syncs = fake_syncs ? fake_syncs() - before : 0;
    size_t pending = fake_pending ? fake_pending() : 0;
    printf("round %d call %s syncs %llu pending %zu\n", round, call, syncs, pending);
    CHECK(pending == 0, "%zu device operations still queued after %s returned", pending, call);
}

int main(int argc, char **argv)
{
    int size;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (size != 2) {
        if (!rank) printf("batch_recv: needs 2 ranks\n");
        MPI_Finalize();
        return 2;
    }
    int have_cuda = cuda_load(rank, NULL, 0), both = 0;
    MPI_Allreduce(&have_cuda, &both, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (!both) {
        if (!rank) printf("batch_recv: skipped (no CUDA device)\n");
        MPI_Finalize();
        return 0;
    }
    *(void **)&fake_syncs = dlsym(RTLD_DEFAULT, "fake_cuda_stream_syncs");
    *(void **)&fake_pending = dlsym(RTLD_DEFAULT, "fake_cuda_pending");

    MPI_Datatype vec;
    MPI_Type_vector(ELEMENTS, 3, 5, MPI_DOUBLE, &vec);
    MPI_Type_commit(&vec);
    double *host = malloc(SPAN * sizeof(double));
    CUdeviceptr dev[MESSAGES];
    MPI_Request req[MESSAGES];
    for (int m = 0; m < MESSAGES; m++) CHECK(cu.cuMemAlloc(&dev[m], SPAN * sizeof(double)) == 0, "cuMemAlloc");

    static const char *const calls[] = {"Waitall", "Waitall", "Testall", "Waitsome"};
    for (int round = 0; round < 4; round++) {
        if (rank == 1) {
            for (int m = 0; m < MESSAGES; m++) {
                for (int i = 0; i < SPAN; i++) host[i] = value(round, m, i);
                MPI_Send(host, 1, vec, 0, m, MPI_COMM_WORLD);
            }
            MPI_Barrier(MPI_COMM_WORLD);
            continue;
        }
        for (int i = 0; i < SPAN; i++) host[i] = -1.0; /* the gaps must keep it */
        for (int m = 0; m < MESSAGES; m++) {
            cu.cuMemcpyHtoD(dev[m], host, SPAN * sizeof(double));
            MPI_Irecv((void *)(uintptr_t)dev[m], 1, vec, 1, m, MPI_COMM_WORLD, &req[m]);
        }
        MPI_Barrier(MPI_COMM_WORLD); /* every message sent (eager) before the completion call */
        unsigned long long before = fake_syncs ? fake_syncs() : 0;
        MPI_Status st[MESSAGES];
        if (round < 2) {
            CHECK(MPI_Waitall(MESSAGES, req, st) == MPI_SUCCESS, "MPI_Waitall");
            report(round, calls[round], before);
        } else if (round == 2) {
            int flag = 0;
            while (!flag) {
                CHECK(MPI_Testall(MESSAGES, req, &flag, st) == MPI_SUCCESS, "MPI_Testall");
                report(round, calls[round], before);
                before = fake_syncs ? fake_syncs() : 0;
            }
        } else {
            int left = MESSAGES, out, idx[MESSAGES];
            while (left > 0) {
                CHECK(MPI_Waitsome(MESSAGES, req, &out, idx, st) == MPI_SUCCESS, "MPI_Waitsome");
                report(round, calls[round], before);
                before = fake_syncs ? fake_syncs() : 0;
                left -= out;
            }
        }
        for (int m = 0; m < MESSAGES; m++) {
            CHECK(req[m] == MPI_REQUEST_NULL, "request %d not completed", m);
            cu.cuMemcpyDtoH(host, dev[m], SPAN * sizeof(double));
            int bad = 0;
            for (int i = 0; i < SPAN; i++) {
                double want = i % 5 < 3 ? value(round, m, i) : -1.0;
                bad += host[i] != want;
            }
            CHECK(!bad, "round %d message %d: %d wrong doubles", round, m, bad);
        }
        if (round < 2) {
            int count = -1;
            MPI_Get_count(&st[MESSAGES - 1], vec, &count);
            CHECK(count == 1 && st[MESSAGES - 1].MPI_TAG == MESSAGES - 1, "status: count %d tag %d", count,
                  st[MESSAGES - 1].MPI_TAG);
        }
    }
    for (int m = 0; m < MESSAGES; m++) cu.cuMemFree(dev[m]);
    MPI_Type_free(&vec);
    free(host);
    printf("batch_recv done failures=%d\n", failures);
    MPI_Finalize();
    return failures ? 1 : 0;
}
