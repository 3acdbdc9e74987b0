#include "span.h"

#include <stdlib.h>
#include <string.h>

#include "../util/config.h"

#include "../pack/pack_any.h"
#include "staging.h"

/* Copies with the device when the span is device memory; with memcpy when
 * COMMLIB_STAGE_HOST stages host memory for testing (dc is NULL then). */
static int copy(struct device_context *dc, void *dst, const void *src, size_t bytes)
{
    if (dc) return device_copy(dc, dst, src, bytes);
    memcpy(dst, src, bytes);
    return 1;
}

int span_stage_bytes(struct span_stage *s, const void *buf, int64_t lo, int64_t bytes, int overwritten)
{
    if (!buf || bytes <= 0) return 0;
    int on_device = buffer_kind_of((char *)buf + lo) == BUFFER_DEVICE;
    if (!on_device && !commlib_config.stage_host) return 0;
    *s = (struct span_stage){.device_base = (void *)buf, .lo = lo, .bytes = bytes};
    if (on_device && !(s->dc = device_context_of((char *)buf + lo))) return -1;
    s->host = staging_get(s->dc, s->dc ? STAGING_PINNED : STAGING_HOST, (size_t)bytes, &s->capacity, &s->kind);
    if (!s->host) return -1;
    if (!overwritten && !copy(s->dc, s->host, (char *)buf + lo, (size_t)bytes)) {
        staging_put(s->kind, s->host, s->capacity, s->dc);
        s->host = NULL;
        return -1;
    }
    return 1;
}

int span_stage_begin(struct span_stage *s, const void *buf, int64_t count, MPI_Datatype type, int overwritten)
{
    MPI_Count true_lb, true_extent, lb, extent, size;
    if (PMPI_Type_get_true_extent_x(type, &true_lb, &true_extent) != MPI_SUCCESS ||
        PMPI_Type_get_extent_x(type, &lb, &extent) != MPI_SUCCESS || PMPI_Type_size_x(type, &size) != MPI_SUCCESS)
        return -1;
    int64_t lo, bytes;
    typed_span(true_lb, true_extent, extent, count, &lo, &bytes);
    /* a span with gaps must be read first so that writing it back keeps the gaps */
    return span_stage_bytes(s, buf, lo, bytes, overwritten && bytes == size * count);
}

static void free_maps(struct typemap *maps, int nmaps)
{
    for (int i = 0; i < nmaps; i++) typemap_free(&maps[i]);
    free(maps);
}

int span_stage_receive(struct span_stage *s, const void *buf, int64_t lo, int64_t bytes, struct typemap *maps, int nmaps,
                       int read_first)
{
    int rc = span_stage_bytes(s, buf, lo, bytes, 1);
    if (rc != 1) {
        free_maps(maps, nmaps);
        return rc;
    }
    s->maps = maps;
    s->nmaps = nmaps;
    for (int i = 0; read_first && i < nmaps; i++)
        if (!typemap_copy(&maps[i], s->dc, s->device_base, span_host_base(s), -1, 0)) {
            span_stage_end(s, 0);
            return -1;
        }
    return 1;
}

int span_stage_receive_typed(struct span_stage *s, const void *buf, int64_t count, MPI_Datatype type, int read_first)
{
    MPI_Count true_lb, true_extent, lb, extent;
    if (!buf || count <= 0) return 0;
    if (PMPI_Type_get_true_extent_x(type, &true_lb, &true_extent) != MPI_SUCCESS ||
        PMPI_Type_get_extent_x(type, &lb, &extent) != MPI_SUCCESS)
        return -1;
    int64_t lo, bytes;
    typed_span(true_lb, true_extent, extent, count, &lo, &bytes);
    /* host memory is not staged: no map to make */
    int on_device = buffer_kind_of((const char *)buf + lo) == BUFFER_DEVICE;
    if (!on_device && !commlib_config.stage_host) return 0;
    struct typemap *map = malloc(sizeof *map);
    if (!map) return -1;
    if (!typemap_init(map, type) || !typemap_add_block(map, 0, count)) {
        typemap_free(map);
        free(map);
        return -1;
    }
    return span_stage_receive(s, buf, lo, bytes, map, 1, read_first);
}

int span_stage_receive_blocks(struct span_stage *s, const void *buf, int n, const int64_t *counts,
                              const int64_t *displs, const MPI_Datatype *types, int one_type, int read_first)
{
    int64_t lo = INT64_MAX, hi = INT64_MIN;
    int nmaps = one_type ? 1 : n;
    struct typemap *maps = calloc((size_t)(nmaps ? nmaps : 1), sizeof *maps);
    int ok = maps != NULL, made = 0;
    for (int i = 0; ok && i < n; i++) {
        if (counts[i] <= 0) continue;
        MPI_Datatype type = one_type ? types[0] : types[i];
        MPI_Count true_lb, true_extent, lb, extent;
        int64_t first, bytes;
        if (PMPI_Type_get_true_extent_x(type, &true_lb, &true_extent) != MPI_SUCCESS ||
            PMPI_Type_get_extent_x(type, &lb, &extent) != MPI_SUCCESS) {
            ok = 0;
            break;
        }
        typed_span(true_lb, true_extent, extent, counts[i], &first, &bytes);
        lo = displs[i] + first < lo ? displs[i] + first : lo;
        hi = displs[i] + first + bytes > hi ? displs[i] + first + bytes : hi;
        struct typemap *m = &maps[one_type ? 0 : i];
        if (!m->ct && !typemap_init(m, type)) ok = 0;
        if (ok && !typemap_add_block(m, displs[i], counts[i])) ok = 0;
        made = 1;
    }
    if (!ok || !made) {
        free_maps(maps, nmaps);
        return ok ? 0 : -1;
    }
    return span_stage_receive(s, buf, lo, hi - lo, maps, nmaps, read_first);
}

int span_stage_write_back(struct span_stage *s, int64_t received)
{
    for (int i = 0; i < s->nmaps; i++) {
        if (!typemap_copy(&s->maps[i], s->dc, s->device_base, span_host_base(s), received, 1)) return 0;
        if (received >= 0) received -= typemap_bytes(&s->maps[i]) < received ? typemap_bytes(&s->maps[i]) : received;
    }
    return 1;
}

int span_stage_copy(struct span_stage *s, int to_program)
{
    if (s->bytes == 0) return 1;
    char *program = (char *)s->device_base + s->lo;
    return to_program ? copy(s->dc, program, s->host, (size_t)s->bytes) : copy(s->dc, s->host, program, (size_t)s->bytes);
}

int span_stage_end(struct span_stage *s, int copy_out)
{
    int ok = !copy_out || s->bytes == 0 ||
             (s->maps ? span_stage_write_back(s, -1)
                      : copy(s->dc, (char *)s->device_base + s->lo, s->host, (size_t)s->bytes));
    if (s->host) staging_put(s->kind, s->host, s->capacity, s->dc);
    s->host = NULL;
    free_maps(s->maps, s->nmaps);
    s->maps = NULL;
    s->nmaps = 0;
    return ok;
}
