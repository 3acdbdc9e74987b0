/* Staged point-to-point: a device buffer handed to an MPI that cannot read device
 * memory.  A send packs the message (device engine) into host staging and the host MPI
 * sends those bytes as MPI_PACKED; a receive takes MPI_PACKED bytes into host staging
 * and unpacks them into the program's buffer when the receive completes.  MPI's
 * matching rules let MPI_PACKED match any type signature, so the peer may be a plain
 * host send or receive with a derived type, and a receive posted for count * size bytes
 * keeps the host MPI's own truncation error and status counts (MPI_Get_count with the
 * program's type divides the byte count by the type size).
 *
 * How the packed bytes travel between the device and the MPI is the send method
 * (model.h): oneshot (kernel straight into pinned staging), device (device staging,
 * then one bulk copy) or, over a CUDA-aware MPI, aware (device staging handed to the
 * MPI, or a contiguous buffer handed over as it is - then nothing is staged at all and
 * prepare answers STAGED_FORWARD).
 *
 * Types commlib does not reduce (or messages over INT_MAX packed bytes) take the typed
 * path instead: a host copy of the buffer's span, on which the host MPI works with the
 * program's own datatype and count; a send copies the span in, a receive copies nothing
 * in and gives back only the bytes the message filled (transfer/typemap.h).
 *
 * Partitioned requests (MPI-4) take the same routes with the program's partition count on
 * the wire, and move partition by partition: a send's at MPI_Pready, a receive's when it
 * arrived (staged_partitioned_prepare and below).
 *
 * COMMLIB_STAGE_HOST=1 sends host buffers through the same machinery (plain malloc
 * staging, host engine) so it runs on machines without a GPU.  MPI_BOTTOM buffers are
 * never staged for host memory: they stay a plain host path for tests to mix in. */
#ifndef COMMLIB_TRANSFER_STAGED_H
#define COMMLIB_TRANSFER_STAGED_H

#include <mpi.h>
#include <stddef.h>

#include "../datatype/canonical.h"
#include "span.h"

enum { STAGED_FAILED = -1, STAGED_FORWARD = 0, STAGED_YES = 1 };

typedef struct staged_transfer {
    /* The message as the host MPI sees it. */
    void *wire_buf;
    int wire_count;
    MPI_Datatype wire_type;

    int receiving;
    int typed;              /* 1: typed path (span copy, the program's type on the wire) */
    int collective;         /* a typed receive of a collective: every element is written */
    void *user;             /* the program's buffer */
    char *staging;          /* packed path: the packed bytes */
    size_t capacity;
    int staging_kind;       /* which pool staging came from (malloc, pinned, device) */
    int method;             /* transfer_method of a device buffer's packed path; -1 otherwise */
    int dense;              /* the message is one contiguous block, at user + dense_offset */
    int64_t dense_offset;
    struct device_context *dc; /* the buffer's device (NULL: host memory staged) */
    struct span_stage span; /* typed path */
    canonical_type ct;      /* packed receive (and persistent send): a private copy (pieces stored
                               after the struct), because the program may free its type before
                               completion */

    /* Persistent requests (MPI_Send_init, MPI_Recv_init, ...): the staging belongs to the
     * host MPI's persistent request and lives until MPI_Request_free; each MPI_Start
     * refills it (staged_start). */
    int persistent;
    int freed;              /* the program freed it while active: free the host request at completion */
    int count;              /* persistent packed send: elements packed at each start; partitioned:
                               elements per partition */

    /* Partitioned requests (MPI_Psend_init, MPI_Precv_init): `partitions` of `count`
     * elements each, and wire_count is per partition too.  A send moves partition i into
     * the staging at MPI_Pready; a receive moves it into the program's buffer once per
     * start, when MPI_Parrived first reports it or at completion (partition_state, one
     * byte per partition, tells which are moved). */
    int partitions;
    unsigned char *partition_state;

    /* MPI_Isendrecv: the send half, a host request of commlib's own that the program
     * never sees (pending while companion_pending). */
    int companion_pending;
    MPI_Request companion;
    struct staged_transfer *linked; /* staging that lives as long as this request (released with it) */

    /* A packed device receive posted to the host MPI for more than the program's count x
     * size (posted_larger: room for a GPU-to-GPU descriptor, ipc_receive_posted_bytes):
     * program_bytes is what the program's buffer holds - truncation and the status go by it. */
    int posted_larger;
    int64_t program_bytes;

    /* A receive that was a GPU-to-GPU message (transfer/ipc.h): the sender's arena space
     * to acknowledge once the unpack from it completed (ipc_acknowledge). */
    int ipc_pending, ipc_sender, ipc_arena; /* ipc_arena IPC_DIRECT: the sender's own buffer */
    uint64_t ipc_seq;
    uint64_t ipc_ack[2]; /* a direct send's acknowledgement lands here (its companion receive) */
    uint64_t ipc_buffer_id; /* a direct receive: the sender's allocation it maps */
    int ipc_import_held;    /* a receive holds a mapping (import users) until its acknowledgement */
    /* a direct receive whose sender sent one strided piece as it lies in its buffer: the
     * piece (ipc_strided), packed from the sender's memory into peer_scratch (device
     * staging, released with the transfer) before the unpack */
    int ipc_strided;
    strided_piece ipc_piece;
    void *peer_scratch;
    size_t peer_scratch_capacity;
    int peer_scratch_kind;
    int ipc_direct;      /* a direct send: its companion is the acknowledgement, never cancelled */
    /* finished by the progress thread and left in the table (progress/requests.h): the
     * status and result its finish produced, for the program's completion call */
    int finished_early, early_err;
    uint64_t done_seen_ns; /* when the progress thread first saw it complete (it waits a little: requests.c) */
    MPI_Status early_status;
    /* A GPU-to-GPU send whose pack may still run on dc's stream (the receiver waits for it
     * on the device): its completion waits for it before the program may reuse the buffer
     * (ipc_send_settle).  ipc_burst: the pack is a burst's (transfer/ipc.h), on the burst
     * stream, launched by ipc_flush_sends or commlib's burst thread. */
    int ipc_unsynced;
    uint64_t ipc_burst;

    /* A pipelined send (transfer/pipeline.h): its chunks' state while the program's request
     * waits for their copies off the GPU (companion_pending until then); pipe_failed: a
     * chunk could not be handed to the host MPI. */
    int pipelined, pipe_failed;
    struct pipeline_send *pipe;

    /* Owned by progress/requests.c while the transfer waits for its request. */
    MPI_Request request;
    int index; /* position in the request array of the call completing it */
    struct staged_transfer *next;
    /* A partitioned request's place in the registry MPI_Pready/MPI_Parrived look in
     * (progress/requests.h), from init until the staging is released. */
    MPI_Request registered;
    struct staged_transfer *registry_next;
} staged_transfer;

/* The host requests and work a transfer waits for beside the program's request
 * (companion_pending): an Isendrecv's send half, a direct GPU-to-GPU send's
 * acknowledgement, a pipelined send's chunks (handed to the host MPI as their copies end).
 * test: 1 when nothing is pending; wait: the MPI error code of waiting for it. */
int staged_companions_test(staged_transfer *t);
int staged_companions_wait(staged_transfer *t);

/* STAGED_FORWARD: hand the call to the host MPI unchanged (host memory, count <= 0, a
 * type that only the host MPI can judge); STAGED_YES: *out is ready, use its wire_*;
 * STAGED_FAILED: device memory that could not be staged (the error is logged). */
int staged_send_prepare(staged_transfer **out, const void *buf, int count, MPI_Datatype type);
int staged_recv_prepare(staged_transfer **out, void *buf, int count, MPI_Datatype type);
/* For a persistent request: the same routes, but nothing is packed or copied now (each
 * MPI_Start does it) and the staging is kept until staged_release. */
int staged_persistent_prepare(staged_transfer **out, const void *buf, int count, MPI_Datatype type, int receiving);
/* MPI_Start of a persistent transfer: a send packs (or copies the span) afresh (a
 * partitioned send leaves each partition to its MPI_Pready); a partitioned receive forgets
 * which partitions it moved.  0 on failure (logged). */
int staged_start(staged_transfer *t);

/* A partitioned request of `partitions` x `count` elements: the routes of a persistent
 * one (packed bytes as MPI_PACKED, or the span with the program's type), but the typed
 * route carries a typemap on both sides, so that a partition moves only its own
 * elements' bytes.  More than INT_MAX elements in all are forwarded (as the large-count
 * forms). */
int staged_partitioned_prepare(staged_transfer **out, const void *buf, int partitions, MPI_Count count,
                               MPI_Datatype type, int receiving);
/* MPI_Pready of partitions [first, first + n) of a send: their elements packed (or their
 * type map's bytes copied) into the staging now, so the message carries what they held
 * when declared ready.  Any thread; 1 on success, 0 on failure (logged). */
int staged_partitions_ready(staged_transfer *t, int first, int n);
/* Partition i of a receive, which the host MPI reported arrived: moved into the program's
 * buffer unless that was done already.  Any thread.  1: it is there; 0: another thread
 * is moving it right now (not there yet for this caller); -1: failure (logged). */
int staged_partition_arrived(staged_transfer *t, int partition);

/* Moves the received bytes into the program's buffer (a partitioned receive: the
 * partitions not moved yet, waiting for one another thread is moving); `err` is the MPI
 * error code of the receive (MPI_SUCCESS, or the error the host MPI reported for it).
 * Nothing is written after an error other than truncation, or when the receive was
 * cancelled.  Returns MPI_SUCCESS or MPI_ERR_OTHER (a CUDA failure). */
int staged_recv_finish(staged_transfer *t, const MPI_Status *status, int err);
void staged_release(staged_transfer *t); /* also releases t->linked */

/* A send whose wire bytes are `bytes` (copied), as MPI_BYTE: a GPU-to-GPU descriptor. */
int staged_wire_bytes(staged_transfer **out, const void *bytes, int n);

/* The end of any staged operation: finish (receives) then release.  `status` is only
 * read for receives. */
int staged_complete(staged_transfer *t, const MPI_Status *status, int err);

#endif
