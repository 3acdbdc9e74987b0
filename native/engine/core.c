/* The engine's communicators, queues, thread and waits; an operation's life: the
 * signature comparison, then per partition: wait until ready, stage device inputs, the
 * transport's step, copy device results back. */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../util/config.h"
#include "../util/log.h"
#include "../util/stats.h"
#include "internal.h"

enum phase { P_CHECK, P_WAIT_READY, P_DEVICE_IN, P_STEP, P_DONE };

static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake, unpinned;
    pthread_mutex_t done_lock; /* engine_wait_passive's sleepers, woken by finish() */
    pthread_cond_t done;
    int sleepers;
    engine_comm *comms;
    int started, stopping, work;
    pthread_t thread;
} engine = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER,
            .unpinned = PTHREAD_COND_INITIALIZER, .done_lock = PTHREAD_MUTEX_INITIALIZER,
            .done = PTHREAD_COND_INITIALIZER};

/* Waiting for the peers: spin briefly, then yield, then sleep a little (ranks may share
 * cores with each other and with their engine threads). */
static void backoff(int idle)
{
    if (idle < 64) return;
    if (idle < 2048) {
        sched_yield();
        return;
    }
    struct timespec pause = {0, 20000};
    nanosleep(&pause, NULL);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void engine_split(int64_t n, int parts, int64_t *counts, int64_t *displs)
{
    int64_t base = parts > 0 ? n / parts : 0, extra = parts > 0 ? n % parts : 0, at = 0;
    for (int i = 0; i < parts; i++) {
        counts[i] = base + (i < extra);
        displs[i] = at;
        at += counts[i];
    }
}

void engine_split_parts(const engine_op *op, int64_t n, int64_t *counts, int64_t *displs)
{
    int64_t unit = op->a.unit > 1 ? op->a.unit : 1;
    engine_split(n / unit, op->parts, counts, displs);
    for (int i = 0; i < op->parts; i++) {
        counts[i] *= unit;
        displs[i] *= unit;
    }
    counts[op->parts - 1] += n % unit; /* a partial unit (n not a multiple) goes with the last part */
}

void engine_fail(engine_op *op, int status, const char *fmt, ...)
{
    if (op->status != ENGINE_OK) return; /* the first reason stands */
    op->status = status;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(op->message, sizeof op->message, fmt, ap);
    va_end(ap);
}

int engine_mpi_error(engine_op *op, int rc, const char *what)
{
    if (rc == MPI_SUCCESS) return 0;
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (PMPI_Error_string(rc, text, &len) != MPI_SUCCESS) snprintf(text, sizeof text, "error %d", rc);
    engine_fail(op, ENGINE_ERR_MPI, "%s failed: %s", what, text);
    return 1;
}

static const char *const kind_name[ENGINE_NKINDS] = {"all_reduce", "reduce_scatter", "all_gather", "broadcast",
                                                     "all_to_all", "send", "recv", "barrier"};

/* ---- the thread ---- */

static int drive(engine_comm *c);

static int has_work(engine_comm *c)
{
    return __atomic_load_n(&c->head, __ATOMIC_ACQUIRE) || __atomic_load_n(&c->detached, __ATOMIC_ACQUIRE);
}

static int any_work(void)
{
    for (engine_comm *c = engine.comms; c; c = c->next)
        if (has_work(c)) return 1;
    return 0;
}

static void *engine_main(void *unused)
{
    (void)unused;
    int idle = 0;
    pthread_mutex_lock(&engine.lock);
    while (!engine.stopping) {
        if (!any_work()) {
            engine.work = 0;
            pthread_cond_wait(&engine.wake, &engine.lock);
            idle = 0;
            continue;
        }
        /* The list lock is not held while data moves (engine_start must not wait for a
         * slice to be copied): the communicators of this pass are pinned instead, and
         * engine_comm_free waits until no pass holds its communicator. */
        engine_comm *pass[64];
        int n = 0;
        for (engine_comm *c = engine.comms; c && n < 64; c = c->next)
            if (has_work(c)) {
                c->pinned++;
                pass[n++] = c;
            }
        pthread_mutex_unlock(&engine.lock);
        int progressed = 0;
        for (int i = 0; i < n; i++) progressed |= drive(pass[i]);
        pthread_mutex_lock(&engine.lock);
        for (int i = 0; i < n; i++) pass[i]->pinned--;
        pthread_cond_broadcast(&engine.unpinned);
        pthread_mutex_unlock(&engine.lock);
        if (progressed) idle = 0;
        else backoff(++idle); /* waiting for the peers */
        pthread_mutex_lock(&engine.lock);
    }
    pthread_mutex_unlock(&engine.lock);
    return NULL;
}

/* The thread calls the MPI concurrently with the program: only under MPI_THREAD_MULTIPLE. */
static void thread_start_once(void)
{
    pthread_mutex_lock(&engine.lock);
    if (!engine.started) {
        int provided = MPI_THREAD_SINGLE;
        PMPI_Query_thread(&provided);
        if (provided == MPI_THREAD_MULTIPLE && commlib_config.engine_thread) {
            sigset_t all, old;
            sigfillset(&all);
            pthread_sigmask(SIG_BLOCK, &all, &old);
            if (pthread_create(&engine.thread, NULL, engine_main, NULL) == 0) {
                pthread_setname_np(engine.thread, "commlib-engine");
                engine.started = 1;
            }
            pthread_sigmask(SIG_SETMASK, &old, NULL);
        }
        if (!engine.started) engine.started = -1; /* operations move in test and wait */
    }
    pthread_mutex_unlock(&engine.lock);
}

void engine_shutdown(void)
{
    pthread_mutex_lock(&engine.lock);
    int running = engine.started == 1;
    engine.stopping = 1;
    pthread_cond_broadcast(&engine.wake);
    pthread_mutex_unlock(&engine.lock);
    if (running) pthread_join(engine.thread, NULL);
    pthread_mutex_lock(&engine.lock);
    engine.started = -1; /* no new thread: operations move in wait/test */
    pthread_mutex_unlock(&engine.lock);
}

void engine_wake(void)
{
    pthread_mutex_lock(&engine.lock);
    engine.work = 1;
    pthread_cond_signal(&engine.wake);
    pthread_mutex_unlock(&engine.lock);
}

/* ---- communicators ---- */

int engine_comm_create(MPI_Comm comm, engine_comm **out, char *err, size_t errlen)
{
    *out = NULL;
    commlib_config_init();
    engine_comm *c = calloc(1, sizeof *c);
    if (!c) {
        snprintf(err, errlen, "out of memory");
        return ENGINE_ERR_MEMORY;
    }
    int rc = PMPI_Comm_dup(comm, &c->comm);
    if (rc != MPI_SUCCESS) {
        snprintf(err, errlen, "MPI_Comm_dup failed (%d)", rc);
        free(c);
        return ENGINE_ERR_MPI;
    }
    if ((rc = PMPI_Comm_dup(comm, &c->p2p)) != MPI_SUCCESS) {
        snprintf(err, errlen, "MPI_Comm_dup failed (%d)", rc);
        PMPI_Comm_free(&c->comm);
        free(c);
        return ENGINE_ERR_MPI;
    }
    PMPI_Comm_set_errhandler(c->comm, MPI_ERRORS_RETURN);
    PMPI_Comm_set_errhandler(c->p2p, MPI_ERRORS_RETURN);
    PMPI_Comm_rank(c->comm, &c->rank);
    PMPI_Comm_size(c->comm, &c->size);
    pthread_mutex_init(&c->lock, NULL);
    pthread_mutex_init(&c->drive, NULL);
    c->check = commlib_config.engine_check;
    /* collective: every rank takes the same decision (shm_attach agrees on it) */
    c->transport = !commlib_config.engine_transport_mpi && shm_attach(c) ? TRANSPORT_SHM : TRANSPORT_MPI;
    thread_start_once();
    pthread_mutex_lock(&engine.lock);
    c->next = engine.comms;
    engine.comms = c;
    pthread_mutex_unlock(&engine.lock);
    *out = c;
    return ENGINE_OK;
}

int engine_comm_rank(const engine_comm *c) { return c->rank; }
int engine_comm_size(const engine_comm *c) { return c->size; }
const char *engine_comm_transport(const engine_comm *c) { return c->transport == TRANSPORT_SHM ? "shm" : "mpi"; }

static void op_release(engine_op *op);

void engine_comm_free(engine_comm *c)
{
    if (!c) return;
    /* let what was started finish (every rank does the same) */
    for (int idle = 0; has_work(c);)
        if (drive(c)) idle = 0;
        else backoff(++idle);
    pthread_mutex_lock(&engine.lock);
    for (engine_comm **link = &engine.comms; *link; link = &(*link)->next)
        if (*link == c) {
            *link = c->next;
            break;
        }
    while (c->pinned) pthread_cond_wait(&engine.unpinned, &engine.lock); /* the thread's pass has ended */
    pthread_mutex_unlock(&engine.lock);
    shm_detach(c);
    PMPI_Comm_free(&c->comm);
    PMPI_Comm_free(&c->p2p);
    pthread_mutex_destroy(&c->lock);
    pthread_mutex_destroy(&c->drive);
    free(c);
}

/* ---- operations ---- */

static int validate(engine_comm *c, const struct engine_args *a, char *err, size_t errlen)
{
#define BAD(...) (snprintf(err, errlen, __VA_ARGS__), ENGINE_ERR_ARG)
    if (a->kind < 0 || a->kind >= ENGINE_NKINDS) return BAD("unknown operation %d", a->kind);
    const char *what = kind_name[a->kind];
    if (!cl_dtype_size(a->dtype)) return BAD("%s: unknown dtype %d", what, a->dtype);
    int reduces = a->kind == ENGINE_ALLREDUCE || a->kind == ENGINE_REDUCE_SCATTER;
    if (reduces && !cl_op_valid(a->dtype, a->op)) return BAD("%s: this op is not defined on this dtype", what);
    if (a->partitions < 1) return BAD("%s: partitions must be at least 1", what);
    if (a->unit < 0) return BAD("%s: negative unit", what);
    if ((a->partitions > 1 || a->partitioned) && a->kind != ENGINE_ALLREDUCE && a->kind != ENGINE_REDUCE_SCATTER &&
        a->kind != ENGINE_ALLGATHER && a->kind != ENGINE_BROADCAST)
        return BAD("%s cannot be partitioned", what);
    if ((a->kind == ENGINE_BROADCAST || a->kind == ENGINE_SEND || a->kind == ENGINE_RECV) &&
        (a->root < (a->kind == ENGINE_RECV ? -1 : 0) || a->root >= c->size)) /* recv: -1 any source */
        return BAD("%s: rank %d is not in a communicator of %d", what, a->root, c->size);
    if ((a->kind == ENGINE_SEND || a->kind == ENGINE_RECV) && a->root == c->rank)
        return BAD("%s: the peer is this rank", what);
    int shares = a->kind == ENGINE_REDUCE_SCATTER || a->kind == ENGINE_ALLGATHER || a->kind == ENGINE_ALLTOALL;
    if (shares && !a->counts) return BAD("%s: per-rank counts are missing", what);
    if (!shares && a->count < 0) return BAD("%s: negative count", what);
    for (int q = 0; shares && q < c->size; q++)
        if (a->counts[q] < 0) return BAD("%s: negative count for rank %d", what, q);
    if (a->kind == ENGINE_REDUCE_SCATTER && !a->send) return BAD("%s: needs an input buffer", what);
    if (a->kind == ENGINE_ALLTOALL && !a->send) return BAD("%s: needs an input buffer", what);
    if (a->kind == ENGINE_SEND && !a->send && a->count > 0) return BAD("%s: no buffer", what);
    return ENGINE_OK;
#undef BAD
}

int engine_start(engine_comm *c, const struct engine_args *a, engine_op **out, char *err, size_t errlen)
{
    *out = NULL;
    int rc = validate(c, a, err, errlen);
    if (rc) return rc;
    engine_op *op = calloc(1, sizeof *op);
    int parts = a->partitions;
    if (op) {
        op->counts = calloc((size_t)c->size + 1, sizeof(int64_t));
        op->displs = calloc((size_t)c->size + 1, sizeof(int64_t));
        op->step_counts = calloc((size_t)c->size + 1, sizeof(int64_t));
        op->step_displs = calloc((size_t)c->size + 1, sizeof(int64_t));
        op->ready = calloc((size_t)parts, sizeof(int));
        op->ready_event = calloc((size_t)parts, sizeof(void *));
        op->part_done = calloc((size_t)parts, sizeof(int));
    }
    if (!op || !op->counts || !op->displs || !op->step_counts || !op->step_displs || !op->ready || !op->ready_event ||
        !op->part_done) {
        snprintf(err, errlen, "out of memory");
        if (op) op_release(op);
        return ENGINE_ERR_MEMORY;
    }
    op->c = c;
    op->a = *a;
    op->check_req = MPI_REQUEST_NULL;
    op->parts = parts;
    op->refs = 2;
    if (a->counts) {
        int64_t at = 0;
        for (int q = 0; q < c->size; q++) {
            op->counts[q] = a->counts[q];
            op->displs[q] = at;
            at += a->counts[q];
        }
        op->counts[c->size] = at; /* the total */
    }
    op->a.counts = a->counts ? op->counts : NULL;
    if (parts == 1 && !a->partitioned) op->ready[0] = 1; /* a partitioned one waits for engine_ready */
    op->phase = P_CHECK;
    if ((rc = device_prepare(op, err, errlen)) != ENGINE_OK) {
        op_release(op);
        return rc;
    }
    pthread_mutex_lock(&c->lock);
    op->seq = c->started++;
    /* send and recv involve two ranks: they do not count in the collectives' sequence */
    if (a->kind != ENGINE_SEND && a->kind != ENGINE_RECV) op->collective = c->collectives++;
    if (c->tail) c->tail->next = op;
    else __atomic_store_n(&c->head, op, __ATOMIC_RELEASE);
    c->tail = op;
    pthread_mutex_unlock(&c->lock);
    stat_add(STAT_ENGINE_OPS, 1);
    *out = op;
    /* waking the thread costs a futex and a scheduler round trip; a caller that waits at
     * once moves the queue itself */
    if (!a->caller_waits) engine_wake();
    return ENGINE_OK;
}

int engine_ready(engine_op *op, int lo, int hi)
{
    if (lo < 0 || hi > op->parts || lo > hi) return ENGINE_ERR_ARG;
    for (int i = lo; i < hi; i++) __atomic_store_n(&op->ready[i], 1, __ATOMIC_RELEASE);
    engine_wake();
    return ENGINE_OK;
}

int engine_ready_after(engine_op *op, int partition, void *event)
{
    if (partition < 0 || partition >= op->parts || !event) return ENGINE_ERR_ARG;
    __atomic_store_n(&op->ready_event[partition], event, __ATOMIC_RELEASE);
    engine_wake();
    return ENGINE_OK;
}

/* Partition p's shares and buffers as a host step (device inputs: their staging). */
static void build_step(engine_op *op, int p)
{
    engine_comm *c = op->c;
    const struct engine_args *a = &op->a;
    size_t size = cl_dtype_size(a->dtype);
    int staged = op->device && !op->aware;
    const char *send = staged ? op->host_send : a->send;
    char *recv = staged ? op->host_recv : a->recv;
    struct step *s = &op->step;
    *s = (struct step){.kind = a->kind, .dtype = a->dtype, .op = a->op, .root = a->root};
    if (a->kind == ENGINE_ALLREDUCE || a->kind == ENGINE_BROADCAST || a->kind == ENGINE_SEND ||
        a->kind == ENGINE_RECV || a->kind == ENGINE_BARRIER) {
        int64_t count = a->count, at = 0;
        if (op->parts > 1) {
            int64_t counts[op->parts], displs[op->parts];
            engine_split_parts(op, a->count, counts, displs);
            count = counts[p];
            at = displs[p];
        }
        s->count = count;
        s->recv = recv ? recv + at * (int64_t)size : NULL;
        s->send = send ? send + at * (int64_t)size : s->recv;
        return;
    }
    /* shares: part p of every rank's share */
    for (int q = 0; q < c->size; q++) {
        int64_t counts[op->parts], displs[op->parts];
        engine_split_parts(op, op->counts[q], counts, displs);
        op->step_counts[q] = counts[p];
        op->step_displs[q] = op->displs[q] + displs[p];
    }
    s->counts = op->step_counts;
    s->displs = op->step_displs;
    int64_t mine = op->step_displs[c->rank] - op->displs[c->rank]; /* where part p starts in my share */
    if (a->kind == ENGINE_REDUCE_SCATTER) {
        s->send = send;
        s->recv = recv + mine * (int64_t)size;
    } else if (a->kind == ENGINE_ALLGATHER) {
        s->recv = recv;
        s->send = send ? send + mine * (int64_t)size : recv + op->step_displs[c->rank] * (int64_t)size;
    } else { /* all-to-all */
        s->send = send;
        s->recv = recv;
    }
}

static int64_t hash_counts(const int64_t *v, int n)
{
    uint64_t h = 1469598103934665603ull;
    for (int i = 0; i < n; i++) {
        h ^= (uint64_t)v[i];
        h *= 1099511628211ull;
    }
    return (int64_t)(h >> 2);
}

static void signature(const engine_op *op, int64_t *sig)
{
    const struct engine_args *a = &op->a;
    int reduces = a->kind == ENGINE_ALLREDUCE || a->kind == ENGINE_REDUCE_SCATTER;
    int shares = a->kind == ENGINE_REDUCE_SCATTER || a->kind == ENGINE_ALLGATHER || a->kind == ENGINE_ALLTOALL;
    sig[0] = a->kind;
    sig[1] = a->dtype;
    sig[2] = reduces ? a->op : -1;
    sig[3] = a->kind == ENGINE_BROADCAST ? a->root : -1;
    sig[4] = shares ? hash_counts(op->counts, op->c->size + 1) : a->kind == ENGINE_BARRIER ? 0 : a->count;
    sig[5] = (op->parts * 1000003 + (a->unit > 1 ? a->unit : 1)) * 31 + a->shape;
}

static const char *const dtype_name[CL_NDTYPES] = {"float16", "bfloat16", "float32", "float64", "int8", "int16",
                                                   "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool"};
static const char *const op_name[CL_NOPS] = {"sum", "avg", "min", "max", "prod", "band", "bor", "bxor"};

static void describe_mismatch(engine_op *op)
{
    const struct engine_args *a = &op->a;
    char mine[160];
    int reduces = a->kind == ENGINE_ALLREDUCE || a->kind == ENGINE_REDUCE_SCATTER;
    snprintf(mine, sizeof mine, "%s of %lld %s elements%s%s", kind_name[a->kind],
             (long long)(a->counts ? op->counts[op->c->size] : a->count), dtype_name[a->dtype],
             reduces ? ", op " : "", reduces ? op_name[a->op] : "");
    engine_fail(op, ENGINE_ERR_MISMATCH,
                "the ranks did not issue the same operation (collective %llu of the communicator; this rank: %s%s%s)",
                (unsigned long long)op->collective, mine, a->partitions > 1 ? ", partitioned" : "",
                a->kind == ENGINE_BROADCAST ? ", a root of its own" : "");
    stat_add(STAT_ENGINE_MISMATCH, 1);
}

/* The signature comparison; 1 when it finished (passed or failed). */
static int progress_check(engine_op *op)
{
    engine_comm *c = op->c;
    int collective = op->a.kind != ENGINE_SEND && op->a.kind != ENGINE_RECV;
    if (!collective || c->size == 1) return 1;
    int64_t sig[SIGNATURE_WORDS];
    signature(op, sig);
    if (c->transport == TRANSPORT_SHM) {
        if (!shm_check(op, sig)) return 0;
        if (op->status == ENGINE_ERR_MISMATCH) {
            op->status = ENGINE_OK;
            describe_mismatch(op);
        }
        return 1;
    }
    if (!c->check) return 1;
    if (!op->checked) {
        for (int i = 0; i < SIGNATURE_WORDS; i++) {
            op->check[i] = sig[i];
            op->check[SIGNATURE_WORDS + i] = -sig[i];
        }
        op->checked = 1; /* posted */
        if (engine_mpi_error(op, PMPI_Iallreduce(op->check, op->check_out, 2 * SIGNATURE_WORDS, MPI_LONG_LONG,
                                                 MPI_MIN, c->comm, &op->check_req),
                             "MPI_Iallreduce (signature)"))
            return 1;
    }
    int flag = 0;
    if (engine_mpi_error(op, PMPI_Test(&op->check_req, &flag, MPI_STATUS_IGNORE), "MPI_Test (signature)")) return 1;
    if (!flag) return 0;
    for (int i = 0; i < SIGNATURE_WORDS; i++)
        if (op->check_out[i] != -op->check_out[SIGNATURE_WORDS + i]) {
            op->status = ENGINE_OK;
            describe_mismatch(op);
            break;
        }
    return 1;
}

static int partition_ready(engine_op *op, int p)
{
    if (__atomic_load_n(&op->ready[p], __ATOMIC_ACQUIRE)) return 1;
    void *event = __atomic_load_n(&op->ready_event[p], __ATOMIC_ACQUIRE);
    if (!event) return 0;
    const struct cuda_driver *cu = cuda_driver();
    CUresult rc = cu ? cu->cuEventQuery((CUevent)event) : CUDA_SUCCESS;
    if (rc == CUDA_SUCCESS) {
        __atomic_store_n(&op->ready[p], 1, __ATOMIC_RELEASE);
        return 1;
    }
    if (rc != 600 /* CUDA_ERROR_NOT_READY */) {
        engine_fail(op, ENGINE_ERR_CUDA, "cuEventQuery of partition %d's event failed (%d)", p, rc);
        return 1;
    }
    return 0;
}

static void finish(engine_op *op)
{
    if (op->status != ENGINE_OK) {
        if (op->phase == P_STEP && op->c->transport != TRANSPORT_SHM) mpi_step_abandon(op);
        for (int p = 0; p < op->parts; p++) __atomic_store_n(&op->part_done[p], 1, __ATOMIC_RELEASE);
    }
    op->phase = P_DONE;
    /* sequentially consistent with engine_wait_passive's (sleepers++, done?): either this
     * sees the sleeper or the sleeper sees done */
    __atomic_store_n(&op->done, 1, __ATOMIC_SEQ_CST);
    if (op->a.done) op->a.done(op->a.done_arg, op->status);
    if (__atomic_load_n(&engine.sleepers, __ATOMIC_SEQ_CST)) {
        pthread_mutex_lock(&engine.done_lock);
        pthread_cond_broadcast(&engine.done);
        pthread_mutex_unlock(&engine.done_lock);
    }
}

static int use_shm(const engine_op *op)
{
    int k = op->a.kind;
    return op->c->transport == TRANSPORT_SHM && !op->aware && k != ENGINE_SEND && k != ENGINE_RECV &&
           k != ENGINE_ALLTOALL;
}

/* Device operations: marks the partitions whose results landed, and issues the copy in of
 * the next partition as soon as it is ready (it then moves while this one does); 1 when
 * anything happened. */
static int device_poll(engine_op *op)
{
    int moved = 0;
    for (int p = 0; p < op->part; p++)
        if (!__atomic_load_n(&op->part_done[p], __ATOMIC_ACQUIRE) && device_out_done(op, p)) {
            __atomic_store_n(&op->part_done[p], 1, __ATOMIC_RELEASE);
            moved = 1;
        }
    int next = op->part + (op->phase == P_WAIT_READY ? 0 : 1);
    if (next < op->parts && !op->in_state[next] && partition_ready(op, next)) {
        device_issue_in(op, next);
        moved = 1;
    }
    return moved;
}

static int all_copied_back(engine_op *op)
{
    for (int p = 0; p < op->parts; p++)
        if (!__atomic_load_n(&op->part_done[p], __ATOMIC_ACQUIRE)) return 0;
    return 1;
}

/* Advances op as far as it goes without waiting; 1 when anything moved. */
static int op_progress(engine_op *op)
{
    int moved = 0;
    for (;;) {
        if (op->status != ENGINE_OK && op->phase != P_DONE) {
            finish(op);
            return 1;
        }
        switch (op->phase) {
        case P_CHECK:
            if (!progress_check(op)) return moved;
            op->phase = P_WAIT_READY;
            moved = 1;
            continue;
        case P_WAIT_READY:
            if (op->device) moved |= device_poll(op);
            if (op->part == op->parts) {
                if (op->device && !all_copied_back(op)) return moved;
                finish(op);
                return 1;
            }
            if (!partition_ready(op, op->part)) return moved;
            if (op->device) device_issue_in(op, op->part);
            op->phase = op->device ? P_DEVICE_IN : P_STEP;
            if (op->phase == P_STEP) goto begin_step;
            moved = 1;
            continue;
        case P_DEVICE_IN:
            moved |= device_poll(op);
            if (!device_in_done(op, op->part)) return moved;
            op->phase = P_STEP;
        begin_step:
            build_step(op, op->part);
            if (use_shm(op)) shm_step_begin(op);
            else mpi_step_begin(op);
            moved = 1;
            continue;
        case P_STEP:
            if (op->device) moved |= device_poll(op);
            if (!(use_shm(op) ? shm_step_progress(op) : mpi_step_progress(op))) return moved;
            if (op->device) device_issue_out(op, op->part); /* done when it lands: device_poll */
            else __atomic_store_n(&op->part_done[op->part], 1, __ATOMIC_RELEASE);
            op->part++;
            op->phase = P_WAIT_READY;
            moved = 1;
            continue;
        default:
            return moved;
        }
    }
}

/* Advances c's operations in order while they move; 1 when anything did.  A send or a
 * receive leaves the queue as soon as its MPI calls are posted (posting keeps MPI's
 * matching order) and completes on the side: two ranks that each start a send before their
 * receive must not wait for a send that needs the other's receive. */
static int drive(engine_comm *c)
{
    if (pthread_mutex_trylock(&c->drive)) return 0;
    int moved = 0;
    for (;;) {
        engine_op *op = __atomic_load_n(&c->head, __ATOMIC_ACQUIRE);
        if (!op) break;
        moved |= op_progress(op);
        int p2p = op->a.kind == ENGINE_SEND || op->a.kind == ENGINE_RECV;
        if (op->phase != P_DONE && !(p2p && op->phase == P_STEP)) break;
        pthread_mutex_lock(&c->lock);
        engine_op *next = op->next;
        __atomic_store_n(&c->head, next, __ATOMIC_RELEASE);
        if (!next) c->tail = NULL;
        pthread_mutex_unlock(&c->lock);
        if (op->phase == P_DONE) {
            op_release(op);
        } else { /* posted: completes on the side */
            op->next = c->detached;
            __atomic_store_n(&c->detached, op, __ATOMIC_RELEASE);
            moved = 1;
        }
    }
    for (engine_op **link = &c->detached; *link;) {
        engine_op *op = *link;
        moved |= op_progress(op);
        if (op->phase != P_DONE) {
            link = &op->next;
            continue;
        }
        __atomic_store_n(link, op->next, __ATOMIC_RELEASE);
        op_release(op);
    }
    pthread_mutex_unlock(&c->drive);
    return moved;
}

static void op_release(engine_op *op)
{
    if (__atomic_sub_fetch(&op->refs, 1, __ATOMIC_ACQ_REL) > 0) return;
    device_release(op);
    free(op->counts);
    free(op->displs);
    free(op->step_counts);
    free(op->step_displs);
    free(op->ready);
    free(op->ready_event);
    free(op->part_done);
    free(op);
}

void engine_op_free(engine_op *op)
{
    if (op) op_release(op);
}

int engine_test(engine_op *op)
{
    if (__atomic_load_n(&op->done, __ATOMIC_ACQUIRE)) return ENGINE_OK;
    drive(op->c);
    return __atomic_load_n(&op->done, __ATOMIC_ACQUIRE) ? ENGINE_OK : ENGINE_PENDING;
}

static int partition_done(engine_op *op, int i);

int engine_test_partition(engine_op *op, int i)
{
    if (partition_done(op, i)) return 1;
    drive(op->c);
    return partition_done(op, i);
}

static int partition_done(engine_op *op, int i)
{
    return i < 0 || i >= op->parts ? __atomic_load_n(&op->done, __ATOMIC_ACQUIRE)
                                   : __atomic_load_n(&op->part_done[i], __ATOMIC_ACQUIRE);
}

int engine_wait_partition(engine_op *op, int i, int64_t timeout_ns)
{
    uint64_t deadline = timeout_ns >= 0 ? now_ns() + (uint64_t)timeout_ns : UINT64_MAX;
    for (int idle = 0;;) {
        if (partition_done(op, i)) return ENGINE_OK;
        /* the caller moves the operations too: no hand-off to the engine's thread needed */
        idle = drive(op->c) ? 0 : idle + 1;
        if (partition_done(op, i)) return ENGINE_OK;
        if (idle > 64 && now_ns() > deadline) return ENGINE_ERR_TIMEOUT;
        backoff(idle);
    }
}

int engine_wait(engine_op *op, int64_t timeout_ns) { return engine_wait_partition(op, -1, timeout_ns); }

int engine_wait_passive(engine_op *op, int64_t timeout_ns)
{
    if (__atomic_load_n(&op->done, __ATOMIC_ACQUIRE)) return ENGINE_OK;
    if (__atomic_load_n(&engine.started, __ATOMIC_ACQUIRE) != 1) return engine_wait(op, timeout_ns);
    uint64_t deadline = timeout_ns >= 0 ? now_ns() + (uint64_t)timeout_ns : UINT64_MAX;
    engine_wake();
    pthread_mutex_lock(&engine.done_lock);
    __atomic_add_fetch(&engine.sleepers, 1, __ATOMIC_SEQ_CST);
    int rc = ENGINE_OK;
    while (!__atomic_load_n(&op->done, __ATOMIC_SEQ_CST)) {
        if (__atomic_load_n(&engine.started, __ATOMIC_ACQUIRE) != 1) { /* the thread stopped */
            __atomic_sub_fetch(&engine.sleepers, 1, __ATOMIC_ACQ_REL);
            pthread_mutex_unlock(&engine.done_lock);
            return engine_wait(op, timeout_ns);
        }
        if (now_ns() > deadline) {
            rc = ENGINE_ERR_TIMEOUT;
            break;
        }
        /* slices of 10 ms: the wake-up is finish()'s broadcast; the slice only bounds a
         * deadline's overshoot */
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_nsec += 10 * 1000 * 1000;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&engine.done, &engine.done_lock, &until);
    }
    __atomic_sub_fetch(&engine.sleepers, 1, __ATOMIC_ACQ_REL);
    pthread_mutex_unlock(&engine.done_lock);
    return rc;
}

int engine_source(engine_op *op) { return op->mpi.source; }

int engine_status(engine_op *op, char *msg, size_t len)
{
    if (!__atomic_load_n(&op->done, __ATOMIC_ACQUIRE)) return ENGINE_PENDING;
    if (msg && len) snprintf(msg, len, "%s", op->message);
    return op->status;
}
