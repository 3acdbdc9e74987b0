#include "host_pack.h"

#include <string.h>

#include "commlib.h"

/* One row: `n` blocks of B bytes, `stride` apart on the typed side, dense on the packed
 * side.  A constant B turns memcpy into a single load/store pair. */
/* Blocks far apart defeat the hardware prefetcher (one block per cache line or page);
 * fetch PREFETCH_AHEAD blocks ahead once the stride is at least a few lines. */
#define PREFETCH_AHEAD 16
#define FAR_APART(stride) ((stride) >= 256 || (stride) <= -256)

#define ROW_KERNELS(B)                                                                             \
    static void pack_row_##B(char *restrict packed, const char *restrict typed, int64_t n,        \
                             int64_t stride, int64_t block)                                        \
    {                                                                                              \
        (void)block;                                                                               \
        int64_t i = 0;                                                                             \
        if (FAR_APART(stride))                                                                     \
            for (; i + PREFETCH_AHEAD < n; i++, packed += B, typed += stride) {                    \
                __builtin_prefetch(typed + PREFETCH_AHEAD * stride, 0, 0);                         \
                memcpy(packed, typed, B);                                                          \
            }                                                                                      \
        for (; i < n; i++, packed += B, typed += stride) memcpy(packed, typed, B);                 \
    }                                                                                              \
    static void unpack_row_##B(char *restrict typed, const char *restrict packed, int64_t n,      \
                               int64_t stride, int64_t block)                                      \
    {                                                                                              \
        (void)block;                                                                               \
        int64_t i = 0;                                                                             \
        if (FAR_APART(stride))                                                                     \
            for (; i + PREFETCH_AHEAD < n; i++, packed += B, typed += stride) {                    \
                __builtin_prefetch(typed + PREFETCH_AHEAD * stride, 1, 0);                         \
                memcpy(typed, packed, B);                                                          \
            }                                                                                      \
        for (; i < n; i++, packed += B, typed += stride) memcpy(typed, packed, B);                 \
    }

ROW_KERNELS(1)
ROW_KERNELS(2)
ROW_KERNELS(4)
ROW_KERNELS(8)
ROW_KERNELS(12)
ROW_KERNELS(16)
ROW_KERNELS(24)
ROW_KERNELS(32)
ROW_KERNELS(64)

/* Mid-size blocks that are whole 8-byte words: an inline word loop beats a call into
 * the C library's memcpy for every block. */
static void pack_row_words(char *restrict packed, const char *restrict typed, int64_t n, int64_t stride,
                           int64_t block)
{
    for (int64_t i = 0; i < n; i++, typed += stride)
        for (int64_t w = 0; w < block; w += 8, packed += 8) memcpy(packed, typed + w, 8);
}
static void unpack_row_words(char *restrict typed, const char *restrict packed, int64_t n, int64_t stride,
                             int64_t block)
{
    for (int64_t i = 0; i < n; i++, typed += stride)
        for (int64_t w = 0; w < block; w += 8, packed += 8) memcpy(typed + w, packed, 8);
}

static void pack_row_any(char *restrict packed, const char *restrict typed, int64_t n, int64_t stride,
                         int64_t block)
{
    for (int64_t i = 0; i < n; i++, packed += block, typed += stride) memcpy(packed, typed, (size_t)block);
}
static void unpack_row_any(char *restrict typed, const char *restrict packed, int64_t n, int64_t stride,
                           int64_t block)
{
    for (int64_t i = 0; i < n; i++, packed += block, typed += stride) memcpy(typed, packed, (size_t)block);
}

typedef void (*row_fn)(char *, const char *, int64_t, int64_t, int64_t);

static void choose_rows(int64_t block, row_fn *pack, row_fn *unpack)
{
    switch (block) {
#define CASE(B)              \
    case B:                  \
        *pack = pack_row_##B; \
        *unpack = unpack_row_##B; \
        return;
        CASE(1) CASE(2) CASE(4) CASE(8) CASE(12) CASE(16) CASE(24) CASE(32) CASE(64)
#undef CASE
    }
    if (block % 8 == 0 && block <= 256) {
        *pack = pack_row_words;
        *unpack = unpack_row_words;
    } else {
        *pack = pack_row_any;
        *unpack = unpack_row_any;
    }
}

/* Small dense blocks are copied inline in 64-byte steps, larger ones by the C library's
 * memcpy (vector-width aware). */
static void copy_dense(char *restrict dst, const char *restrict src, int64_t n)
{
    if (n >= 512) {
        memcpy(dst, src, (size_t)n);
        return;
    }
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) memcpy(dst + i, src + i, 64);
    if (i < n) memcpy(dst + i, src + i, (size_t)(n - i));
}

/* Walks the outer dimensions; the row kernel does dims[0].  `packed` advances. */
static void walk(const strided_piece *p, int dim, char *typed, char **packed, row_fn row, int packing)
{
    if (dim == 0) {
        int64_t n = p->ndims ? p->dims[0].count : 1, stride = p->ndims ? p->dims[0].stride : 0;
        if (packing) row(*packed, typed, n, stride, p->block);
        else row(typed, *packed, n, stride, p->block);
        *packed += n * p->block;
        return;
    }
    const stride_dim *d = &p->dims[dim];
    for (int64_t i = 0; i < d->count; i++) walk(p, dim - 1, typed + i * d->stride, packed, row, packing);
}

static void move_piece(const strided_piece *p, char *typed_base, char **packed, int packing)
{
    char *typed = (char *)((uintptr_t)typed_base + (uintptr_t)p->offset);
    if (p->ndims == 0) { /* one dense block */
        if (packing) copy_dense(*packed, typed, p->block);
        else copy_dense(typed, *packed, p->block);
        *packed += p->block;
        return;
    }
    row_fn pack, unpack;
    choose_rows(p->block, &pack, &unpack);
    walk(p, p->ndims - 1, typed, packed, packing ? pack : unpack, packing);
}

void host_move(const canonical_type *ct, char *typed, int64_t count, char *packed, int packing)
{
    if (ct->npieces == 1 && count == 1) {
        move_piece(&ct->pieces[0], typed, &packed, packing);
        return;
    }
    strided_piece whole;
    if (canonical_single_piece(ct, count, &whole)) { /* the common case: one loop nest */
        move_piece(&whole, typed, &packed, packing);
        return;
    }
    for (int64_t i = 0; i < count; i++) {
        char *element = (char *)((uintptr_t)typed + (uintptr_t)(i * ct->extent));
        for (int j = 0; j < ct->npieces; j++) move_piece(&ct->pieces[j], element, &packed, packing);
    }
}

int pack_check(const canonical_type *ct, int64_t count, int64_t bufsize, const int64_t *position,
               const void *packed_buf, int64_t *bytes)
{
    if (ct->unsupported) return COMMLIB_ERR_UNSUPPORTED;
    if (count < 0 || !position || *position < 0 || bufsize < 0) return COMMLIB_ERR_ARG;
    if (__builtin_mul_overflow(count, ct->size, bytes)) return COMMLIB_ERR_ARG;
    if (*position > bufsize || bufsize - *position < *bytes) return COMMLIB_ERR_TRUNCATE;
    if (*bytes > 0 && !packed_buf) return COMMLIB_ERR_ARG;
    return COMMLIB_OK;
}

int host_pack_message(const canonical_type *ct, const void *inbuf, int64_t incount, void *outbuf,
                      int64_t outsize, int64_t *position)
{
    int64_t bytes;
    int rc = pack_check(ct, incount, outsize, position, outbuf, &bytes);
    if (rc != COMMLIB_OK) return rc;
    if (bytes > 0) host_move(ct, (char *)inbuf, incount, (char *)outbuf + *position, 1);
    *position += bytes;
    return COMMLIB_OK;
}

int host_unpack_message(const canonical_type *ct, const void *inbuf, int64_t insize, int64_t *position,
                        void *outbuf, int64_t outcount)
{
    int64_t bytes;
    int rc = pack_check(ct, outcount, insize, position, inbuf, &bytes);
    if (rc != COMMLIB_OK) return rc;
    if (bytes > 0) host_move(ct, (char *)outbuf, outcount, (char *)inbuf + *position, 0);
    *position += bytes;
    return COMMLIB_OK;
}
