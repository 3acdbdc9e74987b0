/* Several threads commit, pack, unpack and free datatypes at once (MPI_THREAD_MULTIPLE):
 * the canonical-form cache must stay consistent and every pack byte-identical to the
 * host MPI's.  Prints "threads_pack: threads=T rounds=R mismatches=M fast=F". */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <mpi.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define THREADS 4
#define ROUNDS 400

static int mismatches;
static pthread_mutex_t count_lock = PTHREAD_MUTEX_INITIALIZER;

static void *worker(void *arg)
{
    unsigned seed = (unsigned)(uintptr_t)arg * 7919u + 1;
    double *src = malloc(64 * 64 * sizeof(double)), *back = malloc(64 * 64 * sizeof(double));
    char *a = malloc(64 * 64 * 8), *b = malloc(64 * 64 * 8);
    for (int i = 0; i < 64 * 64; i++) src[i] = i + (double)(uintptr_t)arg / 8;
    int bad = 0;
    for (int round = 0; round < ROUNDS; round++) {
        int count = 1 + (int)(rand_r(&seed) % 16), blocklen = 1 + (int)(rand_r(&seed) % 4);
        int stride = blocklen + (int)(rand_r(&seed) % 4);
        MPI_Datatype vec;
        MPI_Type_vector(count, blocklen, stride, MPI_DOUBLE, &vec);
        MPI_Type_commit(&vec);
        int pa = 0, pb = 0, pu = 0;
        MPI_Pack(src, 2, vec, a, 64 * 64 * 8, &pa, MPI_COMM_SELF);
        PMPI_Pack(src, 2, vec, b, 64 * 64 * 8, &pb, MPI_COMM_SELF);
        memset(back, 0, 64 * 64 * sizeof(double));
        MPI_Unpack(a, pa, &pu, back, 2, vec, MPI_COMM_SELF);
        if (pa != pb || memcmp(a, b, (size_t)pa) || pu != pa) bad++;
        for (int e = 0; e < 2; e++) /* the unpacked blocks hold the source values */
            for (int c = 0; c < count; c++)
                for (int k = 0; k < blocklen; k++) {
                    long at = (long)e * ((count - 1) * stride + blocklen) + (long)c * stride + k;
                    if (back[at] != src[at]) bad++;
                }
        MPI_Type_free(&vec);
    }
    pthread_mutex_lock(&count_lock);
    mismatches += bad;
    pthread_mutex_unlock(&count_lock);
    free(src);
    free(back);
    free(a);
    free(b);
    return NULL;
}

int main(int argc, char **argv)
{
    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
    if (provided < MPI_THREAD_MULTIPLE) {
        printf("threads_pack: skipped (MPI_THREAD_MULTIPLE not provided)\n");
        MPI_Finalize();
        return 0;
    }
    long long (*stat)(const char *) = (long long (*)(const char *))dlsym(RTLD_DEFAULT, "commlib_stat");
    pthread_t threads[THREADS];
    for (long t = 0; t < THREADS; t++) pthread_create(&threads[t], NULL, worker, (void *)t);
    for (int t = 0; t < THREADS; t++) pthread_join(threads[t], NULL);
    printf("threads_pack: threads=%d rounds=%d mismatches=%d fast=%lld\n", THREADS, ROUNDS, mismatches,
           stat ? stat("pack.fast") : -1LL);
    MPI_Finalize();
    return mismatches ? 1 : 0;
}
