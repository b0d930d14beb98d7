/* sami-xdp: the one definition of every map key/value and constant.
 *
 * Shared verbatim by the XDP program (bcc/clang) and by Python (cffi cdef),
 * so it uses only plain fixed-width types, literal #defines, no bitfields,
 * no attributes and explicit padding: both sides must see the same bytes.
 * Addresses and ports are stored in network byte order, as on the wire.
 * Bump SAMIXDP_LAYOUT_VERSION whenever any struct or constant below changes
 * (tests/test_layout.py records a digest of the layout per version).
 */
#ifndef SAMIXDP_SESSION_MAP_H
#define SAMIXDP_SESSION_MAP_H

#define SAMIXDP_LAYOUT_VERSION 5

/* ---- verdict reasons (index into the `verdicts` per-CPU array) ----------
 * Reasons below SAMIXDP_FIRST_DROP pass the packet, the rest drop it. */
#define REASON_PASS_SESSION 0     /* matched a live session */
#define REASON_PASS_OUTBOUND 1    /* new session from a protected VM */
#define REASON_PASS_ACL 2         /* new inbound session allowed by an ACL */
#define REASON_PASS_TRANSIT 3     /* neither end protected */
#define REASON_PASS_NON_IP 4      /* ARP, LLDP, IPv6 (not filtered yet) */
#define REASON_PASS_RELATED 5     /* ICMP error quoting a known session */
#define REASON_PASS_FRAGMENT 6    /* non-first fragment of an accepted packet */
#define REASON_PASS_PICKUP 7      /* mid-flow TCP inside a migration pickup window */
#define SAMIXDP_FIRST_DROP 8
#define REASON_DROP_BLACKLIST 8   /* source is banned */
#define REASON_DROP_NO_SESSION 9  /* TCP without SYN and no session */
#define REASON_DROP_ACL_DENY 10   /* an ACL rule said deny */
#define REASON_DROP_ACL_DEFAULT 11 /* inbound, no session, no ACL rule matched */
#define REASON_DROP_TABLE_FULL 12 /* session table full: new session refused */
#define REASON_DROP_MALFORMED 13  /* truncated or invalid headers */
#define REASON_DROP_SYN_RATE 14   /* SYN that crossed the rate limit (source banned) */
#define REASON_DROP_FRAGMENT 15   /* non-first fragment with no accepted first one */
#define REASON_DROP_INVALID 16    /* packet not valid in the session's TCP state */
#define SAMIXDP_N_REASONS 17

/* ---- TCP / session states ------------------------------------------------ */
#define ST_NONE 0
#define ST_SYN_SENT 1
#define ST_SYN_RECV 2
#define ST_ESTABLISHED 3
#define ST_FIN_WAIT 4
#define ST_CLOSE_WAIT 5
#define ST_TIME_WAIT 6
#define ST_CLOSED 7
#define ST_UDP_NEW 8      /* UDP, seen one way only */
#define ST_UDP_REPLIED 9  /* UDP, seen both ways */
#define ST_ICMP 10        /* ICMP echo */
#define SAMIXDP_N_STATES 11

/* session_value.initiator: which end of the normalised key opened it */
#define SIDE_LO 0
#define SIDE_HI 1

/* session_value.flags */
#define SESS_F_MIGRATED 1   /* imported from a peer's bundle */
#define SESS_F_PICKED_UP 2  /* created mid-flow inside a pickup window */
#define SESS_F_INBOUND 4    /* opened from outside towards a protected VM */
#define SESS_F_FIN_LO 8     /* lo side sent FIN */
#define SESS_F_FIN_HI 16    /* hi side sent FIN */
#define SESS_F_VM_LO 32     /* lo address was protected when the session opened */
#define SESS_F_VM_HI 64     /* hi address was protected when the session opened */
#define SESS_F_ALL 127      /* every flag above */

/* ---- map capacities (defaults; the loader may override with -D) ---------- */
#define SAMIXDP_MAX_PROTECTED 1024
#define SAMIXDP_ACL_MAX_RULES_PER_SET 64
#define SAMIXDP_ACL_MAX_SETS 16384 /* per generation; the map holds two */
#define SAMIXDP_ACL_MAX_RULE_ID 65536
#define SAMIXDP_FRAG_ENTRIES 8192

/* ---- config array indices (`config` map, one u64 per slot) ---------------
 * Timeouts are in seconds, indexed by state; the other slots follow. */
#define CFG_SYN_RATE 16         /* SYNs per window per (source, VM) before a ban */
#define CFG_SYN_WINDOW_MS 17    /* SYN accounting window */
#define CFG_BAN_S 18            /* blacklist duration */
#define CFG_ACL_GEN 19          /* which ACL rule-set map is live: 0 or 1 */
#define CFG_FRAG_POLICY 20      /* 0 = track first fragments, 1 = pass all, 2 = drop all */
/* `config` entry 1 belongs to the datapath (userspace rewrites entry 0 whole) */
#define CFG_ENTRY_RUNTIME 1
#define RT_BANS_HINT 0          /* entry 1 slot: non-zero when a live ban may exist */
#define SAMIXDP_N_CONFIG 32 /* length of fw_config.slot */

/* ---- IP protocols the datapath tracks (the IANA numbers) ------------------ */
#define PROTO_ICMP 1
#define PROTO_TCP 6
#define PROTO_UDP 17

/* ---- ACL ----------------------------------------------------------------- */
#define ACL_ACT_ALLOW 1
#define ACL_ACT_DENY 2
#define ACL_PROTO_ANY 0

/* Identifies the layout of the pinned maps; the loader refuses a mismatch. */
struct samixdp_meta {
    __u32 layout_version;
    __u32 max_sessions;
    __u32 max_halfopen;
    __u32 max_blacklist;
    __u32 max_syn_counters;
    __u32 pad;
    __u64 created_ns;
};

/* Normalised IPv4 5-tuple: the numerically lower (address, port) end first,
 * so both directions of a flow find the same entry with one lookup.
 * ICMP echo: port_lo = echo identifier, port_hi = 0. */
struct session_key {
    __u32 addr_lo;
    __u32 addr_hi;
    __u16 port_lo;
    __u16 port_hi;
    __u8 proto;
    __u8 pad[3];
};

/* Counters are indexed by direction relative to the initiator:
 * [0] initiator -> responder, [1] responder -> initiator. */
struct session_value {
    __u64 created_ns;     /* bpf_ktime_get_ns() of the first packet */
    __u64 last_seen_ns;   /* bpf_ktime_get_ns() of the latest packet */
    __u64 packets[2];
    __u64 bytes[2];
    __u32 ifindex;        /* ingress of the latest packet; local, never migrated */
    __u8 state;           /* ST_* */
    __u8 initiator;       /* SIDE_LO or SIDE_HI */
    __u8 flags;           /* SESS_F_* */
    __u8 pad;
};

/* LPM key for IPv4 prefixes (protected prefixes, ACL rule sets). */
struct lpm_v4_key {
    __u32 prefixlen;
    __u32 addr;
};

/* ACL rule sets are keyed by generation then prefix: one LPM trie holds the
 * live generation and the one being built, and flipping CFG_ACL_GEN swaps
 * them atomically. prefixlen = 32 + the address prefix length. */
struct acl_key {
    __u32 prefixlen;
    __u32 gen;
    __u32 addr;
};

/* SYN accounting per (client source, protected destination). */
struct syn_key {
    __u32 src;
    __u32 dst;
};

struct syn_value {
    __u64 window_start_ns;
    __u32 count;          /* SYNs in the current window */
    __u32 pad;
    __u64 total;          /* SYNs since the entry was created */
};

/* A banned source; `vm` is the protected address whose SYN rate it crossed,
 * so the ban can travel with that VM. */
struct blacklist_value {
    __u64 banned_ns;
    __u64 expires_ns;
    __u64 dropped;        /* packets dropped since the ban */
    __u32 vm;
    __u32 pad;
};

/* One ACL rule; a rule set is the ordered (first match) list for a VM or
 * prefix, compiled by userspace so one LPM lookup yields the full list. */
struct acl_rule {
    __u32 id;             /* index into `acl_hits` */
    __u32 src_addr;
    __u32 src_mask;       /* network byte order mask; 0 = any source */
    __u32 ifindex;        /* 0 = any interface */
    __u16 dport_lo;       /* host byte order, inclusive */
    __u16 dport_hi;
    __u16 vlan;           /* 0 = any; else the innermost 802.1Q VID */
    __u8 proto;           /* ACL_PROTO_ANY or PROTO_* */
    __u8 action;          /* ACL_ACT_* */
};

struct acl_set {
    __u32 n_rules;
    __u32 pad;
    struct acl_rule rules[SAMIXDP_ACL_MAX_RULES_PER_SET];
};

/* The operator's view of one rule, kept in the pinned `acl_rules` map (not
 * read by the datapath): the source from which `acl_sets` is compiled. */
struct acl_entry {
    struct acl_rule rule;
    __u32 priority;       /* lower first; ties by id */
    __u32 dst_addr;       /* VM address or prefix, network byte order */
    __u32 dst_prefixlen;  /* 32 for a single VM */
    __u32 pad;
};

/* Key of the fragment tracker: the first fragment's identity. */
struct frag_key {
    __u32 src;
    __u32 dst;
    __u16 id;
    __u8 proto;
    __u8 pad;
};

/* The whole runtime configuration, one entry of the `config` array, so
 * the datapath reads it with a single lookup. Slots are CFG_* / ST_*. */
struct fw_config {
    __u64 slot[SAMIXDP_N_CONFIG];
};

/* Per-reason verdict counters (per CPU). */
struct verdict_counter {
    __u64 packets;
    __u64 bytes;
};

#endif
