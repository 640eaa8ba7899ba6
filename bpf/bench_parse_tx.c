/* xtransit benchmark baseline for per-packet program cost: parses Ethernet and IPv4 (with the
 * same checks a real parser makes) and returns XDP_TX. bench/bench_gre_rate.py times the data
 * plane against it with BPF_PROG_TEST_RUN and repeat (issue: at most 2.5 times this cost).
 * Not part of the product. */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>

int xdp_bench_parse_tx(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);

	if ((void *)(ip + 1) > data_end)
		return XDP_DROP;
	if (eth->h_proto != htons(ETH_P_IP))
		return XDP_PASS;
	if (ip->version != 4 || ip->ihl < 5 || (void *)ip + ip->ihl * 4 > data_end)
		return XDP_DROP;
	return XDP_TX;
}

/* The cost rig's reference callee (bench/rates.py): returns at once. What the rig measures with
 * it is the rig's own cost, subtracted from every program measured through the rig. */
int xdp_bench_tx(struct xdp_md *ctx)
{
	return XDP_TX;
}
