/* sync_state: hashes to the coordinator, its plan (serve, or fetch from rank R), the
 * striped state transfer, the result. */
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

static void hash_array(const void *ptr, uint64_t size, const uint8_t *desc, uint32_t desc_len, uint8_t out[EL_HASH])
{
    struct el_blake2b s;
    uint8_t b[8];
    el_blake2b_init(&s, EL_HASH, NULL, 0);
    for (int i = 0; i < 4; i++) b[i] = (uint8_t)(desc_len >> (8 * i));
    el_blake2b_update(&s, b, 4);
    el_blake2b_update(&s, desc, desc_len);
    for (int i = 0; i < 8; i++) b[i] = (uint8_t)(size >> (8 * i));
    el_blake2b_update(&s, b, 8);
    el_blake2b_update(&s, ptr, size);
    el_blake2b_final(&s, out);
}

/* ---- state transfer: the fetcher stripes the arrays it lacks over k connections to
 * one up-to-date peer (a thread per connection); that peer serves every connection on a
 * thread of its own until the coordinator announces the result. ---- */

#define STATE_STRIPE_MIN (1u << 20) /* a piece of an array worth a connection of its own */

/* Serves one authenticated fetch connection until the fetcher says it is done (index
 * 0xffffffff): each request names (array, offset, length) and gets a status byte, then
 * the bytes. */
static int serve_one(el_peer *p, int fd, int n, void *const *ptrs, const uint64_t *sizes)
{
    for (;;) {
        uint8_t q[20];
        if (el_read_all(fd, q, sizeof q, el_now_ms() + 2 * (int64_t)p->timeout_ms, p->abort_pipe[0])) return EL_ERR_PEER_FAILURE;
        struct el_reader r = {.p = q, .len = sizeof q};
        uint32_t index = el_get_u32(&r);
        uint64_t off = el_get_u64(&r), len = el_get_u64(&r);
        if (index == 0xffffffffu) return EL_OK;
        uint8_t status = index < (uint32_t)n && off <= sizes[index] && len <= sizes[index] - off;
        /* A modelled link latency: each answer (one round trip per range) comes that late. */
        if (el_pause(el_latency_ns(p), p->abort_pipe[0])) return EL_ERR_PEER_FAILURE;
        if (el_paced_write(p, fd, &status, 1, p->timeout_ms, -1) || !status) return EL_ERR_PEER_FAILURE;
        /* A moving deadline: big arrays take as long as they take while bytes flow (paced
         * by COMMLIB_ELASTIC_RATE_MBIT, if set). */
        if (el_paced_write(p, fd, (const uint8_t *)ptrs[index] + off, (size_t)len, 2 * p->timeout_ms, p->abort_pipe[0]))
            return EL_ERR_PEER_FAILURE;
    }
}

struct server { el_peer *p; int fd, n; void *const *ptrs; const uint64_t *sizes; pthread_t thread; };

static void *server_main(void *arg)
{
    struct server *s = arg;
    serve_one(s->p, s->fd, s->n, s->ptrs, s->sizes);
    close(s->fd);
    return NULL;
}

struct fetch_range { uint32_t array; uint64_t off, len; };

struct fetch_lane {
    el_peer *p;
    int source, index, nranges, rc;
    const struct fetch_range *ranges;
    void *const *ptrs;
    const uint64_t *sizes;
    char err[256];
    pthread_t thread;
};

static int lane_error(struct fetch_lane *l, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(l->err, sizeof l->err, fmt, ap);
    va_end(ap);
    return l->rc = rc;
}

/* One connection of a fetch: its ranges, in order, then the end marker. */
static int fetch_lane_run(struct fetch_lane *l)
{
    el_peer *p = l->p;
    int source = l->source;
    int64_t deadline = el_now_ms() + 2 * (int64_t)p->timeout_ms;
    int fd;
    uint8_t sent[INTENT_LEN];
    const struct ring_member *from = &p->ring[source];
    if (data_connect(p, from, 1, (uint32_t)l->index, deadline, &fd))
        return lane_error(l, EL_ERR_PEER_FAILURE, "cannot reach rank %d for the state", source);
    intent(sent, 1, p->epoch, p->id, from->id, (uint32_t)l->index);
    uint8_t ok = 0;
    if (data_mac_send(p, fd, sent, deadline) || el_read_all(fd, &ok, 1, deadline, -1) || ok != 1) {
        close(fd);
        return lane_error(l, EL_ERR_PEER_FAILURE, "rank %d did not accept the state fetch", source);
    }
    for (int q = 0; q < l->nranges && l->rc == EL_OK; q++) {
        const struct fetch_range *g = &l->ranges[q];
        uint8_t req[20];
        struct el_buf b = {.p = req, .cap = sizeof req};
        el_put_u32(&b, g->array);
        el_put_u64(&b, g->off);
        el_put_u64(&b, g->len);
        uint8_t status = 0;
        /* The answer may be a modelled latency late: that is not silence. */
        if (el_paced_write(p, fd, req, sizeof req, p->timeout_ms, -1) ||
            el_idle_read(p, fd, &status, 1, 2 * p->timeout_ms + (int)(el_latency_ns(p) / 1000000), p->abort_pipe[0])) {
            lane_error(l, EL_ERR_PEER_FAILURE, "rank %d failed while sending the state", source);
            break;
        }
        if (!status) {
            lane_error(l, EL_ERR_STATE, "rank %d refused array %u: its size differs from this peer's (%llu bytes)", source,
                       g->array, (unsigned long long)l->sizes[g->array]);
            break;
        }
        /* A moving deadline: a throttled source takes as long as it takes while bytes flow. */
        if (el_idle_read(p, fd, (uint8_t *)l->ptrs[g->array] + g->off, (size_t)g->len, 2 * p->timeout_ms, p->abort_pipe[0])) {
            lane_error(l, EL_ERR_PEER_FAILURE, "rank %d failed while sending the state", source);
            break;
        }
    }
    uint8_t end[20];
    memset(end, 0xff, 4);
    memset(end + 4, 0, 16);
    el_write_all(fd, end, sizeof end, el_now_ms() + p->timeout_ms, -1);
    close(fd);
    return l->rc;
}

static void *fetch_lane_main(void *arg)
{
    fetch_lane_run(arg);
    return NULL;
}

/* Fetches the arrays whose hash differs from the majority's (want) from rank `source`:
 * each array cut into up to k pieces of STATE_STRIPE_MIN or more, the pieces dealt over
 * k connections, then every fetched array's hash checked. */
static int fetch_from(el_peer *p, int source, int n, void *const *ptrs, const uint64_t *sizes, const uint8_t *mine,
                      const uint8_t *want, const uint8_t *const *descs, const uint32_t *desc_lens, uint64_t *fetched)
{
    int k = p->k;
    struct fetch_range *ranges = calloc((size_t)n * (size_t)k + 1, sizeof *ranges);
    struct fetch_range *dealt = calloc((size_t)n * (size_t)k + 1, sizeof *dealt);
    struct fetch_lane *lanes = calloc((size_t)k, sizeof *lanes);
    if (!ranges || !dealt || !lanes) {
        free(ranges), free(dealt), free(lanes);
        return fail(p, EL_ERR_SYSTEM, "out of memory");
    }
    int nranges = 0;
    for (int i = 0; i < n; i++) {
        if (!memcmp(mine + (size_t)i * EL_HASH, want + (size_t)i * EL_HASH, EL_HASH)) continue;
        uint64_t pieces = sizes[i] / STATE_STRIPE_MIN;
        if (pieces > (uint64_t)k) pieces = (uint64_t)k;
        if (pieces == 0) pieces = 1;
        for (uint64_t q = 0; q < pieces; q++) {
            uint64_t lo = sizes[i] * q / pieces, hi = sizes[i] * (q + 1) / pieces;
            ranges[nranges++] = (struct fetch_range){(uint32_t)i, lo, hi - lo};
        }
    }
    /* Deal the pieces round-robin; each connection's pieces kept together. */
    int used = nranges < k ? nranges : k, m = 0;
    for (int j = 0; j < used; j++) {
        lanes[j] = (struct fetch_lane){.p = p, .source = source, .index = j, .ranges = dealt + m, .ptrs = ptrs, .sizes = sizes};
        for (int q = j; q < nranges; q += used) dealt[m++] = ranges[q];
        lanes[j].nranges = (int)(dealt + m - lanes[j].ranges);
    }
    int started = 0;
    while (started + 1 < used && pthread_create(&lanes[started + 1].thread, NULL, fetch_lane_main, &lanes[started + 1]) == 0)
        started++;
    if (used) fetch_lane_run(&lanes[0]);
    for (int j = 1; j <= started; j++) pthread_join(lanes[j].thread, NULL);
    for (int j = started + 1; j < used; j++) fetch_lane_run(&lanes[j]); /* no thread to be had: one after another */
    int rc = EL_OK;
    for (int j = 0; j < used && rc == EL_OK; j++)
        if (lanes[j].rc) rc = fail(p, lanes[j].rc, "%s", lanes[j].err);
    for (int i = 0; i < n && rc == EL_OK; i++) {
        if (!memcmp(mine + (size_t)i * EL_HASH, want + (size_t)i * EL_HASH, EL_HASH)) continue;
        *fetched += sizes[i];
        uint8_t check[EL_HASH];
        hash_array(ptrs[i], sizes[i], descs[i], desc_lens[i], check);
        if (memcmp(check, want + (size_t)i * EL_HASH, EL_HASH))
            rc = fail(p, EL_ERR_STATE, "array %d does not match the majority's hash after the fetch (different name, dtype or shape?)", i);
    }
    free(ranges);
    free(dealt);
    free(lanes);
    return rc;
}

/* Up to date: serve fetchers (each connection on a thread) until the coordinator
 * announces the result; the servers are joined before the arrays go back to the caller. */
#define SERVERS_MAX 64
static struct mail *serve_until_result(el_peer *p, int n, void *const *ptrs, const uint64_t *sizes)
{
    struct server servers[SERVERS_MAX];
    int nservers = 0;
    struct mail *m = NULL;
    for (;;) {
        pthread_mutex_lock(&p->lock);
        m = take_mail(p, F_SYNC_RESULT, F_SYNC_RESULT);
        int lost = p->lost;
        if (!m) drain(p->mail_pipe[0]);
        pthread_mutex_unlock(&p->lock);
        if (m || lost) break;
        struct pollfd f[2] = {{.fd = p->listen_fd, .events = POLLIN}, {.fd = p->mail_pipe[0], .events = POLLIN}};
        if ((poll(f, 2, 200) <= 0 || !(f[0].revents & POLLIN)) && !p->npend) continue;
        int fd;
        uint64_t from;
        uint32_t index;
        uint8_t nonce[EL_NONCE], in[INTENT_LEN];
        if (data_accept(p, el_now_ms() + 200, 1, &fd, &from, &index, nonce, in)) continue;
        int member = 0;
        for (int i = 0; i < p->world; i++) member |= p->ring[i].id == from;
        if (!member || data_mac_check(p, fd, nonce, in, el_now_ms() + p->timeout_ms) != EL_OK) {
            close(fd);
            continue;
        }
        struct server *s = nservers < SERVERS_MAX ? &servers[nservers] : NULL;
        if (s) *s = (struct server){.p = p, .fd = fd, .n = n, .ptrs = ptrs, .sizes = sizes};
        if (s && pthread_create(&s->thread, NULL, server_main, s) == 0) {
            nservers++;
        } else { /* no thread to be had: serve it here */
            serve_one(p, fd, n, ptrs, sizes);
            close(fd);
        }
    }
    for (int i = 0; i < nservers; i++) pthread_join(servers[i].thread, NULL);
    drop_pending(p);
    return m;
}

/* A status the coordinator may send in a sync plan or result; anything else makes the
 * frame malformed (a stray number must not pass for, say, an invalid-argument error). */
static int known_status(int status)
{
    return status == EL_OK || status == EL_ERR_PEER_FAILURE || status == EL_ERR_STATE || status == EL_ERR_NOT_MEMBER;
}

static int sync_result(el_peer *p, struct mail *m, int64_t *synced_revision)
{
    if (!m) return fail(p, EL_ERR_COORDINATOR, "coordinator lost during sync_state: %s", p->lost_why);
    struct el_reader r = {.p = m->p, .len = m->len};
    el_get_u64(&r);
    int status = (int)el_get_u32(&r);
    int64_t rev = (int64_t)el_get_u64(&r);
    uint32_t mlen = el_get_u32(&r);
    char msg[300] = "";
    if (!r.bad && mlen < sizeof msg) el_get(&r, msg, mlen);
    free_mail(m);
    if (r.bad || !known_status(status)) return fail(p, EL_ERR_COORDINATOR, "malformed sync result");
    if (status != EL_OK) return fail(p, status, "sync_state failed: %s", msg);
    *synced_revision = rev;
    pthread_mutex_lock(&p->send_lock);
    p->last_revision = rev;
    p->synced = 1;
    pthread_mutex_unlock(&p->send_lock);
    return EL_OK;
}

static int sync_state(el_peer *p, int n, void *const *ptrs, const uint64_t *sizes, const uint8_t *const *descs,
                      const uint32_t *desc_lens, int64_t revision, int timeout_ms, int64_t *synced_revision,
                      uint64_t *fetched_bytes, uint8_t *digest_out)
{
    *fetched_bytes = 0;
    if (n < 0 || n > EL_MAX_ARRAYS) return fail(p, EL_ERR_ARG, "sync_state takes 0..%d arrays", EL_MAX_ARRAYS);
    if (p->lost) return fail(p, EL_ERR_COORDINATOR, "coordinator lost: %s", p->lost_why);
    if (p->epoch < 0) return fail(p, EL_ERR_NOT_MEMBER, "this peer is not a member yet: call update_topology first");
    if (epoch_aborted(p)) return fail(p, EL_ERR_PEER_FAILURE, "a peer failed in epoch %lld: call update_topology first", (long long)p->epoch);
    uint8_t *mine = malloc((size_t)n * EL_HASH + 1);
    if (!mine) return fail(p, EL_ERR_SYSTEM, "out of memory");
    for (int i = 0; i < n; i++) hash_array(ptrs[i], sizes[i], descs[i], desc_lens[i], mine + (size_t)i * EL_HASH);
    pthread_mutex_lock(&p->lock);
    for (struct mail *m; (m = take_mail(p, F_SYNC_PLAN, F_SYNC_RESULT));) free_mail(m); /* leftovers */
    pthread_mutex_unlock(&p->lock);
    struct el_buf b = {0};
    el_put_u64(&b, (uint64_t)p->epoch);
    el_put_u64(&b, (uint64_t)revision);
    el_put_u32(&b, (uint32_t)n);
    el_put(&b, mine, (size_t)n * EL_HASH);
    int rc = EL_ERR_SYSTEM;
    pthread_mutex_lock(&p->send_lock);
    if (!b.bad) {
        /* In flight from here on: a failover fails this sync the same way for every member. */
        p->in_sync = 1;
        rc = el_send_frame(p->coord_fd, F_SYNC_REQ, b.p, b.len, el_now_ms() + p->timeout_ms);
    }
    pthread_mutex_unlock(&p->send_lock);
    free(b.p);
    if (b.bad || send_failed(p, rc)) { free(mine); return fail(p, EL_ERR_COORDINATOR, "cannot reach the coordinator"); }
    struct mail *m = wait_mail(p, F_SYNC_PLAN, F_SYNC_RESULT, el_now_ms() + timeout_ms, &rc);
    if (!m) {
        free(mine);
        if (rc == EL_ERR_TIMEOUT) {
            /* Break the epoch: everyone then fails this sync the same way. */
            uint8_t e[8];
            for (int i = 0; i < 8; i++) e[i] = (uint8_t)((uint64_t)p->epoch >> (8 * i));
            send_coord(p, F_EPOCH_FAIL, e, 8);
            return fail(p, rc, "sync_state: not every member called sync_state within %.1f s", timeout_ms / 1000.0);
        }
        return fail(p, rc, "coordinator lost: %s", p->lost_why);
    }
    if (m->type == F_SYNC_RESULT) { free(mine); return sync_result(p, m, synced_revision); }
    struct el_reader r = {.p = m->p, .len = m->len};
    el_get_u64(&r);
    int status = (int)el_get_u32(&r);
    el_get_u64(&r); /* the revision comes again with the result */
    int source = (int)el_get_u32(&r);
    uint32_t nm = el_get_u32(&r);
    uint8_t *want = NULL;
    if (!r.bad && nm <= EL_MAX_ARRAYS && r.len - r.off >= (size_t)nm * EL_HASH) {
        want = malloc((size_t)nm * EL_HASH + 1);
        if (want) el_get(&r, want, (size_t)nm * EL_HASH);
    }
    uint32_t mlen = el_get_u32(&r);
    char msg[300] = "";
    if (!r.bad && mlen < sizeof msg) el_get(&r, msg, mlen);
    free_mail(m);
    if (r.bad || !want || !known_status(status)) { free(mine); free(want); return fail(p, EL_ERR_COORDINATOR, "malformed sync plan"); }
    if (status != EL_OK) { free(mine); free(want); return fail(p, status, "sync_state: %s", msg); }
    if (digest_out) el_blake2b(want, (size_t)nm * EL_HASH, digest_out, EL_HASH, NULL, 0);
    if (source == -1) {
        free(mine);
        free(want);
        return sync_result(p, serve_until_result(p, n, ptrs, sizes), synced_revision);
    }
    int local;
    if (nm != (uint32_t)n)
        local = fail(p, EL_ERR_STATE, "sync_state: this peer has %d arrays, the majority %u", n, nm);
    else if (source < 0 || source >= p->world)
        local = fail(p, EL_ERR_COORDINATOR, "bad source rank in the sync plan");
    else
        local = fetch_from(p, source, n, ptrs, sizes, mine, want, descs, desc_lens, fetched_bytes);
    free(mine);
    free(want);
    char local_err[512];
    snprintf(local_err, sizeof local_err, "%s", p->err);
    uint8_t done[12];
    struct el_buf d = {.p = done, .cap = sizeof done};
    el_put_u64(&d, (uint64_t)p->epoch);
    el_put_u32(&d, local == EL_OK);
    send_coord(p, F_SYNC_DONE, done, sizeof done);
    pthread_mutex_lock(&p->lock);
    m = NULL;
    while (!(m = take_mail(p, F_SYNC_RESULT, F_SYNC_RESULT)) && !p->lost) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += 1;
        pthread_cond_timedwait(&p->cond, &p->lock, &ts);
    }
    pthread_mutex_unlock(&p->lock);
    rc = sync_result(p, m, synced_revision);
    if (local) return fail(p, local, "%s", local_err);
    return rc;
}

EL_API int el_peer_sync_state(el_peer *p, int n, void *const *ptrs, const uint64_t *sizes, const uint8_t *const *descs,
                              const uint32_t *desc_lens, int64_t revision, int timeout_ms, int64_t *synced_revision,
                              uint64_t *fetched_bytes, uint8_t *digest_out)
{
    int rc = sync_state(p, n, ptrs, sizes, descs, desc_lens, revision, timeout_ms, synced_revision, fetched_bytes, digest_out);
    pthread_mutex_lock(&p->send_lock);
    p->in_sync = 0;
    pthread_mutex_unlock(&p->send_lock);
    return rc;
}
