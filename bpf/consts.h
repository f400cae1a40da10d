/* Constants shared by the XDP programs; sizes are overridable defaults (-D). */
#ifndef SPLITRELAY_CONSTS_H
#define SPLITRELAY_CONSTS_H

/* IPv4 client tuple → flow (one per call leg seen on the public address). */
#ifndef MAX_FLOWS
#define MAX_FLOWS 1048576
#endif
/* IPv6 client tuple → flow. */
#ifndef MAX_FLOWS6
#define MAX_FLOWS6 262144
#endif
/* (owner, flow port) → client tuple; one per flow and owner. */
#ifndef MAX_REVERSE
#define MAX_REVERSE 1048576
#endif
/* Connection id → owner transceiver. */
#ifndef MAX_OWNERS
#define MAX_OWNERS 262144
#endif
/* Public relay addresses:ports (VIPs) the program serves. */
#ifndef MAX_VIPS
#define MAX_VIPS 64
#endif
/* Sources with a slow-path admission bucket (LRU). */
#ifndef MAX_SOURCES
#define MAX_SOURCES 65536
#endif
/* SSRCs with a rebind-candidate bucket (LRU). */
#ifndef MAX_REBIND_SSRCS
#define MAX_REBIND_SSRCS 65536
#endif
/* Source prefixes with a TCP SYN bucket at the ICE-TCP listeners (LRU). */
#ifndef MAX_SYN_SOURCES
#define MAX_SYN_SOURCES 65536
#endif
/* Trusted proxies' prefixes whose SYNs the SYN limit spares. */
#ifndef MAX_TRUSTED_PROXIES
#define MAX_TRUSTED_PROXIES 64
#endif
/* Where maps are pinned (bpffs); the loader passes the configured one. */
#ifndef PIN_DIR
#define PIN_DIR "/sys/fs/bpf/splitrelay"
#endif

/* The server ufrag's shape (manager/protocol/ufrag.py: UFRAG_LENGTH, VERSION;
 * held equal by tests/bpf/test_structs_layout.py). */
#define UFRAG_LEN 24
#define UFRAG_VERSION 1
/* STUN attributes looked at before USERNAME, and how far into the message. */
#ifndef STUN_MAX_ATTRS
#define STUN_MAX_ATTRS 8
#endif
#define STUN_SCAN_MAX 1024

#define SR_AF_INET 2
#define SR_AF_INET6 10

/* RFC 7983 first-byte classes of a UDP payload. */
enum pkt_class {
    CLASS_STUN = 0,  /* 0..3 */
    CLASS_DTLS = 1,  /* 20..63 */
    CLASS_RTP = 2,   /* 128..191 (RTP and RTCP) */
    CLASS_OTHER = 3, /* anything else (ZRTP, TURN channels, junk) */
    CLASS_MAX = 4,
};

/* Index of a per-CPU counter: one verdict and its reason. Names in
 * manager/relay/kernel/structs.py STAT_NAMES (held against this enum by a test). */
enum stat_id {
    STAT_PASS_NOT_RELAY = 0,      /* not UDP to a VIP or to a flow port */
    STAT_PASS_FRAGMENT,           /* IPv4 non-first fragment: no UDP header, its first fragment decides */
    STAT_PASS_IPV6_EXT,           /* IPv6 headers XDP does not look through (AH, ESP, non-first fragment, a long chain) */
    STAT_PASS_VLAN,               /* 802.1Q-tagged: the stack (and its VLAN device) handles it */
    STAT_PASS_NO_NEIGH,           /* fib ok but no neighbour entry yet */
    STAT_PASS_FIB_FAIL,           /* no route / fib error */
    STAT_PASS_STUN_UNKNOWN,       /* STUN from an unknown client tuple: slow path */
    STAT_PASS_RETURN_UNKNOWN,     /* to a flow port with no reverse entry: slow path */
    STAT_PASS_REBIND,             /* RTP from an unknown tuple with a known flow's SSRC: slow path checks it */
    STAT_PASS_OWNER_RACE,         /* the call's owner entry changed while read: the slow path forwards this one */
    STAT_PASS_TCP_SYN,            /* TCP SYN to an ICE-TCP listener, within its source's rate: the kernel's */
    STAT_DROP_MALFORMED,          /* truncated, bad lengths, bad version, zero IPv6 UDP checksum to the relay */
    STAT_DROP_IP_OPTIONS,         /* IPv4 with options to a VIP or a flow port */
    STAT_DROP_FRAGMENT,           /* IPv4 first fragment to a VIP or a flow port */
    STAT_DROP_IPV6_EXT,           /* IPv6 with extension headers to a VIP or a flow port */
    STAT_DROP_TTL_ZERO,           /* known flow, TTL/hop limit 0 (RFC 8656 14: a relay drops it) */
    STAT_DROP_UNKNOWN_NOT_STUN,   /* non-STUN from an unknown client tuple */
    STAT_DROP_NOT_OWNER,          /* return packet from a sender that is not the owner */
    STAT_DROP_NO_OWNER,           /* flow's connection id has no owner entry */
    STAT_DROP_BAD_CLASS,          /* known flow, payload not STUN/DTLS/RTP */
    STAT_DROP_NO_INTERNAL_ADDR,   /* no relay-internal address for this family */
    STAT_DROP_STUN_MALFORMED,     /* unknown tuple: no cookie, bad length, attribute past the end */
    STAT_DROP_STUN_NOT_BINDING,   /* unknown tuple: STUN but not a Binding request */
    STAT_DROP_STUN_NO_USERNAME,   /* unknown tuple: Binding request without USERNAME */
    STAT_DROP_STUN_BAD_UFRAG,     /* unknown tuple: USERNAME not "<our ufrag shape>:<ufrag>" */
    STAT_DROP_WRONG_SIDE,         /* to a VIP on an internal interface, or to a flow port on a public one */
    STAT_DROP_STUN_UNKNOWN_UFRAG, /* unknown tuple: well-formed, but no live call has that ufrag */
    STAT_DROP_STUN_CALL_RATE,     /* unknown tuple: that call's checks are over their rate */
    STAT_DROP_STUN_RATE,          /* unknown tuple: its source is over its slow-path rate */
    STAT_DROP_STUN_BUDGET,        /* unknown tuple: the global slow-path budget is spent */
    STAT_DROP_REBIND_CALL_RATE,   /* rebind candidate: that SSRC's candidates are over their rate */
    STAT_DROP_REBIND_RATE,        /* rebind candidate: its source is over its slow-path rate */
    STAT_DROP_REBIND_BUDGET,      /* rebind candidate: the global slow-path budget is spent */
    STAT_DROP_TCP_SYN_RATE,       /* TCP SYN to an ICE-TCP listener: its source is over its SYN rate */
    STAT_FWD_IN_STUN,             /* client → owner, forwarded in XDP */
    STAT_FWD_IN_DTLS,
    STAT_FWD_IN_RTP,
    STAT_FWD_OUT_STUN,            /* owner → client, forwarded in XDP */
    STAT_FWD_OUT_DTLS,
    STAT_FWD_OUT_RTP,
    STAT_MAX,
};

/* relay.bpf.c counts a forward as STAT_FWD_{IN,OUT}_STUN + the payload's
 * class: the two enums must line up, class for class. */
_Static_assert(CLASS_STUN == 0, "forward counters start at the STUN class");
_Static_assert(STAT_FWD_IN_STUN + CLASS_DTLS == STAT_FWD_IN_DTLS, "inbound DTLS counter follows the class enum");
_Static_assert(STAT_FWD_IN_STUN + CLASS_RTP == STAT_FWD_IN_RTP, "inbound RTP counter follows the class enum");
_Static_assert(STAT_FWD_OUT_STUN + CLASS_DTLS == STAT_FWD_OUT_DTLS, "outbound DTLS counter follows the class enum");
_Static_assert(STAT_FWD_OUT_STUN + CLASS_RTP == STAT_FWD_OUT_RTP, "outbound RTP counter follows the class enum");
/* Drops are the range [STAT_DROP_MALFORMED, STAT_FWD_IN_STUN) (relay.bpf.c). */
_Static_assert(STAT_DROP_TCP_SYN_RATE + 1 == STAT_FWD_IN_STUN, "drop counters end where forwards begin");

/* Interface roles (if_roles values, by ifindex); 0: unchecked. */
#define ROLE_PUBLIC 1
#define ROLE_INTERNAL 2
/* if_roles is an array indexed by ifindex (a lookup the verifier inlines, as
 * every packet makes it): the interfaces given roles must have smaller ones. */
/* How long XDP reuses a flow's looked-up route (ns): a route or neighbour
 * change reaches established flows within this. */
#ifndef NH_CACHE_NS
#define NH_CACHE_NS 1000000000ULL
#endif

#ifndef MAX_IFINDEX
#define MAX_IFINDEX 4096
#endif

#endif
