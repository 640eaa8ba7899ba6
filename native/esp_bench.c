/*
 * esp_bench.c - the OpenSSL ceiling for bench/bench_esp.py, measured in C in the same run: raw
 * AES-GCM with one reused EVP context and exactly the calls the batch path makes per packet
 * (set IV, 8-byte AAD, in-place update, final, get tag), without any ESP work around them.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/evp.h>

#include "esp.h"

uint64_t xt_esp_bench_raw_gcm(unsigned key_len, unsigned size, unsigned iters)
{
    if ((key_len != 16 && key_len != 32) || size > 65535 || iters == 0)
        return 0;
    uint8_t key[32], nonce[12] = {0}, aad[8] = {1, 2, 3, 4, 0, 0, 0, 1}, tag[16];
    for (unsigned i = 0; i < sizeof(key); i++)
        key[i] = (uint8_t)(i * 7 + 1);
    uint8_t *buf = calloc(1, size + 16);
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    uint64_t ns = 0;
    if (!buf || !c)
        goto out;
    if (!EVP_EncryptInit_ex(c, key_len == 16 ? EVP_aes_128_gcm() : EVP_aes_256_gcm(), NULL, key, NULL))
        goto out;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (unsigned i = 0; i < iters; i++) {
        int outl;
        memcpy(nonce + 4, &i, sizeof(i));
        if (!EVP_EncryptInit_ex(c, NULL, NULL, NULL, nonce) ||
            !EVP_EncryptUpdate(c, NULL, &outl, aad, 8) ||
            !EVP_EncryptUpdate(c, buf, &outl, buf, (int)size) ||
            !EVP_EncryptFinal_ex(c, buf + outl, &outl) ||
            !EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, 16, tag))
            goto out;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    ns = (uint64_t)(t1.tv_sec - t0.tv_sec) * 1000000000u + (uint64_t)(t1.tv_nsec - t0.tv_nsec);
    if (ns == 0)
        ns = 1;
out:
    EVP_CIPHER_CTX_free(c);
    free(buf);
    return ns;
}
