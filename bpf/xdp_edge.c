/* xtransit edge data plane: the XDP entry program.
 *
 * It only dispatches: each concern lives in its own header (consts, reasons, structs, maps,
 * checksums, parsers, counters, MSS clamping, forwarding, routing, ICMP, encapsulation, GRE
 * decapsulation, ESP steering, pinned tunnels), and every packet leaves through one exit: xt_account()
 * (stats.h), which counts it under exactly one reason, then the MSS clamp the stage asked for
 * (mss.h).
 *
 *   IPv4 to one of our endpoints:  ESP steering hook (esp_steer.h), then GRE decap (gre.h);
 *                                  anything else to the endpoint is the kernel's (IKE, ICMP).
 *   IPv4 to our fleet address:     GRE from a fleet node for a tunnel pinned here (pin.h).
 *   IPv4 / IPv6 to a customer prefix: encapsulation into the prefix's tunnel (encap.h).
 *   Anything else passes untouched.
 *
 * Compiled by bcc (pipeline/xdp/dataplane.py) with -I<this directory>; feature switches are -D
 * flags (XT_FEATURE_ESP) whose headers carry their own #else stubs.
 */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/icmp.h>

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

#include "consts.h"
#include "drop_reasons.h"
#include "structs.h"
#include "maps.h"
#include "csum.h"
#include "parse.h"
#include "stats.h"
#include "mss.h"
#include "fwd.h"
#include "route.h"
#include "icmp.h"
#include "esp_steer.h"
#include "encap.h"
#include "gre.h"
#include "pin.h"

static __always_inline int xt_dispatch(struct xdp_md *ctx, struct xt_pkt *p)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct xt_cursor c = { .pos = data };
	struct ethhdr *eth;
	struct iphdr *iph;
	__be32 daddr;
	__u32 *ep;
	int proto, l4, action;

	proto = xt_parse_eth(&c, data_end, &eth);
	if (proto == ETH_P_IP) {
		l4 = xt_parse_ipv4(&c, data_end, &iph);
		if (l4 < 0)
			return xt_verdict(p, XDP_PASS, XT_R_NOT_OURS);
		daddr = iph->daddr;
		ep = xt_endpoints.lookup(&daddr);
		if (ep) {
			if (*ep == XT_EP_FLEET)
				return xt_pin_ingress(ctx, p, l4);
			/* ESP / ESP-in-UDP steering (the AF_XDP issue); a no-op stub without it */
			action = xt_esp_ingress(ctx, p, iph, l4);
			if (action != XT_CONTINUE)
				return action;
			if (l4 == XT_IPPROTO_GRE)
				return xt_gre_ingress(ctx, p);
			return xt_verdict(p, XDP_PASS, XT_R_NOT_OURS);
		}
		return xt_encap_v4(ctx, p);
	}
	if (proto == ETH_P_IPV6)
		return xt_encap_v6(ctx, p);
	return xt_verdict(p, XDP_PASS, XT_R_NOT_OURS);
}

int xdp_edge(struct xdp_md *ctx)
{
	struct xt_pkt p = { .reason = XT_R_NOT_OURS };
	int action = xt_dispatch(ctx, &p);

	xt_account(ctx, &p);
	/* One MSS clamp site for all four paths, after the counters so the verifier walks the
	 * option loop once per frame layout rather than once per reason: the stage recorded where
	 * the TCP header is in the frame it leaves (a dropped frame may be clamped: harmless). */
	xt_mss_clamp_exit(ctx, &p);
	return action;
}

/* For the veth peers the data plane does not own: native-mode XDP_REDIRECT and XDP_TX into a
 * veth are dropped unless the receiving end runs an XDP program (or has GRO on). This one only
 * passes. */
int xdp_peer_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}
