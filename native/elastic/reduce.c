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

/* ---- min-max quantization (optional compressed transfer) ----
 * q = round((v - min) / scale), scale = (max - min) / levels (255 for uint8 codes, 15 for
 * uint4); v' = min + q * scale in float.  Rounding is half-up in float, the same code on
 * every peer; and every peer dequantizes the same codes with the same code, so results
 * stay identical.  uint4 codes travel two per byte (pack4/unpack4); in memory a code
 * takes a byte either way, so chunks with odd counts or odd offsets need no care. */
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

void el_quantize(const void *src, uint64_t n, int dtype, int levels, float params[2], uint8_t *q)
{
    float mn = 0, mx = 0;
    for (uint64_t i = 0; i < n; i++) {
        float v = load_float(src, i, dtype);
        if (i == 0 || v < mn) mn = v;
        if (i == 0 || v > mx) mx = v;
    }
    float top = (float)levels, scale = (mx - mn) / top;
    params[0] = mn;
    params[1] = scale;
    for (uint64_t i = 0; i < n; i++) {
        float x = scale > 0 ? (load_float(src, i, dtype) - mn) / scale + 0.5f : 0.0f;
        q[i] = (uint8_t)(x < 0 ? 0 : x > top ? top : x);
    }
}

void el_dequantize(const uint8_t *q, uint64_t n, const float params[2], int dtype, void *dst)
{
    for (uint64_t i = 0; i < n; i++) store_float(dst, i, dtype, params[0] + (float)q[i] * params[1]);
}

/* Low nibble first: code 2i in byte i's low half, 2i+1 in its high half (an odd count
 * leaves the last high half zero).  In place is safe: byte i is written after codes 2i
 * and 2i+1 were read, and i <= 2i. */
void el_pack4(const uint8_t *codes, uint64_t n, uint8_t *out)
{
    for (uint64_t i = 0; 2 * i < n; i++) {
        uint8_t lo = codes[2 * i] & 15, hi = 2 * i + 1 < n ? codes[2 * i + 1] & 15 : 0;
        out[i] = (uint8_t)(lo | hi << 4);
    }
}

void el_unpack4(const uint8_t *packed, uint64_t n, uint8_t *codes)
{
    for (uint64_t i = 0; i < n; i++) codes[i] = (uint8_t)(i & 1 ? packed[i / 2] >> 4 : packed[i / 2] & 15);
}

/* Decodes packed uint4 codes straight into dst (a reduce-scatter hop's payload). */
void el_dequantize4(const uint8_t *packed, uint64_t n, const float params[2], int dtype, void *dst)
{
    for (uint64_t i = 0; i < n; i++) {
        uint8_t q = (uint8_t)(i & 1 ? packed[i / 2] >> 4 : packed[i / 2] & 15);
        store_float(dst, i, dtype, params[0] + (float)q * params[1]);
    }
}
