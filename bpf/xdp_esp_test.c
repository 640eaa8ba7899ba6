/* xdp_esp_test.c - the IPsec data path's own XDP programs, until bpf/xdp_edge.c is built with
 * -DXT_FEATURE_ESP and dispatches to the hooks of esp_steer.h itself.
 *
 *   xdp_esp_steer  on the edge's outside devices: Ethernet + IPv4 to an endpoint -> esp_ingress();
 *                  to a customer prefix routed to an IPsec tunnel -> TTL, MSS clamp, worker.
 *                  Anything else passes to the kernel.
 *   xdp_esp_fwd    on the inner end of the worker's internal veth pair (pipeline/ipsec.py): the
 *                  worker transmits decrypted and encrypted packets there; this program routes them
 *                  with the kernel FIB (bpf_fib_lookup) and redirects to the egress device. Transit
 *                  packets (decrypted inner packets) get TTL - 1 here; packets the edge originated
 *                  (outer ESP from a local tunnel endpoint) keep their TTL. No neighbour yet, TTL
 *                  <= 1, or anything the FIB does not forward: XDP_PASS, the kernel handles it.
 *   esp_nexthop    never attached (a TC program): the worker runs it (BPF_PROG_TEST_RUN) to ask
 *                  the kernel FIB where a packet would go, then sends it there itself
 *                  (bpf/nexthop.h).
 *
 * Both live in one object so they share the maps. Parsing and the MSS clamp here are local and
 * minimal: once the edge program carries ESP they are the dispatcher's (parse.h, mss.h, fwd.h).
 */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

#define XT_ESP_STANDALONE 1
#include "esp_steer.h"
#include "nexthop.h"

/* Value of esp_routes4: the IPsec tunnel a customer prefix is routed to. */
struct esp_route {
	__u32 tunnel;    /* tunnel index (the outbound SA's tunnel_id) */
	__u16 mss;       /* TCP MSS clamp, 0 = XT_ESP_MSS_DEFAULT */
	__u16 reserved;
};

struct esp_lpm4 {
	__u32 prefixlen;
	__u8 addr[4];
};

struct esp_lpm6 {
	__u32 prefixlen;
	__u8 addr[16];
};

/* Local IPv4 tunnel endpoints that terminate IPsec (address as on the wire -> 1). */
BPF_HASH(esp_endpoints, __be32, __u32, 256);
/* Customer IPv4 prefixes routed to IPsec tunnels. */
BPF_LPM_TRIE(esp_routes4, struct esp_lpm4, struct esp_route, 65536);
/* Customer IPv6 prefixes routed to IPsec tunnels (inner IPv6 over outer IPv4 ESP). */
BPF_LPM_TRIE(esp_routes6, struct esp_lpm6, struct esp_route, 65536);

/* RFC 1624 eqn. 3 for one 16-bit word, folded twice. */
static __always_inline __u16 esp_csum_replace16(__u16 check, __u16 old, __u16 new_)
{
	__u32 sum = (__u16)~check + (__u16)~old + (__u32)new_;

	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

/* TCP SYN / SYN-ACK at frame offset l4_off: lower the MSS option to `mss`, never raise it;
 * malformed options are left alone and never read out of bounds. 1 when lowered. */
static __always_inline int esp_clamp_mss(struct xdp_md *ctx, __u32 l4_off, __u16 mss)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct tcphdr *tcp = data + (l4_off & 0xff);

	if ((void *)(tcp + 1) > data_end || !tcp->syn)
		return 0;
	__u32 doff = tcp->doff * 4;
	if (doff <= sizeof(*tcp))
		return 0;
	__u8 *end = (__u8 *)tcp + doff;
	__u8 *opt = (__u8 *)(tcp + 1);
	if ((void *)end > data_end)
		return 0;
#pragma unroll
	for (int i = 0; i < 40; i++) {
		if ((void *)(opt + 1) > data_end || opt >= end)
			return 0;
		__u8 kind = opt[0];
		if (kind == 0)
			return 0;
		if (kind == 1) {
			opt++;
			continue;
		}
		if ((void *)(opt + 2) > data_end || opt + 2 > end)
			return 0;
		__u8 len = opt[1];
		if (len < 2 || opt + len > end)
			return 0;
		if (kind == 2) {
			if (len != 4 || (void *)(opt + 4) > data_end)
				return 0;
			__u16 old = ((__u16)opt[2] << 8) | opt[3];
			if (old <= mss)
				return 0;
			__u16 old_raw, new_raw = bpf_htons(mss);
			__builtin_memcpy(&old_raw, opt + 2, 2);
			if ((opt + 2 - (__u8 *)tcp) & 1) /* odd offset: the value straddles two words */
				tcp->check = esp_csum_replace16(tcp->check,
								(__u16)(old_raw >> 8 | old_raw << 8),
								(__u16)(new_raw >> 8 | new_raw << 8));
			else
				tcp->check = esp_csum_replace16(tcp->check, old_raw, new_raw);
			__builtin_memcpy(opt + 2, &new_raw, 2);
			return 1;
		}
		opt += len;
	}
	return 0;
}

/* Into the prefix's tunnel: TTL / hop limit, MSS clamp, worker. */
static __always_inline int esp_steer_encrypt(struct xdp_md *ctx, struct esp_route *rt)
{
	__u32 why = 0, l4_off = 0;
	__u32 tunnel = rt->tunnel;
	__u16 mss = rt->mss ? rt->mss : XT_ESP_MSS_DEFAULT;
	int action = esp_encrypt_prepare(ctx, &l4_off);

	if (action != XT_CONTINUE)
		return action;
	if (l4_off && esp_clamp_mss(ctx, l4_off, mss))
		esp_count(XT_ESP_STEER_MSS_CLAMPED);
	return esp_to_worker(ctx, XT_ESP_KIND_ENCRYPT, tunnel, mss, &why);
}

int xdp_esp_steer(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u32 why = 0;

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end)
			return XDP_PASS;
		struct esp_lpm6 k6 = {.prefixlen = 128};
		__builtin_memcpy(k6.addr, &ip6->daddr, 16);
		struct esp_route *rt6 = esp_routes6.lookup(&k6);
		return rt6 ? esp_steer_encrypt(ctx, rt6) : XDP_PASS;
	}
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return XDP_PASS;
	if (ip->ihl < 5 || (void *)ip + ip->ihl * 4 > data_end) {
		esp_count(XT_ESP_STEER_MALFORMED);
		return XDP_PASS;
	}
	__be32 daddr = ip->daddr;
	if (esp_endpoints.lookup(&daddr)) {
		int action = esp_ingress(ctx, ip, &why);
		return action == XT_CONTINUE ? XDP_PASS : action;
	}
	struct esp_lpm4 k = {.prefixlen = 32};
	__builtin_memcpy(k.addr, &daddr, 4);
	struct esp_route *rt = esp_routes4.lookup(&k);
	return rt ? esp_steer_encrypt(ctx, rt) : XDP_PASS;
}

/* Decrypted IPv6 inner packets: hop limit, FIB, redirect (always transit: endpoints are IPv4). */
static __always_inline int esp_fwd_v6(struct xdp_md *ctx, struct ethhdr *eth, void *data_end)
{
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	struct bpf_fib_lookup fib = {};

	if ((void *)(ip6 + 1) > data_end)
		return XDP_PASS;
	if (ip6->hop_limit <= 1) {
		esp_count(XT_ESP_STEER_FWD_TTL);
		return XDP_PASS;
	}
	nh_fib_ipv6(&fib, ip6, data_end, 1);   /* with the ports, as the kernel forwards */
	fib.tot_len = bpf_ntohs(ip6->payload_len) + sizeof(*ip6);
	fib.ifindex = ctx->ingress_ifindex;
	if (bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS) {
		esp_count(XT_ESP_STEER_FWD_PASS);
		return XDP_PASS;
	}
	ip6->hop_limit--;
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	esp_count(XT_ESP_STEER_FWD_REDIRECT);
	return bpf_redirect(fib.ifindex, 0);
}

int xdp_esp_fwd(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct bpf_fib_lookup fib = {};

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return esp_fwd_v6(ctx, eth, data_end);
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end || ip->ihl < 5)
		return XDP_PASS;
	__be32 saddr = ip->saddr;
	int transit = esp_endpoints.lookup(&saddr) == NULL;
	if (transit && ip->ttl <= 1) {
		esp_count(XT_ESP_STEER_FWD_TTL);
		return XDP_PASS;
	}
	nh_fib_ipv4(&fib, ip, data_end, 1);     /* with the ports, as the kernel forwards */
	fib.tot_len = bpf_ntohs(ip->tot_len);
	fib.ifindex = ctx->ingress_ifindex;
	if (bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS) {
		esp_count(XT_ESP_STEER_FWD_PASS);
		return XDP_PASS;
	}
	if (transit)
		esp_ttl_dec(ip);
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	esp_count(XT_ESP_STEER_FWD_REDIRECT);
	return bpf_redirect(fib.ifindex, 0);
}
