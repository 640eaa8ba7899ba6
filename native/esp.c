/*
 * esp.c - control side of the native ESP module: contexts, workers, the SA tables (add, replace,
 * delete, reclamation), statistics and names. The per-packet path is in esp_data.c.
 */
#include <stdlib.h>
#include <string.h>

#include "esp_internal.h" /* first: it sets OPENSSL_SUPPRESS_DEPRECATED */

#include <openssl/crypto.h>
#include <openssl/err.h>

/* ---- names ----------------------------------------------------------------------------------- */

static const char *const verdict_names[XT_ESP_V__COUNT] = {
#define XT_ESP_VERDICT_NAME(name, num, str) [num] = str,
    XT_ESP_VERDICTS(XT_ESP_VERDICT_NAME)
#undef XT_ESP_VERDICT_NAME
};

unsigned xt_esp_verdict_count(void) { return XT_ESP_V__COUNT; }

const char *xt_esp_verdict_name(unsigned v) { return v < XT_ESP_V__COUNT ? verdict_names[v] : NULL; }

const char *xt_esp_strerror(int err)
{
    switch (err) {
    case 0: return "ok";
    case XT_ESP_E_INVAL: return "invalid argument";
    case XT_ESP_E_NOMEM: return "out of memory";
    case XT_ESP_E_CRYPTO: return "OpenSSL refused the key or algorithm";
    case XT_ESP_E_ESN: return "extended sequence numbers (ESN) are not supported";
    case XT_ESP_E_NULL_NOT_ALLOWED:
        return "NULL encryption or no integrity needs the explicit allow_null opt-in";
    case XT_ESP_E_KEY_LEN: return "key length not valid for the algorithm";
    case XT_ESP_E_ALG: return "unsupported algorithm combination";
    case XT_ESP_E_NOT_FOUND: return "no such SA";
    case XT_ESP_E_WINDOW: return "replay window larger than the maximum";
    case XT_ESP_E_SPI: return "SPI 0 is reserved (RFC 4303 2.1)";
    case XT_ESP_E_MODE: return "transport mode is supported for inbound SAs only";
    case XT_ESP_E_BUSY: return "workers still attached";
    default: return "unknown error";
    }
}

/* ---- HMAC precomputation (RFC 2104) ------------------------------------------------------------ */

static void hmac_setup(struct xt_hmac *h, uint8_t alg, const uint8_t *key, size_t key_len)
{
    uint8_t k[64] = {0}, pad[64];
    h->alg = alg;
    if (alg == XT_ESP_AUTH_HMAC_SHA256_128) {
        h->icv_len = 16;
        if (key_len > 64)
            SHA256(key, key_len, k);
        else
            memcpy(k, key, key_len);
        for (int i = 0; i < 64; i++)
            pad[i] = k[i] ^ 0x36;
        SHA256_Init(&h->inner.s256);
        SHA256_Update(&h->inner.s256, pad, 64);
        for (int i = 0; i < 64; i++)
            pad[i] = k[i] ^ 0x5c;
        SHA256_Init(&h->outer.s256);
        SHA256_Update(&h->outer.s256, pad, 64);
    } else {
        h->icv_len = 12;
        if (key_len > 64)
            SHA1(key, key_len, k);
        else
            memcpy(k, key, key_len);
        for (int i = 0; i < 64; i++)
            pad[i] = k[i] ^ 0x36;
        SHA1_Init(&h->inner.s1);
        SHA1_Update(&h->inner.s1, pad, 64);
        for (int i = 0; i < 64; i++)
            pad[i] = k[i] ^ 0x5c;
        SHA1_Init(&h->outer.s1);
        SHA1_Update(&h->outer.s1, pad, 64);
    }
    OPENSSL_cleanse(k, sizeof(k));
    OPENSSL_cleanse(pad, sizeof(pad));
}

void xt_hmac_compute(const struct xt_hmac *h, const uint8_t *data, size_t len, uint8_t *out)
{
    if (h->alg == XT_ESP_AUTH_HMAC_SHA256_128) {
        SHA256_CTX c = h->inner.s256;
        uint8_t d[32];
        SHA256_Update(&c, data, len);
        SHA256_Final(d, &c);
        c = h->outer.s256;
        SHA256_Update(&c, d, 32);
        SHA256_Final(out, &c);
        OPENSSL_cleanse(&c, sizeof(c));
    } else {
        SHA_CTX c = h->inner.s1;
        uint8_t d[20];
        SHA1_Update(&c, data, len);
        SHA1_Final(d, &c);
        c = h->outer.s1;
        SHA1_Update(&c, d, 20);
        SHA1_Final(out, &c);
        OPENSSL_cleanse(&c, sizeof(c));
    }
}

/* ---- SA objects --------------------------------------------------------------------------------- */

static void slot_free(struct xt_sa_slot *s)
{
    if (!s)
        return;
    EVP_CIPHER_CTX_free(s->cipher); /* frees (and wipes) the key schedule too */
    EVP_CIPHER_CTX_free(s->ivgen);
    free(s);
}

/* Only after the grace period (esp_internal.h): no worker can still hold sa or its slots. */
static void sa_free(struct xt_sa *sa)
{
    if (!sa)
        return;
    for (unsigned i = 0; i < sa->n_slots; i++)
        slot_free(atomic_load_explicit(&sa->slots[i], memory_order_acquire));
    xt_replay_free(sa->replay);
    OPENSSL_cleanse(&sa->hmac, sizeof(sa->hmac));
    OPENSSL_cleanse(sa->salt, sizeof(sa->salt));
    OPENSSL_cleanse(sa->enc_key, sizeof(sa->enc_key));
    free(sa);
}

static int validate(const struct xt_esp_sa_params *p)
{
    if (p->flags & XT_ESP_F_ESN)
        return XT_ESP_E_ESN;
    if (p->direction > XT_ESP_DIR_OUT || p->mode > XT_ESP_MODE_TRANSPORT)
        return XT_ESP_E_INVAL;
    if (p->mode == XT_ESP_MODE_TRANSPORT && p->direction != XT_ESP_DIR_IN)
        return XT_ESP_E_MODE;
    if (p->spi == 0)
        return XT_ESP_E_SPI;
    if (p->replay_window > XT_ESP_MAX_REPLAY_WINDOW)
        return XT_ESP_E_WINDOW;
    switch (p->enc_alg) {
    case XT_ESP_ENC_AES_GCM_16:
        if (p->auth_alg != XT_ESP_AUTH_NONE)
            return XT_ESP_E_ALG; /* AEAD carries its own ICV */
        /* fall through */
    case XT_ESP_ENC_AES_CBC:
        if (p->enc_key_len != 16 && p->enc_key_len != 32)
            return XT_ESP_E_KEY_LEN;
        break;
    case XT_ESP_ENC_NULL:
        if (!(p->flags & XT_ESP_F_ALLOW_NULL))
            return XT_ESP_E_NULL_NOT_ALLOWED;
        if (p->auth_alg == XT_ESP_AUTH_NONE)
            return XT_ESP_E_ALG; /* RFC 4303 3.2: NULL encryption and no integrity MUST NOT */
        break;
    default:
        return XT_ESP_E_ALG;
    }
    switch (p->auth_alg) {
    case XT_ESP_AUTH_NONE:
        if (p->enc_alg == XT_ESP_ENC_AES_CBC && !(p->flags & XT_ESP_F_ALLOW_NULL))
            return XT_ESP_E_NULL_NOT_ALLOWED;
        break;
    case XT_ESP_AUTH_HMAC_SHA1_96:
    case XT_ESP_AUTH_HMAC_SHA256_128:
        if (p->auth_key_len == 0 || p->auth_key_len > XT_ESP_MAX_AUTH_KEY)
            return XT_ESP_E_KEY_LEN;
        break;
    default:
        return XT_ESP_E_ALG;
    }
    return 0;
}

static const EVP_CIPHER *cipher_for(uint8_t enc, uint8_t key_len, int ecb)
{
    if (enc == XT_ESP_ENC_AES_GCM_16)
        return key_len == 16 ? EVP_aes_128_gcm() : EVP_aes_256_gcm();
    if (ecb)
        return key_len == 16 ? EVP_aes_128_ecb() : EVP_aes_256_ecb();
    return key_len == 16 ? EVP_aes_128_cbc() : EVP_aes_256_cbc();
}

/* Key the cipher context(s) of one slot from the key kept in the SA. */
static int slot_init(const struct xt_sa *sa, struct xt_sa_slot *s)
{
    if (sa->enc == XT_ESP_ENC_NULL)
        return 0;
    int enc = sa->dir == XT_ESP_DIR_OUT;
    const EVP_CIPHER *c = cipher_for(sa->enc, sa->enc_key_len, 0);
    s->cipher = EVP_CIPHER_CTX_new();
    if (!s->cipher)
        return XT_ESP_E_NOMEM;
    if (!EVP_CipherInit_ex(s->cipher, c, NULL, NULL, NULL, enc))
        return XT_ESP_E_CRYPTO;
    if (sa->enc == XT_ESP_ENC_AES_GCM_16) {
        if (!EVP_CIPHER_CTX_ctrl(s->cipher, EVP_CTRL_GCM_SET_IVLEN, 12, NULL))
            return XT_ESP_E_CRYPTO;
    }
    if (!EVP_CipherInit_ex(s->cipher, NULL, NULL, sa->enc_key, NULL, enc))
        return XT_ESP_E_CRYPTO;
    if (sa->enc == XT_ESP_ENC_AES_CBC) {
        EVP_CIPHER_CTX_set_padding(s->cipher, 0); /* ESP pads itself */
        if (enc) {
            /* NIST SP 800-38A Appendix C: an unpredictable CBC IV as the forward cipher of a nonce
             * under the same key; the nonce is node id || counter, so no RNG on the packet path. */
            s->ivgen = EVP_CIPHER_CTX_new();
            if (!s->ivgen)
                return XT_ESP_E_NOMEM;
            if (!EVP_EncryptInit_ex(s->ivgen, cipher_for(sa->enc, sa->enc_key_len, 1), NULL,
                                    sa->enc_key, NULL))
                return XT_ESP_E_CRYPTO;
            EVP_CIPHER_CTX_set_padding(s->ivgen, 0);
        }
    }
    return 0;
}

/* Called by the worker that owns slot w->slot, on its first packet for sa (esp_internal.h, "Lazy
 * slots"). Runs inside the worker's batch, so sa cannot be freed meanwhile. */
struct xt_sa_slot *xt_slot_create(struct xt_esp_worker *w, struct xt_sa *sa)
{
    struct xt_esp_ctx *ctx = w->ctx;
    unsigned f = atomic_load_explicit(&ctx->test_fail_slots, memory_order_relaxed);
    while (f && !atomic_compare_exchange_weak(&ctx->test_fail_slots, &f, f - 1))
        ;
    if (f) /* TEST HOOK: as if OpenSSL or malloc had failed */
        return NULL;
    struct xt_sa_slot *s = aligned_alloc(XT_CACHELINE, sizeof(*s)); /* size is a multiple of 64 */
    if (!s)
        return NULL;
    memset(s, 0, sizeof(*s));
    if (slot_init(sa, s) != 0) {
        slot_free(s);
        ERR_clear_error(); /* this thread's OpenSSL error queue must not grow per failure */
        return NULL;
    }
    atomic_store_explicit(&sa->slots[w->slot], s, memory_order_release);
    return s;
}

static int sa_new(const struct xt_esp_ctx *ctx, const struct xt_esp_sa_params *p, struct xt_sa **out)
{
    int err = validate(p);
    if (err)
        return err;
    /* No cipher context here: each worker keys its own on its first packet (xt_slot_create). */
    size_t sz = sizeof(struct xt_sa) + ctx->max_workers * sizeof(struct xt_sa_slot *);
    struct xt_sa *sa = aligned_alloc(XT_CACHELINE, (sz + XT_CACHELINE - 1) & ~(size_t)(XT_CACHELINE - 1));
    if (!sa)
        return XT_ESP_E_NOMEM;
    memset(sa, 0, sz);
    sa->n_slots = ctx->max_workers;
    sa->dir = p->direction;
    sa->key = p->direction == XT_ESP_DIR_IN ? p->spi : p->tunnel_id;
    sa->spi = p->spi;
    sa->tunnel_id = p->tunnel_id;
    sa->flags = p->flags;
    sa->mode = p->mode;
    sa->enc = p->enc_alg;
    sa->auth = p->auth_alg;
    sa->ttl = p->ttl ? p->ttl : 64;
    memcpy(sa->salt, p->salt, 4);
    if (p->enc_alg != XT_ESP_ENC_NULL) {
        sa->enc_key_len = p->enc_key_len; /* 16 or 32: validate() checked it */
        memcpy(sa->enc_key, p->enc_key, p->enc_key_len);
    }
    memcpy(sa->local, p->local_addr, 4);
    memcpy(sa->remote, p->remote_addr, 4);
    sa->sport = p->encap_sport;
    sa->dport = p->encap_dport;
    sa->node_id = p->node_id;
    sa->soft_packets = p->soft_packets;
    sa->hard_packets = p->hard_packets;
    sa->soft_bytes = p->soft_bytes;
    sa->hard_bytes = p->hard_bytes;
    sa->has_limits = p->soft_packets || p->hard_packets || p->soft_bytes || p->hard_bytes;
    atomic_flag_clear(&sa->replay_lock);
    switch (p->enc_alg) {
    case XT_ESP_ENC_AES_GCM_16: sa->iv_len = 8; sa->icv_len = 16; sa->align = 4; break;
    case XT_ESP_ENC_AES_CBC: sa->iv_len = 16; sa->align = 16; break;
    default: sa->iv_len = 0; sa->align = 4; break;
    }
    if (p->auth_alg != XT_ESP_AUTH_NONE) {
        hmac_setup(&sa->hmac, p->auth_alg, p->auth_key, p->auth_key_len);
        sa->icv_len = sa->hmac.icv_len;
    }
    if (p->direction == XT_ESP_DIR_IN && p->replay_window) {
        sa->replay = xt_replay_new(p->replay_window);
        if (!sa->replay) {
            sa_free(sa);
            return XT_ESP_E_NOMEM;
        }
    }
    for (unsigned i = 0; i < sa->n_slots; i++)
        atomic_init(&sa->slots[i], NULL);
    *out = sa;
    return 0;
}

/* ---- reclamation (see esp_internal.h) ---------------------------------------------------------- */

static void retire(struct xt_esp_ctx *ctx, struct xt_sa *sa)
{
    /* The unlink was a seq_cst store; the bump orders after it. */
    atomic_thread_fence(memory_order_seq_cst);
    sa->retire_epoch = atomic_fetch_add(&ctx->epoch, 1) + 1;
    sa->retired_next = ctx->retired;
    ctx->retired = sa;
    ctx->n_retired++;
}

static unsigned reclaim_locked(struct xt_esp_ctx *ctx)
{
    atomic_thread_fence(memory_order_seq_cst);
    uint64_t min_active = UINT64_MAX;
    for (unsigned i = 0; i < ctx->max_workers; i++) {
        uint64_t e = atomic_load(&ctx->workers[i].epoch);
        if (e && e < min_active)
            min_active = e;
    }
    unsigned freed = 0;
    struct xt_sa **pp = &ctx->retired;
    while (*pp) {
        struct xt_sa *sa = *pp;
        if (sa->retire_epoch <= min_active) {
            *pp = sa->retired_next;
            sa_free(sa);
            ctx->n_retired--;
            freed++;
        } else {
            pp = &sa->retired_next;
        }
    }
    return freed;
}

unsigned xt_esp_reclaim(struct xt_esp_ctx *ctx)
{
    pthread_mutex_lock(&ctx->wlock);
    unsigned n = reclaim_locked(ctx);
    pthread_mutex_unlock(&ctx->wlock);
    return n;
}

/* ---- context and workers ------------------------------------------------------------------------ */

static int table_init(struct xt_table *t, unsigned log2)
{
    t->buckets = calloc((size_t)1 << log2, sizeof(*t->buckets));
    if (!t->buckets)
        return -1;
    t->mask = (uint32_t)((1u << log2) - 1);
    t->shift = 32 - log2;
    return 0;
}

struct xt_esp_ctx *xt_esp_ctx_new(unsigned max_workers, unsigned buckets_log2)
{
    if (max_workers == 0 || max_workers > XT_MAX_WORKERS)
        return NULL;
    if (buckets_log2 == 0)
        buckets_log2 = 17;
    if (buckets_log2 < 4 || buckets_log2 > 24)
        return NULL;
    struct xt_esp_ctx *ctx = calloc(1, sizeof(*ctx));
    if (!ctx)
        return NULL;
    ctx->workers = aligned_alloc(XT_CACHELINE, max_workers * sizeof(struct xt_esp_worker));
    if (!ctx->workers || table_init(&ctx->tab[0], buckets_log2) || table_init(&ctx->tab[1], buckets_log2)) {
        free(ctx->workers);
        free(ctx->tab[0].buckets);
        free(ctx->tab[1].buckets);
        free(ctx);
        return NULL;
    }
    memset(ctx->workers, 0, max_workers * sizeof(struct xt_esp_worker));
    for (unsigned i = 0; i < max_workers; i++) {
        ctx->workers[i].ctx = ctx;
        ctx->workers[i].slot = i;
    }
    ctx->max_workers = max_workers;
    atomic_init(&ctx->epoch, 1);
    pthread_mutex_init(&ctx->wlock, NULL);
    return ctx;
}

void xt_esp_ctx_free(struct xt_esp_ctx *ctx)
{
    if (!ctx)
        return;
    for (int d = 0; d < 2; d++) {
        struct xt_table *t = &ctx->tab[d];
        for (uint32_t b = 0; b <= t->mask; b++) {
            struct xt_sa *sa = atomic_load(&t->buckets[b]);
            while (sa) {
                struct xt_sa *next = atomic_load(&sa->next);
                sa_free(sa);
                sa = next;
            }
        }
        free(t->buckets);
    }
    while (ctx->retired) {
        struct xt_sa *next = ctx->retired->retired_next;
        sa_free(ctx->retired);
        ctx->retired = next;
    }
    pthread_mutex_destroy(&ctx->wlock);
    free(ctx->workers);
    free(ctx);
}

struct xt_esp_worker *xt_esp_worker_new(struct xt_esp_ctx *ctx)
{
    struct xt_esp_worker *w = NULL;
    pthread_mutex_lock(&ctx->wlock);
    for (unsigned i = 0; i < ctx->max_workers; i++) {
        if (!ctx->workers[i].in_use) {
            w = &ctx->workers[i];
            w->in_use = 1;
            atomic_store(&w->epoch, 0);
            break;
        }
    }
    pthread_mutex_unlock(&ctx->wlock);
    return w;
}

void xt_esp_worker_free(struct xt_esp_worker *w)
{
    if (!w)
        return;
    /* Counters stay in the slot (and in every SA's slot), so totals survive a worker restart. */
    pthread_mutex_lock(&w->ctx->wlock);
    atomic_store(&w->epoch, 0);
    w->in_use = 0;
    pthread_mutex_unlock(&w->ctx->wlock);
}

/* ---- SA database --------------------------------------------------------------------------------- */

int xt_esp_sa_add(struct xt_esp_ctx *ctx, const struct xt_esp_sa_params *p)
{
    if (!ctx || !p)
        return XT_ESP_E_INVAL;
    struct xt_sa *sa;
    int err = sa_new(ctx, p, &sa);
    if (err)
        return err;
    pthread_mutex_lock(&ctx->wlock);
    struct xt_table *t = &ctx->tab[sa->dir];
    struct xt_sa *_Atomic *pp = &t->buckets[xt_hash(t, sa->key)];
    struct xt_sa *cur;
    while ((cur = atomic_load_explicit(pp, memory_order_relaxed)) && cur->key != sa->key)
        pp = &cur->next;
    if (cur) {
        /* replace: the new SA takes the old one's place in the chain in one store */
        atomic_store_explicit(&sa->next, atomic_load_explicit(&cur->next, memory_order_relaxed),
                              memory_order_relaxed);
        atomic_store(pp, sa);
        retire(ctx, cur);
    } else {
        atomic_store_explicit(&sa->next, NULL, memory_order_relaxed);
        atomic_store(pp, sa);
        t->count++;
    }
    reclaim_locked(ctx);
    pthread_mutex_unlock(&ctx->wlock);
    return 0;
}

int xt_esp_sa_del(struct xt_esp_ctx *ctx, uint8_t direction, uint32_t key)
{
    if (!ctx || direction > XT_ESP_DIR_OUT)
        return XT_ESP_E_INVAL;
    int ret = XT_ESP_E_NOT_FOUND;
    pthread_mutex_lock(&ctx->wlock);
    struct xt_table *t = &ctx->tab[direction];
    struct xt_sa *_Atomic *pp = &t->buckets[xt_hash(t, key)];
    struct xt_sa *cur;
    while ((cur = atomic_load_explicit(pp, memory_order_relaxed)) && cur->key != key)
        pp = &cur->next;
    if (cur) {
        /* cur->next stays intact, so a worker standing on cur can still walk on */
        atomic_store(pp, atomic_load_explicit(&cur->next, memory_order_relaxed));
        retire(ctx, cur);
        t->count--;
        ret = 0;
    }
    reclaim_locked(ctx);
    pthread_mutex_unlock(&ctx->wlock);
    return ret;
}

static void sum_counters(struct xt_counters *acc, const struct xt_counters *c)
{
    acc->packets += __atomic_load_n(&c->packets, __ATOMIC_RELAXED);
    acc->bytes += __atomic_load_n(&c->bytes, __ATOMIC_RELAXED);
    for (int i = 0; i < XT_ESP_VERDICT_MAX; i++)
        acc->drops[i] += __atomic_load_n(&c->drops[i], __ATOMIC_RELAXED);
}

int xt_esp_sa_stats(struct xt_esp_ctx *ctx, uint8_t direction, uint32_t key, struct xt_esp_sa_stats *out)
{
    if (!ctx || !out || direction > XT_ESP_DIR_OUT)
        return XT_ESP_E_INVAL;
    memset(out, 0, sizeof(*out));
    pthread_mutex_lock(&ctx->wlock); /* SAs are freed only under this lock */
    struct xt_sa *sa = xt_lookup(&ctx->tab[direction], key);
    if (!sa) {
        pthread_mutex_unlock(&ctx->wlock);
        return XT_ESP_E_NOT_FOUND;
    }
    struct xt_counters acc = {0};
    for (unsigned i = 0; i < sa->n_slots; i++) {
        const struct xt_sa_slot *s = atomic_load_explicit(&sa->slots[i], memory_order_acquire);
        if (s)
            sum_counters(&acc, &s->c);
    }
    acc.drops[XT_ESP_V_CRYPTO_ERROR] += atomic_load_explicit(&sa->slot_failures, memory_order_relaxed);
    out->packets = acc.packets;
    out->bytes = acc.bytes;
    memcpy(out->drops, acc.drops, sizeof(out->drops));
    out->lifetime_packets = sa->has_limits ? atomic_load(&sa->lt_packets) : acc.packets;
    out->lifetime_bytes = sa->has_limits ? atomic_load(&sa->lt_bytes) : acc.bytes;
    out->lifetime_flags = atomic_load(&sa->lt_flags);
    out->iv_counter = atomic_load(&sa->iv_ctr);
    if (direction == XT_ESP_DIR_OUT) {
        uint64_t s = atomic_load(&sa->seq_out);
        out->seq = s > UINT32_MAX ? UINT32_MAX : s;
    } else if (sa->replay) {
        while (atomic_flag_test_and_set_explicit(&sa->replay_lock, memory_order_acquire))
            ;
        out->seq = sa->replay->top;
        out->replay_window = sa->replay->window;
        atomic_flag_clear_explicit(&sa->replay_lock, memory_order_release);
    }
    pthread_mutex_unlock(&ctx->wlock);
    return 0;
}

int xt_esp_sa_slots(struct xt_esp_ctx *ctx, uint8_t direction, uint32_t key)
{
    if (!ctx || direction > XT_ESP_DIR_OUT)
        return XT_ESP_E_INVAL;
    pthread_mutex_lock(&ctx->wlock);
    struct xt_sa *sa = xt_lookup(&ctx->tab[direction], key);
    int n = sa ? 0 : XT_ESP_E_NOT_FOUND;
    for (unsigned i = 0; sa && i < sa->n_slots; i++)
        n += atomic_load_explicit(&sa->slots[i], memory_order_acquire) != NULL;
    pthread_mutex_unlock(&ctx->wlock);
    return n;
}

int xt_esp_test_fail_slot_setup(struct xt_esp_ctx *ctx, unsigned n)
{
    if (!ctx)
        return XT_ESP_E_INVAL;
    atomic_store(&ctx->test_fail_slots, n);
    return 0;
}

static uint64_t max_chain(const struct xt_table *t)
{
    uint64_t best = 0;
    for (uint32_t b = 0; b <= t->mask; b++) {
        uint64_t n = 0;
        for (struct xt_sa *sa = atomic_load(&t->buckets[b]); sa; sa = atomic_load(&sa->next))
            n++;
        if (n > best)
            best = n;
    }
    return best;
}

void xt_esp_ctx_stats(struct xt_esp_ctx *ctx, struct xt_esp_ctx_stats *out)
{
    memset(out, 0, sizeof(*out));
    struct xt_counters acc = {0};
    pthread_mutex_lock(&ctx->wlock);
    for (unsigned i = 0; i < ctx->max_workers; i++)
        sum_counters(&acc, &ctx->workers[i].c);
    memcpy(out->drops, acc.drops, sizeof(out->drops));
    out->sa_in = ctx->tab[0].count;
    out->sa_out = ctx->tab[1].count;
    out->retired = ctx->n_retired;
    uint64_t a = max_chain(&ctx->tab[0]), b = max_chain(&ctx->tab[1]);
    out->max_chain = a > b ? a : b;
    pthread_mutex_unlock(&ctx->wlock);
}

int xt_esp_test_set_next(struct xt_esp_ctx *ctx, uint32_t tunnel_id, uint64_t next_seq,
                         uint64_t next_iv_counter)
{
    if (!ctx || next_seq == 0 || next_seq > (uint64_t)UINT32_MAX + 1 ||
        next_iv_counter >= (1ull << XT_ESP_IV_COUNTER_BITS))
        return XT_ESP_E_INVAL;
    pthread_mutex_lock(&ctx->wlock);
    struct xt_sa *sa = xt_lookup(&ctx->tab[XT_ESP_DIR_OUT], tunnel_id);
    if (sa) {
        atomic_store(&sa->seq_out, next_seq - 1);
        atomic_store(&sa->iv_ctr, next_iv_counter);
    }
    pthread_mutex_unlock(&ctx->wlock);
    return sa ? 0 : XT_ESP_E_NOT_FOUND;
}

int xt_esp_test_hmac(uint8_t alg, const uint8_t *key, size_t key_len, const uint8_t *data,
                     size_t len, uint8_t *out)
{
    if (alg != XT_ESP_AUTH_HMAC_SHA1_96 && alg != XT_ESP_AUTH_HMAC_SHA256_128)
        return XT_ESP_E_ALG;
    struct xt_hmac h;
    hmac_setup(&h, alg, key, key_len);
    xt_hmac_compute(&h, data, len, out);
    int icv_len = h.icv_len;
    OPENSSL_cleanse(&h, sizeof(h));
    return icv_len;
}

unsigned xt_esp_headroom_needed(const struct xt_esp_sa_params *p)
{
    unsigned iv = p->enc_alg == XT_ESP_ENC_AES_GCM_16 ? 8 : p->enc_alg == XT_ESP_ENC_AES_CBC ? 16 : 0;
    return 20 + ((p->flags & XT_ESP_F_UDP_ENCAP) ? 8 : 0) + 8 + iv;
}

unsigned xt_esp_tailroom_needed(const struct xt_esp_sa_params *p)
{
    unsigned align = p->enc_alg == XT_ESP_ENC_AES_CBC ? 16 : 4;
    unsigned icv = p->enc_alg == XT_ESP_ENC_AES_GCM_16 ? 16
                   : p->auth_alg == XT_ESP_AUTH_HMAC_SHA256_128 ? 16
                   : p->auth_alg == XT_ESP_AUTH_HMAC_SHA1_96 ? 12 : 0;
    return (align - 1) + 2 + icv;
}
