/* commlib elastic engine: fault-tolerant all-reduce over TCP with dynamic membership.
 *
 * Built into its own library (commlib/libcommlib_elastic.so, plain cc -pthread, no MPI)
 * and reached from Python through cffi (collectives/elastic).  No Python on the data path.
 *
 * PROTOCOL
 * Every control message is a frame: u32 magic "CLEL", u16 type, u16 zero, u32 payload
 * length (<= EL_MAX_FRAME, little-endian), payload.  A frame with a wrong magic, an unknown
 * type, an oversized length or a payload that does not parse drops the sender.
 *
 * Authentication (peer -> coordinator, and peer -> peer data connections): the side that
 * accepts sends a fresh 32-byte random nonce; the connecting side answers with
 * HMAC-SHA256(secret, label | nonces | body).  The coordinator also proves itself to the
 * peer (HMAC over both nonces with another label), so a peer never follows an impostor.
 * The secret never crosses the wire.  A wrong MAC is answered with REFUSED "wrong secret"
 * before the close, so both sides can say what happened.
 *
 * Membership: the coordinator holds an epoch = (number, ordered member list).  Peers that
 * authenticate wait outside.  update_topology() is a barrier of the live members: when all
 * of them asked, dead members are dropped, waiting peers that asked are admitted, and if
 * anything changed (or an operation failed in the epoch) a new epoch begins and every
 * member gets TOPOLOGY (epoch, its rank, the ring).  Ring data connections are rebuilt only
 * when the epoch changes.  A member is dead when its connection closes, when it sends
 * garbage, or when nothing arrived from it for COMMLIB_ELASTIC_TIMEOUT (peers send
 * heartbeats from a background thread, so a long compute step is not silence; SIGSTOP is).
 *
 * All-reduce and its failure semantics: the operation works in a scratch copy; the user's
 * buffer is not written before the verdict.  Data moves over k TCP connections per ring
 * neighbour (COMMLIB_ELASTIC_CONNECTIONS): pipelined ring reduce-scatter then all-gather,
 * each segment cut into chunks dealt round-robin over the k connections, every chunk
 * carrying a header (sequence, step, chunk, length) that the receiver checks.  Each peer
 * reports its local outcome (OP_DONE ok/failed) to the coordinator, which alone decides:
 * COMMIT(epoch, seq) once every member of the epoch reported ok, or ABORT(epoch) as soon as
 * one reports a failure or a member dies with anything uncommitted.  The coordinator sends
 * each peer its verdicts in one ordered stream, so a peer dying at the very end cannot make
 * some survivors commit and others roll back: on COMMIT every peer copies the scratch into
 * the user buffer (identical bytes everywhere: each segment is reduced once, by its owner,
 * then copied around the ring); on ABORT every peer leaves the buffer untouched and raises
 * PeerFailure.  An aborted epoch accepts no more operations; the next update_topology
 * starts a fresh epoch.  Every wait has a deadline: a data connection that moves no byte
 * for COMMLIB_ELASTIC_TIMEOUT fails the operation, and a peer whose coordinator is silent
 * for that long (and no other coordinator takes over, below) reports the coordinator lost.
 *
 * Failover: a standby coordinator connects to its primary like a peer (HELLO role
 * "standby", the same HMAC handshake both ways), keeps the link with heartbeats, learns
 * the numbers it must never go below (F_COORD_STATE: next id, epoch, revision) and
 * refuses peers (REFUSED "standby of H:P, not active") while the primary lives.  The
 * primary tells its peers its standbys (F_STANDBYS, at WELCOME and on change; a standby
 * reports its own standbys upward, so chains work).  When the link closes or goes silent
 * for COMMLIB_ELASTIC_TIMEOUT the standby becomes active.  A peer whose coordinator
 * connection dies tries the coordinators it knows (its address list, then the standbys
 * it was told) for COMMLIB_ELASTIC_FAILOVER_TIMEOUT; the first active one gets HELLO role
 * "resume", the handshake, then F_RESUME: id, epoch, rank, ring, last revision, the
 * operation last reported (seq, ok/failed), the highest seq committed, and flags (saw
 * ABORT, ring failed, sync_state or update_topology in flight).  Calls in flight keep
 * waiting.  The new coordinator decides once every member of the newest epoch named in a
 * resume has resumed, or one timeout passed: it keeps that epoch (numbers stay monotonic)
 * and its members (the missing are dead), and owes the verdicts: a seq one member
 * committed commits on every member pending on it (each holds the scratch result:
 * identical bytes); a seq every member reported ok commits; a failure, an ABORT seen, a
 * missing member or a sync_state in flight aborts the epoch after those commits.  So no
 * peer commits what another survivor rolled back, across a failover too.  A standby that
 * merely lost its link to a live primary also becomes active (split brain; see README).
 *
 * Shared state: sync_state sends per-array BLAKE2b-256 hashes (of name, dtype, shape and
 * bytes) and a revision; when every member has, the coordinator elects the most common
 * (revision, hashes) set (ties: the set of the lowest rank), checks that its revision is the
 * last synchronised one or one more, and tells each peer either "you are up to date, serve"
 * or "fetch from rank R".  Fetchers pull the differing arrays from R over an authenticated
 * data connection, check each hash, and report; when all have, the coordinator says done.
 * Slow links on one machine: COMMLIB_ELASTIC_RATE_MBIT (Mbit/s, one token bucket per peer
 * shared by its data connections; the coordinator connection is never throttled) and
 * COMMLIB_ELASTIC_LATENCY_MS (each ring chunk is sent that long after it became ready,
 * so every one of the 2 (n - 1) dependent ring steps pays it; each state-fetch answer
 * comes that late).  Read by el_peer_connect; waits stay abortable, and pacing is not
 * silence (the no-progress limits count bytes, and allow the modelled latency).
 * Assumes every peer has the same byte order (little-endian x86/ARM). */
#ifndef COMMLIB_ELASTIC_H
#define COMMLIB_ELASTIC_H

#include <stddef.h>
#include <stdint.h>

#define EL_API __attribute__((visibility("default")))

enum el_status {
    EL_OK = 0,
    EL_ERR_PEER_FAILURE = 1, /* a peer died or failed: the operation was rolled back everywhere */
    EL_ERR_TIMEOUT = 2,      /* the call's own deadline passed */
    EL_ERR_AUTH = 3,         /* wrong secret (either side) */
    EL_ERR_ARG = 4,          /* invalid argument */
    EL_ERR_COORDINATOR = 5,  /* the coordinator is unreachable, lost or refused us */
    EL_ERR_STATE = 6,        /* shared state: revision rule broken, hash mismatch after fetch */
    EL_ERR_SYSTEM = 7,       /* socket / memory error */
    EL_ERR_NOT_MEMBER = 8,   /* this peer has not been admitted yet (call update_topology) */
};

enum el_dtype { EL_F16, EL_BF16, EL_F32, EL_F64, EL_I8, EL_I16, EL_I32, EL_I64, EL_U8, EL_U16, EL_U32, EL_U64, EL_NDTYPES };
enum el_op { EL_SUM, EL_AVG, EL_MIN, EL_MAX, EL_PROD, EL_NOPS };

typedef struct el_coordinator el_coordinator;
typedef struct el_peer el_peer;

/* Coordinator: binds host:port (port 0: any; the bound port is returned), runs its event
 * loop on its own thread.  min_peers: the first epoch forms when this many peers ask. */
EL_API int el_coordinator_start(const char *host, int port, const uint8_t *secret, size_t secret_len, int min_peers,
                                el_coordinator **out, int *bound_port, char *err, size_t errlen);
/* standby_of = "HOST:PORT" (NULL or "": an active coordinator): this one follows that
 * primary (same secret; it fails to start when the primary refuses or cannot be reached),
 * refuses peers while the primary lives, and takes over when it dies. */
EL_API int el_coordinator_start_ex(const char *host, int port, const uint8_t *secret, size_t secret_len, int min_peers,
                                   const char *standby_of, el_coordinator **out, int *bound_port, char *err, size_t errlen);
EL_API void el_coordinator_stop(el_coordinator *c);
/* JSON snapshot: epoch, members, waiting, dropped counters (for the CLI and tests). */
EL_API size_t el_coordinator_info(el_coordinator *c, char *buf, size_t len);

/* Peer.  Every call returns an el_status; el_peer_error gives the message of the last one. */
EL_API int el_peer_connect(const char *address, const uint8_t *secret, size_t secret_len, int timeout_ms,
                           el_peer **out, char *err, size_t errlen);
EL_API const char *el_peer_error(el_peer *p);
EL_API int el_peer_update_topology(el_peer *p, int timeout_ms);
EL_API int el_peer_info(el_peer *p, int64_t *epoch, int *rank, int *world, uint64_t *id);
EL_API int el_peer_data_port(el_peer *p); /* where ring neighbours and fetchers connect */
EL_API int el_peer_allreduce(el_peer *p, void *buf, uint64_t count, int dtype, int op, int timeout_ms);
/* quantize: 0 off; 1 min-max uint8 codes on the wire; 2 min-max uint4 codes, two per byte
 * (float dtypes, sum/avg; anything else EL_ERR_ARG).  Each reduce-scatter hop sends (float
 * min, float scale, codes) of its partial chunk, scale = (max - min) / 255 or / 15, codes
 * rounded half-up; the owner quantizes the finished chunk once and the all-gather forwards
 * its codes, so the result is lossy (each hop off by <= scale / 2 per element) but
 * bit-identical on every peer.  uint8: 2-8x less traffic than the dtype, uint4: 4-16x. */
EL_API int el_peer_allreduce_ex(el_peer *p, void *buf, uint64_t count, int dtype, int op, int quantize, int timeout_ms);
EL_API int el_peer_sync_state(el_peer *p, int n, void *const *ptrs, const uint64_t *sizes, const uint8_t *const *descs,
                              const uint32_t *desc_lens, int64_t revision, int timeout_ms, int64_t *synced_revision,
                              uint64_t *fetched_bytes, uint8_t *digest_out);
EL_API void el_peer_close(el_peer *p, int graceful);
/* Bytes this peer sent and received on its data connections (ring all-reduce and state
 * transfer, chunk headers included; not the coordinator connection) since it connected. */
EL_API int el_peer_wire_stats(el_peer *p, uint64_t *sent, uint64_t *received);

/* Hashes, exported for the tests (vectors against hashlib). */
EL_API void el_sha256(const void *data, size_t len, uint8_t out[32]);
EL_API void el_hmac_sha256(const uint8_t *key, size_t key_len, const void *data, size_t len, uint8_t out[32]);
EL_API int el_blake2b(const void *data, size_t len, uint8_t *out, size_t outlen, const void *key, size_t keylen);
/* dst = dst OP src over count elements (exported for the tests). */
EL_API int el_reduce(void *dst, const void *src, uint64_t count, int dtype, int op);

#endif
