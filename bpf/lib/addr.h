/* struct ip_addr helpers: one address type for both families (IPv4 as the
 * IPv4-mapped ::ffff:a.b.c.d), so every table and comparison is shared. */
#ifndef SAMIXDP_ADDR_H
#define SAMIXDP_ADDR_H

#include "../session_map.h"

/* An IPv4 address as the IPv4-mapped ::ffff:a.b.c.d of struct ip_addr. */
static __always_inline void addr_from_v4(struct ip_addr *a, __be32 v4)
{
    a->w[0] = 0;
    a->w[1] = 0;
    a->w[2] = bpf_htonl(0xffff);
    a->w[3] = v4;
}

static __always_inline void addr_from_v6(struct ip_addr *a, struct in6_addr *v6)
{
    a->w[0] = v6->in6_u.u6_addr32[0];
    a->w[1] = v6->in6_u.u6_addr32[1];
    a->w[2] = v6->in6_u.u6_addr32[2];
    a->w[3] = v6->in6_u.u6_addr32[3];
}

static __always_inline int addr_eq(const struct ip_addr *a, const struct ip_addr *b)
{
    return ((a->w[0] ^ b->w[0]) | (a->w[1] ^ b->w[1]) | (a->w[2] ^ b->w[2]) |
            (a->w[3] ^ b->w[3])) == 0;
}

/* Numeric order of two addresses (as 128-bit big-endian numbers): -1, 0, 1.
 * IPv4 addresses share their first 96 bits, so they order as before. */
static __always_inline int addr_cmp(const struct ip_addr *a, const struct ip_addr *b)
{
#pragma unroll
    for (int i = 0; i < 4; i++) {
        __u32 x = bpf_ntohl(a->w[i]), y = bpf_ntohl(b->w[i]);
        if (x != y)
            return x < y ? -1 : 1;
    }
    return 0;
}

/* What SYN accounting and bans key a source by: an IPv4 address as it is, an
 * IPv6 address by its /64 (IPV6_BAN_PLEN): a host owns a whole /64 and can
 * rotate through it at will, so per-address state would never add up. */
static __always_inline void addr_ban_key(struct ip_addr *out, const struct ip_addr *src,
                                         __u8 ipv6)
{
    out->w[0] = src->w[0];
    out->w[1] = src->w[1];
    out->w[2] = ipv6 ? 0 : src->w[2];
    out->w[3] = ipv6 ? 0 : src->w[3];
}

#endif
