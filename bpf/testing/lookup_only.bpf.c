/* Floor of tests/bench/bench_xdp.py's random-flow rows: the relay's own
 * flows4 lookup of the frame's tuple (its pinned map, the same entries) and
 * a read of the entry, nothing else. What this costs for a random flow at
 * 1M entries against 1k is what any relay keeping a hash entry per flow
 * pays for it; the relay's hit is read against it. Compiled with the
 * relay's -I, PIN_DIR and MAX_FLOWS, so bcc opens the pinned map. */
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include "consts.h"
#include "structs.h"

/* flows4: the relay's map, opened from its pin. */
BPF_TABLE_PINNED("lru_hash", struct flow_key4, struct flow_info, flows4, MAX_FLOWS, PIN_DIR "/flows4");

int xdp_lookup_only(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = (void *)(eth + 1);
    struct udphdr *udp = (void *)(ip + 1);
    if ((void *)(udp + 1) > data_end)
        return XDP_ABORTED;
    struct flow_key4 k;
    k.client_addr = ip->saddr;
    k.relay_addr = ip->daddr;
    k.client_port = udp->source;
    k.relay_port = udp->dest;
    struct flow_info *f = flows4.lookup(&k);
    return f && f->conn_id ? XDP_PASS : XDP_DROP;
}
