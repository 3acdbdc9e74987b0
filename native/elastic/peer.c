/* A peer: the coordinator connection (a control thread that sends heartbeats and files
 * the coordinator's messages), the ring of data connections, all-reduce and sync_state.
 * The calling thread does the data work; the control thread only ever touches small
 * control frames, so a long reduction never delays a heartbeat. */
#define _GNU_SOURCE
#include "internal.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define COMMIT_SLOTS 1024
#define CHUNK_HEADER 16
#define QPARAMS 8 /* quantized chunk: float min, float scale */
#define INTENT_LEN 32

#define PENDING_MAX 64
#define MAIL_MAX 256
#define INTENT_DEADLINE_MS 1000
struct pending_conn { int fd; size_t got; int64_t since; uint8_t intent[INTENT_LEN]; };

struct mail { int type; uint8_t *p; size_t len; struct mail *next; };
struct ring_member { uint64_t id; uint32_t ip; uint16_t port; };

struct el_peer {
    int coord_fd, listen_fd, data_port;
    int stop_pipe[2], abort_pipe[2], mail_pipe[2];
    pthread_t thread;
    int thread_started;
    pthread_mutex_t lock, send_lock;
    pthread_cond_t cond;
    uint8_t *secret;
    size_t secret_len;
    uint64_t id;
    int timeout_ms, heartbeat_ms, k;
    size_t chunk_bytes;
    /* written by the control thread under lock */
    int lost;
    char lost_why[200];
    int64_t aborted_epoch, commit_epoch;
    uint64_t committed[COMMIT_SLOTS];
    struct mail *mail_head, *mail_tail;
    int nmail; /* queued: a coordinator cannot make it grow without bound (MAIL_MAX) */
    /* the calling thread's */
    int64_t epoch, last_revision;
    int rank, world, ring_ok;
    struct ring_member *ring;
    int *to_next, *from_prev; /* k each */
    uint64_t seq;
    uint8_t *scratch, *tmp;
    size_t scratch_cap, tmp_cap;
    struct pending_conn pend[PENDING_MAX]; /* accepted data connections not read to the end yet */
    int npend;
    char err[512];
};

static int fail(el_peer *p, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->err, sizeof p->err, fmt, ap);
    va_end(ap);
    return rc;
}

EL_API const char *el_peer_error(el_peer *p) { return p ? p->err : "no peer"; }

static void poke(int fd)
{
    if (write(fd, "x", 1) < 0) { /* the pipe is full: it is readable anyway */ }
}

static void drain(int fd)
{
    char b[64];
    while (read(fd, b, sizeof b) > 0) {}
}

static int send_coord(el_peer *p, int type, const void *payload, size_t len)
{
    pthread_mutex_lock(&p->send_lock);
    int rc = el_send_frame(p->coord_fd, type, payload, len, el_now_ms() + p->timeout_ms);
    pthread_mutex_unlock(&p->send_lock);
    return rc;
}

static void mark_lost(el_peer *p, const char *why)
{
    pthread_mutex_lock(&p->lock);
    if (!p->lost) {
        p->lost = 1;
        snprintf(p->lost_why, sizeof p->lost_why, "%s", why);
    }
    poke(p->abort_pipe[1]);
    poke(p->mail_pipe[1]);
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->lock);
}

static void *control_main(void *arg)
{
    el_peer *p = arg;
    uint8_t *buf = malloc(EL_MAX_FRAME);
    int64_t last_heard = el_now_ms(), next_beat = 0;
    while (buf) {
        int64_t now = el_now_ms();
        if (now >= next_beat) {
            if (send_coord(p, F_HEARTBEAT, NULL, 0)) { mark_lost(p, "the connection to the coordinator broke"); break; }
            next_beat = now + p->heartbeat_ms;
        }
        if (now - last_heard > p->timeout_ms) { mark_lost(p, "the coordinator went silent"); break; }
        struct pollfd f[2] = {{.fd = p->coord_fd, .events = POLLIN}, {.fd = p->stop_pipe[0], .events = POLLIN}};
        int r = poll(f, 2, (int)(next_beat - now > 0 ? next_beat - now : 1));
        if (r < 0 && errno != EINTR) break;
        if (f[1].revents) break;
        if (!(f[0].revents)) continue;
        int type;
        size_t len;
        int rc = el_recv_frame(p->coord_fd, &type, buf, EL_MAX_FRAME, &len, el_now_ms() + p->timeout_ms, p->stop_pipe[0]);
        if (rc) { mark_lost(p, rc == EL_ERR_ARG ? "the coordinator sent a malformed frame" : "the connection to the coordinator closed"); break; }
        last_heard = el_now_ms();
        struct el_reader rd = {.p = buf, .len = len};
        int flooded = 0;
        if (type == F_HEARTBEAT) continue;
        /* After the handshake a coordinator sends these and nothing else; anything more
         * would only pile up unread, so it ends the connection like a malformed frame. */
        if (type != F_COMMIT && type != F_ABORT && type != F_TOPO && type != F_SYNC_PLAN && type != F_SYNC_RESULT) {
            char why[80];
            snprintf(why, sizeof why, "the coordinator sent an unexpected frame (type %d)", type);
            mark_lost(p, why);
            break;
        }
        pthread_mutex_lock(&p->lock);
        if (type == F_COMMIT) {
            int64_t e = (int64_t)el_get_u64(&rd);
            uint64_t seq = el_get_u64(&rd);
            if (e != p->commit_epoch) {
                p->commit_epoch = e;
                memset(p->committed, 0, sizeof p->committed);
            }
            p->committed[seq % COMMIT_SLOTS] = seq;
        } else if (type == F_ABORT) {
            int64_t e = (int64_t)el_get_u64(&rd);
            if (e > p->aborted_epoch) p->aborted_epoch = e;
            poke(p->abort_pipe[1]);
        } else if (p->nmail >= MAIL_MAX) {
            flooded = 1;
        } else {
            struct mail *m = malloc(sizeof *m);
            if (m) {
                p->nmail++;
                *m = (struct mail){.type = type, .p = malloc(len + 1), .len = len};
                if (m->p) memcpy(m->p, buf, len);
                if (p->mail_tail) p->mail_tail->next = m;
                else p->mail_head = m;
                p->mail_tail = m;
                poke(p->mail_pipe[1]);
            }
        }
        pthread_cond_broadcast(&p->cond);
        pthread_mutex_unlock(&p->lock);
        if (flooded) {
            mark_lost(p, "the coordinator sent more answers than were asked for");
            break;
        }
    }
    free(buf);
    return NULL;
}

/* Takes the first message of one of two types; lock held. */
static struct mail *take_mail(el_peer *p, int t1, int t2)
{
    for (struct mail **pp = &p->mail_head, *prev = NULL; *pp; prev = *pp, pp = &(*pp)->next) {
        struct mail *m = *pp;
        if (m->type != t1 && m->type != t2) continue;
        *pp = m->next;
        if (p->mail_tail == m) p->mail_tail = prev;
        p->nmail--;
        return m;
    }
    return NULL;
}

static void free_mail(struct mail *m)
{
    if (m) { free(m->p); free(m); }
}

/* Waits for a message (deadline < 0: only the coordinator's liveness bounds the wait). */
static struct mail *wait_mail(el_peer *p, int t1, int t2, int64_t deadline_ms, int *rc)
{
    pthread_mutex_lock(&p->lock);
    struct mail *m;
    *rc = EL_OK;
    while (!(m = take_mail(p, t1, t2))) {
        if (p->lost) { *rc = EL_ERR_COORDINATOR; break; }
        int64_t left = deadline_ms < 0 ? 200 : deadline_ms - el_now_ms();
        if (left <= 0) { *rc = EL_ERR_TIMEOUT; break; }
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        int64_t ns = ts.tv_nsec + (left > 200 ? 200 : left) * 1000000;
        ts.tv_sec += ns / 1000000000;
        ts.tv_nsec = ns % 1000000000;
        pthread_cond_timedwait(&p->cond, &p->lock, &ts);
    }
    pthread_mutex_unlock(&p->lock);
    return m;
}

static int parse_address(const char *address, char *host, size_t hostlen, int *port)
{
    const char *colon = strrchr(address, ':');
    if (!colon || colon == address || (size_t)(colon - address) >= hostlen) return -1;
    memcpy(host, address, (size_t)(colon - address));
    host[colon - address] = 0;
    char *end;
    long v = strtol(colon + 1, &end, 10);
    if (*end || v < 1 || v > 65535) return -1;
    *port = (int)v;
    return 0;
}

EL_API int el_peer_connect(const char *address, const uint8_t *secret, size_t secret_len, int timeout_ms,
                           el_peer **out, char *err, size_t errlen)
{
    char host[256];
    int port;
    uint32_t ip;
    *out = NULL;
    if (!secret || !secret_len) { snprintf(err, errlen, "a peer needs a non-empty secret"); return EL_ERR_ARG; }
    if (!address || parse_address(address, host, sizeof host, &port)) {
        snprintf(err, errlen, "coordinator address %s is not HOST:PORT", address ? address : "(null)");
        return EL_ERR_ARG;
    }
    if (el_resolve(host, &ip)) { snprintf(err, errlen, "cannot resolve coordinator host %s", host); return EL_ERR_ARG; }
    el_peer *p = calloc(1, sizeof *p);
    if (!p) return EL_ERR_SYSTEM;
    p->coord_fd = p->listen_fd = -1;
    for (int i = 0; i < 2; i++) p->stop_pipe[i] = p->abort_pipe[i] = p->mail_pipe[i] = -1;
    p->epoch = -1;
    p->aborted_epoch = -1;
    p->commit_epoch = -1;
    p->timeout_ms = (int)(el_knob_seconds("COMMLIB_ELASTIC_TIMEOUT", 2.5) * 1000);
    p->heartbeat_ms = p->timeout_ms / 6 > 20 ? p->timeout_ms / 6 : 20;
    p->k = el_knob_int("COMMLIB_ELASTIC_CONNECTIONS", 4, 1, 16);
    p->chunk_bytes = (size_t)el_knob_int("COMMLIB_ELASTIC_CHUNK_KIB", 256, 4, 1 << 20) << 10;
    pthread_mutex_init(&p->lock, NULL);
    pthread_mutex_init(&p->send_lock, NULL);
    pthread_cond_init(&p->cond, NULL);
    p->secret = malloc(secret_len);
    memcpy(p->secret, secret, secret_len);
    p->secret_len = secret_len;
    int rc = EL_ERR_SYSTEM;
    if (pipe2(p->stop_pipe, O_CLOEXEC) || pipe2(p->abort_pipe, O_CLOEXEC | O_NONBLOCK) || pipe2(p->mail_pipe, O_CLOEXEC | O_NONBLOCK)) {
        snprintf(err, errlen, "pipe: %s", strerror(errno));
        goto out;
    }
    p->listen_fd = el_listen("0.0.0.0", 0, &p->data_port);
    if (p->listen_fd < 0) { snprintf(err, errlen, "cannot open a data port: %s", strerror(errno)); goto out; }
    int64_t deadline = el_now_ms() + (timeout_ms > 0 ? timeout_ms : p->timeout_ms);
    p->coord_fd = el_connect(ip, port, deadline);
    if (p->coord_fd < 0) {
        snprintf(err, errlen, "cannot connect to the coordinator at %s: %s", address, strerror(errno ? errno : ECONNREFUSED));
        rc = EL_ERR_COORDINATOR;
        goto out;
    }
    uint8_t pnonce[EL_NONCE], cnonce[EL_NONCE], mac[EL_MAC], frame[512];
    el_random(pnonce, sizeof pnonce);
    struct el_buf b = {0};
    el_put_u32(&b, 1);
    el_put(&b, pnonce, EL_NONCE);
    el_put_u16(&b, (uint16_t)p->data_port);
    rc = el_send_frame(p->coord_fd, F_HELLO, b.p, b.len, deadline);
    free(b.p);
    int type;
    size_t len;
    if (!rc) rc = el_recv_frame(p->coord_fd, &type, frame, sizeof frame, &len, deadline, -1);
    if (rc || type != F_CHALLENGE || len != EL_NONCE) {
        snprintf(err, errlen, "the coordinator at %s did not answer the handshake", address);
        rc = rc == EL_ERR_TIMEOUT ? EL_ERR_TIMEOUT : EL_ERR_COORDINATOR;
        goto out;
    }
    memcpy(cnonce, frame, EL_NONCE);
    el_hmac_sha256_parts(secret, secret_len, "commlib-peer", 12, cnonce, EL_NONCE, pnonce, EL_NONCE, mac);
    rc = el_send_frame(p->coord_fd, F_AUTH, mac, EL_MAC, deadline);
    if (!rc) rc = el_recv_frame(p->coord_fd, &type, frame, sizeof frame - 1, &len, deadline, -1);
    if (!rc && type == F_REFUSED) {
        frame[len] = 0;
        snprintf(err, errlen, "the coordinator at %s refused this peer: %s", address, (char *)frame);
        rc = EL_ERR_AUTH;
        goto out;
    }
    if (rc || type != F_WELCOME || len != 8 + EL_MAC + 4) {
        snprintf(err, errlen, "the coordinator at %s closed the handshake", address);
        rc = rc == EL_ERR_TIMEOUT ? EL_ERR_TIMEOUT : EL_ERR_COORDINATOR;
        goto out;
    }
    struct el_reader r = {.p = frame, .len = len};
    p->id = el_get_u64(&r);
    uint8_t proof[EL_MAC], want[EL_MAC];
    el_get(&r, proof, EL_MAC);
    int coord_timeout = (int)el_get_u32(&r);
    el_hmac_sha256_parts(secret, secret_len, "commlib-coordinator", 19, pnonce, EL_NONCE, cnonce, EL_NONCE, want);
    if (!el_equal_secret(proof, want, EL_MAC)) {
        snprintf(err, errlen, "the coordinator at %s could not prove it knows the secret (wrong secret there?)", address);
        rc = EL_ERR_AUTH;
        goto out;
    }
    /* The coordinator's timeout governs membership; a peer with a different knob
     * follows it so both sides agree on when silence means death. */
    if (coord_timeout >= 100 && coord_timeout <= 86400000) {
        p->timeout_ms = coord_timeout;
        p->heartbeat_ms = p->timeout_ms / 6 > 20 ? p->timeout_ms / 6 : 20;
    }
    if (pthread_create(&p->thread, NULL, control_main, p)) { rc = EL_ERR_SYSTEM; goto out; }
    p->thread_started = 1;
    *out = p;
    return EL_OK;
out:
    el_peer_close(p, 0);
    return rc;
}

static void close_ring(el_peer *p)
{
    for (int i = 0; p->to_next && i < p->k; i++)
        if (p->to_next[i] >= 0) close(p->to_next[i]);
    for (int i = 0; p->from_prev && i < p->k; i++)
        if (p->from_prev[i] >= 0) close(p->from_prev[i]);
    free(p->to_next);
    free(p->from_prev);
    p->to_next = p->from_prev = NULL;
}

static void intent(uint8_t *b, uint32_t kind, int64_t epoch, uint64_t from, uint64_t to, uint32_t index)
{
    struct el_buf x = {.p = b, .cap = INTENT_LEN};
    el_put_u32(&x, kind);
    el_put_u64(&x, (uint64_t)epoch);
    el_put_u64(&x, from);
    el_put_u64(&x, to);
    el_put_u32(&x, index);
}

/* The connecting side of an authenticated data connection: intent, then the MAC over the
 * acceptor's nonce. */
static int data_connect(el_peer *p, const struct ring_member *to, uint32_t kind, uint32_t index, int64_t deadline, int *fd_out)
{
    int fd = el_connect(to->ip, to->port, deadline);
    if (fd < 0) return EL_ERR_PEER_FAILURE;
    uint8_t b[INTENT_LEN];
    intent(b, kind, p->epoch, p->id, to->id, index);
    int rc = el_write_all(fd, b, sizeof b, deadline, -1);
    if (rc) { close(fd); return rc; }
    *fd_out = fd;
    return EL_OK;
}

/* Accepts data connections until one presents a fitting intent, then answers it with a
 * nonce.  Connections are read side by side (up to PENDING_MAX, each with its own short
 * deadline), so junk in the backlog - strangers, leftovers of older epochs, clients that
 * connect and say nothing - costs at most that deadline once, never one per connection. */

static int data_accept(el_peer *p, int64_t deadline, uint32_t want_kind, int *fd_out, uint64_t *from, uint32_t *index,
                       uint8_t nonce[EL_NONCE], uint8_t got_intent[INTENT_LEN])
{
    struct pending_conn *pend = p->pend;
    int npend = p->npend, rc = EL_ERR_PEER_FAILURE;
    for (;;) {
        int64_t now = el_now_ms();
        if (now >= deadline) break;
        for (int i = npend - 1; i >= 0; i--)
            if (now - pend[i].since > INTENT_DEADLINE_MS) { close(pend[i].fd); pend[i] = pend[--npend]; }
        struct pollfd f[PENDING_MAX + 1];
        f[0] = (struct pollfd){.fd = p->listen_fd, .events = POLLIN};
        for (int i = 0; i < npend; i++) f[i + 1] = (struct pollfd){.fd = pend[i].fd, .events = POLLIN};
        int64_t left = deadline - now;
        if (poll(f, (nfds_t)npend + 1, left > 100 ? 100 : (int)left) < 0 && errno != EINTR) break;
        if (f[0].revents & POLLIN) {
            for (int burst = 0; burst < PENDING_MAX; burst++) {
                int fd = accept4(p->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (fd < 0) break;
                if (npend == PENDING_MAX) { close(pend[0].fd); pend[0] = pend[--npend]; } /* oldest out */
                el_tune_socket(fd);
                pend[npend++] = (struct pending_conn){.fd = fd, .since = el_now_ms()};
            }
        }
        for (int i = npend - 1; i >= 0; i--) {
            struct pending_conn *c = &pend[i];
            ssize_t n = recv(c->fd, c->intent + c->got, INTENT_LEN - c->got, MSG_DONTWAIT);
            if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
                close(c->fd);
                *c = pend[--npend];
                continue;
            }
            if (n > 0) c->got += (size_t)n;
            if (c->got < INTENT_LEN) continue;
            struct el_reader r = {.p = c->intent, .len = INTENT_LEN};
            uint32_t kind = el_get_u32(&r);
            int64_t epoch = (int64_t)el_get_u64(&r);
            uint64_t sender = el_get_u64(&r), to = el_get_u64(&r);
            uint32_t idx = el_get_u32(&r);
            int fd = c->fd;
            memcpy(got_intent, c->intent, INTENT_LEN);
            *c = pend[--npend];
            /* Leftovers of an older epoch, or strangers: closed, and keep waiting. */
            if (kind != want_kind || epoch != p->epoch || to != p->id) { close(fd); continue; }
            el_random(nonce, EL_NONCE);
            if (el_write_all(fd, nonce, EL_NONCE, el_now_ms() + INTENT_DEADLINE_MS, -1)) { close(fd); continue; }
            *fd_out = fd;
            *from = sender;
            *index = idx;
            rc = EL_OK;
            goto out;
        }
    }
out:
    p->npend = npend; /* the next call goes on with them (a neighbour's other connections) */
    return rc;
}

static void drop_pending(el_peer *p)
{
    for (int i = 0; i < p->npend; i++) close(p->pend[i].fd);
    p->npend = 0;
}

static int data_mac_send(el_peer *p, int fd, const uint8_t *sent_intent, int64_t deadline)
{
    uint8_t nonce[EL_NONCE], mac[EL_MAC];
    int rc = el_read_all(fd, nonce, EL_NONCE, deadline, -1);
    if (rc) return rc;
    el_hmac_sha256_parts(p->secret, p->secret_len, "commlib-data", 12, nonce, EL_NONCE, sent_intent, INTENT_LEN, mac);
    return el_write_all(fd, mac, EL_MAC, deadline, -1);
}

static int data_mac_check(el_peer *p, int fd, const uint8_t *nonce, const uint8_t *got_intent, int64_t deadline)
{
    uint8_t mac[EL_MAC], want[EL_MAC], ok = 1;
    int rc = el_read_all(fd, mac, EL_MAC, deadline, -1);
    if (rc) return rc;
    el_hmac_sha256_parts(p->secret, p->secret_len, "commlib-data", 12, nonce, EL_NONCE, got_intent, INTENT_LEN, want);
    if (!el_equal_secret(mac, want, EL_MAC)) return EL_ERR_AUTH;
    return el_write_all(fd, &ok, 1, deadline, -1);
}

/* Builds k connections to the next rank and accepts k from the previous one, in phases
 * that only wait on what the neighbours did in an earlier phase (no cycle, no deadlock). */
static int build_ring_phases(el_peer *p);

static int build_ring(el_peer *p)
{
    int rc = build_ring_phases(p);
    drop_pending(p);
    return rc;
}

static int build_ring_phases(el_peer *p)
{
    int k = p->k, n = p->world;
    p->to_next = malloc(sizeof(int) * (size_t)k);
    p->from_prev = malloc(sizeof(int) * (size_t)k);
    if (!p->to_next || !p->from_prev) return EL_ERR_SYSTEM;
    for (int i = 0; i < k; i++) p->to_next[i] = p->from_prev[i] = -1;
    const struct ring_member *next = &p->ring[(p->rank + 1) % n], *prev = &p->ring[(p->rank + n - 1) % n];
    int64_t deadline = el_now_ms() + 2 * (int64_t)p->timeout_ms;
    uint8_t sent[16][INTENT_LEN], got[16][INTENT_LEN], nonces[16][EL_NONCE];
    for (int i = 0; i < k; i++) {
        if (data_connect(p, next, 0, (uint32_t)i, deadline, &p->to_next[i])) return EL_ERR_PEER_FAILURE;
        intent(sent[i], 0, p->epoch, p->id, next->id, (uint32_t)i);
    }
    for (int accepted = 0; accepted < k;) {
        int fd;
        uint64_t from;
        uint32_t index;
        uint8_t nonce[EL_NONCE], in[INTENT_LEN];
        if (data_accept(p, deadline, 0, &fd, &from, &index, nonce, in)) return EL_ERR_PEER_FAILURE;
        if (from != prev->id || index >= (uint32_t)k || p->from_prev[index] >= 0) { close(fd); continue; }
        p->from_prev[index] = fd;
        memcpy(nonces[index], nonce, EL_NONCE);
        memcpy(got[index], in, INTENT_LEN);
        accepted++;
    }
    for (int i = 0; i < k; i++)
        if (data_mac_send(p, p->to_next[i], sent[i], deadline)) return EL_ERR_PEER_FAILURE;
    for (int i = 0; i < k; i++) {
        int rc = data_mac_check(p, p->from_prev[i], nonces[i], got[i], deadline);
        if (rc) return rc;
    }
    for (int i = 0; i < k; i++) {
        uint8_t ok;
        if (el_read_all(p->to_next[i], &ok, 1, deadline, -1) || ok != 1) return EL_ERR_PEER_FAILURE;
    }
    return EL_OK;
}

EL_API int el_peer_update_topology(el_peer *p, int timeout_ms)
{
    if (p->lost) return fail(p, EL_ERR_COORDINATOR, "coordinator lost: %s", p->lost_why);
    if (send_coord(p, F_TOPO_REQ, NULL, 0)) return fail(p, EL_ERR_COORDINATOR, "cannot reach the coordinator");
    int rc;
    struct mail *m = wait_mail(p, F_TOPO, F_TOPO, el_now_ms() + timeout_ms, &rc);
    if (!m) {
        if (rc == EL_ERR_TIMEOUT)
            return fail(p, rc, "update_topology: not every member called update_topology within %.1f s%s", timeout_ms / 1000.0,
                        p->epoch < 0 ? " (this peer waits to be admitted)" : "");
        return fail(p, rc, "coordinator lost: %s", p->lost_why);
    }
    /* Several answers may be queued (a retried call): the newest counts. */
    for (;;) {
        pthread_mutex_lock(&p->lock);
        struct mail *newer = take_mail(p, F_TOPO, F_TOPO);
        pthread_mutex_unlock(&p->lock);
        if (!newer) break;
        free_mail(m);
        m = newer;
    }
    struct el_reader r = {.p = m->p, .len = m->len};
    int64_t epoch = (int64_t)el_get_u64(&r);
    uint32_t rank = el_get_u32(&r), world = el_get_u32(&r);
    int64_t last_revision = (int64_t)el_get_u64(&r);
    if (r.bad || world < 1 || world > EL_MAX_MEMBERS || rank >= world || r.len - r.off != (size_t)world * 16) {
        free_mail(m);
        return fail(p, EL_ERR_COORDINATOR, "the coordinator sent a malformed topology");
    }
    if (epoch == p->epoch) { free_mail(m); return EL_OK; }
    close_ring(p);
    free(p->ring);
    p->ring = malloc(sizeof *p->ring * world);
    for (uint32_t i = 0; i < world; i++) {
        p->ring[i].id = el_get_u64(&r);
        p->ring[i].ip = el_get_u32(&r);
        p->ring[i].port = el_get_u16(&r);
        el_get_u16(&r);
    }
    free_mail(m);
    pthread_mutex_lock(&p->lock);
    drain(p->abort_pipe[0]);
    p->epoch = epoch;
    pthread_mutex_unlock(&p->lock);
    p->rank = (int)rank;
    p->world = (int)world;
    p->last_revision = last_revision;
    p->seq = 0;
    p->ring_ok = 1;
    if (world > 1 && build_ring(p) != EL_OK) {
        /* Not this call's failure to report: the next operation fails everywhere, consistently. */
        p->ring_ok = 0;
        uint8_t e[8];
        for (int i = 0; i < 8; i++) e[i] = (uint8_t)((uint64_t)epoch >> (8 * i));
        send_coord(p, F_EPOCH_FAIL, e, 8);
    }
    return EL_OK;
}

EL_API int el_peer_data_port(el_peer *p) { return p->data_port; }

EL_API int el_peer_info(el_peer *p, int64_t *epoch, int *rank, int *world, uint64_t *id)
{
    *epoch = p->epoch;
    *rank = p->rank;
    *world = p->epoch < 0 ? 0 : p->world;
    *id = p->id;
    return EL_OK;
}

static int epoch_aborted(el_peer *p)
{
    pthread_mutex_lock(&p->lock);
    int a = p->aborted_epoch >= p->epoch || p->lost;
    pthread_mutex_unlock(&p->lock);
    return a;
}

/* ---- the ring all-reduce ---- */

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
    int quant, steps;
    int64_t deadline, inactivity;
    uint32_t *recv_steps;
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
    int quant = run->quant, dtype = pl->dtype, op = pl->op;
    size_t qchunk = run->qchunk;
    int64_t last_progress = el_now_ms();
    struct pollfd fds[33];
    for (;;) {
        if (__atomic_load_n(&run->stop, __ATOMIC_ACQUIRE)) return EL_ERR_PEER_FAILURE; /* another lane failed */
        int busy = 0, nf = 0, progressed = 0;
        /* Send whatever is ready on each outgoing connection. */
        for (int j = j0; j < j1; j++) {
            struct stream *st = &run->out[j];
            while (st->item < st->items) {
                int s;
                uint64_t c, first, cnt;
                item_of(pl, j, st, &s, &c);
                if (s > 0 && __atomic_load_n(&run->recv_steps[c], __ATOMIC_ACQUIRE) < (uint32_t)s) break;
                int g = send_segment(pl, s);
                chunk_span(pl, g, c, &first, &cnt);
                const uint8_t *src = (s == 0 ? user : data) + first * pl->esize;
                /* The payload is one or two pieces: the dtype's bytes; or, quantized, the
                 * staged (params, bytes) of this hop, or the stored ones the all-gather forwards. */
                struct piece pc[2] = {{(uint8_t *)src, cnt * pl->esize}, {NULL, 0}};
                if (quant && s < pl->n - 1) {
                    uint8_t *q = run->qsend + (size_t)j * qchunk;
                    if (st->off == 0) el_quantize(src, cnt, dtype, (float *)q, q + QPARAMS);
                    pc[0] = (struct piece){q, QPARAMS + cnt};
                } else if (quant) {
                    pc[0] = (struct piece){(uint8_t *)(run->qparams + 2 * ((uint64_t)g * pl->chunks + c)), QPARAMS};
                    pc[1] = (struct piece){run->qall + first, cnt};
                }
                size_t nbytes = pc[0].len + pc[1].len;
                if (st->off == 0) put_header(st->header, pl->seq, s, c, (uint32_t)nbytes);
                struct iovec iov[3];
                int niov = 0;
                if (st->off < CHUNK_HEADER) iov[niov++] = (struct iovec){st->header + st->off, CHUNK_HEADER - st->off};
                size_t poff = st->off > CHUNK_HEADER ? st->off - CHUNK_HEADER : 0;
                for (int i = 0; i < 2; i++) {
                    if (poff < pc[i].len) iov[niov++] = (struct iovec){pc[i].p + poff, pc[i].len - poff};
                    poff = poff > pc[i].len ? poff - pc[i].len : 0;
                }
                struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)niov};
                ssize_t sent = niov ? sendmsg(st->fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT) : 0;
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
                if (s == 0 || __atomic_load_n(&run->recv_steps[c], __ATOMIC_ACQUIRE) >= (uint32_t)s)
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
                if (quant && reducing) pc[0] = (struct piece){run->qrecv + (size_t)j * qchunk, QPARAMS + cnt};
                else if (quant) {
                    pc[0] = (struct piece){(uint8_t *)(run->qparams + 2 * ((uint64_t)g * pl->chunks + c)), QPARAMS};
                    pc[1] = (struct piece){run->qall + first, cnt};
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
                    if (quant) el_dequantize(pc[0].p + QPARAMS, cnt, (const float *)pc[0].p, dtype, tmp);
                    memcpy(mine, user + first * pl->esize, cnt * pl->esize); /* its first touch */
                    el_reduce(mine, tmp, cnt, dtype, op);
                    if (s == pl->n - 2 && op == EL_AVG) el_finish_avg(mine, cnt, dtype, (uint64_t)pl->n);
                    if (s == pl->n - 2 && quant) {
                        /* The owner quantizes its finished chunk once and keeps what the
                         * others will decode, so every peer ends with the same bytes. */
                        float *prm = run->qparams + 2 * ((uint64_t)g * pl->chunks + c);
                        el_quantize(mine, cnt, dtype, prm, run->qall + first);
                        el_dequantize(run->qall + first, cnt, prm, dtype, mine);
                    }
                } else if (quant) {
                    el_dequantize(run->qall + first, cnt, (const float *)pc[0].p, dtype, mine);
                }
                __atomic_store_n(&run->recv_steps[c], run->recv_steps[c] + 1, __ATOMIC_RELEASE);
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
        int r = poll(fds, (nfds_t)nf, 100);
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
    run->steps = steps;
    run->deadline = deadline;
    run->inactivity = 2 * (int64_t)p->timeout_ms;
    run->qchunk = qchunk;
    run->qsend = p->tmp + (size_t)k * pl->chunk_elems * pl->esize;
    run->qrecv = run->qsend + (size_t)k * qchunk;
    run->qall = run->qrecv + (size_t)k * qchunk;
    run->qparams = (float *)(((uintptr_t)(run->qall + count) + 7) & ~(uintptr_t)7);
    run->recv_steps = calloc((size_t)pl->chunks, sizeof *run->recv_steps);
    pthread_mutex_init(&run->lock, NULL);
    if (!run->recv_steps) {
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
    if (send_coord(p, F_OP_DONE, done, sizeof done)) {
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

/* ---- shared state ---- */

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
        if (el_write_all(fd, &status, 1, el_now_ms() + p->timeout_ms, -1) || !status) return EL_ERR_PEER_FAILURE;
        /* A moving deadline: big arrays take as long as they take while bytes flow. */
        const uint8_t *src = (const uint8_t *)ptrs[index] + off;
        for (uint64_t done = 0; done < len;) {
            size_t piece = len - done > (64u << 20) ? (64u << 20) : (size_t)(len - done);
            if (el_write_all(fd, src + done, piece, el_now_ms() + 2 * (int64_t)p->timeout_ms, p->abort_pipe[0])) return EL_ERR_PEER_FAILURE;
            done += piece;
        }
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
        if (el_write_all(fd, req, sizeof req, el_now_ms() + p->timeout_ms, -1) ||
            el_read_all(fd, &status, 1, el_now_ms() + 2 * (int64_t)p->timeout_ms, p->abort_pipe[0])) {
            lane_error(l, EL_ERR_PEER_FAILURE, "rank %d failed while sending the state", source);
            break;
        }
        if (!status) {
            lane_error(l, EL_ERR_STATE, "rank %d refused array %u: its size differs from this peer's (%llu bytes)", source,
                       g->array, (unsigned long long)l->sizes[g->array]);
            break;
        }
        uint8_t *dst = (uint8_t *)l->ptrs[g->array] + g->off;
        for (uint64_t done = 0; done < g->len;) {
            size_t piece = g->len - done > (64u << 20) ? (64u << 20) : (size_t)(g->len - done);
            if (el_read_all(fd, dst + done, piece, el_now_ms() + 2 * (int64_t)p->timeout_ms, p->abort_pipe[0])) {
                lane_error(l, EL_ERR_PEER_FAILURE, "rank %d failed while sending the state", source);
                break;
            }
            done += piece;
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
    p->last_revision = rev;
    return EL_OK;
}

EL_API int el_peer_sync_state(el_peer *p, int n, void *const *ptrs, const uint64_t *sizes, const uint8_t *const *descs,
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
    int rc = b.bad ? EL_ERR_SYSTEM : send_coord(p, F_SYNC_REQ, b.p, b.len);
    free(b.p);
    if (rc) { free(mine); return fail(p, EL_ERR_COORDINATOR, "cannot reach the coordinator"); }
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

EL_API void el_peer_close(el_peer *p, int graceful)
{
    if (!p) return;
    if (graceful && p->coord_fd >= 0 && !p->lost) send_coord(p, F_LEAVE, NULL, 0);
    if (p->thread_started) {
        poke(p->stop_pipe[1]);
        pthread_join(p->thread, NULL);
    }
    close_ring(p);
    drop_pending(p);
    if (p->coord_fd >= 0) close(p->coord_fd);
    if (p->listen_fd >= 0) close(p->listen_fd);
    for (int i = 0; i < 2; i++) {
        if (p->stop_pipe[i] >= 0) close(p->stop_pipe[i]);
        if (p->abort_pipe[i] >= 0) close(p->abort_pipe[i]);
        if (p->mail_pipe[i] >= 0) close(p->mail_pipe[i]);
    }
    for (struct mail *m = p->mail_head, *next; m; m = next) { next = m->next; free_mail(m); }
    free(p->ring);
    free(p->scratch);
    free(p->tmp);
    free(p->secret);
    free(p);
}
