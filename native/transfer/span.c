#include "span.h"

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

int span_stage_copy(struct span_stage *s, int to_program)
{
    if (s->bytes == 0) return 1;
    char *program = (char *)s->device_base + s->lo;
    return to_program ? copy(s->dc, program, s->host, (size_t)s->bytes) : copy(s->dc, s->host, program, (size_t)s->bytes);
}

int span_stage_end(struct span_stage *s, int copy_out)
{
    int ok = !copy_out || s->bytes == 0 || copy(s->dc, (char *)s->device_base + s->lo, s->host, (size_t)s->bytes);
    if (s->host) staging_put(s->kind, s->host, s->capacity, s->dc);
    s->host = NULL;
    return ok;
}
