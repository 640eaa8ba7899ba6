/* esp_replay.c - anti-replay window, see esp_replay.h. */
#include "esp_replay.h"

#include <stdlib.h>

struct xt_replay *xt_replay_new(uint32_t window)
{
    uint32_t blocks = (window + 63) / 64 + 1, n = 1;
    while (n < blocks)
        n <<= 1;
    struct xt_replay *r = calloc(1, sizeof(*r) + (size_t)n * sizeof(uint64_t));
    if (!r)
        return NULL;
    r->window = window;
    r->mask = n - 1;
    return r;
}

void xt_replay_free(struct xt_replay *r) { free(r); }

/* All loads and stores of top and bits are relaxed atomics: xt_replay_check may run without the
 * SA's replay lock (a pre-check that can only be stale, never torn), while updates hold it. */
#define LD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)
#define ST(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELAXED)

int xt_replay_check(const struct xt_replay *r, uint64_t seq)
{
    uint64_t top = LD(r->top);
    if (seq == 0)
        return 0;
    if (seq > top)
        return 1;
    if (top - seq >= r->window)
        return 0;
    return !(LD(r->bits[(seq >> 6) & r->mask]) & (1ull << (seq & 63)));
}

int xt_replay_update(struct xt_replay *r, uint64_t seq)
{
    if (!xt_replay_check(r, seq))
        return 0;
    uint64_t top = LD(r->top);
    if (seq > top) {
        uint64_t from = top >> 6, to = seq >> 6, diff = to - from;
        if (diff > (uint64_t)r->mask + 1)
            diff = (uint64_t)r->mask + 1;
        for (uint64_t i = 1; i <= diff; i++)
            ST(r->bits[(from + i) & r->mask], 0);
        ST(r->top, seq);
    }
    uint64_t *word = &r->bits[(seq >> 6) & r->mask];
    ST(*word, LD(*word) | 1ull << (seq & 63));
    return 1;
}
