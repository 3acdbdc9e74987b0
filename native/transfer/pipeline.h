/* Pipelined staging (COMMLIB_PIPELINE=1): a large device message that has to cross the
 * host (another node, or a rank of this node that GPU-to-GPU does not reach) moves in
 * chunks, so that copying chunk k+1 off the GPU overlaps sending chunk k, and on the
 * receiving side receiving chunk k+1 overlaps copying chunk k onto the GPU.  The staged
 * path (transfer/staged.h) does the three steps one after the other for the whole
 * message.
 *
 * On the wire: the program's own envelope (communicator, destination, tag) carries a
 * 64-byte descriptor (sender, sequence number, size, chunk size), so the host MPI does
 * all matching - order, MPI_ANY_SOURCE, MPI_ANY_TAG, cancelled receives - exactly as for
 * the message itself; the chunks follow on a private duplicate of MPI_COMM_WORLD, tagged
 * by the sequence number, which only the receive that got the descriptor asks for.  The
 * receiver's status counts the message's bytes; a message longer than the receive is
 * MPI_ERR_TRUNCATE with the part that fits written (every chunk is still drained).
 *
 * The contract (as COMMLIB_IPC's, transfer/ipc.h, and off by default for the same
 * reason): set on every rank (MPI_Init duplicates MPI_COMM_WORLD); the receive of such a
 * message must be a device (or managed) receive through commlib with a type commlib packs,
 * of 64 bytes or more - a host-memory receive, or MPI_Probe/MPI_Iprobe/MPI_Mprobe, sees the
 * descriptor's 64 bytes, and chunks nobody asks for keep their sender's MPI_Finalize
 * waiting (10 s, then a warning).
 *
 * Which sends: device buffers, PIPELINE_MIN_BYTES or more packed, to another rank of an
 * intracommunicator, from MPI_Send/Ssend/Rsend and MPI_Isend/Issend/Irsend, over an MPI
 * that is not CUDA-aware.  Never MPI_Bsend/Ibsend, messages to oneself, persistent,
 * partitioned, Sendrecv or Isendrecv sends (their receives do take pipelined messages).
 * Chunk k goes to the host MPI as soon as its copy ended.  Without the progress thread
 * the send's call does that for every chunk before it returns; with it (COMMLIB_PROGRESS=
 * thread) MPI_Isend returns at once and every poll - the thread, which keeps polling for
 * this even while the program waits inside the host MPI, any commlib call, the request's
 * completion - hands over what is ready, so the copies of a window of sends run back to
 * back.  The program's request completes when its descriptor's send did (the host MPI's
 * rules, MPI_Ssend's included) and every chunk is with the host MPI (its buffer free
 * again); the chunks' sends go on by themselves, never waited for by a completion call:
 * the receiver takes them when it finishes the receive that got the descriptor, which
 * needs nothing from the sender but its MPI's progress.  MPI_Finalize
 * waits for them (up to 10 s, then warns).  MPI_Cancel of such a send is accepted but
 * does not cancel it (MPI lets a cancel fail; the receiver may be receiving the chunks). */
#ifndef COMMLIB_TRANSFER_PIPELINE_H
#define COMMLIB_TRANSFER_PIPELINE_H

#include <mpi.h>
#include <stdint.h>

#include "staged.h"

#define PIPELINE_MIN_BYTES ((int64_t)1 << 20)
#define PIPELINE_DESCRIPTOR_BYTES 64

extern int pipeline_enabled; /* COMMLIB_PIPELINE=1 and pipeline_init done */

/* After PMPI_Init (collective over MPI_COMM_WORLD when the knob is on); before PMPI_Finalize. */
void pipeline_init(void);
void pipeline_finalize(void);

/* The chunk size for a message of `bytes` (from the measured model of the device method:
 * per-chunk cost against bandwidth); 0 when the message is not worth cutting. */
int64_t pipeline_chunk_bytes(struct device_context *dc, int contiguous, int64_t bytes);

/* STAGED_YES: *out carries the descriptor (its wire_* go to the program's send) and the
 * copies off the GPU are queued; after the descriptor's send was posted (or done),
 * pipeline_send_chunks hands the chunks to the host MPI.  STAGED_FORWARD: not for this path. */
int pipeline_send_prepare(staged_transfer **out, const void *buf, int count, MPI_Datatype type, int dest,
                          MPI_Comm comm);
/* After the descriptor's send was posted: links the send where polls find it and hands
 * over the chunks whose copies ended; t->companion_pending until all are with the host MPI
 * (the program's request is not complete before: a contiguous send's copies read its buffer). */
int pipeline_send_start(staged_transfer *t);
/* Hands over the chunks whose copies ended; 1 when all are with the host MPI (the program's
 * buffer is free; t lets go of them, t->pipe_failed set if one could not be), 0 otherwise.
 * wait: until then, driving the host MPI. */
int pipeline_send_done(staged_transfer *t, int wait);
/* A blocking send's: start, then wait until every chunk is with the host MPI.  An MPI error code. */
int pipeline_send_chunks(staged_transfer *t);
/* Reaps sends whose chunks were all sent, posts chunks whose copies ended; cheap when no send
 * is out (requests_progress calls it). */
extern int pipeline_outgoing;
void pipeline_poll_outgoing(void);
/* Started sends with chunks not yet handed over: only where the progress thread runs (it
 * polls even while the program waits inside the host MPI); without it a send's call hands
 * every chunk over before it returns. */
extern int pipeline_unposted;
/* staged_release: a send prepared but never started is dropped (its copies end first); a
 * started one goes on without the transfer. */
void pipeline_send_release(staged_transfer *t);

/* The message a received descriptor announces. */
struct pipeline_message {
    int sender; /* world rank */
    uint64_t seq;
    int64_t bytes, chunk;
};
/* 1 when the `received` bytes at `bytes` (host memory) are a descriptor, *m filled. */
int pipeline_message_of(const void *bytes, int64_t received, struct pipeline_message *m);
/* Receives every chunk of m into `pinned` (m->bytes of pinned host staging) and, as each
 * arrives, queues the copy of its part of the first `fits` bytes to `device` (device memory
 * of dc; NULL: left in pinned); waits for the copies before returning (settle: device_settle,
 * for pinned staging that stays untouched until the caller's device batch ends).  1 on success. */
int pipeline_receive_chunks(struct device_context *dc, const struct pipeline_message *m, char *pinned, char *device,
                            int64_t fits, int settle);

#endif
