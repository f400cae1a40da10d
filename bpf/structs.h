/* Every struct that crosses the kernel/userspace boundary, with explicit
 * padding. manager/relay/kernel/structs.py mirrors them; tests/bpf/test_structs_layout.py holds
 * the two against bcc's type information. Addresses and ports are in network
 * byte order; an IPv4 address sits in addr[0], addr[1..3] zero. */
#ifndef SPLITRELAY_STRUCTS_H
#define SPLITRELAY_STRUCTS_H

#include <linux/types.h>

/* Client tuple as seen on the public side: key of the flows6 map, and the
 * family-neutral form every other map and userspace use (reverse_info,
 * ssrcs). */
struct flow_key {
    __u8 family;          /* SR_AF_INET or SR_AF_INET6 */
    __u8 pad0;
    __be16 client_port;
    __be16 relay_port;    /* the VIP port the client sends to */
    __u16 pad1;
    __be32 client_addr[4];
    __be32 relay_addr[4]; /* the VIP address the client sends to */
};

/* An IPv4 client tuple: key of the flows4 map. 12 bytes in the packet's own
 * order (saddr, daddr, then the UDP ports), so the hit path hashes and
 * compares three words instead of the ten of struct flow_key. */
struct flow_key4 {
    __be32 client_addr;
    __be32 relay_addr;    /* the VIP address the client sends to */
    __be16 client_port;
    __be16 relay_port;    /* the VIP port */
};

/* A route XDP looked up for one direction of a flow, with the checksum
 * changes of its rewrite, reused until until_ns (coarse clock) while the
 * call slot's epoch is the one it was made under, instead of a
 * bpf_fib_lookup and checksum arithmetic per packet. Towards an IPv4 owner
 * it also holds the owner's address and port, so the hit path does not read
 * the owners array while the slot's epoch stands. Zero: none. */
struct nexthop {
    __u64 until_ns;
    __u32 ifindex;        /* egress */
    __u32 epoch;          /* the call slot's epoch it was made under (client → owner) */
    __u8 dmac[6];         /* dmac then smac, as h_dest and h_source in the frame */
    __u8 smac[6];
    __u16 csum_l3;        /* folded change to the IPv4 header checksum */
    __u16 csum_l4;        /* folded change to the UDP checksum */
    __be32 dst4;          /* IPv4 owner address (client → owner); 0: not cached */
    __be16 dport;         /* its port */
    __u16 pad0;
};

/* Media accounting of one direction of a flow, for the RTP stream of its
 * first SSRC (RTCP and other SSRCs are not counted). Expected packets are
 * max_seq - base_seq + 1; lost = expected - received. Arrival times are
 * taken from the coarse clock (coarse_now) in 48 kHz ticks: the jitter is
 * RFC 3550's estimate (A.8, held as 16 J) against a 48 kHz media clock (Opus),
 * good to about a tick of the coarse clock. */
struct rtp_stats {
    __u32 ssrc;           /* the stream counted (as in the packet); 0: none yet */
    __u32 base_seq;       /* extended sequence of its first packet */
    __u32 max_seq;        /* extended highest sequence: wraps << 16 | seq */
    __u32 received;       /* RTP packets of the stream */
    __u32 reordered;      /* arrived behind the highest sequence */
    __u32 jitter;         /* 16 J, in 48 kHz ticks */
    __u32 transit;        /* last arrival - RTP timestamp, 48 kHz ticks */
    __u32 pad0;
};

/* One established flow: which call it belongs to and its counters. */
struct flow_info {
    __u32 conn_id;        /* connection id (owners map key) */
    __be16 flow_port;     /* relay-internal source port towards the owner */
    __u16 flow_addr;      /* relay-internal source address: index into the family's pool */
    __u64 packets;        /* client → owner, forwarded in XDP */
    __u64 bytes;
    __u64 last_seen_ns;   /* coarse clock (coarse_now) at the last packet client → owner */
    __u64 created_ns;     /* set by userspace at install */
    __u32 ssrc;           /* first RTP SSRC the client sent (as in the packet); 0: none yet */
    __u32 slot;           /* the call's owners entry (index), held by conn_id */
    struct nexthop nh;    /* towards the owner */
    struct rtp_stats rtp; /* client → owner media */
};

/* Current owner of a connection id: the connection-id map value, in the
 * slot userspace gave the call. Migration rewrites this one entry. A zero
 * port means "not reachable in that family". */
struct owner_info {
    __be32 addr4;
    __be16 port4;
    __be16 port6;
    __be32 addr6[4];
    __u32 generation;     /* bumped on every ownership change */
    __u32 conn_id;        /* the call holding this slot; 0: free. A flow or return
                           * entry follows the slot only while it names this call */
};

/* Return-path key: a transceiver (owner addr:port) sending to a flow source
 * (pool address flow_addr, port flow_port). */
struct reverse_key {
    __u8 family;
    __u8 pad0;
    __be16 owner_port;
    __be16 flow_port;
    __u16 flow_addr;      /* index into the family's pool of internal addresses */
    __be32 owner_addr[4];
};

/* Return-path value: where the packet goes and which call it belongs to. */
struct reverse_info {
    struct flow_key client; /* the client tuple to restore */
    __u32 conn_id;
    __u32 slot;             /* the call's owners entry (index), held by conn_id */
    __u64 packets;          /* owner → client, forwarded in XDP */
    __u64 bytes;
    __u64 last_seen_ns;     /* last packet from the owner */
    struct nexthop nh;      /* towards the client */
    struct rtp_stats rtp;   /* owner → client media */
};

/* A public relay address:port served by the fast path: key of the vips map. */
struct vip_key {
    __u8 family;
    __u8 pad0;
    __be16 port;
    __be32 addr[4];
};

/* Per-family relay-internal addressing: value of the config map (index 0
 * for IPv4, 1 for IPv6). A flow's source towards its owner is one of
 * addr_count consecutive addresses from internal_addr (the last 32-bit word
 * counts up) and a port in [flow_port_min, flow_port_max]. */
struct relay_config {
    __be32 internal_addr[4]; /* first address of the pool */
    __u16 flow_port_min;   /* host byte order */
    __u16 flow_port_max;   /* host byte order */
    __u32 addr_count;      /* addresses in the pool; 0: family not served */
};

/* admit_cfg: how much set-up traffic may reach the slow path (one entry). A
 * bucket admits one packet per interval with up to burst of credit (GCRA);
 * interval 0 means unlimited. The global budget is split among the CPUs.
 * A source is its address under the configured prefix (limits.source_prefix_v4
 * and _v6; userspace writes the masks). */
struct admit_config {
    __u64 source_interval_ns;   /* per source prefix */
    __u64 source_burst_ns;
    __u64 cpu_interval_ns;      /* per CPU: global budget / possible CPUs */
    __u64 cpu_burst_ns;
    __u64 call_interval_ns;     /* per live call (its server ufrag) */
    __u64 call_burst_ns;
    __u64 rebind_interval_ns;   /* per SSRC, for media from unknown tuples (rebind candidates) */
    __u64 rebind_burst_ns;
    __be32 source_mask4;        /* an IPv4 source's prefix, as a mask */
    __be32 source_mask6[2];     /* an IPv6 source's prefix (at most /64), as a mask of its first 64 bits */
    __u32 pad0;
};

/* live_ufrags key: a live call's server ufrag, as it starts USERNAME. */
struct ufrag_key {
    __u8 ufrag[UFRAG_LEN];
};

/* admit_sources / syn_sources key: a source address under its prefix (IPv6: of its first 64 bits). */
struct source_key {
    __u32 family;
    __be32 addr[2];
};

/* tcp_listeners value: the SYN rate of one source (its prefix under
 * admit_cfg's masks) at one ICE-TCP listener, as a GCRA interval and burst
 * tolerance; interval 0: unlimited. Keyed by the listener's address:port
 * (struct vip_key, the TCP port). */
struct syn_limit {
    __u64 interval_ns;
    __u64 burst_ns;
};

/* syn_trusted key: a prefix of trusted proxies' addresses, as an LPM trie
 * takes it (prefixlen first, in bits of addr); IPv4 as ::ffff:a.b.c.d, so
 * one trie holds both families. */
struct proxy_prefix {
    __u32 prefixlen;
    __be32 addr[4];
};

/* One admission bucket: the theoretical arrival time of the next packet. */
struct admit_bucket {
    __u64 tat_ns;
};

/* clock: one CPU's copy of the coarse clock, taken at the jiffy it names. */
struct clock_copy {
    __u64 jiffies;
    __u64 ns;
};

/* One per-CPU counter slot (index: enum stat_id). */
struct stat_value {
    __u64 packets;
    __u64 bytes;
};

#endif
