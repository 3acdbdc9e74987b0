/* Bad-input behaviour of MPI_Pack / MPI_Unpack / MPI_Pack_size (and the large-count _c forms),
 * possibly interposed by libcommlib.so, against PMPI_* of the host MPI.
 *
 * MPI_ERRORS_RETURN is set on MPI_COMM_WORLD and MPI_COMM_SELF.  Each case runs twice, once
 * calling MPI_* and once PMPI_*, each time in a forked child (so that a crash in one case
 * neither kills the run nor leaves state behind: types are created fresh in the child).  The
 * error CLASS of the return codes must match; for successful calls the output bytes and
 * positions/sizes must match too.  A case where the host MPI itself crashes is skipped; one
 * where only the interposed call crashes is a mismatch.
 *
 * Last line: pack_errors: cases=N mismatches=M   (exit 1 on mismatch)
 */
#define _GNU_SOURCE
#include <limits.h>
#include <mpi.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mpi3_compat.h"
#include <sys/wait.h>
#include <unistd.h>

#define OUTMAX 512

typedef struct {
    int rc;         /* raw return code */
    int cls;        /* MPI_Error_class(rc) */
    int pos;        /* int position / size result */
    long long cpos; /* MPI_Count position / size result */
    int nbytes;     /* valid bytes in out[] (compared when rc == MPI_SUCCESS) */
    unsigned char out[OUTMAX];
    char msg[160];  /* error string */
} result_t;

typedef void (*case_fn)(int pm, result_t *r);

static int verbose;

/* ---------------------------------------------------------------- call wrappers */
static int pack(int pm, const void *in, int n, MPI_Datatype t, void *out, int outsize, int *pos,
                MPI_Comm c)
{
    return pm ? PMPI_Pack(in, n, t, out, outsize, pos, c) : MPI_Pack(in, n, t, out, outsize, pos, c);
}

static int unpack(int pm, const void *in, int insize, int *pos, void *out, int n, MPI_Datatype t,
                  MPI_Comm c)
{
    return pm ? PMPI_Unpack(in, insize, pos, out, n, t, c) : MPI_Unpack(in, insize, pos, out, n, t, c);
}

static int pack_size(int pm, int n, MPI_Datatype t, MPI_Comm c, int *sz)
{
    return pm ? PMPI_Pack_size(n, t, c, sz) : MPI_Pack_size(n, t, c, sz);
}

static int pack_c(int pm, const void *in, MPI_Count n, MPI_Datatype t, void *out, MPI_Count outsize,
                  MPI_Count *pos, MPI_Comm c)
{
    return pm ? PMPI_Pack_c(in, n, t, out, outsize, pos, c)
              : MPI_Pack_c(in, n, t, out, outsize, pos, c);
}

static int unpack_c(int pm, const void *in, MPI_Count insize, MPI_Count *pos, void *out,
                    MPI_Count n, MPI_Datatype t, MPI_Comm c)
{
    return pm ? PMPI_Unpack_c(in, insize, pos, out, n, t, c)
              : MPI_Unpack_c(in, insize, pos, out, n, t, c);
}

static int pack_size_c(int pm, MPI_Count n, MPI_Datatype t, MPI_Comm c, MPI_Count *sz)
{
    return pm ? PMPI_Pack_size_c(n, t, c, sz) : MPI_Pack_size_c(n, t, c, sz);
}

/* ---------------------------------------------------------------- fixtures */
static int src_ints[256];
static unsigned char packed_ref[OUTMAX]; /* a valid packed stream of vec_type, 2 elements */

/* vector(3 blocks of 2 ints, stride 4): 24 bytes of data, extent 40 */
static MPI_Datatype vec_type(int commit)
{
    MPI_Datatype t;
    MPI_Type_vector(3, 2, 4, MPI_INT, &t);
    if (commit) MPI_Type_commit(&t);
    return t;
}

/* struct with a gap, for a second (maybe differently handled) layout */
static MPI_Datatype gap_struct_type(void)
{
    int bl[2] = {1, 2};
    MPI_Aint d[2] = {0, 12};
    MPI_Datatype ty[2] = {MPI_DOUBLE, MPI_SHORT}, t;
    MPI_Type_create_struct(2, bl, d, ty, &t);
    MPI_Type_commit(&t);
    return t;
}

static void fill_out(unsigned char *o, int n)
{
    for (int i = 0; i < n; i++) o[i] = (unsigned char)(0xA5 ^ (i * 7));
}

/* ---------------------------------------------------------------- Pack cases */
static void pk_valid(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    fill_out(r->out, 64);
    r->pos = 5;
    r->rc = pack(pm, src_ints, 2, t, r->out, 64, &r->pos, MPI_COMM_WORLD);
    r->nbytes = 64;
}

static void pk_valid_exact(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    fill_out(r->out, 64);
    r->pos = 3;
    r->rc = pack(pm, src_ints, 2, t, r->out, 3 + 48, &r->pos, MPI_COMM_WORLD);
    r->nbytes = 64;
}

static void pk_valid_struct(int pm, result_t *r)
{
    MPI_Datatype t = gap_struct_type();
    fill_out(r->out, 64);
    r->pos = 1;
    r->rc = pack(pm, src_ints, 3, t, r->out, 64, &r->pos, MPI_COMM_WORLD);
    r->nbytes = 64;
}

static void pk_small(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    r->pos = 0;
    r->rc = pack(pm, src_ints, 2, t, r->out, 47, &r->pos, MPI_COMM_WORLD);
}

static void pk_small_pos(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    r->pos = 10;
    r->rc = pack(pm, src_ints, 2, t, r->out, 57, &r->pos, MPI_COMM_WORLD);
}

static void pk_small_struct(int pm, result_t *r)
{
    MPI_Datatype t = gap_struct_type();
    r->pos = 0;
    r->rc = pack(pm, src_ints, 3, t, r->out, 20, &r->pos, MPI_COMM_WORLD);
}

static void pk_small_basic(int pm, result_t *r)
{
    r->pos = 0;
    r->rc = pack(pm, src_ints, 10, MPI_INT, r->out, 39, &r->pos, MPI_COMM_WORLD);
}

static void pk_pos_past_end(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    r->pos = 70;
    r->rc = pack(pm, src_ints, 1, t, r->out, 64, &r->pos, MPI_COMM_WORLD);
}

/* (the buffer handed over starts 16 bytes into out[], so what a host that does not check
 * writes before it stays inside out[] and is compared too) */
static void pk_pos_negative(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    fill_out(r->out, 96);
    r->pos = -4;
    r->rc = pack(pm, src_ints, 1, t, r->out + 16, 64, &r->pos, MPI_COMM_WORLD);
    r->nbytes = 96;
}

/* position near INT_MAX: position + packed size overflows an int (only 8 bytes of room) */
static void pk_pos_near_intmax(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    fill_out(r->out, 96);
    r->pos = INT_MAX - 8;
    void *out = (void *)((uintptr_t)(r->out + 16) - (uintptr_t)(INT_MAX - 8));
    r->rc = pack(pm, src_ints, 1, t, out, INT_MAX, &r->pos, MPI_COMM_WORLD);
    r->nbytes = 96;
}

static void pk_outsize_negative(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    r->pos = 0;
    r->rc = pack(pm, src_ints, 1, t, r->out, -1, &r->pos, MPI_COMM_WORLD);
}

static void pk_count_negative(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    r->pos = 0;
    r->rc = pack(pm, src_ints, -1, t, r->out, 64, &r->pos, MPI_COMM_WORLD);
}

static void pk_count_zero(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    fill_out(r->out, 16);
    r->pos = 4;
    r->rc = pack(pm, NULL, 0, t, r->out, 4, &r->pos, MPI_COMM_WORLD);
    r->nbytes = 16;
}

static void pk_type_null(int pm, result_t *r)
{
    r->pos = 0;
    r->rc = pack(pm, src_ints, 1, MPI_DATATYPE_NULL, r->out, 64, &r->pos, MPI_COMM_WORLD);
}

static void pk_uncommitted(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(0);
    r->pos = 0;
    r->rc = pack(pm, src_ints, 1, t, r->out, 64, &r->pos, MPI_COMM_WORLD);
}

/* commit a type, free it, create an uncommitted one (likely reusing the handle) and pack it:
 * a stale cache entry for the old handle would make this succeed */
static void pk_uncommitted_reused(int pm, result_t *r)
{
    MPI_Datatype a = vec_type(1);
    MPI_Type_free(&a);
    MPI_Datatype t;
    MPI_Type_contiguous(5, MPI_SHORT, &t);
    r->pos = 0;
    r->rc = pack(pm, src_ints, 1, t, r->out, 64, &r->pos, MPI_COMM_WORLD);
}

/* commit, free, create and commit a different type that likely reuses the handle: it must be
 * packed with the new layout */
static void pk_reused_handle_valid(int pm, result_t *r)
{
    MPI_Datatype a = vec_type(1);
    fill_out(r->out, 64);
    int p = 0;
    pack(pm, src_ints, 1, a, r->out, 64, &p, MPI_COMM_WORLD);
    MPI_Type_free(&a);
    MPI_Datatype t;
    MPI_Type_vector(2, 3, 5, MPI_SHORT, &t);
    MPI_Type_commit(&t);
    fill_out(r->out, 64);
    r->pos = 2;
    r->rc = pack(pm, src_ints, 2, t, r->out, 64, &r->pos, MPI_COMM_WORLD);
    r->nbytes = 64;
}

static void pk_freed(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1), keep = t;
    MPI_Type_free(&t);
    r->pos = 0;
    r->rc = pack(pm, src_ints, 1, keep, r->out, 64, &r->pos, MPI_COMM_WORLD);
}

static void pk_comm_null(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    r->pos = 0;
    r->rc = pack(pm, src_ints, 1, t, r->out, 64, &r->pos, MPI_COMM_NULL);
}

static void pk_position_null(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    r->rc = pack(pm, src_ints, 1, t, r->out, 64, NULL, MPI_COMM_WORLD);
}

static void pk_outbuf_null(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    r->pos = 0;
    r->rc = pack(pm, src_ints, 1, t, NULL, 64, &r->pos, MPI_COMM_WORLD);
}

/* ---------------------------------------------------------------- Unpack cases */
static void up_valid(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    fill_out(r->out, 128);
    r->pos = 5;
    r->rc = unpack(pm, packed_ref, 64, &r->pos, r->out, 2, t, MPI_COMM_WORLD);
    r->nbytes = 128;
}

static void up_small(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    fill_out(r->out, 128);
    r->pos = 5;
    r->rc = unpack(pm, packed_ref, 5 + 47, &r->pos, r->out, 2, t, MPI_COMM_WORLD);
}

static void up_small_basic(int pm, result_t *r)
{
    r->pos = 0;
    r->rc = unpack(pm, packed_ref, 8, &r->pos, r->out, 3, MPI_INT, MPI_COMM_WORLD);
}

static void up_pos_past_end(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    r->pos = 80;
    r->rc = unpack(pm, packed_ref, 64, &r->pos, r->out, 1, t, MPI_COMM_WORLD);
}

static void up_pos_near_intmax(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    fill_out(r->out, 128);
    r->pos = INT_MAX - 8;
    const void *in = (const void *)((uintptr_t)(packed_ref + 5) - (uintptr_t)(INT_MAX - 8));
    r->rc = unpack(pm, in, INT_MAX, &r->pos, r->out, 1, t, MPI_COMM_WORLD);
    r->nbytes = 128;
}

static void up_count_negative(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    r->pos = 0;
    r->rc = unpack(pm, packed_ref, 64, &r->pos, r->out, -2, t, MPI_COMM_WORLD);
}

static void up_insize_negative(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    r->pos = 0;
    r->rc = unpack(pm, packed_ref, -8, &r->pos, r->out, 1, t, MPI_COMM_WORLD);
}

static void up_type_null(int pm, result_t *r)
{
    r->pos = 0;
    r->rc = unpack(pm, packed_ref, 64, &r->pos, r->out, 1, MPI_DATATYPE_NULL, MPI_COMM_WORLD);
}

static void up_uncommitted(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(0);
    r->pos = 0;
    r->rc = unpack(pm, packed_ref, 64, &r->pos, r->out, 1, t, MPI_COMM_WORLD);
}

static void up_uncommitted_reused(int pm, result_t *r)
{
    MPI_Datatype a = vec_type(1);
    MPI_Type_free(&a);
    MPI_Datatype t;
    MPI_Type_contiguous(5, MPI_SHORT, &t);
    r->pos = 0;
    r->rc = unpack(pm, packed_ref, 64, &r->pos, r->out, 1, t, MPI_COMM_WORLD);
}

static void up_freed(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1), keep = t;
    MPI_Type_free(&t);
    r->pos = 0;
    r->rc = unpack(pm, packed_ref, 64, &r->pos, r->out, 1, keep, MPI_COMM_WORLD);
}

static void up_comm_null(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    r->pos = 0;
    r->rc = unpack(pm, packed_ref, 64, &r->pos, r->out, 1, t, MPI_COMM_NULL);
}

/* ---------------------------------------------------------------- Pack_size cases */
static void ps_valid(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    r->rc = pack_size(pm, 7, t, MPI_COMM_WORLD, &r->pos);
}

static void ps_count_negative(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    r->rc = pack_size(pm, -3, t, MPI_COMM_WORLD, &r->pos);
}

static void ps_type_null(int pm, result_t *r)
{
    r->rc = pack_size(pm, 1, MPI_DATATYPE_NULL, MPI_COMM_WORLD, &r->pos);
}

static void ps_uncommitted(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(0);
    r->rc = pack_size(pm, 2, t, MPI_COMM_WORLD, &r->pos);
}

/* 2^28 elements of 24 bytes: the size does not fit an int */
static void ps_overflow(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    r->pos = 12345;
    r->rc = pack_size(pm, 1 << 28, t, MPI_COMM_WORLD, &r->pos);
}

/* ---------------------------------------------------------------- large-count cases */
static void pkc_valid(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    fill_out(r->out, 96);
    r->cpos = 7;
    r->rc = pack_c(pm, src_ints, 3, t, r->out, 96, &r->cpos, MPI_COMM_WORLD);
    r->nbytes = 96;
}

static void pkc_valid_struct(int pm, result_t *r)
{
    MPI_Datatype t = gap_struct_type();
    fill_out(r->out, 96);
    r->cpos = 2;
    r->rc = pack_c(pm, src_ints, 4, t, r->out, 96, &r->cpos, MPI_COMM_WORLD);
    r->nbytes = 96;
}

static void pkc_small(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    r->cpos = 7;
    r->rc = pack_c(pm, src_ints, 3, t, r->out, 7 + 71, &r->cpos, MPI_COMM_WORLD);
}

static void pkc_count_negative(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    r->cpos = 0;
    r->rc = pack_c(pm, src_ints, -1, t, r->out, 96, &r->cpos, MPI_COMM_WORLD);
}

/* outsize beyond 2^31 with a small actual pack (the buffer is big enough for what is written) */
static void pkc_big_outsize(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    fill_out(r->out, 64);
    r->cpos = 1;
    r->rc = pack_c(pm, src_ints, 2, t, r->out, (MPI_Count)1 << 33, &r->cpos, MPI_COMM_WORLD);
    r->nbytes = 64;
}

/* incount * size overflows 64 bits, into a small buffer */
static void pkc_count_overflow(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    fill_out(r->out, 96);
    r->cpos = 0;
    r->rc = pack_c(pm, src_ints, (MPI_Count)1 << 61, t, r->out, 64, &r->cpos, MPI_COMM_WORLD);
    r->nbytes = 96;
}

static void upc_valid(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    fill_out(r->out, 128);
    r->cpos = 5;
    r->rc = unpack_c(pm, packed_ref, 64, &r->cpos, r->out, 2, t, MPI_COMM_WORLD);
    r->nbytes = 128;
}

static void upc_small(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    fill_out(r->out, 128);
    r->cpos = 5;
    r->rc = unpack_c(pm, packed_ref, 5 + 40, &r->cpos, r->out, 2, t, MPI_COMM_WORLD);
}

static void psc_valid(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    r->rc = pack_size_c(pm, 11, t, MPI_COMM_WORLD, &r->cpos);
}

/* a size well beyond 2^31: 3e9 elements of 24 bytes */
static void psc_large(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    r->rc = pack_size_c(pm, (MPI_Count)3000000000LL, t, MPI_COMM_WORLD, &r->cpos);
}

static void psc_overflow(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    r->rc = pack_size_c(pm, (MPI_Count)1 << 61, t, MPI_COMM_WORLD, &r->cpos);
}

static void psc_count_negative(int pm, result_t *r)
{
    MPI_Datatype t = vec_type(1);
    r->rc = pack_size_c(pm, -5, t, MPI_COMM_WORLD, &r->cpos);
}

/* ---------------------------------------------------------------- driver */
typedef struct {
    const char *name;
    case_fn fn;
} case_t;

static const case_t cases[] = {
    {"pack valid (vector, position 5)", pk_valid},
    {"pack valid exact fit", pk_valid_exact},
    {"pack valid (struct with gap)", pk_valid_struct},
    {"pack output buffer too small", pk_small},
    {"pack output too small after nonzero position", pk_small_pos},
    {"pack output too small (struct)", pk_small_struct},
    {"pack output too small (MPI_INT)", pk_small_basic},
    {"pack position past end", pk_pos_past_end},
    {"pack negative position", pk_pos_negative},
    {"pack negative outsize", pk_outsize_negative},
    {"pack position near INT_MAX (int overflow)", pk_pos_near_intmax},
    {"pack negative incount", pk_count_negative},
    {"pack zero incount, NULL inbuf", pk_count_zero},
    {"pack MPI_DATATYPE_NULL", pk_type_null},
    {"pack uncommitted derived type", pk_uncommitted},
    {"pack uncommitted type reusing a freed committed handle", pk_uncommitted_reused},
    {"pack committed type reusing a freed committed handle", pk_reused_handle_valid},
    {"pack freed type handle", pk_freed},
    {"pack MPI_COMM_NULL", pk_comm_null},
    {"pack NULL position", pk_position_null},
    {"pack NULL outbuf", pk_outbuf_null},
    {"unpack valid", up_valid},
    {"unpack input too small", up_small},
    {"unpack input too small (MPI_INT)", up_small_basic},
    {"unpack position past end", up_pos_past_end},
    {"unpack position near INT_MAX (int overflow)", up_pos_near_intmax},
    {"unpack negative outcount", up_count_negative},
    {"unpack negative insize", up_insize_negative},
    {"unpack MPI_DATATYPE_NULL", up_type_null},
    {"unpack uncommitted derived type", up_uncommitted},
    {"unpack uncommitted type reusing a freed committed handle", up_uncommitted_reused},
    {"unpack freed type handle", up_freed},
    {"unpack MPI_COMM_NULL", up_comm_null},
    {"pack_size valid", ps_valid},
    {"pack_size negative count", ps_count_negative},
    {"pack_size MPI_DATATYPE_NULL", ps_type_null},
    {"pack_size uncommitted type", ps_uncommitted},
    {"pack_size result overflows int", ps_overflow},
    {"pack_c valid", pkc_valid},
    {"pack_c valid (struct with gap)", pkc_valid_struct},
    {"pack_c output too small", pkc_small},
    {"pack_c negative incount", pkc_count_negative},
    {"pack_c outsize > 2^32", pkc_big_outsize},
    {"pack_c incount * size overflows 64 bits", pkc_count_overflow},
    {"unpack_c valid", upc_valid},
    {"unpack_c input too small", upc_small},
    {"pack_size_c valid", psc_valid},
    {"pack_size_c > 2^31", psc_large},
    {"pack_size_c negative count", psc_count_negative},
    {"pack_size_c count * size overflows 64 bits", psc_overflow},
};

/* 0: r filled; 1: the child crashed, was killed or exited early (*how says which) */
static int run_in_child(case_fn fn, int pm, result_t *r, char *how, size_t howlen)
{
    int fds[2];
    if (pipe(fds) != 0) {
        perror("pipe");
        exit(2);
    }
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        exit(2);
    }
    if (pid == 0) {
        close(fds[0]);
        alarm(20);
        result_t res;
        memset(&res, 0, sizeof res);
        res.pos = -999;
        res.cpos = -999;
        fn(pm, &res);
        PMPI_Error_class(res.rc, &res.cls);
        if (res.rc != MPI_SUCCESS) {
            int len = 0;
            char buf[MPI_MAX_ERROR_STRING];
            PMPI_Error_string(res.rc, buf, &len);
            buf[sizeof res.msg - 1] = 0;
            for (char *q = buf; *q; q++)
                if (*q == '\n') *q = ' ';
            memcpy(res.msg, buf, strlen(buf) + 1);
        }
        ssize_t w = write(fds[1], &res, sizeof res);
        _exit(w == (ssize_t)sizeof res ? 0 : 3);
    }
    close(fds[1]);
    memset(r, 0, sizeof *r);
    size_t got = 0;
    while (got < sizeof *r) {
        ssize_t n = read(fds[0], (char *)r + got, sizeof *r - got);
        if (n <= 0) break;
        got += (size_t)n;
    }
    close(fds[0]);
    int st = 0;
    waitpid(pid, &st, 0);
    if (WIFSIGNALED(st))
        snprintf(how, howlen, "signal %d", WTERMSIG(st));
    else
        snprintf(how, howlen, "exit status %d", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    if (got != sizeof *r || !WIFEXITED(st) || WEXITSTATUS(st) != 0) return 1;
    return 0;
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--verbose")) verbose = 1;
    MPI_Init(&argc, &argv);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_set_errhandler(MPI_COMM_SELF, MPI_ERRORS_RETURN);

    for (int i = 0; i < 256; i++) src_ints[i] = (int)(0x01020304u * (unsigned)(i + 1));
    {
        MPI_Datatype t = vec_type(1);
        int p = 5;
        fill_out(packed_ref, OUTMAX);
        PMPI_Pack(src_ints, 2, t, packed_ref, OUTMAX, &p, MPI_COMM_WORLD);
        MPI_Type_free(&t);
    }

    int ncases = 0, mism = 0, skipped = 0;
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        result_t mine, host;
        char how_m[64], how_h[64];
        if (!COMMLIB_TEST_HAVE_LARGE_COUNT && strstr(cases[k].name, "_c ")) {
            skipped++;
            printf("SKIP  %-58s (an MPI-3 library has no large-count forms)\n", cases[k].name);
            continue;
        }
        int crash_h = run_in_child(cases[k].fn, 1, &host, how_h, sizeof how_h);
        if (crash_h) {
            skipped++;
            printf("SKIP  %-58s (the host MPI itself dies: %s)\n", cases[k].name, how_h);
            continue;
        }
        int crash_m = run_in_child(cases[k].fn, 0, &mine, how_m, sizeof how_m);
        ncases++;
        int bad = 0;
        char why[256] = "";
        if (crash_m) {
            bad = 1;
            snprintf(why, sizeof why, "MPI_* died (%s), PMPI_* returned class %d", how_m,
                     host.cls);
        } else if (mine.cls != host.cls) {
            bad = 1;
            snprintf(why, sizeof why, "error class %d vs host %d", mine.cls, host.cls);
        } else if (host.rc == MPI_SUCCESS) {
            if (mine.pos != host.pos || mine.cpos != host.cpos) {
                bad = 1;
                snprintf(why, sizeof why, "position/size %d/%lld vs host %d/%lld", mine.pos,
                         mine.cpos, host.pos, host.cpos);
            } else if (host.nbytes && memcmp(mine.out, host.out, (size_t)host.nbytes) != 0) {
                bad = 1;
                snprintf(why, sizeof why, "output bytes differ");
            }
        }
        if (bad) {
            mism++;
            printf("FAIL  %-58s %s\n      mine: rc=%d class=%d pos=%d cpos=%lld \"%s\"\n"
                   "      host: rc=%d class=%d pos=%d cpos=%lld \"%s\"\n",
                   cases[k].name, why, mine.rc, mine.cls, mine.pos, mine.cpos, mine.msg, host.rc,
                   host.cls, host.pos, host.cpos, host.msg);
        } else {
            printf("ok    %-58s class=%d%s%s\n", cases[k].name, host.cls,
                   verbose && host.rc ? " " : "", verbose && host.rc ? host.msg : "");
        }
    }
    printf("skipped (host MPI crashes): %d\n", skipped);
    printf("pack_errors: cases=%d mismatches=%d\n", ncases, mism);
    fflush(stdout);
    MPI_Finalize();
    return mism ? 1 : 0;
}
