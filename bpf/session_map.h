/* sami-xdp: the one definition of every map key/value and constant.
 *
 * Shared verbatim by the XDP program (bcc/clang) and by Python (cffi cdef),
 * so it uses only plain fixed-width types, literal #defines, no bitfields,
 * no attributes and explicit padding: both sides must see the same bytes.
 * Addresses and ports are stored in network byte order, as on the wire;
 * every address is a struct ip_addr, so IPv4 and IPv6 share every table.
 * Bump SAMIXDP_LAYOUT_VERSION whenever any struct or constant below changes
 * (tests/test_layout.py records a digest of the layout per version).
 */
#ifndef SAMIXDP_SESSION_MAP_H
#define SAMIXDP_SESSION_MAP_H

#define SAMIXDP_LAYOUT_VERSION 10

/* ---- verdict reasons (index into the `verdicts` per-CPU array) ----------
 * Reasons below SAMIXDP_FIRST_DROP pass the packet, the rest drop it. */
#define REASON_PASS_SESSION 0     /* matched a live session */
#define REASON_PASS_OUTBOUND 1    /* new session from a protected VM */
#define REASON_PASS_ACL 2         /* new inbound session allowed by an ACL */
#define REASON_PASS_TRANSIT 3     /* IPv4, neither end protected */
#define REASON_PASS_NON_IP 4      /* neither IPv4 nor IPv6: ARP, LLDP... */
#define REASON_PASS_RELATED 5     /* ICMP error quoting a known session */
#define REASON_PASS_FRAGMENT 6    /* non-first fragment of an accepted packet */
#define REASON_PASS_PICKUP 7      /* mid-flow TCP inside a migration pickup window */
#define REASON_PASS_IPV6_UNPROTECTED 8 /* IPv6, neither end protected (link-local too) */
#define REASON_PASS_NDP 9         /* IPv6 neighbour discovery and MLD, link-scoped */
#define SAMIXDP_FIRST_DROP 10
#define REASON_DROP_BLACKLIST 10  /* source is banned */
#define REASON_DROP_NO_SESSION 11 /* needs a session and has none (TCP without SYN, echo reply, ICMP error) */
#define REASON_DROP_ACL_DENY 12   /* an ACL rule said deny */
#define REASON_DROP_ACL_DEFAULT 13 /* inbound, no session, no ACL rule matched */
#define REASON_DROP_SPOOFED 14    /* a protected source on an interface that does not lead to it */
#define REASON_DROP_MALFORMED 15  /* truncated or invalid headers, too many IPv6 extension headers */
#define REASON_DROP_SYN_RATE 16   /* SYN that crossed the rate limit (source banned) */
#define REASON_DROP_FRAGMENT 17   /* later fragment with no accepted first one, or overlapping its header */
#define REASON_DROP_INVALID 18    /* TCP: invalid flags, transition or sequence; IPv6 routing header type 0 */
#define SAMIXDP_N_REASONS 19

/* ---- TCP / session states ------------------------------------------------
 * TCP follows conntrack's state machine (SYN_SENT2: simultaneous open). UDP
 * and ICMP flows are unassured until they prove two-way traffic that lasts:
 * UDP becomes assured when it still talks 2 s after its first packet and was
 * answered. Unassured flows live in the evictable `unassured` LRU, assured
 * ones (and TCP from ESTABLISHED on) in `sessions`, which never evicts. */
#define ST_NONE 0
#define ST_SYN_SENT 1
#define ST_SYN_RECV 2
#define ST_ESTABLISHED 3
#define ST_FIN_WAIT 4
#define ST_CLOSE_WAIT 5
#define ST_TIME_WAIT 6
#define ST_CLOSED 7
#define ST_UDP_NEW 8      /* UDP, seen one way only */
#define ST_UDP_REPLIED 9  /* UDP, answered, not (yet) assured */
#define ST_ICMP 10        /* ICMP or ICMPv6 echo */
#define ST_SYN_SENT2 11   /* both ends sent a SYN (simultaneous open) */
#define ST_LAST_ACK 12    /* FIN seen both ways, waiting for the last ACK */
#define ST_UDP_ASSURED 13 /* UDP, answered and still talking after 2 s */
#define SAMIXDP_N_STATES 14
#define UDP_ASSURE_AFTER_NS 2000000000 /* a replied UDP flow alive this long is assured */

/* session_value.initiator: which end of the normalised key opened it */
#define SIDE_LO 0
#define SIDE_HI 1

/* session_value.flags */
#define SESS_F_MIGRATED 1   /* imported from a peer's bundle */
#define SESS_F_PICKED_UP 2  /* created mid-flow inside a pickup window */
#define SESS_F_INBOUND 4    /* opened from outside towards a protected VM */
#define SESS_F_SIMOPEN 8    /* TCP simultaneous open went through SYN_SENT2 */
#define SESS_F_VM_LO 32     /* lo address was protected when the session opened */
#define SESS_F_VM_HI 64     /* hi address was protected when the session opened */
#define SESS_F_ALL 111      /* every flag above */

/* tcp_dir.flags (conntrack's per-direction flags) */
#define TCPD_F_WSCALE 1     /* this end sent the window scale option in its SYN */
#define TCPD_F_SACK_PERM 2  /* this end sent SACK-permitted in its SYN */
#define TCPD_F_CLOSE_INIT 4 /* this end sent the first FIN */
#define TCPD_F_MAXACK_SET 8 /* maxack holds an ACK of this end */
#define TCPD_F_LIBERAL 16   /* no window checks (a connection picked up mid-flow) */
#define TCPD_F_ALL 31
#define TCP_MAX_WSCALE 14
#define TCP_MAXACKWIN_MIN 66000 /* lower bound of the ACK window (conntrack's MAXACKWINCONST) */
#define NO_WSCALE 255           /* pkt.wscale of a SYN without the option */

/* blacklist_value.flags */
#define BL_F_VM_ONLY 1      /* drops only traffic towards `vm` (a ban imported with its VM) */

/* iface_roles values: what an interface leads to (anti-spoofing) */
#define ROLE_AUTO 0         /* decided per packet by a route lookup (absent from the map) */
#define ROLE_VM 1           /* protected sources may arrive here */
#define ROLE_UPLINK 2       /* protected sources never arrive here */

/* ---- map capacities (defaults; the loader may override with -D) ---------- */
#define SAMIXDP_MAX_PROTECTED 1024
#define SAMIXDP_MAX_IFACES 1024
#define SAMIXDP_ACL_MAX_RULES_PER_SET 64
#define SAMIXDP_ACL_MAX_SETS 16384 /* per generation; the map holds two */
#define SAMIXDP_ACL_MAX_RULE_ID 65536
#define SAMIXDP_FRAG_ENTRIES 8192

/* ---- dirty-state tracking (a migrating VM's changes, like a dirty page log) --
 * While a VM migrates, the datapath logs the key of each of its sessions once
 * per round, at the first packet that touches it (creation, state, window,
 * counters) or deletes it; delta rounds read the log instead of the tables.
 * Each tracked VM gets a slot: a ring of SAMIXDP_DIRTY_LOG entries in
 * `dirty_log` and its write count in `dirty_head`. */
#define SAMIXDP_TRACK_SLOTS 8     /* migrations tracked at once */
#define SAMIXDP_DIRTY_LOG 32768   /* entries per slot (a power of two) */
#define TRACK_BLOOM_WORDS 16      /* 1024-bit filter of the tracked addresses */

/* ---- program stages (the `stages` program array) -------------------------- */
#define STAGE_SLOW 0            /* direction, spoofing, bans, sessions, SYN accounting */
#define STAGE_ACL 1             /* the ACL for an inbound packet without a session */
#define SAMIXDP_N_STAGES 2

/* ---- config array indices (`config` map, one u64 per slot) ---------------
 * Timeouts are in seconds, indexed by state; the other slots follow. */
#define CFG_SYN_RATE 16         /* SYNs per window per (source, VM) before a ban */
#define CFG_SYN_WINDOW_MS 17    /* SYN accounting window */
#define CFG_BAN_S 18            /* blacklist duration */
#define CFG_ACL_GEN 19          /* which ACL rule-set map is live: 0 or 1 */
#define CFG_FRAG_POLICY 20      /* 0 = track first fragments, 1 = pass all, 2 = drop all */
#define CFG_TCP_LIBERAL 21      /* 1: out-of-window TCP passes (conntrack's tcp_be_liberal) */
#define CFG_EVENT_RATE 22       /* events per second and CPU into `events`; 0 = no events */
/* `config` entry 1 belongs to the datapath (userspace rewrites entry 0 whole) */
#define CFG_ENTRY_RUNTIME 1
#define RT_BANS_HINT 0          /* entry 1 slot: non-zero when a live ban may exist */
#define SAMIXDP_N_CONFIG 32 /* length of fw_config.slot */

/* ---- the event stream (`samixdp events`) ------------------------------------
 * The datapath reports new sessions, session ends and drops into the `events`
 * ring buffer, at most CFG_EVENT_RATE a second per CPU (`event_budget`); what
 * the rate or a full ring kept out is counted there, never queued. Only the
 * packets that open, end or drop pay: an established hit emits nothing. */
#define EVT_NEW 1               /* a session was created (reason: how it was allowed) */
#define EVT_END 2               /* a TCP session reached TIME_WAIT or CLOSED */
#define EVT_DROP 3              /* a packet was dropped (reason: REASON_DROP_*) */
#define SAMIXDP_EVENT_PAGES 64  /* ring size in pages (256 KiB with 4 KiB pages) */
#define SAMIXDP_EVENT_WINDOW_NS 1000000000 /* the rate's window */

/* ---- IP protocols the datapath tracks (the IANA numbers) ------------------ */
#define PROTO_ICMP 1
#define PROTO_TCP 6
#define PROTO_UDP 17
#define PROTO_ICMPV6 58

/* pkt.echo: an ICMP or ICMPv6 echo message (the two families number them apart) */
#define ECHO_NONE 0
#define ECHO_REQUEST 1
#define ECHO_REPLY 2

/* ---- addresses ------------------------------------------------------------- */
#define IPV4_MAPPED_PLEN 96     /* an IPv4 prefix /n is the mapped prefix /(96 + n) */
#define IPV6_BAN_PLEN 64        /* IPv6 sources are counted and banned per /64 */

/* ---- ACL ----------------------------------------------------------------- */
#define ACL_ACT_ALLOW 1
#define ACL_ACT_DENY 2
#define ACL_PROTO_ANY 0

/* Identifies the layout of the pinned maps; the loader refuses a mismatch. */
struct samixdp_meta {
    __u32 layout_version;
    __u32 max_sessions;
    __u32 max_unassured;
    __u32 max_blacklist;
    __u32 max_syn_counters;
    __u32 pad;
    __u64 created_ns;
};

/* An address of either family, network order: IPv6 as it is, IPv4 as the
 * IPv4-mapped address ::ffff:a.b.c.d (RFC 4291 2.5.5.2). One key type for
 * both families keeps one code path; an IPv6 packet carrying a mapped address
 * is dropped as malformed, so the two can never meet in a table. */
struct ip_addr {
    __u32 w[4];
};

/* Normalised 5-tuple: the numerically lower (address, port) end first, so
 * both directions of a flow find the same entry with one lookup.
 * ICMP/ICMPv6 echo: port_lo = echo identifier, port_hi = 0. */
struct session_key {
    struct ip_addr addr_lo;
    struct ip_addr addr_hi;
    __u16 port_lo;
    __u16 port_hi;
    __u8 proto;
    __u8 pad[3];
};

/* One direction of a TCP connection, as conntrack tracks it: the sequence
 * space this end has used and may use, so out-of-window segments are caught. */
struct tcp_dir {
    __u32 end;            /* highest seq + len this end sent */
    __u32 maxend;         /* highest ack + window the other end allowed it */
    __u32 maxwin;         /* largest (scaled) window this end advertised; 0 = unknown yet */
    __u32 maxack;         /* highest ack this end sent (TCPD_F_MAXACK_SET) */
    __u8 scale;           /* window scale this end announced */
    __u8 flags;           /* TCPD_F_* */
    __u16 pad;
};

/* Per-direction arrays are indexed by direction relative to the initiator:
 * [0] initiator -> responder, [1] responder -> initiator. Hot fields first. */
struct session_value {
    __u64 last_seen_ns;   /* bpf_ktime_get_coarse_ns() of the latest valid packet */
    __u32 ifindex[2];     /* ingress of each direction's latest packet; local, never migrated */
    __u8 state;           /* ST_* */
    __u8 initiator;       /* SIDE_LO or SIDE_HI */
    __u8 flags;           /* SESS_F_* */
    __u8 pad;
    __u32 dirty_round;    /* tracking round it was last logged in (dirty_log); local */
    struct tcp_dir tcp[2]; /* TCP only */
    __u64 packets[2];
    __u64 bytes[2];
    __u64 created_ns;     /* of the first packet */
};

/* LPM key for prefixes of either family (protected prefixes); prefixlen
 * counts in the mapped space (an IPv4 /24 is 120). */
struct lpm_key {
    __u32 prefixlen;
    struct ip_addr addr;
};

/* ACL rule sets are keyed by generation then prefix: one LPM trie holds the
 * live generation and the one being built, and flipping CFG_ACL_GEN swaps
 * them atomically. prefixlen = 32 + the mapped prefix length. */
struct acl_key {
    __u32 prefixlen;
    __u32 gen;
    struct ip_addr addr;
};

/* SYN accounting per (client source, protected destination); an IPv6 source
 * is counted per /64 (IPV6_BAN_PLEN, the rest zero). */
struct syn_key {
    struct ip_addr src;
    struct ip_addr dst;
};

struct syn_value {
    __u64 window_start_ns;
    __u32 count;          /* SYNs in the current window */
    __u32 pad;
    __u64 total;          /* SYNs since the entry was created */
};

/* A banned source (the blacklist key: an IPv4 address, or an IPv6 /64 with
 * the interface half zero); `vm` is the protected address whose SYN rate it
 * crossed, so the ban can travel with that VM. */
struct blacklist_value {
    __u64 banned_ns;
    __u64 expires_ns;
    __u64 dropped;        /* packets dropped since the ban */
    struct ip_addr vm;    /* the VM whose SYN rate the source crossed */
    __u32 flags;          /* BL_F_* */
    __u32 pad;
};

/* One ACL rule; a rule set is the ordered (first match) list for a VM or
 * prefix, compiled by userspace so one LPM lookup yields the full list. */
struct acl_rule {
    __u32 id;             /* index into `acl_hits` */
    struct ip_addr src_addr;
    struct ip_addr src_mask; /* network byte order mask; all zero = any source */
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
    struct ip_addr dst_addr; /* VM address or prefix, network byte order */
    __u32 dst_prefixlen;  /* in the mapped space: 128 for a single VM of either family */
};

/* Key of the fragment tracker: the first fragment's identity (IPv4's 16-bit
 * or IPv6's 32-bit identification, network order). */
struct frag_key {
    struct ip_addr src;
    struct ip_addr dst;
    __u32 id;
    __u8 proto;
    __u8 pad[3];
};

/* An accepted first fragment: when, and how far its transport header reaches,
 * so a later fragment may not rewrite a header that was checked (RFC 3128). */
struct frag_value {
    __u64 seen_ns;
    __u16 l4_end;         /* bytes of transport header in the first fragment */
    __u16 pad;
    __u32 pad2;
};

/* What the datapath knows about one parsed packet (the `scratch` map carries it
 * from the fast path to the later stages). Addresses and ports in network
 * order, TCP numbers in host order. */
struct pkt {
    struct ip_addr saddr;
    struct ip_addr daddr;
    __u16 sport;          /* ICMP echo: identifier */
    __u16 dport;          /* ICMP echo: 0 */
    __u32 l3_len;         /* IPv4 total length; IPv6 40 + payload length */
    __u32 ip_id;          /* fragment identification, network order */
    __u16 vlan;           /* innermost VID, 0 when untagged */
    __u8 ipv6;            /* 1 for IPv6 */
    __u8 echo;            /* ECHO_* */
    __u8 proto;           /* the transport protocol (after IPv6 extension headers) */
    __u8 tcp_flags;
    __u8 icmp_type;
    __u8 frag;            /* 0 = whole, 1 = first fragment, 2 = later fragment */
    __u16 frag_off;       /* later fragments: offset in 8-byte units */
    __u16 l4_hdr_len;     /* first fragments: bytes of the fragmentable part up to the
                           * end of the transport header (IPv6: with the extension
                           * headers behind the fragment header) */
    __u32 seq;
    __u32 ack_seq;
    __u32 seg_len;        /* TCP payload bytes */
    __u16 win;            /* TCP window field as sent (unscaled) */
    __u8 wscale;          /* SYN: window scale option, NO_WSCALE when absent */
    __u8 sack_perm;       /* SYN: SACK-permitted option present */
    __u16 opt_off;        /* offset of the TCP options in the frame */
    __u16 opt_len;        /* bytes of TCP options */
    /* ICMP errors: the quoted packet, reversed to the direction of the
     * original (the error travels against it). */
    struct ip_addr in_saddr;
    struct ip_addr in_daddr;
    __u16 in_sport;
    __u16 in_dport;
    __u8 in_proto;
    __u8 is_icmp_err;
    __u8 frag_proto;      /* what fragments are tracked by: IPv4's protocol, IPv6's
                           * fragment header next header (first and later alike) */
    __u8 arp;             /* an Ethernet/IPv4 ARP frame: saddr/daddr hold its sender
                           * and target protocol addresses, nothing else is set */
    __u8 decided;         /* a drop reason stage 0 hands on only to be reported
                           * (the event stream); 0: the next stage decides */
    __u8 pad[3];          /* a per-CPU value: bcc wants a multiple of 8 bytes */
};

/* The whole runtime configuration, one entry of the `config` array, so
 * the datapath reads it with a single lookup. Slots are CFG_* / ST_*. */
struct fw_config {
    __u64 slot[SAMIXDP_N_CONFIG];
};

/* `tracking` value, per tracked VM address: its slot and current round
 * (userspace moves the round on at each round's cut). `owner`: the pid that
 * tracks it, so a crashed migration's slot can be taken back. */
struct track_value {
    __u32 round;
    __u32 slot;
    __u32 owner;
    __u32 pad;
};

/* `track` entry 0: whether anything is tracked and a Bloom filter of the
 * tracked addresses, so an untracked VM's packet costs one array read. */
struct track_state {
    __u64 active;         /* number of tracked addresses */
    __u64 bloom[TRACK_BLOOM_WORDS];
};

/* ---- cutover detection (the destination of a migration) --------------------
 * While a VM's migration to this host is open, its agent arms an `arrivals`
 * entry per address. The first frame of the VM on an interface that leads to
 * it (a gratuitous ARP or unsolicited neighbour advertisement as a hypervisor
 * announces a moved VM, or any packet from its address) marks the entry seen
 * and opens the VM's pickup window; the agent then asks the source for the
 * final delta. */
#define ARRIVAL_ARP 1           /* an ARP frame whose sender is the VM */
#define ARRIVAL_NDP 2           /* neighbour discovery from the VM's address */
#define ARRIVAL_IP 3            /* an IPv4/IPv6 packet from the VM's address */

struct arrival_value {
    __u64 pickup_ns;      /* pickup window opened when the VM is seen (0: none) */
    __u64 seen_ns;        /* when it was first seen here; 0 = not yet */
    __u32 ifindex;        /* where */
    __u32 how;            /* ARRIVAL_* */
};

/* One logged change; `seq` (the write count + 1, written last) tells a
 * complete entry from one still being written or from the previous lap. */
struct dirty_entry {
    struct session_key key;
    __u32 round;
    __u32 pad;
    __u64 seq;
};

/* Bulk lookups for userspace: a frame of LOOKUP_SLOTS slots run through the
 * `lookup_*` programs with PROG_TEST_RUN comes back with each key's entry, a
 * frame's worth of lookups for one syscall (delta rounds read thousands). */
#define LOOKUP_SLOTS 13         /* 13 x 256 bytes: the most a test run frame holds */
struct lookup_slot {
    struct session_key key;
    __u32 found;
    __u32 pad;
    struct session_value value;
};

/* One record of the `events` ring. src is the initiator for NEW and END (as
 * `samixdp sessions` prints it), the packet's sender for DROP. Ports and
 * addresses in network order; ICMP echo: sport = identifier, dport = 0. */
struct fw_event {
    __u64 ts_ns;          /* the datapath's coarse CLOCK_MONOTONIC */
    __u8 type;            /* EVT_* */
    __u8 reason;          /* REASON_* */
    __u8 state;           /* ST_* of the session (NEW, END); ST_NONE for DROP */
    __u8 proto;           /* PROTO_* (or any other IP protocol number) */
    __u32 ifindex;        /* ingress interface of the packet */
    struct ip_addr src;
    struct ip_addr dst;
    __u16 sport;
    __u16 dport;
    __u8 tcp_flags;       /* of the packet (TCP) */
    __u8 pad[3];
};

/* `event_budget` (per CPU): the current rate window and what was not sent. */
struct event_budget {
    __u64 window_start_ns;
    __u64 used;           /* events tried in the current window (sent or ring full) */
    __u64 rate_limited;   /* events over CFG_EVENT_RATE, never tried */
    __u64 ring_full;      /* events that found the ring full (a slow or absent reader) */
};

/* Per-reason verdict counters (per CPU). */
struct verdict_counter {
    __u64 packets;
    __u64 bytes;
};

#endif
