/* Completion of nonblocking operations: MPI_Wait/Test and their any/all/some forms,
 * MPI_Request_get_status, MPI_Request_free and MPI_Cancel.
 *
 * Requests are always the host MPI's own.  For staged operations (transfer/staged.h) the
 * side table (progress/requests.h) says what to do once one completes; the entries are
 * taken out before the host MPI sees the array (it sets completed ones to
 * MPI_REQUEST_NULL and may reuse their values at once), a request that became
 * MPI_REQUEST_NULL completed, and the others go back.  While nothing is staged every call
 * forwards after one load. */
#include <sched.h>
#include <stdlib.h>

#include "../cuda/device.h"
#include "../pack/device_pack.h"
#include "../progress/requests.h"
#include "../progress/thread.h"
#include "../transfer/ipc.h"
#include "../util/config.h"
#include "../util/log.h"
#include "../util/stats.h"
#include "commlib.h"
#include "interpose.h"

enum completion { WAIT, TEST, WAITANY, TESTANY, WAITALL, TESTALL, WAITSOME, TESTSOME };

struct call {
    enum completion kind;
    int n;
    MPI_Request *requests;
    int *index, *flag, *outcount, *indices;
    MPI_Status *statuses; /* the program's: one status, an array, or an IGNORE value */
};

static int single(enum completion kind) { return kind <= TESTANY; }

static int call_host_now(const struct call *c, MPI_Status *st)
{
    switch (c->kind) {
    case WAIT: return PMPI_Wait(c->requests, st);
    case TEST: return PMPI_Test(c->requests, c->flag, st);
    case WAITANY: return PMPI_Waitany(c->n, c->requests, c->index, st);
    case TESTANY: return PMPI_Testany(c->n, c->requests, c->index, c->flag, st);
    case WAITALL: return PMPI_Waitall(c->n, c->requests, st);
    case TESTALL: return PMPI_Testall(c->n, c->requests, c->flag, st);
    case WAITSOME: return PMPI_Waitsome(c->n, c->requests, c->outcount, c->indices, st);
    default: return PMPI_Testsome(c->n, c->requests, c->outcount, c->indices, st);
    }
}

static inline int blocking_kind(enum completion kind)
{
    return kind == WAIT || kind == WAITANY || kind == WAITALL || kind == WAITSOME;
}

/* The wait forms block inside the host MPI: the progress thread keeps out meanwhile. */
static int call_host(const struct call *c, MPI_Status *st)
{
    int blocking = blocking_kind(c->kind);
    if (blocking) progress_program_enter();
    int rc = call_host_now(c, st);
    if (blocking) progress_program_leave();
    return rc;
}

/* The status the host MPI wrote for request i (the some-forms list them by completion). */
static MPI_Status *status_of(const struct call *c, MPI_Status *st, int i)
{
    if (single(c->kind)) return st;
    if (c->kind == WAITALL || c->kind == TESTALL) return &st[i];
    for (int k = 0; k < *c->outcount; k++)
        if (c->indices[k] == i) return &st[k];
    return NULL;
}

/* Did this call complete request i?  A nonblocking request that completed was freed
 * (MPI_REQUEST_NULL); a persistent one stays, inactive, so the call's outputs say. */
static int completed(const struct call *c, int rc, const MPI_Status *st, int i, int persistent)
{
    if (!persistent) return c->requests[i] == MPI_REQUEST_NULL;
    switch (c->kind) {
    case WAIT: return 1;
    case TEST: return rc == MPI_SUCCESS && *c->flag;
    case WAITANY: return *c->index == i;
    case TESTANY: return *c->flag && *c->index == i;
    case WAITALL:
    case TESTALL:
        if (rc == MPI_ERR_IN_STATUS) return st[i].MPI_ERROR != MPI_ERR_PENDING;
        return c->kind == WAITALL || (rc == MPI_SUCCESS && *c->flag);
    default:
        if (*c->outcount == MPI_UNDEFINED) return 0;
        for (int k = 0; k < *c->outcount; k++)
            if (c->indices[k] == i) return 1;
        return 0;
    }
}

static void put_back(const struct call *c, staged_transfer *taken)
{
    for (staged_transfer *t = taken, *next; t; t = next) {
        next = t->next;
        requests_add(c->requests[t->index], t);
    }
}

static int complete(const struct call *c);

/* MPI_Waitany / MPI_Waitsome over an Isendrecv whose send half is pending: blocking in the
 * host MPI could report its receive half alone, and waiting for the send half after that
 * would hold back the other requests the call should have returned meanwhile (the peer
 * may post the matching receive only once it hears about them).  So these calls poll
 * their test forms, which keep such a request hidden until its send completed. */
static int complete_polling(const struct call *c)
{
    struct call test = *c;
    int flag = 0;
    test.kind = c->kind == WAITANY ? TESTANY : TESTSOME;
    test.flag = &flag;
    for (;;) {
        int rc = complete(&test);
        if (rc != MPI_SUCCESS || (test.kind == TESTANY ? flag : *c->outcount != 0)) return rc;
        sched_yield();
    }
}

/* A failure commlib found after the host MPI answered MPI_SUCCESS (a device copy, a
 * GPU-to-GPU message truncated): the single forms return it, the others
 * MPI_ERR_IN_STATUS with every status's error field set (the host MPI set none). */
static int in_status(const struct call *c, MPI_Status *st, int nstatus, int error)
{
    if (single(c->kind) || !st) return error;
    int n = c->kind == WAITSOME || c->kind == TESTSOME ? *c->outcount : nstatus;
    for (int i = 0; i < n; i++) st[i].MPI_ERROR = MPI_SUCCESS;
    return MPI_ERR_IN_STATUS;
}

/* MPI_Waitall over large device receives (COMMLIB_EARLY_LAUNCH_BYTES, default 1 MiB): one
 * host MPI_Waitall would hold every receive's copy back until the last message arrived, and
 * a window of GPU-to-GPU messages then copies only after the sender's last MPI_Isend.  So a
 * call with two or more device receives of that size waits in rounds of MPI_Waitsome and
 * finishes each round's receives at once: their copies join the call's batch, which launches
 * once it holds that many bytes while the rest are still on their way; the waits for the
 * device and the acknowledgements stay at the end, as with one MPI_Waitall.  Smaller receives
 * (a halo's faces up to 128^3) keep the one call and one launch: at 8 ranks on one GPU, 128^3,
 * rounds over their 786 KB faces made the exchange GPU to GPU 1-9 % slower (README). */
static int rounds_wanted(const struct call *c, const staged_transfer *taken)
{
    int64_t limit = commlib_config.early_launch_bytes;
    int large = 0;
    if (c->kind != WAITALL || limit <= 0 || !commlib_config.batch_unpack) return 0;
    for (const staged_transfer *t = taken; t && large < 2; t = t->next)
        large += t->receiving && t->dc && !t->partitions && t->program_bytes >= limit;
    return large >= 2;
}

/* The rounds: gives what MPI_Waitall would (its result; every status, empty ones for the
 * requests that were not active).  The receives finished here leave *taken (their results
 * folded into the statuses as complete()'s loop does). */
static int waitall_rounds(const struct call *c, MPI_Status *st, staged_transfer **taken, struct device_batch *batch,
                          staged_transfer **later)
{
    int n = c->n, rc = MPI_SUCCESS, reported_all = 0;
    staged_transfer **of = calloc((size_t)n, sizeof *of);
    MPI_Status *some = malloc((size_t)n * sizeof *some);
    int *indices = malloc((size_t)n * sizeof *indices), *results = malloc((size_t)n * sizeof *results);
    unsigned char *reported = calloc((size_t)n, 1);
    if (!of || !some || !indices || !results || !reported) {
        free(of), free(some), free(indices), free(results), free(reported);
        return call_host(c, st);
    }
    for (int i = 0; i < n; i++) results[i] = MPI_SUCCESS;
    for (staged_transfer *t = *taken; t; t = t->next)
        if (t->receiving && !t->partitions && !t->companion_pending) of[t->index] = t;
    stat_add(STAT_WAITALL_ROUNDS_CALLS, 1);
    for (;;) {
        int outcount = 0;
        progress_program_enter();
        int round = PMPI_Waitsome(n, c->requests, &outcount, indices, some);
        progress_program_leave();
        if (round != MPI_SUCCESS && round != MPI_ERR_IN_STATUS) { /* its outputs say nothing */
            rc = round;
            break;
        }
        if (outcount == MPI_UNDEFINED) break; /* none left active */
        stat_add(STAT_WAITALL_ROUNDS, 1);
        if (round == MPI_ERR_IN_STATUS) rc = MPI_ERR_IN_STATUS;
        for (int k = 0; k < outcount; k++) {
            int i = indices[k];
            st[i] = some[k];
            if (round == MPI_SUCCESS) st[i].MPI_ERROR = MPI_SUCCESS;
            reported[i] = 1;
            reported_all++;
            staged_transfer *t = of[i];
            if (!t) continue;
            for (staged_transfer **link = taken; *link; link = &(*link)->next)
                if (*link == t) { /* out of the list before the finish relinks or frees it */
                    *link = t->next;
                    break;
                }
            results[i] = requests_finish_batched(t, &st[i], st[i].MPI_ERROR, later);
        }
        int launch = device_deferred_bytes() >= (int64_t)commlib_config.early_launch_bytes;
        if (launch) stat_add(STAT_WAITALL_EARLY_LAUNCHES, 1);
        device_batch_round(batch, launch);
    }
    /* null and inactive requests: MPI_Waitall's empty statuses (after an error other than
       MPI_ERR_IN_STATUS the statuses are undefined) */
    if (reported_all < n && (rc == MPI_SUCCESS || rc == MPI_ERR_IN_STATUS) &&
        PMPI_Waitall(n, c->requests, some) == MPI_SUCCESS)
        for (int i = 0; i < n; i++)
            if (!reported[i]) {
                st[i] = some[i];
                st[i].MPI_ERROR = MPI_SUCCESS;
            }
    for (int i = 0; i < n; i++) { /* a receive whose copy failed: as complete()'s loop does */
        if (results[i] == MPI_SUCCESS) continue;
        if (rc == MPI_SUCCESS) rc = in_status(c, st, n, results[i]);
        st[i].MPI_ERROR = results[i];
    }
    free(of), free(some), free(indices), free(results), free(reported);
    return rc;
}

static int complete(const struct call *c)
{
    ipc_flush_pending(); /* a burst of GPU-to-GPU sends goes before anything waits (transfer/ipc.h) */
    staged_transfer *taken = NULL;
    int need_status = 0, hidden = 0, blocking = c->kind == WAIT || c->kind == WAITANY || c->kind == WAITALL ||
                                                c->kind == WAITSOME;
    for (int i = 0; i < c->n; i++) {
        staged_transfer *t = c->requests[i] == MPI_REQUEST_NULL ? NULL : requests_take(c->requests[i]);
        if (!t) continue;
        t->index = i;
        t->next = taken;
        taken = t;
        /* a staged receive needs its status (the byte count), a persistent request the
         * error fields of the all-forms, even when the program ignores them */
        need_status |= t->receiving || t->persistent;
        /* An Isendrecv whose send half is still pending cannot complete in a test: the
         * host MPI must not see (and free) its receive half.  MPI_Wait and MPI_Waitall
         * finish the send half after the receive (requests_finish); see complete_polling
         * for Waitany and Waitsome. */
        if (!blocking && !staged_companions_test(t)) hidden++;
    }
    if (!taken) {
        int rc = call_host(c, c->statuses);
        requests_progress();
        return rc;
    }
    if (c->kind == WAITANY || c->kind == WAITSOME)
        for (staged_transfer *t = taken; t; t = t->next)
            if (t->companion_pending) {
                put_back(c, taken);
                return complete_polling(c);
            }
    if (hidden && (c->kind == TEST || c->kind == TESTALL)) { /* nothing may complete */
        put_back(c, taken);
        *c->flag = 0;
        requests_progress();
        return MPI_SUCCESS;
    }
    for (staged_transfer *t = taken; hidden && t; t = t->next)
        if (t->companion_pending) c->requests[t->index] = MPI_REQUEST_NULL;
    MPI_Status *ignore = single(c->kind) ? MPI_STATUS_IGNORE : MPI_STATUSES_IGNORE, local[8], *st = c->statuses;
    int nstatus = single(c->kind) ? 1 : c->n;
    if (need_status && st == ignore) {
        st = nstatus <= 8 ? local : malloc((size_t)nstatus * sizeof *st);
        if (!st) {
            for (staged_transfer *t = taken; hidden && t; t = t->next)
                if (t->companion_pending) c->requests[t->index] = t->request;
            put_back(c, taken);
            return MPI_ERR_NO_MEM;
        }
    }
    /* The receives this call completed are unpacked with one wait for the device at the
     * end (a halo's 26 faces: one synchronisation, not 26); their staging is kept until
     * then. */
    struct device_batch batch;
    staged_transfer *later = NULL, *direct = NULL;
    device_batch_begin(&batch);
    int rc = rounds_wanted(c, taken) ? waitall_rounds(c, st, &taken, &batch, &later) : call_host(c, st);
    if (hidden) { /* the hidden requests are still active: give them back to the program */
        for (staged_transfer *t = taken; t; t = t->next)
            if (t->companion_pending) c->requests[t->index] = t->request;
        if (c->kind == TESTANY && rc == MPI_SUCCESS && *c->flag && *c->index == MPI_UNDEFINED) *c->flag = 0;
        if (c->kind == TESTSOME && rc == MPI_SUCCESS && *c->outcount == MPI_UNDEFINED) *c->outcount = 0;
    }
    for (staged_transfer *t = taken, *next; t; t = next) {
        next = t->next;
        int i = t->index;
        if (!completed(c, rc, st == ignore ? NULL : st, i, t->persistent) ||
            (!blocking && t->companion_pending)) { /* not completed by this call */
            requests_add(c->requests[i], t);
            continue;
        }
        if (t->ipc_direct && t->companion_pending) { /* waits for a receiver: after our own receives' acks */
            t->next = direct;
            direct = t;
            continue;
        }
        MPI_Status *s = st == ignore ? NULL : status_of(c, st, i);
        int err = rc == MPI_ERR_IN_STATUS && s ? s->MPI_ERROR : rc;
        int finished = requests_finish_batched(t, s, err, &later);
        if (finished != MPI_SUCCESS && rc == MPI_SUCCESS) rc = in_status(c, st == ignore ? NULL : st, nstatus, finished);
        if (finished != MPI_SUCCESS && s) s->MPI_ERROR = finished;
    }
    if (!device_batch_end(&batch)) {
        commlib_log(LOG_ERROR, "copying staged receives into the program's buffers failed");
        if (rc == MPI_SUCCESS) rc = MPI_ERR_OTHER;
    }
    ipc_ack_batch_begin(); /* one acknowledgement message per sender */
    for (staged_transfer *t = later, *next; t; t = next) {
        next = t->next;
        requests_retire(t);
    }
    ipc_ack_batch_end();
    /* Direct GPU-to-GPU sends complete on their receivers' acknowledgements; the receives
     * retired above sent ours first, so two ranks waiting on a send and a receive each
     * (a ring's Waitall) do not wait for each other. */
    for (staged_transfer *t = direct, *next; t; t = next) {
        next = t->next;
        MPI_Status *s = st == ignore ? NULL : status_of(c, st, t->index);
        int err = rc == MPI_ERR_IN_STATUS && s ? s->MPI_ERROR : rc;
        int finished = requests_finish(t, s, err);
        if (finished != MPI_SUCCESS && rc == MPI_SUCCESS) rc = in_status(c, st == ignore ? NULL : st, nstatus, finished);
        if (finished != MPI_SUCCESS && s) s->MPI_ERROR = finished;
    }
    if (st != c->statuses && st != local) free(st);
    requests_progress();
    return rc;
}

/* With nothing of commlib's among the requests: the host MPI's own call (the waits with
 * the progress thread kept out, interpose.h). */
#define COMPLETE(forward, kind, ...)                                                 \
    do {                                                                             \
        FORWARD_IF_DISABLED(forward);                                                \
        if (!requests_active()) return blocking_kind(kind) ? KEPT_OUT(forward) : (forward); \
        return complete(&(struct call){kind, __VA_ARGS__});                          \
    } while (0)

COMMLIB_EXPORT int MPI_Wait(MPI_Request *request, MPI_Status *status)
{
    COMPLETE(PMPI_Wait(request, status), WAIT, 1, request, .statuses = status);
}

COMMLIB_EXPORT int MPI_Test(MPI_Request *request, int *flag, MPI_Status *status)
{
    COMPLETE(PMPI_Test(request, flag, status), TEST, 1, request, .flag = flag, .statuses = status);
}

COMMLIB_EXPORT int MPI_Waitany(int count, MPI_Request requests[], int *index, MPI_Status *status)
{
    COMPLETE(PMPI_Waitany(count, requests, index, status), WAITANY, count, requests, .index = index,
             .statuses = status);
}

COMMLIB_EXPORT int MPI_Testany(int count, MPI_Request requests[], int *index, int *flag, MPI_Status *status)
{
    COMPLETE(PMPI_Testany(count, requests, index, flag, status), TESTANY, count, requests, .index = index,
             .flag = flag, .statuses = status);
}

COMMLIB_EXPORT int MPI_Waitall(int count, MPI_Request requests[], MPI_Status statuses[])
{
    COMPLETE(PMPI_Waitall(count, requests, statuses), WAITALL, count, requests, .statuses = statuses);
}

COMMLIB_EXPORT int MPI_Testall(int count, MPI_Request requests[], int *flag, MPI_Status statuses[])
{
    COMPLETE(PMPI_Testall(count, requests, flag, statuses), TESTALL, count, requests, .flag = flag,
             .statuses = statuses);
}

COMMLIB_EXPORT int MPI_Waitsome(int incount, MPI_Request requests[], int *outcount, int indices[],
                                MPI_Status statuses[])
{
    COMPLETE(PMPI_Waitsome(incount, requests, outcount, indices, statuses), WAITSOME, incount, requests,
             .outcount = outcount, .indices = indices, .statuses = statuses);
}

COMMLIB_EXPORT int MPI_Testsome(int incount, MPI_Request requests[], int *outcount, int indices[],
                                MPI_Status statuses[])
{
    COMPLETE(PMPI_Testsome(incount, requests, outcount, indices, statuses), TESTSOME, incount, requests,
             .outcount = outcount, .indices = indices, .statuses = statuses);
}

/* Does not free the request: a completed staged receive is finished now (the program may
 * read its buffer).  Most leave the table, so the later MPI_Wait simply forwards; one whose
 * status commlib rewrites (a descriptor's count, a truncation commlib found) stays in it,
 * finished early with that status, which this call and the program's completion call
 * report (requests_finish_early).  Persistent ones leave: MPICH makes the request inactive
 * here, and the program's MPI_Wait then gets an empty status, as without commlib. */
COMMLIB_EXPORT int MPI_Request_get_status(MPI_Request request, int *flag, MPI_Status *status)
{
    FORWARD_IF_DISABLED(PMPI_Request_get_status(request, flag, status));
    staged_transfer *t = requests_active() && request != MPI_REQUEST_NULL ? requests_take(request) : NULL;
    if (!t) return PMPI_Request_get_status(request, flag, status);
    ipc_flush_pending(); /* our own queued GPU-to-GPU sends go before we poll (transfer/ipc.h) */
    MPI_Status local = {.MPI_ERROR = MPI_SUCCESS}, *st = status == MPI_STATUS_IGNORE ? &local : status;
    if (t->finished_early) { /* by the progress thread or an earlier call */
        requests_add(request, t);
        int error = st->MPI_ERROR;
        *st = t->early_status;
        st->MPI_ERROR = t->early_err != MPI_SUCCESS ? t->early_err : error;
        *flag = 1;
        return t->early_err;
    }
    int rc = MPI_SUCCESS, error = st->MPI_ERROR; /* the program's, left alone unless there is an error */
    *flag = 0;
    st->MPI_ERROR = MPI_SUCCESS; /* Open MPI reports a failed request in the status, MPICH in rc */
    /* an Isendrecv is complete when its send half is too (a pipelined send, its copies) */
    if (staged_companions_test(t)) rc = PMPI_Request_get_status(request, flag, st);
    int err = rc != MPI_SUCCESS ? rc : st->MPI_ERROR, class = MPI_SUCCESS;
    if (st->MPI_ERROR == MPI_SUCCESS) st->MPI_ERROR = error;
    int rewrite = ipc_may_rewrite_status(t) && !t->persistent;
    int truncated = err != MPI_SUCCESS && rewrite && PMPI_Error_class(err, &class) == MPI_SUCCESS &&
                    class == MPI_ERR_TRUNCATE;
    if (!*flag || (err != MPI_SUCCESS && !truncated)) {
        requests_add(request, t);
        return rc;
    }
    if (rewrite) {
        struct device_batch *batch = device_batch_suspend(); /* unpacked before returning */
        int result = requests_finish_early(t, st, truncated ? err : MPI_SUCCESS);
        device_batch_resume(batch);
        requests_add(request, t);
        st->MPI_ERROR = result != MPI_SUCCESS ? result : error;
        return result;
    }
    return requests_finish(t, st, rc);
}

/* The staging must outlive the host request, which the program no longer holds: commlib
 * keeps it (detached) and finishes it later.  An inactive persistent request goes at once,
 * with its staging. */
COMMLIB_EXPORT int MPI_Request_free(MPI_Request *request)
{
    FORWARD_IF_DISABLED(PMPI_Request_free(request));
    int valid = request && *request != MPI_REQUEST_NULL;
    staged_transfer *t = valid && requests_active() ? requests_take(*request) : NULL;
    if (!t) {
        staged_transfer *inactive = valid && requests_any_parked() ? requests_unpark(*request) : NULL;
        if (inactive) requests_unregister(inactive); /* before the handle can be handed out again */
        int rc = PMPI_Request_free(request);
        if (inactive && rc == MPI_SUCCESS) {
            staged_release(inactive);
        } else if (inactive) {
            requests_park(*request, inactive);
            requests_register(*request, inactive);
        }
        return rc;
    }
    t->freed = t->persistent; /* the host request is commlib's to free once it completed */
    requests_detach(*request, t);
    *request = MPI_REQUEST_NULL;
    requests_poll_detached();
    return MPI_SUCCESS;
}

/* The completion that follows a cancel sees MPI_Test_cancelled and releases (or parks)
 * the staging without unpacking.  An Isendrecv cancels its send half too. */
COMMLIB_EXPORT int MPI_Cancel(MPI_Request *request)
{
    FORWARD_IF_DISABLED(PMPI_Cancel(request));
    staged_transfer *t = requests_active() && request && *request != MPI_REQUEST_NULL ? requests_take(*request) : NULL;
    if (t) {
        /* a direct GPU-to-GPU send's companion is the receiver's acknowledgement: if the
         * send cannot be cancelled the receiver reads the buffer, and the ack still comes */
        if (t->companion_pending && !t->ipc_direct && !t->pipelined) PMPI_Cancel(&t->companion);
        requests_add(*request, t);
        /* a pipelined send is not cancelled (MPI lets a cancel fail): its chunks are on
         * their way, and a receiver that got the descriptor waits for them (transfer/pipeline.h) */
        if (t->pipelined) return MPI_SUCCESS;
    }
    return PMPI_Cancel(request);
}
