/* xtransit benchmark programs (bench/bench_gre_cost.py): the edge program and a baseline,
 * each behind the same "restore the frame" prologue.
 *
 * BPF_PROG_TEST_RUN with repeat runs a program N times on ONE buffer and does not reset it:
 * after the first run the frame is already decapsulated (or encapsulated). So every program
 * here first puts the template frame back (head moved back by what the previous run moved it,
 * length and bytes restored from xt_bench_frame), and the harness subtracts the cost of
 * bench_restore_only, which does just that.
 */
#include "xdp_edge.c"

#define XT_BENCH_LEN 128 /* every template frame is padded to this length */

struct xt_bench_frame {
	__s32 decap_delta;  /* head moved by a forwarded decap (positive: bytes stripped) */
	__s32 encap_delta;  /* ... by a forwarded encap (negative: bytes pushed) */
	__s32 last_delta;   /* what the previous run moved it by */
	__u32 pad;
	__u8 bytes[XT_BENCH_LEN];
};

/* The template and the per-run state (one slot per CPU). */
BPF_PERCPU_ARRAY(xt_bench_frame, struct xt_bench_frame, 1);

static __always_inline struct xt_bench_frame *xt_bench_restore(struct xdp_md *ctx)
{
	int zero = 0, len;
	struct xt_bench_frame *f = xt_bench_frame.lookup(&zero);

	if (!f)
		return 0;
	if (f->last_delta && bpf_xdp_adjust_head(ctx, -f->last_delta))
		return 0;
	f->last_delta = 0;
	len = (long)ctx->data_end - (long)ctx->data;
	if (len != XT_BENCH_LEN && bpf_xdp_adjust_tail(ctx, XT_BENCH_LEN - len))
		return 0;
	if (bpf_xdp_store_bytes(ctx, 0, f->bytes, XT_BENCH_LEN))
		return 0;
	return f;
}

int bench_restore_only(struct xdp_md *ctx)
{
	return xt_bench_restore(ctx) ? XDP_TX : XDP_ABORTED;
}

/* The baseline of the issue: parse Ethernet and IPv4, return XDP_TX. */
int bench_baseline(struct xdp_md *ctx)
{
	void *data, *data_end;
	struct xt_cursor c;
	struct ethhdr *eth;
	struct iphdr *iph;

	if (!xt_bench_restore(ctx))
		return XDP_ABORTED;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	c.pos = data;
	if (xt_parse_eth(&c, data_end, &eth) != ETH_P_IP)
		return XDP_PASS;
	if (xt_parse_ipv4(&c, data_end, &iph) < 0)
		return XDP_PASS;
	return XDP_TX;
}

int bench_edge(struct xdp_md *ctx)
{
	struct xt_bench_frame *f = xt_bench_restore(ctx);
	struct xt_pkt p = { .reason = XT_R_NOT_OURS };
	int action;

	if (!f)
		return XDP_ABORTED;
	action = xt_dispatch(ctx, &p);
	xt_account(ctx, &p);
	xt_mss_clamp_exit(ctx, &p);
	if (p.reason == XT_R_DECAP_FORWARDED)
		f->last_delta = f->decap_delta;
	else if (p.reason == XT_R_ENCAP_FORWARDED)
		f->last_delta = f->encap_delta;
	return action;
}

/* The forwarding step alone (bpf_fib_lookup, MAC rewrite, redirect) on the template frame:
 * how much of the data plane's cost is the kernel's route lookup. */
int bench_fib(struct xdp_md *ctx)
{
	struct xt_pkt p = { .reason = XT_R_NOT_OURS };

	if (!xt_bench_restore(ctx))
		return XDP_ABORTED;
	return xt_forward_v4(ctx, &p, 0, XT_R_DECAP_FORWARDED);
}
