#include "requests.h"

#include <pthread.h>

#include "../cuda/device.h"
#include "../transfer/ipc.h"
#include "../util/log.h"
#include "../util/stats.h"
#include "thread.h"

#define BUCKETS 256

int requests_outstanding;
int requests_detached;
int requests_parked;
int requests_registered;

/* parked and registry: also under table_lock */
static staged_transfer *buckets[BUCKETS], *parked[BUCKETS], *registry[BUCKETS];
static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;
static staged_transfer *detached;
static pthread_mutex_t detached_lock = PTHREAD_MUTEX_INITIALIZER;

static size_t bucket_of(intptr_t key) { return (size_t)(((uint64_t)key * 0x9E3779B97F4A7C15ull) >> 56) % BUCKETS; }

/* The progress thread's claim (see requests.h); the key, not the entry, because the
 * entry is freed once finished. */
static int claiming;
static intptr_t claimed_key;
static pthread_cond_t claim_ended = PTHREAD_COND_INITIALIZER;

static void link_in_table(staged_transfer **table, staged_transfer *t)
{
    staged_transfer **head = &table[bucket_of(REQUEST_KEY(t->request))];
    t->next = *head;
    *head = t;
}

static void link_in(staged_transfer *t) { link_in_table(buckets, t); }

/* Unlinks the entry of `key` from one bucket chain (caller holds table_lock). */
static staged_transfer *unlink_key(staged_transfer **head, intptr_t key)
{
    for (staged_transfer **link = head; *link; link = &(*link)->next)
        if (REQUEST_KEY((*link)->request) == key) {
            staged_transfer *t = *link;
            *link = t->next;
            return t;
        }
    return NULL;
}

void requests_add(MPI_Request request, staged_transfer *t)
{
    t->request = request;
    t->index = 0; /* no sweep has tested it (sweeps mark with numbers > 0) */
    pthread_mutex_lock(&table_lock);
    link_in(t);
    __atomic_add_fetch(&requests_outstanding, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&table_lock);
}

staged_transfer *requests_take(MPI_Request request)
{
    intptr_t key = REQUEST_KEY(request);
    staged_transfer **head = &buckets[bucket_of(key)], *t = NULL;
    pthread_mutex_lock(&table_lock);
    for (;;) {
        if ((t = unlink_key(head, key))) __atomic_sub_fetch(&requests_outstanding, 1, __ATOMIC_RELAXED);
        /* the progress thread holds it: wait for it to come back or be finished */
        if (t || !claiming || claimed_key != key) break;
        pthread_cond_wait(&claim_ended, &table_lock);
    }
    pthread_mutex_unlock(&table_lock);
    return t;
}

void requests_detach(MPI_Request request, staged_transfer *t)
{
    t->request = request;
    pthread_mutex_lock(&detached_lock);
    t->next = detached;
    detached = t;
    __atomic_add_fetch(&requests_outstanding, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&requests_detached, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&detached_lock);
}

void requests_park(MPI_Request request, staged_transfer *t)
{
    t->request = request;
    pthread_mutex_lock(&table_lock);
    link_in_table(parked, t);
    __atomic_add_fetch(&requests_parked, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&table_lock);
}

staged_transfer *requests_unpark(MPI_Request request)
{
    intptr_t key = REQUEST_KEY(request);
    pthread_mutex_lock(&table_lock);
    staged_transfer *t = unlink_key(&parked[bucket_of(key)], key);
    if (t) __atomic_sub_fetch(&requests_parked, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&table_lock);
    return t;
}

void requests_register(MPI_Request request, staged_transfer *t)
{
    if (!t->partitions) return;
    t->registered = request;
    pthread_mutex_lock(&table_lock);
    staged_transfer **head = &registry[bucket_of(REQUEST_KEY(request))];
    t->registry_next = *head;
    *head = t;
    __atomic_add_fetch(&requests_registered, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&table_lock);
}

void requests_unregister(staged_transfer *t)
{
    if (!t->partitions) return;
    pthread_mutex_lock(&table_lock);
    for (staged_transfer **link = &registry[bucket_of(REQUEST_KEY(t->registered))]; *link; link = &(*link)->registry_next)
        if (*link == t) {
            *link = t->registry_next;
            __atomic_sub_fetch(&requests_registered, 1, __ATOMIC_RELAXED);
            break;
        }
    pthread_mutex_unlock(&table_lock);
}

staged_transfer *requests_lookup(MPI_Request request)
{
    intptr_t key = REQUEST_KEY(request);
    pthread_mutex_lock(&table_lock);
    staged_transfer *t = registry[bucket_of(key)];
    while (t && REQUEST_KEY(t->registered) != key) t = t->registry_next;
    pthread_mutex_unlock(&table_lock);
    return t;
}

void requests_retire(staged_transfer *t)
{
    ipc_acknowledge(t); /* after the device work that read the peer's memory completed */
    if (!t->persistent) {
        staged_release(t);
    } else if (!t->freed) {
        requests_park(t->request, t);
    } else { /* freed by the program while active: the host request is commlib's to free */
        requests_unregister(t);
        PMPI_Request_free(&t->request);
        staged_release(t);
    }
}

int requests_finish_batched(staged_transfer *t, const MPI_Status *status, int err, staged_transfer **later)
{
    if (t->finished_early) { /* the progress thread did the work: its status, its result */
        if (status) {
            MPI_Status *out = (MPI_Status *)status;
            int error = out->MPI_ERROR; /* left alone unless the finish failed, as it would be */
            *out = t->early_status;
            out->MPI_ERROR = t->early_err != MPI_SUCCESS ? t->early_err : error;
        }
        int rc = t->early_err;
        requests_retire(t);
        return rc;
    }
    int rc = MPI_SUCCESS;
    if (t->companion_pending) { /* a blocking wait, as in request.c (never on the progress thread) */
        progress_program_enter();
        rc = staged_companions_wait(t);
        progress_program_leave();
    }
    if (t->ipc_unsynced) { /* a GPU-to-GPU send's pack: done before the buffer is the program's again */
        t->ipc_unsynced = 0;
        device_make_current(t->dc->context);
        if (!ipc_send_settle(t, later != NULL) && rc == MPI_SUCCESS) rc = MPI_ERR_OTHER;
    }
    int whole = !later || t->partitions; /* complete before returning: no batch */
    struct device_batch *batch = whole ? device_batch_suspend() : NULL;
    int finished = t->receiving && status ? staged_recv_finish(t, status, err) : MPI_SUCCESS;
    if (whole) device_batch_resume(batch);
    if (rc == MPI_SUCCESS) rc = finished;
    if (later && t->receiving) {
        t->next = *later;
        *later = t;
    } else {
        requests_retire(t);
    }
    return rc;
}

int requests_finish(staged_transfer *t, const MPI_Status *status, int err)
{
    return requests_finish_batched(t, status, err, NULL);
}

int requests_finish_early(staged_transfer *t, MPI_Status *status, int err)
{
    int result = staged_recv_finish(t, status, err);
    t->early_err = result != MPI_SUCCESS ? result : err;
    ipc_acknowledge(t); /* a direct sender waits for it */
    t->early_status = *status;
    t->finished_early = 1;
    return t->early_err;
}

static __thread int on_progress_thread; /* set by the progress thread's first sweep */
#define EARLY_FINISH_GRACE_NS 200000 /* requests_progress_pending */

/* A typed transfer copies its span on its context's stream, and CUDA wants a context
 * current on the calling thread; the progress thread has none of its own. */
static int finish(staged_transfer *t, const MPI_Status *status, int err)
{
    if (on_progress_thread && t->typed && t->span.dc) device_make_current(t->span.dc->context);
    return requests_finish(t, status, err);
}

/* Tests an Isendrecv's send half (the holder's job); 1 when it is done. */
static int companion_done(staged_transfer *t) { return staged_companions_test(t); }

/* wait = 0: finish those that completed; 1: wait for every one. */
static void finish_detached(int wait)
{
    staged_transfer **link = &detached;
    while (*link) {
        staged_transfer *t = *link;
        int flag = 1;
        MPI_Status status;
        if (!wait && !companion_done(t)) {
            link = &t->next;
            continue;
        }
        int rc = wait ? PMPI_Wait(&t->request, &status) : PMPI_Test(&t->request, &flag, &status);
        if (!flag && rc == MPI_SUCCESS) {
            link = &t->next;
            continue;
        }
        *link = t->next;
        __atomic_sub_fetch(&requests_outstanding, 1, __ATOMIC_RELAXED);
        __atomic_sub_fetch(&requests_detached, 1, __ATOMIC_RELAXED);
        finish(t, &status, rc);
    }
}

void requests_poll_detached(void)
{
    /* another thread polling already makes the progress this call would */
    if (pthread_mutex_trylock(&detached_lock)) return;
    finish_detached(0);
    pthread_mutex_unlock(&detached_lock);
}

/* Ends the claim; `finished`: the entry is gone for good (its count falls now, after the
 * unpack, in release order for requests_active). */
static void end_claim(staged_transfer *t, int finished)
{
    pthread_mutex_lock(&table_lock);
    if (finished) __atomic_sub_fetch(&requests_outstanding, 1, __ATOMIC_RELEASE);
    else link_in(t);
    claiming = 0;
    pthread_cond_broadcast(&claim_ended);
    pthread_mutex_unlock(&table_lock);
}

int requests_progress_pending(void)
{
    static int sweep; /* only the progress thread sweeps */
    on_progress_thread = 1;
    int in_table = __atomic_load_n(&requests_outstanding, __ATOMIC_RELAXED) -
                   __atomic_load_n(&requests_detached, __ATOMIC_RELAXED);
    if (in_table <= 0) return 0;
    if (++sweep <= 0) sweep = 1;
    int finished = 0;
    for (int b = 0; b < BUCKETS; b++) {
        for (;;) {
            staged_transfer **link, *t = NULL;
            pthread_mutex_lock(&table_lock);
            for (link = &buckets[b]; *link; link = &(*link)->next)
                if ((*link)->index != sweep && ((*link)->persistent || (*link)->finished_early)) {
                    (*link)->index = sweep; /* left to the program's completion call (requests.h) */
                } else if ((*link)->index != sweep) {
                    t = *link;
                    *link = t->next;
                    t->index = sweep;
                    claiming = 1;
                    claimed_key = REQUEST_KEY(t->request);
                    break;
                }
            pthread_mutex_unlock(&table_lock);
            if (!t) break;
            MPI_Status status;
            int flag = 0, rc = MPI_SUCCESS;
            status.MPI_ERROR = MPI_SUCCESS; /* Open MPI reports a failed request here, MPICH in rc */
            /* get_status leaves the request to the program's own completion call */
            if (companion_done(t)) rc = PMPI_Request_get_status(t->request, &flag, &status);
            /* a truncated receive that may hold a descriptor is finished here too: a direct
             * sender waits for its acknowledgement (MPICH reports the error in rc, Open MPI
             * in the status) */
            int err = rc != MPI_SUCCESS ? rc : status.MPI_ERROR, class = MPI_SUCCESS;
            int truncated = err != MPI_SUCCESS && ipc_may_rewrite_status(t) &&
                            PMPI_Error_class(err, &class) == MPI_SUCCESS && class == MPI_ERR_TRUNCATE;
            if (!flag || (err != MPI_SUCCESS && !truncated)) {
                end_claim(t, 0);
                continue;
            }
            /* A receive the program's completion call finishes is unpacked in that call's batched
             * launches (pack/device_pack.h), one by one here: the thread leaves it to the program
             * for a moment after it first sees it complete (a halo's receives arrive while the
             * program still posts its sends), then finishes it (a direct sender waits for it). */
            if (ipc_may_rewrite_status(t)) {
                uint64_t now = stat_now_ns();
                if (!t->done_seen_ns || now - t->done_seen_ns < EARLY_FINISH_GRACE_NS) {
                    if (!t->done_seen_ns) t->done_seen_ns = now ? now : 1;
                    end_claim(t, 0);
                    continue;
                }
                device_make_current(t->dc->context);
                requests_finish_early(t, &status, truncated ? err : MPI_SUCCESS);
                stat_add(STAT_PROGRESS_COMPLETED, 1);
                end_claim(t, 0);
                finished++;
                continue;
            }
            finish(t, &status, MPI_SUCCESS); /* a failed copy is logged there */
            stat_add(STAT_PROGRESS_COMPLETED, 1);
            end_claim(NULL, 1);
            finished++;
        }
    }
    return finished;
}

void requests_finalize(void)
{
    pthread_mutex_lock(&detached_lock);
    finish_detached(1);
    pthread_mutex_unlock(&detached_lock);
    int left = __atomic_load_n(&requests_outstanding, __ATOMIC_RELAXED);
    if (left) commlib_log(LOG_WARN, "%d staged nonblocking operation(s) never completed before MPI_Finalize", left);
}
