/* Packet parsing: Ethernet, up to two VLAN tags, IPv4, TCP/UDP/ICMP.
 * Every read is preceded by a bounds check against data_end. */
#ifndef SAMIXDP_PARSE_H
#define SAMIXDP_PARSE_H

#include "../session_map.h" /* PROTO_* */

#define ETH_P_8021Q_BE 0x0081   /* htons(0x8100) */
#define ETH_P_8021AD_BE 0xA888  /* htons(0x88a8) */
#define ETH_P_IP_BE 0x0008      /* htons(0x0800) */
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

#define PARSE_OK 0
#define PARSE_NON_IP 1
#define PARSE_MALFORMED 2

struct vlan_hdr_s {
    __be16 tci;
    __be16 proto;
};


/* The SYN options the window tracker needs: window scale and SACK-permitted.
 * Unrolled over the 40 possible option bytes with constant offsets only (a
 * loop with a moving pointer costs the verifier far more); `next` is where the
 * next option starts, a malformed list ends the walk. */
static __always_inline void parse_syn_options(struct xdp_md *ctx, struct pkt *p)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    __u32 len = p->opt_len;
    __u8 *opt = data + (p->opt_off & 0x3ff); /* the headers before the options fit in 1 KiB */
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
    p->in_saddr = iph->saddr;
    p->in_daddr = iph->daddr;
    p->in_proto = iph->protocol;
    if (iph->protocol == PROTO_TCP || iph->protocol == PROTO_UDP) {
        p->in_sport = *(__u16 *)l4;
        p->in_dport = *(__u16 *)(l4 + 2);
    } else if (iph->protocol == PROTO_ICMP) {
        /* a quoted echo request: its identifier is the session's port */
        p->in_sport = *(__u16 *)(l4 + 4);
        p->in_dport = 0;
    } else {
        p->in_sport = 0;
        p->in_dport = 0;
    }
    p->is_icmp_err = 1;
    return PARSE_OK;
}

static __always_inline int parse_packet(struct xdp_md *ctx, struct pkt *p)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
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
    if (proto != ETH_P_IP_BE)
        return PARSE_NON_IP;

    struct iphdr *iph = cur;
    if ((void *)(iph + 1) > data_end)
        return PARSE_MALFORMED;
    if (iph->version != 4 || iph->ihl < 5)
        return PARSE_MALFORMED;
    __u32 ihl_bytes = iph->ihl * 4;
    __u32 tot_len = bpf_ntohs(iph->tot_len);
    if (tot_len < ihl_bytes)
        return PARSE_MALFORMED;
    /* a truncated datagram must not pass, nor count its claimed length */
    if ((void *)iph + tot_len > data_end)
        return PARSE_MALFORMED;
    p->saddr = iph->saddr;
    p->daddr = iph->daddr;
    p->proto = iph->protocol;
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

    __u8 *l4 = (__u8 *)iph + ihl_bytes;
    __u32 l4_len = tot_len - ihl_bytes;
    if ((p->proto == PROTO_UDP || p->proto == PROTO_ICMP) && l4_len < 8)
        return PARSE_MALFORMED; /* the header would come from padding */
    if (p->proto == PROTO_TCP) {
        struct tcphdr *th = (void *)l4;
        if ((void *)(th + 1) > data_end)
            return PARSE_MALFORMED;
        if (th->doff < 5 || th->doff * 4 > tot_len - ihl_bytes)
            return PARSE_MALFORMED;
        p->sport = th->source;
        p->dport = th->dest;
        p->tcp_flags = ((__u8 *)th)[13];
        p->seq = bpf_ntohl(th->seq);
        p->ack_seq = bpf_ntohl(th->ack_seq);
        p->win = bpf_ntohs(th->window);
        p->seg_len = l4_len - th->doff * 4;
        p->l4_hdr_len = th->doff * 4;
        p->wscale = NO_WSCALE;
        p->opt_off = (__u8 *)(th + 1) - (__u8 *)data; /* read by the slow path for SYNs */
        p->opt_len = th->doff * 4 - sizeof(*th);
    } else if (p->proto == PROTO_UDP) {
        struct udphdr *uh = (void *)l4;
        if ((void *)(uh + 1) > data_end)
            return PARSE_MALFORMED;
        p->sport = uh->source;
        p->dport = uh->dest;
        p->l4_hdr_len = sizeof(*uh);
    } else if (p->proto == PROTO_ICMP) {
        struct icmphdr *ih = (void *)l4;
        if ((void *)(ih + 1) > data_end)
            return PARSE_MALFORMED;
        p->icmp_type = ih->type;
        p->l4_hdr_len = sizeof(*ih);
        if (ih->type == ICMP_ECHO_T || ih->type == ICMP_ECHOREPLY_T) {
            p->sport = ih->un.echo.id;
            p->dport = 0;
        } else if (is_icmp_error(ih->type)) {
            return parse_icmp_quote(p, ih + 1, data_end, l4_len - 8);
        }
    }
    /* other IP protocols: a session on addresses and protocol alone */
    return PARSE_OK;
}

#endif
