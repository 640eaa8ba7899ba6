/*
 * esp_replay.h - RFC 4303 anti-replay window (section 3.4.3 and Appendix A), kept as a ring of
 * 64-bit blocks so sliding never shifts the bitmap (the RFC 6479 layout).
 *
 * `top` is the highest sequence number accepted so far (0 = none yet). A sequence number s is
 *   - new            if s > top,
 *   - a replay       if s == 0 (never sent, RFC 4303 3.3.3), or top - s >= window (left of the
 *                    window: "too old"), or its bit is set,
 *   - acceptable     otherwise (inside the window, not seen).
 * The bitmap holds at least window + 64 bits (rounded up to a power of two of blocks), so the
 * blocks cleared when sliding never hold a number that is still inside the window.
 * xt_replay_check may run without the caller's lock (see esp_replay.c); xt_replay_update must
 * hold it. Callers check before verifying the ICV and update only after it verified (Appendix A: "the
 * receive window is updated only if the integrity verification succeeds").
 */
#ifndef XT_ESP_REPLAY_H
#define XT_ESP_REPLAY_H

#include <stdint.h>

struct xt_replay {
    uint64_t top;
    uint32_t window;   /* packets, >= 1 */
    uint32_t mask;     /* number of blocks - 1 */
    uint64_t bits[];   /* mask + 1 blocks */
};

struct xt_replay *xt_replay_new(uint32_t window); /* window >= 1 */
void xt_replay_free(struct xt_replay *r);
int xt_replay_check(const struct xt_replay *r, uint64_t seq);  /* 1 = acceptable, 0 = replay */
int xt_replay_update(struct xt_replay *r, uint64_t seq);       /* check and mark; 0 = replay */

#endif
