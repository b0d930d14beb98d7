/* Packet parsing: Ethernet, up to two VLAN tags, IPv4 or IPv6 (extension
 * headers walked with a fixed bound), TCP/UDP/ICMP/ICMPv6. Every read is
 * preceded by a bounds check against data_end. */
#ifndef SAMIXDP_PARSE_H
#define SAMIXDP_PARSE_H

#include "../session_map.h" /* PROTO_* */
#include "addr.h"

#define ETH_P_8021Q_BE 0x0081   /* htons(0x8100) */
#define ETH_P_8021AD_BE 0xA888  /* htons(0x88a8) */
#define ETH_P_IP_BE 0x0008      /* htons(0x0800) */
#define ETH_P_IPV6_BE 0xDD86    /* htons(0x86dd) */
#define ETH_P_ARP_BE 0x0608     /* htons(0x0806) */
#define IP_MF 0x2000
#define IP_OFFSET 0x1FFF
#define TCPF_FIN 0x01
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_PSH 0x08
#define TCPF_ACK 0x10
#define TCPF_URG 0x20
#define TCPOPT_EOL 0
#define TCPOPT_NOP 1
#define TCPOPT_WSCALE 3
#define TCPOPT_SACK_PERM 4
#define TCP_OPTS_MAX 40         /* bytes of options a TCP header can hold */

/* ICMP types we reason about */
#define ICMP_ECHOREPLY_T 0
#define ICMP_DEST_UNREACH_T 3
#define ICMP_SOURCE_QUENCH_T 4
#define ICMP_ECHO_T 8
#define ICMP_TIME_EXCEEDED_T 11
#define ICMP_PARAMETERPROB_T 12

/* ICMPv6 types we reason about (RFC 4443, 4861, 2710/3810) */
#define ICMPV6_DEST_UNREACH_T 1
#define ICMPV6_PKT_TOOBIG_T 2
#define ICMPV6_TIME_EXCEED_T 3
#define ICMPV6_PARAMPROB_T 4
#define ICMPV6_ECHO_REQUEST_T 128
#define ICMPV6_ECHO_REPLY_T 129
#define ICMPV6_MLD_QUERY_T 130
#define ICMPV6_MLD_REPORT_T 131
#define ICMPV6_MLD_DONE_T 132
#define ICMPV6_ROUTER_SOLICIT_T 133
#define ICMPV6_REDIRECT_T 137
#define ICMPV6_MLD2_REPORT_T 143

/* IPv6 extension headers (IANA protocol numbers) */
#define NH_HOPOPTS 0
#define NH_ROUTING 43
#define NH_FRAGMENT 44
#define NH_AH 51
#define NH_DSTOPTS 60
#define IPV6_MAX_EXT_HDRS 6     /* more than this many extension headers: dropped */
#define IPV6_FRAG_OFFSET 0xFFF8
#define IPV6_FRAG_MF 0x0001
#define NDP_HOP_LIMIT 255       /* RFC 4861: a neighbour discovery message never crossed a router */
#define MLD_HOP_LIMIT 1

#define PARSE_OK 0
#define PARSE_NON_IP 1
#define PARSE_MALFORMED 2
#define PARSE_NDP 3             /* neighbour discovery or MLD, valid (hop limit as required) */
#define PARSE_RH0 4             /* IPv6 routing header type 0 (RFC 5095: deprecated, dropped) */
#define PARSE_ARP 5             /* Ethernet/IPv4 ARP: p->saddr/daddr = sender/target address */

struct vlan_hdr_s {
    __be16 tci;
    __be16 proto;
};


/* The SYN options the window tracker needs: window scale and SACK-permitted.
 * Unrolled over the 40 possible option bytes with constant offsets only (a
 * loop with a moving pointer costs the verifier far more); `next` is where the
 * next option starts, a malformed list ends the walk. */
static __always_inline void parse_syn_options(void *data, void *data_end, struct pkt *p)
{
    __u32 len = p->opt_len;
    __u8 *opt = data + (p->opt_off & 0x3fff); /* the headers before the options fit in 16 KiB */
    __u32 next = 0;
#pragma unroll
    for (__u32 j = 0; j < TCP_OPTS_MAX; j++) {
        if (j == next && j < len) {
            if ((void *)(opt + j + 1) > data_end)
                return;
            __u8 kind = opt[j];
            if (kind == TCPOPT_EOL)
                return;
            if (kind == TCPOPT_NOP) {
                next = j + 1;
            } else {
                if ((void *)(opt + j + 2) > data_end)
                    return;
                __u8 size = opt[j + 1];
                if (size < 2 || j + size > len)
                    return;
                if (kind == TCPOPT_WSCALE && size == 3) {
                    if ((void *)(opt + j + 3) > data_end)
                        return;
                    __u8 ws = opt[j + 2];
                    p->wscale = ws > TCP_MAX_WSCALE ? TCP_MAX_WSCALE : ws;
                } else if (kind == TCPOPT_SACK_PERM && size == 2) {
                    p->sack_perm = 1;
                }
                next = j + size;
            }
        }
    }
}

static __always_inline int is_icmp_error(__u8 type)
{
    return type == ICMP_DEST_UNREACH_T || type == ICMP_TIME_EXCEEDED_T ||
           type == ICMP_PARAMETERPROB_T || type == ICMP_SOURCE_QUENCH_T;
}

static __always_inline int is_icmp6_error(__u8 type)
{
    return type >= ICMPV6_DEST_UNREACH_T && type <= ICMPV6_PARAMPROB_T;
}

/* Mapped addresses are how this program keys IPv4; one arriving inside an
 * IPv6 header (RFC 4291 forbids it on the wire) could reach IPv4 state. */
static __always_inline int addr_is_v4_mapped(struct in6_addr *v6)
{
    return v6->in6_u.u6_addr32[0] == 0 && v6->in6_u.u6_addr32[1] == 0 &&
           v6->in6_u.u6_addr32[2] == bpf_htonl(0xffff);
}

/* The ports (or echo identifier) of a quoted transport header. */
static __always_inline void quote_ports(struct pkt *p, __u8 *l4, __u8 proto)
{
    if (proto == PROTO_TCP || proto == PROTO_UDP) {
        p->in_sport = *(__u16 *)l4;
        p->in_dport = *(__u16 *)(l4 + 2);
    } else if (proto == PROTO_ICMP || proto == PROTO_ICMPV6) {
        /* a quoted echo request: its identifier is the session's port */
        p->in_sport = *(__u16 *)(l4 + 4);
        p->in_dport = 0;
    } else {
        p->in_sport = 0;
        p->in_dport = 0;
    }
    p->in_proto = proto;
    p->is_icmp_err = 1;
}

/* Parses the IPv4 header and ports quoted inside an ICMP error. */
static __always_inline int parse_icmp_quote(struct pkt *p, void *inner, void *data_end,
                                            __u32 room)
{
    struct iphdr *iph = inner;
    if ((void *)(iph + 1) > data_end)
        return PARSE_MALFORMED;
    if (iph->version != 4 || iph->ihl < 5)
        return PARSE_MALFORMED;
    if (iph->ihl * 4 + 8 > room)
        return PARSE_MALFORMED; /* the quote must lie inside the ICMP payload */
    __u8 *l4 = (__u8 *)iph + (iph->ihl * 4);
    if ((void *)(l4 + 8) > data_end)
        return PARSE_MALFORMED;
    addr_from_v4(&p->in_saddr, iph->saddr);
    addr_from_v4(&p->in_daddr, iph->daddr);
    quote_ports(p, l4, iph->protocol);
    return PARSE_OK;
}

/* The IPv6 header and ports quoted inside an ICMPv6 error. A quote whose
 * transport header sits behind extension headers is read as protocol-only
 * (ports 0): it relates to no TCP/UDP session and is dropped. */
static __always_inline int parse_icmp6_quote(struct pkt *p, void *inner, void *data_end,
                                             __u32 room)
{
    struct ipv6hdr *ip6 = inner;
    if ((void *)(ip6 + 1) > data_end)
        return PARSE_MALFORMED;
    if (ip6->version != 6 || sizeof(*ip6) + 8 > room)
        return PARSE_MALFORMED;
    __u8 *l4 = (__u8 *)(ip6 + 1);
    if ((void *)(l4 + 8) > data_end)
        return PARSE_MALFORMED;
    addr_from_v6(&p->in_saddr, &ip6->saddr);
    addr_from_v6(&p->in_daddr, &ip6->daddr);
    quote_ports(p, l4, ip6->nexthdr);
    return PARSE_OK;
}

/* The transport header at `l4` with `l4_len` bytes of L3 payload. */
static __always_inline int parse_l4(struct pkt *p, __u8 *l4, __u32 l4_len, void *data,
                                    void *data_end, __u8 hop_limit)
{
    if ((p->proto == PROTO_UDP || p->proto == PROTO_ICMP || p->proto == PROTO_ICMPV6) &&
        l4_len < 8)
        return PARSE_MALFORMED; /* the header would come from padding */
    if (p->proto == PROTO_TCP) {
        struct tcphdr *th = (void *)l4;
        if ((void *)(th + 1) > data_end)
            return PARSE_MALFORMED;
        if (th->doff < 5 || th->doff * 4 > l4_len)
            return PARSE_MALFORMED;
        p->sport = th->source;
        p->dport = th->dest;
        p->tcp_flags = ((__u8 *)th)[13];
        p->seq = bpf_ntohl(th->seq);
        p->ack_seq = bpf_ntohl(th->ack_seq);
        p->win = bpf_ntohs(th->window);
        p->seg_len = l4_len - th->doff * 4;
        p->l4_hdr_len += th->doff * 4;
        p->wscale = NO_WSCALE;
        p->opt_off = (__u8 *)(th + 1) - (__u8 *)data; /* read by the slow path for SYNs */
        p->opt_len = th->doff * 4 - sizeof(*th);
    } else if (p->proto == PROTO_UDP) {
        struct udphdr *uh = (void *)l4;
        if ((void *)(uh + 1) > data_end)
            return PARSE_MALFORMED;
        p->sport = uh->source;
        p->dport = uh->dest;
        p->l4_hdr_len += sizeof(*uh);
    } else if (p->proto == PROTO_ICMP) {
        struct icmphdr *ih = (void *)l4;
        if ((void *)(ih + 1) > data_end)
            return PARSE_MALFORMED;
        p->icmp_type = ih->type;
        p->l4_hdr_len += sizeof(*ih);
        if (ih->type == ICMP_ECHO_T || ih->type == ICMP_ECHOREPLY_T) {
            p->echo = ih->type == ICMP_ECHO_T ? ECHO_REQUEST : ECHO_REPLY;
            p->sport = ih->un.echo.id;
            p->dport = 0;
        } else if (is_icmp_error(ih->type)) {
            return parse_icmp_quote(p, ih + 1, data_end, l4_len - 8);
        }
    } else if (p->proto == PROTO_ICMPV6) {
        __u8 *ih = l4;
        if ((void *)(ih + 8) > data_end)
            return PARSE_MALFORMED;
        __u8 type = ih[0];
        p->icmp_type = type;
        p->l4_hdr_len += 8;
        if (type == ICMPV6_ECHO_REQUEST_T || type == ICMPV6_ECHO_REPLY_T) {
            p->echo = type == ICMPV6_ECHO_REQUEST_T ? ECHO_REQUEST : ECHO_REPLY;
            p->sport = *(__u16 *)(ih + 4);
            p->dport = 0;
        } else if (is_icmp6_error(type)) {
            return parse_icmp6_quote(p, ih + 8, data_end, l4_len - 8);
        } else if (type >= ICMPV6_ROUTER_SOLICIT_T && type <= ICMPV6_REDIRECT_T) {
            /* off-link forgeries cannot keep the hop limit at 255 */
            return hop_limit == NDP_HOP_LIMIT ? PARSE_NDP : PARSE_MALFORMED;
        } else if ((type >= ICMPV6_MLD_QUERY_T && type <= ICMPV6_MLD_DONE_T) ||
                   type == ICMPV6_MLD2_REPORT_T) {
            return hop_limit == MLD_HOP_LIMIT ? PARSE_NDP : PARSE_MALFORMED;
        }
    }
    /* other IP protocols: a session on addresses and protocol alone */
    return PARSE_OK;
}

/* `room`: bytes of the frame from the IP header on (the wire length, which a TC
 * program's data_end may fall short of: a GSO packet's payload is not linear). */
static __always_inline int parse_ipv4(struct pkt *p, struct iphdr *iph, void *data,
                                      void *data_end, __u32 room)
{
    if ((void *)(iph + 1) > data_end)
        return PARSE_MALFORMED;
    if (iph->version != 4 || iph->ihl < 5)
        return PARSE_MALFORMED;
    __u32 ihl_bytes = iph->ihl * 4;
    __u32 tot_len = bpf_ntohs(iph->tot_len);
    if (tot_len < ihl_bytes)
        return PARSE_MALFORMED;
    /* a truncated datagram must not pass, nor count its claimed length */
    if (tot_len > room)
        return PARSE_MALFORMED;
    addr_from_v4(&p->saddr, iph->saddr);
    addr_from_v4(&p->daddr, iph->daddr);
    p->proto = iph->protocol;
    p->frag_proto = iph->protocol;
    p->l3_len = tot_len;
    p->ip_id = iph->id;
    __u16 frag_off = bpf_ntohs(iph->frag_off);
    if (frag_off & IP_OFFSET) {
        p->frag = 2;
        p->frag_off = frag_off & IP_OFFSET;
        return PARSE_OK; /* no L4 header in this fragment */
    }
    if (frag_off & IP_MF)
        p->frag = 1;
    return parse_l4(p, (__u8 *)iph + ihl_bytes, tot_len - ihl_bytes, data, data_end, 0);
}

/* IPv6: the fixed header, then at most IPV6_MAX_EXT_HDRS extension headers
 * (hop-by-hop first only, routing type 0 refused, fragment header as IPv4's
 * fragment fields) up to the transport header. */
static __always_inline int parse_ipv6(struct pkt *p, struct ipv6hdr *ip6, void *data,
                                      void *data_end, __u32 room)
{
    if ((void *)(ip6 + 1) > data_end)
        return PARSE_MALFORMED;
    if (ip6->version != 6)
        return PARSE_MALFORMED;
    __u32 plen = bpf_ntohs(ip6->payload_len);
    if (sizeof(*ip6) + plen > room)
        return PARSE_MALFORMED; /* truncated (or a jumbogram, which no link here carries) */
    __u8 *end = (__u8 *)(ip6 + 1) + plen;
    if (ip6->saddr.in6_u.u6_addr8[0] == 0xff)
        return PARSE_MALFORMED; /* a multicast source */
    if (addr_is_v4_mapped(&ip6->saddr) || addr_is_v4_mapped(&ip6->daddr))
        return PARSE_MALFORMED;
    addr_from_v6(&p->saddr, &ip6->saddr);
    addr_from_v6(&p->daddr, &ip6->daddr);
    p->ipv6 = 1;
    p->l3_len = sizeof(*ip6) + plen;
    __u8 hop_limit = ip6->hop_limit;
    __u8 nh = ip6->nexthdr;
    __u8 *hdr = (__u8 *)(ip6 + 1);
#pragma unroll
    for (int i = 0; i < IPV6_MAX_EXT_HDRS; i++) {
        if (nh != NH_HOPOPTS && nh != NH_ROUTING && nh != NH_FRAGMENT && nh != NH_DSTOPTS &&
            nh != NH_AH)
            break;
        if (nh == NH_HOPOPTS && i != 0)
            return PARSE_MALFORMED; /* RFC 8200 4.1: hop-by-hop only right after the header */
        if ((void *)(hdr + 8) > data_end || hdr + 8 > end)
            return PARSE_MALFORMED;
        __u32 len;
        if (nh == NH_FRAGMENT) {
            __u16 fo = bpf_ntohs(*(__u16 *)(hdr + 2));
            p->ip_id = *(__u32 *)(hdr + 4);
            p->frag_proto = hdr[0];
            if (fo & IPV6_FRAG_OFFSET) {
                p->frag = 2;
                p->frag_off = fo >> 3;
                p->proto = hdr[0];
                return PARSE_OK; /* no transport header in this fragment */
            }
            if (fo & IPV6_FRAG_MF)
                p->frag = 1; /* offset 0 without M: an atomic fragment, a whole packet */
            len = 8;
        } else if (nh == NH_AH) {
            len = ((__u32)hdr[1] + 2) * 4;
        } else {
            if (nh == NH_ROUTING && hdr[2] == 0)
                return PARSE_RH0;
            len = ((__u32)hdr[1] + 1) * 8;
        }
        if (p->frag == 1 && nh != NH_FRAGMENT)
            p->l4_hdr_len += len; /* fragmentable, in front of the transport header */
        nh = hdr[0];
        hdr += len;
    }
    if (nh == NH_HOPOPTS || nh == NH_ROUTING || nh == NH_FRAGMENT || nh == NH_DSTOPTS ||
        nh == NH_AH)
        return PARSE_MALFORMED; /* more extension headers than we walk: never unfiltered */
    if (hdr > end)
        return PARSE_MALFORMED;
    p->proto = nh;
    return parse_l4(p, hdr, end - hdr, data, data_end, hop_limit);
}

/* ARP for IPv4 over Ethernet (RFC 826): only its protocol addresses are read,
 * as a moved VM's announcement; anything else is just not IP. */
static __always_inline int parse_arp(struct pkt *p, __u8 *arp, void *data_end)
{
    if ((void *)(arp + 28) > data_end)
        return PARSE_NON_IP;
    /* htype 1 (Ethernet), ptype 0x0800, hlen 6, plen 4 */
    if (arp[0] != 0 || arp[1] != 1 || arp[2] != 0x08 || arp[3] != 0 || arp[4] != 6 ||
        arp[5] != 4)
        return PARSE_NON_IP;
    addr_from_v4(&p->saddr, *(__be32 *)(arp + 14));
    addr_from_v4(&p->daddr, *(__be32 *)(arp + 24));
    p->arp = 1;
    return PARSE_ARP;
}

/* `data`..`data_end`: the frame from its Ethernet header as far as it can be
 * read (XDP: the whole frame; TC: the linear part, where the headers are);
 * `wire_len`: the frame's length. */
static __always_inline int parse_packet(void *data, void *data_end, __u32 wire_len,
                                        struct pkt *p)
{
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return PARSE_MALFORMED;

    __be16 proto = eth->h_proto;
    void *cur = eth + 1;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (proto != ETH_P_8021Q_BE && proto != ETH_P_8021AD_BE)
            break;
        struct vlan_hdr_s *vh = cur;
        if ((void *)(vh + 1) > data_end)
            return PARSE_MALFORMED;
        p->vlan = bpf_ntohs(vh->tci) & 0x0FFF;
        proto = vh->proto;
        cur = vh + 1;
    }
    if (proto == ETH_P_8021Q_BE || proto == ETH_P_8021AD_BE)
        return PARSE_MALFORMED; /* more tags than we parse: never pass it unfiltered */
    __u32 l3_off = (__u32)(cur - data);
    if (l3_off > wire_len)
        return PARSE_MALFORMED;
    if (proto == ETH_P_IP_BE)
        return parse_ipv4(p, cur, data, data_end, wire_len - l3_off);
    if (proto == ETH_P_IPV6_BE)
        return parse_ipv6(p, cur, data, data_end, wire_len - l3_off);
    if (proto == ETH_P_ARP_BE)
        return parse_arp(p, cur, data_end);
    return PARSE_NON_IP;
}

#endif
