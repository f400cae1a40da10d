/* Frame generator of tests/bench/bench_peers.py, run with BPF_PROG_TEST_RUN
 * live frames on the relay namespace's public interface. Every run:
 *   1. writes the template's first TPL_LEN bytes over the frame (Ethernet,
 *      IPv4, UDP and the start of the payload): live frames recycle pages
 *      without re-initialising them, and the path under test may have
 *      rewritten the last frame in place (the relay's rewrite, NAT);
 *   2. writes STAMP_MAGIC and bpf_ktime_get_ns() (CLOCK_MONOTONIC) at the
 *      template's stamp offset, for the sink (sink.bpf.c) to read;
 *   3. counts the frame, and tail-calls the program in slot 0 of `next`
 *      (the relay, a bare redirect, a dropper), or, with the slot empty,
 *      returns XDP_PASS: the frame enters the kernel's stack on the public
 *      interface (netfilter, coturn, rtpengine, the Python slow path).
 * The template lives in a map: bcc cannot load read-only data. */
#include <uapi/linux/bpf.h>

#define TPL_LEN 72            /* bytes rewritten per run: headers + stamp */
#define STAMP_MAGIC 0x504d5453 /* "STMP" in memory, little-endian */

struct tpl {
    __u8 bytes[TPL_LEN];
    __u32 stamp_off;          /* frame offset of the magic; the time follows */
    __u32 pad;
};

BPF_ARRAY(tpl, struct tpl, 1);          /* the frame template, written by the benchmark */
BPF_PERCPU_ARRAY(gen_count, __u64, 1);  /* frames generated */
BPF_PROG_ARRAY(next, 1);                /* the path under test, if XDP */

int xdp_stamp(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    int zero = 0;
    struct tpl *t = tpl.lookup(&zero);
    if (!t)
        return XDP_ABORTED;
    if (data + TPL_LEN > data_end)
        return XDP_ABORTED;
    __builtin_memcpy(data, t->bytes, TPL_LEN);
    __u32 off = t->stamp_off;
    if (off > TPL_LEN - 12)
        return XDP_ABORTED;
    __u8 *p = data + off;
    if ((void *)(p + 12) > data_end)
        return XDP_ABORTED;
    __u32 magic = STAMP_MAGIC;
    __u64 now = bpf_ktime_get_ns();
    __builtin_memcpy(p, &magic, 4);
    __builtin_memcpy(p + 4, &now, 8);
    __u64 *n = gen_count.lookup(&zero);
    if (n)
        *n += 1;
    next.call(ctx, 0);
    return XDP_PASS;
}

/* Slot programs: the generator's own cost (every frame dropped at once). */
int xdp_drop_all(struct xdp_md *ctx)
{
    return XDP_DROP;
}
