/* xtransit edge data plane: the structs kept in maps and the per-packet state the stages share.
 *
 * Map keys and values are read and written by pipeline/xdp/dataplane.py through bcc's generated
 * ctypes types (table.Key / table.Leaf), so their layout is declared here only. The counter
 * layouts are also read by `xtransit stats` from pinned maps (pipeline/xdp/maps.py mirrors them:
 * plain u64 fields, no padding).
 */
#ifndef XT_STRUCTS_H
#define XT_STRUCTS_H

/* xt_gre_decap key: what identifies a GRE tunnel on the wire. has_key distinguishes "no key"
 * from "key 0" (RFC 2890 section 2.1: the key is present only when K is set). */
struct xt_decap_key {
	__be32 edge;     /* outer destination: one of our tunnel endpoints */
	__be32 customer; /* outer source: the customer router */
	__be32 key;      /* GRE key as on the wire, 0 when absent */
	__u32 has_key;
};

/* xt_tunnels value: everything the fast path needs to know about one tunnel. */
struct xt_tunnel {
	__u32 kind;      /* XT_KIND_* (XT_KIND_NONE: empty slot) */
	__u32 flags;     /* XT_TUN_F_* */
	__be32 edge;     /* outer source when encapsulating */
	__be32 customer; /* outer destination when encapsulating */
	__be32 key;      /* GRE key, network order, when XT_TUN_F_KEY */
	__u16 mtu;       /* largest inner packet carried (bytes, L3) */
	__u16 mss;       /* TCP MSS clamp in both directions */
	__u8 ttl;        /* outer TTL */
	__u8 pad;
	__u16 pin_node;  /* with XT_TUN_F_PIN_FWD: the node (xt_pin_nodes key) that encrypts */
};

/* Prefix keys for the LPM tries (prefixlen first, as BPF_MAP_TYPE_LPM_TRIE requires). */
struct xt_lpm4 {
	__u32 prefixlen;
	__u8 addr[4];
};

struct xt_lpm6 {
	__u32 prefixlen;
	__u8 addr[16];
};

/* xt_routes4 / xt_routes6 value: the tunnels sharing a prefix at its lowest priority value
 * (the loader keeps only those), chosen per packet by flow hash. */
struct xt_route {
	__u32 count;                  /* 1..XT_MAX_ECMP */
	__u32 tunnels[XT_MAX_ECMP];   /* tunnel indexes */
};

/* xt_tunnel_stats value (per CPU). "decap": customer -> Internet; "encap": the other way.
 * Bytes are inner packet bytes (L3). */
struct xt_tunnel_stats {
	__u64 decap_packets;
	__u64 decap_bytes;
	__u64 encap_packets;
	__u64 encap_bytes;
};

/* xt_reason_stats value (per CPU): frames and frame bytes that left under one reason. */
struct xt_counter {
	__u64 packets;
	__u64 bytes;
};

/* xt_tunnel_drops key: one tunnel, one reason (XT_R_*). Value: u64 packets per CPU. */
struct xt_drop_key {
	__u32 tunnel;
	__u32 reason;
};

/* Per-packet state handed from stage to stage; read by the single exit (stats.h). */
struct xt_pkt {
	__u32 reason; /* XT_R_*: why the packet leaves the way it does */
	__u32 tunnel; /* tunnel index once known, 0 before */
	__u16 mss;    /* nonzero: clamp the TCP MSS option to this at the exit */
	__u16 l4_off; /* ... of the TCP header this many bytes into the final frame */
	__u32 from_fleet; /* decapsulated from a fleet node's GRE (pin.h): never forwarded again */
};

#endif /* XT_STRUCTS_H */
