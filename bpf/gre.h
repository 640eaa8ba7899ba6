/* xtransit edge data plane: GRE decapsulation (customer router -> edge -> Internet).
 *
 * Outer IPv4 to one of our endpoints with protocol 47: outer header checked, fragments to the
 * kernel, GRE header parsed (parse.h), tunnel found by (edge, customer, key), inner header
 * checked against what the outer packet carries, outer headers stripped, the frame trimmed to
 * the inner packet, TCP MSS clamp requested (done at the exit, mss.h), then forwarded (fwd.h). A GRE keepalive (an inner GRE
 * packet addressed back to the customer router) takes the same path back to its sender.
 */
#ifndef XT_GRE_H
#define XT_GRE_H

/* A GRE frame to one of our addresses as xt_gre_outer() and xt_gre_inner() read it; shared
 * with pin.h (GRE from fleet nodes). */
struct xt_gre_frame {
	struct xt_decap_key key; /* the xt_gre_decap lookup key */
	void *inner;             /* the inner packet in the frame */
	__u32 strip;             /* outer IPv4 + GRE bytes in front of it */
	__u32 avail;             /* bytes the outer packet carries after the GRE header */
	__u32 inner_len;         /* the inner packet's length (xt_gre_inner) */
	int proto;               /* inner EtherType */
};

/* Outer IPv4 and GRE headers: outer header checked, fragments to the kernel, GRE parsed
 * (parse.h), the decap key filled in. Returns XT_CONTINUE or a verdict. */
static __always_inline int xt_gre_outer(struct xdp_md *ctx, struct xt_pkt *p,
					struct xt_gre_frame *f)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct xt_cursor c = { .pos = data + XT_ETH_HLEN };
	struct xt_gre_info g = {};
	struct iphdr *oip;
	__u32 ohlen, otot;
	int proto;

	if (xt_parse_ipv4(&c, data_end, &oip) != XT_IPPROTO_GRE)
		return xt_verdict(p, XDP_PASS, XT_R_NOT_OURS);
	ohlen = oip->ihl * 4;
	otot = bpf_ntohs(oip->tot_len);
	if (otot < ohlen || data + XT_ETH_HLEN + otot > data_end)
		return xt_verdict(p, XDP_DROP, XT_R_OUTER_MALFORMED);
	if (bpf_ntohs(oip->frag_off) & (XT_IP_MF | XT_IP_OFFSET))
		return xt_verdict(p, XDP_PASS, XT_R_OUTER_FRAGMENT);

	proto = xt_parse_gre(&c, data_end, &g);
	if (proto < 0)
		return xt_verdict(p, XDP_DROP, -proto);
	if (ohlen + g.hlen > otot)
		return xt_verdict(p, XDP_DROP, XT_R_GRE_TRUNCATED);

	f->key.edge = oip->daddr;
	f->key.customer = oip->saddr;
	f->key.key = g.key;
	f->key.has_key = g.has_key;
	f->inner = c.pos;
	f->strip = ohlen + g.hlen;
	f->avail = otot - ohlen - g.hlen;
	f->proto = proto;
	return XT_CONTINUE;
}

/* The inner header checked against what the outer packet carries; sets f->inner_len.
 * Returns XT_CONTINUE or a verdict. */
static __always_inline int xt_gre_inner(struct xdp_md *ctx, struct xt_pkt *p,
					struct xt_gre_frame *f)
{
	void *data_end = (void *)(long)ctx->data_end;
	__u32 inner_len;

	if (f->proto == ETH_P_IP) {
		struct iphdr *iph = f->inner;

		if ((void *)(iph + 1) > data_end || iph->version != 4 || iph->ihl < 5)
			return xt_verdict(p, XDP_DROP, XT_R_INNER_MALFORMED);
		inner_len = bpf_ntohs(iph->tot_len);
		if (inner_len < iph->ihl * 4 || inner_len > f->avail)
			return xt_verdict(p, XDP_DROP, XT_R_INNER_MALFORMED);
	} else if (f->proto == ETH_P_IPV6) {
		struct ipv6hdr *ip6h = f->inner;

		if ((void *)(ip6h + 1) > data_end || ip6h->version != 6)
			return xt_verdict(p, XDP_DROP, XT_R_INNER_MALFORMED);
		inner_len = XT_IPV6_HLEN + bpf_ntohs(ip6h->payload_len);
		if (inner_len > f->avail)
			return xt_verdict(p, XDP_DROP, XT_R_INNER_MALFORMED);
	} else {
		return xt_verdict(p, XDP_DROP, XT_R_GRE_PROTOCOL);
	}
	f->inner_len = inner_len;
	return XT_CONTINUE;
}

/* Remove `strip` bytes between the Ethernet header and the inner packet and trim the frame
 * to the inner packet. Returns XT_CONTINUE or a verdict. */
static __always_inline int xt_decap_strip(struct xdp_md *ctx, struct xt_pkt *p, __u32 strip,
					  __u16 proto, __u32 inner_len)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u8 macs[2 * ETH_ALEN];
	__u32 len;

	if ((void *)(eth + 1) > data_end)
		return xt_verdict(p, XDP_DROP, XT_R_ADJUST_FAILED);
	__builtin_memcpy(macs, eth, sizeof(macs));
	if (bpf_xdp_adjust_head(ctx, (int)strip))
		return xt_verdict(p, XDP_DROP, XT_R_ADJUST_FAILED);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	len = data_end - data;
	if (len > XT_ETH_HLEN + inner_len &&
	    bpf_xdp_adjust_tail(ctx, (int)(XT_ETH_HLEN + inner_len) - (int)len))
		return xt_verdict(p, XDP_DROP, XT_R_ADJUST_FAILED);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return xt_verdict(p, XDP_DROP, XT_R_ADJUST_FAILED);
	__builtin_memcpy(eth, macs, sizeof(macs));
	eth->h_proto = bpf_htons(proto);
	return XT_CONTINUE;
}

/* Strip, then clamp and forward the inner packet. */
static __always_inline int xt_decap_forward(struct xdp_md *ctx, struct xt_pkt *p, __u32 strip,
					    __u16 proto, __u32 inner_len, __u16 mss)
{
	void *data, *data_end;
	int action = xt_decap_strip(ctx, p, strip, proto, inner_len);

	if (action != XT_CONTINUE)
		return action;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (proto == ETH_P_IP) {
		struct iphdr *iph = data + XT_ETH_HLEN;

		if ((void *)(iph + 1) > data_end)
			return xt_verdict(p, XDP_DROP, XT_R_ADJUST_FAILED);
		xt_mss_request_v4(p, iph, XT_ETH_HLEN + (iph->ihl & 0xf) * 4, mss);
		if (iph->ttl <= 1)
			return xt_verdict(p, XDP_PASS, XT_R_TTL_EXPIRED);
		return xt_forward_v4(ctx, p, 1, XT_R_DECAP_FORWARDED);
	} else {
		struct ipv6hdr *ip6h = data + XT_ETH_HLEN;

		if ((void *)(ip6h + 1) > data_end)
			return xt_verdict(p, XDP_DROP, XT_R_ADJUST_FAILED);
		xt_mss_request_v6(p, ip6h, XT_ETH_HLEN + XT_IPV6_HLEN, mss);
		if (ip6h->hop_limit <= 1)
			return xt_verdict(p, XDP_PASS, XT_R_TTL_EXPIRED);
		return xt_forward_v6(ctx, p, XT_R_DECAP_FORWARDED);
	}
}

static __always_inline int xt_gre_ingress(struct xdp_md *ctx, struct xt_pkt *p)
{
	struct xt_gre_frame f = {};
	struct xt_tunnel *t;
	__u32 *idx;
	__u16 mss;
	int action;

	action = xt_gre_outer(ctx, p, &f);
	if (action != XT_CONTINUE)
		return action;
	idx = xt_gre_decap.lookup(&f.key);
	if (!idx)
		return xt_verdict(p, XDP_DROP, XT_R_UNKNOWN_TUNNEL);
	p->tunnel = *idx;
	t = xt_tunnels.lookup(idx);
	if (!t || t->kind != XT_KIND_GRE)
		return xt_verdict(p, XDP_DROP, XT_R_UNKNOWN_TUNNEL);
	mss = t->mss;
	action = xt_gre_inner(ctx, p, &f);
	if (action != XT_CONTINUE)
		return action;
	xt_count_decap(p->tunnel, f.inner_len);
	return xt_decap_forward(ctx, p, f.strip, (__u16)f.proto, f.inner_len, mss);
}

#endif /* XT_GRE_H */
