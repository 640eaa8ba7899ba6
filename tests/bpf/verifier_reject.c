/* A program the verifier must reject: it reads the packet without a bounds check. Used by
 * tests/test_gre_netns.py to check the loader shows the whole verifier log. */
#include <uapi/linux/bpf.h>

int xdp_edge(struct xdp_md *ctx)
{
	unsigned char *data = (void *)(long)ctx->data;

	return data[20] == 1 ? XDP_DROP : XDP_PASS;
}

int xdp_peer_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}
