/* MPI_Pack, MPI_Unpack, MPI_Pack_size and their large-count forms.
 *
 * commlib packs when the type is in the cache and reduced to strided pieces, and the
 * arguments are valid.  Anything else - an unknown handle, a bad argument, a buffer
 * that is too small - goes to the host MPI unchanged, so the program sees exactly the
 * error class and error-handler behaviour of its own MPI.  Device buffers work either
 * way: commlib's engines take them, or the host MPI packs a host copy of their span. */
#include <limits.h>
#include <stdlib.h>

#include "../datatype/cache.h"
#include "../pack/pack_any.h"
#include "../transfer/span.h"
#include "commlib.h"
#include "interpose.h"

static enum fallback_reason reason_of(int rc)
{
    switch (rc) {
    case COMMLIB_ERR_UNSUPPORTED: return FALLBACK_UNSUPPORTED;
    case COMMLIB_ERR_TRUNCATE: return FALLBACK_TRUNCATE;
    case COMMLIB_ERR_UNKNOWN_TYPE: return FALLBACK_UNKNOWN_TYPE;
    default: return FALLBACK_BAD_ARGUMENT;
    }
}

/* A type commlib does not pack, with device memory on either side: the host MPI packs
 * (or unpacks) host copies.  Returns 1 when it handled the call (*mpi_rc set). */
__attribute__((noinline, cold)) static int span_fallback(const void *inbuf, int64_t incount, MPI_Datatype type, void *outbuf, int64_t outsize,
                         int64_t *position, MPI_Comm comm, int packing, int *mpi_rc)
{
    if (!commlib_config.gpu || !cuda_driver() || !position || *position < 0 || *position > outsize) return 0;
    void *typed = packing ? (void *)inbuf : outbuf;
    char *packed = (char *)(packing ? outbuf : (void *)inbuf) + *position;
    int64_t room = outsize - *position;
    struct span_stage span;
    /* unpacking writes the type map's bytes and nothing else (transfer/typemap.h) */
    int staged = packing ? span_stage_begin(&span, typed, incount, type, 0)
                         : span_stage_receive_typed(&span, typed, incount, type, 0);
    int packed_on_device = buffer_kind_of(packed) == BUFFER_DEVICE;
    if (staged < 0 || (staged == 0 && !packed_on_device) || room > INT_MAX || incount > INT_MAX) {
        if (staged == 1) span_stage_end(&span, 0);
        return 0;
    }
    struct device_context *dc = staged ? span.dc : device_context_of(packed);
    char *host_packed = packed_on_device ? malloc(room > 0 ? (size_t)room : 1) : packed;
    int ok = dc && host_packed && (packing || !packed_on_device || device_copy(dc, host_packed, packed, (size_t)room));
    int pos = 0;
    if (ok) {
        void *host_typed = staged ? span_host_base(&span) : typed;
        *mpi_rc = packing ? PMPI_Pack(host_typed, (int)incount, type, host_packed, (int)room, &pos, comm)
                          : PMPI_Unpack(host_packed, (int)room, &pos, host_typed, (int)incount, type, comm);
        if (packing && packed_on_device && *mpi_rc == MPI_SUCCESS) ok = device_copy(dc, packed, host_packed, (size_t)pos);
    }
    if (staged) ok = span_stage_end(&span, !packing && ok) && ok;
    if (packed_on_device) free(host_packed);
    if (ok) *position += pos;
    else *mpi_rc = MPI_ERR_OTHER;
    return 1;
}

/* Returns 1 when commlib handled the call, with the MPI return code in *mpi_rc. */
static int try_pack(const void *inbuf, int64_t incount, MPI_Datatype type, void *outbuf, int64_t outsize,
                    int64_t *position, MPI_Comm comm, int packing, int *mpi_rc)
{
    int64_t before = *position;
    int rc;
    uint64_t start = commlib_config.stats ? stat_now_ns() : 0;
    if (commlib_config.no_pack) {
        stat_fallback(FALLBACK_NO_PACK_KNOB);
        rc = -1;
    } else if (comm == MPI_COMM_NULL) {
        rc = COMMLIB_ERR_ARG;
    } else {
        int locked;
    const canonical_type *ct = type_cache_acquire(type, &locked);
        if (!ct) rc = COMMLIB_ERR_UNKNOWN_TYPE;
        else if (packing) rc = any_pack_call(ct, inbuf, incount, outbuf, outsize, position);
        else rc = any_unpack_call(ct, inbuf, outsize, position, outbuf, incount);
        type_cache_release(locked);
    }
    if (rc == COMMLIB_OK) {
        /* calls = fast + fallback, so the fast path counts once; bytes and time only
         * when the report was asked for */
        stat_add(packing ? STAT_PACK_FAST : STAT_UNPACK_FAST, 1);
        if (commlib_config.stats) {
            stat_add(packing ? STAT_PACK_NS : STAT_UNPACK_NS, stat_now_ns() - start);
            stat_add(packing ? STAT_PACK_BYTES : STAT_UNPACK_BYTES, (uint64_t)(*position - before));
        }
        *mpi_rc = MPI_SUCCESS;
        return 1;
    }
    if (rc > 0) stat_fallback(reason_of(rc));
    stat_add(packing ? STAT_PACK_FALLBACK : STAT_UNPACK_FALLBACK, 1);
    return (rc == COMMLIB_ERR_UNSUPPORTED || rc == COMMLIB_ERR_UNKNOWN_TYPE) &&
           span_fallback(inbuf, incount, type, outbuf, outsize, position, comm, packing, mpi_rc);
}

COMMLIB_EXPORT int MPI_Pack(const void *inbuf, int incount, MPI_Datatype datatype, void *outbuf, int outsize, int *position,
             MPI_Comm comm)
{
    FORWARD_IF_DISABLED(PMPI_Pack(inbuf, incount, datatype, outbuf, outsize, position, comm));
    int64_t pos = position ? *position : -1;
    int rc;
    if (position && try_pack(inbuf, incount, datatype, outbuf, outsize, &pos, comm, 1, &rc)) {
        *position = (int)pos;
        return rc;
    }
    return PMPI_Pack(inbuf, incount, datatype, outbuf, outsize, position, comm);
}

COMMLIB_EXPORT int MPI_Unpack(const void *inbuf, int insize, int *position, void *outbuf, int outcount, MPI_Datatype datatype,
               MPI_Comm comm)
{
    FORWARD_IF_DISABLED(PMPI_Unpack(inbuf, insize, position, outbuf, outcount, datatype, comm));
    int64_t pos = position ? *position : -1;
    int rc;
    if (position && try_pack(inbuf, outcount, datatype, outbuf, insize, &pos, comm, 0, &rc)) {
        *position = (int)pos;
        return rc;
    }
    return PMPI_Unpack(inbuf, insize, position, outbuf, outcount, datatype, comm);
}

/* Pack size is count * type size for every strided type; the host MPI answers the rest. */
static int try_pack_size(int64_t count, MPI_Datatype datatype, MPI_Comm comm, int64_t *size)
{
    stat_add(STAT_PACK_SIZE_CALLS, 1);
    if (count < 0 || comm == MPI_COMM_NULL) return 0;
    int locked;
    const canonical_type *ct = type_cache_acquire(datatype, &locked);
    int ok = ct && !ct->unsupported && !__builtin_mul_overflow(count, ct->size, size);
    type_cache_release(locked);
    return ok;
}

COMMLIB_EXPORT int MPI_Pack_size(int incount, MPI_Datatype datatype, MPI_Comm comm, int *size)
{
    FORWARD_IF_DISABLED(PMPI_Pack_size(incount, datatype, comm, size));
    int64_t bytes;
    if (size && try_pack_size(incount, datatype, comm, &bytes) && bytes <= INT32_MAX) {
        *size = (int)bytes;
        return MPI_SUCCESS;
    }
    return PMPI_Pack_size(incount, datatype, comm, size);
}

#if MPI_VERSION >= 4
COMMLIB_EXPORT int MPI_Pack_c(const void *inbuf, MPI_Count incount, MPI_Datatype datatype, void *outbuf, MPI_Count outsize,
               MPI_Count *position, MPI_Comm comm)
{
    FORWARD_IF_DISABLED(PMPI_Pack_c(inbuf, incount, datatype, outbuf, outsize, position, comm));
    int64_t pos = position ? (int64_t)*position : -1;
    int rc;
    if (position && try_pack(inbuf, incount, datatype, outbuf, outsize, &pos, comm, 1, &rc)) {
        *position = pos;
        return rc;
    }
    return PMPI_Pack_c(inbuf, incount, datatype, outbuf, outsize, position, comm);
}

COMMLIB_EXPORT int MPI_Unpack_c(const void *inbuf, MPI_Count insize, MPI_Count *position, void *outbuf, MPI_Count outcount,
                 MPI_Datatype datatype, MPI_Comm comm)
{
    FORWARD_IF_DISABLED(PMPI_Unpack_c(inbuf, insize, position, outbuf, outcount, datatype, comm));
    int64_t pos = position ? (int64_t)*position : -1;
    int rc;
    if (position && try_pack(inbuf, outcount, datatype, outbuf, insize, &pos, comm, 0, &rc)) {
        *position = pos;
        return rc;
    }
    return PMPI_Unpack_c(inbuf, insize, position, outbuf, outcount, datatype, comm);
}

COMMLIB_EXPORT int MPI_Pack_size_c(MPI_Count incount, MPI_Datatype datatype, MPI_Comm comm, MPI_Count *size)
{
    FORWARD_IF_DISABLED(PMPI_Pack_size_c(incount, datatype, comm, size));
    int64_t bytes;
    if (size && try_pack_size(incount, datatype, comm, &bytes)) {
        *size = bytes;
        return MPI_SUCCESS;
    }
    return PMPI_Pack_size_c(incount, datatype, comm, size);
}
#endif
