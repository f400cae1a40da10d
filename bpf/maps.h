/* Every map of the relay program, pinned under PIN_DIR so the manager can
 * restart, and a new program version can be attached, without losing state.
 * bcc's BPF_TABLE_PINNED opens the pinned map when it exists, else creates
 * and pins it. */
#ifndef SPLITRELAY_MAPS_H
#define SPLITRELAY_MAPS_H

#include "consts.h"
#include "structs.h"

/* flows4 / flows6: client tuple → call and flow port, one map per family so
 * an IPv4 packet's lookup hashes a 12-byte key; LRU so a full table never
 * blocks new calls (an evicted flow is rebuilt from its next consent check). */
BPF_TABLE_PINNED("lru_hash", struct flow_key4, struct flow_info, flows4, MAX_FLOWS, PIN_DIR "/flows4");
BPF_TABLE_PINNED("lru_hash", struct flow_key, struct flow_info, flows6, MAX_FLOWS6, PIN_DIR "/flows6");

/* owners: call slot → its connection id and current owner transceiver;
 * migration = one update. An array (a lookup the verifier inlines, one
 * memory access) rather than a hash by connection id: userspace gives each
 * call a slot and flows carry it. */
BPF_TABLE_PINNED("array", __u32, struct owner_info, owners, MAX_OWNERS, PIN_DIR "/owners");

/* epochs: call slot → its epoch, bumped by userspace after every change of
 * the slot's owners entry (another owner, another call, freed). A flow's
 * route cache names the epoch it was made under: while it stands, the
 * cached owner is the slot's, and a cold flow's packet reads 4 bytes here
 * instead of a 32-byte owners entry. */
BPF_TABLE_PINNED("array", __u32, __u32, epochs, MAX_OWNERS, PIN_DIR "/epochs");

/* reverse: (owner addr:port, flow port) → client tuple; forwarded only when
 * the sender is still the owner of that connection id. */
BPF_TABLE_PINNED("lru_hash", struct reverse_key, struct reverse_info, reverse, MAX_REVERSE, PIN_DIR "/reverse");

/* ssrcs: RTP SSRC (as in the packet) → the client tuple that sent it first,
 * so media from a tuple the flows map does not know (a NAT rebinding) can be
 * matched to its call's flow. Written once per flow by XDP. */
BPF_TABLE_PINNED("lru_hash", __u32, struct flow_key, ssrcs, MAX_FLOWS, PIN_DIR "/ssrcs");

/* vips: public relay address:port pairs whose traffic this program handles. */
BPF_TABLE_PINNED("hash", struct vip_key, __u32, vips, MAX_VIPS, PIN_DIR "/vips");

/* relay_cfg: per-family internal address and flow-port range (0: v4, 1: v6). */
BPF_TABLE_PINNED("array", __u32, struct relay_config, relay_cfg, 2, PIN_DIR "/relay_cfg");

/* if_roles: ingress ifindex → ROLE_PUBLIC or ROLE_INTERNAL. Clients' packets
 * to a VIP are taken only on public interfaces, owners' packets to a flow
 * port only on internal ones (a spoofed internal source on the public side
 * is not an owner). */
BPF_TABLE_PINNED("array", __u32, __u32, if_roles, MAX_IFINDEX, PIN_DIR "/if_roles");

/* admit_cfg: rates of slow-path admission for unknown client tuples. */
BPF_TABLE_PINNED("array", __u32, struct admit_config, admit_cfg, 1, PIN_DIR "/admit_cfg");

/* admit_sources: per-source admission buckets; LRU, so a flood of sources
 * forgets the oldest instead of failing. */
BPF_TABLE_PINNED("lru_hash", struct source_key, struct admit_bucket, admit_sources, MAX_SOURCES,
                 PIN_DIR "/admit_sources");

/* live_ufrags: the server ufrag of every call that can take checks, with
 * the call's admission bucket. Userspace adds a call's when it becomes
 * active and removes it when it ends: STUN for any other ufrag, however
 * well-formed, never reaches the slow path, and one call's replayed ufrag
 * spends only that call's bucket. LRU: stale entries of calls that ended
 * while relayd was away give way. */
BPF_TABLE_PINNED("lru_hash", struct ufrag_key, struct admit_bucket, live_ufrags, MAX_OWNERS,
                 PIN_DIR "/live_ufrags");

/* rebind_ssrcs: per SSRC, the bucket of media carrying it from unknown
 * tuples (rebind candidates): a flood spoofing one live call's SSRC from
 * random sources passes at most this bucket to the slow path. LRU. */
BPF_TABLE_PINNED("lru_hash", __u32, struct admit_bucket, rebind_ssrcs, MAX_REBIND_SSRCS,
                 PIN_DIR "/rebind_ssrcs");

/* tcp_listeners: relayd's ICE-TCP listeners (address:port; a VIP address
 * and tcp.port) → the SYN rate of one source there. A SYN to any other
 * address or port is the kernel's, unlimited. */
BPF_TABLE_PINNED("hash", struct vip_key, struct syn_limit, tcp_listeners, MAX_VIPS, PIN_DIR "/tcp_listeners");

/* syn_sources: per source prefix, the bucket of its SYNs to the ICE-TCP
 * listeners: a connection flood from one /64 is dropped here instead of
 * costing relayd an accept each. LRU: a flood of prefixes forgets the
 * oldest (a forgotten prefix starts with a full burst again). */
BPF_TABLE_PINNED("lru_hash", struct source_key, struct admit_bucket, syn_sources, MAX_SYN_SOURCES,
                 PIN_DIR "/syn_sources");

/* syn_trusted: tcp.trusted_proxies, whose connections carry many clients
 * (a PROXY protocol header names each): their SYNs beyond the bucket still
 * pass. Looked up only for a SYN over its bucket. */
BPF_TABLE_PINNED("lpm_trie", struct proxy_prefix, __u32, syn_trusted, MAX_TRUSTED_PROXIES, PIN_DIR "/syn_trusted",
                 BPF_F_NO_PREALLOC);

/* admit_budget: the global budget's share of each CPU (no cross-CPU atomics). */
BPF_TABLE_PINNED("percpu_array", __u32, struct admit_bucket, admit_budget, 1, PIN_DIR "/admit_budget");

/* layout: [0] a hash of every map's layout, [1] a digest of the program's
 * source and build flags, written by userspace at load. A relayd adopts
 * pinned state of its own layout and program; it takes over from another
 * known layout (manager/relay/kernel/upgrade.py) and refuses an unknown one. */
BPF_TABLE_PINNED("array", __u32, __u64, layout, 2, PIN_DIR "/layout");

/* clock: per CPU, the coarse clock as of the last jiffy seen (coarse_now);
 * not pinned: a cache any program version rebuilds within a tick. */
BPF_PERCPU_ARRAY(clock, struct clock_copy, 1);

/* stats: per-CPU packets/bytes by verdict and reason (enum stat_id). */
BPF_TABLE_PINNED("percpu_array", __u32, struct stat_value, stats, STAT_MAX, PIN_DIR "/stats");

#endif
