/* splitrelay sk_lookup program: whatever the kernel stack receives for a
 * flow source (an address of the internal pool and a port of the flow range)
 * goes to relayd's one UDP socket of that family, whichever the port. The
 * slow path then needs no socket per flow, and concurrent flows are bounded
 * by the pool and the maps, not by sockets.
 *
 * The pool is compiled in (-D, manager/relay/kernel/flow_sockets.py): it
 * changes only with relayd's config, and this program lives as long as
 * relayd's link to it. Addresses are compared in host byte order except the
 * upper three IPv6 words, which are compared as the context holds them. */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>

#ifndef FLOW_PORT_MIN
#define FLOW_PORT_MIN 20000
#endif
#ifndef FLOW_PORT_MAX
#define FLOW_PORT_MAX 59999
#endif
#ifndef POOL4_FIRST
#define POOL4_FIRST 0        /* first IPv4 pool address, host byte order */
#endif
#ifndef POOL4_COUNT
#define POOL4_COUNT 0        /* 0: IPv4 not served */
#endif
#ifndef POOL6_W0
#define POOL6_W0 0           /* upper three words of the IPv6 pool, as in the context */
#define POOL6_W1 0
#define POOL6_W2 0
#endif
#ifndef POOL6_FIRST
#define POOL6_FIRST 0        /* last word of the first IPv6 pool address, host byte order */
#endif
#ifndef POOL6_COUNT
#define POOL6_COUNT 0
#endif

/* flow_sockets: relayd's shared socket per family (0: IPv4, 1: IPv6). */
BPF_TABLE("sockmap", __u32, __u32, flow_sockets, 2);

int flow_lookup(struct bpf_sk_lookup *ctx)
{
    if (ctx->protocol != IPPROTO_UDP)
        return SK_PASS;
    if (ctx->local_port < FLOW_PORT_MIN || ctx->local_port > FLOW_PORT_MAX)
        return SK_PASS;
    __u32 key;
    if (ctx->family == AF_INET) {
        if (bpf_ntohl(ctx->local_ip4) - (__u32)POOL4_FIRST >= (__u32)POOL4_COUNT)
            return SK_PASS;
        key = 0;
    } else if (ctx->family == AF_INET6) {
        if (ctx->local_ip6[0] != (__u32)POOL6_W0 || ctx->local_ip6[1] != (__u32)POOL6_W1 ||
            ctx->local_ip6[2] != (__u32)POOL6_W2)
            return SK_PASS;
        if (bpf_ntohl(ctx->local_ip6[3]) - (__u32)POOL6_FIRST >= (__u32)POOL6_COUNT)
            return SK_PASS;
        key = 1;
    } else {
        return SK_PASS;
    }
    struct bpf_sock *sk = (struct bpf_sock *)flow_sockets.lookup(&key);
    if (!sk)
        return SK_PASS;  /* relayd's socket is not there yet: the stack decides */
    bpf_sk_assign(ctx, sk, 0);
    bpf_sk_release(sk);
    return SK_PASS;
}
