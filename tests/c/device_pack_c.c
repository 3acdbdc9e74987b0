/* device_pack_c: MPI_Pack / MPI_Unpack on GPU memory from a plain C MPI program.
 *
 * No CUDA headers or libraries: device memory comes from the driver API, found with
 * dlopen("libcuda.so.1").  Every case packs from device memory (into device and into host
 * memory), packs host memory into device memory, and unpacks device -> device, and
 * compares every byte with PMPI_Pack / PMPI_Unpack of host copies (the host MPI on host
 * memory), including the bytes around the packed range, which must stay untouched.
 *
 * Under commlib (`commlib run -n 1 ./device_pack_c`) the device buffers are packed by
 * commlib's device engine.  Without commlib a host MPI that is not CUDA-aware reads device
 * pointers as host memory and crashes or fails: only run it under commlib.
 *
 * Output: one "FAIL ..." line per mismatch, then
 *   device_pack_c: cases=N mismatches=M device=NAME
 * and exit status 0 only when every case matched; 77 when there is no usable GPU.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_loader.h"

static void check(CUresult rc, const char *what)
{
    if (rc == 0) return;
    fprintf(stderr, "device_pack_c: %s failed: CUDA error %d\n", what, rc);
    PMPI_Abort(MPI_COMM_WORLD, 2);
}

/* 0 when CUDA or a device is missing. */
static int cuda_open(char *name, int len) { return cuda_load(0, name, len); }

static void *device_alloc(size_t bytes)
{
    CUdeviceptr p;
    check(cu.cuMemAlloc(&p, bytes ? bytes : 1), "cuMemAlloc");
    return (void *)(uintptr_t)p;
}
static void to_device(void *dst, const void *src, size_t n)
{
    check(cu.cuMemcpyHtoD((CUdeviceptr)(uintptr_t)dst, src, n), "cuMemcpyHtoD");
}
static void to_host(void *dst, const void *src, size_t n)
{
    check(cu.cuMemcpyDtoH(dst, (CUdeviceptr)(uintptr_t)src, n), "cuMemcpyDtoH");
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static void fill_random(unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        p[i] = (unsigned char)rng_state;
    }
}

static int cases, mismatches;

static void report(const char *name, const char *what, int count, int start, const unsigned char *got,
                   const unsigned char *want, size_t n)
{
    cases++;
    for (size_t i = 0; i < n; i++)
        if (got[i] != want[i]) {
            mismatches++;
            printf("FAIL %s %s count=%d start=%d: byte %zu is 0x%02x, expected 0x%02x\n", name, what, count, start, i,
                   got[i], want[i]);
            return;
        }
}

#define SLACK 64 /* bytes past the packed range that must stay untouched */

/* Packs and unpacks `count` elements of type in every direction; the typed buffer spans
 * [lo, lo + span) relative to the buffer pointer. */
static void run_case(const char *name, MPI_Datatype type, int count, int start)
{
    MPI_Aint lb, extent, true_lb, true_extent;
    MPI_Type_get_extent(type, &lb, &extent);
    MPI_Type_get_true_extent(type, &true_lb, &true_extent);
    MPI_Aint reach = (count - 1) * extent;
    MPI_Aint lo = true_lb + (reach < 0 ? reach : 0), span = true_extent + (reach < 0 ? -reach : reach);
    int size = 0;
    PMPI_Pack_size(count, type, MPI_COMM_WORLD, &size);
    size_t out_bytes = (size_t)start + (size_t)size + SLACK, typed_bytes = (size_t)span;

    unsigned char *typed_h = malloc(typed_bytes), *typed_ref = malloc(typed_bytes), *typed_got = malloc(typed_bytes);
    unsigned char *out_init = malloc(out_bytes), *out_ref = malloc(out_bytes), *out_got = malloc(out_bytes);
    unsigned char *typed_d = device_alloc(typed_bytes), *out_d = device_alloc(out_bytes);
    fill_random(typed_h, typed_bytes);
    fill_random(out_init, out_bytes);
    to_device(typed_d, typed_h, typed_bytes);
    /* the buffer pointers (lo may be negative or positive) */
    void *typed_h_ptr = (void *)((uintptr_t)typed_h - (uintptr_t)lo);
    void *typed_d_ptr = (void *)((uintptr_t)typed_d - (uintptr_t)lo);

    memcpy(out_ref, out_init, out_bytes);
    int pos_ref = start;
    PMPI_Pack(typed_h_ptr, count, type, out_ref, (int)out_bytes - SLACK, &pos_ref, MPI_COMM_WORLD);

    /* device -> device */
    to_device(out_d, out_init, out_bytes);
    int pos = start;
    int rc = MPI_Pack(typed_d_ptr, count, type, out_d, (int)out_bytes - SLACK, &pos, MPI_COMM_WORLD);
    to_host(out_got, out_d, out_bytes);
    if (rc != MPI_SUCCESS || pos != pos_ref) {
        cases++, mismatches++;
        printf("FAIL %s pack d->d count=%d: rc=%d position %d, expected %d\n", name, count, rc, pos, pos_ref);
    } else report(name, "pack d->d", count, start, out_got, out_ref, out_bytes);

    /* device -> host */
    memcpy(out_got, out_init, out_bytes);
    pos = start;
    rc = MPI_Pack(typed_d_ptr, count, type, out_got, (int)out_bytes - SLACK, &pos, MPI_COMM_WORLD);
    if (rc != MPI_SUCCESS || pos != pos_ref) {
        cases++, mismatches++;
        printf("FAIL %s pack d->h count=%d: rc=%d position %d, expected %d\n", name, count, rc, pos, pos_ref);
    } else report(name, "pack d->h", count, start, out_got, out_ref, out_bytes);

    /* host -> device */
    to_device(out_d, out_init, out_bytes);
    pos = start;
    rc = MPI_Pack(typed_h_ptr, count, type, out_d, (int)out_bytes - SLACK, &pos, MPI_COMM_WORLD);
    to_host(out_got, out_d, out_bytes);
    if (rc != MPI_SUCCESS || pos != pos_ref) {
        cases++, mismatches++;
        printf("FAIL %s pack h->d count=%d: rc=%d position %d, expected %d\n", name, count, rc, pos, pos_ref);
    } else report(name, "pack h->d", count, start, out_got, out_ref, out_bytes);

    /* unpack device -> device into a fresh random typed buffer: the gaps must survive */
    fill_random(typed_ref, typed_bytes);
    memcpy(typed_got, typed_ref, typed_bytes);
    to_device(typed_d, typed_ref, typed_bytes);
    to_device(out_d, out_ref, out_bytes);
    int upos_ref = start, upos = start;
    PMPI_Unpack(out_ref, (int)out_bytes - SLACK, &upos_ref, (void *)((uintptr_t)typed_ref - (uintptr_t)lo), count, type,
                MPI_COMM_WORLD);
    rc = MPI_Unpack(out_d, (int)out_bytes - SLACK, &upos, typed_d_ptr, count, type, MPI_COMM_WORLD);
    to_host(typed_got, typed_d, typed_bytes);
    if (rc != MPI_SUCCESS || upos != upos_ref) {
        cases++, mismatches++;
        printf("FAIL %s unpack d->d count=%d: rc=%d position %d, expected %d\n", name, count, rc, upos, upos_ref);
    } else report(name, "unpack d->d", count, start, typed_got, typed_ref, typed_bytes);

    cu.cuMemFree((CUdeviceptr)(uintptr_t)typed_d);
    cu.cuMemFree((CUdeviceptr)(uintptr_t)out_d);
    free(typed_h), free(typed_ref), free(typed_got), free(out_init), free(out_ref), free(out_got);
}

static void run_type(const char *name, MPI_Datatype type)
{
    MPI_Type_commit(&type);
    for (int count = 1; count <= 4; count++) {
        run_case(name, type, count, 0);
        run_case(name, type, count, 3); /* an odd position: narrower words */
    }
    MPI_Type_free(&type);
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    char device[256] = "none";
    if (!cuda_open(device, sizeof device)) {
        printf("device_pack_c: no CUDA device, nothing tested\n");
        MPI_Finalize();
        return 77;
    }
    MPI_Datatype t;
    char name[64];

    /* faces of a 64^3 array of doubles, thickness 1 and 2, one layer in */
    for (int axis = 0; axis < 3; axis++)
        for (int thick = 1; thick <= 2; thick++) {
            int sizes[3] = {64, 64, 64}, subsizes[3] = {64, 64, 64}, starts[3] = {0, 0, 0};
            subsizes[axis] = thick;
            starts[axis] = 1;
            MPI_Type_create_subarray(3, sizes, subsizes, starts, MPI_ORDER_C, MPI_DOUBLE, &t);
            snprintf(name, sizeof name, "face_%c_t%d", "xyz"[axis], thick);
            run_type(name, t);
        }
    /* an interior block of a 3D Fortran-order array */
    {
        int sizes[3] = {20, 17, 9}, subsizes[3] = {5, 4, 3}, starts[3] = {2, 3, 1};
        MPI_Type_create_subarray(3, sizes, subsizes, starts, MPI_ORDER_FORTRAN, MPI_FLOAT, &t);
        run_type("subarray_fortran_float", t);
    }
    /* TEMPI-like byte vectors, stride 512 */
    static const int blocks[] = {1, 2, 3, 8, 32, 100, 512};
    for (size_t i = 0; i < sizeof blocks / sizeof *blocks; i++) {
        MPI_Type_vector(2048 / blocks[i] + 1, blocks[i], 512, MPI_BYTE, &t);
        snprintf(name, sizeof name, "vector_b%d_s512", blocks[i]);
        run_type(name, t);
    }
    /* negative strides */
    MPI_Type_create_hvector(37, 3, -40, MPI_INT, &t);
    run_type("hvector_int_neg", t);
    MPI_Type_vector(9, 2, -5, MPI_DOUBLE, &t);
    run_type("vector_double_neg", t);
    /* several pieces: a struct with a gap, resized so elements sit apart */
    {
        int bl[3] = {1, 3, 2};
        MPI_Aint disp[3] = {0, 12, 40};
        MPI_Datatype types[3] = {MPI_DOUBLE, MPI_INT, MPI_SHORT};
        MPI_Datatype st;
        MPI_Type_create_struct(3, bl, disp, types, &st);
        MPI_Type_create_resized(st, 0, 64, &t);
        MPI_Type_free(&st);
        run_type("struct_3_pieces", t);
    }
    /* an irregular indexed type: pieces of different lengths */
    {
        int bl[4] = {3, 1, 7, 2}, disp[4] = {0, 9, 20, 41};
        MPI_Type_indexed(4, bl, disp, MPI_SHORT, &t);
        run_type("indexed_irregular", t);
    }
    /* a contiguous run, large enough for the widest words and many blocks */
    MPI_Type_contiguous(100003, MPI_BYTE, &t);
    run_type("contiguous_bytes", t);

    /* Host memory of the brk heap and of the caller's stack is classified without asking
     * the driver (native/cuda/device.c): under the stand-in driver, which counts the
     * queries, packs between small malloc'd buffers and between local arrays make none, and
     * packs from managed memory (mapped, as a real driver maps it) still ask - and all pack
     * the same bytes as the host MPI. */
    long long host_queries = -1, managed_queries = -1;
    unsigned long long (*queries)(void) =
        (unsigned long long (*)(void))dlsym(RTLD_DEFAULT, "fake_cuda_pointer_queries");
    if (queries) {
        MPI_Type_vector(64, 8, 16, MPI_BYTE, &t);
        MPI_Type_commit(&t);
        char *in = malloc(1024), *out = malloc(512), *want = malloc(512);
        CUdeviceptr managed;
        check(cu.cuMemAllocManaged(&managed, 1024, 1), "cuMemAllocManaged");
        fill_random((unsigned char *)in, 1024);
        memcpy((void *)(uintptr_t)managed, in, 1024);
        int pos = 0;
        PMPI_Pack(in, 1, t, want, 512, &pos, MPI_COMM_WORLD);
        unsigned long long before = queries();
        for (int i = 0; i < 100; i++) {
            pos = 0;
            MPI_Pack(in, 1, t, out, 512, &pos, MPI_COMM_WORLD);
        }
        cases++;
        if (memcmp(out, want, 512) != 0) {
            printf("FAIL heap_pack: bytes differ from the host MPI's\n");
            mismatches++;
        }
        char local_in[1024], local_out[512];
        memcpy(local_in, in, 1024);
        for (int i = 0; i < 100; i++) {
            pos = 0;
            MPI_Pack(local_in, 1, t, local_out, 512, &pos, MPI_COMM_WORLD);
        }
        host_queries = (long long)(queries() - before);
        cases++;
        if (memcmp(local_out, want, 512) != 0) {
            printf("FAIL stack_pack: bytes differ from the host MPI's\n");
            mismatches++;
        }
        memset(out, 0, 512);
        before = queries();
        pos = 0;
        MPI_Pack((void *)(uintptr_t)managed, 1, t, out, 512, &pos, MPI_COMM_WORLD);
        managed_queries = (long long)(queries() - before);
        cases++;
        if (memcmp(out, want, 512) != 0) {
            printf("FAIL managed_pack: bytes differ from the host MPI's\n");
            mismatches++;
        }
        check(cu.cuMemFree((CUdeviceptr)managed), "cuMemFree");
        free(in);
        free(out);
        free(want);
        MPI_Type_free(&t);
    }
    printf("device_pack_c: host_queries=%lld managed_queries=%lld\n", host_queries, managed_queries);

    long long (*stat)(const char *) = (long long (*)(const char *))dlsym(RTLD_DEFAULT, "commlib_stat");
    printf("device_pack_c: cases=%d mismatches=%d device=%s pack_fast=%lld unpack_fast=%lld kernels_fatbin=%lld "
           "kernels_nvrtc=%lld kernels_cached=%lld kernels_none=%lld\n", cases, mismatches, device,
           stat ? stat("pack.fast") : -1, stat ? stat("unpack.fast") : -1, stat ? stat("kernels.fatbin") : -1,
           stat ? stat("kernels.nvrtc") : -1, stat ? stat("kernels.cached") : -1, stat ? stat("kernels.none") : -1);
    MPI_Finalize();
    return mismatches ? 1 : 0;
}
