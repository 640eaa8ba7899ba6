/* xtransit edge data plane: packet samples for attack visibility (issue 8).
 *
 * At the single exit the dispatcher calls xt_sample(ctx, p, action): the frame's first
 * XT_SAMPLE_BYTES bytes, as the program leaves it, go to user space through a BPF ring buffer
 * (xt_samples) when
 *   - it is the N-th frame this CPU has seen since the last periodic sample (N = rate;
 *     0 turns periodic samples off), or
 *   - the verdict is XDP_DROP / XDP_ABORTED and this CPU has sent fewer than drop_limit drop
 *     samples in the current one-second window (0 turns drop samples off).
 * The frame is the one the program leaves: after decapsulation the inner packet, after
 * encapsulation the GRE packet, on a drop the frame as it arrived. The collector
 * (pipeline/analytics/samples.py) parses down to the innermost IP header itself.
 *
 * Two builds:
 *   -DXT_FEATURE_SAMPLE   the maps and the sampler below.
 *   default               an empty xt_sample() (#else stub): the dispatcher calls it unconditionally.
 *
 * One per-CPU map, xt_sample_state, holds the configuration (rate, drop_limit: the control plane,
 * pipeline/analytics/samples.py, writes the same values into every CPU's slot, so the fast path
 * needs a single lookup; until it does, both are 0 and nothing is sampled), the bookkeeping and
 * the counters (samples sent, lost because the ring was full, drop samples suppressed).
 *
 * Records are submitted with BPF_RB_NO_WAKEUP: the consumer drains the ring on a timer instead
 * of being woken (an irq_work on the XDP CPU) for every record.
 */
#ifndef XT_SAMPLE_H
#define XT_SAMPLE_H

#ifdef XT_FEATURE_SAMPLE

#ifndef XT_SAMPLE_BYTES
#define XT_SAMPLE_BYTES 128 /* a power of two. Ethernet + outer IPv4 + GRE with key + inner IPv6 + TCP fit */
#endif
#ifndef XT_SAMPLE_RING_PAGES
#define XT_SAMPLE_RING_PAGES 256 /* 1 MiB at 4 KiB pages: ~6,500 records of 160 bytes */
#endif
#define XT_SAMPLE_F_PERIODIC 0x1 /* the 1-in-N sample */
#define XT_SAMPLE_F_DROP 0x2     /* a dropped frame (within drop_limit) */
#define XT_SAMPLE_WINDOW_NS 1000000000ULL

/* One ring buffer record; pipeline/analytics/samples.py mirrors the layout. */
struct xt_sample {
	__u32 tunnel;  /* tunnel index, 0 when not known */
	__u32 reason;  /* XT_R_* the frame left under */
	__u32 action;  /* XDP verdict */
	__u32 flags;   /* XT_SAMPLE_F_* */
	__u32 len;     /* frame length as it left */
	__u32 cap;     /* bytes of data[] filled: min(len, XT_SAMPLE_BYTES) */
	__u8 data[XT_SAMPLE_BYTES];
};

/* xt_sample_state value (per CPU). */
struct xt_sample_state {
	__u32 rate;            /* config: 1 in N frames per CPU; 0: no periodic samples */
	__u32 drop_limit;      /* config: drop samples per CPU per second; 0: none */
	__u64 seen;            /* frames since the last periodic sample */
	__u64 window_start;    /* ns, start of the drop-sample window */
	__u64 window_drops;    /* drop samples sent in that window */
	__u64 sent;            /* records submitted */
	__u64 lost;            /* records not sent: ring buffer full */
	__u64 suppressed;      /* dropped frames not sampled: over drop_limit */
};

/* Sampled frame headers, to user space. */
BPF_RINGBUF_OUTPUT(xt_samples, XT_SAMPLE_RING_PAGES);
/* Sampler configuration, bookkeeping and counters, per CPU: one slot. */
BPF_PERCPU_ARRAY(xt_sample_state, struct xt_sample_state, 1);

static __always_inline void xt_sample(struct xdp_md *ctx, struct xt_pkt *p, int action)
{
	__u32 zero = 0, flags = 0, len, n;
	struct xt_sample_state *st = xt_sample_state.lookup(&zero);
	struct xt_sample *rec;

	if (!st)
		return;
	if (st->rate) {
		st->seen++;
		if (st->seen >= st->rate) {
			st->seen = 0;
			flags |= XT_SAMPLE_F_PERIODIC;
		}
	}
	if ((action == XDP_DROP || action == XDP_ABORTED) && st->drop_limit) {
		__u64 now = bpf_ktime_get_ns();

		if (now - st->window_start >= XT_SAMPLE_WINDOW_NS) {
			st->window_start = now;
			st->window_drops = 0;
		}
		if (st->window_drops < st->drop_limit) {
			st->window_drops++;
			flags |= XT_SAMPLE_F_DROP;
		} else {
			st->suppressed++;
		}
	}
	if (!flags)
		return;
	rec = xt_samples.ringbuf_reserve(sizeof(struct xt_sample));
	if (!rec) {
		st->lost++;
		return;
	}
	len = ctx->data_end - ctx->data;
	rec->tunnel = p->tunnel;
	rec->reason = p->reason;
	rec->action = action;
	rec->flags = flags;
	rec->len = len;
	/* bpf_xdp_load_bytes needs a length in [1, XT_SAMPLE_BYTES] the verifier can see: a
	 * constant, or the shorter length masked (XT_SAMPLE_BYTES is a power of two, so the mask
	 * changes nothing but tells the verifier the bound the compiler's min() lost). */
	if (len >= XT_SAMPLE_BYTES) {
		n = XT_SAMPLE_BYTES;
		if (bpf_xdp_load_bytes(ctx, 0, rec->data, XT_SAMPLE_BYTES))
			n = 0;
	} else {
		n = len;
		asm volatile("" : "+r"(n)); /* hide n < XT_SAMPLE_BYTES so the mask stays */
		n &= XT_SAMPLE_BYTES - 1;
		if (n < 1 || bpf_xdp_load_bytes(ctx, 0, rec->data, n))
			n = 0;
	}
	rec->cap = n;
	xt_samples.ringbuf_submit(rec, BPF_RB_NO_WAKEUP);
	st->sent++;
}

#else

static __always_inline void xt_sample(struct xdp_md *ctx, struct xt_pkt *p, int action)
{
}

#endif /* XT_FEATURE_SAMPLE */

#endif /* XT_SAMPLE_H */
