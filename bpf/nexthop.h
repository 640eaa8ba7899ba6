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

int esp_nexthop(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct bpf_fib_lookup fib = {}, ask;
	struct xt_nh_result res = {};
	void *l4 = 0;
	int rc;

	if ((void *)(eth + 1) > data_end)
		return XT_NH_BAD_INPUT;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end)
			return XT_NH_BAD_INPUT;
		fib.family = AF_INET;
		fib.tos = ip->tos;
		fib.l4_protocol = ip->protocol;
		fib.ipv4_src = ip->saddr;
		fib.ipv4_dst = ip->daddr;
		l4 = (void *)ip + ip->ihl * 4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return XT_NH_BAD_INPUT;
		fib.family = AF_INET6;
		fib.flowinfo = *(__be32 *)ip6 & bpf_htonl(0x0FFFFFFF);
		fib.l4_protocol = ip6->nexthdr;
		__builtin_memcpy(fib.ipv6_src, &ip6->saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, &ip6->daddr, 16);
		l4 = ip6 + 1;
	} else {
		return XT_NH_BAD_INPUT;
	}
	/* the worker asks with ports when the kernel's routing looks at them (port rules, an L4
	 * multipath hash) and has checked: TCP or UDP, not a fragment, no IPv6 extension header */
	if ((eth->h_dest[0] & XT_NH_F_PORTS) && l4 + 4 <= data_end) {
		fib.sport = *(__be16 *)l4;
		fib.dport = *(__be16 *)(l4 + 2);
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
