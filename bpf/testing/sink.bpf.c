/* Far-end sink of tests/bench/bench_peers.py, attached to the veth peer of
 * the relay namespace's internal interface: counts every frame, and for
 * IPv4/UDP frames carrying the generator's stamp (stamp.bpf.c: STAMP_MAGIC
 * then bpf_ktime_get_ns() at UDP payload offset SINK_OFF) adds now - stamp
 * to a latency histogram. Drops everything.
 * Histogram buckets: exact below 64 ns, then 64 per power of two (1.6%
 * resolution): index = (e - 5) * 64 + ((v >> (e - 6)) & 63), e = log2(v). */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>

#ifndef SINK_OFF
#define SINK_OFF 12           /* after the RTP header */
#endif
#define STAMP_MAGIC 0x504d5453
#define NBUCKETS 2048

struct hist {
    __u64 b[NBUCKETS];
};

struct sink_stats {
    __u64 frames;             /* everything that arrived */
    __u64 stamped;            /* frames carrying a stamp */
    __u64 late_sum_ns;        /* sum of their latencies */
};

BPF_PERCPU_ARRAY(sink_stats, struct sink_stats, 1);  /* counters */
BPF_PERCPU_ARRAY(sink_hist, struct hist, 1);         /* latency histogram of stamped frames */

static __always_inline __u32 bucket(__u64 v)
{
    if (v < 64)
        return v;
    if (v >= (1ULL << 36))
        return NBUCKETS - 1;
    __u32 e = 0;
    __u64 x = v;
    if (x >> 32) { e += 32; x >>= 32; }
    if (x >> 16) { e += 16; x >>= 16; }
    if (x >> 8) { e += 8; x >>= 8; }
    if (x >> 4) { e += 4; x >>= 4; }
    if (x >> 2) { e += 2; x >>= 2; }
    if (x >> 1) { e += 1; }
    return (e - 5) * 64 + ((v >> (e - 6)) & 63);
}

int xdp_sink(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    int zero = 0;
    __u64 now = bpf_ktime_get_ns();
    struct sink_stats *s = sink_stats.lookup(&zero);
    if (!s)
        return XDP_DROP;
    s->frames += 1;
    struct ethhdr *eth = data;
    struct iphdr *ip = (void *)(eth + 1);
    struct udphdr *udp = (void *)(ip + 1);
    if ((void *)(udp + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl != 5
        || ip->protocol != IPPROTO_UDP)
        return XDP_DROP;
    __u8 *p = (__u8 *)(udp + 1) + SINK_OFF;
    if ((void *)(p + 12) > data_end)
        return XDP_DROP;
    __u32 magic;
    __u64 stamp;
    __builtin_memcpy(&magic, p, 4);
    __builtin_memcpy(&stamp, p + 4, 8);
    if (magic != STAMP_MAGIC)
        return XDP_DROP;
    s->stamped += 1;
    __u64 late = now > stamp ? now - stamp : 0;
    s->late_sum_ns += late;
    struct hist *h = sink_hist.lookup(&zero);
    if (h)
        h->b[bucket(late) & (NBUCKETS - 1)] += 1;
    return XDP_DROP;
}
