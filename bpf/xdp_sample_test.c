/* Test entry programs for the packet sampler (bpf/sample.h), compiled with -DXT_FEATURE_SAMPLE.
 *
 * xdp_sample_test: leaves every frame with the verdict, reason and tunnel written into
 *   xt_sample_test_out[0] by the test, through the sampler, so BPF_PROG_TEST_RUN exercises
 *   sample.h alone (rates, drop limit, record layout, short and long frames).
 *
 * xdp_edge_sampled: the edge dispatcher (bpf/xdp_edge.c, included whole) with the sampler at
 *   its exit, for the namespace tests while xdp_edge.c does not call xt_sample() itself.
 */
#include "xdp_edge.c"
#include "sample.h"

struct xt_sample_test_verdict {
	__u32 action;
	__u32 reason;
	__u32 tunnel;
};

/* What xdp_sample_test returns for every frame: one slot, written by the test. */
BPF_ARRAY(xt_sample_test_out, struct xt_sample_test_verdict, 1);

int xdp_sample_test(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct xt_sample_test_verdict *v = xt_sample_test_out.lookup(&zero);
	struct xt_pkt p = { .reason = XT_R_NOT_OURS };
	int action = XDP_PASS;

	if (v) {
		action = v->action;
		p.reason = v->reason;
		p.tunnel = v->tunnel;
	}
	xt_sample(ctx, &p, action);
	return action;
}

int xdp_edge_sampled(struct xdp_md *ctx)
{
	struct xt_pkt p = { .reason = XT_R_NOT_OURS };
	int action = xt_dispatch(ctx, &p);

	xt_account(ctx, &p);
	xt_sample(ctx, &p, action);
	xt_mss_clamp_exit(ctx, &p);
	return action;
}
