/* xtransit edge data plane: IPsec tunnels pinned to one node (issue 7).
 *
 * Every node numbers the ESP packets it sends itself (RFC 4303 section 3.3.3: the sequence
 * number is the sender's counter), so a customer router with anti-replay on (RFC 4303 section
 * 3.4.3) accepts one node's packets and drops the others' as replays. An IPsec tunnel with
 * `pin_node` is encrypted by that node alone; Internet -> customer packets reaching any other
 * node are carried to it:
 *
 *   not the pin node (tunnel entry flag XT_TUN_F_PIN_FWD, set by the loader): the packet routed
 *     into the tunnel (encap.h) is pushed into GRE (RFC 2784, no key) built from the pin node's
 *     xt_pin_nodes entry (outer source our fleet address, destination the pin node's) and
 *     forwarded with the FIB. TTL, MSS and size are left to the pin node, which encrypts as if
 *     the packet had arrived there.                                     -> pinned_forwarded
 *   the pin node: GRE to our fleet address (xt_endpoints value XT_EP_FLEET) from a fleet node
 *     (its fleet-peer entry in xt_gre_decap) is decapsulated (gre.h) and the inner packet takes
 *     the customer-prefix path (encap.h) like one from the Internet, so it is steered to this
 *     node's AF_XDP worker and encrypted here.                          -> pinned_steered
 *
 * A packet from a fleet node is never carried on again: when two nodes disagree about the pin
 * (a config change reaching them at different times) it is encrypted where it arrived, so no
 * loop. Inbound ESP is not pinned: whichever node receives it decrypts it. Anything else to
 * the fleet address is the kernel's (ping, ssh).
 */
#ifndef XT_PIN_H
#define XT_PIN_H

static __always_inline int xt_pin_forward(struct xdp_md *ctx, struct xt_pkt *p,
					  const struct xt_tunnel *t)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct xt_tunnel *fwd;
	__u32 node = t->pin_node;

	if (p->from_fleet)
		return xt_esp_encap(ctx, p, t);
	fwd = xt_pin_nodes.lookup(&node);
	if (!fwd)
		return xt_verdict(p, XDP_DROP, XT_R_PINNED_NO_NODE);
	if ((void *)(eth + 1) > data_end)
		return xt_verdict(p, XDP_DROP, XT_R_INNER_MALFORMED);
	/* the inner length was checked against the frame by xt_encap_v4 / xt_encap_v6 */
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *iph = (void *)(eth + 1);

		if ((void *)(iph + 1) > data_end)
			return xt_verdict(p, XDP_DROP, XT_R_INNER_MALFORMED);
		return xt_gre_push(ctx, p, fwd, ETH_P_IP, bpf_ntohs(iph->tot_len), iph->tos,
				   bpf_ntohs(iph->frag_off) & XT_IP_DF, XT_R_PINNED_FORWARDED);
	} else {
		struct ipv6hdr *ip6h = (void *)(eth + 1);

		if ((void *)(ip6h + 1) > data_end)
			return xt_verdict(p, XDP_DROP, XT_R_INNER_MALFORMED);
		return xt_gre_push(ctx, p, fwd, ETH_P_IPV6,
				   XT_IPV6_HLEN + bpf_ntohs(ip6h->payload_len),
				   (ip6h->priority << 4) | (ip6h->flow_lbl[0] >> 4), XT_IP_DF,
				   XT_R_PINNED_FORWARDED);
	}
}

/* encap.h's hook for a packet routed into an IPsec tunnel: one flag of the entry it has. */
static __always_inline int xt_ipsec_out(struct xdp_md *ctx, struct xt_pkt *p,
					const struct xt_tunnel *t)
{
	if (t->flags & XT_TUN_F_PIN_FWD)
		return xt_pin_forward(ctx, p, t);
	return xt_esp_encap(ctx, p, t);
}

/* A packet to our fleet address (the dispatcher found XT_EP_FLEET). */
static __always_inline int xt_pin_ingress(struct xdp_md *ctx, struct xt_pkt *p, int l4)
{
	struct xt_gre_frame f = {};
	__u32 *peer;
	int action;

	if (l4 != XT_IPPROTO_GRE)
		return xt_verdict(p, XDP_PASS, XT_R_NOT_OURS);
	action = xt_gre_outer(ctx, p, &f);
	if (action != XT_CONTINUE)
		return action;
	peer = xt_gre_decap.lookup(&f.key);
	if (!peer || *peer != XT_DECAP_FLEET_PEER)
		return xt_verdict(p, XDP_DROP, XT_R_PINNED_UNKNOWN_PEER);
	action = xt_gre_inner(ctx, p, &f);
	if (action != XT_CONTINUE)
		return action;
	action = xt_decap_strip(ctx, p, f.strip, (__u16)f.proto, f.inner_len);
	if (action != XT_CONTINUE)
		return action;
	p->from_fleet = 1;
	if (f.proto == ETH_P_IP)
		action = xt_encap_v4(ctx, p);
	else
		action = xt_encap_v6(ctx, p);
	if (p->reason == XT_R_ESP_STEERED)
		p->reason = XT_R_PINNED_STEERED;
	else if (p->reason == XT_R_NOT_OURS)
		return xt_verdict(p, XDP_DROP, XT_R_PINNED_NO_ROUTE);
	return action;
}

#endif /* XT_PIN_H */
