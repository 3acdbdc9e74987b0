/* Device pointers kept while CUPTI watches (cuda/pointer_cache.h, COMMLIB_DEVICE_PACK_HOLD=1):
 * repeated MPI_Pack calls between two device allocations ask the driver about them once,
 * and every CUDA call that may allocate, free or map memory makes the next call ask again.
 * Under the stand-in driver, which stands in for CUPTI (tests/c/fake_cuda.c).
 * Prints "pointer_cache: hits=H steady=S after=A,A,A,A packs=P ok=K"; S: the driver queries of
 * 10 calls after the first two (0 when kept; the first hold subscribes), A: those of the call
 * after each memory call (2: both pointers asked again), K: every pack's bytes right.
 * Then "contexts: steady=C switched=W" (stand-in driver only): C, the cuCtxSetCurrent calls of
 * 10 packs (0 when the current context is kept too); W, those of a pack after the program made
 * no context current (cuCtxSetCurrent(NULL): at least 1, and the pack right - under
 * FAKE_CUDA_STRICT_CONTEXT=1 a launch without a current context fails). */
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "cuda_loader.h"

typedef long long (*stat_fn)(const char *);
static stat_fn stat;
static CUdeviceptr a, b;
static MPI_Datatype every_other;
static long packs, wrong;

static long long asked(void) { return stat ? stat("pointer_cache.asked") : -1; }

/* one MPI_Pack of 64 doubles of a (every other one) into b, checked */
static void pack(void)
{
    int size, at = 0;
    MPI_Pack_size(1, every_other, MPI_COMM_WORLD, &size);
    MPI_Pack((void *)(uintptr_t)a, 1, every_other, (void *)(uintptr_t)b, size, &at, MPI_COMM_WORLD);
    double out[64];
    cu.cuMemcpyDtoH(out, b, sizeof out);
    for (int i = 0; i < 64; i++) wrong += out[i] != 2.0 * i;
    packs++;
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    if (!cuda_load(0, NULL, 0)) {
        printf("pointer_cache: no CUDA driver\n");
        MPI_Finalize();
        return 1;
    }
    stat = (stat_fn)dlsym(RTLD_DEFAULT, "commlib_stat");
    double in[128];
    for (int i = 0; i < 128; i++) in[i] = i;
    cu.cuMemAlloc(&a, sizeof in);
    cu.cuMemAlloc(&b, sizeof in);
    cu.cuMemcpyHtoD(a, in, sizeof in);
    MPI_Type_vector(64, 1, 2, MPI_DOUBLE, &every_other);
    MPI_Type_commit(&every_other);

    pack(); /* its hold subscribes to CUPTI: kept from the next call on */
    pack();
    long long before = asked();
    for (int i = 0; i < 10; i++) pack();
    long long steady = asked() - before;

    printf("pointer_cache: hits=%lld steady=%lld after=", stat ? stat("pointer_cache.hits") : -1, steady);
    for (int k = 0; k < 4; k++) {
        CUdeviceptr c = 0;
        if (k == 0) cu.cuMemAlloc(&c, 4096);                           /* allocates */
        if (k == 1) cu.cuMemAllocManaged(&c, 4096, CU_MEM_ATTACH_GLOBAL); /* allocates */
        if (k >= 2) {
            cu.cuMemAllocManaged(&c, 4096, CU_MEM_ATTACH_GLOBAL);
            pack(); /* kept again */
        }
        if (k >= 2) cu.cuMemFree(c); /* frees */
        long long at = asked();
        pack();
        printf("%s%lld", k ? "," : "", asked() - at);
    }
    printf(" packs=%ld ok=%d\n", packs, wrong == 0);

    unsigned long long (*sets)(void) = (unsigned long long (*)(void))dlsym(RTLD_DEFAULT, "fake_cuda_context_sets");
    if (sets) {
        pack();
        unsigned long long at = sets();
        for (int i = 0; i < 10; i++) pack();
        unsigned long long steady = sets() - at;
        CUcontext mine = NULL;
        cu.cuCtxGetCurrent(&mine);
        cu.cuCtxSetCurrent(NULL); /* the program's own switch: commlib must make its context current again */
        at = sets();
        long before = wrong;
        pack();
        unsigned long long switched = sets() - at;
        /* and a message to itself, every other double of a into b (a staged send's pack launches at once) */
        cu.cuCtxSetCurrent(NULL);
        double out[64];
        memset(out, 0, sizeof out);
        cu.cuMemcpyHtoD(b, out, sizeof out);
        int rc = MPI_Sendrecv((void *)(uintptr_t)a, 1, every_other, 0, 5, (void *)(uintptr_t)b, 64, MPI_DOUBLE, 0, 5,
                              MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        cu.cuCtxSetCurrent(mine);
        cu.cuMemcpyDtoH(out, b, sizeof out);
        for (int i = 0; i < 64; i++) wrong += rc != MPI_SUCCESS || out[i] != 2.0 * i;
        cu.cuCtxSetCurrent(mine);
        printf("contexts: steady=%llu switched=%llu ok=%d\n", steady, switched, wrong == before);
    }
    MPI_Type_free(&every_other);
    cu.cuMemFree(a);
    cu.cuMemFree(b);
    MPI_Finalize();
    return wrong != 0;
}
