/* Element-wise reductions of commlib's engines: the collective engine over MPI
 * (native/engine) and the elastic engine (native/elastic), one implementation for both.
 *
 * out = a OP b over n elements; out may be a or b.  The order of the operands is the
 * caller's: engines combine in a fixed rank order, so that every rank computes the same
 * bytes (IEEE addition commutes, but min/max with a NaN and rounding chains do not).
 * Integers wrap (computed in unsigned arithmetic, so signed overflow is defined); float16
 * and bfloat16 are widened to float, combined, and rounded back to nearest-even at every
 * step, as the hardware types would be; float min/max propagate NaN (as numpy and torch
 * do).  bool is one byte, 0 or 1: sum and max are "or", prod and min "and", and the
 * bitwise ops act on the truth values.  avg combines as sum; the owner of each result
 * divides once (cl_finish_avg), integers truncating toward zero.  No MPI in here: the
 * elastic library links it too. */
#ifndef COMMLIB_ENGINE_REDUCE_H
#define COMMLIB_ENGINE_REDUCE_H

#include <stddef.h>
#include <stdint.h>

enum cl_dtype { CL_F16, CL_BF16, CL_F32, CL_F64, CL_I8, CL_I16, CL_I32, CL_I64, CL_U8, CL_U16, CL_U32, CL_U64,
                CL_BOOL, CL_NDTYPES };
enum cl_op { CL_SUM, CL_AVG, CL_MIN, CL_MAX, CL_PROD, CL_BAND, CL_BOR, CL_BXOR, CL_NOPS };

size_t cl_dtype_size(int dtype); /* 0 for an unknown dtype */
int cl_dtype_is_float(int dtype);
/* 1 when op is defined on dtype (bitwise ops: integers and bool; avg: not bool). */
int cl_op_valid(int dtype, int op);

void cl_reduce(void *out, const void *a, const void *b, size_t n, int dtype, int op);
/* out = in[0] OP in[1] OP ... OP in[k-1], left to right (k >= 1; out may be in[0]). */
void cl_reduce_many(void *out, const void *const *in, int k, size_t n, int dtype, int op);
/* avg: buf /= divisor. */
void cl_finish_avg(void *buf, size_t n, int dtype, uint64_t divisor);

/* The conversions, for callers that quantize. */
float cl_f16_to_float(uint16_t h);
uint16_t cl_float_to_f16(float f);
float cl_bf16_to_float(uint16_t h);
uint16_t cl_float_to_bf16(float f);

#endif
