/* Element-wise reductions for the ring.  Integers wrap (computed in unsigned arithmetic,
 * so signed overflow is defined); f16 and bf16 are widened to float, combined, and rounded
 * back to nearest-even at every step, as the hardware types would be. */
#include "internal.h"

#include <string.h>

static float f16_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
        if (!mant) bits = sign;
        else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) { mant <<= 1; exp--; }
            bits = sign | exp << 23 | (mant & 0x3ff) << 13;
        }
    } else if (exp == 31) bits = sign | 0x7f800000u | mant << 13;
    else bits = sign | (exp + 127 - 15) << 23 | mant << 13;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static uint16_t float_to_f16(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    int32_t exp = (int32_t)((x >> 23) & 0xff);
    uint32_t mant = x & 0x7fffff;
    if (exp == 255) return (uint16_t)(sign | 0x7c00 | (mant ? 0x200 : 0));
    int32_t e = exp - 127 + 15;
    if (e >= 31) return (uint16_t)(sign | 0x7c00);
    if (e <= 0) {
        if (e < -10) return (uint16_t)sign;
        mant |= 0x800000;
        int shift = 14 - e;
        uint32_t half = mant >> shift, rem = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = (uint32_t)e << 10 | mant >> 13, rem = mant & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (half & 1))) half++; /* may carry into the exponent: correct */
    return (uint16_t)(sign | half);
}

static float bf16_to_float(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static uint16_t float_to_bf16(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffff) > 0x7f800000) return (uint16_t)((x >> 16) | 0x40);
    x += 0x7fff + ((x >> 16) & 1);
    return (uint16_t)(x >> 16);
}

size_t el_dtype_size(int dtype)
{
    static const size_t sizes[EL_NDTYPES] = {2, 2, 4, 8, 1, 2, 4, 8, 1, 2, 4, 8};
    return dtype >= 0 && dtype < EL_NDTYPES ? sizes[dtype] : 0;
}

#define BINOP(T, NAME, EXPR)                                                          \
    static void NAME(T *restrict d, const T *restrict s, uint64_t n)                  \
    {                                                                                 \
        for (uint64_t i = 0; i < n; i++) { T a = d[i], b = s[i]; d[i] = (EXPR); }     \
    }
#define FAMILY(T, U, P)                                                               \
    BINOP(T, P##_sum, (T)((U)a + (U)b))                                               \
    BINOP(T, P##_prod, (T)((U)a * (U)b))                                              \
    BINOP(T, P##_min, a < b ? a : b)                                                  \
    BINOP(T, P##_max, a > b ? a : b)
FAMILY(int8_t, uint8_t, i8)
FAMILY(int16_t, uint16_t, i16)
FAMILY(int32_t, uint32_t, i32)
FAMILY(int64_t, uint64_t, i64)
FAMILY(uint8_t, uint8_t, u8)
FAMILY(uint16_t, uint16_t, u16)
FAMILY(uint32_t, uint32_t, u32)
FAMILY(uint64_t, uint64_t, u64)
BINOP(float, f32_sum, a + b)
BINOP(float, f32_prod, a * b)
BINOP(float, f32_min, a < b ? a : b)
BINOP(float, f32_max, a > b ? a : b)
BINOP(double, f64_sum, a + b)
BINOP(double, f64_prod, a * b)
BINOP(double, f64_min, a < b ? a : b)
BINOP(double, f64_max, a > b ? a : b)

static float fop(int op, float a, float b)
{
    switch (op) {
    case EL_MIN: return a < b ? a : b;
    case EL_MAX: return a > b ? a : b;
    case EL_PROD: return a * b;
    default: return a + b;
    }
}

typedef void (*binop)(void *, const void *, uint64_t);
#define ROW(P) {(binop)P##_sum, (binop)P##_sum, (binop)P##_min, (binop)P##_max, (binop)P##_prod}

EL_API int el_reduce(void *dst, const void *src, uint64_t count, int dtype, int op)
{
    if (dtype < 0 || dtype >= EL_NDTYPES || op < 0 || op >= EL_NOPS) return EL_ERR_ARG;
    if (dtype == EL_F16 || dtype == EL_BF16) {
        uint16_t *d = dst;
        const uint16_t *s = src;
        for (uint64_t i = 0; i < count; i++)
            d[i] = dtype == EL_F16 ? float_to_f16(fop(op, f16_to_float(d[i]), f16_to_float(s[i])))
                                   : float_to_bf16(fop(op, bf16_to_float(d[i]), bf16_to_float(s[i])));
        return EL_OK;
    }
    static const binop table[EL_NDTYPES][EL_NOPS] = {
        {0}, {0}, ROW(f32), ROW(f64), ROW(i8), ROW(i16), ROW(i32), ROW(i64), ROW(u8), ROW(u16), ROW(u32), ROW(u64)};
    table[dtype][op](dst, src, count);
    return EL_OK;
}

/* avg = sum / n, applied once by the owner of each segment (so every peer ends with the
 * same bytes).  Integers divide truncating toward zero, like C. */
void el_finish_avg(void *buf, uint64_t count, int dtype, uint64_t n)
{
#define DIV(T, W) do { T *p = buf; for (uint64_t i = 0; i < count; i++) p[i] = (T)((W)p[i] / (W)n); } while (0)
    switch (dtype) {
    case EL_F16: { uint16_t *p = buf; for (uint64_t i = 0; i < count; i++) p[i] = float_to_f16(f16_to_float(p[i]) / (float)n); break; }
    case EL_BF16: { uint16_t *p = buf; for (uint64_t i = 0; i < count; i++) p[i] = float_to_bf16(bf16_to_float(p[i]) / (float)n); break; }
    case EL_F32: { float *p = buf; for (uint64_t i = 0; i < count; i++) p[i] /= (float)n; break; }
    case EL_F64: { double *p = buf; for (uint64_t i = 0; i < count; i++) p[i] /= (double)n; break; }
    case EL_I8: DIV(int8_t, int64_t); break;
    case EL_I16: DIV(int16_t, int64_t); break;
    case EL_I32: DIV(int32_t, int64_t); break;
    case EL_I64: DIV(int64_t, int64_t); break;
    case EL_U8: DIV(uint8_t, uint64_t); break;
    case EL_U16: DIV(uint16_t, uint64_t); break;
    case EL_U32: DIV(uint32_t, uint64_t); break;
    case EL_U64: DIV(uint64_t, uint64_t); break;
    }
#undef DIV
}

/* ---- min-max uint8 quantization (optional compressed transfer) ----
 * q = round((v - min) / scale), scale = (max - min) / 255; v' = min + q * scale in float.
 * Every peer dequantizes the same bytes with the same code, so results stay identical. */
static float load_float(const void *src, uint64_t i, int dtype)
{
    switch (dtype) {
    case EL_F16: return f16_to_float(((const uint16_t *)src)[i]);
    case EL_BF16: return bf16_to_float(((const uint16_t *)src)[i]);
    case EL_F64: return (float)((const double *)src)[i];
    default: return ((const float *)src)[i];
    }
}

static void store_float(void *dst, uint64_t i, int dtype, float v)
{
    switch (dtype) {
    case EL_F16: ((uint16_t *)dst)[i] = float_to_f16(v); break;
    case EL_BF16: ((uint16_t *)dst)[i] = float_to_bf16(v); break;
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
