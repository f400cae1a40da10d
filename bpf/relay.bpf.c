/* splitrelay XDP fast path: parse → classify → look up → rewrite → forward.
 *
 * Client → VIP:port from a known client tuple: rewritten to
 *   flow source (a pool address:port) → current owner of the call, redirected.
 * Owner → flow source: forwarded back as VIP:port → client,
 *   only when the sender is the current owner of the call.
 * Unknown client tuple: a well-formed STUN Binding request carrying our ufrag
 * shape goes to the slow path (XDP_PASS, stun.h), the rest is dropped.
 * Everything else passes untouched. Every verdict is counted. */
#include "consts.h"
#include "structs.h"
#include "maps.h"
#include "parse.h"
#include "stun.h"
#include "csum.h"

#define AF_INET_FIB 2
#define AF_INET6_FIB 10

static __always_inline int account(__u32 id, __u32 bytes, int verdict)
{
    struct stat_value *s = stats.lookup(&id);
    if (s) {
        s->packets += 1;  /* per-CPU slot: no atomics needed */
        s->bytes += bytes;
    }
    return verdict;
}

static __always_inline int verdict_of(int stat)
{
    if (stat >= STAT_DROP_MALFORMED && stat < STAT_FWD_IN_STUN)
        return XDP_DROP;
    return XDP_PASS;
}

static __always_inline void copy_addr(__be32 *dst, const __be32 *src)
{
    dst[0] = src[0]; dst[1] = src[1]; dst[2] = src[2]; dst[3] = src[3];
}

static __always_inline int addr_eq(const __be32 *a, const __be32 *b)
{
    return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

/* Read the packet's source and destination into 4-word form. */
static __always_inline void pkt_addrs(struct pkt *p, __be32 *src, __be32 *dst)
{
    if (p->ip4) {
        src[0] = p->ip4->saddr; src[1] = 0; src[2] = 0; src[3] = 0;
        dst[0] = p->ip4->daddr; dst[1] = 0; dst[2] = 0; dst[3] = 0;
    } else if (p->ip6) {
        __builtin_memcpy(src, &p->ip6->saddr, 16);
        __builtin_memcpy(dst, &p->ip6->daddr, 16);
    }
}

/* TTL / hop limit about to expire: the kernel must answer with ICMP. */
static __always_inline int ttl_expired(struct pkt *p)
{
    if (p->ip4)
        return p->ip4->ttl <= 1;
    if (p->ip6)
        return p->ip6->hop_limit <= 1;
    return 1;
}

/* Route the rewritten packet. Returns 0 with the egress ifindex and MACs in
 * fib, or the stat_id to pass with. */
static __always_inline int route(struct xdp_md *ctx, struct pkt *p, struct bpf_fib_lookup *fib,
                                 const __be32 *src, const __be32 *dst, __be16 sport, __be16 dport)
{
    __builtin_memset(fib, 0, sizeof(*fib));
    fib->ifindex = ctx->ingress_ifindex;
    fib->l4_protocol = IPPROTO_UDP;
    fib->sport = sport;
    fib->dport = dport;
    if (p->ip4) {
        fib->family = AF_INET_FIB;
        fib->tos = p->ip4->tos;
        fib->tot_len = bpf_ntohs(p->ip4->tot_len);
        fib->ipv4_src = src[0];
        fib->ipv4_dst = dst[0];
    } else if (p->ip6) {
        fib->family = AF_INET6_FIB;
        fib->tot_len = bpf_ntohs(p->ip6->payload_len) + sizeof(struct ipv6hdr);
        __builtin_memcpy(fib->ipv6_src, src, 16);
        __builtin_memcpy(fib->ipv6_dst, dst, 16);
    }
    int rc = bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
    if (rc == BPF_FIB_LKUP_RET_SUCCESS)
        return 0;
    if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
        return STAT_PASS_NO_NEIGH;
    return STAT_PASS_FIB_FAIL;
}

/* Rewrite addresses, ports, TTL, checksums and MACs in place. */
static __always_inline void rewrite(struct pkt *p, struct bpf_fib_lookup *fib,
                                    const __be32 *src, const __be32 *dst, __be16 sport, __be16 dport)
{
    struct udphdr *udp = p->udp;
    __u64 l4 = 0; /* change to the UDP checksum (pseudo-header + ports) */
    if (p->ip4) {
        struct iphdr *ip = p->ip4;
        __u64 l3 = 0;
        l3 = csum_diff32(l3, ip->saddr, src[0]);
        l3 = csum_diff32(l3, ip->daddr, dst[0]);
        l4 = l3;
        /* TTL shares a 16-bit word with the protocol number. */
        __u16 old_word = *(__u16 *)&ip->ttl;
        ip->ttl -= 1;
        l3 = csum_diff16(l3, old_word, *(__u16 *)&ip->ttl);
        ip->check = csum_apply(ip->check, l3);
        ip->saddr = src[0];
        ip->daddr = dst[0];
    } else if (p->ip6) {
        struct ipv6hdr *ip6 = p->ip6;
        __be32 *s6 = (__be32 *)&ip6->saddr;
        __be32 *d6 = (__be32 *)&ip6->daddr;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            l4 = csum_diff32(l4, s6[i], src[i]);
            l4 = csum_diff32(l4, d6[i], dst[i]);
        }
        copy_addr(s6, src);
        copy_addr(d6, dst);
        ip6->hop_limit -= 1;
    }
    l4 = csum_diff16(l4, udp->source, sport);
    l4 = csum_diff16(l4, udp->dest, dport);
    udp->source = sport;
    udp->dest = dport;
    /* A zero IPv4 UDP checksum means "none" and stays so; a computed zero is
     * sent as 0xffff (RFC 768). */
    if (p->ip6 || udp->check) {
        __u16 c = csum_apply(udp->check, l4);
        udp->check = c ? c : 0xffff;
    }
    __builtin_memcpy(p->eth->h_dest, fib->dmac, ETH_ALEN);
    __builtin_memcpy(p->eth->h_source, fib->smac, ETH_ALEN);
}

/* The route of one direction of a flow: the cached one while it is fresh
 * and was looked up for this owner generation, else a fib lookup that
 * refreshes the cache. Same contract as route(). */
static __always_inline int cached_route(struct xdp_md *ctx, struct pkt *p, struct bpf_fib_lookup *fib,
                                        struct nexthop *nh, __u32 gen, __u64 now,
                                        const __be32 *src, const __be32 *dst, __be16 sport, __be16 dport)
{
    if (nh->until_ns > now && nh->gen == gen) {
        fib->ifindex = nh->ifindex;
        __builtin_memcpy(fib->dmac, nh->dmac, ETH_ALEN);
        __builtin_memcpy(fib->smac, nh->smac, ETH_ALEN);
        return 0;
    }
    int rc = route(ctx, p, fib, src, dst, sport, dport);
    if (rc)
        return rc;
    nh->ifindex = fib->ifindex;
    nh->gen = gen;
    __builtin_memcpy(nh->dmac, fib->dmac, ETH_ALEN);
    __builtin_memcpy(nh->smac, fib->smac, ETH_ALEN);
    nh->until_ns = now + NH_CACHE_NS;
    return 0;
}

static __always_inline int emit(struct xdp_md *ctx, struct bpf_fib_lookup *fib)
{
    if (fib->ifindex == ctx->ingress_ifindex)
        return XDP_TX;
    return bpf_redirect(fib->ifindex, 0);
}

static __always_inline int owner_endpoint(struct owner_info *o, __u8 family, __be32 *addr, __be16 *port)
{
    if (family == SR_AF_INET) {
        if (!o->port4)
            return -1;
        addr[0] = o->addr4; addr[1] = 0; addr[2] = 0; addr[3] = 0;
        *port = o->port4;
    } else {
        if (!o->port6)
            return -1;
        copy_addr(addr, o->addr6);
        *port = o->port6;
    }
    return 0;
}

/* GCRA on one bucket: admit when the next packet is due within the burst. */
static __always_inline int bucket_admits(struct admit_bucket *b, __u64 now, __u64 interval, __u64 burst)
{
    __u64 tat = b->tat_ns > now ? b->tat_ns : now;
    if (tat - now > burst)
        return 0;
    b->tat_ns = tat + interval;
    return 1;
}

/* What an unknown tuple may send to the slow path, after stun_admit passed
 * a check or a rebinding candidate was found: a check's ufrag must be a live
 * call's, within that call's rate; then per source (IPv4 /32, IPv6 /64),
 * then the global budget. Returns `stat` if admitted. Established flows never
 * get here. (Map calls live in this file: bcc rewrites them in the main
 * source only.) */
static __always_inline int admit(struct pkt *p, __be32 src0, __be32 src1, int stat)
{
    __u32 zero = 0;
    __u32 family = p->family;
    struct admit_config *cfg = admit_cfg.lookup(&zero);
    if (!cfg)
        return stat;
    __u64 now = bpf_ktime_get_ns();
    if (stat == STAT_PASS_STUN_UNKNOWN) {
        __u32 off = p->ufrag_off;
        if (off > STUN_SCAN_MAX + 4)
            return STAT_DROP_STUN_MALFORMED;
        __u8 *u = p->payload + off;
        if ((void *)(u + UFRAG_LEN) > p->data_end)
            return STAT_DROP_STUN_MALFORMED;
        struct ufrag_key uk;
        __builtin_memcpy(uk.ufrag, u, UFRAG_LEN);
        struct admit_bucket *c = live_ufrags.lookup(&uk);
        if (!c)
            return STAT_DROP_STUN_UNKNOWN_UFRAG;
        if (cfg->call_interval_ns && !bucket_admits(c, now, cfg->call_interval_ns, cfg->call_burst_ns))
            return STAT_DROP_STUN_CALL_RATE;
    }
    if (cfg->source_interval_ns) {
        struct source_key k;
        k.family = family;
        k.addr[0] = src0;
        k.addr[1] = family == SR_AF_INET6 ? src1 : 0;
        struct admit_bucket *b = admit_sources.lookup(&k);
        if (!b) {
            struct admit_bucket fresh = { .tat_ns = now + cfg->source_interval_ns };
            admit_sources.update(&k, &fresh);
        } else if (!bucket_admits(b, now, cfg->source_interval_ns, cfg->source_burst_ns)) {
            return STAT_DROP_STUN_RATE;
        }
    }
    if (cfg->cpu_interval_ns) {
        struct admit_bucket *g = admit_budget.lookup(&zero);
        if (g && !bucket_admits(g, now, cfg->cpu_interval_ns, cfg->cpu_burst_ns))
            return STAT_DROP_STUN_BUDGET;
    }
    return stat;
}

/* SSRC of an RTP packet (RTCP has none here: RFC 5761 types), as in the
 * packet; 0 if none. */
static __always_inline __u32 rtp_ssrc(struct pkt *p)
{
    __u8 *pl = p->payload;
    if ((void *)(pl + 12) > p->data_end)
        return 0;
    if (pl[1] >= 192 && pl[1] <= 223)
        return 0;
    __u32 ssrc;
    __builtin_memcpy(&ssrc, pl + 8, sizeof(ssrc));
    return ssrc;
}

/* A flow source's address: the pool's first address plus the flow's index
 * (the last 32-bit word counts up; the config keeps it from carrying). */
static __always_inline void pool_addr(const struct relay_config *cfg, __u8 family, __u16 idx, __be32 *out)
{
    copy_addr(out, cfg->internal_addr);
    if (family == SR_AF_INET)
        out[0] = bpf_htonl(bpf_ntohl(out[0]) + idx);
    else
        out[3] = bpf_htonl(bpf_ntohl(out[3]) + idx);
}

/* Index of addr in the family's pool of internal addresses, or -1. */
static __always_inline int pool_index(const struct relay_config *cfg, __u8 family, const __be32 *addr)
{
    __u32 idx;
    if (family == SR_AF_INET) {
        idx = bpf_ntohl(addr[0]) - bpf_ntohl(cfg->internal_addr[0]);
    } else {
        if (addr[0] != cfg->internal_addr[0] || addr[1] != cfg->internal_addr[1] ||
            addr[2] != cfg->internal_addr[2])
            return -1;
        idx = bpf_ntohl(addr[3]) - bpf_ntohl(cfg->internal_addr[3]);
    }
    return idx < cfg->addr_count ? (int)idx : -1;
}

static __always_inline void client_key(struct pkt *p, const __be32 *saddr, const __be32 *daddr,
                                       struct flow_key *key)
{
    key->family = p->family;
    key->client_port = p->udp->source;
    key->relay_port = p->udp->dest;
    copy_addr(key->client_addr, saddr);
    copy_addr(key->relay_addr, daddr);
}

/* Client → VIP from a tuple the flows map does not hold. */
static __always_inline int unknown_client(struct pkt *p)
{
    if (p->class == CLASS_STUN)
        return stun_admit(p);
    if (p->class == CLASS_RTP) {
        /* Media from a new tuple carrying a known flow's SSRC: perhaps
         * that client behind a NAT that rebound. The slow path has the
         * owner authenticate it before anything changes. */
        __u32 ssrc = rtp_ssrc(p);
        if (ssrc && ssrcs.lookup(&ssrc))
            return STAT_PASS_REBIND;
    }
    return STAT_DROP_UNKNOWN_NOT_STUN;
}

/* Client → VIP on a known flow: forward to the call's owner. */
static __always_inline int from_client(struct xdp_md *ctx, struct pkt *p, struct bpf_fib_lookup *fib,
                                       struct flow_key *key, struct flow_info *flow)
{
    if (p->class == CLASS_OTHER)
        return STAT_DROP_BAD_CLASS;
    __u32 conn_id = flow->conn_id;
    struct owner_info *owner = owners.lookup(&conn_id);
    if (!owner)
        return STAT_DROP_NO_OWNER;
    __be32 dst[4];
    __be16 dport;
    if (owner_endpoint(owner, p->family, dst, &dport) < 0)
        return STAT_DROP_NO_OWNER;
    __u32 idx = p->family == SR_AF_INET ? 0 : 1;
    struct relay_config *cfg = relay_cfg.lookup(&idx);
    if (!cfg || !cfg->addr_count)
        return STAT_DROP_NO_INTERNAL_ADDR;
    if (ttl_expired(p))
        return STAT_PASS_TTL_EXPIRED;

    __be32 src[4];
    pool_addr(cfg, p->family, flow->flow_addr, src);
    __u64 now = bpf_ktime_get_coarse_ns();
    int rc = cached_route(ctx, p, fib, &flow->nh, owner->generation, now, src, dst, flow->flow_port, dport);
    if (rc)
        return rc;
    if (p->class == CLASS_RTP && !flow->ssrc) {
        __u32 ssrc = rtp_ssrc(p);  /* once per flow: index it for rebinding */
        if (ssrc) {
            flow->ssrc = ssrc;
            ssrcs.update(&ssrc, key);
        }
    }
    rewrite(p, fib, src, dst, flow->flow_port, dport);
    /* Plain adds: a flow's packets arrive on one CPU (RSS hashes its tuple);
     * a rare race loses a count, never a packet. */
    flow->packets += 1;
    flow->bytes += p->len;
    flow->last_seen_ns = now;
    return STAT_FWD_IN_STUN + p->class;
}

/* Owner → flow port: forward back to the client from the VIP. */
static __always_inline int from_owner(struct xdp_md *ctx, struct pkt *p, struct bpf_fib_lookup *fib,
                                      __be32 *saddr, __u16 flow_addr)
{
    struct reverse_key key = {};
    key.family = p->family;
    key.owner_port = p->udp->source;
    key.flow_port = p->udp->dest;
    key.flow_addr = flow_addr;
    copy_addr(key.owner_addr, saddr);

    struct reverse_info *rev = reverse.lookup(&key);
    if (!rev)
        return STAT_PASS_RETURN_UNKNOWN;
    __u32 conn_id = rev->conn_id;
    struct owner_info *owner = owners.lookup(&conn_id);
    if (!owner)
        return STAT_DROP_NO_OWNER;
    __be32 oaddr[4];
    __be16 oport;
    if (owner_endpoint(owner, p->family, oaddr, &oport) < 0)
        return STAT_DROP_NOT_OWNER;
    if (oport != key.owner_port || !addr_eq(oaddr, saddr))
        return STAT_DROP_NOT_OWNER;
    if (p->class == CLASS_OTHER)
        return STAT_DROP_BAD_CLASS;
    if (ttl_expired(p))
        return STAT_PASS_TTL_EXPIRED;

    __u64 now = bpf_ktime_get_coarse_ns();
    int rc = cached_route(ctx, p, fib, &rev->nh, 0, now, rev->client.relay_addr, rev->client.client_addr,
                          rev->client.relay_port, rev->client.client_port);
    if (rc)
        return rc;
    rewrite(p, fib, rev->client.relay_addr, rev->client.client_addr,
            rev->client.relay_port, rev->client.client_port);
    rev->packets += 1;
    rev->bytes += p->len;
    rev->last_seen_ns = now;
    return STAT_FWD_OUT_STUN + p->class;
}

int xdp_relay(struct xdp_md *ctx)
{
    struct pkt p = {};
    int stat = parse_frame(ctx, &p);
    if (stat != PARSE_OK)
        return account(stat, p.len, verdict_of(stat));

    /* The IPv6 UDP checksum is mandatory (RFC 8200 8.1). */
    if (p.ip6 && !p.udp->check)
        return account(STAT_DROP_MALFORMED, p.len, XDP_DROP);

    __be32 saddr[4], daddr[4];
    pkt_addrs(&p, saddr, daddr);

    struct vip_key vk = {};
    vk.family = p.family;
    vk.port = p.udp->dest;
    copy_addr(vk.addr, daddr);
    struct bpf_fib_lookup fib;
    __u32 ifindex = ctx->ingress_ifindex;
    __u32 *role = if_roles.lookup(&ifindex);  /* NULL beyond MAX_IFINDEX: unchecked */
    struct flow_key key = {};
    struct flow_info *flow = NULL;
    int public_side = role && *role == ROLE_PUBLIC;
    if (public_side) {
        /* The hit path first: a flow's key holds the VIP it was installed
         * for, so a known tuple needs no VIP lookup. */
        client_key(&p, saddr, daddr, &key);
        flow = flows.lookup(&key);
        if (flow) {
            stat = from_client(ctx, &p, &fib, &key, flow);
            goto out;
        }
    }
    if (vips.lookup(&vk)) {
        if (role && *role && *role != ROLE_PUBLIC)
            return account(STAT_DROP_WRONG_SIDE, p.len, XDP_DROP);
        if (!public_side) {  /* an interface without a role: look the tuple up here */
            client_key(&p, saddr, daddr, &key);
            flow = flows.lookup(&key);
        }
        stat = flow ? from_client(ctx, &p, &fib, &key, flow) : unknown_client(&p);
        if (stat == STAT_PASS_STUN_UNKNOWN || stat == STAT_PASS_REBIND)
            stat = admit(&p, saddr[0], saddr[1], stat);
    } else {
        __u32 idx = p.family == SR_AF_INET ? 0 : 1;
        struct relay_config *cfg = relay_cfg.lookup(&idx);
        __u16 dport = bpf_ntohs(p.udp->dest);
        if (!cfg || dport < cfg->flow_port_min || dport > cfg->flow_port_max)
            return account(STAT_PASS_NOT_RELAY, p.len, XDP_PASS);
        int flow_addr = pool_index(cfg, p.family, daddr);
        if (flow_addr < 0)
            return account(STAT_PASS_NOT_RELAY, p.len, XDP_PASS);
        if (role && *role && *role != ROLE_INTERNAL)
            return account(STAT_DROP_WRONG_SIDE, p.len, XDP_DROP);
        stat = from_owner(ctx, &p, &fib, saddr, (__u16)flow_addr);
    }
out:
    if (stat >= STAT_FWD_IN_STUN)
        return account(stat, p.len, emit(ctx, &fib));
    return account(stat, p.len, verdict_of(stat));
}
