/* SHA-256, HMAC-SHA256 (peer authentication) and BLAKE2b (shared-state hashes), written
 * from FIPS 180-4, RFC 2104 and RFC 7693.  Byte-for-byte checked against Python's hashlib
 * and hmac in tests/test_elastic.py. */
#include "internal.h"

#include <string.h>

/* ---- SHA-256 ---- */

static const uint32_t sha256_k[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

static uint32_t ror32(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

static void sha256_block(struct el_sha256 *c, const uint8_t *p)
{
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ror32(w[i - 15], 7) ^ ror32(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ror32(w[i - 2], 17) ^ ror32(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = c->h[0], b = c->h[1], cc = c->h[2], d = c->h[3], e = c->h[4], f = c->h[5], g = c->h[6], h = c->h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = h + (ror32(e, 6) ^ ror32(e, 11) ^ ror32(e, 25)) + ((e & f) ^ (~e & g)) + sha256_k[i] + w[i];
        uint32_t t2 = (ror32(a, 2) ^ ror32(a, 13) ^ ror32(a, 22)) + ((a & b) ^ (a & cc) ^ (b & cc));
        h = g; g = f; f = e; e = d + t1; d = cc; cc = b; b = a; a = t1 + t2;
    }
    c->h[0] += a; c->h[1] += b; c->h[2] += cc; c->h[3] += d;
    c->h[4] += e; c->h[5] += f; c->h[6] += g; c->h[7] += h;
}

void el_sha256_init(struct el_sha256 *c)
{
    static const uint32_t iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(c->h, iv, sizeof iv);
    c->total = 0;
    c->used = 0;
}

void el_sha256_update(struct el_sha256 *c, const void *data, size_t len)
{
    const uint8_t *p = data;
    c->total += len;
    if (c->used) {
        size_t take = 64 - c->used < len ? 64 - c->used : len;
        memcpy(c->buf + c->used, p, take);
        c->used += take; p += take; len -= take;
        if (c->used < 64) return;
        sha256_block(c, c->buf);
        c->used = 0;
    }
    for (; len >= 64; p += 64, len -= 64) sha256_block(c, p);
    memcpy(c->buf, p, len);
    c->used = len;
}

void el_sha256_final(struct el_sha256 *c, uint8_t out[32])
{
    uint64_t bits = c->total * 8;
    uint8_t pad[72] = {0x80};
    size_t padlen = (c->used < 56 ? 56 : 120) - c->used;
    uint8_t len_be[8];
    for (int i = 0; i < 8; i++) len_be[i] = (uint8_t)(bits >> (56 - 8 * i));
    el_sha256_update(c, pad, padlen);
    el_sha256_update(c, len_be, 8);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(c->h[i] >> 24); out[4 * i + 1] = (uint8_t)(c->h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(c->h[i] >> 8); out[4 * i + 3] = (uint8_t)c->h[i];
    }
}

EL_API void el_sha256(const void *data, size_t len, uint8_t out[32])
{
    struct el_sha256 c;
    el_sha256_init(&c);
    el_sha256_update(&c, data, len);
    el_sha256_final(&c, out);
}

/* HMAC over the concatenation of up to three parts (the protocol always MACs a label,
 * the two nonces or a fixed-size body: no need to join them in a buffer first). */
void el_hmac_sha256_parts(const uint8_t *key, size_t key_len, const void *p1, size_t n1, const void *p2, size_t n2,
                          const void *p3, size_t n3, uint8_t out[32])
{
    uint8_t k[64] = {0}, ipad[64], opad[64], inner[32];
    if (key_len > 64) el_sha256(key, key_len, k);
    else if (key_len) memcpy(k, key, key_len);
    for (int i = 0; i < 64; i++) { ipad[i] = k[i] ^ 0x36; opad[i] = k[i] ^ 0x5c; }
    struct el_sha256 c;
    el_sha256_init(&c);
    el_sha256_update(&c, ipad, 64);
    if (n1) el_sha256_update(&c, p1, n1);
    if (n2) el_sha256_update(&c, p2, n2);
    if (n3) el_sha256_update(&c, p3, n3);
    el_sha256_final(&c, inner);
    el_sha256_init(&c);
    el_sha256_update(&c, opad, 64);
    el_sha256_update(&c, inner, 32);
    el_sha256_final(&c, out);
}

EL_API void el_hmac_sha256(const uint8_t *key, size_t key_len, const void *data, size_t len, uint8_t out[32])
{
    el_hmac_sha256_parts(key, key_len, data, len, NULL, 0, NULL, 0, out);
}

/* Comparing MACs in constant time: the time of a refusal says nothing about how many
 * leading bytes were right. */
int el_equal_secret(const uint8_t *a, const uint8_t *b, size_t n)
{
    uint8_t d = 0;
    for (size_t i = 0; i < n; i++) d |= a[i] ^ b[i];
    return d == 0;
}

/* ---- BLAKE2b ---- */

static const uint64_t blake2b_iv[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL};

static const uint8_t blake2b_sigma[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};

static uint64_t ror64(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

static uint64_t load64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static void blake2b_compress(struct el_blake2b *s, const uint8_t *block, int last)
{
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; i++) m[i] = load64(block + 8 * i);
    for (int i = 0; i < 8; i++) { v[i] = s->h[i]; v[i + 8] = blake2b_iv[i]; }
    v[12] ^= s->t[0];
    v[13] ^= s->t[1];
    if (last) v[14] = ~v[14];
#define G(a, b, c, d, x, y)                         \
    do {                                            \
        v[a] = v[a] + v[b] + (x); v[d] = ror64(v[d] ^ v[a], 32); \
        v[c] = v[c] + v[d]; v[b] = ror64(v[b] ^ v[c], 24);       \
        v[a] = v[a] + v[b] + (y); v[d] = ror64(v[d] ^ v[a], 16); \
        v[c] = v[c] + v[d]; v[b] = ror64(v[b] ^ v[c], 63);       \
    } while (0)
    for (int r = 0; r < 12; r++) {
        const uint8_t *sg = blake2b_sigma[r];
        G(0, 4, 8, 12, m[sg[0]], m[sg[1]]);
        G(1, 5, 9, 13, m[sg[2]], m[sg[3]]);
        G(2, 6, 10, 14, m[sg[4]], m[sg[5]]);
        G(3, 7, 11, 15, m[sg[6]], m[sg[7]]);
        G(0, 5, 10, 15, m[sg[8]], m[sg[9]]);
        G(1, 6, 11, 12, m[sg[10]], m[sg[11]]);
        G(2, 7, 8, 13, m[sg[12]], m[sg[13]]);
        G(3, 4, 9, 14, m[sg[14]], m[sg[15]]);
    }
#undef G
    for (int i = 0; i < 8; i++) s->h[i] ^= v[i] ^ v[i + 8];
}

void el_blake2b_init(struct el_blake2b *s, size_t outlen, const void *key, size_t keylen)
{
    memcpy(s->h, blake2b_iv, sizeof blake2b_iv);
    s->h[0] ^= 0x01010000ULL ^ ((uint64_t)keylen << 8) ^ outlen;
    s->t[0] = s->t[1] = 0;
    s->used = 0;
    s->outlen = outlen;
    if (keylen) {
        uint8_t block[128] = {0};
        memcpy(block, key, keylen);
        el_blake2b_update(s, block, 128);
    }
}

void el_blake2b_update(struct el_blake2b *s, const void *data, size_t len)
{
    const uint8_t *p = data;
    while (len) {
        /* The last block must go through compress with the final flag: only compress a
         * full buffer once more input is known to follow. */
        if (s->used == 128) {
            s->t[0] += 128;
            if (s->t[0] < 128) s->t[1]++;
            blake2b_compress(s, s->buf, 0);
            s->used = 0;
        }
        if (s->used == 0) {
            while (len > 128) {
                s->t[0] += 128;
                if (s->t[0] < 128) s->t[1]++;
                blake2b_compress(s, p, 0);
                p += 128; len -= 128;
            }
        }
        size_t take = 128 - s->used < len ? 128 - s->used : len;
        memcpy(s->buf + s->used, p, take);
        s->used += take; p += take; len -= take;
    }
}

void el_blake2b_final(struct el_blake2b *s, uint8_t *out)
{
    s->t[0] += s->used;
    if (s->t[0] < s->used) s->t[1]++;
    memset(s->buf + s->used, 0, 128 - s->used);
    blake2b_compress(s, s->buf, 1);
    for (size_t i = 0; i < s->outlen; i++) out[i] = (uint8_t)(s->h[i / 8] >> (8 * (i % 8)));
}

EL_API int el_blake2b(const void *data, size_t len, uint8_t *out, size_t outlen, const void *key, size_t keylen)
{
    if (outlen < 1 || outlen > 64 || keylen > 64) return EL_ERR_ARG;
    struct el_blake2b s;
    el_blake2b_init(&s, outlen, key, keylen);
    el_blake2b_update(&s, data, len);
    el_blake2b_final(&s, out);
    return EL_OK;
}
