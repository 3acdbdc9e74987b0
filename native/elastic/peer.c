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

static int can_fail_over(el_peer *p)
{
    pthread_mutex_lock(&p->lock);
    int yes = p->naddr > 1 && p->failover_ms > 0 && !p->closing;
    pthread_mutex_unlock(&p->lock);
    return yes;
}

/* A send to the coordinator that failed: fatal only when no other coordinator can take
 * over (the control thread reconnects, and the RESUME carries what this frame said). */
int send_failed(el_peer *p, int rc)
{
    return rc && !can_fail_over(p) ? rc : EL_OK;
}

static void resume_payload(el_peer *p, struct el_buf *b)
{
    /* send_lock held: the calling thread changes epoch, ring and the in-flight marks only
     * under it. */
    pthread_mutex_lock(&p->lock);
    int aborted = p->epoch >= 0 && p->aborted_epoch >= p->epoch;
    uint64_t committed = p->epoch >= 0 && p->commit_epoch == p->epoch ? p->last_commit : 0;
    pthread_mutex_unlock(&p->lock);
    int member = p->epoch >= 0 && p->ring;
    uint32_t flags = (p->synced ? EL_RF_SYNCED : 0) | (aborted ? EL_RF_ABORTED : 0) |
                     (member && !p->ring_ok ? EL_RF_RING_FAIL : 0) | (p->in_sync ? EL_RF_IN_SYNC : 0) |
                     (p->in_topo ? EL_RF_IN_TOPO : 0);
    el_put_u64(b, p->id);
    el_put_u64(b, (uint64_t)(member ? p->epoch : -1));
    el_put_u32(b, member ? (uint32_t)p->rank : 0);
    el_put_u32(b, member ? (uint32_t)p->world : 0);
    el_put_u64(b, (uint64_t)p->last_revision);
    el_put_u32(b, flags);
    el_put_u64(b, member ? p->op_seq : 0);
    el_put_u32(b, member ? (uint32_t)p->op_state : 0);
    el_put_u64(b, committed);
    for (int i = 0; member && i < p->world; i++) {
        el_put_u64(b, p->ring[i].id);
        el_put_u32(b, p->ring[i].ip);
        el_put_u16(b, p->ring[i].port);
        el_put_u16(b, 0);
    }
}

/* The coordinator connection is gone: try the known coordinators, starting after the one
 * that died and cycling, until one that is active accepts (a standby that still follows
 * its primary refuses, and is tried again next round) or the failover window closes.
 * Returns 0 with coord_fd replaced and the RESUME sent; -1 with why filled. */
static int reconnect(el_peer *p, char *why, size_t whylen)
{
    int64_t until = el_now_ms() + p->failover_ms;
    char last[300] = "no coordinator answered";
    while (el_now_ms() < until) {
        struct coord_addr addrs[ADDR_MAX];
        pthread_mutex_lock(&p->lock);
        int n = p->naddr, cur = p->cur_addr;
        memcpy(addrs, p->addrs, sizeof addrs);
        pthread_mutex_unlock(&p->lock);
        for (int k = 1; k <= n && el_now_ms() < until; k++) {
            int idx = (cur + k) % n;
            struct pollfd f = {.fd = p->stop_pipe[0], .events = POLLIN};
            if (poll(&f, 1, 0) > 0) { snprintf(why, whylen, "closed"); return -1; }
            int64_t deadline = el_now_ms() + p->timeout_ms;
            if (deadline > until) deadline = until;
            int fd = el_connect(addrs[idx].ip, addrs[idx].port, deadline);
            char ip[INET_ADDRSTRLEN], msg[200];
            struct in_addr a = {.s_addr = addrs[idx].ip};
            inet_ntop(AF_INET, &a, ip, sizeof ip);
            if (fd < 0) { snprintf(last, sizeof last, "%s:%u: cannot connect", ip, addrs[idx].port); continue; }
            uint64_t id;
            int coord_timeout;
            int rc = el_handshake(fd, p->secret, p->secret_len, EL_ROLE_RESUME, p->data_port, deadline, &id, &coord_timeout, msg, sizeof msg);
            if (rc) {
                close(fd);
                snprintf(last, sizeof last, "%s:%u %s", ip, addrs[idx].port, msg);
                continue;
            }
            struct el_buf b = {0};
            pthread_mutex_lock(&p->send_lock);
            resume_payload(p, &b);
            rc = b.bad ? EL_ERR_SYSTEM : el_send_frame(fd, F_RESUME, b.p, b.len, deadline);
            if (!rc) {
                close(p->coord_fd);
                p->coord_fd = fd;
            }
            pthread_mutex_unlock(&p->send_lock);
            free(b.p);
            if (rc) { close(fd); snprintf(last, sizeof last, "%s:%u: the RESUME could not be sent", ip, addrs[idx].port); continue; }
            pthread_mutex_lock(&p->lock);
            p->cur_addr = idx;
            p->failovers++;
            pthread_mutex_unlock(&p->lock);
            return 0;
        }
        struct pollfd f = {.fd = p->stop_pipe[0], .events = POLLIN};
        if (poll(&f, 1, 100) > 0) { snprintf(why, whylen, "closed"); return -1; }
    }
    snprintf(why, whylen, "no coordinator took over within %.1f s (COMMLIB_ELASTIC_FAILOVER_TIMEOUT; last: %s)",
             p->failover_ms / 1000.0, last);
    return -1;
}

/* The connection died: reconnect when another coordinator may take over, else (or when
 * that fails) the coordinator is lost and every wait ends.  Returns 0 to go on. */
static int connection_lost(el_peer *p, const char *what)
{
    if (can_fail_over(p)) {
        char why[512];
        if (reconnect(p, why, sizeof why) == 0) return 0;
        char full[768];
        snprintf(full, sizeof full, "%s; %s", what, why);
        mark_lost(p, full);
        return -1;
    }
    mark_lost(p, what);
    return -1;
}

static int take_standbys(el_peer *p, struct el_reader *rd)
{
    uint32_t n = el_get_u32(rd);
    if (rd->bad || n > EL_MAX_STANDBYS || rd->len - rd->off != (size_t)n * 8) return -1;
    pthread_mutex_lock(&p->lock);
    /* The list replaces what was learned before: the given addresses, the coordinator
     * serving now (it may be a learned one), then its standbys. */
    struct coord_addr cur = p->addrs[p->cur_addr], told[EL_MAX_STANDBYS + 1];
    int ntold = 0;
    told[ntold++] = cur;
    for (uint32_t i = 0; i < n; i++) {
        told[ntold] = (struct coord_addr){.ip = el_get_u32(rd), .port = el_get_u16(rd)};
        el_get_u16(rd);
        if (told[ntold].port) ntold++;
    }
    p->naddr = p->naddr_given;
    for (int i = 0; i < ntold; i++) {
        int known = 0;
        for (int j = 0; j < p->naddr; j++) known |= p->addrs[j].ip == told[i].ip && p->addrs[j].port == told[i].port;
        if (!known && p->naddr < ADDR_MAX) p->addrs[p->naddr++] = told[i];
    }
    for (int j = 0; j < p->naddr; j++)
        if (p->addrs[j].ip == cur.ip && p->addrs[j].port == cur.port) p->cur_addr = j;
    pthread_mutex_unlock(&p->lock);
    return 0;
}

static void *control_main(void *arg)
{
    el_peer *p = arg;
    uint8_t *buf = malloc(EL_MAX_FRAME);
    int64_t last_heard = el_now_ms(), next_beat = 0;
    while (buf) {
        int64_t now = el_now_ms();
        if (now >= next_beat) {
            if (send_coord(p, F_HEARTBEAT, NULL, 0)) {
                if (connection_lost(p, "the connection to the coordinator broke")) break;
                last_heard = now = el_now_ms();
            }
            next_beat = now + p->heartbeat_ms;
        }
        if (now - last_heard > p->timeout_ms) {
            if (connection_lost(p, "the coordinator went silent")) break;
            last_heard = el_now_ms();
            next_beat = 0;
            continue;
        }
        struct pollfd f[2] = {{.fd = p->coord_fd, .events = POLLIN}, {.fd = p->stop_pipe[0], .events = POLLIN}};
        int r = poll(f, 2, (int)(next_beat - now > 0 ? next_beat - now : 1));
        if (r < 0 && errno != EINTR) break;
        if (f[1].revents) break;
        if (!(f[0].revents)) continue;
        int type;
        size_t len;
        int rc = el_recv_frame(p->coord_fd, &type, buf, EL_MAX_FRAME, &len, el_now_ms() + p->timeout_ms, p->stop_pipe[0]);
        if (rc == EL_ERR_ARG) { mark_lost(p, "the coordinator sent a malformed frame"); break; }
        if (rc) {
            pthread_mutex_lock(&p->lock);
            int closing = p->closing;
            pthread_mutex_unlock(&p->lock);
            if (closing || connection_lost(p, "the connection to the coordinator closed")) break;
            last_heard = el_now_ms();
            next_beat = 0;
            continue;
        }
        last_heard = el_now_ms();
        struct el_reader rd = {.p = buf, .len = len};
        int flooded = 0;
        if (type == F_HEARTBEAT) continue;
        if (type == F_STANDBYS) {
            if (take_standbys(p, &rd)) { mark_lost(p, "the coordinator sent a malformed standby list"); break; }
            continue;
        }
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
                p->last_commit = 0;
                memset(p->committed, 0, sizeof p->committed);
            }
            p->committed[seq % COMMIT_SLOTS] = seq;
            if (seq > p->last_commit) p->last_commit = seq;
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

/* "h1:p1,h2:p2,...": the coordinators in the order to try. */
static int parse_addresses(el_peer *p, const char *list, char *err, size_t errlen)
{
    const char *s = list;
    while (*s) {
        const char *comma = strchr(s, ',');
        size_t n = comma ? (size_t)(comma - s) : strlen(s);
        char one[300], host[256];
        int port;
        uint32_t ip;
        if (n == 0 || n >= sizeof one || p->naddr_given == ADDR_MAX - EL_MAX_STANDBYS) {
            snprintf(err, errlen, "coordinator address list %s is not HOST:PORT[,HOST:PORT...]", list);
            return EL_ERR_ARG;
        }
        memcpy(one, s, n);
        one[n] = 0;
        if (el_parse_address(one, host, sizeof host, &port)) {
            snprintf(err, errlen, "coordinator address %s is not HOST:PORT", one);
            return EL_ERR_ARG;
        }
        if (el_resolve(host, &ip)) { snprintf(err, errlen, "cannot resolve coordinator host %s", host); return EL_ERR_ARG; }
        p->addrs[p->naddr_given++] = (struct coord_addr){.ip = ip, .port = (uint16_t)port};
        s += n;
        if (*s == ',') s++;
    }
    p->naddr = p->naddr_given;
    if (!p->naddr) { snprintf(err, errlen, "no coordinator address"); return EL_ERR_ARG; }
    return EL_OK;
}

/* The first coordinator that accepts, in the order given (a standby whose primary lives
 * refuses, and the next address is tried).  With several addresses every one may refuse
 * for a moment - the primary just died and its standby has not noticed yet - so rounds
 * go on until the deadline; with one address, its error as it is. */
static int connect_first(el_peer *p, int64_t deadline, int *coord_timeout, char *errs, size_t errslen)
{
    int rc = EL_ERR_COORDINATOR;
    for (int round = 0; round == 0 || (p->naddr > 1 && rc == EL_ERR_COORDINATOR && el_now_ms() + 100 < deadline); round++) {
        if (round) usleep(100 * 1000);
        errs[0] = 0;
        for (int i = 0; i < p->naddr; i++) {
            char ip[INET_ADDRSTRLEN], why[300], msg[200];
            struct in_addr a = {.s_addr = p->addrs[i].ip};
            inet_ntop(AF_INET, &a, ip, sizeof ip);
            int fd = el_connect(p->addrs[i].ip, p->addrs[i].port, deadline);
            if (fd < 0) {
                snprintf(why, sizeof why, "cannot connect to the coordinator at %s:%u: %s", ip, p->addrs[i].port,
                         strerror(errno ? errno : ECONNREFUSED));
                rc = EL_ERR_COORDINATOR;
            } else {
                rc = el_handshake(fd, p->secret, p->secret_len, EL_ROLE_PEER, p->data_port, deadline, &p->id, coord_timeout,
                                  msg, sizeof msg);
                if (rc == EL_OK) { p->coord_fd = fd; p->cur_addr = i; return EL_OK; }
                snprintf(why, sizeof why, "the coordinator at %s:%u %s", ip, p->addrs[i].port, msg);
                close(fd);
            }
            size_t used = strlen(errs);
            snprintf(errs + used, errslen - used, "%s%s", used ? "; " : "", why);
        }
    }
    return rc;
}

EL_API int el_peer_connect(const char *address, const uint8_t *secret, size_t secret_len, int timeout_ms,
                           el_peer **out, char *err, size_t errlen)
{
    *out = NULL;
    if (!secret || !secret_len) { snprintf(err, errlen, "a peer needs a non-empty secret"); return EL_ERR_ARG; }
    if (!address) { snprintf(err, errlen, "coordinator address (null) is not HOST:PORT"); return EL_ERR_ARG; }
    el_peer *p = calloc(1, sizeof *p);
    if (!p) return EL_ERR_SYSTEM;
    p->coord_fd = p->listen_fd = -1;
    for (int i = 0; i < 2; i++) p->stop_pipe[i] = p->abort_pipe[i] = p->mail_pipe[i] = -1;
    p->epoch = -1;
    p->aborted_epoch = -1;
    p->commit_epoch = -1;
    p->timeout_ms = (int)(el_knob_seconds("COMMLIB_ELASTIC_TIMEOUT", 2.5) * 1000);
    p->heartbeat_ms = p->timeout_ms / 6 > 20 ? p->timeout_ms / 6 : 20;
    p->failover_ms = (int)(el_knob_seconds("COMMLIB_ELASTIC_FAILOVER_TIMEOUT", 10.0) * 1000);
    p->k = el_knob_int("COMMLIB_ELASTIC_CONNECTIONS", 4, 1, 16);
    p->chunk_bytes = (size_t)el_knob_int("COMMLIB_ELASTIC_CHUNK_KIB", 256, 4, 1 << 20) << 10;
    p->throttle = el_throttle_new(); /* NULL (out of memory): unthrottled, uncounted */
    pthread_mutex_init(&p->lock, NULL);
    pthread_mutex_init(&p->send_lock, NULL);
    pthread_cond_init(&p->cond, NULL);
    p->secret = malloc(secret_len);
    memcpy(p->secret, secret, secret_len);
    p->secret_len = secret_len;
    int rc = parse_addresses(p, address, err, errlen);
    if (rc) goto out;
    rc = EL_ERR_SYSTEM;
    if (pipe2(p->stop_pipe, O_CLOEXEC) || pipe2(p->abort_pipe, O_CLOEXEC | O_NONBLOCK) || pipe2(p->mail_pipe, O_CLOEXEC | O_NONBLOCK)) {
        snprintf(err, errlen, "pipe: %s", strerror(errno));
        goto out;
    }
    p->listen_fd = el_listen("0.0.0.0", 0, &p->data_port);
    if (p->listen_fd < 0) { snprintf(err, errlen, "cannot open a data port: %s", strerror(errno)); goto out; }
    int64_t deadline = el_now_ms() + (timeout_ms > 0 ? timeout_ms : p->timeout_ms);
    char errs[1024];
    int coord_timeout = 0;
    rc = connect_first(p, deadline, &coord_timeout, errs, sizeof errs);
    if (rc) { snprintf(err, errlen, "%s", errs); goto out; }
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
    pthread_mutex_lock(&p->send_lock);
    p->in_topo = 1;
    int rc = el_send_frame(p->coord_fd, F_TOPO_REQ, NULL, 0, el_now_ms() + p->timeout_ms);
    pthread_mutex_unlock(&p->send_lock);
    if (send_failed(p, rc)) { p->in_topo = 0; return fail(p, EL_ERR_COORDINATOR, "cannot reach the coordinator"); }
    struct mail *m = wait_mail(p, F_TOPO, F_TOPO, el_now_ms() + timeout_ms, &rc);
    pthread_mutex_lock(&p->send_lock);
    p->in_topo = 0;
    pthread_mutex_unlock(&p->send_lock);
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
    struct ring_member *ring = malloc(sizeof *ring * world);
    if (!ring) { free_mail(m); return fail(p, EL_ERR_SYSTEM, "out of memory"); }
    for (uint32_t i = 0; i < world; i++) {
        ring[i].id = el_get_u64(&r);
        ring[i].ip = el_get_u32(&r);
        ring[i].port = el_get_u16(&r);
        el_get_u16(&r);
    }
    free_mail(m);
    close_ring(p);
    /* The control thread reads these for a RESUME: changed under send_lock, all at once. */
    pthread_mutex_lock(&p->send_lock);
    free(p->ring);
    p->ring = ring;
    pthread_mutex_lock(&p->lock);
    drain(p->abort_pipe[0]);
    p->epoch = epoch;
    pthread_mutex_unlock(&p->lock);
    p->rank = (int)rank;
    p->world = (int)world;
    p->last_revision = last_revision;
    p->seq = 0;
    p->op_seq = 0;
    p->op_state = 0;
    p->ring_ok = 1;
    pthread_mutex_unlock(&p->send_lock);
    if (world > 1 && build_ring(p) != EL_OK) {
        /* Not this call's failure to report: the next operation fails everywhere, consistently. */
        pthread_mutex_lock(&p->send_lock);
        p->ring_ok = 0;
        pthread_mutex_unlock(&p->send_lock);
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
    pthread_mutex_lock(&p->lock);
    p->closing = 1; /* the coordinator closing our connection now is no failover */
    pthread_mutex_unlock(&p->lock);
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
