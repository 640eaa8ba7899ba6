/* xtransit edge data plane: constants shared by every stage.
 *
 * Sizes may be overridden with -D (the benchmark builds with a larger XT_MAX_TUNNELS); the Python
 * loader reads the values it needs back from the same names (pipeline/xdp/dataplane.py).
 */
#ifndef XT_CONSTS_H
#define XT_CONSTS_H

/* Map sizes. A tunnel index is the config's `index` (1..65535): the slot in xt_tunnels. */
#ifndef XT_MAX_TUNNELS
#define XT_MAX_TUNNELS 65536
#endif
#ifndef XT_MAX_PREFIXES
#define XT_MAX_PREFIXES 131072
#endif
#ifndef XT_MAX_ENDPOINTS
#define XT_MAX_ENDPOINTS 256
#endif
/* Per-tunnel drop counters are keyed (tunnel, reason); this many pairs at most. */
#ifndef XT_MAX_TUNNEL_DROPS
#define XT_MAX_TUNNEL_DROPS 65536
#endif
/* Fleet nodes a tunnel can be pinned to (xt_pin_nodes; config.FLEET_NODES_MAX). */
#define XT_MAX_FLEET_NODES 1024
/* Equal-priority tunnels one prefix can spread its flows over. */
#define XT_MAX_ECMP 8

/* Stage results: a stage returns an XDP action, or XT_CONTINUE to hand on (katran's
 * FURTHER_PROCESSING). */
#define XT_CONTINUE (-1)

/* Tunnel kinds (struct xt_tunnel.kind). */
#define XT_KIND_NONE 0
#define XT_KIND_GRE 1
#define XT_KIND_IPSEC 2

/* struct xt_tunnel.flags */
#define XT_TUN_F_KEY 0x1     /* the tunnel carries a GRE key */
#define XT_TUN_F_PIN_FWD 0x2 /* IPsec, pinned to another node: carried there in GRE (pin.h) */

/* xt_endpoints values: what one of our addresses is. */
#define XT_EP_TUNNEL 1 /* a tunnel endpoint (the anycast address) */
#define XT_EP_FLEET 2  /* this node's own fleet address: GRE from fleet nodes (pin.h) */

/* xt_gre_decap value of a fleet peer's entry (edge = our fleet address, customer = the
 * peer's), above every tunnel index. */
#define XT_DECAP_FLEET_PEER 0xffffffff

/* Protocol numbers and header sizes not spelled out by the kernel headers we include. */
#define XT_IPPROTO_GRE 47
#define XT_ETH_HLEN 14
#define XT_IPV4_HLEN 20
#define XT_IPV6_HLEN 40
#define XT_GRE_BASE_HLEN 4

/* GRE flags and version, first 16 bits in network order (RFC 2784 section 2, RFC 2890
 * section 2): C (checksum present) 0x8000, R (routing present, RFC 1701) 0x4000,
 * K (key present) 0x2000, S (sequence number present) 0x1000, version in the low 3 bits. */
#define XT_GRE_C 0x8000
#define XT_GRE_R 0x4000
#define XT_GRE_K 0x2000
#define XT_GRE_S 0x1000
#define XT_GRE_VERSION 0x0007

/* IPv4 frag_off bits (host order). */
#define XT_IP_DF 0x4000
#define XT_IP_MF 0x2000
#define XT_IP_OFFSET 0x1fff

/* TCP */
#define XT_TCP_SYN 0x02
#define XT_TCPOPT_EOL 0
#define XT_TCPOPT_NOP 1
#define XT_TCPOPT_MSS 2
#define XT_TCPOLEN_MSS 4
#define XT_TCP_MAX_OPTLEN 40
#define XT_MSS_MAX_ITEMS 16 /* option items the MSS walk looks at (mss.h says why) */

/* ICMP "fragmentation needed" (RFC 792 type 3 code 4, next-hop MTU per RFC 1191 section 4). */
#define XT_ICMP_DEST_UNREACH 3
#define XT_ICMP_FRAG_NEEDED 4
#define XT_ICMP_HLEN 8
#define XT_ICMP_TOS 0xc0 /* precedence "internetwork control", as Linux sends its errors */
#define XT_ICMP_TTL 64

#endif /* XT_CONSTS_H */
