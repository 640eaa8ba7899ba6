/* xtransit edge data plane: forwarding after decap or encap.
 *
 * bpf_fib_lookup in the namespace of the ingress device, then either the route's MAC addresses
 * are written and the frame redirected (XDP_TX when it leaves where it came in), or it goes to
 * the kernel: no neighbour entry yet (the kernel resolves it; the next packets take the fast
 * path), or the FIB says not forwarded here (local delivery, no route, blackhole, MTU).
 */
#ifndef XT_FWD_H
#define XT_FWD_H

/* Fill the lookup for an IPv4 packet (inner after decap, outer after encap). */
static __always_inline void xt_fib_v4(struct bpf_fib_lookup *f, struct xdp_md *ctx,
				      struct iphdr *iph, __u32 ports)
{
	__builtin_memset(f, 0, sizeof(*f));
	f->family = AF_INET;
	f->tos = iph->tos;
	f->l4_protocol = iph->protocol;
	f->sport = ports & 0xffff;
	f->dport = ports >> 16;
	f->tot_len = bpf_ntohs(iph->tot_len);
	f->ipv4_src = iph->saddr;
	f->ipv4_dst = iph->daddr;
	f->ifindex = ctx->ingress_ifindex;
}

static __always_inline void xt_fib_v6(struct bpf_fib_lookup *f, struct xdp_md *ctx,
				      struct ipv6hdr *ip6h, __u32 ports)
{
	__builtin_memset(f, 0, sizeof(*f));
	f->family = AF_INET6;
	f->flowinfo = *(__be32 *)ip6h & bpf_htonl(0x0fffffff);
	f->l4_protocol = ip6h->nexthdr;
	f->sport = ports & 0xffff;
	f->dport = ports >> 16;
	f->tot_len = XT_IPV6_HLEN + bpf_ntohs(ip6h->payload_len);
	__builtin_memcpy(f->ipv6_src, &ip6h->saddr, sizeof(f->ipv6_src));
	__builtin_memcpy(f->ipv6_dst, &ip6h->daddr, sizeof(f->ipv6_dst));
	f->ifindex = ctx->ingress_ifindex;
}

/* Map a lookup result that is not success to the kernel path. */
static __always_inline int xt_fib_to_kernel(struct xt_pkt *p, int rc)
{
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return xt_verdict(p, XDP_PASS, XT_R_FIB_NO_NEIGH);
	return xt_verdict(p, XDP_PASS, XT_R_FIB_PASS);
}

/* After a successful lookup: the route's MACs on the frame, then out. */
static __always_inline int xt_redirect(struct xdp_md *ctx, struct xt_pkt *p,
				       struct bpf_fib_lookup *f, __u32 reason)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return xt_verdict(p, XDP_DROP, XT_R_ADJUST_FAILED);
	__builtin_memcpy(eth->h_dest, f->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, f->smac, ETH_ALEN);
	p->reason = reason;
	if (f->ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect(f->ifindex, 0);
}

#endif /* XT_FWD_H */

#ifndef XT_FWD_STAGE_H
#define XT_FWD_STAGE_H
/* Forward the IPv4 packet at the head of the frame (after an Ethernet header). With dec_ttl
 * (a packet leaving a tunnel) the TTL is decremented only when the fast path forwards it: a
 * packet handed to the kernel is forwarded, and decremented, there. */
static __always_inline int xt_forward_v4(struct xdp_md *ctx, struct xt_pkt *p, int dec_ttl,
					 __u32 reason)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct iphdr *iph = data + XT_ETH_HLEN;
	struct bpf_fib_lookup f;
	__u32 ports = 0;
	int rc;

	if ((void *)(iph + 1) > data_end)
		return xt_verdict(p, XDP_DROP, XT_R_ADJUST_FAILED);
	if (iph->ihl >= 5 && !(bpf_ntohs(iph->frag_off) & XT_IP_OFFSET))
		ports = xt_l4_ports((void *)iph + (iph->ihl & 0xf) * 4, data_end, iph->protocol);
	xt_fib_v4(&f, ctx, iph, ports);
	rc = bpf_fib_lookup(ctx, &f, sizeof(f), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return xt_fib_to_kernel(p, rc);
	if (dec_ttl)
		xt_ipv4_dec_ttl(iph);
	return xt_redirect(ctx, p, &f, reason);
}

static __always_inline int xt_forward_v6(struct xdp_md *ctx, struct xt_pkt *p, __u32 reason)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ipv6hdr *ip6h = data + XT_ETH_HLEN;
	struct bpf_fib_lookup f;
	int rc;

	if ((void *)(ip6h + 1) > data_end)
		return xt_verdict(p, XDP_DROP, XT_R_ADJUST_FAILED);
	xt_fib_v6(&f, ctx, ip6h, xt_l4_ports(ip6h + 1, data_end, ip6h->nexthdr));
	rc = bpf_fib_lookup(ctx, &f, sizeof(f), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return xt_fib_to_kernel(p, rc);
	ip6h->hop_limit--;  /* no IPv6 header checksum */
	return xt_redirect(ctx, p, &f, reason);
}
#endif
