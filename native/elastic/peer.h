/* A peer's state and the helpers its files share: peer.c (the coordinator connection,
 * membership, authenticated data connections, the ring's connections), ring.c (the ring
 * all-reduce) and state.c (sync_state and the state transfer). */
#ifndef COMMLIB_ELASTIC_PEER_H
#define COMMLIB_ELASTIC_PEER_H

#include "internal.h"

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

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

#define ADDR_MAX (16 + EL_MAX_STANDBYS)
struct coord_addr { uint32_t ip; uint16_t port; };

struct el_peer {
    int coord_fd, listen_fd, data_port;
    /* Coordinator addresses: the ones given (in order), then the standbys the coordinator
     * told (F_STANDBYS, control thread, under lock).  With more than one, a lost
     * coordinator connection is re-established within failover_ms (control thread). */
    struct coord_addr addrs[ADDR_MAX];
    int naddr_given, naddr, cur_addr, failover_ms, closing;
    long long failovers;
    /* What a RESUME reports, written with the frame that changes it, under send_lock:
     * a frame sent before a reconnection is in the RESUME, one sent after is not. */
    int in_topo, in_sync, op_state, synced;
    uint64_t op_seq;
    uint64_t last_commit; /* highest seq committed in commit_epoch (control thread, lock) */
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
    char lost_why[800];
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
    struct el_throttle *throttle; /* slow-link knobs and data-byte counters (throttle.c) */
    struct pending_conn pend[PENDING_MAX]; /* accepted data connections not read to the end yet */
    int npend;
    char err[512];
};

/* Sets p->err; returns rc. */
int fail(el_peer *p, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Wakes whoever polls the pipe / empties it. */
void poke(int fd);
void drain(int fd);
/* One control frame to the coordinator (any thread). */
int send_coord(el_peer *p, int type, const void *payload, size_t len);
/* rc of a failed send to the coordinator, or EL_OK when a failover can still carry what
 * it said (see reconnect in peer.c). */
int send_failed(el_peer *p, int rc);
/* The coordinator connection is gone: every wait ends. */
void mark_lost(el_peer *p, const char *why);
/* The control thread files the coordinator's answers as mail: the first of either type
 * (lock held), freeing one, and waiting for one until deadline_ms (< 0: while the
 * coordinator lives). */
struct mail *take_mail(el_peer *p, int t1, int t2);
void free_mail(struct mail *m);
struct mail *wait_mail(el_peer *p, int t1, int t2, int64_t deadline_ms, int *rc);
/* The current epoch was aborted, or the coordinator is lost. */
int epoch_aborted(el_peer *p);

/* Authenticated data connections (ring links, kind 0; state fetches, kind 1): the
 * connecting side sends an intent (kind, epoch, from, to, index), the accepting side
 * answers with a nonce, the connecting side proves the secret with a MAC over both. */
void intent(uint8_t *b, uint32_t kind, int64_t epoch, uint64_t from, uint64_t to, uint32_t index);
int data_connect(el_peer *p, const struct ring_member *to, uint32_t kind, uint32_t index, int64_t deadline, int *fd_out);
int data_accept(el_peer *p, int64_t deadline, uint32_t want_kind, int *fd_out, uint64_t *from, uint32_t *index,
                uint8_t nonce[EL_NONCE], uint8_t got_intent[INTENT_LEN]);
void drop_pending(el_peer *p);
int data_mac_send(el_peer *p, int fd, const uint8_t *sent_intent, int64_t deadline);
int data_mac_check(el_peer *p, int fd, const uint8_t *nonce, const uint8_t *got_intent, int64_t deadline);

/* ---- slow links on one machine, data-byte counters (throttle.c) ---- */
struct el_throttle;
struct el_throttle *el_throttle_new(void); /* reads COMMLIB_ELASTIC_RATE_MBIT, _LATENCY_MS */
void el_throttle_free(struct el_throttle *t);
int64_t el_now_ns(void);
/* The peer's bucket when a rate is set (NULL: unlimited); its modelled latency. */
struct el_throttle *el_paced(el_peer *p);
int64_t el_latency_ns(el_peer *p);
/* Up to want bytes the caller may send now; 0 with *wait_ns until it may try again. */
size_t el_throttle_take(struct el_throttle *t, size_t want, int64_t *wait_ns);
void el_throttle_return(struct el_throttle *t, size_t unused);
void el_count_sent(el_peer *p, uint64_t n);
void el_count_received(el_peer *p, uint64_t n);
/* Sleeps ns unless wake_fd becomes readable (EL_ERR_PEER_FAILURE). */
int el_pause(int64_t ns, int wake_fd);
/* Whole-buffer I/O on a data connection, paced and counted; fails after idle_ms without
 * a byte moving (a moving deadline: long transfers take as long as they take). */
int el_paced_write(el_peer *p, int fd, const void *buf, size_t len, int idle_ms, int wake_fd);
int el_idle_read(el_peer *p, int fd, void *buf, size_t len, int idle_ms, int wake_fd);

#endif
