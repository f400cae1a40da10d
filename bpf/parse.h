/* Header parsing with bounds checks the verifier accepts. */
#ifndef SPLITRELAY_PARSE_H
#define SPLITRELAY_PARSE_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <linux/tcp.h>
#include <linux/in.h>
#include "consts.h"

/* IPv4 fragment bits of frag_off (include/net/ip.h, not in the UAPI headers). */
#define IP_MF 0x2000
#define IP_OFFSET 0x1FFF

/* The start of an IPv6 extension header that carries its own length
 * (hop-by-hop, routing, destination options, mobility: RFC 8200 4.3-4.6). */
struct ext_hdr {
    __u8 nexthdr;
    __u8 len;              /* in 8-byte units, not counting the first 8 */
};

/* The IPv6 fragment header (RFC 8200 4.5). */
struct frag6_hdr {
    __u8 nexthdr;
    __u8 reserved;
    __be16 frag_off;       /* offset (13 bits), 2 reserved bits, M */
    __be32 id;
};

/* Extension headers looked through to find UDP; a longer chain passes. */
#define IPV6_EXT_MAX 4

/* The parsed view of one frame: pointers into it plus what was found. */
struct pkt {
    void *data_end;
    struct ethhdr *eth;
    struct iphdr *ip4;     /* exactly one of ip4/ip6 is set for IP frames */
    struct ipv6hdr *ip6;
    struct udphdr *udp;
    struct tcphdr *tcp;    /* set instead of udp for a TCP SYN (PARSE_TCP_SYN) */
    __u8 *payload;
    __u32 ufrag_off;       /* offset of the server ufrag in the payload, once stun_admit passed it */
    __u32 len;             /* whole frame length, for byte counters */
    __u8 family;
    __u8 class;            /* enum pkt_class of the UDP payload */
    __u8 refuse;           /* a stat_id: why the relay cannot take this packet if it is for the relay
                            * (IP options, a first fragment, IPv6 extension headers); 0: none */
};

/* A 16-bit length field in network order, as a number the verifier knows is
 * below 2^16. Kernels before 6.x's byte-swap tracking (Debian 12's 6.1
 * among them) give the result of BPF_END no bounds, and refuse packet
 * pointer arithmetic with it ("math between pkt pointer and register with
 * unbounded min value"); the mask bounds it again, and the empty asm keeps
 * the compiler from dropping a mask it knows to be redundant. */
static __always_inline __u32 load_be16_len(__be16 field)
{
    __u32 v = bpf_ntohs(field);
    asm volatile("" : "+r"(v));
    return v & 0xffff;
}

/* Parse outcome: either keep going (PARSE_OK) or a stat_id to account.
 * PARSE_TCP: ipv6_udp found TCP, not UDP, at *l4. PARSE_TCP_SYN: a TCP SYN
 * without ACK (a connection's first segment), p->tcp set, for the SYN limit
 * of the ICE-TCP listeners (relay.bpf.c syn_admit). */
#define PARSE_OK (-1)
#define PARSE_TCP (-2)
#define PARSE_TCP_SYN (-3)

/* RFC 7983 demultiplexing on the first payload byte. */
static __always_inline __u8 classify_payload(__u8 *payload, void *data_end)
{
    if ((void *)(payload + 1) > data_end)
        return CLASS_OTHER;
    __u8 b = *payload;
    if (b <= 3)
        return CLASS_STUN;
    if (b >= 20 && b <= 63)
        return CLASS_DTLS;
    if (b >= 128 && b <= 191)
        return CLASS_RTP;
    return CLASS_OTHER;
}

/* The UDP header of an IPv6 packet: after up to IPV6_EXT_MAX extension
 * headers. Returns PARSE_OK with *l4 and *ext_len (bytes of extension
 * headers) set, else the stat_id to account. A non-first fragment carries no
 * UDP header: its first fragment decides (dropped if it is the relay's, so
 * the kernel never reassembles it). */
static __always_inline int ipv6_udp(struct ipv6hdr *ip6, void *data_end, void **l4, __u32 *ext_len)
{
    __u8 next = ip6->nexthdr;
    void *at = ip6 + 1;
    __u32 len = 0;
#pragma unroll
    for (int i = 0; i < IPV6_EXT_MAX; i++) {
        if (next == IPPROTO_UDP)
            break;
        if (next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS || next == 135) {
            struct ext_hdr *h = at;
            if ((void *)(h + 1) > data_end)
                return STAT_DROP_MALFORMED;
            __u32 n = ((__u32)h->len + 1) * 8;
            next = h->nexthdr;
            at += n;
            len += n;
        } else if (next == IPPROTO_FRAGMENT) {
            struct frag6_hdr *f = at;
            if ((void *)(f + 1) > data_end)
                return STAT_DROP_MALFORMED;
            if (f->frag_off & bpf_htons(0xfff8))
                return STAT_PASS_IPV6_EXT;
            next = f->nexthdr;
            at += sizeof(*f);
            len += sizeof(*f);
        } else {
            break;
        }
    }
    if (next == IPPROTO_TCP) {
        *l4 = at;  /* extension headers or not: a SYN's source is in the fixed header */
        return PARSE_TCP;
    }
    if (next != IPPROTO_UDP)
        return len ? STAT_PASS_IPV6_EXT : STAT_PASS_NOT_RELAY;
    *l4 = at;
    *ext_len = len;
    return PARSE_OK;
}

/* A TCP segment after its IP header: PARSE_TCP_SYN for a SYN without ACK,
 * else it is the kernel's (the relay's TCP traffic is the kernel's once
 * connected; a truncated header is the kernel's to drop). */
static __always_inline int tcp_syn(struct pkt *p, struct tcphdr *tcp, void *data_end)
{
    if ((void *)(tcp + 1) > data_end)
        return STAT_PASS_NOT_RELAY;
    if (!tcp->syn || tcp->ack)
        return STAT_PASS_NOT_RELAY;
    p->tcp = tcp;
    return PARSE_TCP_SYN;
}

/* Parse Ethernet, IPv4 or IPv6, and UDP. Returns PARSE_OK with p filled for
 * a UDP packet (p->refuse says if it carries what the relay cannot take),
 * PARSE_TCP_SYN for a TCP SYN (tcp_syn), else the stat_id saying why it is not ours (pass) or broken (drop).
 * 802.1Q-tagged frames pass untouched: the stack strips the tag and its VLAN
 * device owns the addresses, and a redirect from here would leave on the
 * physical device with the tag of the ingress (attach XDP where frames
 * arrive untagged). */
static __always_inline int parse_frame(struct xdp_md *ctx, struct pkt *p)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    p->data_end = data_end;
    p->len = data_end - data;

    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return STAT_DROP_MALFORMED;
    p->eth = eth;
    __be16 proto = eth->h_proto;
    void *l3 = eth + 1;
    if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD))
        return STAT_PASS_VLAN;

    struct udphdr *udp;
    __u32 l4_len; /* UDP length the IP header allows */
    int first_fragment = 0;
    if (proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = l3;
        if ((void *)(ip + 1) > data_end)
            return STAT_DROP_MALFORMED;
        if (ip->version != 4 || ip->ihl < 5)
            return STAT_DROP_MALFORMED;
        if (ip->frag_off & bpf_htons(IP_OFFSET))
            return STAT_PASS_FRAGMENT;
        if (ip->protocol != IPPROTO_UDP) {
            if (ip->protocol != IPPROTO_TCP)
                return STAT_PASS_NOT_RELAY;
            /* Options or a first fragment do not spare a SYN its limit. */
            p->ip4 = ip;
            p->family = SR_AF_INET;
            return tcp_syn(p, (void *)ip + ip->ihl * 4, data_end);
        }
        __u32 hlen = ip->ihl * 4;
        __u32 tot = load_be16_len(ip->tot_len);
        if (tot < hlen + sizeof(*udp) || (void *)ip + tot > data_end)
            return STAT_DROP_MALFORMED;
        l4_len = tot - hlen;
        udp = (void *)ip + hlen;
        if (hlen != sizeof(*ip)) {
            p->refuse = STAT_DROP_IP_OPTIONS;
        } else if (ip->frag_off & bpf_htons(IP_MF)) {
            p->refuse = STAT_DROP_FRAGMENT;
            first_fragment = 1;
        }
        p->ip4 = ip;
        p->family = SR_AF_INET;
    } else if (proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = l3;
        if ((void *)(ip6 + 1) > data_end)
            return STAT_DROP_MALFORMED;
        if (ip6->version != 6)
            return STAT_DROP_MALFORMED;
        void *l4 = NULL;
        __u32 ext_len = 0;
        int rc = ipv6_udp(ip6, data_end, &l4, &ext_len);
        if (rc == PARSE_TCP) {
            p->ip6 = ip6;
            p->family = SR_AF_INET6;
            return tcp_syn(p, l4, data_end);
        }
        if (rc != PARSE_OK)
            return rc;
        __u32 plen = load_be16_len(ip6->payload_len);
        if (plen < ext_len + sizeof(*udp) || (void *)(ip6 + 1) + plen > data_end)
            return STAT_DROP_MALFORMED;
        l4_len = plen - ext_len;
        udp = l4;
        if (ext_len) {
            p->refuse = STAT_DROP_IPV6_EXT;
            first_fragment = 1;  /* perhaps: its UDP length may be the whole datagram's */
        }
        p->ip6 = ip6;
        p->family = SR_AF_INET6;
    } else {
        return STAT_PASS_NOT_RELAY;
    }

    if ((void *)(udp + 1) > data_end)
        return STAT_DROP_MALFORMED;
    __u32 ulen = load_be16_len(udp->len);
    if (ulen < sizeof(*udp) || (ulen > l4_len && !first_fragment))
        return STAT_DROP_MALFORMED;
    p->udp = udp;
    p->payload = (__u8 *)(udp + 1);
    p->class = ulen > sizeof(*udp) ? classify_payload(p->payload, data_end) : CLASS_OTHER;
    return PARSE_OK;
}

#endif
