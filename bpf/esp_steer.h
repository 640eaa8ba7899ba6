/* xtransit edge data plane: ESP and ESP-in-UDP steering to AF_XDP (issue 5).
 *
 * Three builds:
 *   default (no switch)   the #else stubs at the end keep the dispatcher free of #ifdefs: nothing
 *                         is steered on ingress, and a prefix routed to an IPsec tunnel goes to
 *                         the kernel, counted (XT_R_IPSEC_NOT_BUILT).
 *   -DXT_FEATURE_ESP      bpf/xdp_edge.c's hooks xt_esp_ingress() / xt_esp_encap() are the core
 *                         below, wired into the dispatcher's reasons and single exit (stats.h);
 *                         the MSS clamp is requested from the exit (mss.h) like GRE's.
 *   -DXT_ESP_STANDALONE   only the core, for bpf/xdp_esp_test.c (its own maps and dispatch),
 *                         which the IPsec data path uses until the edge program carries ESP.
 *
 * The core (RFC 3948 section 2.2 for what may arrive on port 4500):
 *   to a local tunnel endpoint (the caller looked the endpoint up):
 *     IP protocol 50                                  -> worker (decrypt)
 *     UDP dport 4500, one payload byte 0xFF           -> drop, counted: NAT-keepalive (RFC 3948 2.3)
 *     UDP dport 4500, first 4 payload bytes zero      -> XDP_PASS: IKE behind the non-ESP marker
 *     UDP dport 4500, anything else                   -> worker (ESP-in-UDP; the native module
 *                                                        counts a runt as `not_esp`)
 *     UDP dport 500                                   -> XDP_PASS: IKE
 *     an outer fragment of any of those               -> XDP_PASS, counted (the kernel reassembles)
 *     anything else                                   -> XT_CONTINUE (GRE, ICMP, ...)
 *   routed to an IPsec tunnel: TTL / hop limit <= 1   -> XDP_PASS, counted (the kernel answers ICMP)
 *     else TTL - 1 (incremental checksum), MSS clamp  -> worker (encrypt for that tunnel)
 *
 * The worker (native/xsk.c) learns what to do from 16 bytes of XDP metadata in front of the packet
 * (struct xt_esp_meta; AF_XDP copy mode copies metadata into the frame; the worker clears the
 * magic after reading it, so a reused frame is never taken for a steered one).
 *
 * Counters: esp_steer_stats[XT_ESP_STEER_*] (per CPU). pipeline/ipsec.py reads the names from
 * this file; append only, never reuse a retired number.
 */
#ifndef XT_ESP_STEER_H
#define XT_ESP_STEER_H

#if defined(XT_FEATURE_ESP) || defined(XT_ESP_STANDALONE)

#define XT_ESP_META_MAGIC 0x58544553 /* "XTES"; native/xsk.h XT_XSK_META_MAGIC */
#define XT_ESP_KIND_DECRYPT 1
#define XT_ESP_KIND_ENCRYPT 2
#define XT_ESP_PORT_IKE 500
#define XT_ESP_PORT_NATT 4500
#define XT_ESP_MSS_DEFAULT 1360      /* config.IPSEC_MSS_DEFAULT */
#define XT_ESP_XSK_SLOTS 256         /* XSKMAP size: device slot base + rx queue */
#define XT_ESP_MAX_QUEUES 16         /* queues per device; slot bases are multiples of this */
#ifndef XT_CONTINUE
#define XT_CONTINUE (-1)
#endif

/* Counter numbers (esp_steer_stats index). */
#define XT_ESP_STEER_DECRYPT 0       /* ESP / ESP-in-UDP handed to the worker */
#define XT_ESP_STEER_ENCRYPT 1       /* customer-bound packets handed to the worker */
#define XT_ESP_STEER_IKE_PASS 2      /* UDP 500 and marker-0 UDP 4500 passed to the kernel */
#define XT_ESP_STEER_KEEPALIVE 3     /* NAT-keepalive dropped */
#define XT_ESP_STEER_FRAGMENT 4      /* outer IP fragment to an endpoint, passed to the kernel */
#define XT_ESP_STEER_NO_WORKER 5     /* no worker socket for this device/queue: dropped */
#define XT_ESP_STEER_TTL_EXCEEDED 6  /* customer-bound with TTL <= 1, passed to the kernel */
#define XT_ESP_STEER_MSS_CLAMPED 7   /* SYN / SYN-ACK whose MSS option was lowered (standalone) */
#define XT_ESP_STEER_MALFORMED 8     /* IP header unusable: dropped */
#define XT_ESP_STEER_META_FAIL 9     /* no room for the metadata: dropped */
#define XT_ESP_STEER_FWD_REDIRECT 10 /* forward program: FIB hit, redirected */
#define XT_ESP_STEER_FWD_PASS 11     /* forward program: no neighbour / not forwardable: kernel */
#define XT_ESP_STEER_FWD_TTL 12      /* forward program: transit packet with TTL <= 1: kernel */
#define XT_ESP_STEER__COUNT 13

/* Metadata in front of a steered packet (host byte order); native/xsk.c reads it. */
struct xt_esp_meta {
	__u32 magic;
	__u16 kind;
	__u16 mss;       /* encrypt: the clamp applied (informational) */
	__u32 tunnel;    /* encrypt: tunnel index = the outbound SA's tunnel_id */
	__u32 reserved;
};

/* The worker's AF_XDP sockets, key = device slot base + rx queue (pipeline/xsk.py fills it). */
BPF_XSKMAP(esp_xsks, XT_ESP_XSK_SLOTS);
/* ifindex -> slot base in esp_xsks (a multiple of XT_ESP_MAX_QUEUES); absent: no worker there. */
BPF_HASH(esp_xsk_slot, __u32, __u32, 64);
/* Steering counters, XT_ESP_STEER_* (per CPU; Python sums). */
BPF_PERCPU_ARRAY(esp_steer_stats, __u64, XT_ESP_STEER__COUNT);

static __always_inline void esp_count(__u32 reason)
{
	__u64 *n = esp_steer_stats.lookup(&reason);

	if (n)
		*n += 1;
}

/* Decrement the IPv4 TTL with an incremental header checksum update (as ip_decrease_ttl). */
static __always_inline void esp_ttl_dec(struct iphdr *ip)
{
	__u32 check = ip->check;

	check += bpf_htons(0x0100);
	ip->check = (__u16)(check + (check >= 0xFFFF));
	ip->ttl--;
}

/* Push the metadata and redirect to the worker socket of this device and rx queue. *why is
 * set to the XT_ESP_STEER_* counter the packet was counted under. */
static __always_inline int esp_to_worker(struct xdp_md *ctx, __u16 kind, __u32 tunnel, __u16 mss,
					 __u32 *why)
{
	__u32 ifindex = ctx->ingress_ifindex;
	__u32 *base = esp_xsk_slot.lookup(&ifindex);

	if (!base || ctx->rx_queue_index >= XT_ESP_MAX_QUEUES) {
		*why = XT_ESP_STEER_NO_WORKER;
		esp_count(*why);
		return XDP_DROP;
	}
	__u32 key = *base + ctx->rx_queue_index;
	if (bpf_xdp_adjust_meta(ctx, -(int)sizeof(struct xt_esp_meta))) {
		*why = XT_ESP_STEER_META_FAIL;
		esp_count(*why);
		return XDP_DROP;
	}
	void *data = (void *)(long)ctx->data;
	struct xt_esp_meta *meta = (void *)(long)ctx->data_meta;
	if ((void *)(meta + 1) > data) {
		*why = XT_ESP_STEER_META_FAIL;
		esp_count(*why);
		return XDP_DROP;
	}
	meta->magic = XT_ESP_META_MAGIC;
	meta->kind = kind;
	meta->mss = mss;
	meta->tunnel = tunnel;
	meta->reserved = 0;
	*why = kind == XT_ESP_KIND_DECRYPT ? XT_ESP_STEER_DECRYPT : XT_ESP_STEER_ENCRYPT;
	esp_count(*why);
	/* a key without a socket falls back to XDP_DROP (lower bits of flags, kernel >= 5.13) */
	return esp_xsks.redirect_map(key, XDP_DROP);
}

static __always_inline int esp_leave(int action, __u32 reason, __u32 *why)
{
	*why = reason;
	esp_count(reason);
	return action;
}

/* Ingress to one of our endpoints. `ip` was parsed by the caller (IHL >= 5, header inside the
 * frame). Returns an action (*why: the XT_ESP_STEER_* counter it was counted under) or
 * XT_CONTINUE. */
static __always_inline int esp_ingress(struct xdp_md *ctx, struct iphdr *ip, __u32 *why)
{
	void *data_end = (void *)(long)ctx->data_end;
	__u32 ihl = ip->ihl * 4;
	int frag = ip->frag_off & bpf_htons(0x3fff); /* MF or a fragment offset */

	if (ip->protocol == IPPROTO_ESP) {
		if (frag)
			return esp_leave(XDP_PASS, XT_ESP_STEER_FRAGMENT, why);
		return esp_to_worker(ctx, XT_ESP_KIND_DECRYPT, 0, 0, why);
	}
	if (ip->protocol != IPPROTO_UDP)
		return XT_CONTINUE;
	struct udphdr *udp = (void *)ip + ihl;
	if ((void *)(udp + 1) > data_end)
		return XT_CONTINUE;
	__u16 dport = bpf_ntohs(udp->dest);
	if (dport != XT_ESP_PORT_NATT && dport != XT_ESP_PORT_IKE)
		return XT_CONTINUE;
	if (frag)
		return esp_leave(XDP_PASS, XT_ESP_STEER_FRAGMENT, why);
	if (dport == XT_ESP_PORT_IKE)
		return esp_leave(XDP_PASS, XT_ESP_STEER_IKE_PASS, why);
	__u8 *pl = (__u8 *)(udp + 1);
	__u16 ulen = bpf_ntohs(udp->len);
	if (ulen == sizeof(*udp) + 1 && (void *)(pl + 1) <= data_end && pl[0] == 0xff)
		return esp_leave(XDP_DROP, XT_ESP_STEER_KEEPALIVE, why);
	if (ulen >= sizeof(*udp) + 4 && (void *)(pl + 4) <= data_end &&
	    (pl[0] | pl[1] | pl[2] | pl[3]) == 0)
		return esp_leave(XDP_PASS, XT_ESP_STEER_IKE_PASS, why);
	return esp_to_worker(ctx, XT_ESP_KIND_DECRYPT, 0, 0, why);
}

/* Into an IPsec tunnel: the IP header right after Ethernet (IPv4 or IPv6), TTL / hop limit
 * checked and decremented. Returns XT_CONTINUE when the packet may go to the worker, with
 * *l4_off set to the frame offset of its TCP header (0 when not TCP or a later fragment), or an
 * action. */
static __always_inline int esp_encrypt_prepare(struct xdp_md *ctx, __u32 *l4_off)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	*l4_off = 0;
	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > data_end || ip->ihl < 5) {
			esp_count(XT_ESP_STEER_MALFORMED);
			return XDP_DROP;
		}
		if (ip->ttl <= 1) {
			esp_count(XT_ESP_STEER_TTL_EXCEEDED);
			return XDP_PASS;
		}
		esp_ttl_dec(ip);
		if (ip->protocol == IPPROTO_TCP && !(ip->frag_off & bpf_htons(0x1fff)))
			*l4_off = sizeof(*eth) + ip->ihl * 4;
		return XT_CONTINUE;
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end) {
			esp_count(XT_ESP_STEER_MALFORMED);
			return XDP_DROP;
		}
		if (ip6->hop_limit <= 1) {
			esp_count(XT_ESP_STEER_TTL_EXCEEDED);
			return XDP_PASS;
		}
		ip6->hop_limit--; /* no header checksum in IPv6 */
		if (ip6->nexthdr == IPPROTO_TCP)
			*l4_off = sizeof(*eth) + sizeof(*ip6);
		return XT_CONTINUE;
	}
	return XDP_PASS;
}

#endif /* XT_FEATURE_ESP || XT_ESP_STANDALONE */

#if defined(XT_FEATURE_ESP)
/*
 * The edge program's hooks: every outcome under a reason of drop_reasons.h (XT_R_ESP_*);
 * esp_steer_stats keeps the finer ESP counts.
 */
static __always_inline int xt_esp_ingress(struct xdp_md *ctx, struct xt_pkt *p,
					  struct iphdr *iph, int l4proto)
{
	__u32 why = 0;
	int action = esp_ingress(ctx, iph, &why);

	switch (action) {
	case XT_CONTINUE:
		return XT_CONTINUE;
	case XDP_REDIRECT:
		return xt_verdict(p, action, XT_R_ESP_STEERED);
	case XDP_PASS:
		return xt_verdict(p, action, why == XT_ESP_STEER_FRAGMENT ? XT_R_OUTER_FRAGMENT
									   : XT_R_ESP_IKE);
	default:
		return xt_verdict(p, action, why == XT_ESP_STEER_KEEPALIVE ? XT_R_ESP_KEEPALIVE
									    : XT_R_ESP_NO_WORKER);
	}
}

static __always_inline int xt_esp_encap(struct xdp_md *ctx, struct xt_pkt *p,
					const struct xt_tunnel *t)
{
	__u32 l4_off, why = 0;
	__u16 mss = t->mss ? t->mss : XT_ESP_MSS_DEFAULT;
	int action = esp_encrypt_prepare(ctx, &l4_off);

	if (action == XDP_PASS)
		return xt_verdict(p, action, XT_R_TTL_EXPIRED);
	if (action != XT_CONTINUE)
		return xt_verdict(p, action, XT_R_INNER_MALFORMED);
	if (l4_off) {
		p->mss = mss;      /* clamped at the single exit (mss.h) */
		p->l4_off = l4_off;
	}
	action = esp_to_worker(ctx, XT_ESP_KIND_ENCRYPT, p->tunnel, mss, &why);
	return xt_verdict(p, action, action == XDP_REDIRECT ? XT_R_ESP_STEERED : XT_R_ESP_NO_WORKER);
}

#elif !defined(XT_ESP_STANDALONE)
/* ESP or ESP-in-UDP addressed to one of our endpoints: XT_CONTINUE (not steered). */
static __always_inline int xt_esp_ingress(struct xdp_md *ctx, struct xt_pkt *p,
					  struct iphdr *iph, int l4proto)
{
	return XT_CONTINUE;
}

/* A packet routed into an IPsec tunnel. */
static __always_inline int xt_esp_encap(struct xdp_md *ctx, struct xt_pkt *p,
					const struct xt_tunnel *t)
{
	return xt_verdict(p, XDP_PASS, XT_R_IPSEC_NOT_BUILT);
}
#endif

#endif /* XT_ESP_STEER_H */
