/* xtransit load generator: the XDP program that BPF_PROG_TEST_RUN runs in live-frame mode
 * (BPF_F_TEST_XDP_LIVE_FRAMES, driven by pipeline/loadgen.py), the technique of xdp-trafficgen.
 *
 * In live-frame mode every run's XDP_TX or XDP_REDIRECT really transmits: XDP_TX goes out of the
 * test run's ingress device (the kernel turns it into a redirect to that device), a redirect to
 * the device given. The kernel takes frames from a page pool whose pages are recycled without
 * their contents being reset, and a receiver that rewrites a frame (TTL, decapsulation, MSS
 * clamping) rewrites our page. So every run rebuilds the frame from a template in a map: the
 * header bytes (copy_len) are copied over the frame, the length is set, and one 16-bit field
 * (a source port) steps through a range, its checksum adjusted incrementally.
 *
 * Built with -DLG_COST_RIG the same program is a measuring rig for per-packet program cost
 * (bench/rates.py): BPF_PROG_TEST_RUN with repeat (not live) runs a program again and again on
 * one buffer, so a program that rewrites the packet (TTL, decapsulation, encapsulation) would be
 * timed on its own output from the second run on. The rig rebuilds the frame from the template,
 * moves the head back where the previous run's program left it (decap and encap only move the
 * head), and tail-calls the program under test.
 */
#include <uapi/linux/bpf.h>

#include "loadgen.h"

/* Templates, index 0 .. nframes-1, filled by Python before the run. */
BPF_ARRAY(lg_frames, struct lg_frame, LG_MAX_FRAMES);
/* Settings (struct lg_config), key 0. */
BPF_ARRAY(lg_config, struct lg_config, 1);
/* Counters per CPU (struct lg_counters), key 0. */
BPF_PERCPU_ARRAY(lg_counters, struct lg_counters, 1);
#ifdef LG_COST_RIG
/* The program under test, index 0. */
BPF_PROG_ARRAY(lg_target, 1);
#endif

/* One's-complement sum folded to 16 bits. */
static __always_inline __u16 lg_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

#if LG_FRAME_MAX & (LG_FRAME_MAX - 1)
#error "LG_FRAME_MAX must be a power of two (offsets and lengths are bounded by masking)"
#endif
#define LG_MASK (LG_FRAME_MAX - 1)

/* A 16-bit field of the template, in the byte order it has on the wire. Indices are masked,
 * not compared: clang moves a range check onto a copy of the register and the verifier then
 * loses the bound. Python keeps offsets within the frame, so the mask never changes them. */
static __always_inline __u16 lg_tmpl16(const struct lg_frame *f, __u32 off)
{
	__u8 hi = f->data[off & LG_MASK], lo = f->data[(off + 1) & LG_MASK];
	__u16 v;

	((__u8 *)&v)[0] = hi;
	((__u8 *)&v)[1] = lo;
	return v;
}

/* Step the varied field and fix its checksum. Both are read from the template (never from the
 * packet, which may hold a receiver's rewrite), so the result does not drift from run to run.
 * RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), all in network byte order (the one's-complement sum
 * does not depend on byte order as long as every operand has the same one). */
static __always_inline int lg_vary(struct xdp_md *ctx, const struct lg_frame *f, __u64 step)
{
	__u16 old, new, csum;
	__u32 off = f->vary_off, coff = f->csum_off;

	old = lg_tmpl16(f, off);
	new = bpf_htons((__u16)(bpf_ntohs(old) + (__u16)step));
	if (bpf_xdp_store_bytes(ctx, off, &new, 2))
		return -1;
	if (!coff)
		return 0;
	csum = lg_tmpl16(f, coff);
	csum = ~lg_fold((__u32)(__u16)~csum + (__u16)~old + new);
	if (csum == 0 && (f->flags & LG_F_CSUM_UDP))
		csum = 0xffff;
	return bpf_xdp_store_bytes(ctx, coff, &csum, 2) ? -1 : 0;
}

int xdp_loadgen(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct lg_counters *cnt = lg_counters.lookup(&zero);
	struct lg_config *cfg = lg_config.lookup(&zero);
	struct lg_frame *f;
	__u32 idx, n, cur;
	__u64 run;

	if (!cnt || !cfg)
		return XDP_ABORTED;
	run = cnt->runs++;
	if (cfg->nframes == 0 || cfg->nframes > LG_MAX_FRAMES)
		goto err;
	idx = cfg->nframes == 1 ? 0 : (__u32)(run % cfg->nframes);
	f = lg_frames.lookup(&idx);
	if (!f || f->len < 14 || f->len > LG_FRAME_MAX)
		goto err;

	/* The length first: the copy and the field writes must land inside the frame. */
	cur = (__u32)(ctx->data_end - ctx->data);
#ifdef LG_COST_RIG
	if (cur != f->len && bpf_xdp_adjust_head(ctx, (int)cur - (int)f->len))
		goto err;
#else
	if (cur != f->len && bpf_xdp_adjust_tail(ctx, (int)f->len - (int)cur))
		goto err;
#endif

	n = f->copy_len;
	if (n < 14 || n > f->len)
		goto err;
	/* 1 .. LG_FRAME_MAX for the verifier (a helper's size must be non-zero and inside the
	 * map value); n itself is already in that range, so this leaves it unchanged. */
	n = ((n - 1) & LG_MASK) + 1;
	if (bpf_xdp_store_bytes(ctx, 0, f->data, n))
		goto err;

	if (f->vary_off && f->vary_range > 1) {
		/* Per-CPU counters would send the same sequence from every CPU: offset each CPU. */
		__u64 step = run / cfg->nframes + (__u64)bpf_get_smp_processor_id() * 7919;
		if (lg_vary(ctx, f, step % f->vary_range))
			goto err;
	}

	cnt->sent++;
	cnt->bytes += f->len;
#ifdef LG_COST_RIG
	lg_target.call(ctx, 0);
	goto err; /* no program under test in lg_target */
#endif
	if (cfg->ifindex)
		return bpf_redirect(cfg->ifindex, 0);
	return XDP_TX;
err:
	cnt->errors++;
	return XDP_ABORTED;
}
