/* xtransit edge data plane: TCP MSS clamping on SYN and SYN-ACK (both directions).
 *
 * Lowers an MSS option larger than the tunnel's clamp, never raises one, and leaves packets
 * without an MSS option alone. Malformed options are left untouched and never read beyond the
 * frame: doff < 5, header longer than the frame, option length 0 or 1, an option running past
 * the header, a kind byte alone at the end, an MSS option whose length is not 4 (RFC 9293
 * section 3.2: kinds 0 and 1 are single bytes, every other option is kind, length, data).
 */
#ifndef XT_MSS_H
#define XT_MSS_H

/* Clamp the MSS option of the TCP header l4_off bytes into the frame.
 *
 * The walk looks at up to XT_MSS_MAX_ITEMS option items (a NOP counts as one). The verifier
 * follows every path through the walk and its work grows steeply with the item count (16
 * items: about 40,000 instructions; 40 would exceed its limit of a million), so an MSS option
 * after the 16th item is left alone. Real stacks send MSS first (Linux, Windows, macOS: at
 * most 8 items in all); any byte offset within the 40 option bytes is reachable. */
static __always_inline void xt_mss_clamp_at(struct xdp_md *ctx, __u32 l4_off, __u16 clamp)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct tcphdr *th = data + (l4_off & 0xff);
	__u8 *opts, *o, kind, len;
	__u32 optlen, i = 0;
	__u16 old;
	int k;

	if ((void *)(th + 1) > data_end)
		return;
	if (!th->syn)
		return;
	if (th->doff < 5)
		return;
	optlen = th->doff * 4 - sizeof(*th);
	if ((void *)(th + 1) + optlen > data_end)
		return;
	opts = (__u8 *)(th + 1);

	for (k = 0; k < XT_MSS_MAX_ITEMS; k++) {
		if (i >= optlen)
			return;
		o = opts + (i & 0x3f);
		if ((void *)(o + 1) > data_end)
			return;
		kind = o[0];
		if (kind == XT_TCPOPT_EOL)
			return;
		if (kind == XT_TCPOPT_NOP) {
			i++;
			continue;
		}
		if (i + 1 >= optlen)      /* a kind byte alone at the end */
			return;
		if ((void *)(o + 2) > data_end)
			return;
		len = o[1];
		if (len < 2 || i + len > optlen)
			return;
		if (kind == XT_TCPOPT_MSS) {
			if (len != XT_TCPOLEN_MSS || (void *)(o + 4) > data_end)
				return;
			old = (o[2] << 8) | o[3];
			if (old <= clamp)
				return;
			o[2] = clamp >> 8;
			o[3] = clamp & 0xff;
			/* the MSS value sits at byte 20 + i + 2 of the TCP header: odd when i is */
			th->check = bpf_htons(xt_csum_replace16_at(bpf_ntohs(th->check), old, clamp,
								  i & 1));
			return;
		}
		i += len;
	}
}

/* At the single exit (xdp_edge.c): the TCP header the stage recorded in p->l4_off, when it
 * asked for a clamp (p->mss). */
static __always_inline void xt_mss_clamp_exit(struct xdp_md *ctx, struct xt_pkt *p)
{
	if (p->mss)
		xt_mss_clamp_at(ctx, p->l4_off, p->mss);
}

/* Stages: ask for a clamp of the TCP header l4_off bytes into the frame as it will be at the
 * exit. IPv4: not for non-first fragments. IPv6: only a TCP header right after the fixed header
 * (extension headers are not walked). */
static __always_inline void xt_mss_request_v4(struct xt_pkt *p, struct iphdr *iph, __u32 l4_off,
					      __u16 clamp)
{
	if (iph->protocol != IPPROTO_TCP || (bpf_ntohs(iph->frag_off) & XT_IP_OFFSET))
		return;
	p->mss = clamp;
	p->l4_off = l4_off;
}

static __always_inline void xt_mss_request_v6(struct xt_pkt *p, struct ipv6hdr *ip6h,
					      __u32 l4_off, __u16 clamp)
{
	if (ip6h->nexthdr != IPPROTO_TCP)
		return;
	p->mss = clamp;
	p->l4_off = l4_off;
}

#endif /* XT_MSS_H */
