/* Sockets with deadlines: every wait in the engine goes through el_wait, so nothing
 * blocks past its deadline, and a wake pipe (the peer's abort signal) interrupts it. */
#define _GNU_SOURCE
#include "internal.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

int64_t el_now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

int el_random(void *buf, size_t len)
{
    uint8_t *p = buf;
    while (len) {
        ssize_t n = getrandom(p, len, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            return EL_ERR_SYSTEM;
        }
        p += n; len -= (size_t)n;
    }
    return EL_OK;
}

int el_set_nonblocking(int fd)
{
    int flags = fcntl(fd, F_GETFL);
    return flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0 ? -1 : 0;
}

void el_tune_socket(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
}

int el_resolve(const char *host, uint32_t *ipv4)
{
    if (!host || !*host || !strcmp(host, "*")) { *ipv4 = htonl(INADDR_ANY); return 0; }
    struct in_addr a;
    if (inet_pton(AF_INET, host, &a) == 1) { *ipv4 = a.s_addr; return 0; }
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *res = NULL;
    if (getaddrinfo(host, NULL, &hints, &res) || !res) return -1;
    *ipv4 = ((struct sockaddr_in *)res->ai_addr)->sin_addr.s_addr;
    freeaddrinfo(res);
    return 0;
}

int el_listen(const char *host, int port, int *bound_port)
{
    uint32_t ip;
    if (el_resolve(host, &ip)) return -1;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = ip};
    if (bind(fd, (struct sockaddr *)&a, sizeof a) || listen(fd, 256) || el_set_nonblocking(fd)) {
        close(fd);
        return -1;
    }
    socklen_t alen = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &alen);
    if (bound_port) *bound_port = ntohs(a.sin_port);
    return fd;
}

int el_wait(int fd, short events, int64_t deadline_ms, int wake_fd)
{
    for (;;) {
        int64_t left = deadline_ms - el_now_ms();
        if (left < 0) return 0;
        struct pollfd p[2] = {{.fd = fd, .events = events}, {.fd = wake_fd, .events = POLLIN}};
        int r = poll(p, wake_fd >= 0 ? 2 : 1, left > 1000 ? 1000 : (int)left);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (wake_fd >= 0 && (p[1].revents & POLLIN)) return -2;
        if (p[0].revents) return 1;
    }
}

int el_connect(uint32_t ipv4, int port, int64_t deadline_ms)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    el_set_nonblocking(fd);
    el_tune_socket(fd);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = ipv4};
    if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0) return fd;
    if (errno != EINPROGRESS) { close(fd); return -1; }
    if (el_wait(fd, POLLOUT, deadline_ms, -1) != 1) { close(fd); return -1; }
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) || err) { close(fd); return -1; }
    return fd;
}

int el_write_all(int fd, const void *buf, size_t len, int64_t deadline_ms, int wake_fd)
{
    const uint8_t *p = buf;
    while (len) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n > 0) { p += n; len -= (size_t)n; continue; }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            int w = el_wait(fd, POLLOUT, deadline_ms, wake_fd);
            if (w == 0) return EL_ERR_TIMEOUT;
            if (w < 0) return EL_ERR_PEER_FAILURE;
            continue;
        }
        return EL_ERR_PEER_FAILURE;
    }
    return EL_OK;
}

int el_read_all(int fd, void *buf, size_t len, int64_t deadline_ms, int wake_fd)
{
    uint8_t *p = buf;
    while (len) {
        ssize_t n = recv(fd, p, len, 0);
        if (n > 0) { p += n; len -= (size_t)n; continue; }
        if (n == 0) return EL_ERR_PEER_FAILURE;
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            int w = el_wait(fd, POLLIN, deadline_ms, wake_fd);
            if (w == 0) return EL_ERR_TIMEOUT;
            if (w < 0) return EL_ERR_PEER_FAILURE;
            continue;
        }
        return EL_ERR_PEER_FAILURE;
    }
    return EL_OK;
}

void el_frame_header(uint8_t *h, int type, uint32_t len)
{
    uint32_t magic = EL_MAGIC;
    for (int i = 0; i < 4; i++) h[i] = (uint8_t)(magic >> (8 * i));
    h[4] = (uint8_t)type; h[5] = (uint8_t)(type >> 8); h[6] = h[7] = 0;
    for (int i = 0; i < 4; i++) h[8 + i] = (uint8_t)(len >> (8 * i));
}

int el_parse_header(const uint8_t *h, int *type, uint32_t *len, uint32_t cap)
{
    uint32_t magic = (uint32_t)h[0] | (uint32_t)h[1] << 8 | (uint32_t)h[2] << 16 | (uint32_t)h[3] << 24;
    *type = h[4] | h[5] << 8;
    *len = (uint32_t)h[8] | (uint32_t)h[9] << 8 | (uint32_t)h[10] << 16 | (uint32_t)h[11] << 24;
    if (magic != EL_MAGIC || h[6] || h[7] || *type < F_HELLO || *type >= F_LAST || *len > cap) return -1;
    return 0;
}

int el_send_frame(int fd, int type, const void *payload, size_t len, int64_t deadline_ms)
{
    uint8_t h[EL_HEADER];
    el_frame_header(h, type, (uint32_t)len);
    int rc = el_write_all(fd, h, sizeof h, deadline_ms, -1);
    if (rc == EL_OK && len) rc = el_write_all(fd, payload, len, deadline_ms, -1);
    return rc;
}

int el_recv_frame(int fd, int *type, void *buf, size_t cap, size_t *len, int64_t deadline_ms, int wake_fd)
{
    uint8_t h[EL_HEADER];
    uint32_t n;
    int rc = el_read_all(fd, h, sizeof h, deadline_ms, wake_fd);
    if (rc) return rc;
    if (el_parse_header(h, type, &n, (uint32_t)cap)) return EL_ERR_ARG;
    rc = el_read_all(fd, buf, n, deadline_ms, wake_fd);
    *len = n;
    return rc;
}

void el_put(struct el_buf *b, const void *v, size_t n)
{
    if (b->bad || b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n) cap *= 2;
        uint8_t *p = realloc(b->p, cap);
        if (!p) { b->bad = 1; return; }
        b->p = p; b->cap = cap;
    }
    memcpy(b->p + b->len, v, n);
    b->len += n;
}
void el_put_u16(struct el_buf *b, uint16_t v) { uint8_t x[2] = {(uint8_t)v, (uint8_t)(v >> 8)}; el_put(b, x, 2); }
void el_put_u32(struct el_buf *b, uint32_t v)
{
    uint8_t x[4];
    for (int i = 0; i < 4; i++) x[i] = (uint8_t)(v >> (8 * i));
    el_put(b, x, 4);
}
void el_put_u64(struct el_buf *b, uint64_t v)
{
    uint8_t x[8];
    for (int i = 0; i < 8; i++) x[i] = (uint8_t)(v >> (8 * i));
    el_put(b, x, 8);
}
void el_get(struct el_reader *r, void *v, size_t n)
{
    if (r->bad || r->len - r->off < n) { r->bad = 1; memset(v, 0, n); return; }
    memcpy(v, r->p + r->off, n);
    r->off += n;
}
uint16_t el_get_u16(struct el_reader *r) { uint8_t x[2]; el_get(r, x, 2); return (uint16_t)(x[0] | x[1] << 8); }
uint32_t el_get_u32(struct el_reader *r)
{
    uint8_t x[4];
    el_get(r, x, 4);
    return (uint32_t)x[0] | (uint32_t)x[1] << 8 | (uint32_t)x[2] << 16 | (uint32_t)x[3] << 24;
}
uint64_t el_get_u64(struct el_reader *r)
{
    uint8_t x[8];
    el_get(r, x, 8);
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | x[i];
    return v;
}

int el_knob_int(const char *name, int fallback, int lo, int hi)
{
    const char *v = getenv(name);
    if (!v || !*v) return fallback;
    char *end;
    long x = strtol(v, &end, 10);
    return (*end || x < lo || x > hi) ? fallback : (int)x;
}

double el_knob_seconds(const char *name, double fallback)
{
    const char *v = getenv(name);
    if (!v || !*v) return fallback;
    char *end;
    double x = strtod(v, &end);
    return (*end || !(x > 0) || x > 86400) ? fallback : x;
}
