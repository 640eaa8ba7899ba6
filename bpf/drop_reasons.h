/* xtransit edge data plane: why a packet left the program the way it did.
 *
 * Every packet is counted under exactly one reason (xt_reason_stats, and xt_tunnel_drops when the
 * tunnel is known). pipeline/xdp/reasons.py parses THIS file for the names, so each reason is one
 * line `#define XT_R_<NAME> <number> // <verdict>: <meaning>`. A retired number is never reused:
 * move its line to the retired list below instead of deleting it.
 */
#ifndef XT_DROP_REASONS_H
#define XT_DROP_REASONS_H

#define XT_R_NOT_OURS 0           // pass: not to a tunnel endpoint, not to a customer prefix
#define XT_R_DECAP_FORWARDED 1    // redirect: decapsulated and forwarded
#define XT_R_ENCAP_FORWARDED 2    // redirect: encapsulated and forwarded
#define XT_R_UNKNOWN_TUNNEL 3     // drop: GRE to our endpoint from no configured tunnel
#define XT_R_GRE_VERSION 4        // drop: GRE version is not 0
#define XT_R_GRE_ROUTING 5        // drop: GRE routing bit set (RFC 1701 source routing)
#define XT_R_GRE_TRUNCATED 6      // drop: frame ends inside the GRE header its flags announce
#define XT_R_GRE_PROTOCOL 7       // drop: inner protocol neither IPv4 nor IPv6
#define XT_R_OUTER_FRAGMENT 8     // pass: outer IPv4 fragment (not reassembled yet)
#define XT_R_OUTER_MALFORMED 9    // drop: outer IPv4 header to our endpoint is invalid
#define XT_R_INNER_MALFORMED 10   // drop: inner IP header invalid or longer than the frame
#define XT_R_TTL_EXPIRED 11       // pass: TTL / hop limit <= 1, the kernel answers ICMP
#define XT_R_FIB_NO_NEIGH 12      // pass: route found, neighbour unresolved: the kernel resolves
#define XT_R_FIB_PASS 13          // pass: FIB says not forwarded here (local, no route, ...)
#define XT_R_FRAG_NEEDED 14       // tx: too big with DF set, ICMP fragmentation needed sent
#define XT_R_TOO_BIG 15           // pass: too big without DF (the kernel fragments)
#define XT_R_TOO_BIG_V6 16        // drop: IPv6 larger than the tunnel MTU (no ICMPv6 source)
#define XT_R_NO_TUNNEL 17         // drop: prefix routed to a tunnel index with no tunnel
#define XT_R_IPSEC_NOT_BUILT 18   // pass: prefix routed to an IPsec tunnel, ESP steering not built
#define XT_R_ADJUST_FAILED 19     // drop: the kernel refused to grow or shrink the frame
#define XT_R_ESP_STEERED 20       // redirect: ESP / ESP-in-UDP or a packet to encrypt, to AF_XDP
#define XT_R_ESP_KEEPALIVE 21     // drop: NAT-T keepalive (RFC 3948 2.3: one 0xff byte)
#define XT_R_ESP_IKE 22           // pass: IKE on UDP 500/4500 (non-ESP marker), to the IKE daemon
#define XT_R_ESP_NO_WORKER 23     // drop: to be steered, no AF_XDP socket on this RX queue
#define XT_R_PINNED_FORWARDED 24  // redirect: IPsec tunnel pinned to another node, carried there in GRE
#define XT_R_PINNED_STEERED 25    // redirect: from a fleet node's GRE, to AF_XDP to encrypt here (pin node)
#define XT_R_PINNED_NO_NODE 26    // drop: tunnel pinned to a node with no fleet address entry
#define XT_R_PINNED_UNKNOWN_PEER 27 // drop: GRE to our fleet address from no fleet node
#define XT_R_PINNED_NO_ROUTE 28   // drop: from a fleet node, inner destination in no customer prefix

/* Retired numbers (never reuse): none yet. */

#define XT_R_MAX 32 /* size of the per-reason counter array; above every number ever used */

#endif /* XT_DROP_REASONS_H */
