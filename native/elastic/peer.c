/* A peer: the coordinator connection (a control thread that sends heartbeats and files
 * the coordinator's messages), membership, and the authenticated data connections the
 * ring (ring.c) and the state transfer (state.c) run on.  The calling thread does the
 * data work; the control thread only ever touches small control frames, so a long
 * reduction never delays a heartbeat. */
#define _GNU_SOURCE
#include "peer.h"

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

int fail(el_peer *p, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->err, sizeof p->err, fmt, ap);
    va_end(ap);
    return rc;
}

EL_API const char *el_peer_error(el_peer *p) { return p ? p->err : "no peer"; }

void poke(int fd)
{
    if (write(fd, "x", 1) < 0) { /* the pipe is full: it is readable anyway */ }
}

void drain(int fd)
{
    char b[64];
    while (read(fd, b, sizeof b) > 0) {}
}

int send_coord(el_peer *p, int type, const void *payload, size_t len)
{
    pthread_mutex_lock(&p->send_lock);
    int rc = el_send_frame(p->coord_fd, type, payload, len, el_now_ms() + p->timeout_ms);
    pthread_mutex_unlock(&p->send_lock);
    return rc;
}

void mark_lost(el_peer *p, const char *why)
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
struct mail *take_mail(el_peer *p, int t1, int t2)
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

void free_mail(struct mail *m)
{
    if (m) { free(m->p); free(m); }
}

/* Waits for a message (deadline < 0: only the coordinator's liveness bounds the wait). */
struct mail *wait_mail(el_peer *p, int t1, int t2, int64_t deadline_ms, int *rc)
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
    p->throttle = el_throttle_new(); /* NULL (out of memory): unthrottled, uncounted */
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

void intent(uint8_t *b, uint32_t kind, int64_t epoch, uint64_t from, uint64_t to, uint32_t index)
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
int data_connect(el_peer *p, const struct ring_member *to, uint32_t kind, uint32_t index, int64_t deadline, int *fd_out)
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

int data_accept(el_peer *p, int64_t deadline, uint32_t want_kind, int *fd_out, uint64_t *from, uint32_t *index,
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

void drop_pending(el_peer *p)
{
    for (int i = 0; i < p->npend; i++) close(p->pend[i].fd);
    p->npend = 0;
}

int data_mac_send(el_peer *p, int fd, const uint8_t *sent_intent, int64_t deadline)
{
    uint8_t nonce[EL_NONCE], mac[EL_MAC];
    int rc = el_read_all(fd, nonce, EL_NONCE, deadline, -1);
    if (rc) return rc;
    el_hmac_sha256_parts(p->secret, p->secret_len, "commlib-data", 12, nonce, EL_NONCE, sent_intent, INTENT_LEN, mac);
    return el_write_all(fd, mac, EL_MAC, deadline, -1);
}

int data_mac_check(el_peer *p, int fd, const uint8_t *nonce, const uint8_t *got_intent, int64_t deadline)
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

int epoch_aborted(el_peer *p)
{
    pthread_mutex_lock(&p->lock);
    int a = p->aborted_epoch >= p->epoch || p->lost;
    pthread_mutex_unlock(&p->lock);
    return a;
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
    el_throttle_free(p->throttle);
    free(p);
}
