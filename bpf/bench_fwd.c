/* xtransit benchmark reference forwarder: a plain XDP IPv4 router (FIB lookup, TTL decrement,
 * MAC rewrite, redirect), the "program under test" that proves bench/rates.py's harness before
 * the product's data plane is plugged in, and the cost of XDP forwarding with no tunnel work.
 *
 * Not part of the product. Anything it does not forward goes to the kernel (XDP_PASS).
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>

#ifndef AF_INET
#define AF_INET 2
#endif

/* Per-CPU verdict counts: index 0 redirected, 1 passed (not IPv4, TTL <= 1, no neighbour),
 * 2 redirect refused by the helper. */
BPF_PERCPU_ARRAY(fwd_counters, __u64, 3);

static __always_inline void fwd_count(__u32 i)
{
	__u64 *c = fwd_counters.lookup(&i);

	if (c)
		(*c)++;
}

int xdp_bench_fwd(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	struct bpf_fib_lookup fib = {};
	__u32 sum;
	long rc;

	if ((void *)(ip + 1) > data_end || eth->h_proto != htons(ETH_P_IP) || ip->ihl < 5 ||
	    ip->ttl <= 1)
		goto pass;

	fib.family = AF_INET;
	fib.tos = ip->tos;
	fib.l4_protocol = ip->protocol;
	fib.tot_len = ntohs(ip->tot_len);
	fib.ipv4_src = ip->saddr;
	fib.ipv4_dst = ip->daddr;
	fib.ifindex = ctx->ingress_ifindex;
	if (bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
		goto pass;

	/* TTL - 1: the checksum rises by 0x0100 (RFC 1624 incremental update, folded once). */
	ip->ttl--;
	sum = (__u32)ip->check + htons(0x0100);
	ip->check = (__u16)(sum + (sum >> 16));
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);

	rc = bpf_redirect(fib.ifindex, 0);
	fwd_count(rc == XDP_REDIRECT ? 0 : 2);
	return rc;
pass:
	fwd_count(1);
	return XDP_PASS;
}
