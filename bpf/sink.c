/* xtransit benchmark sink: counts every frame that reaches the interface (packets and bytes, per
 * CPU) and drops it. Attached to the far end of a benchmark topology it measures the rate that
 * really came out of the device under test, independently of that device's own counters.
 *
 * The byte count is the frame as XDP sees it, Ethernet header included, without FCS.
 */
#include <uapi/linux/bpf.h>

struct sink_counters {
	__u64 packets;
	__u64 bytes;
};

/* Per-CPU counters, key 0. */
BPF_PERCPU_ARRAY(sink_counters, struct sink_counters, 1);

int xdp_sink(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct sink_counters *c = sink_counters.lookup(&zero);

	if (c) {
		c->packets++;
		c->bytes += (__u64)(ctx->data_end - ctx->data);
	}
	return XDP_DROP;
}
