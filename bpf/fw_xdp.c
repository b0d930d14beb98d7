/* sami-xdp: stateful IPv4 firewall in XDP.
 *
 * parse -> direction -> blacklist -> session lookup/update -> SYN accounting
 * -> ACL -> verdict. Every verdict leaves through xdp_firewall()'s single
 * exit, which counts it per reason. Compiled by bcc; the loader passes the
 * map capacities as -D constants and pins every map. See ../shared/DESIGN.md.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>

#include "session_map.h"
#include "lib/parse.h"
#include "lib/tcp_state.h"

#ifndef MAX_SESSIONS
#define MAX_SESSIONS 1048576
#endif
#ifndef MAX_HALFOPEN
#define MAX_HALFOPEN 65536
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
 * time.monotonic_ns(). */
#define NOW() bpf_ktime_get_coarse_ns()

#define NS_PER_S 1000000000ULL
#define NS_PER_MS 1000000ULL
#define FRAG_TIMEOUT_NS (30 * NS_PER_S)

/* Established (and UDP/ICMP) sessions: a plain hash, never evicted. A full
 * table refuses new sessions instead. */
BPF_TABLE("hash", struct session_key, struct session_value, sessions, MAX_SESSIONS);
/* Half-open TCP sessions live apart, in a small LRU: a SYN flood evicts only
 * other half-open entries. */
BPF_TABLE("lru_hash", struct session_key, struct session_value, halfopen, MAX_HALFOPEN);
BPF_LPM_TRIE(protected, struct lpm_v4_key, u32, SAMIXDP_MAX_PROTECTED);
BPF_TABLE("lru_hash", struct syn_key, struct syn_value, syn_counters, MAX_SYN_COUNTERS);
BPF_TABLE("lru_hash", u32, struct blacklist_value, blacklist, MAX_BLACKLIST);
/* Compiled ACL rule sets of two generations; CFG_ACL_GEN names the live one,
 * so a whole rule set is replaced atomically. */
BPF_LPM_TRIE(acl_sets, struct acl_key, struct acl_set, 2 * SAMIXDP_ACL_MAX_SETS);
BPF_PERCPU_ARRAY(acl_hits, u64, SAMIXDP_ACL_MAX_RULE_ID);
/* Rule id -> rule as the operator wrote it; userspace compiles acl_sets from it. */
BPF_TABLE("hash", u32, struct acl_entry, acl_rules, SAMIXDP_ACL_MAX_RULE_ID);
/* VM address -> end of its migration pickup window (bpf_ktime_get_ns). */
BPF_TABLE("hash", u32, u64, pickup, SAMIXDP_MAX_PROTECTED);
BPF_TABLE("lru_hash", struct frag_key, u64, fragments, SAMIXDP_FRAG_ENTRIES);
/* [0]: settings written by userspace; [CFG_ENTRY_RUNTIME]: hints the
 * datapath writes (kept apart so a settings rewrite cannot clobber them). */
BPF_ARRAY(config, struct fw_config, 2);
BPF_ARRAY(meta, struct samixdp_meta, 1);
BPF_PERCPU_ARRAY(verdicts, struct verdict_counter, SAMIXDP_N_REASONS);

/* classify() result meaning "inbound, no session: ask the ACL" */
#define REASON_NEED_ACL 255

#define DIR_TRANSIT 0
#define DIR_INBOUND 1
#define DIR_OUTBOUND 2

/* Fills a normalised key; returns the sender's side. */
static __always_inline __u8 make_key(struct session_key *k, __u32 saddr, __u32 daddr,
                                     __u16 sport, __u16 dport, __u8 proto)
{
    __u32 s = bpf_ntohl(saddr), d = bpf_ntohl(daddr);
    __u8 side;
    if (s < d || (s == d && bpf_ntohs(sport) <= bpf_ntohs(dport)))
        side = SIDE_LO;
    else
        side = SIDE_HI;
    k->proto = proto;
    if (side == SIDE_LO) {
        k->addr_lo = saddr;
        k->addr_hi = daddr;
        k->port_lo = sport;
        k->port_hi = dport;
    } else {
        k->addr_lo = daddr;
        k->addr_hi = saddr;
        k->port_lo = dport;
        k->port_hi = sport;
    }
    if (proto == PROTO_ICMP) {
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

/* Plain (not atomic) increments: each direction of a flow is normally
 * handled by one CPU (RSS), so a lost update is rare and only costs a count;
 * a locked add on every packet costs more than the whole lookup. */
static __always_inline void count_packet(struct session_value *v, int from_init, __u32 len,
                                         __u64 now, __u32 ifindex)
{
    int d = from_init ? 0 : 1;
    v->packets[d] += 1;
    v->bytes[d] += len;
    v->last_seen_ns = now;
    v->ifindex = ifindex;
}

static __always_inline int direction(__u32 saddr, __u32 daddr)
{
    struct lpm_v4_key k = {.prefixlen = 32, .addr = daddr};
    if (protected.lookup(&k))
        return DIR_INBOUND;
    k.addr = saddr;
    if (protected.lookup(&k))
        return DIR_OUTBOUND;
    return DIR_TRANSIT;
}

/* Is `src` banned? Counts the drop. The config hint skips the lookup while
 * no ban exists, which is the common case. */
static __always_inline int banned(__u32 src, __u64 now)
{
    __u32 idx = CFG_ENTRY_RUNTIME;
    struct fw_config *rt = config.lookup(&idx);
    if (rt && !rt->slot[RT_BANS_HINT])
        return 0;
    struct blacklist_value *bv = blacklist.lookup(&src);
    if (bv && now < bv->expires_ns) {
        __sync_fetch_and_add(&bv->dropped, 1);
        return 1;
    }
    return 0;
}

/* Creates a session; TCP starts half-open. Returns a pass reason or
 * REASON_DROP_TABLE_FULL. */
static __always_inline __u32 open_session(struct session_key *k, struct pkt *p, __u8 side,
                                          __u8 state, __u8 flags, __u64 now, __u32 ifindex,
                                          __u32 pass_reason)
{
    struct session_value v = {};
    struct lpm_v4_key pk = {.prefixlen = 32, .addr = k->addr_lo};
    if (protected.lookup(&pk))
        flags |= SESS_F_VM_LO;
    pk.addr = k->addr_hi;
    if (protected.lookup(&pk))
        flags |= SESS_F_VM_HI;
    v.created_ns = now;
    v.last_seen_ns = now;
    v.packets[0] = 1;
    v.bytes[0] = p->l3_len;
    v.ifindex = ifindex;
    v.state = state;
    v.initiator = side;
    v.flags = flags;
    if (state == ST_SYN_SENT) {
        halfopen.update(k, &v);     /* LRU: never fails for lack of room */
        return pass_reason;
    }
    if (sessions.update(k, &v) != 0)
        return REASON_DROP_TABLE_FULL;
    return pass_reason;
}

/* Applies a packet to an existing session. */
static __always_inline __u32 advance_session(struct session_key *k, struct session_value *v,
                                             struct pkt *p, __u8 side, int in_halfopen,
                                             __u64 now, __u32 ifindex)
{
    int from_init = side == v->initiator;
    if (p->proto == PROTO_TCP) {
        __u8 flags = v->flags;
        __u8 next;
        next = tcp_next_state(v->state, p->tcp_flags, from_init, side, &flags);
        if (next == ST_NONE)
            return REASON_DROP_INVALID;
        v->flags = flags;
        count_packet(v, from_init, p->l3_len, now, ifindex);
        if (in_halfopen && next != ST_SYN_SENT && next != ST_SYN_RECV && next != ST_CLOSED) {
            /* handshake done: promote to the main table */
            struct session_value nv = *v;
            nv.state = next;
            if (sessions.update(k, &nv) != 0)
                return REASON_DROP_TABLE_FULL;
            halfopen.delete(k);
            return REASON_PASS_SESSION;
        }
        v->state = next;
        return REASON_PASS_SESSION;
    }
    if (p->proto == PROTO_ICMP &&
        p->icmp_type != (from_init ? ICMP_ECHO_T : ICMP_ECHOREPLY_T))
        return REASON_DROP_INVALID; /* e.g. a request from the pinged side */
    if (p->proto == PROTO_UDP && !from_init)
        v->state = ST_UDP_REPLIED;
    count_packet(v, from_init, p->l3_len, now, ifindex);
    return REASON_PASS_SESSION;
}

/* Looks a key up in both session tables; expired entries are misses. */
static __always_inline struct session_value *find_session(struct fw_config *cfg,
                                                          struct session_key *k, __u64 now,
                                                          int *in_halfopen)
{
    struct session_value *v = sessions.lookup(k);
    *in_halfopen = 0;
    if (v && is_live(cfg, v, now))
        return v;
    if (k->proto != PROTO_TCP)
        return 0;
    v = halfopen.lookup(k);
    if (v && is_live(cfg, v, now)) {
        *in_halfopen = 1;
        return v;
    }
    return 0;
}

/* Counts an inbound SYN; returns 1 when it crosses the rate (source banned). */
static __always_inline int syn_over_rate(struct fw_config *cfg, struct pkt *p, __u64 now)
{
    struct syn_key sk = {.src = p->saddr, .dst = p->daddr};
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
    blacklist.update(&p->saddr, &bv);
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
    struct acl_key k = {.prefixlen = 64, .gen = cfg->slot[CFG_ACL_GEN] & 1, .addr = p->daddr};
    struct acl_set *set = acl_sets.lookup(&k);
    if (!set)
        return REASON_DROP_ACL_DEFAULT;
    __u32 n = set->n_rules;
    if (n > SAMIXDP_ACL_MAX_RULES_PER_SET)
        n = SAMIXDP_ACL_MAX_RULES_PER_SET;
    __u32 dport = bpf_ntohs(p->dport);
    __u32 has_ports = p->proto == PROTO_TCP || p->proto == PROTO_UDP;
    __u32 proto = p->proto, saddr = p->saddr, vlan = p->vlan;
    struct acl_rule *hit = 0;
    for (__u32 i = 0; i < n; i++) {
        struct acl_rule *r = &set->rules[i];
        if (r->proto != ACL_PROTO_ANY && r->proto != proto)
            continue;
        if ((saddr & r->src_mask) != r->src_addr)
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
static __always_inline int in_pickup_window(__u32 vm, __u64 now)
{
    u64 *deadline = pickup.lookup(&vm);
    return deadline && now < *deadline;
}

static __always_inline __u32 handle_icmp_error(struct fw_config *cfg, struct pkt *p, __u64 now,
                                               int dir)
{
    struct session_key k = {};
    int in_halfopen;
    /* an error is about a packet its receiver sent (as conntrack requires) */
    int addressed = dir == DIR_OUTBOUND || p->daddr == p->in_saddr;
    make_key(&k, p->in_saddr, p->in_daddr, p->in_sport, p->in_dport, p->in_proto);
    if (addressed && find_session(cfg, &k, now, &in_halfopen))
        return REASON_PASS_RELATED;
    /* unrelated errors: a VM may send them, nobody may send them to a VM */
    return dir == DIR_OUTBOUND ? REASON_PASS_OUTBOUND : REASON_DROP_NO_SESSION;
}

static __always_inline __u32 handle_fragment(struct fw_config *cfg, struct pkt *p, __u64 now)
{
    __u64 policy = cfg->slot[CFG_FRAG_POLICY];
    if (policy == 1)
        return REASON_PASS_FRAGMENT;
    if (policy == 2)
        return REASON_DROP_FRAGMENT;
    struct frag_key fk = {.src = p->saddr, .dst = p->daddr, .id = p->ip_id, .proto = p->proto};
    u64 *first_seen = fragments.lookup(&fk);
    /* like the kernel's reassembly timeout: followers come within 30 s */
    if (first_seen && now - *first_seen < FRAG_TIMEOUT_NS)
        return REASON_PASS_FRAGMENT;
    return REASON_DROP_FRAGMENT;
}

static __always_inline __u32 classify(struct xdp_md *ctx, struct pkt *p)
{
    int rc = parse_packet(ctx, p);
    if (rc == PARSE_NON_IP)
        return REASON_PASS_NON_IP;
    if (rc != PARSE_OK)
        return REASON_DROP_MALFORMED;

    __u32 zero = 0;
    struct fw_config *cfg = config.lookup(&zero);
    if (!cfg)
        return REASON_DROP_MALFORMED; /* unreachable: arrays always hold index 0 */
    __u64 now = NOW();
    __u32 ifindex = ctx->ingress_ifindex;
    struct session_key k = {};
    __u8 side = make_key(&k, p->saddr, p->daddr, p->sport, p->dport, p->proto);
    __u8 syn_only = p->proto == PROTO_TCP &&
                    (p->tcp_flags & (TCPF_SYN | TCPF_ACK | TCPF_RST)) == TCPF_SYN;

    /* Fast path: a live established session. Its flags say which ends are
     * protected, so no prefix lookup is needed; packets towards a VM still
     * meet the blacklist first. */
    if (p->frag != 2 && !p->is_icmp_err) {
        struct session_value *v = sessions.lookup(&k);
        if (v && is_live(cfg, v, now) &&
            !(syn_only && (v->state == ST_TIME_WAIT || v->state == ST_CLOSED))) {
            if ((v->flags & (side == SIDE_LO ? SESS_F_VM_HI : SESS_F_VM_LO)) &&
                banned(p->saddr, now))
                return REASON_DROP_BLACKLIST;
            return advance_session(&k, v, p, side, 0, now, ifindex);
        }
    }

    int dir = direction(p->saddr, p->daddr);
    if (dir == DIR_TRANSIT)
        return REASON_PASS_TRANSIT;

    if (dir == DIR_INBOUND && banned(p->saddr, now))
        return REASON_DROP_BLACKLIST;
    if (p->frag == 2)
        return handle_fragment(cfg, p, now);
    if (p->is_icmp_err)
        return handle_icmp_error(cfg, p, now, dir);

    int in_halfopen;
    struct session_value *v = find_session(cfg, &k, now, &in_halfopen);
    if (v && syn_only && (v->state == ST_TIME_WAIT || v->state == ST_CLOSED)) {
        /* port reuse after close: a new connection, judged like any other */
        if (in_halfopen)
            halfopen.delete(&k);
        else
            sessions.delete(&k);
        v = 0;
    }
    if (v)
        return advance_session(&k, v, p, side, in_halfopen, now, ifindex);

    if (p->proto == PROTO_TCP && !syn_only) {
        /* strict: no session starts mid-flow, except for a VM just migrated here */
        __u32 vm = dir == DIR_INBOUND ? p->daddr : p->saddr;
        if ((p->tcp_flags & TCPF_RST) || !in_pickup_window(vm, now))
            return REASON_DROP_NO_SESSION;
        /* the initiator is unknown: assume the external end opened it when
         * inbound, the VM when outbound; counters stay per direction. */
        return open_session(&k, p, side, ST_ESTABLISHED, SESS_F_PICKED_UP | SESS_F_MIGRATED,
                            now, ifindex, REASON_PASS_PICKUP);
    }
    if (dir == DIR_OUTBOUND) {
        __u8 state = p->proto == PROTO_TCP    ? ST_SYN_SENT
                     : p->proto == PROTO_ICMP ? ST_ICMP
                                                : ST_UDP_NEW;
        /* ICMP other than echo (replies, timestamps...) gets no session */
        if (p->proto == PROTO_ICMP && p->icmp_type != ICMP_ECHO_T)
            return REASON_PASS_OUTBOUND;
        return open_session(&k, p, side, state, 0, now, ifindex, REASON_PASS_OUTBOUND);
    }

    if (syn_only && syn_over_rate(cfg, p, now))
        return REASON_DROP_SYN_RATE;
    return REASON_NEED_ACL;
}

/* Inbound packet with no session: the ACL decides, and an allowed flow gets a
 * session. Kept out of classify() so the verifier enters the rule loop from
 * few distinct states. */
static __always_inline __u32 acl_stage(struct xdp_md *ctx, struct pkt *p)
{
    __u32 zero = 0;
    struct fw_config *cfg = config.lookup(&zero);
    if (!cfg)
        return REASON_DROP_MALFORMED;
    __u32 ifindex = ctx->ingress_ifindex;
    __u32 r = acl_verdict(cfg, p, ifindex);
    if (r != REASON_PASS_ACL)
        return r;
    if (p->proto == PROTO_ICMP && p->icmp_type != ICMP_ECHO_T)
        return r; /* allowed, but no session for non-echo ICMP */
    struct session_key k = {};
    __u8 side = make_key(&k, p->saddr, p->daddr, p->sport, p->dport, p->proto);
    __u8 state = p->proto == PROTO_TCP    ? ST_SYN_SENT
                 : p->proto == PROTO_ICMP ? ST_ICMP
                                            : ST_UDP_NEW;
    return open_session(&k, p, side, state, SESS_F_INBOUND, NOW(), ifindex,
                        REASON_PASS_ACL);
}

int xdp_firewall(struct xdp_md *ctx)
{
    struct pkt p = {};
    __u32 reason = classify(ctx, &p);
    if (reason == REASON_NEED_ACL)
        reason = acl_stage(ctx, &p);

    if (p.frag == 1 && reason < SAMIXDP_FIRST_DROP && reason != REASON_PASS_TRANSIT) {
        /* remember an accepted first fragment so its followers may pass */
        struct frag_key fk = {.src = p.saddr, .dst = p.daddr, .id = p.ip_id, .proto = p.proto};
        u64 ts = NOW();
        fragments.update(&fk, &ts);
    }
    struct verdict_counter *c = verdicts.lookup(&reason);
    if (c) {
        c->packets += 1;
        c->bytes += (__u64)(ctx->data_end - ctx->data);
    }
    return reason < SAMIXDP_FIRST_DROP ? XDP_PASS : XDP_DROP;
}
