/* The TCP state machine, conntrack-like but without sequence tracking.
 * Returns the next state, or ST_NONE for a packet that is not valid in the
 * current state (the caller drops it as REASON_DROP_INVALID). */
#ifndef SAMIXDP_TCP_STATE_H
#define SAMIXDP_TCP_STATE_H

#include "../session_map.h" /* ST_*, SIDE_*, SESS_F_FIN_* */
#include "parse.h"          /* TCPF_* */

/* `from_init`: the sender opened the session. `side`: SIDE_LO/HI of the
 * sender in the normalised key. Updates FIN bits in *flags. */
static __always_inline __u8 tcp_next_state(__u8 state, __u8 tcp_flags, int from_init,
                                           __u8 side, __u8 *flags)
{
    __u8 syn = tcp_flags & TCPF_SYN, ack = tcp_flags & TCPF_ACK;
    __u8 my_fin = side == SIDE_LO ? SESS_F_FIN_LO : SESS_F_FIN_HI;
    __u8 peer_fin = side == SIDE_LO ? SESS_F_FIN_HI : SESS_F_FIN_LO;

    if (tcp_flags & TCPF_RST)
        return ST_CLOSED;

    switch (state) {
    case ST_SYN_SENT:
        if (from_init)
            return (syn && !ack) ? ST_SYN_SENT : ST_NONE;
        return (syn && ack) ? ST_SYN_RECV : ST_NONE;
    case ST_SYN_RECV:
        if (syn)
            return ST_SYN_RECV; /* retransmitted SYN or SYN/ACK */
        if (from_init && ack) {
            if (tcp_flags & TCPF_FIN) {
                *flags |= my_fin;
                return ST_FIN_WAIT;
            }
            return ST_ESTABLISHED;
        }
        return ST_NONE;
    case ST_ESTABLISHED:
        if (tcp_flags & TCPF_FIN) {
            *flags |= my_fin;
            return ST_FIN_WAIT;
        }
        return ST_ESTABLISHED;
    case ST_FIN_WAIT:
    case ST_CLOSE_WAIT:
        if (tcp_flags & TCPF_FIN) {
            *flags |= my_fin;
            return (*flags & peer_fin) ? ST_TIME_WAIT : state;
        }
        /* the side that has not closed yet keeps talking: half-close */
        if (!(*flags & my_fin))
            return ST_CLOSE_WAIT;
        return state;
    case ST_TIME_WAIT:
    case ST_CLOSED:
        return state; /* a new SYN is handled by the caller as a reopen */
    }
    return ST_NONE;
}

#endif
