/* Building blocks of the relay's hit path, one program each, for
 * tests/bench/bench_blocks.py: what one map lookup or clock read costs by
 * itself, next to a program that does nothing. Each program returns
 * XDP_PASS only when its block worked (the lookup found the entry the
 * benchmark put there, the clock read non-zero), XDP_DROP otherwise, so a
 * figure cannot come from a failing block. */

struct key40 { __u32 w[10]; };   /* the size of struct flow_key */
struct val96 { __u64 w[12]; };   /* a value the size of a flow entry's */
struct clock_copy { __u64 jiffies; __u64 ns; };

BPF_TABLE("lru_hash", struct key40, struct val96, lru40, 1048576); /* as flows: LRU, 40-byte key */
BPF_TABLE("hash", __u32, struct val96, hash4, 262144);             /* as owners was: hash by connection id */
BPF_TABLE("array", __u32, struct val96, array4, 262144);           /* as owners is: array by slot */
BPF_PERCPU_ARRAY(clock, struct clock_copy, 1);                     /* as relay.bpf.c's coarse_now */

int xdp_nothing(struct xdp_md *ctx) { return XDP_PASS; }

int xdp_lru40(struct xdp_md *ctx)
{
    struct key40 k = {};
    k.w[0] = 1;
    return lru40.lookup(&k) ? XDP_PASS : XDP_DROP;
}

int xdp_hash4(struct xdp_md *ctx)
{
    __u32 k = 1;
    return hash4.lookup(&k) ? XDP_PASS : XDP_DROP;
}

int xdp_array4(struct xdp_md *ctx)
{
    __u32 k = 1;
    struct val96 *v = array4.lookup(&k);
    return v && v->w[0] ? XDP_PASS : XDP_DROP;
}

int xdp_ktime_ns(struct xdp_md *ctx) { return bpf_ktime_get_ns() ? XDP_PASS : XDP_DROP; }

int xdp_coarse_ns(struct xdp_md *ctx) { return bpf_ktime_get_coarse_ns() ? XDP_PASS : XDP_DROP; }

int xdp_jiffies(struct xdp_md *ctx) { return bpf_jiffies64() ? XDP_PASS : XDP_DROP; }

int xdp_coarse_copy(struct xdp_md *ctx)
{
    __u32 zero = 0;
    __u64 j = bpf_jiffies64();
    struct clock_copy *c = clock.lookup(&zero);
    if (!c)
        return XDP_DROP;
    if (c->jiffies != j) {
        c->jiffies = j;
        c->ns = bpf_ktime_get_coarse_ns();
    }
    return c->ns ? XDP_PASS : XDP_DROP;
}
