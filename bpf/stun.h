/* Admission of a new client tuple's first packet: only what can be a client's
 * ICE connectivity check for one of our calls goes to the slow path. A
 * well-formed STUN Binding request (RFC 8489: magic cookie, class/method,
 * length agreeing with the datagram, attributes inside it) whose USERNAME
 * starts with a server ufrag of our shape (manager/protocol/ufrag.py: 24
 * ice-chars, version 1). Python then verifies the ufrag's MAC. */
#ifndef SPLITRELAY_STUN_H
#define SPLITRELAY_STUN_H

#include "consts.h"
#include "parse.h"

#define STUN_HEADER_LEN 20
#define STUN_MAGIC_COOKIE 0x2112A442
#define STUN_BINDING_REQUEST 0x0001
#define STUN_ATTR_USERNAME 0x0006
#define STUN_USERNAME_MAX 513   /* RFC 8489 14.3: less than 513 bytes */

static __always_inline int ice_char(__u8 c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '+' || c == '/';
}

/* base64 value of an ice-char (ice-chars are exactly the base64 alphabet). */
static __always_inline int b64_value(__u8 c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    return c == '+' ? 62 : 63;
}

/* USERNAME is "<server ufrag>:<client ufrag>" (RFC 8445 7.2.2); the server
 * ufrag is base64 of version(1) | transceiver id | conn id | key id | nonce | MAC, so
 * it is UFRAG_LEN ice-chars whose first 8 bits decode to UFRAG_VERSION. */
static __always_inline int ufrag_shape_ok(__u8 *v, void *data_end, __u16 len)
{
    if (len < UFRAG_LEN + 1 + 4 || len >= STUN_USERNAME_MAX)
        return 0;
    if ((void *)(v + UFRAG_LEN + 1) > data_end)
        return 0;
    if (v[UFRAG_LEN] != ':')
        return 0;
#pragma unroll
    for (int i = 0; i < UFRAG_LEN; i++)
        if (!ice_char(v[i]))
            return 0;
    /* 6 bits of the first character and the top 2 of the second. */
    return ((b64_value(v[0]) << 2) | (b64_value(v[1]) >> 4)) == UFRAG_VERSION;
}

/* The stat_id for an unknown client tuple's STUN packet: pass to the slow
 * path, or why not. */
static __always_inline int stun_admit(struct pkt *p)
{
    __u8 *s = p->payload;
    void *data_end = p->data_end;
    if ((void *)(s + STUN_HEADER_LEN) > data_end)
        return STAT_DROP_STUN_MALFORMED;
    __u16 type = ((__u16)s[0] << 8) | s[1];
    __u16 msg_len = ((__u16)s[2] << 8) | s[3];
    __u32 cookie = ((__u32)s[4] << 24) | ((__u32)s[5] << 16) | ((__u32)s[6] << 8) | s[7];
    if (cookie != STUN_MAGIC_COOKIE)
        return STAT_DROP_STUN_MALFORMED;
    __u16 udp_payload = load_be16_len(p->udp->len) - sizeof(struct udphdr);
    if (msg_len & 3 || (__u32)msg_len + STUN_HEADER_LEN != udp_payload)
        return STAT_DROP_STUN_MALFORMED;
    if (type != STUN_BINDING_REQUEST)
        return STAT_DROP_STUN_NOT_BINDING;

    /* Walk the attributes to USERNAME (ICE puts it first; a few may precede it). */
    __u32 off = STUN_HEADER_LEN;
#pragma unroll
    for (int i = 0; i < STUN_MAX_ATTRS; i++) {
        if (off + 4 > (__u32)msg_len + STUN_HEADER_LEN || off > STUN_SCAN_MAX)
            break;
        __u8 *a = s + off;
        if ((void *)(a + 4) > data_end)
            return STAT_DROP_STUN_MALFORMED;
        __u16 atype = ((__u16)a[0] << 8) | a[1];
        __u16 alen = ((__u16)a[2] << 8) | a[3];
        if (off + 4 + alen > (__u32)msg_len + STUN_HEADER_LEN)
            return STAT_DROP_STUN_MALFORMED;
        if (atype == STUN_ATTR_USERNAME) {
            if (!ufrag_shape_ok(a + 4, data_end, alen))
                return STAT_DROP_STUN_BAD_UFRAG;
            p->ufrag_off = off + 4;  /* relay.bpf.c checks it against the live calls */
            return STAT_PASS_STUN_UNKNOWN;
        }
        off += 4 + ((alen + 3) & ~3);
    }
    return STAT_DROP_STUN_NO_USERNAME;
}

#endif
