/* The ring all-reduce: pipelined reduce-scatter + all-gather over k connections per
 * neighbour, worked in a scratch copy and committed (or rolled back) by the
 * coordinator's verdict. */
#define _GNU_SOURCE
#include "peer.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

struct piece { uint8_t *p; size_t len; };
struct stream { int fd; uint64_t item, items, per_step; size_t off; uint8_t header[CHUNK_HEADER]; };

struct plan {
    int n, r, k, dtype, op;
    uint64_t count, chunks, chunk_elems;
    size_t esize;
    uint32_t seq;
};

static int send_segment(const struct plan *pl, int s) { return s < pl->n - 1 ? ((pl->r - s) % pl->n + pl->n) % pl->n : ((pl->r + 1 - (s - (pl->n - 1))) % pl->n + pl->n) % pl->n; }
static int recv_segment(const struct plan *pl, int s) { return s < pl->n - 1 ? ((pl->r - s - 1) % pl->n + 2 * pl->n) % pl->n : ((pl->r - (s - (pl->n - 1))) % pl->n + pl->n) % pl->n; }

static void chunk_span(const struct plan *pl, int segment, uint64_t chunk, uint64_t *first, uint64_t *count)
{
    uint64_t start = pl->count * (uint64_t)segment / (uint64_t)pl->n, end = pl->count * (uint64_t)(segment + 1) / (uint64_t)pl->n;
    uint64_t lo = start + chunk * pl->chunk_elems, hi = lo + pl->chunk_elems;
    if (lo > end) lo = end;
    if (hi > end) hi = end;
    *first = lo;
    *count = hi - lo;
}

static void item_of(const struct plan *pl, int conn, const struct stream *st, int *step, uint64_t *chunk)
{
    *step = (int)(st->item / st->per_step);
    *chunk = (uint64_t)conn + (st->item % st->per_step) * (uint64_t)pl->k;
}

/* Payload bytes of cnt quantized codes: one per byte (uint8), two per byte (uint4). */
static size_t qbytes(int quant, uint64_t cnt) { return quant == 2 ? (size_t)(cnt + 1) / 2 : (size_t)cnt; }

static void put_header(uint8_t *h, uint32_t seq, int step, uint64_t chunk, uint32_t nbytes)
{
    struct el_buf b = {.p = h, .cap = CHUNK_HEADER};
    el_put_u32(&b, seq);
    el_put_u32(&b, (uint32_t)step);
    el_put_u32(&b, (uint32_t)chunk);
    el_put_u32(&b, nbytes);
}

/* One all-reduce in flight: what its lanes share.  Chunk c always travels on connection
 * c % k (item_of), in both directions and at every step, so connection j's chunks, its
 * receive buffer and its quantization staging belong to j alone: a lane (a thread with a
 * range of connections) never touches another's.  Only the first failure is kept. */
struct ring_run {
    el_peer *p;
    struct plan pl;
    uint8_t *data;
    const uint8_t *user;
    int quant;
    int64_t deadline, inactivity;
    uint32_t *recv_steps; /* per chunk: steps received (read and written by its lane only) */
    int64_t latency_ns;   /* COMMLIB_ELASTIC_LATENCY_MS (0: none) */
    int64_t *ready_ns;    /* with a latency: [chunk][step] when it became ready to send (its lane's) */
    uint8_t *qsend, *qrecv, *qall;
    float *qparams;
    size_t qchunk;
    struct stream out[16], in[16];
    pthread_mutex_t lock;
    int rc, stop;
};

struct lane { struct ring_run *run; int j0, j1; pthread_t thread; };

/* Records the run's first failure (p->err) and stops every lane; returns rc. */
static int lane_fail(struct ring_run *run, int rc, const char *fmt, ...)
{
    char msg[sizeof run->p->err];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&run->lock);
    if (run->rc == EL_OK) {
        run->rc = rc;
        snprintf(run->p->err, sizeof run->p->err, "%s", msg);
    }
    __atomic_store_n(&run->stop, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&run->lock);
    return rc;
}

/* Moves the chunks of connections [j0, j1): sends what is ready, receives what has
 * arrived (reducing during the reduce-scatter), sleeps in poll when nothing moves. */
static int ring_lane(struct ring_run *run, int j0, int j1)
{
    el_peer *p = run->p;
    const struct plan *pl = &run->pl;
    uint8_t *data = run->data;
    const uint8_t *user = run->user;
    int quant = run->quant, dtype = pl->dtype, op = pl->op, steps = 2 * (pl->n - 1);
    size_t qchunk = run->qchunk;
    struct el_throttle *tr = el_paced(p);
    int64_t last_progress = el_now_ms();
    struct pollfd fds[33];
    for (;;) {
        if (__atomic_load_n(&run->stop, __ATOMIC_ACQUIRE)) return EL_ERR_PEER_FAILURE; /* another lane failed */
        int busy = 0, nf = 0, progressed = 0;
        int64_t now_ns = el_now_ns(), wake_ns = INT64_MAX; /* wake_ns: when the first held chunk may go */
        /* Send whatever is ready on each outgoing connection. */
        for (int j = j0; j < j1; j++) {
            struct stream *st = &run->out[j];
            int held = 0;
            while (st->item < st->items) {
                int s;
                uint64_t c, first, cnt;
                item_of(pl, j, st, &s, &c);
                if (s > 0 && run->recv_steps[c] < (uint32_t)s) break;
                int g = send_segment(pl, s);
                chunk_span(pl, g, c, &first, &cnt);
                const uint8_t *src = (s == 0 ? user : data) + first * pl->esize;
                size_t nbytes = quant ? QPARAMS + qbytes(quant, cnt) : cnt * pl->esize;
                /* Slow-link model: the chunk waits out the latency, then the rate's tokens. */
                size_t allow = CHUNK_HEADER + nbytes - st->off;
                if (st->off == 0 && run->latency_ns && now_ns < run->ready_ns[c * (uint64_t)(steps + 1) + (uint64_t)s] + run->latency_ns) {
                    int64_t at = run->ready_ns[c * (uint64_t)(steps + 1) + (uint64_t)s] + run->latency_ns;
                    if (at < wake_ns) wake_ns = at;
                    held = 1;
                    break;
                }
                if (tr) {
                    int64_t wait_ns = 0;
                    allow = el_throttle_take(tr, allow, &wait_ns);
                    if (!allow) {
                        if (now_ns + wait_ns < wake_ns) wake_ns = now_ns + wait_ns;
                        held = 1;
                        break;
                    }
                }
                /* The payload is one or two pieces: the dtype's bytes; or, quantized, the
                 * staged (params, codes) of this hop, or the stored ones the all-gather
                 * forwards (uint4: packed two per byte into the staging first). */
                struct piece pc[2] = {{(uint8_t *)src, cnt * pl->esize}, {NULL, 0}};
                uint8_t *q = run->qsend + (size_t)j * qchunk;
                if (quant && s < pl->n - 1) {
                    if (st->off == 0) {
                        el_quantize(src, cnt, dtype, quant == 2 ? 15 : 255, (float *)q, q + QPARAMS);
                        if (quant == 2) el_pack4(q + QPARAMS, cnt, q + QPARAMS);
                    }
                    pc[0] = (struct piece){q, QPARAMS + qbytes(quant, cnt)};
                } else if (quant) {
                    pc[0] = (struct piece){(uint8_t *)(run->qparams + 2 * ((uint64_t)g * pl->chunks + c)), QPARAMS};
                    pc[1] = (struct piece){run->qall + first, cnt};
                    if (quant == 2) {
                        if (st->off == 0) el_pack4(run->qall + first, cnt, q);
                        pc[1] = (struct piece){q, qbytes(quant, cnt)};
                    }
                }
                if (st->off == 0) put_header(st->header, pl->seq, s, c, (uint32_t)nbytes);
                struct iovec iov[3];
                int niov = 0;
                if (st->off < CHUNK_HEADER) iov[niov++] = (struct iovec){st->header + st->off, CHUNK_HEADER - st->off};
                size_t poff = st->off > CHUNK_HEADER ? st->off - CHUNK_HEADER : 0;
                for (int i = 0; i < 2; i++) {
                    if (poff < pc[i].len) iov[niov++] = (struct iovec){pc[i].p + poff, pc[i].len - poff};
                    poff = poff > pc[i].len ? poff - pc[i].len : 0;
                }
                /* Paced: no more than the tokens taken; the rest go back. */
                size_t room = allow;
                for (int i = 0; i < niov; i++) {
                    if (iov[i].iov_len > room) iov[i].iov_len = room;
                    room -= iov[i].iov_len;
                }
                struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)niov};
                ssize_t sent = niov ? sendmsg(st->fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT) : 0;
                if (tr) el_throttle_return(tr, allow - (sent > 0 ? (size_t)sent : 0));
                if (sent > 0) el_count_sent(p, (uint64_t)sent);
                if (sent < 0) {
                    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) break;
                    return lane_fail(run, EL_ERR_PEER_FAILURE, "the connection to the next peer (rank %d) broke: %s",
                                     (pl->r + 1) % pl->n, strerror(errno));
                }
                st->off += (size_t)sent;
                progressed |= sent > 0;
                if (st->off < CHUNK_HEADER + nbytes) continue;
                st->off = 0;
                st->item++;
            }
            if (st->item < st->items) {
                busy = 1;
                int s;
                uint64_t c;
                item_of(pl, j, st, &s, &c);
                /* A held chunk waits for its time (wake_ns), not for the socket. */
                if ((s == 0 || run->recv_steps[c] >= (uint32_t)s) && !held)
                    fds[nf++] = (struct pollfd){.fd = st->fd, .events = POLLOUT};
            }
        }
        /* Receive what has arrived, reducing during the reduce-scatter. */
        for (int j = j0; j < j1; j++) {
            struct stream *st = &run->in[j];
            while (st->item < st->items) {
                int s;
                uint64_t c, first, cnt;
                item_of(pl, j, st, &s, &c);
                int g = recv_segment(pl, s);
                chunk_span(pl, g, c, &first, &cnt);
                int reducing = s < pl->n - 1;
                uint8_t *tmp = p->tmp + (size_t)j * pl->chunk_elems * pl->esize;
                struct piece pc[2] = {{reducing ? tmp : data + first * pl->esize, cnt * pl->esize}, {NULL, 0}};
                uint8_t *qr = run->qrecv + (size_t)j * qchunk;
                if (quant && reducing) pc[0] = (struct piece){qr, QPARAMS + qbytes(quant, cnt)};
                else if (quant) {
                    pc[0] = (struct piece){(uint8_t *)(run->qparams + 2 * ((uint64_t)g * pl->chunks + c)), QPARAMS};
                    pc[1] = (struct piece){quant == 2 ? qr : run->qall + first, qbytes(quant, cnt)};
                }
                size_t nbytes = pc[0].len + pc[1].len;
                ssize_t got = 0;
                if (st->off < CHUNK_HEADER) got = recv(st->fd, st->header + st->off, CHUNK_HEADER - st->off, MSG_DONTWAIT);
                else {
                    size_t poff = st->off - CHUNK_HEADER;
                    int i = poff < pc[0].len ? 0 : 1;
                    if (i == 1) poff -= pc[0].len;
                    if (poff < pc[i].len) got = recv(st->fd, pc[i].p + poff, pc[i].len - poff, MSG_DONTWAIT);
                }
                if (got == 0 && (st->off < CHUNK_HEADER || nbytes))
                    return lane_fail(run, EL_ERR_PEER_FAILURE, "the previous peer (rank %d) closed its connection",
                                     (pl->r + pl->n - 1) % pl->n);
                if (got < 0) {
                    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) break;
                    return lane_fail(run, EL_ERR_PEER_FAILURE, "the connection from the previous peer broke: %s", strerror(errno));
                }
                st->off += (size_t)got;
                progressed |= got > 0;
                if (got > 0) el_count_received(p, (uint64_t)got);
                if (st->off == CHUNK_HEADER && got > 0) {
                    uint8_t want[CHUNK_HEADER];
                    put_header(want, pl->seq, s, c, (uint32_t)nbytes);
                    if (memcmp(want, st->header, CHUNK_HEADER))
                        return lane_fail(run, EL_ERR_PEER_FAILURE,
                                         "the previous peer sent an unexpected chunk (operations out of step?)");
                }
                if (st->off < CHUNK_HEADER + nbytes) continue;
                uint8_t *mine = data + first * pl->esize;
                if (reducing) {
                    if (quant == 2) el_dequantize4(pc[0].p + QPARAMS, cnt, (const float *)pc[0].p, dtype, tmp);
                    else if (quant) el_dequantize(pc[0].p + QPARAMS, cnt, (const float *)pc[0].p, dtype, tmp);
                    memcpy(mine, user + first * pl->esize, cnt * pl->esize); /* its first touch */
                    el_reduce(mine, tmp, cnt, dtype, op);
                    if (s == pl->n - 2 && op == EL_AVG) el_finish_avg(mine, cnt, dtype, (uint64_t)pl->n);
                    if (s == pl->n - 2 && quant) {
                        /* The owner quantizes its finished chunk once and keeps what the
                         * others will decode, so every peer ends with the same bytes. */
                        float *prm = run->qparams + 2 * ((uint64_t)g * pl->chunks + c);
                        el_quantize(mine, cnt, dtype, quant == 2 ? 15 : 255, prm, run->qall + first);
                        el_dequantize(run->qall + first, cnt, prm, dtype, mine);
                    }
                } else if (quant) {
                    if (quant == 2) el_unpack4(qr, cnt, run->qall + first);
                    el_dequantize(run->qall + first, cnt, (const float *)pc[0].p, dtype, mine);
                }
                run->recv_steps[c]++;
                /* Step s + 1 of chunk c may go from now on (after the latency, if modelled). */
                if (run->ready_ns) run->ready_ns[c * (uint64_t)(steps + 1) + (uint64_t)s + 1] = el_now_ns();
                st->off = 0;
                st->item++;
            }
            if (st->item < st->items) {
                busy = 1;
                fds[nf++] = (struct pollfd){.fd = st->fd, .events = POLLIN};
            }
        }
        if (!busy) return EL_OK;
        int64_t now = el_now_ms();
        if (progressed) last_progress = now;
        if (progressed) continue; /* try again before sleeping: more may be ready */
        if (epoch_aborted(p)) return lane_fail(run, EL_ERR_PEER_FAILURE, "the operation was aborted: a peer failed");
        if (now - last_progress > run->inactivity)
            return lane_fail(run, EL_ERR_PEER_FAILURE, "no data moved for %.1f s (a neighbour is stuck)",
                             run->inactivity / 1000.0);
        if (run->deadline > 0 && now > run->deadline) return lane_fail(run, EL_ERR_TIMEOUT, "all_reduce timed out");
        fds[nf++] = (struct pollfd){.fd = p->abort_pipe[0], .events = POLLIN};
        int wait_ms = 100;
        if (wake_ns < INT64_MAX) {
            int64_t until = (wake_ns - el_now_ns() + 999999) / 1000000; /* rounded up: never early */
            wait_ms = until < 0 ? 0 : until < wait_ms ? (int)until : wait_ms;
        }
        int r = poll(fds, (nfds_t)nf, wait_ms);
        if (r < 0 && errno != EINTR) return lane_fail(run, EL_ERR_SYSTEM, "poll: %s", strerror(errno));
        if (fds[nf - 1].revents & POLLIN) {
            /* A stale abort (an older epoch's) only wakes us; a current one ends the op. */
            pthread_mutex_lock(&p->lock);
            int real = p->aborted_epoch >= p->epoch || p->lost;
            if (!real) drain(p->abort_pipe[0]);
            pthread_mutex_unlock(&p->lock);
            if (real) return lane_fail(run, EL_ERR_PEER_FAILURE, "the operation was aborted: a peer failed");
        }
    }
}

static void *lane_main(void *arg)
{
    struct lane *l = arg;
    ring_lane(l->run, l->j0, l->j1);
    return NULL;
}

/* data: the scratch the result forms in; user: the caller's buffer, only read.  The first
 * step sends straight from the user's buffer and each chunk is copied into the scratch
 * just before its first reduction, while it is hot in cache: no whole-buffer copy up
 * front (every segment of the scratch is written before it is read or committed).
 * With enough bytes per connection, each connection gets a thread of its own (a lane):
 * on loopback and fast links the copies into and out of the kernel and the reduction are
 * CPU work, and one thread for all k connections would cap the striping at one core. */
#define LANE_MIN_BYTES (256u << 10)
static int ring_allreduce(el_peer *p, uint8_t *data, const uint8_t *user, uint64_t count, int dtype, int op, int quant,
                          int64_t deadline)
{
    struct ring_run *run = calloc(1, sizeof *run);
    if (!run) return fail(p, EL_ERR_SYSTEM, "out of memory");
    struct plan *pl = &run->pl;
    *pl = (struct plan){.n = p->world, .r = p->rank, .k = p->k, .dtype = dtype, .op = op, .count = count,
                        .esize = el_dtype_size(dtype), .seq = (uint32_t)p->seq};
    uint64_t max_segment = (count + (uint64_t)pl->n - 1) / (uint64_t)pl->n;
    uint64_t chunk_limit = p->chunk_bytes / pl->esize ? p->chunk_bytes / pl->esize : 1;
    pl->chunks = (max_segment + chunk_limit - 1) / chunk_limit;
    /* Stripe over the k connections once there is enough to share: below 16 KiB a chunk
     * costs more in system calls than a second connection gains. */
    uint64_t worth = max_segment * pl->esize / (16u << 10);
    if (pl->chunks < (uint64_t)pl->k && worth > pl->chunks) pl->chunks = worth < (uint64_t)pl->k ? worth : (uint64_t)pl->k;
    if (pl->chunks == 0) pl->chunks = 1;
    pl->chunk_elems = (max_segment + pl->chunks - 1) / pl->chunks;
    if (pl->chunk_elems == 0) pl->chunk_elems = 1;
    int steps = 2 * (pl->n - 1), k = pl->k;
    /* Receive buffers: k chunks of the dtype; quantized, also k staged chunks each way,
     * the quantized bytes of the whole buffer (the all-gather forwards them unchanged)
     * and the (min, scale) pair of every segment's chunk. */
    size_t qchunk = (QPARAMS + pl->chunk_elems + 7) & ~(size_t)7; /* each staged chunk starts with aligned floats */
    size_t tmp_need = (size_t)k * pl->chunk_elems * pl->esize;
    if (quant) tmp_need += 2 * (size_t)k * qchunk + count + (size_t)pl->n * pl->chunks * QPARAMS + 64;
    if (p->tmp_cap < tmp_need) {
        free(p->tmp);
        p->tmp = malloc(tmp_need);
        p->tmp_cap = p->tmp ? tmp_need : 0;
        if (!p->tmp) {
            free(run);
            return fail(p, EL_ERR_SYSTEM, "out of memory for %zu bytes of receive buffers", tmp_need);
        }
    }
    run->p = p;
    run->data = data;
    run->user = user;
    run->quant = quant;
    run->deadline = deadline;
    /* A modelled latency holds the neighbour's chunks back that long: not silence. */
    run->latency_ns = el_latency_ns(p);
    run->inactivity = 2 * (int64_t)p->timeout_ms + run->latency_ns / 1000000;
    run->qchunk = qchunk;
    run->qsend = p->tmp + (size_t)k * pl->chunk_elems * pl->esize;
    run->qrecv = run->qsend + (size_t)k * qchunk;
    run->qall = run->qrecv + (size_t)k * qchunk;
    run->qparams = (float *)(((uintptr_t)(run->qall + count) + 7) & ~(uintptr_t)7);
    run->recv_steps = calloc((size_t)pl->chunks, sizeof *run->recv_steps);
    if (run->latency_ns) {
        run->ready_ns = malloc((size_t)pl->chunks * (size_t)(steps + 1) * sizeof *run->ready_ns);
        if (run->ready_ns) {
            int64_t start = el_now_ns(); /* the first step's chunks are ready now */
            for (size_t i = 0; i < (size_t)pl->chunks * (size_t)(steps + 1); i++) run->ready_ns[i] = start;
        }
    }
    pthread_mutex_init(&run->lock, NULL);
    if (!run->recv_steps || (run->latency_ns && !run->ready_ns)) {
        free(run->recv_steps);
        free(run->ready_ns);
        free(run);
        return fail(p, EL_ERR_SYSTEM, "out of memory");
    }
    for (int j = 0; j < k; j++) {
        uint64_t per = (uint64_t)j < pl->chunks ? (pl->chunks - (uint64_t)j + (uint64_t)k - 1) / (uint64_t)k : 0;
        run->out[j] = (struct stream){.fd = p->to_next[j], .per_step = per, .items = per * (uint64_t)steps};
        run->in[j] = (struct stream){.fd = p->from_prev[j], .per_step = per, .items = per * (uint64_t)steps};
    }
    /* Lanes: the connections that carry chunks, one thread each when every one carries
     * LANE_MIN_BYTES or more.  Threads take connections 0, 1, ...; the calling thread
     * takes the last one - and the rest, if a thread cannot be started. */
    int used = pl->chunks < (uint64_t)k ? (int)pl->chunks : k;
    int threads = max_segment * pl->esize / (uint64_t)used >= LANE_MIN_BYTES ? used - 1 : 0;
    struct lane lanes[16];
    int started = 0;
    while (started < threads) {
        lanes[started] = (struct lane){.run = run, .j0 = started, .j1 = started + 1};
        if (pthread_create(&lanes[started].thread, NULL, lane_main, &lanes[started]) != 0) break;
        started++;
    }
    ring_lane(run, started, used);
    for (int i = 0; i < started; i++) pthread_join(lanes[i].thread, NULL);
    int rc = run->rc;
    pthread_mutex_destroy(&run->lock);
    free(run->recv_steps);
    free(run->ready_ns);
    free(run);
    return rc;
}

/* The coordinator's verdict; its liveness (heartbeats) bounds the wait, not the caller:
 * giving up early could leave this peer rolled back while the others commit. */
static int wait_verdict(el_peer *p, uint64_t seq)
{
    pthread_mutex_lock(&p->lock);
    int rc;
    for (;;) {
        if (p->commit_epoch == p->epoch && p->committed[seq % COMMIT_SLOTS] == seq) { rc = EL_OK; break; }
        if (p->aborted_epoch >= p->epoch) { rc = EL_ERR_PEER_FAILURE; break; }
        if (p->lost) { rc = EL_ERR_COORDINATOR; break; }
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 100 * 1000000;
        if (ts.tv_nsec >= 1000000000) { ts.tv_sec++; ts.tv_nsec -= 1000000000; }
        pthread_cond_timedwait(&p->cond, &p->lock, &ts);
    }
    pthread_mutex_unlock(&p->lock);
    return rc;
}

EL_API int el_peer_allreduce(el_peer *p, void *buf, uint64_t count, int dtype, int op, int timeout_ms)
{
    return el_peer_allreduce_ex(p, buf, count, dtype, op, 0, timeout_ms);
}

EL_API int el_peer_allreduce_ex(el_peer *p, void *buf, uint64_t count, int dtype, int op, int quantize, int timeout_ms)
{
    size_t esize = el_dtype_size(dtype);
    if (!esize || op < 0 || op >= EL_NOPS || (count && !buf)) return fail(p, EL_ERR_ARG, "invalid dtype, op or buffer");
    if (quantize < 0 || quantize > 2) return fail(p, EL_ERR_ARG, "quantize is 0 (off), 1 (uint8) or 2 (uint4), not %d", quantize);
    if (quantize && (dtype > EL_F64 || (op != EL_SUM && op != EL_AVG)))
        return fail(p, EL_ERR_ARG, "quantized transfer takes float dtypes with sum or avg");
    if (p->lost) return fail(p, EL_ERR_COORDINATOR, "coordinator lost: %s", p->lost_why);
    if (p->epoch < 0) return fail(p, EL_ERR_NOT_MEMBER, "this peer is not a member yet: call update_topology first");
    uint64_t seq = ++p->seq;
    if (count == 0) return EL_OK;
    if (epoch_aborted(p))
        return fail(p, EL_ERR_PEER_FAILURE, "a peer failed in epoch %lld: call update_topology, then retry (the buffer is unchanged)",
                    (long long)p->epoch);
    size_t bytes = (size_t)count * esize;
    if (p->scratch_cap < bytes) {
        free(p->scratch);
        p->scratch = malloc(bytes);
        p->scratch_cap = p->scratch ? bytes : 0;
        if (!p->scratch) return fail(p, EL_ERR_SYSTEM, "out of memory for a %zu-byte scratch copy", bytes);
    }
    int local = EL_OK;
    if (!p->ring_ok) local = fail(p, EL_ERR_PEER_FAILURE, "the ring of epoch %lld could not be built", (long long)p->epoch);
    else if (p->world > 1) local = ring_allreduce(p, p->scratch, buf, count, dtype, op, quantize, timeout_ms > 0 ? el_now_ms() + timeout_ms : 0);
    char local_err[512];
    snprintf(local_err, sizeof local_err, "%s", local ? p->err : "");
    uint8_t done[20];
    struct el_buf b = {.p = done, .cap = sizeof done};
    el_put_u64(&b, (uint64_t)p->epoch);
    el_put_u64(&b, seq);
    el_put_u32(&b, local == EL_OK);
    /* The report and the mark a RESUME carries change together (send_lock): after a
     * failover the new coordinator learns this report exactly once. */
    pthread_mutex_lock(&p->send_lock);
    p->op_seq = seq;
    p->op_state = local == EL_OK ? 1 : 2;
    int sent = el_send_frame(p->coord_fd, F_OP_DONE, done, sizeof done, el_now_ms() + p->timeout_ms);
    pthread_mutex_unlock(&p->send_lock);
    if (send_failed(p, sent)) {
        mark_lost(p, "the connection to the coordinator broke");
        return fail(p, EL_ERR_COORDINATOR, "coordinator lost while reporting all_reduce (the buffer is unchanged)");
    }
    int verdict = wait_verdict(p, seq);
    if (verdict == EL_OK) {
        if (p->world > 1) memcpy(buf, p->scratch, bytes); /* alone, the result is the input */
        return EL_OK;
    }
    if (verdict == EL_ERR_COORDINATOR)
        return fail(p, EL_ERR_COORDINATOR, "coordinator lost during all_reduce: %s (the buffer is unchanged)", p->lost_why);
    return fail(p, local == EL_ERR_TIMEOUT ? EL_ERR_TIMEOUT : EL_ERR_PEER_FAILURE,
                "all_reduce failed in epoch %lld%s%s; the buffer is unchanged: call update_topology and retry",
                (long long)p->epoch, local ? ": " : " (another peer failed)", local_err);
}
