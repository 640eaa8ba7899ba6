/* xtransit edge data plane: header parsers.
 *
 * Each parser takes a cursor and data_end, checks the header lies inside the frame (one idiom:
 * `if (hdr + 1 > data_end)`), checks any length field before trusting it, advances the cursor
 * and returns the next protocol, or a negative value when the header is not usable.
 */
#ifndef XT_PARSE_H
#define XT_PARSE_H

struct xt_cursor {
	void *pos;
};

/* Ethernet (no VLAN tags: tagged frames are not ours and pass). Returns the EtherType in
 * host order. */
static __always_inline int xt_parse_eth(struct xt_cursor *c, void *data_end, struct ethhdr **eth)
{
	struct ethhdr *h = c->pos;

	if ((void *)(h + 1) > data_end)
		return -1;
	c->pos = h + 1;
	*eth = h;
	return bpf_ntohs(h->h_proto);
}

/* IPv4 header with its options: IHL >= 5 and the whole header inside the frame. The total
 * length is the caller's to check against what it needs (it differs for outer and inner). */
static __always_inline int xt_parse_ipv4(struct xt_cursor *c, void *data_end, struct iphdr **iph)
{
	struct iphdr *h = c->pos;
	__u32 hlen;

	if ((void *)(h + 1) > data_end)
		return -1;
	if (h->version != 4 || h->ihl < 5)
		return -1;
	hlen = h->ihl * 4;
	if (c->pos + hlen > data_end)
		return -1;
	c->pos += hlen;
	*iph = h;
	return h->protocol;
}

/* IPv6 fixed header (extension headers are not walked). */
static __always_inline int xt_parse_ipv6(struct xt_cursor *c, void *data_end,
					 struct ipv6hdr **ip6h)
{
	struct ipv6hdr *h = c->pos;

	if ((void *)(h + 1) > data_end)
		return -1;
	if (h->version != 6)
		return -1;
	c->pos = h + 1;
	*ip6h = h;
	return h->nexthdr;
}

/* What a GRE header said. */
struct xt_gre_info {
	__u32 hlen;     /* 4..16 */
	__u32 has_key;
	__be32 key;     /* as on the wire */
	__u16 protocol; /* inner EtherType, host order */
};

/* GRE, RFC 2784 section 2 and RFC 2890 section 2:
 *
 *   |C|R|K|S|s|Recur|  Reserved0  | Ver |   Protocol Type   |
 *   |   Checksum (if C)   |   Reserved1 (if C)   |
 *   |            Key (if K)                      |
 *   |       Sequence Number (if S)               |
 *
 * Version must be 0 (version 1 is PPTP's enhanced GRE). R, s and Recur are RFC 1701 source
 * routing: RFC 2784 section 2.3 says a receiver not implementing RFC 1701 MUST discard the
 * packet when bits 1-5 are set; K and S are bits 2-3, legal again under RFC 2890. The checksum
 * is not verified (RFC 2784 makes it optional to send; inner headers carry their own). Returns
 * the inner protocol, or minus an XT_R_* reason. */
static __always_inline int xt_parse_gre(struct xt_cursor *c, void *data_end,
					struct xt_gre_info *g)
{
	__u8 *h = c->pos;
	__u16 flags;
	__u32 off;

	if ((void *)(h + XT_GRE_BASE_HLEN) > data_end)
		return -XT_R_GRE_TRUNCATED;
	flags = (h[0] << 8) | h[1];
	if (flags & XT_GRE_VERSION)
		return -XT_R_GRE_VERSION;
	if (flags & (XT_GRE_R | 0x0800 | 0x0700))
		return -XT_R_GRE_ROUTING;
	g->protocol = (h[2] << 8) | h[3];
	off = XT_GRE_BASE_HLEN;
	if (flags & XT_GRE_C)
		off += 4;
	g->has_key = 0;
	g->key = 0;
	if (flags & XT_GRE_K) {
		__be32 *k = (void *)h + off;

		if ((void *)(k + 1) > data_end)
			return -XT_R_GRE_TRUNCATED;
		g->has_key = 1;
		g->key = *k;
		off += 4;
	}
	if (flags & XT_GRE_S)
		off += 4;
	if ((void *)h + off > data_end)
		return -XT_R_GRE_TRUNCATED;
	g->hlen = off;
	c->pos = (void *)h + off;
	return g->protocol;
}

/* Source and destination ports of a TCP or UDP header at l4 (zero for anything else or a
 * truncated header), for the flow hash. */
static __always_inline __u32 xt_l4_ports(void *l4, void *data_end, __u8 proto)
{
	__u32 *ports = l4;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return 0;
	if ((void *)(ports + 1) > data_end)
		return 0;
	return *ports;
}

#endif /* XT_PARSE_H */
