/* STUN flood injector for tests/bench/bench_flood.py, run with
 * BPF_PROG_TEST_RUN live frames on the lab client's interface: every run
 * rewrites the template frame (Ethernet / IPv4 / UDP / STUN Binding request)
 * with a random source address in 198.18.0.0/15 (RFC 2544's benchmarking
 * range) and a random source port, and, with RANDOM_UFRAG, a random tail
 * of the ufrag in USERNAME (still of our ufrag's shape, so it passes the
 * shape check and dies on its MAC in the slow path), then sends it back out
 * of the interface it came from (XDP_TX) towards the relay.
 * UFRAG_OFF: offset of the ufrag in the frame (-D); IP_HLEN: the IPv4
 * header's length, options included (-D, default 20). Any UDP payload
 * serves (RTP too, with RANDOM_UFRAG=0). PACE_NS (-D, default 0: every
 * run sends): one frame per PACE_NS at most; the runs in between send
 * nothing (XDP_DROP), so the rate is even instead of bursts at full speed. */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>

#ifndef UFRAG_OFF
#error "compile with -DUFRAG_OFF=<offset of the ufrag in the frame>"
#endif
#ifndef RANDOM_UFRAG
#define RANDOM_UFRAG 1
#endif
#ifndef IP_HLEN
#define IP_HLEN 20
#endif
#ifndef PACE_NS
#define PACE_NS 0
#endif
#define RANDOM_CHARS 16   /* the ufrag's last 16 characters (its first ones carry the version) */

static __always_inline __u16 ip_checksum(struct iphdr *ip)
{
    __u32 sum = 0;
    __u16 *w = (__u16 *)ip;
#pragma unroll
    for (int i = 0; i < IP_HLEN / 2; i++)
        sum += w[i];
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return ~sum;
}

/* The base64 alphabet (the ice-chars), computed: bcc has no read-only data. */
static __always_inline __u8 b64_char(__u32 v)
{
    if (v < 26)
        return 'A' + v;
    if (v < 52)
        return 'a' + (v - 26);
    if (v < 62)
        return '0' + (v - 52);
    return v == 62 ? '+' : '/';
}

#if PACE_NS
/* [0]: when the next frame is due (ns); [1]: frames sent. */
BPF_ARRAY(pace, __u64, 2);
#endif

int xdp_flood(struct xdp_md *ctx)
{
#if PACE_NS
    int due_key = 0, sent_key = 1;
    __u64 *due = pace.lookup(&due_key);
    __u64 *sent = pace.lookup(&sent_key);
    if (!due || !sent)
        return XDP_ABORTED;
    __u64 now = bpf_ktime_get_ns();
    if (now < *due)
        return XDP_DROP;
    /* More than 1 ms behind (between two test runs): from now, no catching up in a burst. */
    *due = now - *due > 1000000 ? now + PACE_NS : *due + PACE_NS;
    *sent += 1;
#endif
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = (void *)(eth + 1);
    struct udphdr *udp = (void *)ip + IP_HLEN;
    if ((void *)(udp + 1) > data_end)
        return XDP_ABORTED;
    ip->saddr = bpf_htonl(0xC6120000 | (bpf_get_prandom_u32() & 0x1FFFF));
    ip->check = 0;
    ip->check = ip_checksum(ip);
    udp->source = bpf_htons(1024 + (bpf_get_prandom_u32() & 0x7FFF));
    udp->check = 0;  /* none (RFC 768): the payload changes too */
#if RANDOM_UFRAG
    __u8 *tail = (__u8 *)data + UFRAG_OFF + 24 - RANDOM_CHARS;
    if ((void *)(tail + RANDOM_CHARS) > data_end)
        return XDP_ABORTED;
#pragma unroll
    for (int i = 0; i < RANDOM_CHARS; i++)
        tail[i] = b64_char(bpf_get_prandom_u32() & 63);
#endif
    return XDP_TX;
}
