/* The coordinator: one thread, one poll loop, nonblocking sockets with bounded buffers.
 * It holds membership, ring order, operation verdicts and shared-state revisions; it never
 * carries tensor data.  Anything malformed drops the sender, never the coordinator. */
#define _GNU_SOURCE
#include "internal.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_CLIENTS 4096
#define MAX_OUT (8u << 20)  /* a peer that stops reading this much is dropped */
#define MAX_PENDING_OPS 1024

enum { C_HELLO, C_AUTH, C_READY };

struct client {
    int fd, state, member; /* member: rank in the current epoch, or -1 */
    uint64_t id;
    uint32_t ip;
    uint16_t data_port;
    int64_t last_seen, connected_at;
    uint8_t pnonce[EL_NONCE], cnonce[EL_NONCE];
    uint8_t header[EL_HEADER];
    size_t header_got;
    uint8_t *payload;
    uint32_t payload_len, payload_got;
    int payload_type;
    struct el_buf out;
    size_t out_off;
    int closing, topo_req;
};

struct member {
    uint64_t id;
    uint32_t ip;
    uint16_t port;
    int alive;
    struct client *c;
    int sync_in, sync_fetching;
    int64_t sync_revision;
    uint32_t sync_n;
    uint8_t *sync_hashes;
};

struct pending_op { uint64_t seq; int reported; uint8_t *seen; };

struct el_coordinator {
    int listen_fd, wake[2];
    pthread_t thread;
    pthread_mutex_t lock; /* guards the counters el_coordinator_info reads */
    uint8_t *secret;
    size_t secret_len;
    int timeout_ms, heartbeat_ms, min_peers, formed_once;
    struct client *clients[MAX_CLIENTS];
    int nclients;
    uint64_t next_id;
    int64_t epoch;
    struct member *members;
    int world, broken, dirty;
    struct pending_op ops[MAX_PENDING_OPS];
    int nops;
    int64_t last_revision;
    int synced_once, sync_fetchers_left, sync_planned;
    int64_t sync_target;
    long long dropped, refused, commits, aborts, epochs;
    int running; /* the event loop runs (info reports it: a loop that ended early is a bug) */
};

static void logf_(const char *fmt, ...)
{
    if (el_knob_int("COMMLIB_ELASTIC_QUIET", 0, 0, 1)) return;
    va_list ap;
    va_start(ap, fmt);
    char line[512];
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "commlib coordinator: %s\n", line);
}

static void queue(struct client *c, int type, const void *payload, size_t len)
{
    if (c->closing && type != F_REFUSED) return;
    uint8_t h[EL_HEADER];
    el_frame_header(h, type, (uint32_t)len);
    el_put(&c->out, h, sizeof h);
    if (len) el_put(&c->out, payload, len);
    if (c->out.bad || c->out.len - c->out_off > MAX_OUT) c->closing = 2; /* drop now */
}

static void queue_buf(struct client *c, int type, struct el_buf *b) { queue(c, type, b->p, b->len); }

static const char *ip_text(uint32_t ip, char *buf)
{
    struct in_addr a = {.s_addr = ip};
    inet_ntop(AF_INET, &a, buf, INET_ADDRSTRLEN);
    return buf;
}

static void free_member_sync(struct member *m)
{
    free(m->sync_hashes);
    m->sync_hashes = NULL;
    m->sync_in = m->sync_fetching = 0;
}

static void reset_sync(el_coordinator *co)
{
    for (int i = 0; i < co->world; i++) free_member_sync(&co->members[i]);
    co->sync_planned = 0;
    co->sync_fetchers_left = 0;
}

static void reset_ops(el_coordinator *co)
{
    for (int i = 0; i < co->nops; i++) free(co->ops[i].seen);
    co->nops = 0;
}

static void send_sync_result(el_coordinator *co, struct member *m, int status, int64_t revision, const char *msg)
{
    struct el_buf b = {0};
    el_put_u64(&b, (uint64_t)co->epoch);
    el_put_u32(&b, (uint32_t)status);
    el_put_u64(&b, (uint64_t)revision);
    el_put_u32(&b, (uint32_t)strlen(msg));
    el_put(&b, msg, strlen(msg));
    if (m->c) queue_buf(m->c, F_SYNC_RESULT, &b);
    free(b.p);
}

/* Fails everything uncommitted in the current epoch, for everyone, once. */
static void abort_epoch(el_coordinator *co, const char *why)
{
    if (co->broken) return;
    co->broken = 1;
    co->dirty = 1;
    co->aborts++;
    logf_("epoch %lld aborted: %s", (long long)co->epoch, why);
    uint8_t p[8];
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)((uint64_t)co->epoch >> (8 * i));
    for (int i = 0; i < co->world; i++) {
        struct member *m = &co->members[i];
        if (!m->alive || !m->c) continue;
        queue(m->c, F_ABORT, p, 8);
        if (m->sync_in) send_sync_result(co, m, EL_ERR_PEER_FAILURE, 0, why);
    }
    reset_sync(co);
    reset_ops(co);
}

static void drop(el_coordinator *co, int index, const char *why)
{
    struct client *c = co->clients[index];
    char ip[INET_ADDRSTRLEN];
    if (c->state == C_READY) logf_("peer %llu (%s) %s", (unsigned long long)c->id, ip_text(c->ip, ip), why);
    co->dropped++;
    if (c->member >= 0 && c->member < co->world && co->members[c->member].c == c) {
        struct member *m = &co->members[c->member];
        m->alive = 0;
        m->c = NULL;
        char reason[160];
        snprintf(reason, sizeof reason, "member %llu (rank %d) %s", (unsigned long long)c->id, c->member, why);
        abort_epoch(co, reason);
    }
    close(c->fd);
    free(c->payload);
    free(c->out.p);
    free(c);
    co->clients[index] = co->clients[--co->nclients];
}

static void send_topology(el_coordinator *co, struct member *m, int rank)
{
    struct el_buf b = {0};
    el_put_u64(&b, (uint64_t)co->epoch);
    el_put_u32(&b, (uint32_t)rank);
    el_put_u32(&b, (uint32_t)co->world);
    el_put_u64(&b, (uint64_t)co->last_revision);
    for (int i = 0; i < co->world; i++) {
        el_put_u64(&b, co->members[i].id);
        el_put_u32(&b, co->members[i].ip);
        el_put_u16(&b, co->members[i].port);
        el_put_u16(&b, 0);
    }
    queue_buf(m->c, F_TOPO, &b);
    free(b.p);
}

static int cmp_client_id(const void *a, const void *b)
{
    const struct client *x = *(struct client *const *)a, *y = *(struct client *const *)b;
    return x->id < y->id ? -1 : x->id > y->id;
}

/* update_topology is a barrier of the live members; waiting peers that asked join it. */
static void try_topology(el_coordinator *co)
{
    int alive = 0, dead = 0;
    for (int i = 0; i < co->world; i++) {
        struct member *m = &co->members[i];
        if (!m->alive) { dead++; continue; }
        if (!m->c->topo_req) return;
        alive++;
    }
    struct client *joiners[MAX_CLIENTS];
    int nj = 0;
    for (int i = 0; i < co->nclients; i++) {
        struct client *c = co->clients[i];
        if (c->state == C_READY && c->member < 0 && c->topo_req && !c->closing && nj < EL_MAX_MEMBERS) joiners[nj++] = c;
    }
    if (alive == 0 && nj < (co->formed_once ? 1 : co->min_peers)) return;
    if (alive + nj > EL_MAX_MEMBERS) nj = EL_MAX_MEMBERS - alive;
    if (co->dirty || dead || nj) {
        qsort(joiners, (size_t)nj, sizeof joiners[0], cmp_client_id);
        struct member *next = calloc((size_t)(alive + nj), sizeof *next);
        if (!next) return;
        int w = 0;
        for (int i = 0; i < co->world; i++)
            if (co->members[i].alive) { next[w] = co->members[i]; next[w].sync_hashes = NULL; next[w].sync_in = 0; w++; }
        for (int i = 0; i < nj; i++)
            next[w++] = (struct member){.id = joiners[i]->id, .ip = joiners[i]->ip, .port = joiners[i]->data_port,
                                        .alive = 1, .c = joiners[i]};
        reset_sync(co);
        reset_ops(co);
        free(co->members);
        co->members = next;
        co->world = w;
        co->epoch++;
        co->epochs++;
        co->broken = co->dirty = 0;
        co->formed_once = 1;
        for (int i = 0; i < w; i++) co->members[i].c->member = i;
        logf_("epoch %lld: %d member(s) (%d joined, %d dropped)", (long long)co->epoch, w, nj, dead);
    }
    for (int i = 0; i < co->world; i++) {
        co->members[i].c->topo_req = 0;
        send_topology(co, &co->members[i], i);
    }
}

static int same_state(const struct member *a, const struct member *b)
{
    return a->sync_revision == b->sync_revision && a->sync_n == b->sync_n &&
           !memcmp(a->sync_hashes, b->sync_hashes, (size_t)a->sync_n * EL_HASH);
}

static void send_plan(el_coordinator *co, struct member *m, int status, int64_t revision, int source,
                      const struct member *majority, const char *msg)
{
    struct el_buf b = {0};
    el_put_u64(&b, (uint64_t)co->epoch);
    el_put_u32(&b, (uint32_t)status);
    el_put_u64(&b, (uint64_t)revision);
    el_put_u32(&b, (uint32_t)source);
    uint32_t n = majority ? majority->sync_n : 0;
    el_put_u32(&b, n);
    if (n) el_put(&b, majority->sync_hashes, (size_t)n * EL_HASH);
    el_put_u32(&b, (uint32_t)strlen(msg));
    el_put(&b, msg, strlen(msg));
    queue_buf(m->c, F_SYNC_PLAN, &b);
    free(b.p);
}

static void finish_sync(el_coordinator *co)
{
    co->last_revision = co->sync_target;
    co->synced_once = 1;
    for (int i = 0; i < co->world; i++)
        if (co->members[i].alive) send_sync_result(co, &co->members[i], EL_OK, co->sync_target, "");
    reset_sync(co);
}

/* All members sent their hashes: elect the majority, check the revision, plan fetches. */
static void try_sync(el_coordinator *co)
{
    if (co->sync_planned || co->world == 0 || co->broken) return;
    for (int i = 0; i < co->world; i++)
        if (!co->members[i].alive || !co->members[i].sync_in) return;
    /* Only peers whose revision obeys the rule (the last synchronised one, or one more)
     * may win: two fresh joiners agreeing on their empty state must not outvote the
     * members.  A joiner that has nothing says so with revision INT64_MIN. */
    int best = -1, best_count = 0;
    for (int i = 0; i < co->world; i++) {
        int64_t rev_i = co->members[i].sync_revision;
        if (rev_i == INT64_MIN) continue;
        if (co->synced_once && rev_i != co->last_revision && rev_i != co->last_revision + 1) continue;
        int count = 0;
        for (int j = 0; j < co->world; j++) count += same_state(&co->members[i], &co->members[j]);
        if (count > best_count) { best = i; best_count = count; }
    }
    if (best < 0) {
        char msg[200];
        snprintf(msg, sizeof msg, "revision rule: no member offers revision %lld or %lld (the last synchronised one, or one more)",
                 (long long)co->last_revision, (long long)co->last_revision + 1);
        if (!co->synced_once) snprintf(msg, sizeof msg, "no member has a state to share (every peer passed revision=None)");
        for (int i = 0; i < co->world; i++) send_plan(co, &co->members[i], EL_ERR_STATE, 0, -1, NULL, msg);
        reset_sync(co);
        return;
    }
    struct member *maj = &co->members[best];
    int64_t rev = maj->sync_revision;
    int up[EL_MAX_MEMBERS], nup = 0, fetchers = 0;
    for (int i = 0; i < co->world; i++)
        if (same_state(maj, &co->members[i])) up[nup++] = i;
    for (int i = 0; i < co->world; i++) {
        struct member *m = &co->members[i];
        if (same_state(maj, m)) send_plan(co, m, EL_OK, rev, -1, maj, "");
        else {
            m->sync_fetching = 1;
            send_plan(co, m, EL_OK, rev, up[fetchers++ % nup], maj, "");
        }
    }
    co->sync_planned = 1;
    co->sync_target = rev;
    co->sync_fetchers_left = fetchers;
    if (!fetchers) finish_sync(co);
}

static void handle_ready(el_coordinator *co, struct client *c, int type, struct el_reader *r)
{
    struct member *m = c->member >= 0 && c->member < co->world && co->members[c->member].c == c ? &co->members[c->member] : NULL;
    switch (type) {
    case F_HEARTBEAT: return;
    case F_TOPO_REQ: c->topo_req = 1; return;
    case F_LEAVE: c->closing = 3; return;
    case F_EPOCH_FAIL: {
        int64_t e = (int64_t)el_get_u64(r);
        if (!r->bad && m && e == co->epoch) abort_epoch(co, "a member could not build the ring");
        return;
    }
    case F_OP_DONE: {
        int64_t e = (int64_t)el_get_u64(r);
        uint64_t seq = el_get_u64(r);
        uint32_t ok = el_get_u32(r);
        if (r->bad) break;
        if (!m || e != co->epoch || co->broken) {
            uint8_t p[8];
            for (int i = 0; i < 8; i++) p[i] = (uint8_t)((uint64_t)e >> (8 * i));
            queue(c, F_ABORT, p, 8);
            return;
        }
        if (!ok) { abort_epoch(co, "a member's operation failed"); return; }
        struct pending_op *op = NULL;
        for (int i = 0; i < co->nops; i++)
            if (co->ops[i].seq == seq) op = &co->ops[i];
        if (!op) {
            if (co->nops == MAX_PENDING_OPS) { abort_epoch(co, "too many operations in flight"); return; }
            op = &co->ops[co->nops++];
            *op = (struct pending_op){.seq = seq, .seen = calloc((size_t)co->world, 1)};
            if (!op->seen) { co->nops--; abort_epoch(co, "out of memory"); return; }
        }
        if (op->seen[c->member]) break; /* a duplicate report is a protocol error */
        op->seen[c->member] = 1;
        if (++op->reported == co->world) {
            uint8_t p[16];
            for (int i = 0; i < 8; i++) { p[i] = (uint8_t)((uint64_t)e >> (8 * i)); p[8 + i] = (uint8_t)(seq >> (8 * i)); }
            for (int i = 0; i < co->world; i++) queue(co->members[i].c, F_COMMIT, p, 16);
            co->commits++;
            free(op->seen);
            *op = co->ops[--co->nops];
        }
        return;
    }
    case F_SYNC_REQ: {
        int64_t e = (int64_t)el_get_u64(r);
        int64_t rev = (int64_t)el_get_u64(r);
        uint32_t n = el_get_u32(r);
        if (r->bad || n > EL_MAX_ARRAYS || r->len - r->off != (size_t)n * EL_HASH) break;
        if (!m || e != co->epoch || co->broken || co->sync_planned || m->sync_in) {
            struct member tmp = {.c = c};
            uint64_t ep = co->epoch;
            co->epoch = e;
            send_sync_result(co, &tmp, m ? EL_ERR_PEER_FAILURE : EL_ERR_NOT_MEMBER, 0,
                             m ? "the epoch failed or changed (call update_topology)" : "not a member (call update_topology)");
            co->epoch = (int64_t)ep;
            return;
        }
        m->sync_hashes = malloc((size_t)n * EL_HASH + 1);
        if (!m->sync_hashes) break;
        el_get(r, m->sync_hashes, (size_t)n * EL_HASH);
        m->sync_n = n;
        m->sync_revision = rev;
        m->sync_in = 1;
        try_sync(co);
        return;
    }
    case F_SYNC_DONE: {
        int64_t e = (int64_t)el_get_u64(r);
        uint32_t ok = el_get_u32(r);
        if (r->bad) break;
        if (!m || e != co->epoch || !m->sync_fetching) return; /* stale */
        m->sync_fetching = 0;
        if (!ok) { abort_epoch(co, "a peer could not fetch the shared state"); return; }
        if (--co->sync_fetchers_left == 0) finish_sync(co);
        return;
    }
    default: break;
    }
    c->closing = 2;
    logf_("peer %llu: malformed or unexpected message (type %d); dropped", (unsigned long long)c->id, type);
}

static void handle_frame(el_coordinator *co, struct client *c, int type, const uint8_t *p, uint32_t len)
{
    struct el_reader r = {.p = p, .len = len};
    c->last_seen = el_now_ms();
    if (c->state == C_HELLO) {
        uint32_t version = el_get_u32(&r);
        el_get(&r, c->pnonce, EL_NONCE);
        c->data_port = el_get_u16(&r);
        if (type != F_HELLO || r.bad || r.off != len || version != 1) { c->closing = 2; return; }
        el_random(c->cnonce, EL_NONCE);
        queue(c, F_CHALLENGE, c->cnonce, EL_NONCE);
        c->state = C_AUTH;
        return;
    }
    if (c->state == C_AUTH) {
        uint8_t mac[EL_MAC], want[EL_MAC];
        el_get(&r, mac, EL_MAC);
        if (type != F_AUTH || r.bad || r.off != len) { c->closing = 2; return; }
        el_hmac_sha256_parts(co->secret, co->secret_len, "commlib-peer", 12, c->cnonce, EL_NONCE, c->pnonce, EL_NONCE, want);
        char ip[INET_ADDRSTRLEN];
        if (!el_equal_secret(mac, want, EL_MAC)) {
            const char *why = "refused: wrong secret (the peer's secret does not match the coordinator's)";
            queue(c, F_REFUSED, why, strlen(why));
            c->closing = 1; /* after the flush */
            co->refused++;
            logf_("refused a peer from %s: wrong secret", ip_text(c->ip, ip));
            return;
        }
        c->id = ++co->next_id;
        struct el_buf b = {0};
        el_put_u64(&b, c->id);
        el_hmac_sha256_parts(co->secret, co->secret_len, "commlib-coordinator", 19, c->pnonce, EL_NONCE, c->cnonce, EL_NONCE, want);
        el_put(&b, want, EL_MAC);
        el_put_u32(&b, (uint32_t)co->timeout_ms);
        queue_buf(c, F_WELCOME, &b);
        free(b.p);
        c->state = C_READY;
        logf_("peer %llu connected from %s (waiting to be admitted)", (unsigned long long)c->id, ip_text(c->ip, ip));
        return;
    }
    handle_ready(co, c, type, &r);
}

/* Reads what is there without blocking; returns -1 to drop. */
static int read_client(el_coordinator *co, struct client *c)
{
    for (int rounds = 0; rounds < 64; rounds++) {
        if (c->header_got < EL_HEADER) {
            ssize_t n = recv(c->fd, c->header + c->header_got, EL_HEADER - c->header_got, 0);
            if (n == 0) return -1;
            if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? 0 : -1;
            c->header_got += (size_t)n;
            if (c->header_got < EL_HEADER) continue;
            /* Before authentication only tiny frames are allowed: nobody unauthenticated
             * makes the coordinator allocate a megabyte. */
            uint32_t cap = c->state == C_READY ? EL_MAX_FRAME : 256;
            if (el_parse_header(c->header, &c->payload_type, &c->payload_len, cap)) return -1;
            free(c->payload);
            c->payload = malloc(c->payload_len ? c->payload_len : 1);
            if (!c->payload) return -1;
            c->payload_got = 0;
        }
        if (c->payload_got < c->payload_len) {
            ssize_t n = recv(c->fd, c->payload + c->payload_got, c->payload_len - c->payload_got, 0);
            if (n == 0) return -1;
            if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? 0 : -1;
            c->payload_got += (uint32_t)n;
            if (c->payload_got < c->payload_len) continue;
        }
        handle_frame(co, c, c->payload_type, c->payload, c->payload_len);
        c->header_got = 0;
        if (c->closing) return 0;
    }
    return 0;
}

static int flush_client(struct client *c)
{
    while (c->out_off < c->out.len) {
        ssize_t n = send(c->fd, c->out.p + c->out_off, c->out.len - c->out_off, MSG_NOSIGNAL);
        if (n > 0) { c->out_off += (size_t)n; continue; }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return 0;
        return -1;
    }
    c->out_off = c->out.len = 0;
    return 0;
}

static void accept_clients(el_coordinator *co)
{
    for (int i = 0; i < 64; i++) {
        struct sockaddr_in a;
        socklen_t alen = sizeof a;
        int fd = accept4(co->listen_fd, (struct sockaddr *)&a, &alen, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return;
        struct client *c = co->nclients < MAX_CLIENTS ? calloc(1, sizeof *c) : NULL;
        if (!c) { close(fd); co->dropped++; continue; }
        el_tune_socket(fd);
        c->fd = fd;
        c->member = -1;
        c->ip = a.sin_addr.s_addr;
        c->last_seen = c->connected_at = el_now_ms();
        co->clients[co->nclients++] = c;
    }
}

static void *coordinator_main(void *arg)
{
    el_coordinator *co = arg;
    struct pollfd *fds = calloc(MAX_CLIENTS + 2, sizeof *fds);
    int64_t next_beat = 0;
    pthread_mutex_lock(&co->lock); /* held except while polling: el_coordinator_info reads under it */
    co->running = 1;
    for (;;) {
        int64_t now = el_now_ms();
        if (now >= next_beat) {
            for (int i = 0; i < co->nclients; i++)
                if (co->clients[i]->state == C_READY) queue(co->clients[i], F_HEARTBEAT, NULL, 0);
            next_beat = now + co->heartbeat_ms;
        }
        for (int i = co->nclients - 1; i >= 0; i--) {
            struct client *c = co->clients[i];
            /* Unauthenticated connections get one timeout to finish the handshake. */
            if (c->state != C_READY && now - c->connected_at > co->timeout_ms) { drop(co, i, "handshake timeout"); continue; }
            if (c->state == C_READY && now - c->last_seen > co->timeout_ms) { drop(co, i, "silent (heartbeat timeout)"); continue; }
            if (c->closing >= 2) { drop(co, i, c->closing == 3 ? "left" : "misbehaved"); continue; }
            if (flush_client(c) < 0) { drop(co, i, "connection lost"); continue; }
            if (c->closing == 1 && c->out.len == 0) drop(co, i, "refused");
        }
        try_topology(co);
        fds[0] = (struct pollfd){.fd = co->listen_fd, .events = POLLIN};
        fds[1] = (struct pollfd){.fd = co->wake[0], .events = POLLIN};
        for (int i = 0; i < co->nclients; i++)
            fds[i + 2] = (struct pollfd){.fd = co->clients[i]->fd,
                                         .events = (short)(POLLIN | (co->clients[i]->out.len ? POLLOUT : 0))};
        int n = co->nclients;
        pthread_mutex_unlock(&co->lock);
        int r = poll(fds, (nfds_t)n + 2, co->heartbeat_ms < 100 ? co->heartbeat_ms : 100);
        pthread_mutex_lock(&co->lock);
        if (r < 0 && errno != EINTR) {
            fprintf(stderr, "commlib coordinator: event loop ended: poll: %s\n", strerror(errno));
            break;
        }
        if (fds[1].revents) { /* stop asked - or the wake pipe broke, which must not pass silently */
            if (!(fds[1].revents & POLLIN)) fprintf(stderr, "commlib coordinator: event loop ended: wake pipe broke (revents %#x)\n", fds[1].revents);
            break;
        }
        /* Walk backwards: drop() moves the last client into the hole. */
        for (int i = n - 1; i >= 0; i--) {
            if (i >= co->nclients || !fds[i + 2].revents) continue;
            struct client *c = co->clients[i];
            if (c->fd != fds[i + 2].fd) continue;
            if ((fds[i + 2].revents & (POLLIN | POLLHUP | POLLERR)) && read_client(co, c) < 0) {
                drop(co, i, "disconnected");
                continue;
            }
        }
        if (fds[0].revents & POLLIN) accept_clients(co);
    }
    co->running = 0;
    pthread_mutex_unlock(&co->lock);
    free(fds);
    return NULL;
}

EL_API int el_coordinator_start(const char *host, int port, const uint8_t *secret, size_t secret_len, int min_peers,
                                el_coordinator **out, int *bound_port, char *err, size_t errlen)
{
    if (!secret || !secret_len || port < 0 || port > 65535) {
        snprintf(err, errlen, "a coordinator needs a non-empty secret and a port in 0..65535");
        return EL_ERR_ARG;
    }
    el_coordinator *co = calloc(1, sizeof *co);
    if (!co) return EL_ERR_SYSTEM;
    co->listen_fd = el_listen(host, port, bound_port);
    if (co->listen_fd < 0) {
        snprintf(err, errlen, "cannot listen on %s:%d: %s", host && *host ? host : "*", port, strerror(errno));
        free(co);
        return EL_ERR_SYSTEM;
    }
    if (pipe(co->wake)) { close(co->listen_fd); free(co); return EL_ERR_SYSTEM; }
    co->secret = malloc(secret_len);
    memcpy(co->secret, secret, secret_len);
    co->secret_len = secret_len;
    co->timeout_ms = (int)(el_knob_seconds("COMMLIB_ELASTIC_TIMEOUT", 2.5) * 1000);
    co->heartbeat_ms = co->timeout_ms / 6 > 20 ? co->timeout_ms / 6 : 20;
    co->min_peers = min_peers > 0 ? min_peers : 1;
    pthread_mutex_init(&co->lock, NULL);
    if (pthread_create(&co->thread, NULL, coordinator_main, co)) {
        close(co->listen_fd);
        close(co->wake[0]);
        close(co->wake[1]);
        free(co->secret);
        free(co);
        return EL_ERR_SYSTEM;
    }
    *out = co;
    return EL_OK;
}

EL_API void el_coordinator_stop(el_coordinator *co)
{
    if (!co) return;
    if (write(co->wake[1], "x", 1) < 0) { /* the loop also ends on its own at exit */ }
    pthread_join(co->thread, NULL);
    while (co->nclients) {
        co->clients[co->nclients - 1]->member = -1;
        drop(co, co->nclients - 1, "coordinator stopped");
    }
    reset_sync(co);
    reset_ops(co);
    free(co->members);
    close(co->listen_fd);
    close(co->wake[0]);
    close(co->wake[1]);
    free(co->secret);
    free(co);
}

EL_API size_t el_coordinator_info(el_coordinator *co, char *buf, size_t len)
{
    pthread_mutex_lock(&co->lock);
    int waiting = 0;
    for (int i = 0; i < co->nclients; i++) waiting += co->clients[i]->state == C_READY && co->clients[i]->member < 0;
    size_t n = (size_t)snprintf(buf, len,
                            "{\"epoch\":%lld,\"world\":%d,\"clients\":%d,\"waiting\":%d,\"dropped\":%lld,\"refused\":%lld,"
                            "\"commits\":%lld,\"aborts\":%lld,\"revision\":%lld,\"running\":%s}",
                            (long long)co->epoch, co->world, co->nclients, waiting, co->dropped, co->refused,
                            co->commits, co->aborts, (long long)co->last_revision, co->running ? "true" : "false");
    pthread_mutex_unlock(&co->lock);
    return n;
}
