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
    int role;     /* enum el_role from the HELLO */
    int upstream; /* this is a standby's link to its primary, not an accepted client */
    /* a standby client: its own standbys (a chain), told with F_STANDBYS */
    uint32_t chain_ip[EL_MAX_STANDBYS];
    uint16_t chain_port[EL_MAX_STANDBYS];
    int nchain;
    /* a resumed peer (F_RESUME): what it knew when its coordinator died */
    int resumed, r_rank, r_op_state, r_flags;
    int64_t r_epoch, r_rev;
    uint32_t r_world;
    uint64_t r_op_seq, r_committed;
    uint8_t *r_ring; /* r_world x (id, ip, port, 0) as sent */
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
    /* Failover.  A standby follows its primary over `up` and refuses peers; when the link
     * closes or goes silent it takes over: it rebuilds membership from the peers' RESUMEs
     * (recovering) and then serves as any coordinator does. */
    int standby;
    char primary[300];
    struct client *up;
    int recovering;
    int64_t recover_deadline;
    int64_t epoch_floor;         /* no epoch number at or below this may be formed again */
    uint64_t commit_seq;         /* highest seq committed in the current epoch */
    int64_t prev_epoch;          /* the epoch before, and its highest commit (late resumes) */
    uint64_t prev_commit_seq;
    long long failovers;
    long long resumed, resumed_waiting; /* RESUMEs; of them, with a reported operation awaiting its verdict */
    int standbys_dirty;
    uint64_t sent_next_id;       /* what the standbys were last told (F_COORD_STATE) */
    int64_t sent_epoch, sent_revision;
    int sent_synced, state_dirty;
    long long hold_verdict;      /* test knob: the n-th commit is held (see config.c) */
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

static void send_commit(struct client *c, int64_t epoch, uint64_t seq)
{
    uint8_t p[16];
    for (int i = 0; i < 8; i++) { p[i] = (uint8_t)((uint64_t)epoch >> (8 * i)); p[8 + i] = (uint8_t)(seq >> (8 * i)); }
    if (c) queue(c, F_COMMIT, p, 16);
}

static void send_abort(struct client *c, int64_t epoch)
{
    uint8_t p[8];
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)((uint64_t)epoch >> (8 * i));
    queue(c, F_ABORT, p, 8);
}

/* Member `rank` reported seq ok: COMMIT when every member has.  -1 on a duplicate report. */
static int op_reported(el_coordinator *co, int rank, uint64_t seq)
{
    struct pending_op *op = NULL;
    for (int i = 0; i < co->nops; i++)
        if (co->ops[i].seq == seq) op = &co->ops[i];
    if (!op) {
        if (co->nops == MAX_PENDING_OPS) { abort_epoch(co, "too many operations in flight"); return 0; }
        op = &co->ops[co->nops++];
        *op = (struct pending_op){.seq = seq, .seen = calloc((size_t)co->world, 1)};
        if (!op->seen) { co->nops--; abort_epoch(co, "out of memory"); return 0; }
    }
    if (op->seen[rank]) return -1;
    op->seen[rank] = 1;
    if (++op->reported == co->world) {
        co->commits++;
        if (co->hold_verdict && co->commits == co->hold_verdict) {
            /* Test knob: this verdict is never sent (the coordinator goes on heartbeating),
             * so a test can kill the coordinator while every peer waits for it. */
            fprintf(stderr, "commlib coordinator: holding the verdict of epoch %lld seq %llu\n", (long long)co->epoch,
                    (unsigned long long)seq);
        } else if (co->hold_verdict && co->commits == -co->hold_verdict) {
            /* Test knob, negative: the verdict reaches rank 0 only. */
            send_commit(co->members[0].c, co->epoch, seq);
            fprintf(stderr, "commlib coordinator: holding the verdict of epoch %lld seq %llu after rank 0\n",
                    (long long)co->epoch, (unsigned long long)seq);
        } else {
            for (int i = 0; i < co->world; i++) send_commit(co->members[i].c, co->epoch, seq);
        }
        if (seq > co->commit_seq) co->commit_seq = seq;
        free(op->seen);
        *op = co->ops[--co->nops];
    }
    return 0;
}

static void drop(el_coordinator *co, int index, const char *why)
{
    struct client *c = co->clients[index];
    char ip[INET_ADDRSTRLEN];
    if (c->state == C_READY && c->role == EL_ROLE_STANDBY) logf_("standby %s:%u %s", ip_text(c->ip, ip), (unsigned)c->data_port, why);
    else if (c->state == C_READY) logf_("peer %llu (%s) %s", (unsigned long long)c->id, ip_text(c->ip, ip), why);
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
    free(c->r_ring);
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
        if (c->state == C_READY && c->role != EL_ROLE_STANDBY && c->member < 0 && c->topo_req && !c->closing && nj < EL_MAX_MEMBERS)
            joiners[nj++] = c;
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
        co->prev_epoch = co->epoch;
        co->prev_commit_seq = co->commit_seq;
        co->commit_seq = 0;
        /* Monotonic across failovers: a peer may know an epoch this coordinator never
         * formed (its predecessor did); reusing the number would look like "no change". */
        co->epoch = (co->epoch > co->epoch_floor ? co->epoch : co->epoch_floor) + 1;
        co->epoch_floor = co->epoch;
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
        if (op_reported(co, c->member, seq) < 0) break; /* a duplicate report is a protocol error */
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

/* ---- failover ---- */

static int read_standbys(struct el_reader *r, uint32_t *ips, uint16_t *ports, int *n)
{
    uint32_t k = el_get_u32(r);
    if (r->bad || k > EL_MAX_STANDBYS || r->len - r->off != (size_t)k * 8) return -1;
    for (uint32_t i = 0; i < k; i++) {
        ips[i] = el_get_u32(r);
        ports[i] = el_get_u16(r);
        el_get_u16(r);
    }
    *n = (int)k;
    return 0;
}

/* The standbys peers should turn to if this coordinator dies: each standby connected here,
 * then the standbys of that standby (a chain), in order. */
static void standby_list(el_coordinator *co, struct el_buf *b)
{
    uint32_t ips[EL_MAX_STANDBYS];
    uint16_t ports[EL_MAX_STANDBYS];
    int n = 0;
    for (int i = 0; i < co->nclients; i++) {
        struct client *c = co->clients[i];
        if (c->state != C_READY || c->role != EL_ROLE_STANDBY || c->closing) continue;
        if (n < EL_MAX_STANDBYS) { ips[n] = c->ip; ports[n++] = c->data_port; }
        for (int j = 0; j < c->nchain && n < EL_MAX_STANDBYS; j++) { ips[n] = c->chain_ip[j]; ports[n++] = c->chain_port[j]; }
    }
    el_put_u32(b, (uint32_t)n);
    for (int i = 0; i < n; i++) {
        el_put_u32(b, ips[i]);
        el_put_u16(b, ports[i]);
        el_put_u16(b, 0);
    }
}

/* To a peer just welcomed: only when there are standbys, so a peer that knows nothing of
 * failover never sees the frame. */
static void send_standbys(el_coordinator *co, struct client *c)
{
    struct el_buf b = {0};
    standby_list(co, &b);
    if (b.len > 4) queue_buf(c, F_STANDBYS, &b);
    free(b.p);
}

static void broadcast_standbys(el_coordinator *co)
{
    co->standbys_dirty = 0;
    struct el_buf b = {0};
    standby_list(co, &b);
    for (int i = 0; i < co->nclients; i++) {
        struct client *c = co->clients[i];
        if (c->state == C_READY && c->role != EL_ROLE_STANDBY) queue_buf(c, F_STANDBYS, &b);
    }
    if (co->up) queue_buf(co->up, F_STANDBYS, &b); /* a standby tells its primary its own standbys */
    free(b.p);
}

/* Primary -> standbys: the numbers a successor must never go below. */
static void broadcast_state(el_coordinator *co)
{
    if (!co->state_dirty && co->sent_next_id == co->next_id && co->sent_epoch == co->epoch &&
        co->sent_revision == co->last_revision && co->sent_synced == co->synced_once)
        return;
    co->state_dirty = 0;
    co->sent_next_id = co->next_id;
    co->sent_epoch = co->epoch;
    co->sent_revision = co->last_revision;
    co->sent_synced = co->synced_once;
    struct el_buf b = {0};
    el_put_u64(&b, co->next_id);
    el_put_u64(&b, (uint64_t)(co->epoch > co->epoch_floor ? co->epoch : co->epoch_floor));
    el_put_u64(&b, (uint64_t)co->last_revision);
    el_put_u32(&b, (uint32_t)co->synced_once);
    for (int i = 0; i < co->nclients; i++) {
        struct client *c = co->clients[i];
        if (c->state == C_READY && c->role == EL_ROLE_STANDBY) queue_buf(c, F_COORD_STATE, &b);
    }
    free(b.p);
}

static void handle_upstream(el_coordinator *co, struct client *c, int type, struct el_reader *r)
{
    if (type == F_HEARTBEAT) return;
    if (type == F_COORD_STATE) {
        uint64_t next_id = el_get_u64(r);
        int64_t epoch = (int64_t)el_get_u64(r), rev = (int64_t)el_get_u64(r);
        uint32_t synced = el_get_u32(r);
        if (r->bad || r->off != r->len) { c->closing = 2; return; }
        if (next_id > co->next_id) co->next_id = next_id;
        if (epoch > co->epoch_floor) co->epoch_floor = epoch;
        co->last_revision = rev;
        co->synced_once = synced != 0;
        return; /* a change reaches this standby's own standbys through broadcast_state */
    }
    logf_("primary %s sent an unexpected message (type %d)", co->primary, type);
    c->closing = 2;
}

/* The primary is gone (or silent): this standby becomes the active coordinator.  Peers
 * come back with RESUME; until every member of the newest epoch they know has (or one
 * timeout passed) nothing is decided. */
static void take_over(el_coordinator *co, const char *why)
{
    struct client *up = co->up;
    co->up = NULL;
    if (up) {
        close(up->fd);
        free(up->payload);
        free(up->out.p);
        free(up);
    }
    co->standby = 0;
    co->failovers++;
    /* Ids the primary handed out after its last F_COORD_STATE are still unknown here: a
     * wide gap keeps fresh ids clear of them (resumed ids also raise next_id). */
    co->next_id += 1u << 20;
    co->epoch = co->epoch_floor;
    co->recovering = 1;
    co->recover_deadline = el_now_ms() + co->timeout_ms;
    co->standbys_dirty = co->state_dirty = 1;
    logf_("primary %s lost (%s): this standby takes over (epoch floor %lld, revision %lld)", co->primary, why,
          (long long)co->epoch_floor, (long long)co->last_revision);
}

static int handle_resume(el_coordinator *co, struct client *c, struct el_reader *r)
{
    uint64_t id = el_get_u64(r);
    int64_t epoch = (int64_t)el_get_u64(r);
    uint32_t rank = el_get_u32(r), world = el_get_u32(r);
    int64_t rev = (int64_t)el_get_u64(r);
    uint32_t flags = el_get_u32(r);
    uint64_t op_seq = el_get_u64(r);
    uint32_t op_state = el_get_u32(r);
    uint64_t committed = el_get_u64(r);
    if (r->bad || !id || world > EL_MAX_MEMBERS || op_state > 2 || r->len - r->off != (size_t)world * 16) return -1;
    if (epoch >= 0 ? (world < 1 || rank >= world) : world != 0) return -1;
    c->r_ring = malloc((size_t)world * 16 + 1);
    if (!c->r_ring) return -1;
    el_get(r, c->r_ring, (size_t)world * 16);
    c->id = id;
    c->r_epoch = epoch;
    c->r_rank = (int)rank;
    c->r_world = world;
    c->r_rev = rev;
    c->r_flags = (int)flags;
    c->r_op_seq = op_seq;
    c->r_op_state = (int)op_state;
    c->r_committed = committed;
    c->resumed = 1; /* applied by the event loop: at the recovery decision, or as a late resume */
    co->resumed++;
    co->resumed_waiting += epoch >= 0 && op_state == 1 && op_seq > committed;
    c->topo_req = (flags & EL_RF_IN_TOPO) != 0;
    if (id > co->next_id) co->next_id = id;
    if (epoch > co->epoch_floor) co->epoch_floor = epoch;
    /* The same peer may still hold its old connection here (it gave up on silence first):
     * that one goes, like any member whose connection died. */
    for (int i = 0; i < co->nclients; i++) {
        struct client *o = co->clients[i];
        if (o != c && o->state == C_READY && o->role != EL_ROLE_STANDBY && o->id == id) o->closing = 2;
    }
    char ip[INET_ADDRSTRLEN];
    logf_("peer %llu resumed from %s (epoch %lld, rank %u of %u, op %llu %s, committed %llu)", (unsigned long long)id,
          ip_text(c->ip, ip), (long long)epoch, rank, world, (unsigned long long)op_seq,
          op_state == 1 ? "ok" : op_state == 2 ? "failed" : "-", (unsigned long long)committed);
    return 0;
}

/* While recovering nothing is decided: what resumed peers send is folded into their record. */
static void note_while_recovering(el_coordinator *co, struct client *c, int type, struct el_reader *r)
{
    switch (type) {
    case F_HEARTBEAT: return;
    case F_TOPO_REQ: c->topo_req = 1; return;
    case F_LEAVE: c->closing = 3; return;
    case F_OP_DONE: {
        int64_t e = (int64_t)el_get_u64(r);
        uint64_t seq = el_get_u64(r);
        uint32_t ok = el_get_u32(r);
        if (r->bad) break;
        if (c->resumed && e == c->r_epoch && c->r_world) { c->r_op_seq = seq; c->r_op_state = ok ? 1 : 2; }
        else send_abort(c, e);
        return;
    }
    case F_SYNC_REQ:
        if (c->resumed && c->r_world) c->r_flags |= EL_RF_IN_SYNC;
        else {
            struct member tmp = {.c = c};
            send_sync_result(co, &tmp, EL_ERR_NOT_MEMBER, 0, "not a member (call update_topology)");
        }
        return;
    case F_SYNC_DONE: return; /* the sync it belongs to fails anyway (EL_RF_IN_SYNC) */
    case F_EPOCH_FAIL: {
        int64_t e = (int64_t)el_get_u64(r);
        if (!r->bad && c->resumed && e == c->r_epoch) c->r_flags |= EL_RF_RING_FAIL;
        return;
    }
    default: break;
    }
    c->closing = 2;
    logf_("peer %llu: malformed or unexpected message while recovering (type %d); dropped", (unsigned long long)c->id, type);
}

static struct client *resumed_with_id(el_coordinator *co, uint64_t id)
{
    for (int i = 0; i < co->nclients; i++) {
        struct client *c = co->clients[i];
        if (c->resumed == 1 && !c->closing && c->id == id) return c;
    }
    return NULL;
}

/* The peer with the newest epoch among those that resumed: its ring is the membership. */
static struct client *newest_resume(el_coordinator *co)
{
    struct client *ref = NULL;
    for (int i = 0; i < co->nclients; i++) {
        struct client *c = co->clients[i];
        if (c->resumed == 1 && !c->closing && c->r_world && (!ref || c->r_epoch > ref->r_epoch)) ref = c;
    }
    return ref;
}

static uint64_t ring_id(const struct client *c, uint32_t i)
{
    struct el_reader r = {.p = c->r_ring + (size_t)i * 16, .len = 16};
    return el_get_u64(&r);
}

/* The verdicts the dead coordinator owed, from what the peers say.  The invariant is the
 * one of the whole engine: no peer commits an operation another survivor rolled back.
 * - a member that received COMMIT s proves the primary committed s: everyone pending on
 *   s gets COMMIT (each holds the scratch result, so the bytes are the same);
 * - otherwise an operation commits only when every member reported it ok, here or there;
 * - a member that saw ABORT, failed, could not build the ring or did not come back aborts
 *   the epoch, for everyone (after the commits above, in each peer's ordered stream). */
static void decide_recovery(el_coordinator *co)
{
    co->recovering = 0;
    struct client *ref = newest_resume(co);
    for (int i = 0; i < co->nclients; i++) {
        struct client *c = co->clients[i];
        if (c->resumed != 1 || c->closing) continue;
        if (c->r_epoch > co->epoch_floor) co->epoch_floor = c->r_epoch;
        if (c->r_rev > co->last_revision) co->last_revision = c->r_rev;
        if (c->r_flags & EL_RF_SYNCED) co->synced_once = 1;
    }
    reset_sync(co);
    reset_ops(co);
    free(co->members);
    co->members = NULL;
    co->world = 0;
    co->broken = co->dirty = 0;
    co->commit_seq = 0;
    if (!ref) {
        co->epoch = co->epoch_floor;
        logf_("took over: no epoch to resume");
    } else {
        int64_t E = ref->r_epoch;
        uint32_t world = ref->r_world;
        co->members = calloc(world, sizeof *co->members);
        if (!co->members) { co->recovering = 1; return; } /* tried again next round */
        co->epoch = E;
        co->world = (int)world;
        co->formed_once = 1;
        int missing = 0, broken = 0, in_sync = 0;
        uint64_t max_c = 0;
        for (uint32_t i = 0; i < world; i++) {
            struct member *m = &co->members[i];
            struct el_reader r = {.p = ref->r_ring + (size_t)i * 16, .len = 16};
            m->id = el_get_u64(&r);
            m->ip = el_get_u32(&r);
            m->port = el_get_u16(&r);
            struct client *c = resumed_with_id(co, m->id);
            if (!c) { missing++; continue; }
            m->alive = 1;
            m->c = c;
            c->member = (int)i;
            if (c->r_epoch != E) continue;
            if (c->r_rank != (int)i || c->r_world != world || memcmp(c->r_ring, ref->r_ring, (size_t)world * 16)) broken = 1;
            if (c->r_flags & (EL_RF_ABORTED | EL_RF_RING_FAIL) || c->r_op_state == 2) broken = 1;
            if (c->r_committed > max_c) max_c = c->r_committed;
            if (c->r_flags & EL_RF_IN_SYNC) { in_sync = 1; m->sync_in = 1; }
        }
        co->commit_seq = max_c;
        int commits = 0;
        for (uint32_t i = 0; i < world; i++) {
            struct member *m = &co->members[i];
            struct client *c = m->c;
            if (!c) continue;
            if (c->r_epoch < E) {
                /* The primary formed E but this member's TOPO never arrived: it still waits
                 * in update_topology, and the others already build E's ring. */
                if (c->topo_req) { c->topo_req = 0; send_topology(co, m, (int)i); }
                continue;
            }
            if (c->r_op_state != 1 || c->r_op_seq <= c->r_committed) continue;
            if (c->r_op_seq <= max_c) { send_commit(c, E, c->r_op_seq); commits = 1; }
            else if (!broken && !missing) op_reported(co, (int)i, c->r_op_seq);
        }
        co->commits += commits;
        logf_("took over epoch %lld: %u member(s), %d missing; %s", (long long)E, world, missing,
              commits ? "committed the operation the primary had committed" : "no verdict was owed by commit");
        if (missing) abort_epoch(co, "member(s) did not come back after the coordinator failover");
        else if (broken) abort_epoch(co, "a member had failed or seen an abort before the coordinator failover");
        else if (in_sync) abort_epoch(co, "sync_state was in flight at the coordinator failover (call update_topology and retry)");
    }
    /* Everyone else waits to be admitted; peers of an older epoch owe nothing. */
    for (int i = 0; i < co->nclients; i++) {
        struct client *c = co->clients[i];
        if (c->resumed != 1) continue;
        c->resumed = 2;
        if (c->member >= 0) continue;
        if (c->r_world && c->r_op_state == 1 && c->r_op_seq > c->r_committed) send_abort(c, c->r_epoch);
        if (c->r_world && (c->r_flags & EL_RF_IN_SYNC)) {
            struct member tmp = {.c = c};
            send_sync_result(co, &tmp, EL_ERR_PEER_FAILURE, 0, "the coordinator failed over; call update_topology");
        }
    }
    co->state_dirty = 1;
}

/* A peer that resumed after the decision (or reconnected to a coordinator that never
 * died): it is no member any more; its in-flight operation gets the verdict the others
 * got (COMMIT when its epoch committed that seq, else ABORT). */
static void late_resume(el_coordinator *co, struct client *c)
{
    c->resumed = 2;
    if (!c->r_world) return;
    if (c->r_op_state == 1 && c->r_op_seq > c->r_committed) {
        uint64_t done = c->r_epoch == co->epoch ? co->commit_seq : c->r_epoch == co->prev_epoch ? co->prev_commit_seq : 0;
        if (c->r_op_seq <= done) send_commit(c, c->r_epoch, c->r_op_seq);
        send_abort(c, c->r_epoch);
    } else if (c->r_flags & EL_RF_IN_SYNC || c->r_op_state) {
        send_abort(c, c->r_epoch);
    }
    if (c->r_flags & EL_RF_IN_SYNC) {
        struct member tmp = {.c = c};
        send_sync_result(co, &tmp, EL_ERR_PEER_FAILURE, 0, "this peer lost the coordinator; call update_topology");
    }
    char ip[INET_ADDRSTRLEN];
    logf_("peer %llu (%s) came back too late for epoch %lld: waits to be admitted", (unsigned long long)c->id,
          ip_text(c->ip, ip), (long long)c->r_epoch);
}

static void check_recovery(el_coordinator *co)
{
    if (co->standby) return;
    if (!co->recovering) {
        for (int i = 0; i < co->nclients; i++)
            if (co->clients[i]->resumed == 1 && !co->clients[i]->closing) late_resume(co, co->clients[i]);
        return;
    }
    struct client *ref = newest_resume(co);
    int all = ref != NULL;
    for (uint32_t i = 0; ref && i < ref->r_world && all; i++) all = resumed_with_id(co, ring_id(ref, i)) != NULL;
    if (all || el_now_ms() >= co->recover_deadline) decide_recovery(co);
}

static void handle_frame(el_coordinator *co, struct client *c, int type, const uint8_t *p, uint32_t len)
{
    struct el_reader r = {.p = p, .len = len};
    c->last_seen = el_now_ms();
    if (c->state == C_HELLO) {
        uint32_t version = el_get_u32(&r);
        el_get(&r, c->pnonce, EL_NONCE);
        c->data_port = el_get_u16(&r);
        c->role = r.off < len ? (int)el_get_u32(&r) : EL_ROLE_PEER;
        if (type != F_HELLO || r.bad || r.off != len || version != 1 || c->role < 0 || c->role > EL_ROLE_RESUME) {
            c->closing = 2;
            return;
        }
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
        if (co->standby && c->role != EL_ROLE_STANDBY) {
            /* Two coordinators must never serve peers at once while the primary lives:
             * the peer goes on to its next address. */
            char why[400];
            snprintf(why, sizeof why, EL_REFUSE_STANDBY "%s, not active (the primary lives)", co->primary);
            queue(c, F_REFUSED, why, strlen(why));
            c->closing = 1;
            co->refused++;
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
        if (c->role == EL_ROLE_STANDBY) {
            logf_("standby coordinator %s:%u connected", ip_text(c->ip, ip), (unsigned)c->data_port);
            co->standbys_dirty = 1;
            co->state_dirty = 1;
        } else {
            if (c->role == EL_ROLE_PEER)
                logf_("peer %llu connected from %s (waiting to be admitted)", (unsigned long long)c->id, ip_text(c->ip, ip));
            send_standbys(co, c);
        }
        return;
    }
    if (c->upstream) { handle_upstream(co, c, type, &r); return; }
    if (c->role == EL_ROLE_STANDBY) {
        if (type == F_HEARTBEAT) return;
        if (type == F_STANDBYS && read_standbys(&r, c->chain_ip, c->chain_port, &c->nchain) == 0) {
            co->standbys_dirty = 1;
            return;
        }
        c->closing = 2;
        logf_("standby: unexpected message (type %d); dropped", type);
        return;
    }
    if (c->role == EL_ROLE_RESUME && !c->resumed) {
        if (type != F_RESUME || handle_resume(co, c, &r) < 0) {
            c->closing = 2;
            logf_("resuming peer: malformed or missing RESUME; dropped");
        }
        return;
    }
    if (co->recovering) { note_while_recovering(co, c, type, &r); return; }
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
    struct pollfd *fds = calloc(MAX_CLIENTS + 3, sizeof *fds);
    int64_t next_beat = 0;
    pthread_mutex_lock(&co->lock); /* held except while polling: el_coordinator_info reads under it */
    co->running = 1;
    for (;;) {
        int64_t now = el_now_ms();
        if (now >= next_beat) {
            for (int i = 0; i < co->nclients; i++)
                if (co->clients[i]->state == C_READY) queue(co->clients[i], F_HEARTBEAT, NULL, 0);
            if (co->up) queue(co->up, F_HEARTBEAT, NULL, 0);
            next_beat = now + co->heartbeat_ms;
        }
        if (co->up) {
            /* The primary's death is this standby's cue: its connection closes (a killed
             * process), misbehaves, or goes silent for one timeout (a hung host). */
            if (now - co->up->last_seen > co->timeout_ms) take_over(co, "silent (heartbeat timeout)");
            else if (co->up->closing >= 2) take_over(co, "misbehaved");
            else if (flush_client(co->up) < 0) take_over(co, "connection lost");
        }
        for (int i = co->nclients - 1; i >= 0; i--) {
            struct client *c = co->clients[i];
            /* Unauthenticated connections get one timeout to finish the handshake. */
            if (c->state != C_READY && now - c->connected_at > co->timeout_ms) { drop(co, i, "handshake timeout"); continue; }
            if (c->state == C_READY && now - c->last_seen > co->timeout_ms) { drop(co, i, "silent (heartbeat timeout)"); continue; }
            if (c->closing >= 2) {
                if (c->role == EL_ROLE_STANDBY && c->state == C_READY) co->standbys_dirty = 1;
                drop(co, i, c->closing == 3 ? "left" : "misbehaved");
                continue;
            }
            if (flush_client(c) < 0) {
                if (c->role == EL_ROLE_STANDBY && c->state == C_READY) co->standbys_dirty = 1;
                drop(co, i, "connection lost");
                continue;
            }
            if (c->closing == 1 && c->out.len == 0) drop(co, i, "refused");
        }
        check_recovery(co);
        if (!co->standby && !co->recovering) try_topology(co);
        if (co->standbys_dirty) broadcast_standbys(co);
        broadcast_state(co);
        fds[0] = (struct pollfd){.fd = co->listen_fd, .events = POLLIN};
        fds[1] = (struct pollfd){.fd = co->wake[0], .events = POLLIN};
        fds[2] = (struct pollfd){.fd = co->up ? co->up->fd : -1, .events = (short)(POLLIN | (co->up && co->up->out.len ? POLLOUT : 0))};
        for (int i = 0; i < co->nclients; i++)
            fds[i + 3] = (struct pollfd){.fd = co->clients[i]->fd,
                                         .events = (short)(POLLIN | (co->clients[i]->out.len ? POLLOUT : 0))};
        int n = co->nclients;
        pthread_mutex_unlock(&co->lock);
        int r = poll(fds, (nfds_t)n + 3, co->heartbeat_ms < 100 ? co->heartbeat_ms : 100);
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
            if (i >= co->nclients || !fds[i + 3].revents) continue;
            struct client *c = co->clients[i];
            if (c->fd != fds[i + 3].fd) continue;
            if ((fds[i + 3].revents & (POLLIN | POLLHUP | POLLERR)) && read_client(co, c) < 0) {
                if (c->role == EL_ROLE_STANDBY && c->state == C_READY) co->standbys_dirty = 1;
                drop(co, i, "disconnected");
                continue;
            }
        }
        if (co->up && (fds[2].revents & (POLLIN | POLLHUP | POLLERR)) && read_client(co, co->up) < 0)
            take_over(co, "its connection closed");
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
    return el_coordinator_start_ex(host, port, secret, secret_len, min_peers, NULL, out, bound_port, err, errlen);
}

/* A standby's link to its primary: the peer handshake with the standby role, done here
 * (blocking, one timeout) so that a wrong secret or an unreachable primary fails the start. */
static int connect_upstream(el_coordinator *co, const char *standby_of, int bound_port, char *err, size_t errlen)
{
    char host[256], why[300];
    int port;
    uint32_t ip;
    if (el_parse_address(standby_of, host, sizeof host, &port) || el_resolve(host, &ip)) {
        snprintf(err, errlen, "standby_of %s is not a reachable HOST:PORT", standby_of);
        return EL_ERR_ARG;
    }
    int64_t deadline = el_now_ms() + co->timeout_ms + 1000;
    int fd = el_connect(ip, port, deadline);
    if (fd < 0) {
        snprintf(err, errlen, "standby: cannot connect to the primary coordinator at %s: %s", standby_of,
                 strerror(errno ? errno : ECONNREFUSED));
        return EL_ERR_COORDINATOR;
    }
    uint64_t id;
    int timeout;
    int rc = el_handshake(fd, co->secret, co->secret_len, EL_ROLE_STANDBY, bound_port, deadline, &id, &timeout, why, sizeof why);
    if (rc) {
        close(fd);
        snprintf(err, errlen, "standby: the primary coordinator at %s %s", standby_of, why);
        return rc;
    }
    struct client *up = calloc(1, sizeof *up);
    if (!up) { close(fd); return EL_ERR_SYSTEM; }
    el_tune_socket(fd);
    up->fd = fd;
    up->member = -1;
    up->state = C_READY;
    up->upstream = 1;
    up->ip = ip;
    up->last_seen = up->connected_at = el_now_ms();
    co->up = up;
    co->standby = 1;
    snprintf(co->primary, sizeof co->primary, "%s", standby_of);
    return EL_OK;
}

EL_API int el_coordinator_start_ex(const char *host, int port, const uint8_t *secret, size_t secret_len, int min_peers,
                                   const char *standby_of, el_coordinator **out, int *bound_port, char *err, size_t errlen)
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
    co->hold_verdict = el_knob_int("COMMLIB_ELASTIC_TEST_HOLD_VERDICT", 0, -1000000, 1000000);
    co->prev_epoch = -1;
    if (standby_of && *standby_of) {
        int rc = connect_upstream(co, standby_of, *bound_port, err, errlen);
        if (rc) {
            close(co->listen_fd);
            close(co->wake[0]);
            close(co->wake[1]);
            free(co->secret);
            free(co);
            return rc;
        }
    }
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
    if (co->up) {
        close(co->up->fd);
        free(co->up->payload);
        free(co->up->out.p);
        free(co->up);
    }
    close(co->listen_fd);
    close(co->wake[0]);
    close(co->wake[1]);
    free(co->secret);
    free(co);
}

EL_API size_t el_coordinator_info(el_coordinator *co, char *buf, size_t len)
{
    pthread_mutex_lock(&co->lock);
    int waiting = 0, standbys = 0;
    for (int i = 0; i < co->nclients; i++) {
        struct client *c = co->clients[i];
        if (c->state != C_READY) continue;
        if (c->role == EL_ROLE_STANDBY) standbys++;
        else waiting += c->member < 0;
    }
    size_t n = (size_t)snprintf(buf, len,
                            "{\"epoch\":%lld,\"world\":%d,\"clients\":%d,\"waiting\":%d,\"dropped\":%lld,\"refused\":%lld,"
                            "\"commits\":%lld,\"aborts\":%lld,\"revision\":%lld,\"running\":%s,\"role\":\"%s\","
                            "\"recovering\":%s,\"failovers\":%lld,\"standbys\":%d,\"resumed\":%lld,"
                            "\"resumed_waiting\":%lld}",
                            (long long)co->epoch, co->world, co->nclients, waiting, co->dropped, co->refused,
                            co->commits, co->aborts, (long long)co->last_revision, co->running ? "true" : "false",
                            co->standby ? "standby" : "active", co->recovering ? "true" : "false", co->failovers, standbys,
                            co->resumed, co->resumed_waiting);
    pthread_mutex_unlock(&co->lock);
    return n;
}
