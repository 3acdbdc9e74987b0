/* A typed buffer in device memory handed to the host MPI: a host copy of its span (true
 * bounds of `count` elements) takes its place, the host MPI works on the copy with the
 * program's own datatype.  A buffer the MPI only reads is copied in whole (the MPI may
 * read any byte of its type map); a buffer the MPI writes carries typemaps
 * (transfer/typemap.h) and moves only the bytes of its type map, in (when the operation
 * reads it too) and back (only what the message filled), so the program's buffer is
 * touched exactly where a receive into it would touch it.  The fallback for device
 * buffers whose type commlib does not pack itself, and the collectives' way.  The copy
 * lives in pinned staging (transfer/staging.h): the copies run at the copy engines'
 * speed and no call faults in fresh pages. */
#ifndef COMMLIB_SPAN_H
#define COMMLIB_SPAN_H

#include <mpi.h>
#include <stdint.h>

#include "../cuda/device.h"
#include "typemap.h"

struct span_stage {
    struct device_context *dc;
    void *device_base;  /* the program's pointer */
    char *host;         /* the copy of [lo, lo + bytes): pooled staging, pinned for device spans */
    int64_t lo, bytes;
    size_t capacity;    /* of the staging buffer host points into */
    int kind;           /* its pool (transfer/staging.h) */
    int nmaps;          /* a receive buffer: what the MPI writes into it (the stage's own) */
    struct typemap *maps;
};

/* Pointer that plays the program's buffer pointer on the host copy. */
static inline void *span_host_base(const struct span_stage *s) { return (void *)((uintptr_t)s->host - (uintptr_t)s->lo); }

/* 1: `buf` is device memory and *s now holds a host copy; 0: host memory, nothing to
 * do; -1: failure.  The copy is filled from the device unless `overwritten` says the MPI
 * will write every byte of it (a dense span that is only received into). */
int span_stage_begin(struct span_stage *s, const void *buf, int64_t count, MPI_Datatype type, int overwritten);
/* The same for a span given in bytes relative to buf (vector collectives). */
int span_stage_bytes(struct span_stage *s, const void *buf, int64_t lo, int64_t bytes, int overwritten);
/* A buffer the MPI writes: [lo, lo + bytes) relative to buf, holding the maps' blocks.
 * Nothing is read from the program's buffer unless read_first (the operation reads it
 * too, MPI_IN_PLACE), and then only the maps' bytes.  The maps (an array of nmaps, from
 * malloc) become the stage's in every case.  Returns as span_stage_begin. */
int span_stage_receive(struct span_stage *s, const void *buf, int64_t lo, int64_t bytes, struct typemap *maps, int nmaps,
                       int read_first);
/* The same for (count, type) at the buffer pointer (one map, its span computed here). */
int span_stage_receive_typed(struct span_stage *s, const void *buf, int64_t count, MPI_Datatype type, int read_first);
/* The same for n blocks of counts[i] elements of types[i] at byte displacement displs[i]
 * (vector and w collectives; one_type: every types[i] is types[0], one map for all). */
int span_stage_receive_blocks(struct span_stage *s, const void *buf, int n, const int64_t *counts,
                              const int64_t *displs, const MPI_Datatype *types, int one_type, int read_first);
/* Moves what a receive of `received` packed bytes (-1: every element of every map)
 * wrote into the copy to the program's buffer, the maps' bytes only; 1 on success. */
int span_stage_write_back(struct span_stage *s, int64_t received);
/* Copies the whole span between the program's buffer and the host copy: in (to_program
 * 0, as at the start of a persistent request) or back (1); 1 on success. */
int span_stage_copy(struct span_stage *s, int to_program);
/* Copies back to the program when copy_out (a receive stage: its maps' bytes; else the
 * whole span), then frees; 1 on success. */
int span_stage_end(struct span_stage *s, int copy_out);

#endif
