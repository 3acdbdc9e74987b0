/* commlib's collective engine: the collectives of a training script (all-reduce,
 * reduce-scatter, all-gather, broadcast, all-to-all, send/recv, barrier), and their
 * partitioned forms, run by commlib's own algorithms, so that overlap with the program's
 * compute does not depend on the host MPI's progress.
 *
 * Where the data goes.  Every engine communicator is a private duplicate of the program's
 * (its own matching space).  When all its ranks share memory (one node), the reductions,
 * gathers and broadcasts go through a shared-memory segment (shm.c): each rank copies its
 * input into its slot, reduces its share of every slice straight out of the others' slots
 * and copies the results out - no MPI on the data path at all.  Otherwise they run over the
 * host MPI's nonblocking point-to-point on the private communicator (ring.c): a pipelined
 * ring reduce-scatter + all-gather for large messages, recursive doubling for small ones;
 * either way the reductions are commlib's own loops (reduce.h), run outside the MPI.
 * All-to-all and send/recv are the host MPI's nonblocking calls on the private
 * communicator.  Results are the same bytes on every rank: each element is reduced once,
 * in rank order, by the rank that owns it, and copied to the others.
 *
 * Who moves it.  Operations of one communicator run one after another in the order they
 * were started (every rank starts the same sequence).  They are driven by the engine's
 * thread (one per process, asleep while no operation is pending) and, while a caller
 * waits, by the caller too; whoever holds a communicator's drive lock advances its
 * operations as far as they go without blocking.  Without MPI_THREAD_MULTIPLE there is
 * no thread: operations move in engine_test / engine_wait only.
 *
 * Agreement.  Before moving data, the ranks compare a signature of the operation (kind,
 * dtype, op, sizes, root); a rank that issued something else makes the operation fail on
 * every rank with ENGINE_ERR_MISMATCH, never a hang or a silent wrong result.
 * (COMMLIB_ENGINE_CHECK=0 skips the comparison on the MPI path, where it costs one small
 * all-reduce per operation.)
 *
 * Device memory.  A device buffer is staged through pinned host memory on a stream of
 * commlib's own, after the work queued on the caller's stream before the call (an event
 * recorded there); engine_stream_wait makes a stream wait for the results.  Over a
 * CUDA-aware MPI the MPI path hands device buffers to the MPI as they are.  Partitions
 * with engine_ready_after start when a CUDA event has completed (polled by the engine).
 *
 * Partitioned operations split the buffer into `partitions` parts (for reduce-scatter and
 * all-gather: part i of every rank's share), in whole units (rows); part i moves once the caller declared it
 * ready (engine_ready, engine_ready_after) and after part i-1, so that a producer's chunks
 * are reduced while it computes the next ones.
 */
#ifndef COMMLIB_ENGINE_H
#define COMMLIB_ENGINE_H

#include <mpi.h>
#include <stddef.h>
#include <stdint.h>

#include "reduce.h"

enum engine_kind {
    ENGINE_ALLREDUCE,      /* recv[count] = OP over ranks of send[count] */
    ENGINE_REDUCE_SCATTER, /* recv[counts[rank]] = OP over ranks of send[displ[rank] ...] */
    ENGINE_ALLGATHER,      /* recv[displ[q] ...] = send of rank q (counts[q] elements) */
    ENGINE_BROADCAST,      /* recv[count] = root's recv */
    ENGINE_ALLTOALL,       /* recv block q = block rank of q's send (counts[q] elements) */
    ENGINE_SEND,           /* send[count] to rank `root` with `tag` */
    ENGINE_RECV,           /* recv[count] from rank `root` with `tag` */
    ENGINE_BARRIER,
    ENGINE_NKINDS
};

enum engine_status {
    ENGINE_OK = 0,
    ENGINE_PENDING = 1,      /* engine_test: not done yet */
    ENGINE_ERR_ARG = 2,      /* bad argument (the message says which) */
    ENGINE_ERR_MISMATCH = 3, /* the ranks did not issue the same operation */
    ENGINE_ERR_MPI = 4,      /* the host MPI reported an error */
    ENGINE_ERR_CUDA = 5,     /* a CUDA call failed */
    ENGINE_ERR_MEMORY = 6,
    ENGINE_ERR_TIMEOUT = 7,  /* engine_wait's deadline passed (the operation goes on) */
    ENGINE_ERR_CLOSED = 8,   /* the communicator was freed */
    ENGINE_ERR_TRUNCATE = 9, /* a receive got more (or fewer) elements than it was given room for */
};

typedef struct engine_comm engine_comm;
typedef struct engine_op engine_op;

struct engine_args {
    int kind;           /* enum engine_kind */
    int dtype;          /* enum cl_dtype (every kind: the element size) */
    int op;             /* enum cl_op (reductions) */
    const void *send;   /* NULL: in place (the input is in recv, where it makes sense) */
    void *recv;
    int64_t count;      /* all-reduce, broadcast, send, recv: elements of the buffer */
    const int64_t *counts; /* reduce-scatter, all-gather, all-to-all: elements per rank (size entries) */
    int root;           /* broadcast: the root; send, recv: the peer (recv: -1, any source) */
    int tag;            /* send, recv */
    int partitions;     /* > 1: a partitioned operation (engine_ready) */
    int partitioned;    /* the parts wait for engine_ready / engine_ready_after even when there is only
                           one (partitions > 1 implies it; 0 and partitions 1: ready at the start) */
    int64_t shape;      /* what else every rank must agree on (the caller's hash of the buffer's
                           shape), compared with the signature; 0: nothing */
    int64_t unit;       /* partitions split the buffer (or each share) in whole units of this
                           many elements - rows of a matrix (0 or 1: elements) */
    void *stream;       /* device buffers: the caller's CUstream (NULL: the legacy stream) */
    int caller_waits;   /* the caller waits for it at once: the engine's thread is not woken
                           for it (the waiting caller moves it, and what is queued before it) */
    /* called once the operation ended (on the thread that finished it), with its status */
    void (*done)(void *arg, int status);
    void *done_arg;
};

/* A private duplicate of comm (collective over comm, like MPI_Comm_dup). */
int engine_comm_create(MPI_Comm comm, engine_comm **out, char *err, size_t errlen);
/* Waits for the communicator's operations, then frees it (collective). */
void engine_comm_free(engine_comm *c);
int engine_comm_rank(const engine_comm *c);
int engine_comm_size(const engine_comm *c);
/* "shm" or "mpi": how its collectives move data. */
const char *engine_comm_transport(const engine_comm *c);

/* Stops the engine's thread (MPI_Finalize: no MPI call may follow); nothing is pending by
 * then.  The engine's communicators stay valid but move only in wait/test. */
void engine_shutdown(void);

/* Starts an operation (queued behind the communicator's earlier ones).  On an error the
 * message is in err and *out is NULL. */
int engine_start(engine_comm *c, const struct engine_args *a, engine_op **out, char *err, size_t errlen);
/* Partitions [lo, hi) of a partitioned operation are ready to move. */
int engine_ready(engine_op *op, int lo, int hi);
/* Partition i is ready once the CUDA event (a CUevent the caller recorded) completed. */
int engine_ready_after(engine_op *op, int partition, void *event);

/* ENGINE_OK when done (the operation's own status is engine_status), ENGINE_PENDING. */
int engine_test(engine_op *op);
/* Partition i done (all of it: i < 0); 1/0. */
int engine_test_partition(engine_op *op, int i);
/* Waits (timeout_ns < 0: forever); ENGINE_OK when done, ENGINE_ERR_TIMEOUT. */
int engine_wait(engine_op *op, int64_t timeout_ns);
int engine_wait_partition(engine_op *op, int i, int64_t timeout_ns);
/* Waits without moving anything: asleep until the engine's thread finished the operation (a
 * completion thread that must not take cores from the program's compute).  Needs the engine
 * thread (COMMLIB_ENGINE_THREAD on, MPI_THREAD_MULTIPLE); without it, it moves the
 * operation as engine_wait does. */
int engine_wait_passive(engine_op *op, int64_t timeout_ns);
/* The finished operation's status and message. */
int engine_status(engine_op *op, char *msg, size_t len);
/* A finished receive's source (the peer, or the sender a receive from any source matched). */
int engine_source(engine_op *op);
/* Device buffers: makes `stream` wait for the operation's results (after the operation
 * finished on the host side: engine_wait first). */
int engine_stream_wait(engine_op *op, void *stream);
void engine_op_free(engine_op *op); /* a pending operation goes on; its resources are freed when it ends */

#endif
