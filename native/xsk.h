/*
 * xsk.h - xtransit AF_XDP worker: ESP frames in from XDP, decrypted/encrypted in place by the native
 * ESP module, out again on the internal veth whose XDP program routes them (bpf/xdp_esp_test.c).
 *
 * This header is the public C API *and* the cffi declaration (native/build_xsk.py reads it, drops
 * the preprocessor lines and the C-only block, and feeds the rest to ffi.cdef()).
 *
 * Model
 * -----
 * One worker = one thread = one UMEM shared by
 *   - n_rx RX sockets, one per (device, queue) the steering program redirects from (XSKMAP), each
 *     with its own fill ring; the first owns the UMEM's fill/completion rings;
 *   - one TX socket on tx_ifname (the edge end of the internal veth pair), with its own completion
 *     ring: the slow path, where the kernel FIB routes every frame (xdp_esp_fwd on the other end);
 *   - direct TX on up to XT_XSK_MAX_DIRECT egress devices: the TX ring of this worker's RX socket
 *     on that device, or a TX-only socket on direct_queue[i] of it.
 *
 * Where a processed frame goes (the next-hop cache): the route is the kernel's. On a cache miss
 * the worker asks the kernel FIB itself: it runs the lookup program (nh_prog_fd, bpf/nexthop.h's
 * esp_nexthop, a TC program: bpf_fib_lookup twice, path MTU, then device and MACs) once with
 * BPF_PROG_TEST_RUN, as if the packet had arrived on the router end of the internal veth, and
 * caches the answer per (family, source, destination, TOS / flow label, protocol, and the TCP/UDP
 * ports when xt_xsk_nh_set_l4() says the kernel's routing looks at them) - the inputs of that
 * lookup - for nh_ttl_ms. A frame goes out directly when the answer is an egress device
 * with a direct socket, the frame fits its MTU and a transit packet's TTL / hop limit is above 1
 * (decremented here, checksum updated); everything else - no neighbour yet, another device,
 * too big, TTL expiring, a lookup budget spent - takes the internal veth, where the kernel
 * resolves the neighbour, fragments or answers with ICMP. xt_xsk_nh_flush() (called on every
 * route, neighbour, address and link change netlink reports; pipeline/ipsec.py) empties the
 * cache at the next batch.
 * Frames go: free stack -> fill rings -> RX rings -> batch decrypt/encrypt in place -> TX ring ->
 * completion ring -> free stack (dropped frames go straight back). No copy in the worker, no
 * allocation after xt_xsk_new().
 *
 * Sockets are created through libxdp's xsk API with XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD: the XDP
 * program is ours (bcc), and xt_xsk_map_insert() places each RX socket in our XSKMAP.
 * Mode: XT_XSK_MODE_AUTO lets the kernel choose zero-copy when the driver supports it and copy
 * otherwise (veth: copy); the shared sockets inherit the mode of the first.
 *
 * ESP calls go through function pointers handed over by Python (the ESP module is a separate cffi
 * extension; see pipeline/xsk.py): esp_worker is a struct xt_esp_worker *, esp_decrypt and
 * esp_encrypt are xt_esp_decrypt_batch / xt_esp_encrypt_batch.
 *
 * The loop (xt_xsk_run, one shape): drain completions; per RX socket: refill its fill ring, peek at
 * most as many RX descriptors as the TX ring has room for, split by the metadata the steering
 * program left (decrypt / encrypt), run both batches, put the good frames on the TX ring; kick TX
 * when it needs a wakeup; when nothing moved, poll() the RX sockets (wakes a need_wakeup fill ring)
 * with a timeout, so xt_xsk_stop() is seen within poll_ms.
 */
#ifndef XT_XSK_H
#define XT_XSK_H

#include <stddef.h>
#include <stdint.h>

#define XT_XSK_MAX_RX 16
#define XT_XSK_IFNAMSIZ 16
#define XT_XSK_MAX_BATCH 64
#define XT_XSK_NATT_TUNNELS 65536
#define XT_XSK_STAT_VERDICTS 32 /* = XT_ESP_VERDICT_MAX */
#define XT_XSK_MAX_DIRECT 8
#define XT_XSK_NH_SLOTS 4096     /* next-hop cache entries per worker (direct-mapped) */
#define XT_XSK_NH_LOOKUPS 8      /* FIB lookups per batch at most; the rest take the slow path */

/* Result of the lookup program (bpf/nexthop.h struct xt_nh_result; keep in step). */
#define XT_XSK_NH_MAGIC 0x58544e48
#define XT_XSK_NH_F_PORTS 1     /* request flag: the lookup uses the TCP/UDP ports */

/* xt_xsk_config.flags. XT_XSK_F_NO_CRYPTO is for benchmarks only: every steered frame is
 * forwarded unchanged, without ESP calls (the AF_XDP path's own ceiling). */
#define XT_XSK_F_NO_CRYPTO 1

#define XT_XSK_MODE_AUTO 0
#define XT_XSK_MODE_COPY 1
#define XT_XSK_MODE_ZEROCOPY 2

/* Frame metadata written by bpf/esp_steer.h (struct xt_esp_meta there; keep in step). */
#define XT_XSK_META_MAGIC 0x58544553
#define XT_XSK_META_LEN 16
#define XT_XSK_KIND_DECRYPT 1
#define XT_XSK_KIND_ENCRYPT 2

struct xt_xsk_config {
    char rx_ifname[16][16];     /* XT_XSK_MAX_RX devices the steering program runs on */
    uint32_t rx_queue[16];
    uint32_t n_rx;
    char tx_ifname[16];         /* the edge end of the internal veth pair */
    uint32_t tx_queue;          /* its queue this worker transmits on (one per worker) */
    uint8_t tx_src_mac[6];      /* Ethernet source of every frame sent (tx_ifname's MAC) */
    uint8_t tx_dst_mac[6];      /* Ethernet destination (the MAC of tx_ifname's peer) */
    uint32_t ring_size;         /* every ring, power of two; 0 = 2048 */
    uint32_t frame_size;        /* 2048 or 4096; 0 = 2048 */
    uint32_t batch;             /* 1..64; 0 = 64 */
    uint32_t mode;              /* XT_XSK_MODE_* */
    uint32_t poll_ms;           /* idle poll timeout; 0 = 100 */
    uint32_t flags;             /* XT_XSK_F_* */
    uint32_t tx_budget;         /* copy mode: frames the kernel sends per sendto() (Linux >= 6.17,
                                   XDP_MAX_TX_SKB_BUDGET, 32..ring_size); 0 = the kernel's 32 */
    uintptr_t esp_worker;       /* struct xt_esp_worker * */
    uintptr_t esp_decrypt;      /* xt_esp_decrypt_batch */
    uintptr_t esp_encrypt;      /* xt_esp_encrypt_batch */
    uintptr_t natt_table;       /* uint64_t[XT_XSK_NATT_TUNNELS] shared by the workers of one
                                   edge (owned by the caller, outlives them); 0 = a private one */
    char direct_ifname[8][16];  /* XT_XSK_MAX_DIRECT egress devices for direct TX */
    uint32_t direct_queue[8];   /* queue of a TX-only socket there (unused when an RX socket of
                                   this worker is on the device: its TX ring is used) */
    uint32_t n_direct;          /* 0 = everything through the internal veth */
    int32_t nh_prog_fd;         /* the next-hop lookup program (required when n_direct > 0) */
    uint32_t nh_ifindex;        /* lookups run as if arriving here: the router end of the veth */
    uint32_t nh_ttl_ms;         /* next-hop cache entry lifetime; 0 = 1000 */
};

struct xt_xsk_stats {
    uint64_t rx_packets;        /* descriptors taken from RX rings */
    uint64_t rx_bytes;
    uint64_t tx_packets;        /* descriptors put on the TX ring */
    uint64_t tx_bytes;
    uint64_t tx_completed;      /* descriptors the kernel completed */
    uint64_t decrypt_ok;
    uint64_t encrypt_ok;
    uint64_t decrypt_drops[32]; /* by ESP verdict number (pipeline.esp.VERDICTS) */
    uint64_t encrypt_drops[32];
    uint64_t bad_meta;          /* frame without steering metadata: dropped */
    uint64_t runt;              /* shorter than Ethernet + IPv4 header: dropped */
    uint64_t tx_ring_full;      /* loop turns where the TX ring had no room (RX left waiting) */
    uint64_t fill_short;        /* fill-ring refills that found no free frame */
    uint64_t tx_kicks;          /* sendto() wakeups of TX */
    uint64_t rx_wakeups;        /* poll() calls */
    uint64_t natt_updates;      /* NAT-T peer address/port changes learned from authentic packets */
    uint64_t natt_rewrites;     /* outbound packets sent to a learned NAT-T address/port */
    uint64_t frames_free;       /* frames on the free stack right now */
    uint64_t frames_total;
    uint64_t k_rx_dropped;      /* kernel XDP_STATISTICS summed over the RX sockets: */
    uint64_t k_rx_invalid;      /*   dropped (no fill frame / too big), invalid descriptors, */
    uint64_t k_rx_ring_full;    /*   RX ring full, fill ring empty (need more frames) */
    uint64_t k_fill_empty;
    uint64_t k_tx_invalid;      /* kernel: invalid TX descriptors, every TX ring */
    uint64_t tx_direct;         /* frames sent straight out of an egress device */
    uint64_t tx_slow;           /* frames sent through the internal veth (kernel FIB) */
    uint64_t nh_lookups;        /* next-hop cache misses resolved with the lookup program */
    uint64_t nh_lookup_errors;  /* lookups the kernel refused to run (slow path taken) */
    uint64_t nh_lookup_ns;      /* time spent in those lookups (the worker waits for each) */
    uint64_t nh_no_route;       /* lookups without a usable answer (no neighbour, blackhole...) */
    uint64_t nh_deferred;       /* misses over the per-batch lookup budget (slow path taken) */
    uint64_t nh_flushes;        /* cache flushes seen */
    uint64_t slow_ttl;          /* transit frames with TTL / hop limit <= 1 (kernel: ICMP) */
    uint64_t slow_mtu;          /* frames over the egress MTU (kernel: fragment or ICMP) */
    uint32_t direct_ports;      /* egress devices with a working direct socket */
    uint32_t tx_budget;         /* the TX budget in effect (32 when the kernel has no knob) */
    uint32_t zerocopy;          /* 1 when the UMEM is bound in zero-copy mode */
    uint32_t running;           /* 1 while xt_xsk_run() is in its loop */
};

struct xt_xsk;

/* Create sockets and UMEM. On failure returns NULL and writes a message to err. */
struct xt_xsk *xt_xsk_new(const struct xt_xsk_config *cfg, char *err, size_t errlen);
/* Put RX socket i into an XSKMAP (map_fd) at key. Returns 0 or -errno. */
int xt_xsk_map_insert(struct xt_xsk *x, unsigned i, int map_fd, uint32_t key);
int xt_xsk_rx_fd(struct xt_xsk *x, unsigned i);
/* The loop; returns when xt_xsk_stop() was called (0) or on a fatal socket error (-errno). */
int xt_xsk_run(struct xt_xsk *x);
void xt_xsk_stop(struct xt_xsk *x);
void xt_xsk_stats(struct xt_xsk *x, struct xt_xsk_stats *out);
/* NAT-T: the address (network order) and UDP port (host order) ESP-in-UDP of `tunnel` was last
 * authenticated from. Returns 1 when known, 0 when not. */
int xt_xsk_natt_peer(struct xt_xsk *x, uint32_t tunnel, uint8_t *addr, uint16_t *port);
/* Forget a learned NAT-T peer (tunnel deleted or re-established from a new address). */
void xt_xsk_natt_forget(struct xt_xsk *x, uint32_t tunnel);
/* Direct egress device i: its ifindex (> 0) when the worker transmits there, or -errno of the
 * socket that could not be made (its frames take the internal veth). */
int xt_xsk_direct_status(struct xt_xsk *x, unsigned i);
/* Empty the next-hop cache (takes effect at the worker's next batch; any thread). */
void xt_xsk_nh_flush(struct xt_xsk *x);
/* Lookups with the TCP/UDP ports (on) or without (off): on when the kernel's routing looks at
 * ports (rules with ipproto/sport/dport, an L4 multipath hash); empties the cache. */
void xt_xsk_nh_set_l4(struct xt_xsk *x, int on);
/* Close sockets, free the UMEM; the loop must have returned. */
void xt_xsk_free(struct xt_xsk *x);

#endif /* XT_XSK_H */
