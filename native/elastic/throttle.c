/* Slow links on one machine: COMMLIB_ELASTIC_RATE_MBIT paces a peer's data connections
 * (ring all-reduce, state transfer) through one token bucket; COMMLIB_ELASTIC_LATENCY_MS
 * holds data back as a one-way link delay would.  Also the data-byte counters.
 *
 * The bucket: tokens are bytes, refilled at the rate, capped at a small burst (10 ms of
 * the rate, at least 16 KiB) so an idle link cannot bank a long free run.  Senders take
 * what they may send now (el_throttle_take) and return what the socket did not accept;
 * every connection of the peer shares it under a mutex, so k connections together keep
 * to the rate.  Nothing here sleeps: callers wait for the returned time in their own
 * abortable poll. */
#define _GNU_SOURCE
#include "peer.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define THROTTLE_MIN_BURST (16u << 10)
#define THROTTLE_QUANTUM (8u << 10) /* a waiting sender wakes for this much, not for each byte */

struct el_throttle {
    pthread_mutex_t lock;
    double rate;      /* bytes per nanosecond; 0: unlimited */
    double burst;     /* bytes */
    double tokens;    /* bytes */
    int64_t last_ns;  /* of the last refill */
    int64_t latency_ns;
    uint64_t sent, received; /* data bytes, headers included (atomics) */
};

int64_t el_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* A non-negative number, fractions allowed; unset or unparsable counts as 0 (off), the
 * default, as the other knobs fall back to theirs. */
static double knob_number(const char *name, double hi)
{
    const char *v = getenv(name);
    if (!v || !*v) return 0;
    char *end;
    double x = strtod(v, &end);
    return (*end || !(x >= 0) || x > hi) ? 0 : x;
}

struct el_throttle *el_throttle_new(void)
{
    struct el_throttle *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    pthread_mutex_init(&t->lock, NULL);
    double mbit = knob_number("COMMLIB_ELASTIC_RATE_MBIT", 1e7);
    t->rate = mbit * 1e6 / 8 / 1e9;
    t->burst = t->rate * 10e6 > THROTTLE_MIN_BURST ? t->rate * 10e6 : THROTTLE_MIN_BURST;
    t->tokens = t->burst;
    t->last_ns = el_now_ns();
    t->latency_ns = (int64_t)(knob_number("COMMLIB_ELASTIC_LATENCY_MS", 60000) * 1e6);
    return t;
}

void el_throttle_free(struct el_throttle *t)
{
    if (!t) return;
    pthread_mutex_destroy(&t->lock);
    free(t);
}

struct el_throttle *el_paced(el_peer *p) { return p->throttle && p->throttle->rate > 0 ? p->throttle : NULL; }
int64_t el_latency_ns(el_peer *p) { return p->throttle ? p->throttle->latency_ns : 0; }

size_t el_throttle_take(struct el_throttle *t, size_t want, int64_t *wait_ns)
{
    pthread_mutex_lock(&t->lock);
    int64_t now = el_now_ns();
    t->tokens += (double)(now - t->last_ns) * t->rate;
    if (t->tokens > t->burst) t->tokens = t->burst;
    t->last_ns = now;
    double need = want < THROTTLE_QUANTUM ? (double)want : THROTTLE_QUANTUM;
    size_t got = 0;
    if (t->tokens >= need) {
        got = t->tokens >= (double)want ? want : (size_t)t->tokens;
        t->tokens -= (double)got;
    } else {
        *wait_ns = (int64_t)((need - t->tokens) / t->rate) + 1;
    }
    pthread_mutex_unlock(&t->lock);
    return got;
}

void el_throttle_return(struct el_throttle *t, size_t unused)
{
    if (!unused) return;
    pthread_mutex_lock(&t->lock);
    t->tokens += (double)unused;
    if (t->tokens > t->burst) t->tokens = t->burst;
    pthread_mutex_unlock(&t->lock);
}

void el_count_sent(el_peer *p, uint64_t n)
{
    if (p->throttle) __atomic_fetch_add(&p->throttle->sent, n, __ATOMIC_RELAXED);
}

void el_count_received(el_peer *p, uint64_t n)
{
    if (p->throttle) __atomic_fetch_add(&p->throttle->received, n, __ATOMIC_RELAXED);
}

EL_API int el_peer_wire_stats(el_peer *p, uint64_t *sent, uint64_t *received)
{
    *sent = p->throttle ? __atomic_load_n(&p->throttle->sent, __ATOMIC_RELAXED) : 0;
    *received = p->throttle ? __atomic_load_n(&p->throttle->received, __ATOMIC_RELAXED) : 0;
    return EL_OK;
}

int el_pause(int64_t ns, int wake_fd)
{
    if (ns <= 0) return EL_OK;
    int64_t until = el_now_ns() + ns;
    for (;;) {
        int64_t left = until - el_now_ns();
        if (left <= 0) return EL_OK;
        struct pollfd f = {.fd = wake_fd, .events = POLLIN};
        int64_t ms = (left + 999999) / 1000000;
        int r = poll(&f, wake_fd >= 0 ? 1 : 0, ms > 1000 ? 1000 : (int)ms);
        if (r < 0 && errno != EINTR) return EL_ERR_SYSTEM;
        if (r > 0 && (f.revents & POLLIN)) return EL_ERR_PEER_FAILURE;
    }
}

int el_paced_write(el_peer *p, int fd, const void *buf, size_t len, int idle_ms, int wake_fd)
{
    struct el_throttle *t = el_paced(p);
    const uint8_t *b = buf;
    int64_t deadline = el_now_ns() + (int64_t)idle_ms * 1000000;
    while (len) {
        size_t allow = len;
        int64_t wait_ns = 0;
        if (t && !(allow = el_throttle_take(t, len, &wait_ns))) {
            int rc = el_pause(wait_ns, wake_fd);
            if (rc) return rc;
            deadline = el_now_ns() + (int64_t)idle_ms * 1000000; /* pacing is not silence */
            continue;
        }
        ssize_t n = send(fd, b, allow, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (t) el_throttle_return(t, allow - (n > 0 ? (size_t)n : 0));
        if (n > 0) {
            el_count_sent(p, (uint64_t)n);
            b += n;
            len -= (size_t)n;
            deadline = el_now_ns() + (int64_t)idle_ms * 1000000;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            int w = el_wait(fd, POLLOUT, deadline / 1000000, wake_fd);
            if (w == 0) return EL_ERR_TIMEOUT;
            if (w < 0) return EL_ERR_PEER_FAILURE;
            continue;
        }
        return EL_ERR_PEER_FAILURE;
    }
    return EL_OK;
}

int el_idle_read(el_peer *p, int fd, void *buf, size_t len, int idle_ms, int wake_fd)
{
    uint8_t *b = buf;
    int64_t deadline = el_now_ms() + idle_ms;
    while (len) {
        ssize_t n = recv(fd, b, len, MSG_DONTWAIT);
        if (n > 0) {
            el_count_received(p, (uint64_t)n);
            b += n;
            len -= (size_t)n;
            deadline = el_now_ms() + idle_ms; /* bytes flow: a long transfer is not silence */
            continue;
        }
        if (n == 0) return EL_ERR_PEER_FAILURE;
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            int w = el_wait(fd, POLLIN, deadline, wake_fd);
            if (w == 0) return EL_ERR_TIMEOUT;
            if (w < 0) return EL_ERR_PEER_FAILURE;
            continue;
        }
        return EL_ERR_PEER_FAILURE;
    }
    return EL_OK;
}
