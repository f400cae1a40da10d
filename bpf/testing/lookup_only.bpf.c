/* Floors of tests/bench/bench_xdp.py, on the relay's own flows4 map (its
 * pin, the same entries): what any relay keeping a hash entry per flow pays
 * for the lookup of the frame's tuple, and nothing else.
 *   xdp_lookup_only      the lookup and a read of the entry (random-flow rows:
 *                        its cost at 1M entries against 1k);
 *   xdp_lookup_redirect  the lookup, then the redirect (live frames).
 * Compiled with the relay's -I, PIN_DIR and MAX_FLOWS, so bcc opens the
 * pinned map. */
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include "consts.h"
#include "structs.h"

/* flows4: the relay's map, opened from its pin. */
BPF_TABLE_PINNED("lru_hash", struct flow_key4, struct flow_info, flows4, MAX_FLOWS, PIN_DIR "/flows4");

/* The frame's flow, or NULL (no bounds: not a frame of ours). */
static __always_inline struct flow_info *frame_flow(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = (void *)(eth + 1);
    struct udphdr *udp = (void *)(ip + 1);
    if ((void *)(udp + 1) > data_end)
        return NULL;
    struct flow_key4 k;
    k.client_addr = ip->saddr;
    k.relay_addr = ip->daddr;
    k.client_port = udp->source;
    k.relay_port = udp->dest;
    return flows4.lookup(&k);
}

int xdp_lookup_only(struct xdp_md *ctx)
{
    struct flow_info *f = frame_flow(ctx);
    return f && f->conn_id ? XDP_PASS : XDP_DROP;
}

/* The least a forwarder by flow entry does: the lookup, then a redirect to
 * the interface the entry's route cache names (live-frames floor). */
int xdp_lookup_redirect(struct xdp_md *ctx)
{
    struct flow_info *f = frame_flow(ctx);
    if (!f || !f->nh.ifindex)
        return XDP_ABORTED;
    return bpf_redirect(f->nh.ifindex, 0);
}
