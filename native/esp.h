/*
 * esp.h - xtransit native ESP: batch encrypt/decrypt of RFC 4303 ESP packets on OpenSSL libcrypto.
 *
 * This header is the public C API *and* the cffi declaration (native/build_esp.py reads it, drops the
 * preprocessor lines and the C-only block marked XT_ESP_C_ONLY, and feeds the rest to ffi.cdef()).
 * Keep everything outside that block plain C that cffi can parse: prefixed prototypes, structs,
 * and `#define NAME <integer>` constants.
 *
 * Model
 * -----
 *   struct xt_esp_ctx     one SA database (inbound SAs by SPI, outbound SAs by tunnel id), fixed-size
 *                         hash tables chosen at creation (O(1) lookup, 100,000 SAs and more).
 *   struct xt_esp_worker  one per packet-processing thread (at most max_workers). It owns the per-SA
 *                         cipher contexts of its slot and the epoch used for safe SA reclamation.
 *                         A worker must only be used by one thread at a time. An EVP context is
 *                         not thread-safe, so "one context per SA and direction, reused" is one
 *                         per SA and worker slot. It is created lazily: xt_esp_sa_add keeps the
 *                         key in the SA, and a worker keys its own slot (counters and context:
 *                         RSS growth about 1.6 KB for GCM, 1.1 KB for CBC inbound) on the first
 *                         packet it processes for that SA, so an SA costs nothing (8 bytes) per
 *                         worker that never sees its traffic (idle inbound SA with the default
 *                         replay window: about 0.9 KB). That first packet allocates; every
 *                         later one sets only the IV. A failed set-up drops the packet as
 *                         crypto_error (counted per SA); the next one retries.
 *   struct xt_pkt         one frame in a caller-owned buffer (an AF_XDP UMEM frame, a Python
 *                         bytearray, ...): `data` points at the packet, with `headroom` free bytes
 *                         before it and `tailroom` free bytes after data + len.
 *
 * Batch calls (per-packet path: no allocation, no global lock)
 * ------------------------------------------------------------
 *   xt_esp_decrypt_batch(w, pkts, n): each frame starts at the outer IPv4 or IPv6 header; ESP is
 *     either the IP payload (protocol 50) or UDP-encapsulated (protocol 17, RFC 3948). On success
 *     (verdict XT_ESP_V_OK) data/len/headroom/tailroom describe the inner IP packet (tunnel mode) and
 *     `spi`/`tunnel` name the SA; otherwise `verdict` is the drop reason and the frame bytes are
 *     unspecified (GCM decrypts in place before the tag is known to be bad).
 *   xt_esp_encrypt_batch(w, pkts, n): each frame holds an inner IPv4/IPv6 packet; `tunnel` selects
 *     the outbound SA. On success data/len describe the full outer packet (IPv4 [+ UDP] + ESP),
 *     built in place: it needs xt_esp_headroom_needed() bytes of headroom and
 *     xt_esp_tailroom_needed() of tailroom, else the verdict is XT_ESP_V_NO_ROOM.
 *   Both return the number of packets with verdict XT_ESP_V_OK.
 *
 * Control calls (any thread, serialised by the context's writer mutex, never block workers)
 * -------------------------------------------------------------------------------------
 *   xt_esp_sa_add adds or replaces (rekey in place) an SA; xt_esp_sa_del deletes one. Replaced and
 *   deleted SAs are freed once no worker can still hold them (see esp_internal.h, "Reclamation").
 *   Errors are negative XT_ESP_E_* values; xt_esp_strerror() names them.
 */
#ifndef XT_ESP_H
#define XT_ESP_H

#include <stddef.h>
#include <stdint.h>

/* SA direction, mode, algorithms */
#define XT_ESP_DIR_IN 0
#define XT_ESP_DIR_OUT 1

#define XT_ESP_MODE_TUNNEL 0
/* Transport mode is supported on decrypt only (interoperability and the known-answer vectors). */
#define XT_ESP_MODE_TRANSPORT 1

#define XT_ESP_ENC_NULL 0        /* RFC 2410, only with XT_ESP_F_ALLOW_NULL */
#define XT_ESP_ENC_AES_GCM_16 1  /* RFC 4106: key || 4-byte salt, 8-byte IV, 16-byte ICV */
#define XT_ESP_ENC_AES_CBC 2     /* RFC 3602: 16-byte IV */

#define XT_ESP_AUTH_NONE 0            /* AEAD; for NULL/CBC only with XT_ESP_F_ALLOW_NULL */
#define XT_ESP_AUTH_HMAC_SHA1_96 1    /* RFC 2404 */
#define XT_ESP_AUTH_HMAC_SHA256_128 2 /* RFC 4868 */

/* xt_esp_sa_params.flags */
#define XT_ESP_F_ALLOW_NULL 1 /* explicit opt-in for NULL encryption or no integrity */
#define XT_ESP_F_ESN 2        /* extended sequence numbers: always refused (XT_ESP_E_ESN) */
#define XT_ESP_F_UDP_ENCAP 4  /* outbound: add UDP (RFC 3948) with encap_sport/encap_dport */
#define XT_ESP_F_CHECK_DST 8  /* inbound: drop (unknown_spi) unless the outer IPv4 dst is local_addr */

#define XT_ESP_MAX_ENC_KEY 32
#define XT_ESP_MAX_AUTH_KEY 64
#define XT_ESP_DEFAULT_REPLAY_WINDOW 1024
#define XT_ESP_MAX_REPLAY_WINDOW 65536
#define XT_ESP_IV_COUNTER_BITS 48 /* GCM IV = 16-bit node id || 48-bit counter */

/* Capacity of the drop counter arrays; xt_esp_verdict_count() tells how many are in use. */
#define XT_ESP_VERDICT_MAX 32

/* xt_esp_sa_stats.lifetime_flags */
#define XT_ESP_LT_SOFT_PACKETS 1
#define XT_ESP_LT_SOFT_BYTES 2
#define XT_ESP_LT_HARD_PACKETS 4
#define XT_ESP_LT_HARD_BYTES 8
#define XT_ESP_LT_SEQ_EXHAUSTED 16 /* outbound: the last sequence number was used: rekey */

/* Error codes (negative returns of the control calls) */
#define XT_ESP_E_INVAL -1
#define XT_ESP_E_NOMEM -2
#define XT_ESP_E_CRYPTO -3
#define XT_ESP_E_ESN -4
#define XT_ESP_E_NULL_NOT_ALLOWED -5
#define XT_ESP_E_KEY_LEN -6
#define XT_ESP_E_ALG -7
#define XT_ESP_E_NOT_FOUND -8
#define XT_ESP_E_WINDOW -9
#define XT_ESP_E_SPI -10
#define XT_ESP_E_MODE -11
#define XT_ESP_E_BUSY -12

/* One SA. Keys are copied into the SA at add time (the encryption key stays there, for the
 * workers' lazy context set-up, and is wiped when the SA is freed); the caller should wipe this
 * struct. */
struct xt_esp_sa_params {
    uint32_t spi;          /* host order; 0 is reserved (RFC 4303 2.1) and refused */
    uint32_t tunnel_id;    /* outbound: lookup key of the SA; inbound: reported in xt_pkt.tunnel */
    uint8_t direction;     /* XT_ESP_DIR_* */
    uint8_t mode;          /* XT_ESP_MODE_* */
    uint8_t enc_alg;       /* XT_ESP_ENC_* */
    uint8_t auth_alg;      /* XT_ESP_AUTH_* */
    uint8_t enc_key_len;   /* 16 or 32 for AES (GCM: without the salt) */
    uint8_t auth_key_len;  /* HMAC key length, 1..64 */
    uint8_t ttl;           /* outer TTL, 0 = 64 */
    uint8_t reserved;
    uint8_t enc_key[32];
    uint8_t salt[4];       /* GCM: last 4 bytes of the keying material (RFC 4106 8.1) */
    uint8_t auth_key[64];
    uint32_t flags;        /* XT_ESP_F_* */
    uint8_t local_addr[4]; /* outbound: outer source; inbound: expected outer dst (F_CHECK_DST) */
    uint8_t remote_addr[4];/* outbound: outer destination */
    uint16_t encap_sport;  /* host order, usually 4500 */
    uint16_t encap_dport;
    uint16_t node_id;      /* outbound GCM/CBC: high 16 bits of the IV, unique per edge node */
    uint16_t reserved2;
    uint32_t replay_window;/* inbound, packets; 0 = anti-replay disabled */
    uint64_t soft_packets; /* lifetimes, 0 = unlimited */
    uint64_t hard_packets;
    uint64_t soft_bytes;
    uint64_t hard_bytes;
};

/* One frame of a batch. */
struct xt_pkt {
    uint8_t *data;      /* in/out: first byte of the packet */
    uint32_t len;       /* in/out: packet length */
    uint32_t headroom;  /* in/out: writable bytes before data */
    uint32_t tailroom;  /* in/out: writable bytes after data + len */
    uint32_t tunnel;    /* encrypt: in, selects the outbound SA; decrypt: out, the SA's tunnel_id */
    uint32_t spi;       /* out: SPI of the SA (0 when none was found) */
    uint16_t verdict;   /* out: XT_ESP_V_* (names: xt_esp_verdict_name) */
    uint16_t reserved;
};

struct xt_esp_sa_stats {
    uint64_t packets;                       /* accepted (decrypt) / sent (encrypt) */
    uint64_t bytes;                         /* inner packet bytes of those */
    uint64_t drops[32];                     /* indexed by verdict (XT_ESP_VERDICT_MAX) */
    uint64_t lifetime_packets;              /* counted against the lifetimes */
    uint64_t lifetime_bytes;
    uint64_t seq;                           /* outbound: last sequence number sent; inbound:
                                               highest accepted (0 = none) */
    uint64_t iv_counter;                    /* outbound: next IV counter value */
    uint32_t lifetime_flags;                /* XT_ESP_LT_* */
    uint32_t replay_window;
};

struct xt_esp_ctx_stats {
    uint64_t drops[32];   /* drops before an SA was found (unknown_spi, not_esp, truncated, ...) */
    uint64_t sa_in;       /* installed inbound SAs */
    uint64_t sa_out;      /* installed outbound SAs */
    uint64_t retired;     /* replaced/deleted SAs waiting for reclamation */
    uint64_t max_chain;   /* longest hash chain (both tables) */
};

struct xt_esp_ctx;
struct xt_esp_worker;

/* Contexts and workers. buckets_log2 = 0 picks 2^17 buckets per direction. */
struct xt_esp_ctx *xt_esp_ctx_new(unsigned max_workers, unsigned buckets_log2);
void xt_esp_ctx_free(struct xt_esp_ctx *ctx); /* all workers must be freed first */
struct xt_esp_worker *xt_esp_worker_new(struct xt_esp_ctx *ctx); /* NULL when no slot is free */
void xt_esp_worker_free(struct xt_esp_worker *w);

/* SA database */
int xt_esp_sa_add(struct xt_esp_ctx *ctx, const struct xt_esp_sa_params *p);
int xt_esp_sa_del(struct xt_esp_ctx *ctx, uint8_t direction, uint32_t key); /* SPI or tunnel id */
int xt_esp_sa_stats(struct xt_esp_ctx *ctx, uint8_t direction, uint32_t key,
                    struct xt_esp_sa_stats *out);
void xt_esp_ctx_stats(struct xt_esp_ctx *ctx, struct xt_esp_ctx_stats *out);
unsigned xt_esp_reclaim(struct xt_esp_ctx *ctx); /* frees what it can, returns how many */
/* How many worker slots of the SA are set up (counters and cipher context, created lazily by
 * each worker's first packet for it); 0 for an SA no worker has seen yet, or a negative error. */
int xt_esp_sa_slots(struct xt_esp_ctx *ctx, uint8_t direction, uint32_t key);

/* Batches */
unsigned xt_esp_decrypt_batch(struct xt_esp_worker *w, struct xt_pkt *pkts, unsigned n);
unsigned xt_esp_encrypt_batch(struct xt_esp_worker *w, struct xt_pkt *pkts, unsigned n);

/* Sizes an outbound SA needs around the inner packet (worst case for padding). */
unsigned xt_esp_headroom_needed(const struct xt_esp_sa_params *p);
unsigned xt_esp_tailroom_needed(const struct xt_esp_sa_params *p);

/* Names: verdicts (drop reasons) and errors. */
unsigned xt_esp_verdict_count(void);
const char *xt_esp_verdict_name(unsigned verdict); /* NULL when out of range */
const char *xt_esp_strerror(int err);

/* TEST HOOK (tests only): set the next outbound sequence number and IV counter of an SA so a
 * recorded packet can be reproduced byte for byte. Never called by the data or control plane. */
int xt_esp_test_set_next(struct xt_esp_ctx *ctx, uint32_t tunnel_id, uint64_t next_seq,
                         uint64_t next_iv_counter);

/* TEST HOOK (tests only): the next n lazy slot set-ups in ctx fail, as if malloc or OpenSSL had
 * (the packets are dropped as crypto_error). */
int xt_esp_test_fail_slot_setup(struct xt_esp_ctx *ctx, unsigned n);

/* TEST HOOK (tests only): the SA's HMAC (alg XT_ESP_AUTH_HMAC_*) over data, full digest to out
 * (32 bytes room). Returns the ICV length on the wire, or XT_ESP_E_ALG. */
int xt_esp_test_hmac(uint8_t alg, const uint8_t *key, size_t key_len, const uint8_t *data,
                     size_t len, uint8_t *out);

/* BENCHMARK HELPER: the OpenSSL ceiling. AES-GCM (key_len 16/32) over `iters` packets of `size`
 * bytes with one reused EVP context (new IV, 8-byte AAD, update, final, tag per packet), the same
 * calls the batch path makes. Returns elapsed nanoseconds (0 on error). */
uint64_t xt_esp_bench_raw_gcm(unsigned key_len, unsigned size, unsigned iters);

#if !defined(XT_ESP_CDEF) /* XT_ESP_C_ONLY begin: not seen by cffi */
/*
 * Verdicts: the one list of drop reasons. The number is the wire of the API (stats arrays, xt_pkt);
 * a retired number is never reused: append only. Python gets the names through
 * xt_esp_verdict_name(), so they are typed here and nowhere else.
 */
#define XT_ESP_VERDICTS(X)                                                   \
    X(OK, 0, "ok")                                                           \
    X(UNKNOWN_SPI, 1, "unknown_spi")         /* no SA (or dst mismatch) */   \
    X(REPLAY, 2, "replay")                   /* RFC 4303 3.4.3 */            \
    X(ICV_MISMATCH, 3, "icv_mismatch")                                       \
    X(BAD_PADDING, 4, "bad_padding")         /* not 1, 2, 3, ... */          \
    X(BAD_NEXT_HEADER, 5, "bad_next_header") /* not 4 / 41 (tunnel) */       \
    X(TRUNCATED, 6, "truncated")             /* lengths do not fit */        \
    X(INNER_MALFORMED, 7, "inner_malformed")                                 \
    X(SEQ_EXHAUSTED, 8, "seq_exhausted")     /* outbound: rekey needed */    \
    X(LIFETIME_EXPIRED, 9, "lifetime_expired")                               \
    X(DUMMY_PACKET, 10, "dummy_packet")      /* next header 59 */            \
    X(NOT_ESP, 11, "not_esp")                /* not ESP, IKE, keepalive */   \
    X(FRAGMENTED, 12, "fragmented")          /* outer IP fragment */         \
    X(NO_ROOM, 13, "no_room")                /* headroom/tailroom short */   \
    X(UNKNOWN_TUNNEL, 14, "unknown_tunnel")  /* outbound: no SA */          \
    X(BAD_CHECKSUM, 15, "bad_checksum")      /* outer IPv4 header checksum */\
    X(CRYPTO_ERROR, 16, "crypto_error")      /* cipher set-up or OpenSSL failed */

enum xt_esp_verdict {
#define XT_ESP_VERDICT_ENUM(name, num, str) XT_ESP_V_##name = num,
    XT_ESP_VERDICTS(XT_ESP_VERDICT_ENUM)
#undef XT_ESP_VERDICT_ENUM
    XT_ESP_V__COUNT
};
#endif /* XT_ESP_C_ONLY end */

#endif /* XT_ESP_H */
