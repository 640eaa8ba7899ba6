/* xtransit edge data plane: every map, one comment each.
 *
 * Configuration maps are written only by the control plane (pipeline/xdp/dataplane.py), which
 * applies a changed config as individual map updates; counters are written only here. The
 * loader pins them all under /sys/fs/bpf/xtransit/<node>/<map name> for `xtransit stats`.
 */
#ifndef XT_MAPS_H
#define XT_MAPS_H

/* Our addresses: tunnel endpoints (outer destinations we decapsulate for) -> XT_EP_TUNNEL,
 * this node's fleet address -> XT_EP_FLEET. */
BPF_HASH(xt_endpoints, __be32, __u32, XT_MAX_ENDPOINTS);

/* GRE tunnel lookup on decapsulation: (edge, customer, key) -> tunnel index; (our fleet
 * address, a fleet node's, no key) -> XT_DECAP_FLEET_PEER. */
BPF_HASH(xt_gre_decap, struct xt_decap_key, __u32, XT_MAX_TUNNELS);

/* Tunnel parameters by tunnel index (the config's `index`). */
BPF_ARRAY(xt_tunnels, struct xt_tunnel, XT_MAX_TUNNELS);

/* Customer prefixes, IPv4 and IPv6 inner destinations -> tunnels (struct xt_route). */
BPF_LPM_TRIE(xt_routes4, struct xt_lpm4, struct xt_route, XT_MAX_PREFIXES);
BPF_LPM_TRIE(xt_routes6, struct xt_lpm6, struct xt_route, XT_MAX_PREFIXES);

/* Pinned tunnels: node id -> the GRE "tunnel" that carries packets to that node (edge = our
 * fleet address, customer = the node's; encap.h's xt_gre_push builds from it). */
BPF_HASH(xt_pin_nodes, __u32, struct xt_tunnel, XT_MAX_FLEET_NODES);

/* Per-tunnel packets and bytes in each direction, per CPU, by tunnel index. */
BPF_PERCPU_ARRAY(xt_tunnel_stats, struct xt_tunnel_stats, XT_MAX_TUNNELS);

/* Every frame the program saw, by the reason it left (XT_R_*), per CPU. */
BPF_PERCPU_ARRAY(xt_reason_stats, struct xt_counter, XT_R_MAX);

/* Per-tunnel counts of every reason other than "forwarded", per CPU; created on first use. */
BPF_TABLE("percpu_hash", struct xt_drop_key, __u64, xt_tunnel_drops, XT_MAX_TUNNEL_DROPS);

#endif /* XT_MAPS_H */
