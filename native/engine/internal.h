/* What the engine's files share (engine.h says what the engine does). */
#ifndef COMMLIB_ENGINE_INTERNAL_H
#define COMMLIB_ENGINE_INTERNAL_H

#include <pthread.h>
#include <stdint.h>

#include "../cuda/device.h"
#include "engine.h"

enum transport { TRANSPORT_MPI, TRANSPORT_SHM };

/* The signature the ranks compare before an operation moves data. */
#define SIGNATURE_WORDS 6

/* One collective step of an operation, on host memory: partitioned operations are a
 * sequence of them, one per partition.  counts/displs: each rank's share (elements), where
 * it applies; own_* the calling rank's buffers for this step. */
struct step {
    int kind, dtype, op, root;
    int64_t count;            /* all-reduce, broadcast: elements */
    const int64_t *counts;    /* reduce-scatter, all-gather, all-to-all: per rank (size entries) */
    const int64_t *displs;    /* where each rank's share starts in the whole buffer */
    const char *send;         /* all-reduce: the input (may be recv); reduce-scatter: the whole input;
                                 all-gather: this rank's share */
    char *recv;               /* all-reduce, broadcast: the buffer; reduce-scatter: this rank's share;
                                 all-gather: the whole output */
};

/* Transport state of the step in progress (shm.c and ring.c keep theirs here). */
struct shm_run {
    int64_t slices, rounds_elements;
    uint64_t base;             /* the communicator's slice counter when the step began */
    int64_t in, reduced, out;  /* slices this rank finished, by phase */
};

struct mpi_run {
    int algorithm;             /* ring.c's enum */
    int phase;
    int64_t chunk;             /* elements per message */
    const int64_t *counts, *displs; /* the ring's segments */
    int64_t *own_counts;       /* segments ring.c made (all-reduce), freed at the end */
    int64_t max_chunks;        /* chunks of the longest segment */
    char *work;                /* the buffer the ring accumulates in */
    char *temp;                /* received chunks before they are reduced (two steps' worth) */
    char *scratch;             /* what ring.c allocated (freed at the end) */
    char *owned_work;          /* reduce-scatter: the copy of the input the ring works in */
    int *call_arrays;          /* all-to-all: counts and displacements, alive until completion */
    /* progress of the ring: the next chunk to receive and to send, as (step, chunk) */
    int64_t recv_step, recv_chunk, send_step, send_chunk;
    MPI_Request *recvs;        /* reduce-scatter: per step parity; all-gather: every step */
    MPI_Request *sends;        /* sends in flight, completed from the oldest */
    int64_t nsends, sends_done;
    /* recursive doubling and the host MPI's own calls */
    int mask, new_rank, pof2, extra;
    MPI_Request req[64];
    int nreq;
    int source;                /* a receive's source */
};

struct engine_op {
    engine_comm *c;
    struct engine_args a;
    uint64_t seq;             /* position in the communicator's sequence */
    uint64_t collective;      /* position among its collectives (the same on every rank: tags) */
    int64_t *counts;          /* a copy of a.counts (size entries) */
    int64_t *displs;
    int refs;                 /* the caller's and the queue's */
    int status;               /* when done */
    char message[256];
    int done;                 /* atomic: 1 once status is final (host side) */
    struct engine_op *next;

    /* partitions */
    int parts;                /* 1 for an ordinary operation */
    int *ready;               /* atomic: partition i may move */
    void **ready_event;       /* CUevent to poll before it may (NULL: engine_ready) */
    int *part_done;           /* atomic */
    int part;                 /* the partition moving now */

    /* progress */
    int phase;                /* op_progress's state */
    int checked;              /* the signature comparison passed */
    struct step step;
    int64_t *step_counts, *step_displs; /* this partition's shares */
    struct shm_run shm;
    struct mpi_run mpi;
    MPI_Request check_req;
    int64_t check[2 * SIGNATURE_WORDS], check_out[2 * SIGNATURE_WORDS];

    /* device buffers (device.c) */
    int device;               /* staged through host memory */
    int aware;                /* handed to a CUDA-aware MPI as they are */
    struct device_context *dc;
    CUevent input_ready;      /* recorded on the caller's stream at the start */
    CUevent finished;         /* on the engine's stream, after the last copy back issued */
    CUevent *in_event, *out_event; /* per partition: its copy in, its copy back */
    int *in_state, *out_state;     /* per partition: 0 not issued, 1 issued, 2 done */
    int waited_input;         /* the engine's stream waits for input_ready */
    char *host_send, *host_recv; /* pinned staging playing send and recv */
    size_t send_capacity, recv_capacity;
    int send_kind, recv_kind;
    int64_t send_bytes, recv_bytes;
};

struct engine_comm {
    MPI_Comm comm;            /* the private duplicate */
    int rank, size;
    int transport;
    int check;                /* compare signatures on the MPI path */
    struct shm_segment *shm;
    uint64_t shm_slices;      /* slices moved through the segment so far (the same on every rank) */
    uint64_t shm_ops;         /* operations whose signatures went through the segment */
    pthread_mutex_t lock;     /* the queue */
    engine_op *head, *tail;
    engine_op *detached;      /* sends and receives posted, completing on the side (drive lock) */
    uint64_t started, collectives;
    MPI_Comm p2p;             /* a second duplicate: the program's send/recv tags */
    pthread_mutex_t drive;    /* held by whoever advances the operations */
    int pinned;               /* passes of the engine's thread over it (under the engine's lock) */
    engine_comm *next;        /* the engine's list */
};

/* core.c */
void engine_fail(engine_op *op, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void engine_wake(void);
int engine_mpi_error(engine_op *op, int rc, const char *what); /* 0 when rc is MPI_SUCCESS */

/* shm.c: 1 when the segment could be set up (collective over c->comm) */
int shm_attach(engine_comm *c);
void shm_detach(engine_comm *c);
/* The signature exchange of op c->shm_ops: 1 done (ok or failed), 0 not yet. */
int shm_check(engine_op *op, const int64_t *signature);
void shm_step_begin(engine_op *op);
int shm_step_progress(engine_op *op); /* 1 when the step is done */

/* ring.c: the MPI path */
void mpi_step_begin(engine_op *op);
int mpi_step_progress(engine_op *op); /* 1 when done (or failed) */
void mpi_step_abandon(engine_op *op);

/* device.c: per partition, copies in (device -> staging) and back, on the engine's stream;
 * a partition's copy in may be issued while the one before moves (prefetch), its copy back
 * runs while the next one moves.  The *_done calls poll (1: done or failed). */
int device_prepare(engine_op *op, char *err, size_t errlen); /* at start, on the caller's thread */
void device_issue_in(engine_op *op, int p);
int device_in_done(engine_op *op, int p);
void device_issue_out(engine_op *op, int p);
int device_out_done(engine_op *op, int p);
void device_release(engine_op *op);

/* Element counts of the share of each rank when n elements are split in `parts` parts as
 * evenly as possible (the first n % parts one element longer). */
void engine_split(int64_t n, int parts, int64_t *counts, int64_t *displs);
/* The same in whole units of op's a.unit elements (the partitions of an operation). */
void engine_split_parts(const engine_op *op, int64_t n, int64_t *counts, int64_t *displs);

#endif
