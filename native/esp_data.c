/*
 * esp_data.c - the per-packet path: batch decrypt and encrypt (RFC 4303 ESP, tunnel mode; RFC 3948
 * UDP encapsulation). No allocation, no global lock: see esp_internal.h for why an SA found here
 * stays valid until the end of the batch.
 *
 * ESP packet (RFC 4303 2):
 *   | SPI (4) | Sequence Number (4) | IV (0/8/16) | Payload ... | Padding (0-255) | Pad Len | NH | ICV |
 *   `------------------ authenticated (HMAC) ---------------------------------------------'
 *                                   `----------- encrypted (CBC) / GCM: AAD = SPI||seq ---'
 */
#include <string.h>

#include "esp_internal.h" /* first: it sets OPENSSL_SUPPRESS_DEPRECATED */

#include <openssl/crypto.h>

#define ESP_HDR 8
#define IPPROTO_ESP_ 50
#define IPPROTO_UDP_ 17
#define NH_IPV4 4
#define NH_IPV6 41
#define NH_NONE 59 /* dummy packet, RFC 4303 2.6 */

#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline void wr16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = (uint8_t)v; }
static inline void wr32(uint8_t *p, uint32_t v)
{
    p[0] = v >> 24; p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

/* RFC 1071 checksum of an IPv4 header (ihl bytes, checksum field included as is). */
static uint16_t ip_csum(const uint8_t *h, unsigned len)
{
    uint32_t s = 0;
    for (unsigned i = 0; i + 1 < len; i += 2)
        s += rd16(h + i);
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (uint16_t)~s;
}

/* ---- worker epoch ----------------------------------------------------------------------------- */

static inline void batch_enter(struct xt_esp_worker *w)
{
    atomic_store(&w->epoch, atomic_load(&w->ctx->epoch));
    atomic_thread_fence(memory_order_seq_cst);
}

static inline void batch_leave(struct xt_esp_worker *w)
{
    atomic_store_explicit(&w->epoch, 0, memory_order_release);
}

/* ---- shared helpers ------------------------------------------------------------------------------- */

static inline void replay_lock(struct xt_sa *sa)
{
    while (atomic_flag_test_and_set_explicit(&sa->replay_lock, memory_order_acquire))
        __builtin_ia32_pause();
}

static inline void replay_unlock(struct xt_sa *sa)
{
    atomic_flag_clear_explicit(&sa->replay_lock, memory_order_release);
}

static inline int lifetime_hard_hit(const struct xt_sa *sa)
{
    return (atomic_load_explicit(&sa->lt_flags, memory_order_relaxed) &
            (XT_ESP_LT_HARD_PACKETS | XT_ESP_LT_HARD_BYTES)) != 0;
}

/* Count an accepted packet against the lifetimes: the packet that reaches a hard limit still goes
 * through; the next one is dropped with lifetime_expired. An SA without packet/byte limits skips
 * the shared atomics (its lifetime totals are the sum of the per-worker counters). */
static inline void lifetime_account(struct xt_sa *sa, uint32_t bytes)
{
    if (!sa->has_limits)
        return;
    uint64_t p = atomic_fetch_add_explicit(&sa->lt_packets, 1, memory_order_relaxed) + 1;
    uint64_t b = atomic_fetch_add_explicit(&sa->lt_bytes, bytes, memory_order_relaxed) + bytes;
    uint32_t f = 0;
    if (sa->soft_packets && p >= sa->soft_packets) f |= XT_ESP_LT_SOFT_PACKETS;
    if (sa->hard_packets && p >= sa->hard_packets) f |= XT_ESP_LT_HARD_PACKETS;
    if (sa->soft_bytes && b >= sa->soft_bytes) f |= XT_ESP_LT_SOFT_BYTES;
    if (sa->hard_bytes && b >= sa->hard_bytes) f |= XT_ESP_LT_HARD_BYTES;
    if (unlikely(f) && (atomic_load_explicit(&sa->lt_flags, memory_order_relaxed) & f) != f)
        atomic_fetch_or(&sa->lt_flags, f);
}

/* Count one packet's verdict: in the worker's slot of its SA, in the context's counters when no
 * SA was found, or (the slot could not be set up: crypto_error) in the SA's failure counter. */
static inline void count(struct xt_esp_worker *w, struct xt_sa *sa, struct xt_sa_slot *slot,
                         unsigned v, uint32_t bytes)
{
    if (unlikely(sa && !slot)) {
        atomic_fetch_add_explicit(&sa->slot_failures, 1, memory_order_relaxed);
        return;
    }
    struct xt_counters *c = slot ? &slot->c : &w->c;
    if (v == XT_ESP_V_OK) {
        XT_CTR_ADD(c->packets, 1);
        XT_CTR_ADD(c->bytes, bytes);
    } else {
        XT_CTR_ADD(c->drops[v], 1);
    }
}

/* Inner packet check: an IPv4/IPv6 packet of the version that the next header announced, whose own
 * length fits in `avail` bytes. Returns its length, or 0 when malformed. */
static uint32_t inner_len(const uint8_t *p, uint32_t avail, uint8_t nh)
{
    if (nh == NH_IPV4) {
        if (avail < 20 || (p[0] >> 4) != 4 || (p[0] & 15) < 5)
            return 0;
        uint32_t tot = rd16(p + 2);
        if (tot < (uint32_t)(p[0] & 15) * 4 || tot > avail)
            return 0;
        return tot;
    }
    if (avail < 40 || (p[0] >> 4) != 6)
        return 0;
    uint32_t tot = 40u + rd16(p + 4);
    return tot > avail ? 0 : tot;
}

/* ---- decrypt -------------------------------------------------------------------------------------- */

/* Outer header parse: finds the ESP header. Returns a verdict (OK or a drop reason).
 * *esp_off = offset of the ESP header, *end = end of the IP packet (Ethernet padding trimmed),
 * *nh_off = offset of the byte naming the protocol after the IP header(s) (for transport mode),
 * *hlen = length of the IP header(s), *ip4 = outer is IPv4. */
static unsigned parse_outer(const uint8_t *p, uint32_t len, uint32_t *esp_off, uint32_t *end,
                            uint32_t *nh_off, uint32_t *hlen, int *ip4)
{
    uint8_t proto;
    uint32_t off;
    if (len < 20)
        return XT_ESP_V_TRUNCATED;
    if ((p[0] >> 4) == 4) {
        uint32_t ihl = (uint32_t)(p[0] & 15) * 4, tot = rd16(p + 2);
        if (ihl < 20 || tot < ihl || tot > len)
            return XT_ESP_V_TRUNCATED;
        if (ip_csum(p, ihl) != 0) /* RFC 1122 3.2.1.2: verify, silently discard */
            return XT_ESP_V_BAD_CHECKSUM;
        if (rd16(p + 6) & 0x3fff) /* MF or fragment offset: reassembly is not ours */
            return XT_ESP_V_FRAGMENTED;
        proto = p[9];
        off = ihl;
        *end = tot;
        *nh_off = 9;
        *ip4 = 1;
    } else if ((p[0] >> 4) == 6) {
        if (len < 40 || 40u + rd16(p + 4) > len)
            return XT_ESP_V_TRUNCATED;
        *end = 40u + rd16(p + 4);
        proto = p[6];
        *nh_off = 6;
        off = 40;
        *ip4 = 0;
        /* Hop-by-hop, routing and destination options may precede ESP (RFC 8200 4.1). */
        for (int i = 0; i < 8 && (proto == 0 || proto == 43 || proto == 60); i++) {
            if (off + 8 > *end)
                return XT_ESP_V_TRUNCATED;
            if (proto == 43 && p[off + 3] != 0) /* segments left: not for us yet */
                return XT_ESP_V_NOT_ESP;
            *nh_off = off;
            proto = p[off];
            off += ((uint32_t)p[off + 1] + 1) * 8;
        }
        if (off > *end)
            return XT_ESP_V_TRUNCATED;
        if (proto == 44)
            return XT_ESP_V_FRAGMENTED;
    } else {
        return XT_ESP_V_NOT_ESP;
    }
    *hlen = off;
    if (proto == IPPROTO_UDP_) {
        /* RFC 3948 2: UDP, then a non-zero SPI. A zero "SPI" is the non-ESP marker (IKE), a single
         * 0xff byte is a NAT keepalive: neither is ours. */
        if (off + 8 > *end)
            return XT_ESP_V_TRUNCATED;
        uint32_t ulen = rd16(p + off + 4);
        if (ulen < 8 || off + ulen > *end)
            return XT_ESP_V_TRUNCATED;
        *end = off + ulen;
        off += 8;
        if (*end - off < 4 || rd32(p + off) == 0)
            return XT_ESP_V_NOT_ESP;
    } else if (proto != IPPROTO_ESP_) {
        return XT_ESP_V_NOT_ESP;
    }
    if (*end - off < ESP_HDR)
        return XT_ESP_V_TRUNCATED;
    *esp_off = off;
    return XT_ESP_V_OK;
}

static unsigned decrypt_one(struct xt_esp_worker *w, struct xt_pkt *pk, struct xt_sa **sa_out,
                            struct xt_sa_slot **slot_out)
{
    uint8_t *p = pk->data;
    uint32_t esp_off, end, nh_off, hlen;
    int ip4;
    unsigned v = parse_outer(p, pk->len, &esp_off, &end, &nh_off, &hlen, &ip4);
    if (v != XT_ESP_V_OK)
        return v;

    uint8_t *esp = p + esp_off;
    uint32_t esp_len = end - esp_off;
    uint32_t spi = rd32(esp);
    uint64_t seq = rd32(esp + 4);
    struct xt_sa *sa = xt_lookup(&w->ctx->tab[XT_ESP_DIR_IN], spi);
    if (!sa)
        return XT_ESP_V_UNKNOWN_SPI;
    if ((sa->flags & XT_ESP_F_CHECK_DST) && (!ip4 || memcmp(p + 16, sa->local, 4) != 0))
        return XT_ESP_V_UNKNOWN_SPI;
    *sa_out = sa;
    pk->spi = spi;
    pk->tunnel = sa->tunnel_id;
    /* This worker's counters and cipher context for the SA, set up on its first packet. */
    struct xt_sa_slot *slot = xt_slot_get(w, sa);
    if (unlikely(!slot))
        return XT_ESP_V_CRYPTO_ERROR;
    *slot_out = slot;

    if (unlikely(lifetime_hard_hit(sa)))
        return XT_ESP_V_LIFETIME_EXPIRED;

    /* Lengths: header, IV, at least pad length + next header, ICV; CBC in whole blocks. */
    uint32_t icv = sa->icv_len, ivl = sa->iv_len;
    if (esp_len < ESP_HDR + ivl + 2 + icv)
        return XT_ESP_V_TRUNCATED;
    uint8_t *iv = esp + ESP_HDR;
    uint8_t *ct = iv + ivl;
    uint32_t ct_len = esp_len - ESP_HDR - ivl - icv;
    uint8_t *tag = ct + ct_len;
    if (sa->enc == XT_ESP_ENC_AES_CBC && (ct_len == 0 || ct_len % 16))
        return XT_ESP_V_TRUNCATED;

    /* Replay pre-check (RFC 4303 3.4.3): cheap, before any crypto, without the lock: a stale
     * view only lets a replay through to the locked re-check after the ICV. */
    if (sa->replay && !xt_replay_check(sa->replay, seq))
        return XT_ESP_V_REPLAY;

    /* Integrity and decryption. */
    if (sa->enc == XT_ESP_ENC_AES_GCM_16) {
        uint8_t nonce[12];
        int outl;
        memcpy(nonce, sa->salt, 4);
        memcpy(nonce + 4, iv, 8);
        EVP_CIPHER_CTX *c = slot->cipher;
        if (!EVP_DecryptInit_ex(c, NULL, NULL, NULL, nonce) ||
            !EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, 16, tag) ||
            !EVP_DecryptUpdate(c, NULL, &outl, esp, ESP_HDR) ||
            !EVP_DecryptUpdate(c, ct, &outl, ct, (int)ct_len) ||
            EVP_DecryptFinal_ex(c, ct + outl, &outl) <= 0)
            return XT_ESP_V_ICV_MISMATCH;
    } else {
        if (sa->auth != XT_ESP_AUTH_NONE) {
            uint8_t mac[32];
            xt_hmac_compute(&sa->hmac, esp, ESP_HDR + ivl + ct_len, mac);
            if (CRYPTO_memcmp(mac, tag, icv) != 0)
                return XT_ESP_V_ICV_MISMATCH;
        }
        if (sa->enc == XT_ESP_ENC_AES_CBC) {
            int outl;
            EVP_CIPHER_CTX *c = slot->cipher;
            if (!EVP_DecryptInit_ex(c, NULL, NULL, NULL, iv) ||
                !EVP_DecryptUpdate(c, ct, &outl, ct, (int)ct_len))
                return XT_ESP_V_ICV_MISMATCH; /* cannot happen with whole blocks */
        }
    }

    /* Trailer: Pad Length, Next Header; padding must be 1, 2, 3, ... (RFC 4303 2.4). */
    uint8_t pad_len = ct[ct_len - 2], nh = ct[ct_len - 1];
    if ((uint32_t)pad_len + 2 > ct_len)
        return XT_ESP_V_BAD_PADDING;
    uint32_t pt_len = ct_len - 2 - pad_len;
    for (uint32_t i = 0; i < pad_len; i++)
        if (ct[pt_len + i] != (uint8_t)(i + 1))
            return XT_ESP_V_BAD_PADDING;

    /* Only now, with the packet authentic, move the window (RFC 4303 3.4.3, Appendix A). */
    if (sa->replay) {
        replay_lock(sa);
        int ok = xt_replay_update(sa->replay, seq);
        replay_unlock(sa);
        if (!ok)
            return XT_ESP_V_REPLAY; /* another worker accepted the same number meanwhile */
    }
    lifetime_account(sa, pt_len);

    if (nh == NH_NONE)
        return XT_ESP_V_DUMMY_PACKET;

    uint8_t *out;
    uint32_t out_len;
    if (sa->mode == XT_ESP_MODE_TUNNEL) {
        if (nh != NH_IPV4 && nh != NH_IPV6)
            return XT_ESP_V_BAD_NEXT_HEADER;
        out_len = inner_len(ct, pt_len, nh);
        if (!out_len) /* the rest (pt_len - out_len) is TFC padding, RFC 4303 2.7 */
            return XT_ESP_V_INNER_MALFORMED;
        out = ct;
    } else {
        /* Transport: the outer IP header(s) moved up against the payload, protocol restored. */
        /* (with UDP encapsulation the UDP header goes too, RFC 3948 3.1.2) */
        out = ct - hlen;
        memmove(out, p, hlen);
        out_len = hlen + pt_len;
        out[nh_off] = nh;
        if (ip4) {
            wr16(out + 2, (uint16_t)out_len);
            wr16(out + 10, 0);
            wr16(out + 10, ip_csum(out, hlen));
        } else {
            wr16(out + 4, (uint16_t)(out_len - 40));
        }
    }
    pk->headroom += (uint32_t)(out - p);
    pk->tailroom += pk->len - (uint32_t)(out - p) - out_len;
    pk->data = out;
    pk->len = out_len;
    return XT_ESP_V_OK;
}

unsigned xt_esp_decrypt_batch(struct xt_esp_worker *w, struct xt_pkt *pkts, unsigned n)
{
    unsigned ok = 0;
    batch_enter(w);
    for (unsigned i = 0; i < n; i++) {
        struct xt_pkt *pk = &pkts[i];
        struct xt_sa *sa = NULL;
        struct xt_sa_slot *slot = NULL;
        pk->spi = 0;
        pk->tunnel = 0;
        unsigned v = decrypt_one(w, pk, &sa, &slot);
        pk->verdict = (uint16_t)v;
        count(w, sa, slot, v, pk->len);
        ok += v == XT_ESP_V_OK;
    }
    batch_leave(w);
    return ok;
}

/* ---- encrypt -------------------------------------------------------------------------------------- */

static unsigned encrypt_one(struct xt_esp_worker *w, struct xt_pkt *pk, struct xt_sa **sa_out,
                            struct xt_sa_slot **slot_out)
{
    struct xt_sa *sa = xt_lookup(&w->ctx->tab[XT_ESP_DIR_OUT], pk->tunnel);
    if (!sa)
        return XT_ESP_V_UNKNOWN_TUNNEL;
    *sa_out = sa;
    pk->spi = sa->spi;
    struct xt_sa_slot *slot = xt_slot_get(w, sa); /* set up on this worker's first packet */
    if (unlikely(!slot))
        return XT_ESP_V_CRYPTO_ERROR;
    *slot_out = slot;

    uint8_t *in = pk->data;
    uint32_t len = pk->len;
    if (len == 0)
        return XT_ESP_V_INNER_MALFORMED;
    uint8_t nh = (in[0] >> 4) == 4 ? NH_IPV4 : (in[0] >> 4) == 6 ? NH_IPV6 : 0;
    if (!nh || inner_len(in, len, nh) != len)
        return XT_ESP_V_INNER_MALFORMED;

    uint32_t ivl = sa->iv_len, icv = sa->icv_len;
    uint32_t udp = (sa->flags & XT_ESP_F_UDP_ENCAP) ? 8 : 0;
    uint32_t head = 20 + udp + ESP_HDR + ivl;
    /* RFC 4303 2.4: payload + padding + 2 aligned to 4 (GCM, NULL; RFC 4106 3: no block padding)
     * or to the cipher block (CBC). */
    uint32_t pad = (sa->align - (len + 2) % sa->align) % sa->align;
    uint32_t tail = pad + 2 + icv;
    if (pk->headroom < head || pk->tailroom < tail)
        return XT_ESP_V_NO_ROOM;
    uint32_t esp_len = ESP_HDR + ivl + len + tail;
    uint32_t total = 20 + udp + esp_len;
    if (total > 0xffff)
        return XT_ESP_V_INNER_MALFORMED;

    if (unlikely(lifetime_hard_hit(sa)))
        return XT_ESP_V_LIFETIME_EXPIRED;
    /* RFC 4303 3.3.3: the counter must not cycle; 2^32 - 1 is the last number sent. */
    uint64_t seq = atomic_fetch_add_explicit(&sa->seq_out, 1, memory_order_relaxed) + 1;
    if (unlikely(seq >= UINT32_MAX)) {
        if (seq > UINT32_MAX) {
            atomic_fetch_or(&sa->lt_flags, XT_ESP_LT_SEQ_EXHAUSTED);
            return XT_ESP_V_SEQ_EXHAUSTED;
        }
        atomic_fetch_or(&sa->lt_flags, XT_ESP_LT_SEQ_EXHAUSTED); /* last one: ask for a rekey */
    }

    uint8_t *outer = in - head;
    uint8_t *esp = outer + 20 + udp;
    uint8_t *iv = esp + ESP_HDR;
    uint8_t *trailer = in + len;
    uint8_t tos = nh == NH_IPV4 ? in[1] : (uint8_t)((in[0] << 4) | (in[1] >> 4));

    for (uint32_t i = 0; i < pad; i++)
        trailer[i] = (uint8_t)(i + 1);
    trailer[pad] = (uint8_t)pad;
    trailer[pad + 1] = nh;
    wr32(esp, sa->spi);
    wr32(esp + 4, (uint32_t)seq);
    uint32_t ct_len = len + pad + 2;
    uint8_t *icv_out = in + ct_len;

    if (sa->enc != XT_ESP_ENC_NULL) {
        /* IV: 16-bit node id || 48-bit per-SA, per-node counter. Never the sequence number alone,
         * never random: two edge nodes sharing a key cannot collide, one node never repeats. */
        uint64_t ctr = atomic_fetch_add_explicit(&sa->iv_ctr, 1, memory_order_relaxed);
        if (unlikely(ctr >> XT_ESP_IV_COUNTER_BITS))
            return XT_ESP_V_SEQ_EXHAUSTED;
        uint8_t nonce[16] = {0};
        wr16(nonce, sa->node_id);
        wr16(nonce + 2, (uint16_t)(ctr >> 32));
        wr32(nonce + 4, (uint32_t)ctr);
        EVP_CIPHER_CTX *c = slot->cipher;
        int outl;
        if (sa->enc == XT_ESP_ENC_AES_GCM_16) {
            uint8_t gnonce[12];
            memcpy(iv, nonce, 8);
            memcpy(gnonce, sa->salt, 4);
            memcpy(gnonce + 4, nonce, 8);
            if (!EVP_EncryptInit_ex(c, NULL, NULL, NULL, gnonce) ||
                !EVP_EncryptUpdate(c, NULL, &outl, esp, ESP_HDR) ||
                !EVP_EncryptUpdate(c, in, &outl, in, (int)ct_len) ||
                !EVP_EncryptFinal_ex(c, in + outl, &outl) ||
                !EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, 16, icv_out))
                return XT_ESP_V_CRYPTO_ERROR; /* OpenSSL failure: not reachable with valid input */
        } else {
            /* CBC: IV = AES_K(node || counter || 0), unpredictable without an RNG (SP 800-38A C) */
            if (!EVP_EncryptUpdate(slot->ivgen, iv, &outl, nonce, 16) ||
                !EVP_EncryptInit_ex(c, NULL, NULL, NULL, iv) ||
                !EVP_EncryptUpdate(c, in, &outl, in, (int)ct_len))
                return XT_ESP_V_CRYPTO_ERROR;
        }
    }
    if (sa->auth != XT_ESP_AUTH_NONE) {
        uint8_t mac[32];
        xt_hmac_compute(&sa->hmac, esp, ESP_HDR + ivl + ct_len, mac);
        memcpy(icv_out, mac, icv);
    }

    /* Outer IPv4: DSCP/ECN copied from the inner header (RFC 4301 5.1.2.1, RFC 6040 normal mode),
     * DF clear, ID from a per-SA counter, valid checksum. */
    outer[0] = 0x45;
    outer[1] = tos;
    wr16(outer + 2, (uint16_t)total);
    wr16(outer + 4, (uint16_t)seq); /* unique per SA within any reassembly lifetime (RFC 6864) */
    wr16(outer + 6, 0);
    outer[8] = sa->ttl;
    outer[9] = udp ? IPPROTO_UDP_ : IPPROTO_ESP_;
    wr16(outer + 10, 0);
    memcpy(outer + 12, sa->local, 4);
    memcpy(outer + 16, sa->remote, 4);
    wr16(outer + 10, ip_csum(outer, 20));
    if (udp) {
        /* RFC 3948 2.1: checksum zero */
        wr16(outer + 20, sa->sport);
        wr16(outer + 22, sa->dport);
        wr16(outer + 24, (uint16_t)(8 + esp_len));
        wr16(outer + 26, 0);
    }
    lifetime_account(sa, len);
    pk->data = outer;
    pk->len = total;
    pk->headroom -= head;
    pk->tailroom -= tail;
    return XT_ESP_V_OK;
}

unsigned xt_esp_encrypt_batch(struct xt_esp_worker *w, struct xt_pkt *pkts, unsigned n)
{
    unsigned ok = 0;
    batch_enter(w);
    for (unsigned i = 0; i < n; i++) {
        struct xt_pkt *pk = &pkts[i];
        struct xt_sa *sa = NULL;
        struct xt_sa_slot *slot = NULL;
        pk->spi = 0;
        uint32_t in_len = pk->len;
        unsigned v = encrypt_one(w, pk, &sa, &slot);
        pk->verdict = (uint16_t)v;
        count(w, sa, slot, v, in_len);
        ok += v == XT_ESP_V_OK;
    }
    batch_leave(w);
    return ok;
}
