/*
 * esp_alloc_check.c - proves "no allocation on the per-packet path": malloc, calloc, realloc and
 * free are interposed in this executable (so libcrypto's calls land here too) and counted while
 * batches of encrypt and decrypt run for every transform. A worker sets up its slot of an SA
 * (counters, cipher context) on its first packet for it: that is the one allocation of the data
 * path, done in the warm-up round, and the hook check below. Built and run by
 * tests/test_esp_alloc.py.
 *
 *   esp_alloc_check      prints "allocations during N batches: M" and exits 0 when M is 0
 */
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include "esp.h"

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void __libc_free(void *);
extern void *__libc_memalign(size_t, size_t);

static atomic_long calls;
static atomic_int counting;

void *malloc(size_t n)
{
    if (atomic_load(&counting))
        atomic_fetch_add(&calls, 1);
    return __libc_malloc(n);
}
void *calloc(size_t a, size_t b)
{
    if (atomic_load(&counting))
        atomic_fetch_add(&calls, 1);
    return __libc_calloc(a, b);
}
void *realloc(void *p, size_t n)
{
    if (atomic_load(&counting))
        atomic_fetch_add(&calls, 1);
    return __libc_realloc(p, n);
}
void *aligned_alloc(size_t a, size_t n)
{
    if (atomic_load(&counting))
        atomic_fetch_add(&calls, 1);
    return __libc_memalign(a, n);
}
void free(void *p)
{
    if (p && atomic_load(&counting))
        atomic_fetch_add(&calls, 1);
    __libc_free(p);
}

#define FRAME 2048
#define N 64
static uint8_t buf[N * FRAME];
static uint8_t wire[N][FRAME];
static uint32_t wire_len[N];

static void fill_inner(struct xt_pkt *pk, uint32_t tunnel)
{
    for (unsigned i = 0; i < N; i++) {
        uint8_t *p = buf + (size_t)i * FRAME + 128;
        uint32_t len = 20 + (i * 37) % 1400;
        memset(p, (int)i, len);
        p[0] = 0x45;
        p[2] = (uint8_t)(len >> 8);
        p[3] = (uint8_t)len;
        pk[i] = (struct xt_pkt){.data = p, .len = len, .headroom = 128,
                                .tailroom = FRAME - 128 - len, .tunnel = tunnel};
    }
}

int main(void)
{
    static const struct { uint8_t enc, auth, klen; uint32_t flags; } kinds[] = {
        {XT_ESP_ENC_AES_GCM_16, XT_ESP_AUTH_NONE, 16, 0},
        {XT_ESP_ENC_AES_GCM_16, XT_ESP_AUTH_NONE, 32, XT_ESP_F_UDP_ENCAP},
        {XT_ESP_ENC_AES_CBC, XT_ESP_AUTH_HMAC_SHA256_128, 16, 0},
        {XT_ESP_ENC_AES_CBC, XT_ESP_AUTH_HMAC_SHA1_96, 32, 0},
        {XT_ESP_ENC_NULL, XT_ESP_AUTH_HMAC_SHA256_128, 0, XT_ESP_F_ALLOW_NULL},
    };
    unsigned nk = sizeof(kinds) / sizeof(kinds[0]);
    struct xt_esp_ctx *ctx = xt_esp_ctx_new(1, 0);
    struct xt_esp_worker *w = ctx ? xt_esp_worker_new(ctx) : NULL;
    if (!w)
        return 2;
    for (unsigned k = 0; k < nk; k++) {
        struct xt_esp_sa_params p;
        memset(&p, 0, sizeof(p));
        p.spi = 0x300 + k;
        p.tunnel_id = k + 1;
        p.enc_alg = kinds[k].enc;
        p.auth_alg = kinds[k].auth;
        p.enc_key_len = kinds[k].klen;
        p.auth_key_len = kinds[k].auth ? 32 : 0;
        p.flags = kinds[k].flags;
        p.encap_sport = p.encap_dport = 4500;
        p.replay_window = 1024;
        p.soft_packets = 1u << 30; /* lifetimes on: the shared counters are exercised too */
        p.hard_bytes = 1ull << 40;
        p.direction = XT_ESP_DIR_OUT;
        if (xt_esp_sa_add(ctx, &p))
            return 2;
        p.direction = XT_ESP_DIR_IN;
        if (xt_esp_sa_add(ctx, &p))
            return 2;
    }
    struct xt_pkt pk[N];
    unsigned batches = 0;
    /* round 0 warms up: OpenSSL's lazy init, and the worker's slot of each SA */
    for (int round = 0; round < 2; round++) {
        atomic_store(&calls, 0);
        atomic_store(&counting, round == 1);
        for (unsigned k = 0; k < nk; k++) {
            for (int rep = 0; rep < 20; rep++) {
                fill_inner(pk, k + 1);
                if (xt_esp_encrypt_batch(w, pk, N) != N)
                    return 3;
                for (unsigned i = 0; i < N; i++) {
                    memcpy(wire[i], pk[i].data, pk[i].len);
                    wire_len[i] = pk[i].len;
                }
                for (unsigned i = 0; i < N; i++) {
                    uint8_t *p = buf + (size_t)i * FRAME + 64;
                    memcpy(p, wire[i], wire_len[i]);
                    pk[i] = (struct xt_pkt){.data = p, .len = wire_len[i], .headroom = 64,
                                            .tailroom = FRAME - 64 - wire_len[i]};
                }
                if (xt_esp_decrypt_batch(w, pk, N) != N)
                    return 4;
                batches += 2;
            }
        }
        atomic_store(&counting, 0);
    }
    long n = atomic_load(&calls);
    printf("allocations during %u batches of %u packets: %ld\n", batches / 2, N, n);
    /* the hook must see allocations when there are some: the first batch of a new SA sets up
     * the worker's slot (ours and libcrypto's EVP context) */
    struct xt_esp_sa_params p;
    memset(&p, 0, sizeof(p));
    p.spi = 0x999;
    p.tunnel_id = 99;
    p.direction = XT_ESP_DIR_OUT;
    p.enc_alg = XT_ESP_ENC_AES_GCM_16;
    p.enc_key_len = 16;
    if (xt_esp_sa_add(ctx, &p))
        return 2;
    fill_inner(pk, 99);
    atomic_store(&calls, 0);
    atomic_store(&counting, 1);
    if (xt_esp_encrypt_batch(w, pk, N) != N)
        return 3;
    atomic_store(&counting, 0);
    long seen = atomic_load(&calls);
    printf("allocations seen during the first batch of a new SA (hook check): %ld\n", seen);
    if (seen < 3)
        return 5;
    xt_esp_worker_free(w);
    xt_esp_ctx_free(ctx);
    return n == 0 ? 0 : 1;
}
