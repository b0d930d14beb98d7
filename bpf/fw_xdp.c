/* sami-xdp: stateful IPv4/IPv6 firewall in XDP (and, for virtual devices,
 * the same datapath as a TC ingress program: see "the program context").
 *
 * parse -> anti-spoofing -> direction -> blacklist -> session lookup/update
 * (TCP state and window) -> SYN accounting -> ACL -> verdict. Every verdict
 * leaves through finish(), the single exit, which counts it per reason.
 * Compiled by bcc; the loader passes the map capacities as -D constants and
 * pins every map. See ../shared/DESIGN.md.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/pkt_cls.h>

#include "session_map.h"
#include "lib/parse.h"
#include "lib/tcp_state.h"

#ifndef MAX_SESSIONS
#define MAX_SESSIONS 1048576
#endif
#ifndef MAX_UNASSURED
#define MAX_UNASSURED 262144
#endif
#ifndef MAX_SYN_COUNTERS
#define MAX_SYN_COUNTERS 65536
#endif
#ifndef MAX_BLACKLIST
#define MAX_BLACKLIST 65536
#endif

/* The coarse clock (CLOCK_MONOTONIC_COARSE, one tick resolution) is a
 * fraction of the cost of bpf_ktime_get_ns() and plenty for timeouts of
 * seconds; it shares CLOCK_MONOTONIC's base, so userspace compares with
 * time.monotonic_ns(). Read through a per-CPU cache (now_ns()). */
#define NOW() now_ns()

#define NS_PER_S 1000000000ULL
#define NS_PER_MS 1000000ULL
#define FRAG_TIMEOUT_NS (30 * NS_PER_S)
#define AF_INET_ 2
#define AF_INET6_ 10

/* Assured sessions (TCP from ESTABLISHED on, UDP that kept talking): a plain
 * hash, never evicted. When it is full a new flow stays unassured. */
BPF_TABLE("hash", struct session_key, struct session_value, sessions, MAX_SESSIONS);
/* Unassured flows (TCP handshakes, UDP until assured, ICMP echo) live apart in
 * an LRU: a flood of one-shot flows evicts only other unassured entries. */
BPF_TABLE("lru_hash", struct session_key, struct session_value, unassured, MAX_UNASSURED);
BPF_LPM_TRIE(protected, struct lpm_key, u32, SAMIXDP_MAX_PROTECTED);
BPF_TABLE("lru_hash", struct syn_key, struct syn_value, syn_counters, MAX_SYN_COUNTERS);
/* Banned sources: an IPv4 address, or an IPv6 /64 (addr_ban_key). */
BPF_TABLE("lru_hash", struct ip_addr, struct blacklist_value, blacklist, MAX_BLACKLIST);
/* Compiled ACL rule sets of two generations; CFG_ACL_GEN names the live one,
 * so a whole rule set is replaced atomically. */
BPF_LPM_TRIE(acl_sets, struct acl_key, struct acl_set, 2 * SAMIXDP_ACL_MAX_SETS);
BPF_PERCPU_ARRAY(acl_hits, u64, SAMIXDP_ACL_MAX_RULE_ID);
/* Rule id -> rule as the operator wrote it; userspace compiles acl_sets from it. */
BPF_TABLE("hash", u32, struct acl_entry, acl_rules, SAMIXDP_ACL_MAX_RULE_ID);
/* VM address -> end of its migration pickup window (bpf_ktime_get_ns). */
BPF_TABLE("hash", struct ip_addr, u64, pickup, SAMIXDP_MAX_PROTECTED);
BPF_TABLE("lru_hash", struct frag_key, struct frag_value, fragments, SAMIXDP_FRAG_ENTRIES);
/* VM address -> its cutover watch while its migration to this host is open */
BPF_TABLE("hash", struct ip_addr, struct arrival_value, arrivals, SAMIXDP_MAX_PROTECTED);
/* ifindex -> ROLE_VM / ROLE_UPLINK; an interface not listed is ROLE_AUTO. */
BPF_TABLE("hash", u32, u32, iface_roles, SAMIXDP_MAX_IFACES);
/* Dirty-state tracking of migrating VMs (session_map.h): the tracked addresses,
 * a filter of them, and each slot's log ring with its write count. */
BPF_TABLE("hash", struct ip_addr, struct track_value, tracking, SAMIXDP_MAX_PROTECTED);
BPF_ARRAY(track, struct track_state, 1);
BPF_ARRAY(dirty_head, u64, SAMIXDP_TRACK_SLOTS);
BPF_ARRAY(dirty_log, struct dirty_entry, SAMIXDP_TRACK_SLOTS * SAMIXDP_DIRTY_LOG);
/* [0]: settings written by userspace; [CFG_ENTRY_RUNTIME]: hints the
 * datapath writes (kept apart so a settings rewrite cannot clobber them). */
BPF_ARRAY(config, struct fw_config, 2);
BPF_ARRAY(meta, struct samixdp_meta, 1);
BPF_PERCPU_ARRAY(verdicts, struct verdict_counter, SAMIXDP_N_REASONS);
/* The stages after the fast path are programs of their own, reached by tail
 * calls, so the verifier checks each alone (inlined together they exceed its
 * budget); the parsed packet travels in a per-CPU scratch slot. */
BPF_PROG_ARRAY(stages, SAMIXDP_N_STAGES);
BPF_PROG_ARRAY(tc_stages, SAMIXDP_N_STAGES); /* the same stages as TC programs */
BPF_PERCPU_ARRAY(scratch, struct pkt, 1);
/* The coarse clock cached per CPU: [0] the jiffy it was read in, [1] its
 * value. The coarse clock moves once per tick, when jiffies does, but its
 * helper costs as much as a session lookup (~20 ns), while bpf_jiffies64()
 * is one load (inlined by the verifier); so it is read once per tick and CPU. */
BPF_PERCPU_ARRAY(clock_cache, u64, 2);
/* The event stream (session_map.h): new sessions, ends and drops for
 * `samixdp events`, at most CFG_EVENT_RATE a second per CPU. */
BPF_RINGBUF_OUTPUT(events, SAMIXDP_EVENT_PAGES);
BPF_PERCPU_ARRAY(event_budget, struct event_budget, 1);

/* ---- the program context ---------------------------------------------------
 * The datapath runs as an XDP program (native or generic, for NIC drivers) and
 * as a TC ingress classifier (for virtual devices such as veth, where XDP costs
 * the TCP stack its GSO/TSO). The functions below take the context as `void *`
 * and the kind as a constant, so each entry point compiles only its own branch;
 * everything else (maps, sessions, ACL) is shared: both kinds are one firewall. */
#define KIND_XDP 0
#define KIND_TC 1

static __always_inline void *ctx_data(void *ctx, int kind)
{
    if (kind == KIND_TC)
        return (void *)(long)((struct __sk_buff *)ctx)->data;
    return (void *)(long)((struct xdp_md *)ctx)->data;
}

/* XDP: the end of the frame; TC: of the linear part, where the headers are */
static __always_inline void *ctx_end(void *ctx, int kind)
{
    if (kind == KIND_TC)
        return (void *)(long)((struct __sk_buff *)ctx)->data_end;
    return (void *)(long)((struct xdp_md *)ctx)->data_end;
}

/* the length on the wire (TC: a GSO packet counts whole) */
static __always_inline __u64 ctx_len(void *ctx, int kind)
{
    if (kind == KIND_TC)
        return ((struct __sk_buff *)ctx)->len;
    return (__u64)(ctx_end(ctx, kind) - ctx_data(ctx, kind));
}

static __always_inline __u32 ctx_ifindex(void *ctx, int kind)
{
    if (kind == KIND_TC)
        return ((struct __sk_buff *)ctx)->ingress_ifindex;
    return ((struct xdp_md *)ctx)->ingress_ifindex;
}

static __always_inline int verdict_code(int kind, int pass)
{
    if (kind == KIND_TC)
        return pass ? TC_ACT_OK : TC_ACT_SHOT;
    return pass ? XDP_PASS : XDP_DROP;
}

/* Each kind's stages sit in a program array of their own. */
static __always_inline void tail_call(void *ctx, int kind, __u32 stage)
{
    if (kind == KIND_TC)
        tc_stages.call(ctx, stage);
    else
        stages.call(ctx, stage);
}

/* The headers the parser may read: Ethernet, two tags, IPv6 with extension
 * headers, TCP with options. GSO packets keep them in the linear part, so the
 * pull (a copy) happens only for frames built otherwise. */
#define TC_HEADERS_MAX 256
static __always_inline void tc_pull_headers(struct __sk_buff *skb)
{
    __u32 want = skb->len < TC_HEADERS_MAX ? skb->len : TC_HEADERS_MAX;
    if ((long)skb->data_end - (long)skb->data < (long)want)
        bpf_skb_pull_data(skb, want);
}

/* The kernel takes the outer 802.1Q tag off the frame before TC sees it. */
static __always_inline void tc_vlan(struct __sk_buff *skb, struct pkt *p)
{
    if (!p->vlan && skb->vlan_present)
        p->vlan = skb->vlan_tci & 0x0FFF;
}

/* slow_path() result meaning "inbound, no session: ask the ACL" */
#define REASON_NEED_ACL 255

#define DIR_TRANSIT 0
#define DIR_INBOUND 1
#define DIR_OUTBOUND 2

/* CLOCK_MONOTONIC_COARSE, read at most once per tick on each CPU. Jiffies
 * advance just before the coarse clock does: a read that still sees the old
 * value leaves the jiffy untagged, so the next packet reads it again. */
static __always_inline __u64 now_ns(void)
{
    __u32 k_tag = 0, k_ns = 1;
    u64 *tag = clock_cache.lookup(&k_tag);
    u64 *ns = clock_cache.lookup(&k_ns);
    if (!tag || !ns)
        return bpf_ktime_get_coarse_ns(); /* unreachable: arrays always hold 0 and 1 */
    __u64 j = bpf_jiffies64();
    if (*tag != j) {
        __u64 t = bpf_ktime_get_coarse_ns();
        if (t != *ns)
            *tag = j;
        *ns = t;
    }
    return *ns;
}

static __always_inline int is_icmp(__u8 proto)
{
    return proto == PROTO_ICMP || proto == PROTO_ICMPV6;
}

/* Neighbour discovery or MLD that the parser validated (PARSE_NDP). */
static __always_inline int is_ndp(struct pkt *p)
{
    __u8 t = p->icmp_type;
    return p->proto == PROTO_ICMPV6 && !p->echo && !p->is_icmp_err &&
           ((t >= ICMPV6_MLD_QUERY_T && t <= ICMPV6_REDIRECT_T) || t == ICMPV6_MLD2_REPORT_T);
}

/* Fills a normalised key; returns the sender's side. */
static __always_inline __u8 make_key(struct session_key *k, const struct ip_addr *saddr,
                                     const struct ip_addr *daddr, __u16 sport, __u16 dport,
                                     __u8 proto)
{
    int c = addr_cmp(saddr, daddr);
    __u8 side;
    if (c < 0 || (c == 0 && bpf_ntohs(sport) <= bpf_ntohs(dport)))
        side = SIDE_LO;
    else
        side = SIDE_HI;
    k->proto = proto;
    if (side == SIDE_LO) {
        k->addr_lo = *saddr;
        k->addr_hi = *daddr;
        k->port_lo = sport;
        k->port_hi = dport;
    } else {
        k->addr_lo = *daddr;
        k->addr_hi = *saddr;
        k->port_lo = dport;
        k->port_hi = sport;
    }
    if (is_icmp(proto)) {
        k->port_lo = sport > dport ? sport : dport; /* echo identifier */
        k->port_hi = 0;
    }
    return side;
}

static __always_inline __u64 timeout_ns(struct fw_config *cfg, __u8 state)
{
    if (state >= SAMIXDP_N_STATES)
        return 0;
    return cfg->slot[state & 15] * NS_PER_S;
}

static __always_inline int is_live(struct fw_config *cfg, struct session_value *v, __u64 now)
{
    __u64 seen = v->last_seen_ns;
    /* another CPU may have stamped the entry after we read the clock */
    return seen >= now || now - seen <= timeout_ns(cfg, v->state);
}

/* The states a flow is promoted to `sessions` in (a handshake that ends in an
 * RST stays unassured: it never proved anything). */
static __always_inline int is_assured(__u8 state)
{
    return (state >= ST_ESTABLISHED && state <= ST_TIME_WAIT) || state == ST_LAST_ACK ||
           state == ST_UDP_ASSURED;
}

/* Plain (not atomic) increments: each direction of a flow is normally
 * handled by one CPU (RSS), so a lost update is rare and only costs a count;
 * a locked add on every packet costs more than the whole lookup. */
static __always_inline void count_packet(struct session_value *v, int from_init, __u32 len,
                                         __u64 now, __u32 ifindex, int refresh)
{
    int d = from_init ? 0 : 1;
    v->packets[d] += 1;
    v->bytes[d] += len;
    v->ifindex[d] = ifindex;
    if (refresh)
        v->last_seen_ns = now;
}

static __always_inline int is_protected(const struct ip_addr *addr)
{
    struct lpm_key k = {.prefixlen = 128, .addr = *addr};
    return protected.lookup(&k) != 0;
}

/* Strict reverse path for a protected source: it may only arrive on an
 * interface through which this host reaches it (the route to it leaves by
 * that interface), unless the operator gave the interface a role. */
static __always_inline int source_allowed(void *ctx, int kind, struct pkt *p, __u32 ifindex)
{
    u32 *role = iface_roles.lookup(&ifindex);
    if (role)
        return *role == ROLE_VM;
    struct bpf_fib_lookup fib = {};
    if (p->ipv6) {
        fib.family = AF_INET6_;
        /* a multicast destination (neighbour discovery's all-nodes, solicited-node)
         * is no source for the route back: leave it unspecified */
        __u32 keep = (p->daddr.w[0] & bpf_htonl(0xff000000)) == bpf_htonl(0xff000000) ? 0 : ~0U;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            fib.ipv6_src[i] = p->daddr.w[i] & keep;
            fib.ipv6_dst[i] = p->saddr.w[i];
        }
    } else {
        fib.family = AF_INET_;
        fib.ipv4_src = p->daddr.w[3];
        fib.ipv4_dst = p->saddr.w[3];
    }
    fib.ifindex = ifindex;
    int rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
    /* FRAG_NEEDED (TC: the packet exceeds that interface's MTU) still found the route */
    return (rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH ||
            rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) &&
           fib.ifindex == ifindex;
}

static __always_inline int direction(struct pkt *p)
{
    if (is_protected(&p->daddr))
        return DIR_INBOUND;
    if (is_protected(&p->saddr))
        return DIR_OUTBOUND;
    return DIR_TRANSIT;
}

/* Is `src` banned from reaching `dst`? Counts the drop. A ban made here
 * covers every VM; one imported with a migrating VM covers that VM only. The
 * config hint skips the lookup while no ban exists, the common case. */
static __always_inline int banned(struct pkt *p, __u64 now)
{
    __u32 idx = CFG_ENTRY_RUNTIME;
    struct fw_config *rt = config.lookup(&idx);
    if (rt && !rt->slot[RT_BANS_HINT])
        return 0;
    struct ip_addr src;
    addr_ban_key(&src, &p->saddr, p->ipv6);
    struct blacklist_value *bv = blacklist.lookup(&src);
    if (bv && now < bv->expires_ns &&
        (!(bv->flags & BL_F_VM_ONLY) || addr_eq(&bv->vm, &p->daddr))) {
        __sync_fetch_and_add(&bv->dropped, 1);
        return 1;
    }
    return 0;
}

/* ---- the event stream --------------------------------------------------------------
 * Only a packet that opens a session, ends one or is dropped gets here. The per-CPU
 * budget bounds the ring's reservations (a spin lock shared by every CPU) as well
 * as the events: under a flood, past the budget, an event costs two array reads. */

/* A zeroed record with its type and time, or 0: events off, over the rate (counted)
 * or the ring full (counted). The caller fills it and submits it. */
static __always_inline struct fw_event *event_start(__u8 type, __u64 now)
{
    __u32 zero = 0;
    struct fw_config *cfg = config.lookup(&zero);
    if (!cfg || !cfg->slot[CFG_EVENT_RATE])
        return 0;
    struct event_budget *b = event_budget.lookup(&zero);
    if (!b)
        return 0;
    if (now - b->window_start_ns >= SAMIXDP_EVENT_WINDOW_NS) {
        b->window_start_ns = now;
        b->used = 0;
    }
    if (b->used >= cfg->slot[CFG_EVENT_RATE]) {
        b->rate_limited += 1;
        return 0;
    }
    b->used += 1; /* a failed reservation uses the budget too: it took the lock */
    struct fw_event *e = events.ringbuf_reserve(sizeof(struct fw_event));
    if (!e) {
        b->ring_full += 1;
        return 0;
    }
    __builtin_memset(e, 0, sizeof(*e));
    e->ts_ns = now;
    e->type = type;
    return e;
}

/* NEW or DROP: the packet's own addresses (for NEW its sender is the initiator). */
static __always_inline void event_packet(__u8 type, __u32 reason, __u8 state, struct pkt *p,
                                         __u32 ifindex, __u64 now)
{
    struct fw_event *e = event_start(type, now);
    if (!e)
        return;
    e->reason = reason;
    e->state = state;
    e->proto = p->proto;
    e->ifindex = ifindex;
    e->src = p->saddr;
    e->dst = p->daddr;
    e->sport = p->sport;
    e->dport = p->dport;
    e->tcp_flags = p->tcp_flags;
    events.ringbuf_submit(e, 0);
}

/* END: the session's initiator first, as `samixdp sessions` lists it. */
static __always_inline void event_end(const struct session_key *k, __u8 initiator, __u8 state,
                                      struct pkt *p, __u32 ifindex, __u64 now)
{
    struct fw_event *e = event_start(EVT_END, now);
    if (!e)
        return;
    e->reason = REASON_PASS_SESSION;
    e->state = state;
    e->proto = k->proto;
    e->ifindex = ifindex;
    if (initiator == SIDE_LO) {
        e->src = k->addr_lo;
        e->dst = k->addr_hi;
        e->sport = k->port_lo;
        e->dport = k->port_hi;
    } else {
        e->src = k->addr_hi;
        e->dst = k->addr_lo;
        e->sport = k->port_hi;
        e->dport = k->port_lo;
    }
    e->tcp_flags = p->tcp_flags;
    events.ringbuf_submit(e, 0);
}

static __always_inline int is_closed(__u8 state)
{
    return state == ST_TIME_WAIT || state == ST_CLOSED;
}

/* ---- dirty-state tracking ------------------------------------------------------
 * A migrating VM's sessions are logged once per round, at the first packet that
 * touches them; everyone else pays one array read (nothing tracked) or a filter
 * test (another VM tracked). */

/* Must equal the userspace twin (migrate/dirty.py: bloom_bit). */
static __always_inline __u32 track_hash(const struct ip_addr *a)
{
    return (a->w[0] ^ a->w[1] ^ a->w[2] ^ a->w[3]) * 2654435761u;
}

static __always_inline struct track_value *tracked(struct track_state *ts,
                                                   const struct ip_addr *a)
{
    __u32 h = track_hash(a);
    if (!(ts->bloom[(h >> 28) & (TRACK_BLOOM_WORDS - 1)] & (1ULL << ((h >> 22) & 63))))
        return 0;
    return tracking.lookup(a);
}

/* The tracking entry of the session's migrating VM end, if any. */
static __always_inline struct track_value *tracked_session(const struct session_key *k,
                                                           __u8 flags)
{
    __u32 zero = 0;
    struct track_state *ts = track.lookup(&zero);
    if (!ts || !ts->active)
        return 0;
    struct track_value *t = 0;
    if (flags & SESS_F_VM_LO)
        t = tracked(ts, &k->addr_lo);
    if (!t && (flags & SESS_F_VM_HI))
        t = tracked(ts, &k->addr_hi);
    return t;
}

static __always_inline void dirty_append(struct track_value *t, const struct session_key *k)
{
    __u32 slot = t->slot;
    if (slot >= SAMIXDP_TRACK_SLOTS)
        return;
    u64 *head = dirty_head.lookup(&slot);
    if (!head)
        return;
    __u64 n = __sync_fetch_and_add(head, 1);
    __u32 pos = slot * SAMIXDP_DIRTY_LOG + (__u32)(n & (SAMIXDP_DIRTY_LOG - 1));
    struct dirty_entry *e = dirty_log.lookup(&pos);
    if (!e)
        return;
    e->key = *k;
    e->round = t->round;
    asm volatile("" ::: "memory"); /* the sequence number last: it marks the entry whole */
    e->seq = n + 1;
}

/* Logs a session (its entry, or the local value it is about to be created
 * from) once per round of its VM's migration. */
static __always_inline void track_session(const struct session_key *k, struct session_value *v)
{
    struct track_value *t = tracked_session(k, v->flags);
    if (!t || v->dirty_round == t->round)
        return;
    v->dirty_round = t->round;
    dirty_append(t, k);
}

/* Logs a session about to be deleted (whatever the round: its entry goes). */
static __always_inline void track_delete(const struct session_key *k, __u8 flags)
{
    struct track_value *t = tracked_session(k, flags);
    if (t)
        dirty_append(t, k);
}

/* Creates a flow's entry, unassured (an LRU insert never fails for lack of
 * room) unless `state` is assured already (a pickup). */
static __always_inline __u32 open_session(struct session_key *k, struct pkt *p, __u8 side,
                                          __u8 state, __u8 flags, __u8 tcpd_flags, __u64 now,
                                          __u32 ifindex, __u32 pass_reason)
{
    struct session_value v = {};
    if (is_protected(&k->addr_lo))
        flags |= SESS_F_VM_LO;
    if (is_protected(&k->addr_hi))
        flags |= SESS_F_VM_HI;
    v.created_ns = now;
    v.last_seen_ns = now;
    v.packets[0] = 1;
    v.bytes[0] = p->l3_len;
    v.ifindex[0] = ifindex;
    v.state = state;
    v.initiator = side;
    v.flags = flags;
    v.tcp[0].flags = tcpd_flags;
    v.tcp[1].flags = tcpd_flags;
    if (p->proto == PROTO_TCP && (p->tcp_flags & TCPF_SYN))
        tcp_dir_from_syn(&v.tcp[0], p, p->seq + p->seg_len + 1);
    track_session(k, &v);
    event_packet(EVT_NEW, pass_reason, state, p, ifindex, now);
    if (is_assured(state) && sessions.update(k, &v) == 0)
        return pass_reason;
    unassured.update(k, &v);
    return pass_reason;
}

/* Applies a packet to an existing session: TCP through the tracker, UDP and
 * ICMP by direction. A flow that becomes assured moves to `sessions`; if that
 * is full it stays unassured (and keeps working). `report_end` (a constant):
 * a TCP session that closes here is reported (EVT_END); the fast path passes 0,
 * it hands every packet that could close a session to the slow path. */
static __always_inline __u32 advance_session(struct fw_config *cfg, struct session_key *k,
                                             struct session_value *v, struct pkt *p, __u8 side,
                                             int in_unassured, __u64 now, __u32 ifindex,
                                             int report_end)
{
    int from_init = side == v->initiator;
    __u8 next = v->state;
    if (p->proto == PROTO_TCP) {
        int w = tcp_track(v, p, from_init, cfg->slot[CFG_TCP_LIBERAL] != 0, &next);
        if (w == TW_INVALID)
            return REASON_DROP_INVALID;
        count_packet(v, from_init, p->l3_len, now, ifindex, w == TW_ACCEPT);
        if (w == TW_IGNORE)
            return REASON_PASS_SESSION;
        /* only the packet that closes it pays */
        if (report_end && next != v->state && is_closed(next) && !is_closed(v->state))
            event_end(k, v->initiator, next, p, ifindex, now);
    } else {
        if (is_icmp(p->proto) && p->echo != (from_init ? ECHO_REQUEST : ECHO_REPLY))
            return REASON_DROP_INVALID; /* e.g. a request from the pinged side */
        if (!is_icmp(p->proto)) {
            if (!from_init && next == ST_UDP_NEW)
                next = ST_UDP_REPLIED;
            else if (next == ST_UDP_REPLIED && now - v->created_ns >= UDP_ASSURE_AFTER_NS)
                next = ST_UDP_ASSURED;
        }
        count_packet(v, from_init, p->l3_len, now, ifindex, 1);
    }
    if (in_unassured && is_assured(next)) {
        struct session_value nv = *v;
        nv.state = next;
        if (sessions.update(k, &nv) == 0) {
            unassured.delete(k);
            return REASON_PASS_SESSION;
        }
    }
    v->state = next;
    return REASON_PASS_SESSION;
}

/* Looks a key up in both session tables; expired entries are misses. */
static __always_inline struct session_value *find_session(struct fw_config *cfg,
                                                          struct session_key *k, __u64 now,
                                                          int *in_unassured)
{
    struct session_value *v = sessions.lookup(k);
    *in_unassured = 0;
    if (v && is_live(cfg, v, now))
        return v;
    v = unassured.lookup(k);
    if (v && is_live(cfg, v, now)) {
        *in_unassured = 1;
        return v;
    }
    return 0;
}

/* Counts an inbound SYN; returns 1 when it crosses the rate (source banned). */
static __always_inline int syn_over_rate(struct fw_config *cfg, struct pkt *p, __u64 now)
{
    struct syn_key sk = {.dst = p->daddr};
    addr_ban_key(&sk.src, &p->saddr, p->ipv6);
    struct syn_value *sv = syn_counters.lookup(&sk);
    __u32 count;
    if (!sv) {
        struct syn_value nv = {.window_start_ns = now, .count = 1, .total = 1};
        syn_counters.update(&sk, &nv);
        count = 1;
    } else {
        if (now - sv->window_start_ns >= cfg->slot[CFG_SYN_WINDOW_MS] * NS_PER_MS) {
            sv->window_start_ns = now;
            sv->count = 0;
        }
        sv->count += 1;
        sv->total += 1;
        count = sv->count;
    }
    if (count <= cfg->slot[CFG_SYN_RATE])
        return 0;
    struct blacklist_value bv = {};
    bv.banned_ns = now;
    bv.expires_ns = now + cfg->slot[CFG_BAN_S] * NS_PER_S;
    bv.dropped = 1;
    bv.vm = p->daddr;
    blacklist.update(&sk.src, &bv);
    __u32 idx = CFG_ENTRY_RUNTIME;
    struct fw_config *rt = config.lookup(&idx);
    if (rt)
        rt->slot[RT_BANS_HINT] = 1; /* after the insert: see blacklist.gc() */
    return 1;
}

/* First-match ACL evaluation for an inbound packet without a session.
 */
static __always_inline __u32 acl_verdict(struct fw_config *cfg, struct pkt *p, __u32 ifindex)
{
    struct acl_key k = {.prefixlen = 32 + 128, .gen = cfg->slot[CFG_ACL_GEN] & 1,
                        .addr = p->daddr};
    struct acl_set *set = acl_sets.lookup(&k);
    if (!set)
        return REASON_DROP_ACL_DEFAULT;
    __u32 n = set->n_rules;
    if (n > SAMIXDP_ACL_MAX_RULES_PER_SET)
        n = SAMIXDP_ACL_MAX_RULES_PER_SET;
    __u32 dport = bpf_ntohs(p->dport);
    __u32 has_ports = p->proto == PROTO_TCP || p->proto == PROTO_UDP;
    __u32 proto = p->proto, vlan = p->vlan;
    __u32 s0 = p->saddr.w[0], s1 = p->saddr.w[1], s2 = p->saddr.w[2], s3 = p->saddr.w[3];
    struct acl_rule *hit = 0;
    for (__u32 i = 0; i < SAMIXDP_ACL_MAX_RULES_PER_SET; i++) {
        if (i >= n)
            break;
        __u32 idx = i;
        asm volatile("" : "+r"(idx)); /* keep the index bound visible to the verifier */
        if (idx >= SAMIXDP_ACL_MAX_RULES_PER_SET)
            break;
        struct acl_rule *r = &set->rules[idx];
        if (r->proto != ACL_PROTO_ANY && r->proto != proto)
            continue;
        if (((s0 & r->src_mask.w[0]) ^ r->src_addr.w[0]) |
            ((s1 & r->src_mask.w[1]) ^ r->src_addr.w[1]) |
            ((s2 & r->src_mask.w[2]) ^ r->src_addr.w[2]) |
            ((s3 & r->src_mask.w[3]) ^ r->src_addr.w[3]))
            continue;
        if (r->vlan && r->vlan != vlan)
            continue;
        if (r->ifindex && r->ifindex != ifindex)
            continue;
        if (has_ports) {
            if (dport < r->dport_lo || dport > r->dport_hi)
                continue;
        } else if (r->dport_lo != 0 || r->dport_hi != 65535) {
            continue; /* a port-specific rule never matches port-less traffic */
        }
        hit = r;
        break;
    }
    if (!hit)
        return REASON_DROP_ACL_DEFAULT;
    __u32 id = hit->id;
    u64 *hits = acl_hits.lookup(&id);
    if (hits)
        *hits += 1;
    return hit->action == ACL_ACT_ALLOW ? REASON_PASS_ACL : REASON_DROP_ACL_DENY;
}

/* Mid-flow TCP for a VM whose state was just migrated here. */
static __always_inline int in_pickup_window(struct ip_addr *vm, __u64 now)
{
    u64 *deadline = pickup.lookup(vm);
    return deadline && now < *deadline;
}

/* A frame from `vm` that passed the anti-spoofing check: if the VM's migration
 * to this host is being watched, the VM has arrived; its pickup window opens at
 * once (covering the time until the final delta is loaded). Only the first frame
 * writes. */
static __always_inline void note_arrival(struct ip_addr *vm, __u32 ifindex, __u64 now, __u32 how)
{
    struct arrival_value *a = arrivals.lookup(vm);
    if (!a || a->seen_ns)
        return;
    a->ifindex = ifindex;
    a->how = how;
    a->seen_ns = now;
    if (a->pickup_ns) {
        u64 until = now + a->pickup_ns;
        pickup.update(vm, &until);
    }
}

/* An ICMP error passes only when it quotes a live session and travels to the
 * sender of the quoted packet (as conntrack's RELATED). */
static __always_inline __u32 handle_icmp_error(struct fw_config *cfg, struct pkt *p, __u64 now,
                                               int dir)
{
    struct session_key k = {};
    int in_unassured;
    int addressed = dir == DIR_OUTBOUND || addr_eq(&p->daddr, &p->in_saddr);
    make_key(&k, &p->in_saddr, &p->in_daddr, p->in_sport, p->in_dport, p->in_proto);
    if (addressed && find_session(cfg, &k, now, &in_unassured))
        return REASON_PASS_RELATED;
    return REASON_DROP_NO_SESSION;
}

/* A later fragment (no transport header) follows its accepted first fragment
 * within 30 s, and may not overlap that fragment's transport header (RFC 3128:
 * a TCP fragment at offset 1 could rewrite the flags that were checked). */
static __always_inline __u32 handle_fragment(struct fw_config *cfg, struct pkt *p, __u64 now)
{
    if (p->proto == PROTO_TCP && p->frag_off == 1)
        return REASON_DROP_FRAGMENT; /* RFC 1858: never legitimate, whatever the policy */
    __u64 policy = cfg->slot[CFG_FRAG_POLICY];
    if (policy == 1)
        return REASON_PASS_FRAGMENT;
    if (policy == 2)
        return REASON_DROP_FRAGMENT;
    struct frag_key fk = {.src = p->saddr, .dst = p->daddr, .id = p->ip_id,
                          .proto = p->frag_proto};
    struct frag_value *first = fragments.lookup(&fk);
    if (!first)
        return REASON_DROP_FRAGMENT;
    if (now - first->seen_ns >= FRAG_TIMEOUT_NS)
        return REASON_DROP_FRAGMENT;
    if ((__u32)p->frag_off * 8 < first->l4_end)
        return REASON_DROP_FRAGMENT;
    return REASON_PASS_FRAGMENT;
}


/* The verdict leaves here, whichever stage decided it: an accepted first
 * fragment is remembered for its followers, the verdict counted per reason and,
 * if `reported` (a constant: the later stages), a drop reported (EVT_DROP). */
static __always_inline int finish(void *ctx, int kind, struct pkt *p, __u32 reason,
                                  int reported)
{
    if (p->frag == 1 && reason < SAMIXDP_FIRST_DROP && reason != REASON_PASS_TRANSIT &&
        reason != REASON_PASS_IPV6_UNPROTECTED) {
        struct frag_key fk = {.src = p->saddr, .dst = p->daddr, .id = p->ip_id,
                              .proto = p->frag_proto};
        struct frag_value fv = {.seen_ns = NOW(), .l4_end = p->l4_hdr_len};
        fragments.update(&fk, &fv);
    }
    struct verdict_counter *c = verdicts.lookup(&reason);
    if (c) {
        c->packets += 1;
        c->bytes += ctx_len(ctx, kind);
    }
    if (reported && reason >= SAMIXDP_FIRST_DROP)
        event_packet(EVT_DROP, reason, ST_NONE, p, ctx_ifindex(ctx, kind), NOW());
    return verdict_code(kind, reason < SAMIXDP_FIRST_DROP);
}

/* Hands the packet to the next stage; returns only if the tail call failed.
 * `decided`: a drop reason the stage only reports, else 0. */
static __always_inline void next_stage(void *ctx, int kind, struct pkt *p, __u32 stage,
                                       __u8 decided)
{
    __u32 zero = 0;
    struct pkt *sp = scratch.lookup(&zero);
    if (!sp)
        return;
    *sp = *p;
    sp->decided = decided;
    tail_call(ctx, kind, stage);
}

/* Whether drops are reported (events on): stage 0 then hands its drops on. */
static __always_inline int events_on(void)
{
    __u32 zero = 0;
    struct fw_config *cfg = config.lookup(&zero);
    return cfg && cfg->slot[CFG_EVENT_RATE];
}

/* Stage 0, the fast path: a live assured session. Its flags say which ends
 * are protected, so no prefix lookup is needed: a protected sender must come
 * in where its packets came in before (or pass the reverse-path check), and
 * packets towards a VM still meet the blacklist first. REASON_NEED_SLOW when
 * the packet needs the slow path. */
#define REASON_NEED_SLOW 254
#define REASON_NEED_SLOW 254
static __always_inline __u32 fast_path(void *ctx, int kind, struct pkt *p)
{
    if (kind == KIND_TC)
        tc_pull_headers(ctx);
    int rc = parse_packet(ctx_data(ctx, kind), ctx_end(ctx, kind), ctx_len(ctx, kind), p);
    if (kind == KIND_TC)
        tc_vlan(ctx, p);
    if (rc == PARSE_NON_IP)
        return REASON_PASS_NON_IP;
    if (rc == PARSE_NDP || rc == PARSE_ARP)
        return REASON_NEED_SLOW; /* rare: anti-spoofing and arrivals wait for the slow path */
    if (rc == PARSE_RH0)
        return REASON_DROP_INVALID;
    if (rc != PARSE_OK)
        return REASON_DROP_MALFORMED;
    if (p->frag == 2 || p->is_icmp_err)
        return REASON_NEED_SLOW;

    __u32 zero = 0;
    struct fw_config *cfg = config.lookup(&zero);
    if (!cfg)
        return REASON_DROP_MALFORMED; /* unreachable: arrays always hold index 0 */
    __u64 now = NOW();
    __u32 ifindex = ctx_ifindex(ctx, kind);
    struct session_key k = {};
    __u8 side = make_key(&k, &p->saddr, &p->daddr, p->sport, p->dport, p->proto);
    struct session_value *v = sessions.lookup(&k);
    if (!v || !is_live(cfg, v, now))
        return REASON_NEED_SLOW;
    /* The slow path takes a new connection on a closed one's ports (port reuse) and
     * any packet that could close a session (reported there): an RST, or the last
     * ACK of LAST_ACK (the only moves into TIME_WAIT or CLOSED, see tcp_state.h). */
    if (p->proto == PROTO_TCP &&
        ((p->tcp_flags & TCPF_RST) || v->state == ST_LAST_ACK ||
         ((p->tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN && is_closed(v->state))))
        return REASON_NEED_SLOW;
    __u8 sender_vm = side == SIDE_LO ? SESS_F_VM_LO : SESS_F_VM_HI;
    __u8 receiver_vm = side == SIDE_LO ? SESS_F_VM_HI : SESS_F_VM_LO;
    int d = side == v->initiator ? 0 : 1;
    if ((v->flags & sender_vm) && v->ifindex[d] != ifindex) {
        /* a VM's packet on a new interface: it may be spoofed, or the VM moved here */
        if (!source_allowed(ctx, kind, p, ifindex))
            return REASON_DROP_SPOOFED;
        note_arrival(&p->saddr, ifindex, now, ARRIVAL_IP);
    }
    if ((v->flags & receiver_vm) && banned(p, now))
        return REASON_DROP_BLACKLIST;
    if (p->proto == PROTO_TCP && !tcp_flags_valid(p->tcp_flags))
        return REASON_DROP_INVALID;
    track_session(&k, v);
    return advance_session(cfg, &k, v, p, side, 0, now, ifindex, 0);
}

/* Stage 1, the slow path: anything the fast path could not decide. */
static __always_inline __u32 slow_path(void *ctx, int kind, struct pkt *p)
{
    __u32 zero = 0;
    struct fw_config *cfg = config.lookup(&zero);
    if (!cfg)
        return REASON_DROP_MALFORMED;
    __u64 now = NOW();
    __u32 ifindex = ctx_ifindex(ctx, kind);
    int tcp = p->proto == PROTO_TCP && p->frag != 2;
    __u8 syn_only = tcp && (p->tcp_flags & (TCPF_SYN | TCPF_ACK | TCPF_RST)) == TCPF_SYN;

    if (p->arp) {
        /* ARP passes as ever; a protected sender on an interface that leads to it
         * may be a VM announcing its arrival */
        if (is_protected(&p->saddr) && source_allowed(ctx, kind, p, ifindex))
            note_arrival(&p->saddr, ifindex, now, ARRIVAL_ARP);
        return REASON_PASS_NON_IP;
    }
    if (is_ndp(p)) {
        /* link-scoped and stateless, but a protected source is checked as ever */
        if (is_protected(&p->saddr)) {
            if (!source_allowed(ctx, kind, p, ifindex))
                return REASON_DROP_SPOOFED;
            note_arrival(&p->saddr, ifindex, now, ARRIVAL_NDP);
        }
        return REASON_PASS_NDP;
    }
    int dir = direction(p);
    if (dir == DIR_TRANSIT)
        return p->ipv6 ? REASON_PASS_IPV6_UNPROTECTED : REASON_PASS_TRANSIT;
    /* anti-spoofing comes before anything that could create or change state */
    if (dir == DIR_OUTBOUND || is_protected(&p->saddr)) {
        if (!source_allowed(ctx, kind, p, ifindex))
            return REASON_DROP_SPOOFED;
        note_arrival(&p->saddr, ifindex, now, ARRIVAL_IP);
    }

    if (dir == DIR_INBOUND && banned(p, now))
        return REASON_DROP_BLACKLIST;
    if (p->frag == 2)
        return handle_fragment(cfg, p, now);
    if (p->is_icmp_err)
        return handle_icmp_error(cfg, p, now, dir);
    if (tcp && !tcp_flags_valid(p->tcp_flags))
        return REASON_DROP_INVALID; /* SYN|FIN, NULL, XMAS...: never a session's packet */
    if (tcp && (p->tcp_flags & TCPF_SYN))
        parse_syn_options(ctx_data(ctx, kind), ctx_end(ctx, kind), p); /* window scale and SACK: only SYNs carry them */

    struct session_key k = {};
    __u8 side = make_key(&k, &p->saddr, &p->daddr, p->sport, p->dport, p->proto);
    int in_unassured;
    struct session_value *v = find_session(cfg, &k, now, &in_unassured);
    if (v && syn_only && (v->state == ST_TIME_WAIT || v->state == ST_CLOSED)) {
        /* port reuse after close: a new connection, judged like any other */
        track_delete(&k, v->flags);
        if (in_unassured)
            unassured.delete(&k);
        else
            sessions.delete(&k);
        v = 0;
    }
    if (v) {
        track_session(&k, v);
        return advance_session(cfg, &k, v, p, side, in_unassured, now, ifindex, 1);
    }

    if (tcp && !syn_only) {
        /* strict: no session starts mid-flow, except for a VM just migrated here */
        struct ip_addr *vm = dir == DIR_INBOUND ? &p->daddr : &p->saddr;
        if ((p->tcp_flags & TCPF_RST) || !in_pickup_window(vm, now))
            return REASON_DROP_NO_SESSION;
        /* the initiator is unknown: assume the external end opened it when
         * inbound, the VM when outbound; no window history, so liberal */
        return open_session(&k, p, side, ST_ESTABLISHED, SESS_F_PICKED_UP | SESS_F_MIGRATED,
                            TCPD_F_LIBERAL, now, ifindex, REASON_PASS_PICKUP);
    }
    if (p->echo == ECHO_REPLY)
        return REASON_DROP_NO_SESSION; /* a reply to no request */
    if (dir == DIR_OUTBOUND) {
        /* ICMP other than echo (timestamps...) gets no session */
        if (is_icmp(p->proto) && p->echo != ECHO_REQUEST)
            return REASON_PASS_OUTBOUND;
        __u8 state = tcp ? ST_SYN_SENT : is_icmp(p->proto) ? ST_ICMP : ST_UDP_NEW;
        return open_session(&k, p, side, state, 0, 0, now, ifindex, REASON_PASS_OUTBOUND);
    }

    if (syn_only && syn_over_rate(cfg, p, now))
        return REASON_DROP_SYN_RATE;
    return REASON_NEED_ACL;
}

/* Stage 2: an inbound packet with no session; the ACL decides, and an allowed
 * flow gets a session. */
static __always_inline __u32 acl_stage(void *ctx, int kind, struct pkt *p)
{
    __u32 zero = 0;
    struct fw_config *cfg = config.lookup(&zero);
    if (!cfg)
        return REASON_DROP_MALFORMED;
    __u32 ifindex = ctx_ifindex(ctx, kind);
    __u32 r = acl_verdict(cfg, p, ifindex);
    if (r != REASON_PASS_ACL)
        return r;
    if (is_icmp(p->proto) && p->echo != ECHO_REQUEST)
        return r; /* allowed, but no session for non-echo ICMP */
    struct session_key k = {};
    __u8 side = make_key(&k, &p->saddr, &p->daddr, p->sport, p->dport, p->proto);
    __u8 state = p->proto == PROTO_TCP    ? ST_SYN_SENT
                 : is_icmp(p->proto)      ? ST_ICMP
                                          : ST_UDP_NEW;
    return open_session(&k, p, side, state, SESS_F_INBOUND, 0, NOW(), ifindex, REASON_PASS_ACL);
}

/* The entry point: parse and the fast path; the rest by tail call. */
static __always_inline int entry_main(void *ctx, int kind)
{
    struct pkt p = {};
    __u32 reason = fast_path(ctx, kind, &p);
    if (reason == REASON_NEED_SLOW) {
        next_stage(ctx, kind, &p, STAGE_SLOW, 0);
        reason = REASON_DROP_MALFORMED; /* no stage to hand over to: fail closed */
    } else if (reason >= SAMIXDP_FIRST_DROP && events_on()) {
        /* the slow stage counts and reports it: this stage emits nothing */
        next_stage(ctx, kind, &p, STAGE_SLOW, reason);
    }
    return finish(ctx, kind, &p, reason, 0);
}

static __always_inline int entry_slow(void *ctx, int kind)
{
    __u32 zero = 0;
    struct pkt *p = scratch.lookup(&zero);
    if (!p)
        return verdict_code(kind, 0); /* unreachable: arrays always hold index 0 */
    __u32 reason = p->decided;
    if (!reason)
        reason = slow_path(ctx, kind, p);
    if (reason == REASON_NEED_ACL) {
        tail_call(ctx, kind, STAGE_ACL);
        reason = REASON_DROP_ACL_DEFAULT; /* no ACL stage: nothing allows it */
    }
    return finish(ctx, kind, p, reason, 1);
}

static __always_inline int entry_acl(void *ctx, int kind)
{
    __u32 zero = 0;
    struct pkt *p = scratch.lookup(&zero);
    if (!p)
        return verdict_code(kind, 0);
    return finish(ctx, kind, p, acl_stage(ctx, kind, p), 1);
}
/* ---- bulk lookups for userspace ------------------------------------------------
 * Never attached: userspace runs them with PROG_TEST_RUN on a frame of lookup
 * slots (session_map.h) to read a delta round's sessions by key, a frame's worth
 * per syscall instead of one syscall per key. */
static __always_inline int lookup_slots(struct xdp_md *ctx, int in_unassured)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
#pragma unroll
    for (int i = 0; i < LOOKUP_SLOTS; i++) {
        struct lookup_slot *s = data + i * sizeof(struct lookup_slot);
        if ((void *)(s + 1) > end)
            break;
        struct session_key k = s->key;
        struct session_value *v = in_unassured ? unassured.lookup(&k) : sessions.lookup(&k);
        s->found = v != 0;
        if (v)
            __builtin_memcpy(&s->value, v, sizeof(*v));
    }
    return XDP_PASS;
}

int lookup_sessions(struct xdp_md *ctx)
{
    return lookup_slots(ctx, 0);
}

int lookup_unassured(struct xdp_md *ctx)
{
    return lookup_slots(ctx, 1);
}

/* ---- the programs: the XDP kind, then the TC kind ---------------------------- */

int xdp_firewall(struct xdp_md *ctx)
{
    return entry_main(ctx, KIND_XDP);
}

int xdp_slow(struct xdp_md *ctx)
{
    return entry_slow(ctx, KIND_XDP);
}

int xdp_acl(struct xdp_md *ctx)
{
    return entry_acl(ctx, KIND_XDP);
}

int tc_firewall(struct __sk_buff *ctx)
{
    return entry_main(ctx, KIND_TC);
}

int tc_slow(struct __sk_buff *ctx)
{
    return entry_slow(ctx, KIND_TC);
}

int tc_acl(struct __sk_buff *ctx)
{
    return entry_acl(ctx, KIND_TC);
}
