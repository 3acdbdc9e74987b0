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
    F_LAST
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
