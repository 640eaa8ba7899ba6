/*
 * esp_fuzz.c - fuzz driver for the batch decrypt (and encrypt) path, self-contained: no libFuzzer
 * runtime needed. Build it with the module sources (see `make fuzz`, which adds ASan/UBSan):
 *
 *   esp_fuzz [inputs] [seed]     default 1000000 inputs, seed 1
 *
 * Inputs are valid packets made by our own encrypt for several SAs (GCM, CBC+HMAC, NULL+HMAC,
 * CBC without integrity so random plaintext reaches the padding/next-header/inner checks,
 * transport mode, UDP encapsulation), then mutated: bit flips, random bytes, truncation,
 * extension, length fields (IPv4 total length, IHL, UDP length), SPIs, pad length; plus fully
 * random frames. Each goes through xt_esp_decrypt_batch with random head/tailroom. A second thread
 * replaces and deletes the inbound SAs (and replaces outbound ones) all the while, reading their
 * stats and slot counts, so reclamation and the workers' lazy slot set-up are exercised too, and a
 * third runs a second worker on the same SAs. Every result is checked against the frame bounds; any
 * violation aborts. Exit 0 = no crash, no violation.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "esp.h"

#define FRAME 2048
#define BATCH 64
#define NSEED 64

static uint64_t rng_state;
static uint64_t rnd(void)
{
    /* xorshift64*: deterministic per seed */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ull;
}

#define N_SA 6
static struct xt_esp_sa_params sa_in[N_SA], sa_out[N_SA];
static atomic_int stop_churn;

static void setup_sas(void)
{
    static const struct { uint8_t enc, auth, klen, mode; uint32_t flags; } kinds[N_SA] = {
        {XT_ESP_ENC_AES_GCM_16, XT_ESP_AUTH_NONE, 16, XT_ESP_MODE_TUNNEL, 0},
        {XT_ESP_ENC_AES_GCM_16, XT_ESP_AUTH_NONE, 32, XT_ESP_MODE_TUNNEL, XT_ESP_F_UDP_ENCAP},
        {XT_ESP_ENC_AES_CBC, XT_ESP_AUTH_HMAC_SHA256_128, 16, XT_ESP_MODE_TUNNEL, 0},
        {XT_ESP_ENC_NULL, XT_ESP_AUTH_HMAC_SHA1_96, 0, XT_ESP_MODE_TUNNEL, XT_ESP_F_ALLOW_NULL},
        {XT_ESP_ENC_AES_CBC, XT_ESP_AUTH_NONE, 32, XT_ESP_MODE_TUNNEL, XT_ESP_F_ALLOW_NULL},
        {XT_ESP_ENC_AES_CBC, XT_ESP_AUTH_NONE, 16, XT_ESP_MODE_TRANSPORT, XT_ESP_F_ALLOW_NULL},
    };
    for (int i = 0; i < N_SA; i++) {
        struct xt_esp_sa_params *p = &sa_in[i];
        memset(p, 0, sizeof(*p));
        p->spi = 0x100 + (uint32_t)i;
        p->tunnel_id = (uint32_t)i + 1;
        p->direction = XT_ESP_DIR_IN;
        p->mode = kinds[i].mode;
        p->enc_alg = kinds[i].enc;
        p->auth_alg = kinds[i].auth;
        p->enc_key_len = kinds[i].klen;
        p->auth_key_len = kinds[i].auth ? 20 : 0;
        for (int k = 0; k < 32; k++)
            p->enc_key[k] = (uint8_t)(k * 3 + i);
        for (int k = 0; k < 64; k++)
            p->auth_key[k] = (uint8_t)(k * 5 + i);
        memcpy(p->salt, "salt", 4);
        p->flags = kinds[i].flags;
        p->encap_sport = p->encap_dport = 4500;
        p->local_addr[0] = 192; p->local_addr[3] = 1;
        p->remote_addr[0] = 192; p->remote_addr[3] = 2;
        p->replay_window = i % 2 ? 64 : 0;
        p->node_id = 7;
        sa_out[i] = *p;
        sa_out[i].direction = XT_ESP_DIR_OUT;
        sa_out[i].mode = XT_ESP_MODE_TUNNEL;
    }
}

static void *churn(void *arg)
{
    struct xt_esp_ctx *ctx = arg;
    uint64_t s = 99;
    while (!atomic_load(&stop_churn)) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        int i = (int)((s >> 33) % N_SA);
        if ((s >> 20) & 1)
            xt_esp_sa_add(ctx, &sa_in[i]);
        else
            xt_esp_sa_del(ctx, XT_ESP_DIR_IN, sa_in[i].spi);
        if (((s >> 44) & 7) == 0) /* replace an outbound SA: both workers set up new slots */
            xt_esp_sa_add(ctx, &sa_out[i]);
        /* control-side reads of the slots the workers publish lazily (counters, slot count) */
        struct xt_esp_sa_stats st;
        xt_esp_sa_stats(ctx, XT_ESP_DIR_IN, sa_in[i].spi, &st);
        if (xt_esp_sa_slots(ctx, XT_ESP_DIR_OUT, sa_out[i].tunnel_id) > 2)
            abort(); /* two workers: at most two slots */
        if (((s >> 40) & 15) == 0)
            xt_esp_reclaim(ctx);
    }
    for (int i = 0; i < N_SA; i++)
        xt_esp_sa_add(ctx, &sa_in[i]);
    return NULL;
}

/* A second worker decrypting (and encrypting) valid packets on the same SAs at the same time:
 * shared replay windows, sequence/IV counters and reclamation see two workers. */
struct second {
    struct xt_esp_ctx *ctx;
    const uint8_t (*seeds)[FRAME];
    const uint32_t *seed_len;
    unsigned long batches;
};

static void *second_worker(void *arg)
{
    struct second *sw = arg;
    struct xt_esp_worker *w = xt_esp_worker_new(sw->ctx);
    uint8_t *buf = malloc((size_t)FRAME * BATCH);
    struct xt_pkt pk[BATCH];
    if (!w || !buf)
        abort();
    while (!atomic_load(&stop_churn)) {
        for (unsigned i = 0; i < BATCH; i++) {
            unsigned s = (unsigned)(sw->batches + i) % NSEED;
            uint8_t *frame = buf + (size_t)i * FRAME;
            memcpy(frame + 64, sw->seeds[s], sw->seed_len[s]);
            pk[i] = (struct xt_pkt){.data = frame + 64, .len = sw->seed_len[s], .headroom = 64,
                                    .tailroom = FRAME - 64 - sw->seed_len[s]};
        }
        xt_esp_decrypt_batch(w, pk, BATCH);
        for (unsigned i = 0; i < BATCH; i++) {
            if (pk[i].verdict >= xt_esp_verdict_count() || pk[i].data < buf + (size_t)i * FRAME ||
                pk[i].data + pk[i].len > buf + (size_t)(i + 1) * FRAME)
                abort();
            pk[i].tunnel = (uint32_t)(i % N_SA) + 1;
        }
        xt_esp_encrypt_batch(w, pk, BATCH); /* whatever decrypted fine goes out again */
        sw->batches++;
    }
    xt_esp_worker_free(w);
    free(buf);
    return NULL;
}

static void die(const char *what, unsigned i)
{
    fprintf(stderr, "esp_fuzz: invariant violated: %s (frame %u)\n", what, i);
    abort();
}

static void check(const uint8_t *buf, const struct xt_pkt *pk, unsigned i)
{
    if (pk->verdict >= xt_esp_verdict_count())
        die("verdict out of range", i);
    const uint8_t *frame = buf + (size_t)i * FRAME;
    if (pk->data < frame || pk->data + pk->len > frame + FRAME)
        die("packet outside its frame", i);
    if (pk->verdict == 0 && (size_t)(pk->data - frame) != pk->headroom)
        die("headroom does not match the data pointer", i);
    if (pk->verdict == 0 && pk->headroom + pk->len + pk->tailroom != FRAME)
        die("headroom + len + tailroom != frame", i);
}

int main(int argc, char **argv)
{
    unsigned long total = argc > 1 ? strtoul(argv[1], NULL, 10) : 1000000ul;
    rng_state = argc > 2 ? strtoull(argv[2], NULL, 10) * 0x9E3779B97F4A7C15ull + 1 : 12345;
    setup_sas();
    struct xt_esp_ctx *ctx = xt_esp_ctx_new(2, 8);
    if (!ctx)
        return 2;
    for (int i = 0; i < N_SA; i++)
        if (xt_esp_sa_add(ctx, &sa_in[i]) || xt_esp_sa_add(ctx, &sa_out[i]))
            return 2;
    struct xt_esp_worker *w = xt_esp_worker_new(ctx);
    uint8_t *buf = malloc((size_t)FRAME * BATCH);
    static uint8_t seeds[NSEED][FRAME];
    static uint32_t seed_len[NSEED];
    struct xt_pkt pk[BATCH];

    /* seed corpus: our own encrypt of random inner packets */
    for (int s = 0; s < NSEED; s++) {
        uint32_t plen = (uint32_t)(rnd() % 1400), len = 20 + plen;
        uint8_t *in = buf + 128;
        for (uint32_t k = 0; k < len; k++)
            in[k] = (uint8_t)rnd();
        in[0] = 0x45;
        in[2] = (uint8_t)(len >> 8);
        in[3] = (uint8_t)len;
        pk[0] = (struct xt_pkt){.data = in, .len = len, .headroom = 128,
                                .tailroom = FRAME - 128 - len, .tunnel = (uint32_t)(s % N_SA) + 1};
        if (xt_esp_encrypt_batch(w, pk, 1) != 1)
            return 3;
        memcpy(seeds[s], pk[0].data, pk[0].len);
        seed_len[s] = pk[0].len;
    }

    pthread_t th, th2;
    struct second sw = {.ctx = ctx, .seeds = (const uint8_t (*)[FRAME])seeds, .seed_len = seed_len};
    pthread_create(&th, NULL, churn, ctx);
    pthread_create(&th2, NULL, second_worker, &sw);
    unsigned long hist[32] = {0}, done = 0;
    while (done < total) {
        unsigned n = BATCH;
        for (unsigned i = 0; i < n; i++) {
            uint8_t *frame = buf + (size_t)i * FRAME;
            uint32_t head = (uint32_t)(rnd() % 256), len;
            uint8_t *p = frame + head;
            unsigned kind = (unsigned)(rnd() % 16);
            if (kind == 0) { /* fully random */
                len = (uint32_t)(rnd() % (FRAME - head + 1));
                for (uint32_t k = 0; k < len; k++)
                    p[k] = (uint8_t)rnd();
            } else {
                int s = (int)(rnd() % NSEED);
                len = seed_len[s];
                if (head + len > FRAME)
                    head = FRAME - len, p = frame + head;
                memcpy(p, seeds[s], len);
                unsigned muts = 1 + (unsigned)(rnd() % 4);
                for (unsigned m = 0; m < muts && len > 0; m++) {
                    switch (rnd() % 10) {
                    case 0: case 1: p[rnd() % len] ^= (uint8_t)(1u << (rnd() % 8)); break;
                    case 2: p[rnd() % len] = (uint8_t)rnd(); break;
                    case 3: len = (uint32_t)(rnd() % (len + 1)); break; /* truncate */
                    case 4: { /* extend */
                        uint32_t extra = (uint32_t)(rnd() % 64);
                        if (head + len + extra <= FRAME) {
                            for (uint32_t k = 0; k < extra; k++)
                                p[len + k] = (uint8_t)rnd();
                            len += extra;
                        }
                        break;
                    }
                    case 5: if (len >= 4) { p[2] = (uint8_t)rnd(); p[3] = (uint8_t)rnd(); } break;
                    case 6: if (len >= 1) p[0] = (uint8_t)((rnd() & 0xf0) | (rnd() & 0x0f)); break;
                    case 7: if (len >= 28) { p[24] = (uint8_t)rnd(); p[25] = (uint8_t)rnd(); } break;
                    case 8: if (len >= 24) { p[20] = p[21] = p[22] = 0; p[23] = (uint8_t)(0x100 + rnd() % N_SA); } break;
                    default: if (len >= 2) p[len - 1 - rnd() % 32 % len] = (uint8_t)rnd(); break;
                    }
                }
            }
            /* mostly keep the outer IPv4 checksum valid so mutations reach the parsers behind it */
            if (len >= 20 && (p[0] >> 4) == 4 && (p[0] & 15) >= 5 && (uint32_t)(p[0] & 15) * 4 <= len &&
                rnd() % 8) {
                uint32_t ihl = (uint32_t)(p[0] & 15) * 4, sum = 0;
                p[10] = p[11] = 0;
                for (uint32_t k = 0; k < ihl; k += 2)
                    sum += (uint32_t)(p[k] << 8 | p[k + 1]);
                while (sum >> 16)
                    sum = (sum & 0xffff) + (sum >> 16);
                p[10] = (uint8_t)(~sum >> 8);
                p[11] = (uint8_t)~sum;
            }
            uint32_t tail = FRAME - head - len;
            pk[i] = (struct xt_pkt){.data = p, .len = len, .headroom = head, .tailroom = tail};
        }
        xt_esp_decrypt_batch(w, pk, n);
        for (unsigned i = 0; i < n; i++) {
            check(buf, &pk[i], i);
            hist[pk[i].verdict]++;
        }
        /* every 16th batch: random inner packets through encrypt */
        if ((done / BATCH) % 16 == 0) {
            for (unsigned i = 0; i < n; i++) {
                uint8_t *frame = buf + (size_t)i * FRAME;
                uint32_t head = (uint32_t)(rnd() % 128), len = (uint32_t)(rnd() % 1600);
                for (uint32_t k = 0; k < len; k++)
                    frame[head + k] = (uint8_t)rnd();
                if (len > 4 && rnd() % 2) {
                    frame[head] = 0x45;
                    frame[head + 2] = (uint8_t)(len >> 8);
                    frame[head + 3] = (uint8_t)len;
                }
                pk[i] = (struct xt_pkt){.data = frame + head, .len = len, .headroom = head,
                                        .tailroom = FRAME - head - len,
                                        .tunnel = (uint32_t)(rnd() % (N_SA + 1))};
            }
            xt_esp_encrypt_batch(w, pk, n);
            for (unsigned i = 0; i < n; i++)
                check(buf, &pk[i], i);
        }
        done += n;
    }
    atomic_store(&stop_churn, 1);
    pthread_join(th, NULL);
    pthread_join(th2, NULL);
    xt_esp_worker_free(w);
    xt_esp_ctx_free(ctx);
    free(buf);
    printf("esp_fuzz: %lu inputs, no crash (second worker: %lu batches); verdicts:", done,
           sw.batches);
    for (unsigned v = 0; v < xt_esp_verdict_count(); v++)
        if (hist[v])
            printf(" %s=%lu", xt_esp_verdict_name(v), hist[v]);
    printf("\n");
    return 0;
}
