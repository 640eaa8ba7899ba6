/* xtransit edge data plane: Internet checksum helpers.
 *
 * Values are handled as host-order integers of the 16-bit words as they appear in network
 * order (the checksum field too): one's complement sums are independent of byte order
 * (RFC 1071 section 2(B)), so callers convert once with bpf_ntohs/bpf_htons.
 */
#ifndef XT_CSUM_H
#define XT_CSUM_H

/* Fold a 32-bit sum of 16-bit words to 16 bits. Two rounds: the first may carry again
 * (0x1ffff -> 0x10000 -> 0x0001), a third never does. */
static __always_inline __u16 xt_csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* RFC 1624 section 3, equation 3: HC' = ~(~HC + ~m + m'), for one 16-bit word m -> m'.
 * Unlike equation 2 it never produces 0x0000 from a nonzero header (section 4). */
static __always_inline __u16 xt_csum_replace16(__u16 check, __u16 old, __u16 new)
{
	__u32 sum = (__u16)~check;

	sum += (__u16)~old;
	sum += new;
	return (__u16)~xt_csum_fold(sum);
}

/* Replace a 16-bit value stored at an odd byte offset from the start of the checksummed data:
 * its high byte sits in the low half of one word and its low byte in the high half of the next,
 * so it contributes its byte-swapped value to the sum. */
static __always_inline __u16 xt_csum_replace16_at(__u16 check, __u16 old, __u16 new, int odd)
{
	if (odd) {
		old = (__u16)((old << 8) | (old >> 8));
		new = (__u16)((new << 8) | (new >> 8));
	}
	return xt_csum_replace16(check, old, new);
}

/* Header checksum of a 20-byte IPv4 header whose check field is zero (RFC 791). */
static __always_inline __u16 xt_ipv4_csum(const struct iphdr *iph)
{
	const __u16 *w = (const __u16 *)iph;
	__u32 sum = 0;
	int i;

#pragma unroll
	for (i = 0; i < XT_IPV4_HLEN / 2; i++)
		sum += bpf_ntohs(w[i]);
	return (__u16)~xt_csum_fold(sum);
}

/* Decrement an IPv4 TTL, updating the header checksum incrementally (the TTL shares its
 * 16-bit word with the protocol byte). Caller checked ttl > 1. */
static __always_inline void xt_ipv4_dec_ttl(struct iphdr *iph)
{
	__u16 old = (__u16)((iph->ttl << 8) | iph->protocol);
	__u16 new = old - 0x0100;

	iph->ttl--;
	iph->check = bpf_htons(xt_csum_replace16(bpf_ntohs(iph->check), old, new));
}

#endif /* XT_CSUM_H */
