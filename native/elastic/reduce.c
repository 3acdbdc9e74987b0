/* The elastic ring's reductions are the collective engine's (native/engine/reduce.c, one
 * implementation for both libraries; the dtype and op numbers are the same), and the
 * quantization of the compressed transfer. */
#include "internal.h"

#include <string.h>

#include "../engine/reduce.h"

_Static_assert((int)EL_F16 == (int)CL_F16 && (int)EL_BF16 == (int)CL_BF16 && (int)EL_F32 == (int)CL_F32 &&
                   (int)EL_U64 == (int)CL_U64,
               "the elastic dtypes are the engine's");
_Static_assert((int)EL_SUM == (int)CL_SUM && (int)EL_AVG == (int)CL_AVG && (int)EL_MIN == (int)CL_MIN &&
                   (int)EL_MAX == (int)CL_MAX && (int)EL_PROD == (int)CL_PROD,
               "the elastic ops are the engine's");

size_t el_dtype_size(int dtype) { return dtype >= 0 && dtype < EL_NDTYPES ? cl_dtype_size(dtype) : 0; }

EL_API int el_reduce(void *dst, const void *src, uint64_t count, int dtype, int op)
{
    if (dtype < 0 || dtype >= EL_NDTYPES || op < 0 || op >= EL_NOPS) return EL_ERR_ARG;
    cl_reduce(dst, dst, src, (size_t)count, dtype, op);
    return EL_OK;
}

/* avg = sum / n, applied once by the owner of each segment (so every peer ends with the
 * same bytes).  Integers divide truncating toward zero, like C. */
void el_finish_avg(void *buf, uint64_t count, int dtype, uint64_t n) { cl_finish_avg(buf, (size_t)count, dtype, n); }

/* ---- min-max uint8 quantization (optional compressed transfer) ----
 * q = round((v - min) / scale), scale = (max - min) / 255; v' = min + q * scale in float.
 * Every peer dequantizes the same bytes with the same code, so results stay identical. */
static float load_float(const void *src, uint64_t i, int dtype)
{
    switch (dtype) {
    case EL_F16: return cl_f16_to_float(((const uint16_t *)src)[i]);
    case EL_BF16: return cl_bf16_to_float(((const uint16_t *)src)[i]);
    case EL_F64: return (float)((const double *)src)[i];
    default: return ((const float *)src)[i];
    }
}

static void store_float(void *dst, uint64_t i, int dtype, float v)
{
    switch (dtype) {
    case EL_F16: ((uint16_t *)dst)[i] = cl_float_to_f16(v); break;
    case EL_BF16: ((uint16_t *)dst)[i] = cl_float_to_bf16(v); break;
    case EL_F64: ((double *)dst)[i] = (double)v; break;
    default: ((float *)dst)[i] = v; break;
    }
}

void el_quantize(const void *src, uint64_t n, int dtype, float params[2], uint8_t *q)
{
    float mn = 0, mx = 0;
    for (uint64_t i = 0; i < n; i++) {
        float v = load_float(src, i, dtype);
        if (i == 0 || v < mn) mn = v;
        if (i == 0 || v > mx) mx = v;
    }
    float scale = (mx - mn) / 255.0f;
    params[0] = mn;
    params[1] = scale;
    for (uint64_t i = 0; i < n; i++) {
        float x = scale > 0 ? (load_float(src, i, dtype) - mn) / scale + 0.5f : 0.0f;
        q[i] = (uint8_t)(x < 0 ? 0 : x > 255 ? 255 : x);
    }
}

void el_dequantize(const uint8_t *q, uint64_t n, const float params[2], int dtype, void *dst)
{
    for (uint64_t i = 0; i < n; i++) store_float(dst, i, dtype, params[0] + (float)q[i] * params[1]);
}
