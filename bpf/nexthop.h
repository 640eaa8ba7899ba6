/* xtransit IPsec data path: the next-hop lookup the AF_XDP worker runs on a cache miss (issue 5).
 *
 * esp_nexthop is never attached. native/xsk.c runs it with BPF_PROG_TEST_RUN on a copy of the
 * packet's headers (Ethernet + IP), with ifindex = the router end of the internal veth, so the
 * kernel FIB answers what xdp_esp_fwd would have been told for the same packet there. The answer
 * replaces the first bytes of the test-run packet (struct xt_nh_result) and the worker caches it;
 * the program itself forwards nothing.
 *
 * It is a TC (sched_cls) program although it serves an XDP path: bpf_fib_lookup is the same
 * function for both, but every test run of an XDP program swaps it in and out of the kernel's
 * XDP dispatcher, and each swap waits for an RCU grace period (bpf_prog_test_run_xdp ->
 * bpf_prog_change_xdp -> synchronize_rcu: 8-10 ms here, twice per run). A TC test run is a few
 * microseconds.
 *
 * Two lookups: bpf_fib_lookup checks tot_len against the route's MTU *before* it resolves the
 * neighbour and, on success, does not report the MTU; so the first lookup asks with the largest
 * length (answer: BPF_FIB_LKUP_RET_FRAG_NEEDED with mtu_result, or success when the MTU is 64 KiB)
 * and the second with length 0 gives the egress device and both MACs (for a TC program, length 0
 * checks the test skb itself against the device MTU, which a header copy always passes).
 */
#ifndef XT_NEXTHOP_H
#define XT_NEXTHOP_H

#define XT_NH_MAGIC 0x58544e48 /* "XTNH"; native/xsk.h XT_XSK_NH_MAGIC */
#define XT_NH_F_PORTS 1   /* request flag (first byte of the Ethernet destination): use the
			    * TCP/UDP ports after the IP header; native/xsk.h XT_XSK_NH_F_PORTS */
#define XT_NH_DONE 0      /* return value: the answer is in the packet */
#define XT_NH_BAD_INPUT 2 /* return value: not Ethernet + IPv4/IPv6 */

/* Written at offset 0 of the test-run packet (host byte order); native/xsk.c reads it. */
struct xt_nh_result {
	__u32 magic;
	__s32 rc;        /* BPF_FIB_LKUP_RET_* of the MAC lookup (or of the MTU lookup when that failed) */
	__u32 ifindex;   /* egress device */
	__u32 mtu;       /* path MTU of the route */
	__u8 smac[6];
	__u8 dmac[6];
};

/* The inputs bpf_fib_lookup gets for a packet: what the kernel itself routes it by. With ports,
 * the TCP/UDP ports of a packet that is not a fragment (IPv6: right after the fixed header), for
 * port rules and an L4 multipath hash. xdp_esp_fwd and esp_nexthop both fill the lookup here, so
 * the worker's cached answers and the forwarder's lookups agree. The caller sets ifindex and
 * tot_len. */
static __always_inline void nh_fib_ipv4(struct bpf_fib_lookup *fib, struct iphdr *ip,
					void *data_end, int ports)
{
	fib->family = AF_INET;
	fib->tos = ip->tos;
	fib->l4_protocol = ip->protocol;
	fib->ipv4_src = ip->saddr;
	fib->ipv4_dst = ip->daddr;
	if (ports && (ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP) &&
	    !(ip->frag_off & bpf_htons(0x3FFF))) {
		__be16 *l4 = (void *)ip + ip->ihl * 4;

		if ((void *)(l4 + 2) <= data_end) {
			fib->sport = l4[0];
			fib->dport = l4[1];
		}
	}
}

static __always_inline void nh_fib_ipv6(struct bpf_fib_lookup *fib, struct ipv6hdr *ip6,
					void *data_end, int ports)
{
	fib->family = AF_INET6;
	fib->flowinfo = *(__be32 *)ip6 & bpf_htonl(0x0FFFFFFF);
	fib->l4_protocol = ip6->nexthdr;
	__builtin_memcpy(fib->ipv6_src, &ip6->saddr, 16);
	__builtin_memcpy(fib->ipv6_dst, &ip6->daddr, 16);
	if (ports && (ip6->nexthdr == IPPROTO_TCP || ip6->nexthdr == IPPROTO_UDP)) {
		__be16 *l4 = (void *)(ip6 + 1);

		if ((void *)(l4 + 2) <= data_end) {
			fib->sport = l4[0];
			fib->dport = l4[1];
		}
	}
}

int esp_nexthop(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct bpf_fib_lookup fib = {}, ask;
	struct xt_nh_result res = {};
	int rc;

	if ((void *)(eth + 1) > data_end)
		return XT_NH_BAD_INPUT;
	/* the worker asks with ports when the kernel's routing looks at them (port rules, an L4
	 * multipath hash); the cache keys then include them too */
	int ports = eth->h_dest[0] & XT_NH_F_PORTS;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end)
			return XT_NH_BAD_INPUT;
		nh_fib_ipv4(&fib, ip, data_end, ports);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return XT_NH_BAD_INPUT;
		nh_fib_ipv6(&fib, ip6, data_end, ports);
	} else {
		return XT_NH_BAD_INPUT;
	}
	if ((void *)eth + sizeof(res) > data_end)
		return XT_NH_BAD_INPUT;
	fib.ifindex = skb->ifindex;  /* the device of the test-run skb: the router end */
	ask = fib;
	fib.tot_len = 0xFFFF;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	res.mtu = 0xFFFF;
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		res.mtu = fib.mtu_result;
	else if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		goto out;
	/* a successful lookup rewrites its input (ifindex, destination = gateway): ask afresh */
	fib = ask;
	fib.tot_len = 0;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		res.ifindex = fib.ifindex;
		__builtin_memcpy(res.smac, fib.smac, ETH_ALEN);
		__builtin_memcpy(res.dmac, fib.dmac, ETH_ALEN);
	}
out:
	res.magic = XT_NH_MAGIC;
	res.rc = rc;
	__builtin_memcpy(data, &res, sizeof(res));
	return XT_NH_DONE;
}

#endif /* XT_NEXTHOP_H */
