/* Test receiver for the load generator: plays a device under test that rewrites headers in
 * place, and checks that no frame arrives carrying an earlier frame's rewrite.
 *
 * Every IPv4 frame: if its TTL is not SCRIBBLE_TTL (the template's), count it as stale; then
 * set the TTL to 1 (as a router's decrement or a decapsulation would change the bytes) and drop
 * it, which returns the page to the generator's page pool for reuse. */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>

#ifndef SCRIBBLE_TTL
#error "SCRIBBLE_TTL must be given with -D"
#endif

/* [0] frames seen, [1] frames whose TTL was not SCRIBBLE_TTL. */
BPF_PERCPU_ARRAY(scribble_counts, __u64, 2);

static __always_inline void bump(__u32 i)
{
	__u64 *c = scribble_counts.lookup(&i);

	if (c)
		(*c)++;
}

int xdp_scribble(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);

	if ((void *)(ip + 1) > data_end || eth->h_proto != htons(ETH_P_IP))
		return XDP_DROP;
	bump(0);
	if (ip->ttl != SCRIBBLE_TTL)
		bump(1);
	ip->ttl = 1;
	return XDP_DROP;
}
