/* Header parsing with bounds checks the verifier accepts. */
#ifndef SPLITRELAY_PARSE_H
#define SPLITRELAY_PARSE_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <linux/in.h>
#include "consts.h"

/* IPv4 fragment bits of frag_off (include/net/ip.h, not in the UAPI headers). */
#define IP_MF 0x2000
#define IP_OFFSET 0x1FFF

/* One 802.1Q tag as it sits after the MAC addresses. */
struct vlan_tag {
    __be16 tci;
    __be16 proto;
};

/* The parsed view of one frame: pointers into it plus what was found. */
struct pkt {
    void *data_end;
    struct ethhdr *eth;
    struct iphdr *ip4;     /* exactly one of ip4/ip6 is set for IP frames */
    struct ipv6hdr *ip6;
    struct udphdr *udp;
    __u8 *payload;
    __u32 ufrag_off;       /* offset of the server ufrag in the payload, once stun_admit passed it */
    __u32 len;             /* whole frame length, for byte counters */
    __u8 family;
    __u8 class;            /* enum pkt_class of the UDP payload */
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

/* Parse outcome: either keep going (PARSE_OK) or a stat_id to account. */
#define PARSE_OK (-1)

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

/* Parse Ethernet (+ one 802.1Q tag), IPv4 or IPv6, and UDP. Returns PARSE_OK
 * with p filled for a well-formed UDP packet, else the stat_id saying why it
 * is not ours (pass) or broken (drop). */
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
    if (proto == bpf_htons(ETH_P_8021Q)) {
        struct vlan_tag *tag = l3;
        if ((void *)(tag + 1) > data_end)
            return STAT_DROP_MALFORMED;
        proto = tag->proto;
        l3 = tag + 1;
    }

    struct udphdr *udp;
    __u32 l4_len; /* UDP length the IP header allows */
    if (proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = l3;
        if ((void *)(ip + 1) > data_end)
            return STAT_DROP_MALFORMED;
        if (ip->version != 4 || ip->ihl < 5)
            return STAT_DROP_MALFORMED;
        if (ip->ihl != 5)
            return STAT_PASS_IP_OPTIONS;
        if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
            return STAT_PASS_FRAGMENT;
        if (ip->protocol != IPPROTO_UDP)
            return STAT_PASS_NOT_RELAY;
        __u32 tot = load_be16_len(ip->tot_len);
        if (tot < sizeof(*ip) + sizeof(*udp) || (void *)ip + tot > data_end)
            return STAT_DROP_MALFORMED;
        l4_len = tot - sizeof(*ip);
        udp = (void *)(ip + 1);
        p->ip4 = ip;
        p->family = SR_AF_INET;
    } else if (proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = l3;
        if ((void *)(ip6 + 1) > data_end)
            return STAT_DROP_MALFORMED;
        if (ip6->version != 6)
            return STAT_DROP_MALFORMED;
        switch (ip6->nexthdr) {
        case IPPROTO_UDP:
            break;
        case IPPROTO_HOPOPTS: case IPPROTO_ROUTING: case IPPROTO_FRAGMENT:
        case IPPROTO_DSTOPTS: case IPPROTO_AH: case IPPROTO_ESP: case 135 /* mobility */:
            return STAT_PASS_IPV6_EXT;
        default:
            return STAT_PASS_NOT_RELAY;
        }
        l4_len = load_be16_len(ip6->payload_len);
        if (l4_len < sizeof(*udp) || (void *)(ip6 + 1) + l4_len > data_end)
            return STAT_DROP_MALFORMED;
        udp = (void *)(ip6 + 1);
        p->ip6 = ip6;
        p->family = SR_AF_INET6;
    } else {
        return STAT_PASS_NOT_RELAY;
    }

    if ((void *)(udp + 1) > data_end)
        return STAT_DROP_MALFORMED;
    __u32 ulen = load_be16_len(udp->len);
    if (ulen < sizeof(*udp) || ulen > l4_len)
        return STAT_DROP_MALFORMED;
    p->udp = udp;
    p->payload = (__u8 *)(udp + 1);
    p->class = ulen > sizeof(*udp) ? classify_payload(p->payload, data_end) : CLASS_OTHER;
    return PARSE_OK;
}

#endif
