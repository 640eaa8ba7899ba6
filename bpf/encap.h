/* xtransit edge data plane: GRE encapsulation (Internet -> edge -> customer router).
 *
 * A destination inside a customer prefix (route.h) routed to a GRE tunnel: TTL checked, size
 * checked against the tunnel MTU (ICMP fragmentation needed when DF is set, icmp.h), MSS
 * clamp requested (done at the exit on the inner TCP header, mss.h), TTL decremented, then outer IPv4 + GRE pushed (RFC 2784 with the RFC 2890 key when
 * the tunnel has one) and forwarded on the outer header (fwd.h).
 *
 * Outer header: source the edge endpoint, destination the customer endpoint, TTL from the
 * tunnel, TOS copied from the inner packet (DSCP and ECN, RFC 6040 normal mode), DF copied from
 * an IPv4 inner packet and always set for IPv6 (which is never fragmented on the way), ID 0
 * (RFC 6864 section 4.1 allows any ID on an atomic datagram; without DF the packet is at most
 * the tunnel MTU and is not expected to be fragmented either).
 */
#ifndef XT_ENCAP_H
#define XT_ENCAP_H

/* Header builders: write into memory the caller has bounds-checked. */
static __always_inline void xt_build_outer_ipv4(struct iphdr *oip, const struct xt_tunnel *t,
						__u32 tot_len, __u8 tos, __u16 frag_off)
{
	oip->version = 4;
	oip->ihl = 5;
	oip->tos = tos;
	oip->tot_len = bpf_htons(tot_len);
	oip->id = 0;
	oip->frag_off = bpf_htons(frag_off);
	oip->ttl = t->ttl;
	oip->protocol = XT_IPPROTO_GRE;
	oip->check = 0;
	oip->saddr = t->edge;
	oip->daddr = t->customer;
	oip->check = bpf_htons(xt_ipv4_csum(oip));
}

static __always_inline __u32 xt_gre_hlen(const struct xt_tunnel *t)
{
	return (t->flags & XT_TUN_F_KEY) ? XT_GRE_BASE_HLEN + 4 : XT_GRE_BASE_HLEN;
}

/* The mutation: trim the frame to the inner packet, grow the head by outer IPv4 + GRE, move
 * the Ethernet addresses to the new head, write the headers, forward (counted under `reason`
 * when the fast path sends it: ENCAP_FORWARDED, or PINNED_FORWARDED from pin.h). */
static __always_inline int xt_gre_push(struct xdp_md *ctx, struct xt_pkt *p,
				       const struct xt_tunnel *t, __u16 inner_proto,
				       __u32 inner_len, __u8 tos, __u16 frag_off, __u32 reason)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 glen = xt_gre_hlen(t), len = data_end - data;
	__u8 macs[2 * ETH_ALEN];
	struct ethhdr *eth = data;
	struct iphdr *oip;
	__u8 *gre;

	if ((void *)(eth + 1) > data_end)
		return xt_verdict(p, XDP_DROP, XT_R_ADJUST_FAILED);
	__builtin_memcpy(macs, eth, sizeof(macs));
	if (len > XT_ETH_HLEN + inner_len &&
	    bpf_xdp_adjust_tail(ctx, (int)(XT_ETH_HLEN + inner_len) - (int)len))
		return xt_verdict(p, XDP_DROP, XT_R_ADJUST_FAILED);
	if (bpf_xdp_adjust_head(ctx, -(int)(XT_IPV4_HLEN + glen)))
		return xt_verdict(p, XDP_DROP, XT_R_ADJUST_FAILED);

	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	oip = data + XT_ETH_HLEN;
	gre = (void *)(oip + 1);
	if ((void *)(gre + XT_GRE_BASE_HLEN + 4) > data_end)
		return xt_verdict(p, XDP_DROP, XT_R_ADJUST_FAILED);
	__builtin_memcpy(eth, macs, sizeof(macs));
	eth->h_proto = bpf_htons(ETH_P_IP);
	xt_build_outer_ipv4(oip, t, XT_IPV4_HLEN + glen + inner_len, tos, frag_off);
	gre[0] = (t->flags & XT_TUN_F_KEY) ? (XT_GRE_K >> 8) : 0;
	gre[1] = 0;
	gre[2] = inner_proto >> 8;
	gre[3] = inner_proto & 0xff;
	if (t->flags & XT_TUN_F_KEY)
		*(__be32 *)(gre + XT_GRE_BASE_HLEN) = t->key;
	return xt_forward_v4(ctx, p, 0, reason);
}

/* Into an IPsec tunnel: encrypted here (esp_steer.h) or carried to its pin node (pin.h). */
static __always_inline int xt_ipsec_out(struct xdp_md *ctx, struct xt_pkt *p,
					const struct xt_tunnel *t);

/* The route's tunnel, or a verdict: *t set and XT_CONTINUE when the packet goes into a GRE
 * tunnel. */
static __always_inline int xt_encap_tunnel(struct xdp_md *ctx, struct xt_pkt *p,
					   struct xt_route *r, __u32 hash,
					   struct xt_tunnel **out)
{
	__u32 idx = xt_route_pick(r, hash);
	struct xt_tunnel *t;

	if (!idx)
		return xt_verdict(p, XDP_DROP, XT_R_NO_TUNNEL);
	p->tunnel = idx;
	t = xt_tunnels.lookup(&idx);
	if (!t || t->kind == XT_KIND_NONE)
		return xt_verdict(p, XDP_DROP, XT_R_NO_TUNNEL);
	if (t->kind == XT_KIND_IPSEC)
		return xt_ipsec_out(ctx, p, t);
	*out = t;
	return XT_CONTINUE;
}

static __always_inline int xt_encap_v4(struct xdp_md *ctx, struct xt_pkt *p)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct xt_cursor c = { .pos = data + XT_ETH_HLEN };
	struct xt_tunnel *t = 0;
	struct xt_lpm4 k = { .prefixlen = 32 };
	struct xt_route *r;
	struct iphdr *iph;
	__u32 tot, ports = 0;
	__u16 frag;
	int l4, action;

	l4 = xt_parse_ipv4(&c, data_end, &iph);
	if (l4 < 0)
		return xt_verdict(p, XDP_PASS, XT_R_NOT_OURS);
	__builtin_memcpy(k.addr, &iph->daddr, 4);
	r = xt_routes4.lookup(&k);
	if (!r)
		return xt_verdict(p, XDP_PASS, XT_R_NOT_OURS);
	tot = bpf_ntohs(iph->tot_len);
	if (tot < iph->ihl * 4 || data + XT_ETH_HLEN + tot > data_end)
		return xt_verdict(p, XDP_DROP, XT_R_INNER_MALFORMED);
	frag = bpf_ntohs(iph->frag_off);
	/* ports only for unfragmented packets: every fragment of a datagram must hash alike, or
	 * they could leave through tunnels to different customer routers and never reassemble */
	if (!(frag & (XT_IP_OFFSET | XT_IP_MF)))
		ports = xt_l4_ports(c.pos, data_end, l4);
	action = xt_encap_tunnel(ctx, p, r, xt_flow_hash4(iph->saddr, iph->daddr, l4, ports), &t);
	if (action != XT_CONTINUE)
		return action;
	if (!t)
		return xt_verdict(p, XDP_DROP, XT_R_NO_TUNNEL);
	if (iph->ttl <= 1)
		return xt_verdict(p, XDP_PASS, XT_R_TTL_EXPIRED);
	if (tot > t->mtu) {
		if (frag & XT_IP_DF)
			return xt_icmp_frag_needed(ctx, p, t);
		return xt_verdict(p, XDP_PASS, XT_R_TOO_BIG);
	}
	xt_mss_request_v4(p, iph, XT_ETH_HLEN + XT_IPV4_HLEN + xt_gre_hlen(t) +
			  (iph->ihl & 0xf) * 4, t->mss);
	xt_ipv4_dec_ttl(iph);
	xt_count_encap(p->tunnel, tot);
	return xt_gre_push(ctx, p, t, ETH_P_IP, tot, iph->tos, frag & XT_IP_DF,
			   XT_R_ENCAP_FORWARDED);
}

static __always_inline int xt_encap_v6(struct xdp_md *ctx, struct xt_pkt *p)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct xt_cursor c = { .pos = data + XT_ETH_HLEN };
	struct xt_tunnel *t = 0;
	struct xt_lpm6 k = { .prefixlen = 128 };
	struct xt_route *r;
	struct ipv6hdr *ip6h;
	__u32 tot, hash;
	__u8 tclass;
	int l4, action;

	l4 = xt_parse_ipv6(&c, data_end, &ip6h);
	if (l4 < 0)
		return xt_verdict(p, XDP_PASS, XT_R_NOT_OURS);
	__builtin_memcpy(k.addr, &ip6h->daddr, 16);
	r = xt_routes6.lookup(&k);
	if (!r)
		return xt_verdict(p, XDP_PASS, XT_R_NOT_OURS);
	tot = XT_IPV6_HLEN + bpf_ntohs(ip6h->payload_len);
	if (data + XT_ETH_HLEN + tot > data_end)
		return xt_verdict(p, XDP_DROP, XT_R_INNER_MALFORMED);
	hash = xt_flow_hash6((__u32 *)&ip6h->saddr, (__u32 *)&ip6h->daddr, l4,
			     xt_l4_ports(c.pos, data_end, l4));
	action = xt_encap_tunnel(ctx, p, r, hash, &t);
	if (action != XT_CONTINUE)
		return action;
	if (!t)
		return xt_verdict(p, XDP_DROP, XT_R_NO_TUNNEL);
	if (ip6h->hop_limit <= 1)
		return xt_verdict(p, XDP_PASS, XT_R_TTL_EXPIRED);
	if (tot > t->mtu)
		return xt_verdict(p, XDP_DROP, XT_R_TOO_BIG_V6);
	xt_mss_request_v6(p, ip6h, XT_ETH_HLEN + XT_IPV4_HLEN + xt_gre_hlen(t) + XT_IPV6_HLEN,
			  t->mss);
	ip6h->hop_limit--;
	tclass = (ip6h->priority << 4) | (ip6h->flow_lbl[0] >> 4);
	xt_count_encap(p->tunnel, tot);
	return xt_gre_push(ctx, p, t, ETH_P_IPV6, tot, tclass, XT_IP_DF, XT_R_ENCAP_FORWARDED);
}

#endif /* XT_ENCAP_H */
