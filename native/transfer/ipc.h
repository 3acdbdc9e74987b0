/* GPU to GPU between ranks of one node (COMMLIB_IPC=1): a device send packs its message
 * into an arena of the sender's device memory and sends, on the program's own envelope
 * (communicator, destination, tag), a small descriptor instead of the bytes; the
 * receiver's staged receive recognises it, maps the arena once (CUDA inter-process
 * memory handles, cached per sender and arena) and unpacks straight from the sender's
 * memory into its buffer on its device, then tells the sender (over a private duplicate
 * of MPI_COMM_WORLD) that the arena space is free again.  Nothing crosses the host.
 *
 * Because the descriptor travels as the message itself, the host MPI does all matching:
 * order per source, tag and communicator, MPI_ANY_SOURCE and MPI_ANY_TAG, cancelled
 * receives; truncation is found from the descriptor (MPI_ERR_TRUNCATE, the bytes that fit
 * written) and the status counts the message's real bytes.  What a descriptor cannot keep
 * (the contract of COMMLIB_IPC=1, which is why it is off by default):
 *   - the receive must be a device (or managed) receive through commlib with a type
 *     commlib packs - a host-memory receive, or MPI_Probe/MPI_Iprobe/MPI_Mprobe, of such a
 *     message sees the descriptor's 192 bytes;
 *   - set on every rank (MPI_Init splits MPI_COMM_WORLD by node and duplicates it).
 * Arenas are commlib's own allocations and live until MPI_Finalize, so an address the
 * program frees and allocates again never meets a stale mapping.  Everything else takes
 * the staged path (transfer/staged.h): other nodes, host buffers, messages under
 * IPC_MIN_BYTES (unless COMMLIB_IPC_SMALL=1, below), persistent, partitioned, Sendrecv and
 * Isendrecv sends, a CUDA-aware MPI, an arena with no room (counted as p2p.ipc_fallback).
 *
 * Direct messages (where every rank of the node runs the progress thread, which ipc_init
 * asks them): a send of DIRECT_MIN_BYTES or more - or, opted in with
 * COMMLIB_IPC_DIRECT_BYTES, a nonblocking send of that many bytes or more - contiguous or one
 * strided piece of up to 3 dimensions with strides >= 0, from memory legacy IPC can export, names the program's own
 * allocation instead of an arena slot (arena IPC_DIRECT, the allocation's buffer id in
 * the event field, and a strided piece's block, counts and strides after it), so the
 * sender launches nothing: the receiver copies once from the sender's buffer - a strided
 * piece straight into its buffer in one pass where its type is one piece too
 * (device_copy_piece), else packed from it into device scratch and unpacked from there - in
 * its completion call's batched launches (pack/device_pack.h).  The send then
 * completes only when the receiver acknowledges (a companion receive on the private
 * communicator, tag from seq), which needs the receiver to make progress on its own - the
 * progress thread finishes such receives (progress/requests.h) - or a program that waits
 * on a receive while its peer waits on its send would hang.  MPI_Bsend/Ibsend are never
 * direct (they must complete locally); neither are messages to oneself. */
#ifndef COMMLIB_TRANSFER_IPC_H
#define COMMLIB_TRANSFER_IPC_H

#include <mpi.h>
#include <stdint.h>

#include "staged.h"

#define IPC_DIRECT (-2) /* the descriptor's arena for a direct message */
#define IPC_DESCRIPTOR_BYTES 192
/* A smaller message would not hold its descriptor: a receive posted for the message's size
 * must be able to take the descriptor (one posted for less is truncated either way)... */
#define IPC_MIN_BYTES IPC_DESCRIPTOR_BYTES
/* ...unless the receives make room for one (COMMLIB_IPC_SMALL=1 on every rank of the node):
 * then messages of any size go GPU to GPU, and a device receive of under IPC_DESCRIPTOR_BYTES
 * is posted to the host MPI for that many (its staging too).  The program's own capacity
 * stays the receive's (staged_transfer.program_bytes): a longer message that is not a
 * descriptor is truncated by commlib as the host MPI would have - MPI_ERR_TRUNCATE, the
 * bytes that fit written, the status counting them.  A halo exchange's 8 corner messages
 * of 8 bytes then cost no copy off the GPU and wait each (the sender's largest cost left
 * at 32^3, issue 12).  Partitioned receives keep their size (partitioned sends never come
 * GPU to GPU).  Returns the bytes to post for a device receive of `bytes`. */
extern int ipc_small_receives;
static inline int64_t ipc_receive_posted_bytes(int64_t bytes)
{
    return bytes < IPC_DESCRIPTOR_BYTES && __atomic_load_n(&ipc_small_receives, __ATOMIC_RELAXED)
               ? IPC_DESCRIPTOR_BYTES
               : bytes;
}

/* After PMPI_Init (collective over MPI_COMM_WORLD when the knob is on); before PMPI_Finalize. */
void ipc_init(void);
void ipc_finalize(void);

/* STAGED_YES: *out carries the descriptor (its wire_* go to the host MPI's send, its
 * release frees only the descriptor); STAGED_FORWARD: not for this path.  direct_ok: 0 never
 * direct (MPI_Bsend), IPC_DIRECT_BLOCKING from 1 MiB (one block or strided piece), IPC_DIRECT_NONBLOCKING the
 * same or, with COMMLIB_IPC_DIRECT_BYTES, from that many bytes. */
enum { IPC_DIRECT_BLOCKING = 1, IPC_DIRECT_NONBLOCKING = 2 };
int ipc_send_prepare(staged_transfer **out, const void *buf, int count, MPI_Datatype type, int dest, MPI_Comm comm,
                     int direct_ok);

/* For a staged receive whose `received` bytes at `bytes` (host memory) may be a
 * descriptor: NULL when they are not one; otherwise the sender's packed message mapped
 * into the receive's device context, *message_bytes its length, and t's acknowledgement
 * noted (ipc_acknowledge sends it).  *failed is set when it was a descriptor but the
 * mapping failed (logged). */
const char *ipc_message(staged_transfer *t, const void *bytes, int64_t received, int64_t *message_bytes,
                        int *failed);
/* 1 when a receive posted for fewer bytes than a descriptor got the first `received`
 * bytes of one (the host MPI truncated it): nothing of the message can be written, but the
 * sender is acknowledged at t's completion, so its arena space comes back and a direct
 * sender does not wait forever.  A receive of under 40 bytes (the descriptor up to its
 * sequence number) cannot tell whom to acknowledge: that sender's space stays taken until
 * MPI_Finalize (warned), and a direct sender waits - what an erroneous program gets. */
int ipc_truncated_descriptor(staged_transfer *t, const void *bytes, int64_t received);
/* A staged receive that may get a descriptor (GPU to GPU, or pipelined), whose status (count, truncation) the
 * completion rewrites: the progress thread and MPI_Request_get_status finish it (the
 * unpack, the acknowledgement a direct sender waits for) but leave it in the side table
 * with the rewritten status (requests_finish_early), which the program's completion call
 * hands over (the host MPI would report 192 bytes). */
extern int ipc_enabled; /* COMMLIB_IPC=1 and ipc_init done */
extern int pipeline_enabled; /* the same for pipelined messages (transfer/pipeline.h) */
static inline int ipc_may_rewrite_status(const staged_transfer *t)
{
    return t->receiving && t->dc &&
           (__atomic_load_n(&ipc_enabled, __ATOMIC_RELAXED) || __atomic_load_n(&pipeline_enabled, __ATOMIC_RELAXED));
}
/* After the unpack from the sender's memory completed: frees its arena space. */
void ipc_acknowledge(staged_transfer *t);
/* Between these (nested; per thread), arena acknowledgements are held back and sent at the
 * end as one message per sender (a completion call's 26 receives from one neighbour: one
 * message, not 26, and one probe and receive on the sender's side).  Direct messages' are
 * sent at once: their senders wait for them. */
void ipc_ack_batch_begin(void);
void ipc_ack_batch_end(void);

/* Bursts (COMMLIB_IPC_BURST_US > 0, the default): a nonblocking device send into the arena
 * queues its pack instead of launching it, and its descriptor says so (has_event 2); the
 * receiver's stream waits until the arena's first 8 bytes - the burst's number, which the
 * sender writes after the packs (cuStreamWriteValue64) - reach the number the descriptor
 * carries, where an event would have to be recorded after the pack before the descriptor
 * left; one wait on a context's stream serves every message of that burst in that arena.
 * A halo exchange's 26 sends then cost one launch and one write, not 26 launches and 26
 * event records, and its 26 receives from one sender one wait, not 26.  The packs
 * and writes run on a stream of their own that never waits for anything (on the
 * context's stream, where receives wait for their senders, two ranks' packs for each other
 * would each sit behind the other's wait).  The queue launches (ipc_flush_sends) before
 * anything waits for a queued pack (a send's completion: ipc_send_settle), at the start of
 * every completion call and blocking receive or send, at MPI_Finalize, and from a thread
 * of its own (no MPI calls) once no send came for COMMLIB_IPC_BURST_US - so a receiver
 * never waits on a sender that sits in a call commlib does not wrap (MPI_Barrier): MPI's
 * progress rule holds.  Returns 1 unless a launch failed (logged). */
extern int ipc_burst_pending; /* sends queued: read without the lock, as a hint */
int ipc_flush_sends(void);
static inline int ipc_flush_pending(void)
{
    return __atomic_load_n(&ipc_burst_pending, __ATOMIC_RELAXED) ? ipc_flush_sends() : 1;
}
/* What a GPU-to-GPU send's completion waits for before the program may reuse its buffer
 * (t->ipc_unsynced): a burst's pack launched and finished, or the pack on dc's stream
 * (later: device_settle, waited for at the device batch's end; else device_sync).  1 on success. */
int ipc_send_settle(staged_transfer *t, int later);

#endif
