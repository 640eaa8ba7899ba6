/* xtransit edge data plane: counters. Per-CPU maps, so plain increments (the program runs in
 * softirq context, one instance per CPU at a time). */
#ifndef XT_STATS_H
#define XT_STATS_H

/* A packet entered (decap) or left (encap) tunnel `index`; bytes are the inner L3 bytes. */
static __always_inline void xt_count_decap(__u32 index, __u32 bytes)
{
	struct xt_tunnel_stats *s = xt_tunnel_stats.lookup(&index);

	if (s) {
		s->decap_packets++;
		s->decap_bytes += bytes;
	}
}

static __always_inline void xt_count_encap(__u32 index, __u32 bytes)
{
	struct xt_tunnel_stats *s = xt_tunnel_stats.lookup(&index);

	if (s) {
		s->encap_packets++;
		s->encap_bytes += bytes;
	}
}

/* The single exit: count the frame under its reason (and under its tunnel when known and not
 * simply forwarded). */
static __always_inline void xt_account(struct xdp_md *ctx, struct xt_pkt *p)
{
	__u32 reason = p->reason;
	struct xt_counter *c;

	if (reason >= XT_R_MAX)
		reason = XT_R_MAX - 1;
	c = xt_reason_stats.lookup(&reason);
	if (c) {
		c->packets++;
		c->bytes += ctx->data_end - ctx->data;
	}
	if (p->tunnel && reason != XT_R_DECAP_FORWARDED && reason != XT_R_ENCAP_FORWARDED) {
		struct xt_drop_key k = { .tunnel = p->tunnel, .reason = reason };
		__u64 one = 1, *n = xt_tunnel_drops.lookup(&k);

		if (n) {
			*n += 1;
		} else if (xt_tunnel_drops.insert(&k, &one) != 0) {
			/* another CPU created it first: count on ours */
			n = xt_tunnel_drops.lookup(&k);
			if (n)
				*n += 1;
		}
	}
}

/* Leave with an action and a reason (stages: `return xt_verdict(p, XDP_DROP, XT_R_...)`). */
static __always_inline int xt_verdict(struct xt_pkt *p, int action, __u32 reason)
{
	p->reason = reason;
	return action;
}

#endif /* XT_STATS_H */
