/* xtransit edge data plane: ICMP "fragmentation needed" for an IPv4 packet too big for its
 * tunnel with DF set, sent back out of the ingress interface (XDP_TX).
 *
 * RFC 792 (type 3 code 4; the original IP header plus the first 64 bits of its data), RFC 1191
 * section 4 (next-hop MTU in the low 16 bits of the second word). Source: the tunnel's edge
 * endpoint (a public address of this node; the tunnel's interface address is usually private).
 * The quoted header is the packet as received (TTL not yet decremented).
 */
#ifndef XT_ICMP_H
#define XT_ICMP_H

static __always_inline int xt_icmp_frag_needed(struct xdp_md *ctx, struct xt_pkt *p,
					       const struct xt_tunnel *t)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = data + XT_ETH_HLEN;
	struct icmphdr *icmp;
	__u8 smac[ETH_ALEN], dmac[ETH_ALEN];
	__u32 quote, want, len, sum = 0;
	__be32 dst, src = t->edge;
	__u16 mtu = t->mtu, *w;
	int i;

	if ((void *)(iph + 1) > data_end)
		return xt_verdict(p, XDP_DROP, XT_R_INNER_MALFORMED);
	__builtin_memcpy(smac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(dmac, eth->h_dest, ETH_ALEN);
	dst = iph->saddr;
	quote = (iph->ihl & 0xf) * 4 + 8;

	if (bpf_xdp_adjust_head(ctx, -(int)(XT_IPV4_HLEN + XT_ICMP_HLEN)))
		return xt_verdict(p, XDP_DROP, XT_R_ADJUST_FAILED);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	len = data_end - data;
	want = XT_ETH_HLEN + XT_IPV4_HLEN + XT_ICMP_HLEN + quote;
	if (len > want && bpf_xdp_adjust_tail(ctx, (int)want - (int)len))
		return xt_verdict(p, XDP_DROP, XT_R_ADJUST_FAILED);

	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	iph = data + XT_ETH_HLEN;
	icmp = (void *)(iph + 1);
	if ((void *)(icmp + 1) > data_end)
		return xt_verdict(p, XDP_DROP, XT_R_ADJUST_FAILED);

	__builtin_memcpy(eth->h_dest, smac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, dmac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);

	iph->version = 4;
	iph->ihl = 5;
	iph->tos = XT_ICMP_TOS;
	iph->tot_len = bpf_htons(XT_IPV4_HLEN + XT_ICMP_HLEN + quote);
	iph->id = 0;
	iph->frag_off = 0;
	iph->ttl = XT_ICMP_TTL;
	iph->protocol = IPPROTO_ICMP;
	iph->check = 0;
	iph->saddr = src;
	iph->daddr = dst;
	iph->check = bpf_htons(xt_ipv4_csum(iph));

	icmp->type = XT_ICMP_DEST_UNREACH;
	icmp->code = XT_ICMP_FRAG_NEEDED;
	icmp->checksum = 0;
	icmp->un.frag.__unused = 0;
	icmp->un.frag.mtu = bpf_htons(mtu);

	/* checksum over the ICMP header and the quote: at most 8 + 60 + 8 bytes */
	w = (__u16 *)icmp;
	for (i = 0; i < (XT_ICMP_HLEN + 60 + 8) / 2; i++) {
		if ((__u32)i * 2 >= XT_ICMP_HLEN + quote)
			break;
		if ((void *)(w + i + 1) > data_end)
			return xt_verdict(p, XDP_DROP, XT_R_ADJUST_FAILED);
		sum += bpf_ntohs(w[i]);
	}
	icmp->checksum = bpf_htons((__u16)~xt_csum_fold(sum));
	return xt_verdict(p, XDP_TX, XT_R_FRAG_NEEDED);
}

#endif /* XT_ICMP_H */
