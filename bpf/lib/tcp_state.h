/* TCP tracking with conntrack's semantics: its state machine (including
 * simultaneous open) and its window check (tcp_in_window: per-direction
 * sequence and ACK edges, window scaling), so out-of-window segments and
 * blind RSTs change nothing. Written from the conntrack documentation and
 * behaviour; differences are listed in the README. */
#ifndef SAMIXDP_TCP_STATE_H
#define SAMIXDP_TCP_STATE_H

#include "../session_map.h" /* ST_*, TCPD_F_*, struct session_value */
#include "parse.h"          /* TCPF_*, struct pkt */

/* ---- the state machine ---------------------------------------------------- */

#define TS_IG 14 /* ignore: the packet passes, the state does not change */
#define TS_IV 15 /* invalid: the packet is dropped */

/* A row of transitions for one (direction, packet kind): the next state for
 * each current state, packed as 4-bit nibbles indexed by ST_* (conntrack's
 * table, columns in its order). States not listed are invalid. */
#define TS_NIB(state, next) ((__u64)(next) << (4 * (state)))
#define TS_ROW(no, ss, sr, es, fw, cw, la, tw, cl, s2)                                       \
    (~(TS_NIB(ST_NONE, 15) | TS_NIB(ST_SYN_SENT, 15) | TS_NIB(ST_SYN_RECV, 15) |          \
       TS_NIB(ST_ESTABLISHED, 15) | TS_NIB(ST_FIN_WAIT, 15) | TS_NIB(ST_CLOSE_WAIT, 15) |   \
       TS_NIB(ST_LAST_ACK, 15) | TS_NIB(ST_TIME_WAIT, 15) | TS_NIB(ST_CLOSED, 15) |         \
       TS_NIB(ST_SYN_SENT2, 15)) |                                                        \
     TS_NIB(ST_NONE, no) | TS_NIB(ST_SYN_SENT, ss) | TS_NIB(ST_SYN_RECV, sr) |             \
     TS_NIB(ST_ESTABLISHED, es) | TS_NIB(ST_FIN_WAIT, fw) | TS_NIB(ST_CLOSE_WAIT, cw) |      \
     TS_NIB(ST_LAST_ACK, la) | TS_NIB(ST_TIME_WAIT, tw) | TS_NIB(ST_CLOSED, cl) |            \
     TS_NIB(ST_SYN_SENT2, s2))

#define sNO ST_NONE
#define sSS ST_SYN_SENT
#define sSR ST_SYN_RECV
#define sES ST_ESTABLISHED
#define sFW ST_FIN_WAIT
#define sCW ST_CLOSE_WAIT
#define sLA ST_LAST_ACK
#define sTW ST_TIME_WAIT
#define sCL ST_CLOSED
#define sS2 ST_SYN_SENT2
#define sIG TS_IG
#define sIV TS_IV

/* from the initiator:    sNO  sSS  sSR  sES  sFW  sCW  sLA  sTW  sCL  sS2 */
#define TS_ORIG_SYN    TS_ROW(sSS, sSS, sIG, sIG, sIG, sIG, sIG, sSS, sSS, sS2)
#define TS_ORIG_SYNACK TS_ROW(sIV, sIV, sSR, sIV, sIV, sIV, sIV, sIV, sIV, sSR)
#define TS_ORIG_FIN    TS_ROW(sIV, sIV, sFW, sFW, sLA, sLA, sLA, sTW, sCL, sIV)
#define TS_ORIG_ACK    TS_ROW(sES, sIV, sES, sES, sCW, sCW, sTW, sTW, sCL, sIV)
/* from the responder:    sNO  sSS  sSR  sES  sFW  sCW  sLA  sTW  sCL  sS2 */
#define TS_REPLY_SYN    TS_ROW(sIV, sS2, sIV, sIV, sIV, sIV, sIV, sSS, sIV, sS2)
#define TS_REPLY_SYNACK TS_ROW(sIV, sSR, sIG, sIG, sIG, sIG, sIG, sIG, sIG, sSR)
#define TS_REPLY_FIN    TS_ROW(sIV, sIV, sFW, sFW, sLA, sLA, sLA, sTW, sCL, sIV)
#define TS_REPLY_ACK    TS_ROW(sIV, sIG, sSR, sES, sCW, sCW, sTW, sTW, sCL, sIG)
/* an RST, either way */
#define TS_RST          TS_ROW(sIV, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL)

/* Flag combinations conntrack accepts (PSH, ECE and CWR do not matter), as a
 * bitmap indexed by the FIN|SYN|RST|ACK|URG bits. SYN|FIN, NULL and XMAS are
 * not among them. */
#define TCPF_CHECKED (TCPF_FIN | TCPF_SYN | TCPF_RST | TCPF_ACK | TCPF_URG)
#define TCP_VALID_FLAGS                                                                   \
    ((1ULL << TCPF_SYN) | (1ULL << (TCPF_SYN | TCPF_URG)) | (1ULL << (TCPF_SYN | TCPF_ACK)) | \
     (1ULL << TCPF_RST) | (1ULL << (TCPF_RST | TCPF_ACK)) | (1ULL << (TCPF_FIN | TCPF_ACK)) | \
     (1ULL << (TCPF_FIN | TCPF_ACK | TCPF_URG)) | (1ULL << TCPF_ACK) |                     \
     (1ULL << (TCPF_ACK | TCPF_URG)))

static __always_inline int tcp_flags_valid(__u8 flags)
{
    return (TCP_VALID_FLAGS >> (flags & TCPF_CHECKED)) & 1;
}

/* The next state for a packet with `flags` from the initiator (from_init) or
 * the responder, or TS_IG / TS_IV. */
static __always_inline __u8 tcp_transition(__u8 state, __u8 flags, int from_init)
{
    __u64 row;
    if (flags & TCPF_RST)
        row = TS_RST;
    else if (flags & TCPF_SYN)
        row = (flags & TCPF_ACK) ? (from_init ? TS_ORIG_SYNACK : TS_REPLY_SYNACK)
                                 : (from_init ? TS_ORIG_SYN : TS_REPLY_SYN);
    else if (flags & TCPF_FIN)
        row = from_init ? TS_ORIG_FIN : TS_REPLY_FIN;
    else if (flags & TCPF_ACK)
        row = from_init ? TS_ORIG_ACK : TS_REPLY_ACK;
    else
        return TS_IV;
    return (row >> (4 * (state & 15))) & 15;
}

/* ---- the window ------------------------------------------------------------ */

#define TW_ACCEPT 0  /* in window: state and edges advance */
#define TW_IGNORE 1  /* passes, changes nothing (old retransmission, late ACK) */
#define TW_INVALID 2 /* dropped: data or ACK beyond what the peer allowed */

static __always_inline int seq_before(__u32 a, __u32 b)
{
    return (__s32)(a - b) < 0;
}
#define seq_after(a, b) seq_before(b, a)

/* A direction's SYN (or SYN/ACK) sets its edges and options. */
static __always_inline void tcp_dir_from_syn(struct tcp_dir *d, struct pkt *p, __u32 end)
{
    d->end = end;
    d->maxend = end;
    d->maxwin = p->win ? p->win : 1;
    d->scale = p->wscale == NO_WSCALE ? 0 : p->wscale;
    d->flags = (d->flags & TCPD_F_LIBERAL) | (p->wscale != NO_WSCALE ? TCPD_F_WSCALE : 0) |
               (p->sack_perm ? TCPD_F_SACK_PERM : 0);
}

/* conntrack's tcp_in_window, for the sender `snd` (direction d of the session)
 * and the other end `rcv`. SACK blocks are not read: the ACK bounds stand in
 * for them (stricter by at most the SACKed range). */
static __always_inline int tcp_in_window(struct tcp_dir *snd, struct tcp_dir *rcv, struct pkt *p,
                                         __u8 state, int from_init, int liberal)
{
    __u8 f = p->tcp_flags;
    __u32 seq = p->seq, ack = p->ack_seq, win = p->win;
    __u32 end = seq + p->seg_len + ((f & TCPF_SYN) ? 1 : 0) + ((f & TCPF_FIN) ? 1 : 0);

    if (snd->maxwin == 0) {
        if (f & TCPF_SYN) {
            tcp_dir_from_syn(snd, p, end);
            /* RFC 7323: scaling only when both ends offered it */
            if (!from_init && !((snd->flags & rcv->flags) & TCPD_F_WSCALE))
                snd->scale = rcv->scale = 0;
            if (!(f & TCPF_ACK))
                return TW_ACCEPT; /* simultaneous open */
        } else {
            /* A direction whose history we lack (a migrated or picked-up
             * session): anchor it on its first packet, keeping the scale the
             * bundle carried. An RST anchors nothing, but for the answer to
             * a SYN (a refused connection). */
            if ((f & TCPF_RST) && state != ST_SYN_SENT)
                return TW_IGNORE;
            __u32 swin = win << (snd->scale & 15);
            snd->end = end;
            snd->maxwin = swin ? swin : 1;
            snd->maxend = end + snd->maxwin;
            if (rcv->maxwin == 0) {
                rcv->end = ack;
                rcv->maxend = ack;
            } else if (ack == rcv->end + 1) {
                rcv->end++; /* likely a keepalive's answer */
            }
        }
    } else if ((f & TCPF_SYN) && seq_after(end, snd->end) &&
               (state == ST_SYN_SENT || state == ST_SYN_RECV)) {
        /* a reinitialised SYN (RFC 793): new edges, maybe new options */
        tcp_dir_from_syn(snd, p, end);
        if (!from_init && !((snd->flags & rcv->flags) & TCPD_F_WSCALE))
            snd->scale = rcv->scale = 0;
        if (!from_init && !(f & TCPF_ACK))
            return TW_ACCEPT;
    }

    if (!(f & TCPF_ACK) || ((f & TCPF_RST) && ack == 0))
        ack = rcv->end; /* no ACK (or a broken stack's RST|ACK 0): nothing to check */
    if ((f & TCPF_RST) && seq == 0 && state == ST_SYN_SENT) {
        seq = snd->end; /* an RST answering a SYN */
        end = snd->end;
    }
    if (liberal)
        return TW_ACCEPT;

    __u32 maxackwin = snd->maxwin > TCP_MAXACKWIN_MIN ? snd->maxwin : TCP_MAXACKWIN_MIN;
    if (!seq_before(seq, snd->maxend + 1)) {
        /* beyond the receiver's window: only a small overshoot of a sender
         * the receiver keeps acking is tolerated (and remembered) */
        __u32 overshot = end - snd->maxend + 1;
        if (rcv->maxwin && seq_after(end, snd->end - rcv->maxwin - 1) &&
            seq_after(ack, rcv->end - maxackwin - 1) && overshot <= rcv->maxwin &&
            seq_before(ack, rcv->end + 1)) {
            snd->end = end;
            return TW_IGNORE;
        }
        return TW_INVALID;
    }
    if (!seq_before(ack, rcv->end + 1))
        return TW_INVALID; /* acknowledges data the peer never sent */
    if (rcv->maxwin && !seq_after(end, snd->end - rcv->maxwin - 1))
        return TW_IGNORE; /* retransmission of data already acknowledged */
    if (!seq_after(ack, rcv->end - maxackwin - 1))
        return TW_IGNORE; /* an overly delayed ACK */

    if (!(f & TCPF_SYN))
        win <<= (snd->scale & 15);
    if (snd->maxwin < win)
        snd->maxwin = win;
    if (seq_after(end, snd->end))
        snd->end = end;
    if (f & TCPF_ACK) {
        if (!(snd->flags & TCPD_F_MAXACK_SET)) {
            snd->maxack = ack;
            snd->flags |= TCPD_F_MAXACK_SET;
        } else if (seq_after(ack, snd->maxack)) {
            snd->maxack = ack;
        }
    }
    if (rcv->maxwin && seq_after(end, snd->maxend))
        rcv->maxwin += end - snd->maxend;
    if (seq_after(ack + win, rcv->maxend - 1)) {
        rcv->maxend = ack + win;
        if (win == 0)
            rcv->maxend++;
    }
    return TW_ACCEPT;
}

/* One TCP packet of a session: the verdict of the tracker (TW_*) and, when
 * accepted, the next state in *next. Window data is updated in place; the
 * caller writes *next and the counters. */
static __always_inline int tcp_track(struct session_value *v, struct pkt *p, int from_init,
                                     int liberal_cfg, __u8 *next)
{
    int d = from_init ? 0 : 1;
    struct tcp_dir *snd = &v->tcp[d];
    struct tcp_dir *rcv = &v->tcp[d ^ 1];
    __u8 old = v->state;
    __u8 new = tcp_transition(old, p->tcp_flags, from_init);
    int exact_rst = 1;

    if (new == TS_IV)
        return TW_INVALID;
    if (new == TS_IG)
        return TW_IGNORE;
    if (new == ST_SYN_SENT2)
        v->flags |= SESS_F_SIMOPEN;
    if (new == ST_SYN_RECV && !from_init && !(p->tcp_flags & (TCPF_SYN | TCPF_FIN)) &&
        (v->flags & SESS_F_SIMOPEN))
        new = ST_ESTABLISHED; /* simultaneous open: either end's ACK completes it */
    if (p->tcp_flags & TCPF_RST) {
        /* RFC 5961: only an RST at exactly the next expected sequence closes an
         * established connection; an in-window one leaves it to the endpoint's
         * challenge ACK, one behind what the peer acknowledged is invalid */
        if (rcv->flags & TCPD_F_MAXACK_SET) {
            if (seq_before(p->seq, rcv->maxack))
                return TW_INVALID;
            exact_rst = p->seq == rcv->maxack || p->seq == snd->end;
        }
    }
    int liberal = liberal_cfg || ((snd->flags | rcv->flags) & TCPD_F_LIBERAL);
    int w = tcp_in_window(snd, rcv, p, old, from_init, liberal);
    if (w != TW_ACCEPT)
        return w;
    if (new == ST_CLOSED && !exact_rst && old == ST_ESTABLISHED)
        new = old;
    if (new == ST_FIN_WAIT && old != ST_FIN_WAIT)
        snd->flags |= TCPD_F_CLOSE_INIT;
    *next = new;
    return TW_ACCEPT;
}

#endif
