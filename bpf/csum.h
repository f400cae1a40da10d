/* One's complement checksum helpers for incremental updates (RFC 1624). The
 * sum is byte-order independent, so fields are added as they sit in the
 * packet (network order). */
#ifndef SPLITRELAY_CSUM_H
#define SPLITRELAY_CSUM_H

#include <linux/types.h>

/* Fold a 64-bit accumulator to 16 bits. */
static __always_inline __u16 csum_fold64(__u64 acc)
{
    acc = (acc & 0xffffffff) + (acc >> 32);
    acc = (acc & 0xffffffff) + (acc >> 32);
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    return (__u16)acc;
}

/* Account for a 32-bit word changing from old to new: add ~old and new. */
static __always_inline __u64 csum_diff32(__u64 acc, __u32 old, __u32 new)
{
    __u32 nold = ~old;
    acc += (nold & 0xffff) + (nold >> 16);
    acc += (new & 0xffff) + (new >> 16);
    return acc;
}

/* Account for a 16-bit word changing from old to new. */
static __always_inline __u64 csum_diff16(__u64 acc, __u16 old, __u16 new)
{
    acc += (__u16)~old;
    acc += new;
    return acc;
}

/* Apply a folded difference to a stored checksum: ~(~HC + diff) (RFC 1624
 * eqn. 3). Two 16-bit values sum below 2^17, so two folds are enough. */
static __always_inline __u16 csum_apply(__u16 check, __u16 diff)
{
    __u32 sum = (__u32)(__u16)~check + diff;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return ~sum;
}

#endif
