/*
 * esp_internal.h - SA, worker and context layout shared by esp.c (control) and esp_data.c
 * (per-packet path). Not part of the API.
 *
 * Reclamation (why a worker can read an SA without a lock and a delete never frees it under it)
 * -----------------------------------------------------------------------------------------------
 * Quiescent-state-based reclamation (an RCU flavour):
 *  - Hash chains are singly linked lists of `_Atomic` pointers. Writers (add/replace/delete) hold
 *    ctx->wlock, so there is one writer at a time; they publish with release stores.
 *  - A worker announces itself at the start of a batch: w->epoch = ctx->epoch (seq_cst, then a
 *    full fence), and leaves at the end with w->epoch = 0 (release). Between those it may hold
 *    any SA it found in a chain.
 *  - A writer unlinks an SA, then bumps ctx->epoch to E and tags the SA with E. It is freed only
 *    when every worker is either outside a batch (epoch 0) or inside one that started at E or
 *    later. Such a batch announced itself after the unlink (both sides use seq_cst store + fence,
 *    so either the writer sees the announcement, or the worker sees the unlinked chain), so it
 *    cannot reach the SA.
 *  - Freeing happens on the writer's side only (in add/del/reclaim), never in a worker, and it never
 *    waits: an SA still visible to a running batch stays on the retired list until the next call.
 * Workers therefore take no lock and touch no shared cache line to find an SA; the cost is one
 * store and one fence per batch. A refcount per packet would make every worker write to the SA's
 * cache line; a read-write lock would make the writer wait for the data path.
 *
 * Per-SA mutable state shared by workers is kept small and lock-free except the replay window:
 *  - outbound sequence number, IV counter, lifetime totals (only for SAs with packet/byte limits):
 *    atomic fetch-add; the outer IPv4 ID is the low 16 bits of the sequence number;
 *  - the anti-replay window: checked without a lock before the crypto, then re-checked and updated
 *    under a per-SA spinlock held for that bit update only (never across crypto), so workers only
 *    meet when they process the same SA at the same instant;
 *  - cipher contexts and packet/drop counters: one slot per worker, no sharing at all.
 *
 * Lazy slots (memory: an idle SA costs no cipher context and no counters)
 * ------------------------------------------------------------------------
 * An SA is installed with every slot pointer NULL and its encryption key kept in the SA
 * (OPENSSL_cleanse'd by sa_free). The first packet a worker processes for the SA (any verdict
 * after the lookup) makes that worker allocate its slot: counters and, unless the encryption is
 * NULL, its keyed EVP context(s). The slot is published with a release store only when complete,
 * so a non-NULL slot is always ready; only the owning worker ever writes its pointer, so there
 * is no lock and no race between workers. Readers (stats, sa_free) load it with acquire, under
 * ctx->wlock. Freeing is unchanged: the slots go with the SA in sa_free, after the grace period
 * above, so a worker that created a slot on an SA being replaced or deleted still owns a live SA
 * until its batch ends. A failed set-up (out of memory, OpenSSL error) drops the packet as
 * crypto_error, counted in sa->slot_failures (there is no slot to count it in); the next packet
 * tries again. With RSS a tunnel's packets mostly land on one queue, so one slot per active SA.
 */
#ifndef XT_ESP_INTERNAL_H
#define XT_ESP_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

/* The HMAC precomputation uses the low-level SHA interfaces on purpose: a SHA256_CTX is a plain
 * struct, so resuming the precomputed ipad/opad states per packet is a struct copy, where the
 * EVP_MAC / EVP_MD_CTX_copy route allocates inside OpenSSL 3 on every packet. They are deprecated
 * in OpenSSL 3.0 but present; silence only that deprecation, in this module only. */
#define OPENSSL_SUPPRESS_DEPRECATED 1
#include <openssl/evp.h>
#include <openssl/sha.h>

#include "esp.h"
#include "esp_replay.h"

#define XT_CACHELINE 64
#define XT_MAX_WORKERS 64

_Static_assert(XT_ESP_V__COUNT <= XT_ESP_VERDICT_MAX, "verdict list outgrew the counter arrays");
_Static_assert(XT_ESP_VERDICT_MAX == 32, "stats structs in esp.h spell 32");

/* Counters of one worker for one SA (or for the context): written by that worker only. */
struct xt_counters {
    uint64_t packets;
    uint64_t bytes;
    uint64_t drops[XT_ESP_VERDICT_MAX];
};

/* Owner-only increment, readable by others without tearing. */
#define XT_CTR_ADD(field, v) \
    __atomic_store_n(&(field), __atomic_load_n(&(field), __ATOMIC_RELAXED) + (v), __ATOMIC_RELAXED)

struct xt_sa_slot {
    EVP_CIPHER_CTX *cipher; /* GCM or CBC, keyed once at set-up; per packet only the IV is set */
    EVP_CIPHER_CTX *ivgen;  /* CBC outbound: AES-ECB under the SA key, IV = E_K(node||counter) */
    struct xt_counters c;
} __attribute__((aligned(XT_CACHELINE)));

struct xt_hmac {
    uint8_t alg;     /* XT_ESP_AUTH_* */
    uint8_t icv_len; /* truncated length on the wire */
    union {
        SHA256_CTX s256;
        SHA_CTX s1;
    } inner, outer; /* states after absorbing key^ipad / key^opad */
};

struct xt_sa {
    struct xt_sa *_Atomic next; /* hash chain */
    struct xt_sa *retired_next;
    uint64_t retire_epoch;

    uint32_t key; /* SPI (inbound) or tunnel id (outbound) */
    uint32_t spi;
    uint32_t tunnel_id;
    uint32_t flags;
    uint8_t dir, mode, enc, auth;
    uint8_t iv_len;   /* 0, 8 (GCM), 16 (CBC) */
    uint8_t icv_len;  /* 0, 12, 16 */
    uint8_t align;    /* padding alignment: 4 or 16 */
    uint8_t ttl;
    uint8_t salt[4];
    uint8_t enc_key_len;                 /* 0 (NULL), 16, 32 */
    uint8_t enc_key[XT_ESP_MAX_ENC_KEY]; /* for the lazy slot set-up; cleansed in sa_free */
    uint8_t local[4], remote[4];
    uint16_t sport, dport;
    uint16_t node_id;
    struct xt_hmac hmac;

    uint64_t soft_packets, hard_packets, soft_bytes, hard_bytes;
    int has_limits; /* any of the four set: lifetimes are counted in lt_packets/lt_bytes */

    /* shared mutable state */
    _Atomic uint64_t seq_out __attribute__((aligned(XT_CACHELINE))); /* last used */
    _Atomic uint64_t iv_ctr;                                           /* next to use */
    _Atomic uint64_t lt_packets, lt_bytes;
    _Atomic uint32_t lt_flags;
    atomic_flag replay_lock;
    struct xt_replay *replay; /* inbound only; NULL when window is 0 */
    _Atomic uint64_t slot_failures; /* crypto_error drops: a worker's slot set-up failed */

    unsigned n_slots;
    struct xt_sa_slot *_Atomic slots[]; /* one per worker slot, NULL until its first packet */
};

struct xt_esp_worker {
    struct xt_esp_ctx *ctx;
    unsigned slot;
    int in_use;
    _Atomic uint64_t epoch; /* 0 = quiescent */
    struct xt_counters c;   /* drops without an SA */
} __attribute__((aligned(XT_CACHELINE)));

struct xt_table {
    struct xt_sa *_Atomic *buckets;
    uint32_t mask;
    unsigned shift;
    uint64_t count;
};

struct xt_esp_ctx {
    pthread_mutex_t wlock; /* writers only */
    _Atomic uint64_t epoch;
    struct xt_table tab[2]; /* XT_ESP_DIR_IN, XT_ESP_DIR_OUT */
    struct xt_sa *retired;
    uint64_t n_retired;
    unsigned max_workers;
    struct xt_esp_worker *workers; /* max_workers entries */
    _Atomic unsigned test_fail_slots; /* TEST HOOK: fail this many slot set-ups */
};

static inline uint32_t xt_hash(const struct xt_table *t, uint32_t key)
{
    /* Fibonacci hashing: SPIs are chosen by our IKE responder, the multiply spreads any pattern. */
    return (uint32_t)((key * 2654435769u) >> t->shift) & t->mask;
}

static inline struct xt_sa *xt_lookup(const struct xt_table *t, uint32_t key)
{
    struct xt_sa *sa = atomic_load_explicit(&t->buckets[xt_hash(t, key)], memory_order_acquire);
    while (sa && sa->key != key)
        sa = atomic_load_explicit(&sa->next, memory_order_acquire);
    return sa;
}

/* Slow path of xt_slot_get: allocate, key and publish the worker's slot of sa (esp.c).
 * NULL on failure (nothing published, the OpenSSL error queue cleared). */
struct xt_sa_slot *xt_slot_create(struct xt_esp_worker *w, struct xt_sa *sa);

/* The worker's own slot of sa, set up on first use. Only this worker writes the pointer, so a
 * relaxed load sees its own store. */
static inline struct xt_sa_slot *xt_slot_get(struct xt_esp_worker *w, struct xt_sa *sa)
{
    struct xt_sa_slot *s = atomic_load_explicit(&sa->slots[w->slot], memory_order_relaxed);
    return __builtin_expect(s != NULL, 1) ? s : xt_slot_create(w, sa);
}

/* HMAC over a contiguous region, writes the full digest (<= 32 bytes) to out. */
void xt_hmac_compute(const struct xt_hmac *h, const uint8_t *data, size_t len, uint8_t *out);

#endif /* XT_ESP_INTERNAL_H */
