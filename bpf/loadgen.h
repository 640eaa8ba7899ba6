/* xtransit load generator: map layouts shared by bpf/loadgen.c and pipeline/loadgen.py.
 *
 * The Python side reads these through bcc's map types (the struct layouts come from the compiled
 * program), so this header is the one definition; sizes are -D overridable and Python passes the
 * values it uses.
 */
#ifndef XT_LOADGEN_H
#define XT_LOADGEN_H

/* Largest frame the generator sends. A live frame lives in one page together with the test-run
 * page head, XDP headroom and skb_shared_info, so about 3.3 KB is the kernel's limit on 4 KB
 * pages; 2048 covers every 1500-MTU frame with room for VLAN tags. */
#ifndef LG_FRAME_MAX
#define LG_FRAME_MAX 2048
#endif

/* Templates sent round-robin. */
#ifndef LG_MAX_FRAMES
#define LG_MAX_FRAMES 64
#endif

/* lg_frame.flags */
#define LG_F_CSUM_UDP 1 /* the checksum at csum_off is UDP's: a result of 0 is sent as 0xFFFF
                         * (RFC 768: zero means "no checksum") */

/* One template frame. The program copies data[0..copy_len) over the live frame on every run
 * (live-frame pages are recycled without being reset, and receivers rewrite headers in place:
 * TTL, decapsulation, MSS), sets the frame length to len, then writes the varied field. */
struct lg_frame {
	__u32 len;        /* frame length, Ethernet header included */
	__u32 copy_len;   /* bytes copied from data[] each run: at least every header a receiver
	                   * may rewrite; len when the templates differ in length */
	__u16 vary_off;   /* offset of a 16-bit big-endian field to vary (0: none), e.g. a source
	                   * port, so receivers see many flows (RSS, flow hashes) */
	__u16 vary_range; /* the field takes template value + (0 .. vary_range-1), wrapping at 2^16 */
	__u16 csum_off;   /* offset of the 16-bit Internet checksum covering the field (0: none);
	                   * updated incrementally (RFC 1624 eqn. 3) from the template's values */
	__u16 flags;      /* LG_F_* */
	__u8 data[LG_FRAME_MAX];
};

/* Global settings, key 0. */
struct lg_config {
	__u32 nframes;    /* templates in use, 1 .. LG_MAX_FRAMES */
	__u32 ifindex;    /* 0: XDP_TX out of the test run's ingress device; else bpf_redirect() to
	                   * this device (an index in the sending namespace) */
};

/* Per-CPU counters, key 0. runs counts program invocations; sent those that left with XDP_TX or
 * XDP_REDIRECT (whether the device then accepted the frame shows in its own counters: a veth
 * drops what its peer cannot take, see pipeline/loadgen.py); errors those that failed a sanity
 * check or a helper and returned XDP_ABORTED. */
struct lg_counters {
	__u64 runs;
	__u64 sent;
	__u64 bytes;
	__u64 errors;
};

#endif
