/* Benchmark ceilings for tests/bench/bench_xdp.py, compared against the
 * relay's hit path:
 *   xdp_redirect_only  the least an XDP forwarder can do: redirect every frame
 *                      to one interface without reading it;
 *   xdp_fib_redirect   the kernel route lookup the relay makes per forwarded
 *                      packet (bpf_fib_lookup towards the owner), then redirect.
 * IFINDEX (egress), FIB_SRC and FIB_DST (__be32 as a number) come with -D. */
#ifndef IFINDEX
#error "compile with -DIFINDEX=<egress ifindex>"
#endif

int xdp_redirect_only(struct xdp_md *ctx)
{
    return bpf_redirect(IFINDEX, 0);
}

#if defined(FIB_SRC) && defined(FIB_DST)
int xdp_fib_redirect(struct xdp_md *ctx)
{
    struct bpf_fib_lookup fib = {};
    fib.family = 2;         /* AF_INET */
    fib.l4_protocol = 17;   /* UDP */
    fib.tot_len = ctx->data_end - ctx->data - 14;
    fib.ifindex = ctx->ingress_ifindex;
    fib.ipv4_src = FIB_SRC;
    fib.ipv4_dst = FIB_DST;
    if (bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
        return XDP_ABORTED;
    return bpf_redirect(fib.ifindex, 0);
}
#endif
