/* A typed buffer in device memory handed to the host MPI: its whole span (true bounds
 * of `count` elements) is copied to host memory, the host MPI works on the copy with the
 * program's own datatype, and the span is copied back when the MPI wrote into it.  The
 * fallback for device buffers whose type commlib does not pack itself.  The copy lives in
 * pinned staging (transfer/staging.h): the copies run at the copy engines' speed and no
 * call faults in fresh pages. */
#ifndef COMMLIB_SPAN_H
#define COMMLIB_SPAN_H

#include <mpi.h>
#include <stdint.h>

#include "../cuda/device.h"

struct span_stage {
    struct device_context *dc;
    void *device_base;  /* the program's pointer */
    char *host;         /* the copy of [lo, lo + bytes): pooled staging, pinned for device spans */
    int64_t lo, bytes;
    size_t capacity;    /* of the staging buffer host points into */
    int kind;           /* its pool (transfer/staging.h) */
};

/* Pointer that plays the program's buffer pointer on the host copy. */
static inline void *span_host_base(const struct span_stage *s) { return (void *)((uintptr_t)s->host - (uintptr_t)s->lo); }

/* 1: `buf` is device memory and *s now holds a host copy; 0: host memory, nothing to
 * do; -1: failure.  The copy is filled from the device unless `overwritten` says the MPI
 * will write every byte of it (a dense span that is only received into). */
int span_stage_begin(struct span_stage *s, const void *buf, int64_t count, MPI_Datatype type, int overwritten);
/* The same for a span given in bytes relative to buf (vector collectives). */
int span_stage_bytes(struct span_stage *s, const void *buf, int64_t lo, int64_t bytes, int overwritten);
/* Copies the whole span between the program's buffer and the host copy: in (to_program
 * 0, as at the start of a persistent request) or back (1); 1 on success. */
int span_stage_copy(struct span_stage *s, int to_program);
/* Copies the span back to the device when copy_out, then frees; 1 on success. */
int span_stage_end(struct span_stage *s, int copy_out);

#endif
