/* splitrelay XDP fast path: parse → classify → look up → rewrite → forward.
 *
 * Client → VIP:port from a known client tuple: rewritten to
 *   flow source (a pool address:port) → current owner of the call, redirected.
 * Owner → flow source: forwarded back as VIP:port → client,
 *   only when the sender is the current owner of the call.
 * Unknown client tuple: a well-formed STUN Binding request carrying our ufrag
 * shape goes to the slow path (XDP_PASS, stun.h), the rest is dropped.
 * What the relay cannot take (IP options, fragments, IPv6 extension headers)
 * is dropped when it is for the relay, never handed to the kernel to
 * deliver to relayd. A TCP SYN to an ICE-TCP listener spends its source's
 * SYN bucket (syn_admit). Everything else passes untouched. Every verdict
 * is counted. */
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

/* The coarse clock, read through a per-CPU copy taken once per jiffy.
 * bpf_jiffies64 is one load the verifier inlines; bpf_ktime_get_coarse_ns
 * is a helper call (~20 ns a packet on the benchmark machine), and the
 * coarse clock itself only moves at a tick. Good to a tick or two: enough
 * for last-seen and the route cache's lifetime. */
static __always_inline __u64 coarse_now(void)
{
    __u32 zero = 0;
    __u64 j = bpf_jiffies64();
    struct clock_copy *c = clock.lookup(&zero);
    if (!c)
        return bpf_ktime_get_coarse_ns();
    if (c->jiffies != j) {
        c->jiffies = j;
        c->ns = bpf_ktime_get_coarse_ns();
    }
    return c->ns;
}

/* A full memory barrier (smp_mb) for BPF, which has no fence instruction:
 * an atomic add of 0 to this CPU's clock copy (its own cache line), which
 * the JITs emit as a locked add (x86) or an ldaddal (arm64), ordering every
 * load and store before it against every one after. 64-bit: the compiler
 * bcc drives has no 32-bit atomics with a result. */
static __always_inline void full_barrier(void)
{
    __u32 zero = 0;
    struct clock_copy *c = clock.lookup(&zero);
    if (c)
        __sync_fetch_and_add(&c->jiffies, 0);
}

/* The owners entry of a flow's call: its slot, while the slot still names
 * the flow's connection id (a slot freed and given to another call leaves
 * stale flows pointing at someone else's owner). */
static __always_inline struct owner_info *call_owner(__u32 slot, __u32 conn_id)
{
    struct owner_info *o = owners.lookup(&slot);
    if (!o || o->conn_id != conn_id || !conn_id)
        return NULL;
    return o;
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

/* TTL / hop limit 0. The relay rewrites a known flow's packet to a new
 * destination, as a TURN server relays a datagram: RFC 8656 14 drops an
 * incoming 0 and sends one less than the incoming value otherwise, so a TTL
 * of 1 leaves with 0 (its owner, on the relay's network, takes it; a loop
 * through the relay dies at the next pass). The kernel has nothing to add:
 * no ICMP time-exceeded for a relay's own flows. */
static __always_inline int ttl_zero(struct pkt *p)
{
    if (p->ip4)
        return p->ip4->ttl == 0;
    if (p->ip6)
        return p->ip6->hop_limit == 0;
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

/* The checksum changes of rewriting p to src:sport → dst:dport with its
 * TTL decremented, folded to 16 bits, into nh: csum_l3 for the IPv4 header,
 * csum_l4 for UDP (pseudo-header and ports). For one direction of a flow they
 * stay the same while its route cache does: the old addresses and ports are
 * the entry's key, the new ones its owner's (the slot's epoch) and its flow
 * source's, and a TTL above 1 changes its word the same way whatever it is.
 * So they are worked out with the route, not per packet. */
static __always_inline void csum_deltas(struct pkt *p, struct nexthop *nh,
                                        const __be32 *src, const __be32 *dst, __be16 sport, __be16 dport)
{
    struct udphdr *udp = p->udp;
    __u64 l3 = 0;
    __u64 l4 = 0;
    if (p->ip4) {
        struct iphdr *ip = p->ip4;
        l3 = csum_diff32(l3, ip->saddr, src[0]);
        l3 = csum_diff32(l3, ip->daddr, dst[0]);
        l4 = l3;
        /* TTL shares a 16-bit word with the protocol number, TTL first;
         * it is above 0 here, so the decrement borrows nothing. */
        __u16 word = *(__u16 *)&ip->ttl;
        l3 = csum_diff16(l3, word, word - bpf_htons(0x0100));
    } else if (p->ip6) {
        __be32 *s6 = (__be32 *)&p->ip6->saddr;
        __be32 *d6 = (__be32 *)&p->ip6->daddr;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            l4 = csum_diff32(l4, s6[i], src[i]);
            l4 = csum_diff32(l4, d6[i], dst[i]);
        }
    }
    l4 = csum_diff16(l4, udp->source, sport);
    l4 = csum_diff16(l4, udp->dest, dport);
    nh->csum_l3 = csum_fold64(l3);
    nh->csum_l4 = csum_fold64(l4);
}

_Static_assert(__builtin_offsetof(struct nexthop, smac) == __builtin_offsetof(struct nexthop, dmac) + ETH_ALEN,
               "rewrite copies dmac and smac as one run, as the frame holds them");
_Static_assert(__builtin_offsetof(struct ethhdr, h_source) == ETH_ALEN, "h_source follows h_dest");

/* Rewrite an IPv4 header in place: TTL, addresses, checksum (nh's change). */
static __always_inline void rewrite_ip4(struct iphdr *ip, const struct nexthop *nh, __be32 src, __be32 dst)
{
    ip->ttl -= 1;
    ip->check = csum_apply(ip->check, nh->csum_l3);
    ip->saddr = src;
    ip->daddr = dst;
}

/* Rewrite ports, the UDP checksum (nh's change) and MACs in place. */
static __always_inline void rewrite_udp_eth(struct pkt *p, const struct nexthop *nh, __be16 sport, __be16 dport)
{
    struct udphdr *udp = p->udp;
    udp->source = sport;
    udp->dest = dport;
    /* A zero IPv4 UDP checksum means "none" and stays so; a computed zero is
     * sent as 0xffff (RFC 768). */
    if (p->ip6 || udp->check) {
        __u16 c = csum_apply(udp->check, nh->csum_l4);
        udp->check = c ? c : 0xffff;
    }
    /* dmac and smac lie together in nh as h_dest and h_source do in the
     * frame: one 12-byte copy. */
    __builtin_memcpy(p->eth, nh->dmac, 2 * ETH_ALEN);
}

/* Rewrite addresses, ports, TTL, checksums (nh's changes) and MACs in place. */
static __always_inline void rewrite(struct pkt *p, const struct nexthop *nh,
                                    const __be32 *src, const __be32 *dst, __be16 sport, __be16 dport)
{
    if (p->ip4) {
        rewrite_ip4(p->ip4, nh, src[0], dst[0]);
    } else if (p->ip6) {
        struct ipv6hdr *ip6 = p->ip6;
        copy_addr((__be32 *)&ip6->saddr, src);
        copy_addr((__be32 *)&ip6->daddr, dst);
        ip6->hop_limit -= 1;
    }
    rewrite_udp_eth(p, nh, sport, dport);
}

/* The route of one direction of a flow, in nh: the cached one while it is
 * fresh and was made under this epoch, else a fib lookup (and the checksum
 * changes) that refreshes the cache. Returns 0, or the stat_id to pass with.
 * The cache is written as a seqlock's writer would: invalidated, then the
 * route, checksum changes and owner (dst4/dport: IPv4 towards an owner),
 * then its validity (epoch, then until_ns) last, behind a barrier: on
 * weakly ordered CPUs (arm64) too, another CPU that finds the cache valid
 * finds its contents (a flow's packets come to one CPU by RSS; this is for
 * the rest). */
static __always_inline int cached_route(struct xdp_md *ctx, struct pkt *p, struct nexthop *nh, __u32 epoch,
                                        __u64 now, const __be32 *src, const __be32 *dst,
                                        __be16 sport, __be16 dport)
{
    if (nh->until_ns > now && nh->epoch == epoch)
        return 0;
    struct bpf_fib_lookup fib;
    int rc = route(ctx, p, &fib, src, dst, sport, dport);
    if (rc)
        return rc;
    nh->until_ns = 0;
    full_barrier();
    nh->ifindex = fib.ifindex;
    __builtin_memcpy(nh->dmac, fib.dmac, ETH_ALEN);
    __builtin_memcpy(nh->smac, fib.smac, ETH_ALEN);
    csum_deltas(p, nh, src, dst, sport, dport);
    nh->dst4 = p->ip4 ? dst[0] : 0;
    nh->dport = p->ip4 ? dport : 0;
    full_barrier();
    nh->epoch = epoch;
    nh->until_ns = now + NH_CACHE_NS;
    return 0;
}

static __always_inline int emit(struct xdp_md *ctx, __u32 ifindex)
{
    if (ifindex == ctx->ingress_ifindex)
        return XDP_TX;
    return bpf_redirect(ifindex, 0);
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

/* The admission key of a source: its address under the configured prefix. */
static __always_inline void source_of(const struct admit_config *cfg, __u32 family, __be32 src0, __be32 src1,
                                      struct source_key *k)
{
    k->family = family;
    if (family == SR_AF_INET6) {
        k->addr[0] = src0 & cfg->source_mask6[0];
        k->addr[1] = src1 & cfg->source_mask6[1];
    } else {
        k->addr[0] = src0 & cfg->source_mask4;
        k->addr[1] = 0;
    }
}

/* What an unknown tuple may send to the slow path, after stun_admit passed
 * a check or a rebinding candidate was found. A check's ufrag must be a
 * live call's; then the source's bucket (its prefix), then the call's (the
 * check's ufrag, or the candidate's SSRC), then the global budget. The
 * source is charged first: a source over its rate never reaches its
 * target call's bucket, so it cannot spend a live call's checks. Checks and
 * candidates count their drops apart (a STUN flood and an RTP flood look
 * different). Returns `stat` if admitted. Established flows never get here.
 * (Map calls live in this file: bcc rewrites them in the main source only.) */
static __always_inline int admit(struct pkt *p, __be32 src0, __be32 src1, int stat, __u32 ssrc)
{
    __u32 zero = 0;
    __u32 family = p->family;
    struct admit_config *cfg = admit_cfg.lookup(&zero);
    if (!cfg)
        return stat;
    __u64 now = bpf_ktime_get_ns();
    int stun = stat == STAT_PASS_STUN_UNKNOWN;
    struct admit_bucket *call = NULL;
    if (stun) {
        __u32 off = p->ufrag_off;
        if (off > STUN_SCAN_MAX + 4)
            return STAT_DROP_STUN_MALFORMED;
        __u8 *u = p->payload + off;
        if ((void *)(u + UFRAG_LEN) > p->data_end)
            return STAT_DROP_STUN_MALFORMED;
        struct ufrag_key uk;
        __builtin_memcpy(uk.ufrag, u, UFRAG_LEN);
        call = live_ufrags.lookup(&uk);
        if (!call)
            return STAT_DROP_STUN_UNKNOWN_UFRAG;
    }
    if (cfg->source_interval_ns) {
        struct source_key k;
        source_of(cfg, family, src0, src1, &k);
        struct admit_bucket *b = admit_sources.lookup(&k);
        if (!b) {
            struct admit_bucket fresh = { .tat_ns = now + cfg->source_interval_ns };
            admit_sources.update(&k, &fresh);
        } else if (!bucket_admits(b, now, cfg->source_interval_ns, cfg->source_burst_ns)) {
            return stun ? STAT_DROP_STUN_RATE : STAT_DROP_REBIND_RATE;
        }
    }
    if (stun) {
        if (cfg->call_interval_ns && !bucket_admits(call, now, cfg->call_interval_ns, cfg->call_burst_ns))
            return STAT_DROP_STUN_CALL_RATE;
    } else if (cfg->rebind_interval_ns) {
        call = rebind_ssrcs.lookup(&ssrc);
        if (!call) {
            struct admit_bucket fresh = { .tat_ns = now + cfg->rebind_interval_ns };
            rebind_ssrcs.update(&ssrc, &fresh);
        } else if (!bucket_admits(call, now, cfg->rebind_interval_ns, cfg->rebind_burst_ns)) {
            return STAT_DROP_REBIND_CALL_RATE;
        }
    }
    if (cfg->cpu_interval_ns) {
        struct admit_bucket *g = admit_budget.lookup(&zero);
        if (g && !bucket_admits(g, now, cfg->cpu_interval_ns, cfg->cpu_burst_ns))
            return stun ? STAT_DROP_STUN_BUDGET : STAT_DROP_REBIND_BUDGET;
    }
    return stat;
}

/* A TCP SYN without ACK (parse_frame's PARSE_TCP_SYN). To an ICE-TCP
 * listener (tcp_listeners), its source prefix's bucket (syn_sources; the
 * prefix is admit_cfg's, as for every per-source limit) decides before the
 * kernel answers it and relayd accepts: a connection flood from one /64
 * costs a drop here, not an accept in Python. relayd's own per-source
 * accept rate stays behind it. A trusted proxy (syn_trusted) is spared:
 * its connections are many clients', each counted by relayd once its PROXY
 * header names them. Any other SYN is the kernel's. */
static __always_inline int syn_admit(struct pkt *p)
{
    __be32 saddr[4], daddr[4];
    pkt_addrs(p, saddr, daddr);
    struct vip_key vk = {};
    vk.family = p->family;
    vk.port = p->tcp->dest;
    copy_addr(vk.addr, daddr);
    struct syn_limit *lim = tcp_listeners.lookup(&vk);
    if (!lim)
        return STAT_PASS_NOT_RELAY;
    __u32 zero = 0;
    struct admit_config *cfg = admit_cfg.lookup(&zero);
    if (!lim->interval_ns || !cfg)
        return STAT_PASS_TCP_SYN;
    struct source_key k;
    source_of(cfg, p->family, saddr[0], saddr[1], &k);
    __u64 now = bpf_ktime_get_ns();
    struct admit_bucket *b = syn_sources.lookup(&k);
    if (!b) {
        struct admit_bucket fresh = { .tat_ns = now + lim->interval_ns };
        syn_sources.update(&k, &fresh);
    } else if (!bucket_admits(b, now, lim->interval_ns, lim->burst_ns)) {
        struct proxy_prefix pk = { .prefixlen = 128 };
        if (p->family == SR_AF_INET) {
            pk.addr[2] = bpf_htonl(0xffff);
            pk.addr[3] = saddr[0];
        } else {
            copy_addr(pk.addr, saddr);
        }
        if (!syn_trusted.lookup(&pk))
            return STAT_DROP_TCP_SYN_RATE;
    }
    return STAT_PASS_TCP_SYN;
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

/* The counting word of a pool address: the first address's plus the
 * flow's index (the config keeps it from carrying). */
static __always_inline __be32 pool_word(__be32 first, __u16 idx)
{
    return bpf_htonl(bpf_ntohl(first) + idx);
}

/* A flow source's address: the pool's first address plus the flow's index
 * in its last 32-bit word (the only one, for IPv4). */
static __always_inline void pool_addr(const struct relay_config *cfg, __u8 family, __u16 idx, __be32 *out)
{
    copy_addr(out, cfg->internal_addr);
    if (family == SR_AF_INET)
        out[0] = pool_word(out[0], idx);
    else
        out[3] = pool_word(out[3], idx);
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

/* The flow of a client tuple: IPv4 in flows4 by its 12-byte key, IPv6 in
 * flows6. The verifier inlines a lookup only where its call instruction
 * always sees one map; left alone, the compiler sinks both lookups into one
 * call on either map, and every packet pays the generic helper and an
 * indirect call. The empty asm after the IPv4 one keeps them apart
 * (tests/bpf/test_xdp_fixtures.py holds the loaded program to that). */
static __always_inline struct flow_info *find_flow(struct pkt *p, const __be32 *saddr, const __be32 *daddr)
{
    if (p->ip4) {
        struct flow_key4 k4;
        k4.client_addr = p->ip4->saddr;
        k4.relay_addr = p->ip4->daddr;
        k4.client_port = p->udp->source;
        k4.relay_port = p->udp->dest;
        struct flow_info *f = flows4.lookup(&k4);
        asm volatile("" : "+r"(f));
        return f;
    }
    struct flow_key key = {};
    client_key(p, saddr, daddr, &key);
    return flows6.lookup(&key);
}

/* Client → VIP from a tuple the flows map does not hold. */
static __always_inline int unknown_client(struct pkt *p, __u32 *ssrc)
{
    if (p->class == CLASS_STUN)
        return stun_admit(p);
    if (p->class == CLASS_RTP) {
        /* Media from a new tuple carrying a known flow's SSRC: perhaps
         * that client behind a NAT that rebound. The slow path has the
         * owner authenticate it before anything changes. */
        *ssrc = rtp_ssrc(p);
        if (*ssrc && ssrcs.lookup(ssrc))
            return STAT_PASS_REBIND;
    }
    return STAT_DROP_UNKNOWN_NOT_STUN;
}

/* The first RTP SSRC of a flow, indexed once for rebinding (ssrcs). Before
 * the rewrite: the index names the client tuple the packet came from. */
static __always_inline void learn_ssrc(struct pkt *p, struct flow_info *flow, const __be32 *saddr,
                                       const __be32 *daddr)
{
    if (p->class != CLASS_RTP || flow->ssrc)
        return;
    __u32 ssrc = rtp_ssrc(p);
    if (ssrc) {
        struct flow_key key = {};
        client_key(p, saddr, daddr, &key);
        flow->ssrc = ssrc;
        ssrcs.update(&ssrc, &key);
    }
}

/* One RTP packet in its direction's media accounting (struct rtp_stats):
 * RTCP (RFC 5761 payload types 72..95 after the marker bit, i.e. packet
 * types 200..223) and packets of another SSRC are left out. Plain stores,
 * as the counters: a flow's packets arrive on one CPU. */
static __always_inline void rtp_account(struct pkt *p, struct rtp_stats *s, __u64 now)
{
    if (p->class != CLASS_RTP)
        return;
    __u8 *pl = p->payload;
    if ((void *)(pl + 12) > p->data_end)
        return;
    if (pl[1] >= 192 && pl[1] <= 223)
        return;
    __u32 ssrc, ts_be;
    __builtin_memcpy(&ssrc, pl + 8, sizeof(ssrc));
    __builtin_memcpy(&ts_be, pl + 4, sizeof(ts_be));
    __u32 seq = ((__u32)pl[2] << 8) | pl[3];
    /* now in 48 kHz ticks: (ns >> 10) * 48000 * 1024 / 1e9, as a multiply and a shift. */
    __u32 transit = (__u32)(((now >> 10) * 206158) >> 22) - bpf_ntohl(ts_be);
    if (s->ssrc != ssrc) {
        if (s->ssrc)
            return;
        s->ssrc = ssrc;
        s->base_seq = seq;
        s->max_seq = seq;
        s->received = 1;
        s->transit = transit;
        return;
    }
    __u32 max = s->max_seq;
    __s16 ahead = (__s16)(seq - (max & 0xffff));
    if (ahead > 0)
        s->max_seq = max + ahead;  /* carries into the wrap count */
    else if (ahead < 0)
        s->reordered += 1;
    s->received += 1;
    __s32 d = (__s32)(transit - s->transit);
    s->transit = transit;
    if (d < 0)
        d = -d;
    s->jitter += d - ((s->jitter + 8) >> 4);
}

/* A forwarded client packet's counts in its flow. */
static __always_inline int client_forwarded(struct pkt *p, struct flow_info *flow, __u64 now)
{
    /* Plain adds: a flow's packets arrive on one CPU (RSS hashes its tuple);
     * a rare race loses a count, never a packet. */
    rtp_account(p, &flow->rtp, now);
    flow->packets += 1;
    flow->bytes += p->len;
    flow->last_seen_ns = now;
    return STAT_FWD_IN_STUN + p->class;
}

/* The owner endpoint of a flow's call, read as a seqlock's reader: the
 * slot's epoch, a barrier, the owners entry, a barrier, the epoch again.
 * Userspace writes the entry, then bumps the epoch: an epoch that did not
 * move names the entry read, on weakly ordered CPUs too. Tried twice; a
 * slot changing all the while gives STAT_PASS_OWNER_RACE (the slow path
 * forwards that packet). Returns 0 with the endpoint and its epoch, or the
 * stat_id. */
static __always_inline int owner_of_flow(__u32 *ep, __u32 slot, __u32 conn_id, __u8 family,
                                         __be32 *dst, __be16 *dport, __u32 *epoch)
{
#pragma unroll
    for (int i = 0; i < 2; i++) {
        __u32 before = *(volatile __u32 *)ep;
        full_barrier();
        struct owner_info *owner = call_owner(slot, conn_id);
        if (!owner)
            return STAT_DROP_NO_OWNER;
        if (owner_endpoint(owner, family, dst, dport) < 0)
            return STAT_DROP_NO_OWNER;
        full_barrier();
        if (*(volatile __u32 *)ep == before) {
            *epoch = before;
            return 0;
        }
    }
    return STAT_PASS_OWNER_RACE;
}

/* Client → VIP on a known flow: forward to the call's owner. While the
 * flow's route cache stands (fresh, and made under the slot's current
 * epoch), an IPv4 packet takes the owner, route and checksum changes from
 * it and never reads the owners entry; else the entry is read and checked
 * (owner_of_flow: still this call's, an address in the family) and the
 * cache made again, under the epoch the entry was read at. */
static __always_inline int from_client(struct xdp_md *ctx, struct pkt *p, __u32 *egress,
                                       const __be32 *saddr, const __be32 *daddr, struct flow_info *flow)
{
    if (p->class == CLASS_OTHER)
        return STAT_DROP_BAD_CLASS;
    if (ttl_zero(p))
        return STAT_DROP_TTL_ZERO;
    __u32 slot = flow->slot;
    __u32 *ep = epochs.lookup(&slot);
    if (!ep)
        return STAT_DROP_NO_OWNER;
    __u32 epoch = *ep;
    __u64 now = coarse_now();
    struct nexthop *nh = &flow->nh;
    __u32 idx = p->family == SR_AF_INET ? 0 : 1;
    struct relay_config *cfg = relay_cfg.lookup(&idx);
    if (!cfg || !cfg->addr_count)
        return STAT_DROP_NO_INTERNAL_ADDR;
    if (p->ip4 && nh->until_ns > now && nh->epoch == epoch && nh->dport) {
        __be32 src = pool_word(cfg->internal_addr[0], flow->flow_addr);
        learn_ssrc(p, flow, saddr, daddr);
        rewrite_ip4(p->ip4, nh, src, nh->dst4);
        rewrite_udp_eth(p, nh, flow->flow_port, nh->dport);
        *egress = nh->ifindex;
        return client_forwarded(p, flow, now);
    }
    __be32 dst[4];
    __be16 dport;
    int rc = owner_of_flow(ep, slot, flow->conn_id, p->family, dst, &dport, &epoch);
    if (rc)
        return rc;
    __be32 src[4];
    pool_addr(cfg, p->family, flow->flow_addr, src);
    rc = cached_route(ctx, p, nh, epoch, now, src, dst, flow->flow_port, dport);
    if (rc)
        return rc;
    learn_ssrc(p, flow, saddr, daddr);
    rewrite(p, nh, src, dst, flow->flow_port, dport);
    *egress = nh->ifindex;
    return client_forwarded(p, flow, now);
}

/* Owner → flow port: forward back to the client from the VIP. */
static __always_inline int from_owner(struct xdp_md *ctx, struct pkt *p, __u32 *egress,
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
    struct owner_info *owner = call_owner(rev->slot, rev->conn_id);
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
    if (ttl_zero(p))
        return STAT_DROP_TTL_ZERO;

    __u64 now = coarse_now();
    int rc = cached_route(ctx, p, &rev->nh, 0, now, rev->client.relay_addr, rev->client.client_addr,
                          rev->client.relay_port, rev->client.client_port);
    if (rc)
        return rc;
    rewrite(p, &rev->nh, rev->client.relay_addr, rev->client.client_addr,
            rev->client.relay_port, rev->client.client_port);
    *egress = rev->nh.ifindex;
    rtp_account(p, &rev->rtp, now);
    rev->packets += 1;
    rev->bytes += p->len;
    rev->last_seen_ns = now;
    return STAT_FWD_OUT_STUN + p->class;
}

/* A packet for the relay (to a VIP, or to a flow source) that it cannot
 * take: its refusal, else 0. The IPv6 UDP checksum is mandatory (RFC 8200
 * 8.1) for the relay's traffic; other UDP over IPv6 (VXLAN, GENEVE: RFC
 * 6935) may carry none and is not the relay's to judge. */
static __always_inline int refused(struct pkt *p)
{
    if (p->refuse)
        return p->refuse;
    if (p->ip6 && !p->udp->check)
        return STAT_DROP_MALFORMED;
    return 0;
}

int xdp_relay(struct xdp_md *ctx)
{
    struct pkt p = {};
    int stat = parse_frame(ctx, &p);
    if (stat != PARSE_OK) {
        if (stat == PARSE_TCP_SYN)
            stat = syn_admit(&p);
        return account(stat, p.len, verdict_of(stat));
    }

    __be32 saddr[4], daddr[4];
    pkt_addrs(&p, saddr, daddr);

    __u32 egress = 0;
    __u32 ifindex = ctx->ingress_ifindex;
    __u32 *role = if_roles.lookup(&ifindex);  /* NULL beyond MAX_IFINDEX: unchecked */
    __u32 side = role ? *role : 0;
    struct flow_info *flow = NULL;
    /* The hit path first: a flow's key holds the VIP it was installed for,
     * so on a public interface a known tuple needs no VIP lookup. Clients
     * never send on an internal one: no lookup there. */
    if (side != ROLE_INTERNAL)
        flow = find_flow(&p, saddr, daddr);
    int to_vip = flow && side == ROLE_PUBLIC;
    if (!to_vip) {
        struct vip_key vk = {};
        vk.family = p.family;
        vk.port = p.udp->dest;
        copy_addr(vk.addr, daddr);
        to_vip = vips.lookup(&vk) != NULL;
    }
    if (to_vip) {
        if (side && side != ROLE_PUBLIC)
            return account(STAT_DROP_WRONG_SIDE, p.len, XDP_DROP);
        stat = refused(&p);
        if (stat)
            return account(stat, p.len, XDP_DROP);
        __u32 ssrc = 0;
        stat = flow ? from_client(ctx, &p, &egress, saddr, daddr, flow) : unknown_client(&p, &ssrc);
        if (stat == STAT_PASS_STUN_UNKNOWN || stat == STAT_PASS_REBIND)
            stat = admit(&p, saddr[0], saddr[1], stat, ssrc);
    } else {
        __u32 idx = p.family == SR_AF_INET ? 0 : 1;
        struct relay_config *cfg = relay_cfg.lookup(&idx);
        __u16 dport = bpf_ntohs(p.udp->dest);
        if (!cfg || dport < cfg->flow_port_min || dport > cfg->flow_port_max)
            return account(STAT_PASS_NOT_RELAY, p.len, XDP_PASS);
        int flow_addr = pool_index(cfg, p.family, daddr);
        if (flow_addr < 0)
            return account(STAT_PASS_NOT_RELAY, p.len, XDP_PASS);
        if (side && side != ROLE_INTERNAL)
            return account(STAT_DROP_WRONG_SIDE, p.len, XDP_DROP);
        stat = refused(&p);
        if (stat)
            return account(stat, p.len, XDP_DROP);
        stat = from_owner(ctx, &p, &egress, saddr, (__u16)flow_addr);
    }
    if (stat >= STAT_FWD_IN_STUN)
        return account(stat, p.len, emit(ctx, egress));
    return account(stat, p.len, verdict_of(stat));
}
