#include "reduce.h"

#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define HAVE_X86 1
#else
#define HAVE_X86 0
#endif

/* ---- conversions (software; the x86 F16C path below gives the same bits) ---- */

float cl_f16_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
        if (!mant) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) {
                mant <<= 1;
                exp--;
            }
            bits = sign | exp << 23 | (mant & 0x3ff) << 13;
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | mant << 13;
    } else {
        bits = sign | (exp + 127 - 15) << 23 | mant << 13;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t cl_float_to_f16(float f)
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

float cl_bf16_to_float(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t cl_float_to_bf16(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    /* NaN stays NaN (quiet); else round to nearest even */
    uint32_t rounded = (x + 0x7fff + ((x >> 16) & 1)) >> 16, quiet = (x >> 16) | 0x40;
    return (uint16_t)((x & 0x7fffffff) > 0x7f800000 ? quiet : rounded);
}

size_t cl_dtype_size(int dtype)
{
    static const size_t sizes[CL_NDTYPES] = {2, 2, 4, 8, 1, 2, 4, 8, 1, 2, 4, 8, 1};
    return dtype >= 0 && dtype < CL_NDTYPES ? sizes[dtype] : 0;
}

int cl_dtype_is_float(int dtype) { return dtype >= CL_F16 && dtype <= CL_F64; }

int cl_op_valid(int dtype, int op)
{
    if (dtype < 0 || dtype >= CL_NDTYPES || op < 0 || op >= CL_NOPS) return 0;
    if (op >= CL_BAND) return !cl_dtype_is_float(dtype);
    if (op == CL_AVG) return dtype != CL_BOOL;
    return 1;
}

/* ---- the kernels: one loop per (type, op), vectorised by the compiler ---- */

#define KERNEL(T, NAME, EXPR)                                                                    \
    static void NAME(T *out, const T *a, const T *b, size_t n)                                   \
    {                                                                                            \
        for (size_t i = 0; i < n; i++) {                                                         \
            T x = a[i], y = b[i];                                                                \
            out[i] = (EXPR);                                                                     \
        }                                                                                        \
    }
#define INTEGERS(T, U, P)                                                                        \
    KERNEL(T, P##_sum, (T)((U)x + (U)y))                                                         \
    KERNEL(T, P##_prod, (T)((U)x * (U)y))                                                        \
    KERNEL(T, P##_min, x < y ? x : y)                                                            \
    KERNEL(T, P##_max, x > y ? x : y)                                                            \
    KERNEL(T, P##_band, (T)(x & y))                                                              \
    KERNEL(T, P##_bor, (T)(x | y))                                                               \
    KERNEL(T, P##_bxor, (T)(x ^ y))
INTEGERS(int8_t, uint8_t, i8)
INTEGERS(int16_t, uint16_t, i16)
INTEGERS(int32_t, uint32_t, i32)
INTEGERS(int64_t, uint64_t, i64)
INTEGERS(uint8_t, uint8_t, u8)
INTEGERS(uint16_t, uint16_t, u16)
INTEGERS(uint32_t, uint32_t, u32)
INTEGERS(uint64_t, uint64_t, u64)
#define FLOATS(T, P)                                                                             \
    KERNEL(T, P##_sum, x + y)                                                                    \
    KERNEL(T, P##_prod, x * y)                                                                   \
    KERNEL(T, P##_min, (x < y || x != x) ? x : y)                                                \
    KERNEL(T, P##_max, (x > y || x != x) ? x : y)
FLOATS(float, f32)
FLOATS(double, f64)
/* bool: the truth values (a byte that is not 0 counts as true, the result is 0 or 1) */
KERNEL(uint8_t, b_or, (uint8_t)((x | y) != 0))
KERNEL(uint8_t, b_and, (uint8_t)(x != 0 && y != 0))
KERNEL(uint8_t, b_xor, (uint8_t)((x != 0) != (y != 0)))

typedef void (*kernel)(void *, const void *, const void *, size_t);
#define ROW(P) {(kernel)P##_sum, (kernel)P##_sum, (kernel)P##_min, (kernel)P##_max, (kernel)P##_prod, \
                (kernel)P##_band, (kernel)P##_bor, (kernel)P##_bxor}
#define FROW(P) {(kernel)P##_sum, (kernel)P##_sum, (kernel)P##_min, (kernel)P##_max, (kernel)P##_prod, 0, 0, 0}
static const kernel kernels[CL_NDTYPES][CL_NOPS] = {
    {0}, {0}, FROW(f32), FROW(f64), ROW(i8), ROW(i16), ROW(i32), ROW(i64), ROW(u8), ROW(u16), ROW(u32), ROW(u64),
    {(kernel)b_or, 0, (kernel)b_and, (kernel)b_or, (kernel)b_and, (kernel)b_and, (kernel)b_or, (kernel)b_xor}};

/* ---- float16 / bfloat16: widened per block ---- */

static float combine(int op, float x, float y)
{
    switch (op) {
    case CL_MIN: return (x < y || x != x) ? x : y;
    case CL_MAX: return (x > y || x != x) ? x : y;
    case CL_PROD: return x * y;
    default: return x + y;
    }
}

#define BLOCK 256
static void widen(float *f, const uint16_t *h, size_t n, int bf16);
static void narrow(uint16_t *h, const float *f, size_t n, int bf16);

#if HAVE_X86
__attribute__((target("avx,f16c"))) static void widen_f16c(float *f, const uint16_t *h, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    for (; i < n; i++) f[i] = cl_f16_to_float(h[i]);
}
__attribute__((target("avx,f16c"))) static void narrow_f16c(uint16_t *h, const float *f, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(h + i), _mm256_cvtps_ph(_mm256_loadu_ps(f + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) h[i] = cl_float_to_f16(f[i]);
}
static int have_f16c(void)
{
    static int known = -1;
    if (known < 0) known = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
    return known;
}
#endif

static void widen(float *f, const uint16_t *h, size_t n, int bf16)
{
    if (bf16) {
        for (size_t i = 0; i < n; i++) {
            uint32_t bits = (uint32_t)h[i] << 16;
            memcpy(&f[i], &bits, 4);
        }
        return;
    }
#if HAVE_X86
    if (have_f16c()) return widen_f16c(f, h, n);
#endif
    for (size_t i = 0; i < n; i++) f[i] = cl_f16_to_float(h[i]);
}

static void narrow(uint16_t *h, const float *f, size_t n, int bf16)
{
    if (bf16) {
        for (size_t i = 0; i < n; i++) h[i] = cl_float_to_bf16(f[i]);
        return;
    }
#if HAVE_X86
    if (have_f16c()) return narrow_f16c(h, f, n);
#endif
    for (size_t i = 0; i < n; i++) h[i] = cl_float_to_f16(f[i]);
}

static void half_reduce_many(uint16_t *out, const void *const *in, int k, size_t n, int op, int bf16)
{
    float acc[BLOCK], next[BLOCK];
    for (size_t at = 0; at < n; at += BLOCK) {
        size_t m = n - at < BLOCK ? n - at : BLOCK;
        widen(acc, (const uint16_t *)in[0] + at, m, bf16);
        for (int j = 1; j < k; j++) {
            widen(next, (const uint16_t *)in[j] + at, m, bf16);
            for (size_t i = 0; i < m; i++) acc[i] = combine(op, acc[i], next[i]);
            /* rounded after every step, as k-1 separate reductions of the half type would */
            if (j + 1 < k) {
                uint16_t rounded[BLOCK];
                narrow(rounded, acc, m, bf16);
                widen(acc, rounded, m, bf16);
            }
        }
        narrow(out + at, acc, m, bf16);
    }
}

void cl_reduce(void *out, const void *a, const void *b, size_t n, int dtype, int op)
{
    const void *in[2] = {a, b};
    cl_reduce_many(out, in, 2, n, dtype, op);
}

/* Blocks small enough that the partial result stays in the first-level cache while the
 * other inputs are combined into it: each input is read once, out written once. */
#define MANY_BLOCK_BYTES 8192

void cl_reduce_many(void *out, const void *const *in, int k, size_t n, int dtype, int op)
{
    if (!cl_op_valid(dtype, op) || n == 0 || k < 1) return;
    size_t size = cl_dtype_size(dtype);
    if (k == 1) {
        if (out != in[0]) memmove(out, in[0], n * size);
        return;
    }
    if (dtype == CL_F16 || dtype == CL_BF16) return half_reduce_many(out, in, k, n, op, dtype == CL_BF16);
    kernel f = kernels[dtype][op];
    size_t block = MANY_BLOCK_BYTES / size;
    for (size_t at = 0; at < n; at += block) {
        size_t m = n - at < block ? n - at : block;
        char *o = (char *)out + at * size;
        f(o, (const char *)in[0] + at * size, (const char *)in[1] + at * size, m);
        for (int j = 2; j < k; j++) f(o, o, (const char *)in[j] + at * size, m);
    }
}

void cl_finish_avg(void *buf, size_t n, int dtype, uint64_t divisor)
{
    if (divisor <= 1) return;
#define DIV(T, W)                                                                                  \
    do {                                                                                           \
        T *p = buf;                                                                                \
        for (size_t i = 0; i < n; i++) p[i] = (T)((W)p[i] / (W)divisor);                           \
    } while (0)
    switch (dtype) {
    case CL_F16:
    case CL_BF16: {
        uint16_t *p = buf;
        float f[BLOCK];
        for (size_t at = 0; at < n; at += BLOCK) {
            size_t m = n - at < BLOCK ? n - at : BLOCK;
            widen(f, p + at, m, dtype == CL_BF16);
            for (size_t i = 0; i < m; i++) f[i] /= (float)divisor;
            narrow(p + at, f, m, dtype == CL_BF16);
        }
        break;
    }
    case CL_F32: {
        float *p = buf;
        for (size_t i = 0; i < n; i++) p[i] /= (float)divisor;
        break;
    }
    case CL_F64: {
        double *p = buf;
        for (size_t i = 0; i < n; i++) p[i] /= (double)divisor;
        break;
    }
    case CL_I8: DIV(int8_t, int64_t); break;
    case CL_I16: DIV(int16_t, int64_t); break;
    case CL_I32: DIV(int32_t, int64_t); break;
    case CL_I64: DIV(int64_t, int64_t); break;
    case CL_U8: DIV(uint8_t, uint64_t); break;
    case CL_U16: DIV(uint16_t, uint64_t); break;
    case CL_U32: DIV(uint32_t, uint64_t); break;
    case CL_U64: DIV(uint64_t, uint64_t); break;
    default: break;
    }
#undef DIV
}
