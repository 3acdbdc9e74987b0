/* The functions behind commlib.native (cffi).  They run the same decode and pack code
 * as the interposer, on handles the caller registers explicitly: a Python process that
 * did not preload commlib never went through our MPI_Type_commit. */
#include <string.h>

#include "../datatype/cache.h"
#include "../pack/device_pack.h"
#include "../pack/pack_any.h"
#include "../transfer/model.h"
#include "commlib.h"
#include "config.h"

int commlib_type_register(intptr_t handle, char *json, size_t len)
{
    commlib_config_init();
    type_cache_add(TYPE_FROM_KEY(handle));
    int locked;
    const canonical_type *ct = type_cache_acquire(TYPE_FROM_KEY(handle), &locked);
    int rc = ct ? COMMLIB_OK : COMMLIB_ERR_UNKNOWN_TYPE;
    if (ct && json) canonical_type_json(ct, json, len);
    type_cache_release(locked);
    return rc;
}

int commlib_type_forget(intptr_t handle) { return type_cache_remove(TYPE_FROM_KEY(handle)) ? COMMLIB_OK : COMMLIB_ERR_UNKNOWN_TYPE; }

int commlib_type_pack(intptr_t handle, const void *inbuf, int64_t incount, void *outbuf, int64_t outsize,
                      int64_t *position)
{
    int locked;
    const canonical_type *ct = type_cache_acquire(TYPE_FROM_KEY(handle), &locked);
    int rc = ct ? any_pack_call(ct, inbuf, incount, outbuf, outsize, position) : COMMLIB_ERR_UNKNOWN_TYPE;
    type_cache_release(locked);
    return rc;
}

int commlib_type_unpack(intptr_t handle, const void *inbuf, int64_t insize, int64_t *position, void *outbuf,
                        int64_t outcount)
{
    int locked;
    const canonical_type *ct = type_cache_acquire(TYPE_FROM_KEY(handle), &locked);
    int rc = ct ? any_unpack_call(ct, inbuf, insize, position, outbuf, outcount) : COMMLIB_ERR_UNKNOWN_TYPE;
    type_cache_release(locked);
    return rc;
}

int commlib_type_pack_size(intptr_t handle, int64_t count, int64_t *size)
{
    int locked;
    const canonical_type *ct = type_cache_acquire(TYPE_FROM_KEY(handle), &locked);
    int rc = COMMLIB_OK;
    if (!ct) rc = COMMLIB_ERR_UNKNOWN_TYPE;
    else if (count < 0 || __builtin_mul_overflow(count, ct->size, size)) rc = COMMLIB_ERR_ARG;
    type_cache_release(locked);
    return rc;
}

size_t commlib_knobs_json(char *buf, size_t len) { return commlib_config_knobs_json(buf, len); }

size_t commlib_model_json(char *buf, size_t len) { return transfer_model_json(buf, len); }
size_t commlib_kernels_json(char *buf, size_t len) { return device_kernels_json(buf, len); }
