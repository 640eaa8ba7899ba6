/* xtransit edge data plane: which tunnel carries a packet to a customer prefix.
 *
 * The LPM trie gives the longest matching prefix; its value lists the tunnels sharing that
 * prefix's lowest priority value (the loader drops the others). Among those, a flow hash of the
 * 5-tuple picks one, so a flow always takes the same tunnel. pipeline/xdp/dataplane.py has the
 * same hash (flow_hash4/flow_hash6) for tests and diagnostics: keep them in step.
 */
#ifndef XT_ROUTE_H
#define XT_ROUTE_H

/* A 32-bit finaliser (the "lowbias32" constants): every input bit affects every output bit. */
static __always_inline __u32 xt_mix32(__u32 h)
{
	h ^= h >> 16;
	h *= 0x7feb352d;
	h ^= h >> 15;
	h *= 0x846ca68b;
	h ^= h >> 16;
	return h;
}

/* Words are the raw 32-bit loads of the header fields (host order of the wire bytes);
 * ports is the raw load of the source and destination port pair, 0 when there is none. */
static __always_inline __u32 xt_flow_hash4(__u32 saddr, __u32 daddr, __u8 proto, __u32 ports)
{
	return xt_mix32(saddr ^ xt_mix32(daddr ^ xt_mix32(ports ^ proto)));
}

static __always_inline __u32 xt_flow_hash6(const __u32 *s, const __u32 *d, __u8 proto,
					   __u32 ports)
{
	__u32 h = xt_mix32(ports ^ proto);
	int i;

#pragma unroll
	for (i = 0; i < 4; i++)
		h = xt_mix32(h ^ s[i] ^ xt_mix32(d[i]));
	return h;
}

/* The tunnel index for a flow, 0 when the route is empty or malformed. */
static __always_inline __u32 xt_route_pick(const struct xt_route *r, __u32 hash)
{
	__u32 n = r->count, slot;

	if (n == 0 || n > XT_MAX_ECMP)
		return 0;
	slot = hash % n;
	/* clang knows slot < n <= XT_MAX_ECMP and drops the check below; the verifier, which sees
	 * the modulo as divide-multiply-subtract, does not */
	asm volatile("" : "+r"(slot));
	if (slot >= XT_MAX_ECMP)
		return 0;
	return r->tunnels[slot];
}

#endif /* XT_ROUTE_H */
