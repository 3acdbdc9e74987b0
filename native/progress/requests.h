/* Side table of staged nonblocking operations, keyed by the host MPI's own request.
 *
 * commlib never invents request handles: MPI_Isend/MPI_Irecv on staged buffers return
 * the request the host MPI gave for the staged message, and this table remembers what
 * must happen when it completes (unpack into the program's buffer, free the staging).
 * The completion calls take their requests' entries out of the table BEFORE calling the
 * host MPI - once the MPI frees a request its value may be handed out again, even to
 * another thread - and put back the ones that did not complete.
 *
 * Completed-at-once requests may share one handle value in some MPIs (MPICH's builtin
 * complete request), so a key may hold several entries; any of them will do, because
 * such a request needs no staging anymore.
 *
 * MPI_Request_free of a staged request "detaches" it: commlib keeps the host request,
 * tests it at later intercepted calls and waits for it at MPI_Finalize, finishing it then
 * (a received message reaches the program's buffer at that point).
 *
 * Background completion (COMMLIB_PROGRESS=thread, progress/thread.h).  The rule: only the
 * holder of an entry may hand its request to the host MPI.  A completion call holds the
 * entries it took; the progress thread holds the one entry it "claimed".  A claimed entry
 * is out of its bucket but still counted in requests_outstanding (so completion calls keep
 * consulting the table), and requests_take of its request waits until the claim ends.
 * The progress thread asks PMPI_Request_get_status, which never frees a request: when the
 * operation has not completed the entry goes back; when it has, the thread finishes it
 * (unpack into the program's buffer, release the staging), counts progress.completed and
 * only then drops the entry (the count falls with release order).  The program's
 * MPI_Wait then finds no entry and forwards: the host MPI frees the request, already
 * complete, and returns the same status (a receive whose status commlib rewrites stays in
 * the table instead, finished early: requests_finish_early).  Requests that
 * fail in the host MPI are put back untouched: the program's completion call reports the
 * error, as it would without the thread.
 *
 * Persistent requests (interpose/persistent.c).  An inactive one is "parked": kept in a
 * second table, keyed by the same host request, that neither the completion calls nor the
 * progress thread look at (so a program holding only inactive persistent requests keeps
 * the one-load fast path).  MPI_Start moves its entry into the side table; whoever
 * finishes the operation - a completion call, MPI_Request_get_status or the progress
 * thread - parks it again instead of releasing it (requests_finish).  A persistent
 * request that completes stays a valid handle: the completion calls judge "completed" by
 * the call's outputs (flag, index, indices, statuses), not by MPI_REQUEST_NULL.
 * MPI_Request_free of a parked entry frees the host request and the staging at once; of
 * an active one, detaches it (the host request is freed by commlib after it completed).
 * The progress thread leaves active persistent entries to the program's completion call
 * (it still drives the host MPI for them): MPICH 5 makes a persistent request that
 * PMPI_Request_get_status found complete inactive, so the program's MPI_Wait would get
 * an empty status - and PMPI_Test would do the same by definition.
 *
 * Partitioned requests (interpose/partitioned.c) are persistent ones, parked and moved like
 * them.  MPI_Pready and MPI_Parrived may be called on any thread while the request is
 * active - also while a completion call holds its entry out of the table, waiting for the
 * very partition another thread is about to declare ready - so they never take the entry:
 * they look it up in a registry of its own, which lists it from init until its staging is
 * released (the program may not use the request after freeing it).  The registry is left
 * before the host MPI frees the request, whose handle value may be handed out again at once.
 *
 * MPI_Isendrecv (interpose/isendrecv.c): the program holds the host request of the
 * receive half; the send half is a host request of commlib's own in the same entry
 * (companion).  Whoever holds the entry tests or waits the companion too, and the entry
 * is finished only when both completed: a test-type call hides the program's request from
 * the host MPI while its companion is still pending. */
#ifndef COMMLIB_PROGRESS_REQUESTS_H
#define COMMLIB_PROGRESS_REQUESTS_H

#include <mpi.h>

#include "../transfer/pipeline.h"
#include "../transfer/staged.h"

#define REQUEST_KEY(r) ((intptr_t)(r)) /* an int (MPICH) or a pointer (Open MPI) */

extern int requests_outstanding; /* entries in the table plus detached ones */
extern int requests_detached;
extern int requests_parked;      /* inactive persistent entries */

/* The fast path of every completion call: one load while nothing is staged.  Acquire:
 * seeing the progress thread's last drop means seeing the bytes it unpacked before it. */
static inline int requests_active(void) { return __atomic_load_n(&requests_outstanding, __ATOMIC_ACQUIRE) != 0; }

void requests_add(MPI_Request request, staged_transfer *t);
/* NULL: not a staged request, or one the progress thread finished (forward it) */
staged_transfer *requests_take(MPI_Request request);
void requests_detach(MPI_Request request, staged_transfer *t);

/* Inactive persistent entries (see above). */
void requests_park(MPI_Request request, staged_transfer *t);
staged_transfer *requests_unpark(MPI_Request request); /* NULL: none for this request */
static inline int requests_any_parked(void) { return __atomic_load_n(&requests_parked, __ATOMIC_RELAXED) != 0; }

/* The registry of staged partitioned requests (see above); no-ops for other entries. */
extern int requests_registered;
void requests_register(MPI_Request request, staged_transfer *t);
void requests_unregister(staged_transfer *t);
staged_transfer *requests_lookup(MPI_Request request); /* NULL: not a staged partitioned request */
static inline int requests_any_registered(void) { return __atomic_load_n(&requests_registered, __ATOMIC_RELAXED) != 0; }

/* The end of an operation whose host request completed (`status`, `err` as for
 * staged_complete): waits for an Isendrecv's send half if still pending, moves received
 * bytes into the program's buffer, then parks a persistent entry (or frees its host
 * request, when the program freed it while active) and releases any other.  Called by
 * the entry's holder. */
int requests_finish(staged_transfer *t, const MPI_Status *status, int err);
/* The same inside a device batch (cuda/device.h) the caller opened: a receive's unpack may
 * stay queued, so its staging is not released (or parked) yet but put on *later, for
 * requests_retire after device_batch_end.  Partitioned receives finish whole (another
 * thread may ask whether a partition arrived). */
int requests_finish_batched(staged_transfer *t, const MPI_Status *status, int err, staged_transfer **later);
void requests_retire(staged_transfer *t);
/* Finishes a completed receive whose status commlib rewrites (ipc_may_rewrite_status) but
 * leaves its entry in the table, marked finished_early with that status and result: the
 * host MPI would report its own (192 bytes for a descriptor) to the program's completion
 * call, which hands over these instead.  For the progress thread and
 * MPI_Request_get_status, with the entry held; returns the result (err, or the finish's
 * own failure). */
int requests_finish_early(staged_transfer *t, MPI_Status *status, int err);

/* Finishes detached requests that completed (PMPI_Test); cheap when there are none. */
void requests_poll_detached(void);
static inline void requests_progress(void)
{
    if (__builtin_expect(__atomic_load_n(&requests_detached, __ATOMIC_RELAXED) != 0, 0)) requests_poll_detached();
    if (__builtin_expect(__atomic_load_n(&pipeline_outgoing, __ATOMIC_RELAXED) != 0, 0)) pipeline_poll_outgoing();
}

/* The progress thread's sweep: tests every entry in the table once (claiming each in
 * turn) and finishes those whose operation completed; returns how many it finished.
 * Called by one thread at a time. */
int requests_progress_pending(void);

/* At MPI_Finalize (after the progress thread stopped): waits for the detached requests and finishes them. */
void requests_finalize(void);

#endif
