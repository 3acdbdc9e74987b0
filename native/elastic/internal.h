/* Internals shared by the elastic engine's files (see elastic.h for the protocol). */
#ifndef COMMLIB_ELASTIC_INTERNAL_H
#define COMMLIB_ELASTIC_INTERNAL_H

#include "elastic.h"

#include <stddef.h>
#include <stdint.h>

#define EL_MAGIC 0x4c454c43u     /* "CLEL" little-endian */
#define EL_HEADER 12
#define EL_MAX_FRAME (1u << 20)  /* control frames: generous for 4096 arrays' hashes */
#define EL_MAX_ARRAYS 4096
#define EL_MAX_MEMBERS 1024
#define EL_NONCE 32
#define EL_MAC 32
#define EL_HASH 32

enum el_frame {
    F_HELLO = 1,     /* peer -> coord: version, peer nonce, data port */
    F_CHALLENGE,     /* coord -> peer: coordinator nonce */
    F_AUTH,          /* peer -> coord: HMAC("peer" | cnonce | pnonce) */
    F_WELCOME,       /* coord -> peer: peer id, HMAC("coordinator" | pnonce | cnonce) */
    F_REFUSED,       /* coord -> peer: reason text, then close */
    F_HEARTBEAT,     /* both ways, empty */
    F_TOPO_REQ,      /* peer -> coord: empty */
    F_TOPO,          /* coord -> peer: epoch, rank, world, k, members (id, ipv4, port) */
    F_OP_DONE,       /* peer -> coord: epoch, seq, ok */
    F_COMMIT,        /* coord -> peer: epoch, seq */
    F_ABORT,         /* coord -> peer: epoch (every uncommitted operation of it fails) */
    F_SYNC_REQ,      /* peer -> coord: epoch, revision, n, hashes */
    F_SYNC_PLAN,     /* coord -> peer: status, revision, source rank (-1: up to date), n, majority hashes */
    F_SYNC_DONE,     /* peer -> coord: epoch, ok */
    F_SYNC_RESULT,   /* coord -> peer: epoch, ok, revision */
    F_LEAVE,         /* peer -> coord: graceful leave */
    F_EPOCH_FAIL,    /* peer -> coord: epoch; building the ring failed */
    F_RESUME,        /* peer -> new coord, right after WELCOME: what the peer knows (see el_resume) */
    F_STANDBYS,      /* coord -> peer, standby -> its primary: n, (ipv4, port) of the standbys */
    F_COORD_STATE,   /* primary -> standby: next id, epoch, last revision, synced (floors for a takeover) */
    F_LAST
};

/* HELLO's optional last field: who connects.  A peer that lost its coordinator comes back
 * as EL_ROLE_RESUME and sends F_RESUME right after the WELCOME. */
enum el_role { EL_ROLE_PEER = 0, EL_ROLE_STANDBY = 1, EL_ROLE_RESUME = 2 };
#define EL_MAX_STANDBYS 16
/* The refusal a standby gives peers starts with this: not an authentication failure,
 * "try the next address". */
#define EL_REFUSE_STANDBY "standby of "

/* F_RESUME payload: u64 id, i64 epoch (-1: not a member), u32 rank, u32 world, i64 last
 * revision, u32 flags, u64 seq of the operation last reported (0: none), u32 its report (0
 * none, 1 ok, 2 failed), u64 highest seq committed in the epoch, then world x (u64 id, u32
 * ipv4, u16 port, u16 0): the ring the peer knows. */
enum el_resume_flag {
    EL_RF_SYNCED = 1,    /* a sync_state of this peer succeeded once */
    EL_RF_ABORTED = 2,   /* the peer saw ABORT for its epoch */
    EL_RF_RING_FAIL = 4, /* the peer could not build its epoch's ring */
    EL_RF_IN_SYNC = 8,   /* a sync_state is in flight */
    EL_RF_IN_TOPO = 16,  /* an update_topology is in flight (the request counts) */
};

/* ---- hashes ---- */
struct el_sha256 { uint32_t h[8]; uint64_t total; uint8_t buf[64]; size_t used; };
void el_sha256_init(struct el_sha256 *c);
void el_sha256_update(struct el_sha256 *c, const void *data, size_t len);
void el_sha256_final(struct el_sha256 *c, uint8_t out[32]);
void el_hmac_sha256_parts(const uint8_t *key, size_t key_len, const void *p1, size_t n1, const void *p2, size_t n2,
                          const void *p3, size_t n3, uint8_t out[32]);
int el_equal_secret(const uint8_t *a, const uint8_t *b, size_t n);
struct el_blake2b { uint64_t h[8], t[2]; uint8_t buf[128]; size_t used, outlen; };
void el_blake2b_init(struct el_blake2b *s, size_t outlen, const void *key, size_t keylen);
void el_blake2b_update(struct el_blake2b *s, const void *data, size_t len);
void el_blake2b_final(struct el_blake2b *s, uint8_t *out);

/* ---- time, randomness, sockets ---- */
int64_t el_now_ms(void);
int el_random(void *buf, size_t len);
int el_set_nonblocking(int fd);
void el_tune_socket(int fd);
int el_listen(const char *host, int port, int *bound_port);
/* Nonblocking connect to ipv4 (network order) : port, completed by the deadline. */
int el_connect(uint32_t ipv4, int port, int64_t deadline_ms);
int el_resolve(const char *host, uint32_t *ipv4);
/* "host:port" -> parts; -1 when malformed. */
int el_parse_address(const char *address, char *host, size_t hostlen, int *port);
/* The connecting side of the coordinator handshake on a connected fd (HELLO with role and
 * port, CHALLENGE, AUTH, then WELCOME with the coordinator's proof, or REFUSED).  EL_OK with
 * the id and the coordinator's timeout; EL_ERR_AUTH (wrong secret, either side);
 * EL_ERR_COORDINATOR (refused as "not active", closed, garbage); EL_ERR_TIMEOUT.  err says
 * which. */
int el_handshake(int fd, const uint8_t *secret, size_t secret_len, int role, int port, int64_t deadline,
                 uint64_t *id, int *coord_timeout_ms, char *err, size_t errlen);
/* Wait for events on fd; also returns -2 when wake_fd becomes readable (abort). */
int el_wait(int fd, short events, int64_t deadline_ms, int wake_fd);
/* Whole-buffer I/O on a nonblocking socket with a deadline: EL_OK, EL_ERR_TIMEOUT,
 * EL_ERR_PEER_FAILURE (closed / reset / aborted via wake_fd). */
int el_write_all(int fd, const void *buf, size_t len, int64_t deadline_ms, int wake_fd);
int el_read_all(int fd, void *buf, size_t len, int64_t deadline_ms, int wake_fd);
int el_send_frame(int fd, int type, const void *payload, size_t len, int64_t deadline_ms);
/* Reads one frame into buf (capacity cap); EL_ERR_ARG on a malformed one. */
int el_recv_frame(int fd, int *type, void *buf, size_t cap, size_t *len, int64_t deadline_ms, int wake_fd);
void el_frame_header(uint8_t *h, int type, uint32_t len);
int el_parse_header(const uint8_t *h, int *type, uint32_t *len, uint32_t cap);

/* ---- little-endian codec with bounds checks (a short read sets bad) ---- */
struct el_buf { uint8_t *p; size_t len, cap; int bad; };
void el_put(struct el_buf *b, const void *v, size_t n);
void el_put_u16(struct el_buf *b, uint16_t v);
void el_put_u32(struct el_buf *b, uint32_t v);
void el_put_u64(struct el_buf *b, uint64_t v);
struct el_reader { const uint8_t *p; size_t len, off; int bad; };
void el_get(struct el_reader *r, void *v, size_t n);
uint16_t el_get_u16(struct el_reader *r);
uint32_t el_get_u32(struct el_reader *r);
uint64_t el_get_u64(struct el_reader *r);

/* ---- knobs (also in native/util/config.c's table, for README and `commlib info`) ---- */
int el_knob_int(const char *name, int fallback, int lo, int hi);
double el_knob_seconds(const char *name, double fallback);

/* ---- reductions ---- */
size_t el_dtype_size(int dtype);
void el_finish_avg(void *buf, uint64_t count, int dtype, uint64_t n);
/* Codes 0..levels (255: uint8, 15: uint4), one per byte; params = (min, scale). */
void el_quantize(const void *src, uint64_t n, int dtype, int levels, float params[2], uint8_t *q);
void el_dequantize(const uint8_t *q, uint64_t n, const float params[2], int dtype, void *dst);
/* uint4 codes on the wire: two per byte, (n + 1) / 2 bytes. */
void el_pack4(const uint8_t *codes, uint64_t n, uint8_t *out);
void el_unpack4(const uint8_t *packed, uint64_t n, uint8_t *codes);
void el_dequantize4(const uint8_t *packed, uint64_t n, const float params[2], int dtype, void *dst);

#endif
