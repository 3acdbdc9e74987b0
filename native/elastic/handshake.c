/* The connecting side of the coordinator handshake, shared by peers (first connection and
 * reconnection after a failover) and by a standby coordinator connecting to its primary:
 * both prove the secret the same way, and both check that the other side knows it. */
#define _GNU_SOURCE
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int el_parse_address(const char *address, char *host, size_t hostlen, int *port)
{
    const char *colon = strrchr(address, ':');
    if (!colon || colon == address || (size_t)(colon - address) >= hostlen) return -1;
    memcpy(host, address, (size_t)(colon - address));
    host[colon - address] = 0;
    char *end;
    long v = strtol(colon + 1, &end, 10);
    if (*end || v < 1 || v > 65535) return -1;
    *port = (int)v;
    return 0;
}

int el_handshake(int fd, const uint8_t *secret, size_t secret_len, int role, int port, int64_t deadline,
                 uint64_t *id, int *coord_timeout_ms, char *err, size_t errlen)
{
    uint8_t pnonce[EL_NONCE], cnonce[EL_NONCE], mac[EL_MAC], frame[512];
    el_random(pnonce, sizeof pnonce);
    struct el_buf b = {0};
    el_put_u32(&b, 1);
    el_put(&b, pnonce, EL_NONCE);
    el_put_u16(&b, (uint16_t)port);
    /* A plain peer sends the version-1 HELLO unchanged (an older coordinator accepts it);
     * the role field exists only for the newer roles. */
    if (role != EL_ROLE_PEER) el_put_u32(&b, (uint32_t)role);
    int rc = b.bad ? EL_ERR_SYSTEM : el_send_frame(fd, F_HELLO, b.p, b.len, deadline);
    free(b.p);
    int type = 0;
    size_t len = 0;
    if (!rc) rc = el_recv_frame(fd, &type, frame, sizeof frame, &len, deadline, -1);
    if (rc || type != F_CHALLENGE || len != EL_NONCE) {
        snprintf(err, errlen, "did not answer the handshake");
        return rc == EL_ERR_TIMEOUT ? EL_ERR_TIMEOUT : EL_ERR_COORDINATOR;
    }
    memcpy(cnonce, frame, EL_NONCE);
    el_hmac_sha256_parts(secret, secret_len, "commlib-peer", 12, cnonce, EL_NONCE, pnonce, EL_NONCE, mac);
    rc = el_send_frame(fd, F_AUTH, mac, EL_MAC, deadline);
    if (!rc) rc = el_recv_frame(fd, &type, frame, sizeof frame - 1, &len, deadline, -1);
    if (!rc && type == F_REFUSED) {
        frame[len] = 0;
        snprintf(err, errlen, "refused this connection: %s", (char *)frame);
        /* A standby saying "not me, my primary is alive" is no authentication failure. */
        return strncmp((char *)frame, EL_REFUSE_STANDBY, strlen(EL_REFUSE_STANDBY)) ? EL_ERR_AUTH : EL_ERR_COORDINATOR;
    }
    if (rc || type != F_WELCOME || len != 8 + EL_MAC + 4) {
        snprintf(err, errlen, "closed the handshake");
        return rc == EL_ERR_TIMEOUT ? EL_ERR_TIMEOUT : EL_ERR_COORDINATOR;
    }
    struct el_reader r = {.p = frame, .len = len};
    *id = el_get_u64(&r);
    uint8_t proof[EL_MAC], want[EL_MAC];
    el_get(&r, proof, EL_MAC);
    *coord_timeout_ms = (int)el_get_u32(&r);
    el_hmac_sha256_parts(secret, secret_len, "commlib-coordinator", 19, pnonce, EL_NONCE, cnonce, EL_NONCE, want);
    if (!el_equal_secret(proof, want, EL_MAC)) {
        snprintf(err, errlen, "could not prove it knows the secret (wrong secret there?)");
        return EL_ERR_AUTH;
    }
    return EL_OK;
}
