#include "typemap.h"

#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "../datatype/cache.h"
#include "../pack/host_pack.h"
#include "../pack/pack_any.h"
#include "../util/log.h"
#include "commlib.h"
#include "staging.h"

static char *at(void *base, int64_t offset) { return (char *)((uintptr_t)base + (uintptr_t)offset); }

static canonical_type *copy_of(const canonical_type *ct)
{
    canonical_type *c = malloc(sizeof *c);
    strided_piece *pieces = malloc((size_t)(ct->npieces ? ct->npieces : 1) * sizeof *pieces);
    if (!c || !pieces) {
        free(c);
        free(pieces);
        return NULL;
    }
    *c = *ct;
    memcpy(pieces, ct->pieces, (size_t)ct->npieces * sizeof *pieces);
    c->pieces = pieces;
    return c;
}

/* Sorting the runs by packed position. */
static const int64_t *sort_key;
static int by_key(const void *a, const void *b)
{
    int64_t x = sort_key[*(const int64_t *)a], y = sort_key[*(const int64_t *)b];
    return (x > y) - (x < y);
}

/* The runs of bytes an element's unpack writes, with their packed positions (see the
 * header): the map of a type commlib does not reduce, as the host MPI defines it. */
static int map_from_mpi(struct typemap *m, MPI_Datatype type)
{
    MPI_Count size, lb, extent, tlb, text;
    int packed_size = 0;
    if (PMPI_Type_size_x(type, &size) != MPI_SUCCESS || PMPI_Type_get_extent_x(type, &lb, &extent) != MPI_SUCCESS ||
        PMPI_Type_get_true_extent_x(type, &tlb, &text) != MPI_SUCCESS ||
        PMPI_Pack_size(1, type, MPI_COMM_SELF, &packed_size) != MPI_SUCCESS)
        return 0;
    m->size = size;
    if (size == 0 || text <= 0) return (m->ct = canonical_type_from_blocks(0, NULL, NULL, extent)) != NULL;
    if (text > TYPEMAP_MPI_SPAN_MAX) {
        commlib_log(LOG_ERROR, "a type commlib does not reduce spans %lld bytes per element (limit %lld): not staged",
                    (long long)text, (long long)TYPEMAP_MPI_SPAN_MAX);
        return 0;
    }
    unsigned char *packed = malloc((size_t)packed_size + 1), *written = calloc((size_t)text, 1);
    unsigned char *plane = malloc((size_t)text);
    uint32_t *position = calloc((size_t)text, sizeof *position);
    int64_t *runs = malloc((size_t)text * 3 * sizeof *runs), *order = malloc((size_t)text * sizeof *order);
    int ok = packed && written && plane && position && runs && order;
    void *written_base = written - tlb, *plane_base = plane - tlb; /* play the buffer pointer */
    int pos = 0;
    if (ok) {
        memset(packed, 0xff, (size_t)packed_size);
        ok = PMPI_Unpack(packed, packed_size, &pos, written_base, 1, type, MPI_COMM_SELF) == MPI_SUCCESS;
    }
    for (int shift = 0; ok && shift < 32 && ((int64_t)1 << shift) < packed_size; shift += 8) {
        for (int k = 0; k < packed_size; k++) packed[k] = (unsigned char)(k >> shift);
        pos = 0;
        ok = PMPI_Unpack(packed, packed_size, &pos, plane_base, 1, type, MPI_COMM_SELF) == MPI_SUCCESS;
        for (int64_t a = 0; ok && a < text; a++)
            if (written[a]) position[a] |= (uint32_t)plane[a] << shift;
    }
    int64_t n = 0, *offset = runs, *length = runs + text, *start = runs + 2 * text;
    for (int64_t a = 0; ok && a < text;) {
        if (!written[a]) {
            a++;
            continue;
        }
        int64_t b = a + 1;
        while (b < text && written[b] && position[b] == position[b - 1] + 1) b++;
        offset[n] = tlb + a;
        length[n] = b - a;
        start[n] = position[a];
        order[n] = n;
        n++;
        a = b;
    }
    if (ok) {
        sort_key = start; /* typemap_init serialises this */
        qsort(order, (size_t)n, sizeof *order, by_key);
        m->run_offset = malloc((size_t)(n ? n : 1) * sizeof(int64_t));
        m->run_length = malloc((size_t)(n ? n : 1) * sizeof(int64_t));
        m->run_packed = malloc((size_t)(n ? n : 1) * sizeof(int64_t));
        ok = m->run_offset && m->run_length && m->run_packed;
        for (int64_t i = 0; ok && i < n; i++) {
            m->run_offset[i] = offset[order[i]];
            m->run_length[i] = length[order[i]];
            m->run_packed[i] = start[order[i]];
        }
        m->nruns = n;
        ok = ok && (m->ct = canonical_type_from_blocks(n, m->run_offset, m->run_length, extent)) != NULL;
    }
    free(packed);
    free(written);
    free(plane);
    free(position);
    free(runs);
    free(order);
    return ok;
}

int typemap_init(struct typemap *m, MPI_Datatype type)
{
    *m = (struct typemap){0};
    int locked;
    const canonical_type *ct = type_cache_acquire(type, &locked);
    if (ct && !ct->unsupported) {
        m->size = ct->size;
        m->ct = copy_of(ct);
    }
    type_cache_release(locked);
    if (m->ct) return 1;
    /* qsort's comparator reads a static: one MPI-derived map at a time */
    static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
    pthread_mutex_lock(&lock);
    int ok = map_from_mpi(m, type);
    pthread_mutex_unlock(&lock);
    if (!ok) typemap_free(m);
    return ok;
}

int typemap_add_block(struct typemap *m, int64_t displ, int64_t count)
{
    if (count <= 0) return 1;
    struct typemap_block *b = realloc(m->blocks, (size_t)(m->nblocks + 1) * sizeof *b);
    if (!b) return 0;
    m->blocks = b;
    m->blocks[m->nblocks++] = (struct typemap_block){displ, count};
    return 1;
}

void typemap_free(struct typemap *m)
{
    if (m->ct) canonical_type_destroy(m->ct);
    free(m->run_offset);
    free(m->run_length);
    free(m->run_packed);
    free(m->blocks);
    *m = (struct typemap){0};
}

int64_t typemap_bytes(const struct typemap *m)
{
    int64_t bytes = 0;
    for (int i = 0; i < m->nblocks; i++) bytes += m->blocks[i].count * m->size;
    return bytes;
}

/* Copies between a device (dc) or host buffer and host memory. */
static int move_bytes(struct device_context *dc, void *dst, const void *src, int64_t bytes)
{
    if (bytes <= 0) return 1;
    if (dc) return device_copy(dc, dst, src, (size_t)bytes);
    memcpy(dst, src, (size_t)bytes);
    return 1;
}

/* `count` elements of ct from the copy to the program (or back): the copy's blocks are
 * gathered into packed staging by the host engine and scattered into the program's
 * buffer by commlib's engines (device kernels for device memory), so only the blocks'
 * bytes are touched on the program's side. */
static int move_elements(const canonical_type *ct, struct device_context *dc, char *program, char *copy, int64_t count,
                         int to_program)
{
    int64_t bytes = ct->size * count;
    if (bytes <= 0) return 1;
    const strided_piece *p = &ct->pieces[0];
    if (ct->npieces == 1 && p->ndims == 0 && (count == 1 || ct->extent == p->block)) /* one contiguous run */
        return to_program ? move_bytes(dc, program + p->offset, copy + p->offset, bytes)
                          : move_bytes(dc, copy + p->offset, program + p->offset, bytes);
    size_t capacity;
    int kind;
    char *packed = staging_get(dc, dc ? STAGING_PINNED : STAGING_HOST, (size_t)bytes, &capacity, &kind);
    if (!packed) return 0;
    int64_t position = 0;
    int ok;
    if (to_program) {
        host_move(ct, copy, count, packed, 1);
        ok = any_unpack_message(ct, packed, bytes, &position, program, count) == COMMLIB_OK;
    } else {
        ok = any_pack_message(ct, program, count, packed, bytes, &position) == COMMLIB_OK;
        if (ok) host_move(ct, copy, count, packed, 0);
    }
    staging_put(kind, packed, capacity, dc);
    return ok;
}

/* The first `bytes` packed bytes of one element: what a message ending inside it fills. */
static int move_prefix(const struct typemap *m, struct device_context *dc, char *program, char *copy, int64_t bytes,
                       int to_program)
{
    if (m->run_packed) { /* the MPI's runs, by packed position */
        int64_t n = 0, *offset = malloc((size_t)(m->nruns + 1) * sizeof *offset);
        int64_t *length = malloc((size_t)(m->nruns + 1) * sizeof *length);
        int ok = offset && length;
        for (int64_t i = 0; ok && i < m->nruns && m->run_packed[i] < bytes; i++, n++) {
            offset[n] = m->run_offset[i];
            length[n] = bytes - m->run_packed[i] < m->run_length[i] ? bytes - m->run_packed[i] : m->run_length[i];
        }
        canonical_type *prefix = ok ? canonical_type_from_blocks(n, offset, length, m->ct->extent) : NULL;
        ok = prefix && move_elements(prefix, dc, program, copy, 1, to_program);
        if (prefix) canonical_type_destroy(prefix);
        free(offset);
        free(length);
        return ok;
    }
    strided_piece *pieces = malloc((size_t)CANONICAL_PREFIX_MAX(m->ct) * sizeof *pieces);
    if (!pieces) return 0;
    canonical_type prefix;
    int ok = canonical_prefix(m->ct, bytes, &prefix, pieces) && move_elements(&prefix, dc, program, copy, 1, to_program);
    free(pieces);
    return ok;
}

int typemap_copy(const struct typemap *m, struct device_context *dc, void *program, void *copy, int64_t received,
                 int to_program)
{
    int64_t left = received < 0 ? INT64_MAX : received;
    for (int i = 0; i < m->nblocks && left > 0; i++) {
        const struct typemap_block *b = &m->blocks[i];
        int64_t bytes = b->count * m->size, take = bytes < left ? bytes : left;
        left -= take;
        int64_t whole = m->size ? take / m->size : 0, rest = take - whole * m->size;
        char *p = at(program, b->displ), *c = at(copy, b->displ);
        if (whole && !move_elements(m->ct, dc, p, c, whole, to_program)) return 0;
        int64_t next = whole * m->ct->extent;
        if (rest && !move_prefix(m, dc, p + next, c + next, rest, to_program)) return 0;
    }
    return 1;
}

int typemap_copy_elements(const struct typemap *m, struct device_context *dc, void *program, void *copy, int64_t displ,
                          int64_t count, int to_program)
{
    return move_elements(m->ct, dc, at(program, displ), at(copy, displ), count, to_program);
}
