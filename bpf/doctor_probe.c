/* xtransit doctor: the smallest XDP program that proves a real attach works.
 *
 * Counts the frames of one EtherType (DOCTOR_ETHERTYPE, passed in as -D by pipeline/doctor.py:
 * the IEEE 802 local experimental 0x88B5) that the doctor sends across a scratch veth pair, and
 * passes every frame. The same file is what the kernel-headers check compiles.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>

#ifndef DOCTOR_ETHERTYPE
#error "DOCTOR_ETHERTYPE must be given with -D"
#endif

/* seen[0]: frames of DOCTOR_ETHERTYPE that reached the program. */
BPF_ARRAY(seen, u64, 1);

int xdp_doctor_probe(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	int zero = 0;
	u64 *n;

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	if (eth->h_proto != htons(DOCTOR_ETHERTYPE))
		return XDP_PASS;
	n = seen.lookup(&zero);
	if (n)
		__sync_fetch_and_add(n, 1);
	return XDP_PASS;
}
