/* xsk.c - the AF_XDP worker of the IPsec data path (API and model: xsk.h). */
#define _GNU_SOURCE
#include "xsk.h"
#include "esp.h"

#include <bpf/bpf.h>
#include <errno.h>
#include <linux/if_ether.h>
#include <linux/if_xdp.h>
#include <net/if.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>
#include <xdp/xsk.h>

#define NATT_TUNNELS XT_XSK_NATT_TUNNELS
/* binding a queue whose previous socket was closed a moment ago fails with EBUSY until the kernel's
 * deferred release has run: retry for up to a second */
#define BUSY_RETRIES 100
#define BUSY_WAIT_US 10000
#ifndef XDP_MAX_TX_SKB_BUDGET
#define XDP_MAX_TX_SKB_BUDGET 9 /* include/uapi/linux/if_xdp.h, Linux 6.17 */
#endif
#define NATT_VALID (1ULL << 63)

struct rx_sock {
    struct xsk_socket *xsk;
    struct xsk_ring_cons rx;
    struct xsk_ring_prod fill;
    struct xsk_ring_cons comp; /* unused (no TX on RX sockets) but owned by this socket's ctx */
};

typedef unsigned (*batch_fn)(struct xt_esp_worker *, struct xt_pkt *, unsigned);

struct xt_xsk {
    struct xt_xsk_config cfg;
    void *area;
    size_t area_len;
    struct xsk_umem *umem;
    unsigned n_rx;
    struct rx_sock rx[XT_XSK_MAX_RX];
    struct xsk_socket *tx_xsk;
    struct xsk_ring_prod tx;
    struct xsk_ring_prod tx_fill; /* never filled: nothing is received on the TX device */
    struct xsk_ring_cons tx_comp;
    uint64_t *free_stack;
    uint32_t n_free, n_frames;
    uint32_t frame_size, ring_size, batch;
    struct xt_esp_worker *esp;
    batch_fn decrypt, encrypt;
    volatile int stop;
    struct xt_xsk_stats st;
    uint64_t *natt; /* [NATT_TUNNELS]: valid bit | port << 32 | addr (network order bytes) */
    int natt_owned;
    /* per-batch scratch, no allocation in the loop */
    struct xt_pkt dpk[XT_XSK_MAX_BATCH], epk[XT_XSK_MAX_BATCH];
    uint64_t dbase[XT_XSK_MAX_BATCH], ebase[XT_XSK_MAX_BATCH];
    uint32_t dsrc[XT_XSK_MAX_BATCH];  /* outer source address of an ESP-in-UDP frame */
    uint16_t dsport[XT_XSK_MAX_BATCH];/* its UDP source port, 0 for raw ESP */
};

static void errf(char *err, size_t errlen, const char *fmt, const char *a, int e)
{
    if (err && errlen)
        snprintf(err, errlen, fmt, a, strerror(e));
}

static inline uint64_t frame_base(const struct xt_xsk *x, uint64_t addr)
{
    return addr & ~((uint64_t)x->frame_size - 1);
}

static inline void frame_free(struct xt_xsk *x, uint64_t addr)
{
    x->free_stack[x->n_free++] = frame_base(x, addr);
}

static void refill(struct xt_xsk *x, struct rx_sock *s);

static unsigned pow2_ok(uint32_t v) { return v && !(v & (v - 1)); }

struct xt_xsk *xt_xsk_new(const struct xt_xsk_config *cfg, char *err, size_t errlen)
{
    struct xt_xsk *x;
    int rc;

    if (!cfg || cfg->n_rx == 0 || cfg->n_rx > XT_XSK_MAX_RX) {
        errf(err, errlen, "%s: need 1..16 RX devices (%s)", "config", EINVAL);
        return NULL;
    }
    if (!cfg->esp_worker || !cfg->esp_decrypt || !cfg->esp_encrypt) {
        errf(err, errlen, "%s: ESP worker and batch functions are required (%s)", "config",
             EINVAL);
        return NULL;
    }
    x = calloc(1, sizeof(*x));
    if (!x) {
        errf(err, errlen, "%s: %s", "worker", ENOMEM);
        return NULL;
    }
    x->cfg = *cfg;
    x->ring_size = cfg->ring_size ? cfg->ring_size : 2048;
    x->frame_size = cfg->frame_size ? cfg->frame_size : 2048;
    x->batch = cfg->batch ? cfg->batch : XT_XSK_MAX_BATCH;
    if (!pow2_ok(x->ring_size) || (x->frame_size != 2048 && x->frame_size != 4096) ||
        x->batch > XT_XSK_MAX_BATCH || cfg->mode > XT_XSK_MODE_ZEROCOPY) {
        errf(err, errlen, "%s: ring_size power of two, frame_size 2048/4096, batch <= 64, "
             "mode 0..2 (%s)", "config", EINVAL);
        free(x);
        return NULL;
    }
    for (unsigned i = 0; i < cfg->n_rx; i++) {
        if (strncmp(cfg->tx_ifname, cfg->rx_ifname[i], XT_XSK_IFNAMSIZ) == 0) {
            char name[XT_XSK_IFNAMSIZ + 1] = {0};
            memcpy(name, cfg->tx_ifname, XT_XSK_IFNAMSIZ);
            errf(err, errlen, "%s: the TX device must not be an RX device (%s)", name, EINVAL);
            free(x);
            return NULL;
        }
    }
    x->esp = (struct xt_esp_worker *)cfg->esp_worker;
    x->decrypt = (batch_fn)cfg->esp_decrypt;
    x->encrypt = (batch_fn)cfg->esp_encrypt;
    x->n_rx = cfg->n_rx;
    /* enough frames that every fill ring can be full while the TX ring is full too */
    x->n_frames = (cfg->n_rx + 2) * x->ring_size;
    x->area_len = (size_t)x->n_frames * x->frame_size;
    x->area = mmap(NULL, x->area_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    x->free_stack = calloc(x->n_frames, sizeof(uint64_t));
    if (cfg->natt_table) {
        x->natt = (uint64_t *)cfg->natt_table;
    } else {
        x->natt = calloc(NATT_TUNNELS, sizeof(uint64_t));
        x->natt_owned = 1;
    }
    if (x->area == MAP_FAILED || !x->free_stack || !x->natt) {
        if (x->area == MAP_FAILED)
            x->area = NULL;
        errf(err, errlen, "%s: %s", "UMEM", ENOMEM);
        xt_xsk_free(x);
        return NULL;
    }
    for (uint32_t i = 0; i < x->n_frames; i++)
        x->free_stack[i] = (uint64_t)(x->n_frames - 1 - i) * x->frame_size;
    x->n_free = x->n_frames;
    x->st.frames_total = x->n_frames;

    struct xsk_umem_config ucfg = {
        .fill_size = x->ring_size, .comp_size = x->ring_size,
        .frame_size = x->frame_size, .frame_headroom = 0, .flags = 0,
    };
    rc = xsk_umem__create(&x->umem, x->area, x->area_len, &x->rx[0].fill, &x->rx[0].comp, &ucfg);
    if (rc) {
        x->umem = NULL;
        errf(err, errlen, "%s: xsk_umem__create: %s", "UMEM", -rc);
        xt_xsk_free(x);
        return NULL;
    }
    struct xsk_socket_config scfg = {
        .rx_size = x->ring_size, .tx_size = x->ring_size,
        .libxdp_flags = XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD,
        .xdp_flags = 0,
        .bind_flags = XDP_USE_NEED_WAKEUP |
                      (cfg->mode == XT_XSK_MODE_COPY ? XDP_COPY :
                       cfg->mode == XT_XSK_MODE_ZEROCOPY ? XDP_ZEROCOPY : 0),
    };
    for (unsigned i = 0; i < x->n_rx; i++) {
        char name[XT_XSK_IFNAMSIZ + 1] = {0};
        memcpy(name, cfg->rx_ifname[i], XT_XSK_IFNAMSIZ);
        struct rx_sock *s = &x->rx[i];
        for (int tries = 0; tries < BUSY_RETRIES; tries++) {
            if (i == 0)
                rc = xsk_socket__create(&s->xsk, name, cfg->rx_queue[i], x->umem, &s->rx, NULL,
                                        &scfg);
            else
                rc = xsk_socket__create_shared(&s->xsk, name, cfg->rx_queue[i], x->umem, &s->rx,
                                               NULL, &s->fill, &s->comp, &scfg);
            if (rc != -EBUSY)
                break;
            usleep(BUSY_WAIT_US); /* a socket closed just before is released by deferred work */
        }
        if (rc) {
            s->xsk = NULL;
            errf(err, errlen, "%s: AF_XDP RX socket: %s", name, -rc);
            xt_xsk_free(x);
            return NULL;
        }
    }
    {
        char name[XT_XSK_IFNAMSIZ + 1] = {0};
        memcpy(name, cfg->tx_ifname, XT_XSK_IFNAMSIZ);
        for (int tries = 0; tries < BUSY_RETRIES; tries++) {
            rc = xsk_socket__create_shared(&x->tx_xsk, name, cfg->tx_queue, x->umem, NULL, &x->tx,
                                           &x->tx_fill, &x->tx_comp, &scfg);
            if (rc != -EBUSY)
                break;
            usleep(BUSY_WAIT_US);
        }
        if (rc) {
            x->tx_xsk = NULL;
            errf(err, errlen, "%s: AF_XDP TX socket: %s", name, -rc);
            xt_xsk_free(x);
            return NULL;
        }
    }
    x->st.tx_budget = 32;
    if (cfg->tx_budget) {
        unsigned int budget = cfg->tx_budget > x->ring_size ? x->ring_size : cfg->tx_budget;
        /* older kernels refuse the option: they keep 32 */
        if (setsockopt(xsk_socket__fd(x->tx_xsk), SOL_XDP, XDP_MAX_TX_SKB_BUDGET, &budget,
                       sizeof(budget)) == 0)
            x->st.tx_budget = budget;
    }
    /* fill rings full before the sockets go into the XSKMAP: a packet steered before the loop
     * thread runs must not find an empty fill ring (the kernel would drop it) */
    for (unsigned i = 0; i < x->n_rx; i++)
        refill(x, &x->rx[i]);
    struct xdp_options opts = {0};
    socklen_t ol = sizeof(opts);
    if (getsockopt(xsk_socket__fd(x->rx[0].xsk), SOL_XDP, XDP_OPTIONS, &opts, &ol) == 0)
        x->st.zerocopy = !!(opts.flags & XDP_OPTIONS_ZEROCOPY);
    x->st.frames_free = x->n_free;
    return x;
}

int xt_xsk_rx_fd(struct xt_xsk *x, unsigned i)
{
    if (!x || i >= x->n_rx)
        return -EINVAL;
    return xsk_socket__fd(x->rx[i].xsk);
}

int xt_xsk_map_insert(struct xt_xsk *x, unsigned i, int map_fd, uint32_t key)
{
    if (!x || i >= x->n_rx)
        return -EINVAL;
    int fd = xsk_socket__fd(x->rx[i].xsk);
    if (bpf_map_update_elem(map_fd, &key, &fd, 0))
        return -errno;
    return 0;
}

static void refill(struct xt_xsk *x, struct rx_sock *s)
{
    uint32_t idx, want = xsk_prod_nb_free(&s->fill, x->ring_size);
    if (want > x->n_free)
        want = x->n_free;
    if (want == 0) {
        if (x->n_free == 0)
            x->st.fill_short++;
        return;
    }
    want = xsk_ring_prod__reserve(&s->fill, want, &idx);
    for (uint32_t i = 0; i < want; i++)
        *xsk_ring_prod__fill_addr(&s->fill, idx + i) = x->free_stack[--x->n_free];
    xsk_ring_prod__submit(&s->fill, want);
}

static void drain_completions(struct xt_xsk *x)
{
    uint32_t idx, n = xsk_ring_cons__peek(&x->tx_comp, x->ring_size, &idx);
    for (uint32_t i = 0; i < n; i++)
        frame_free(x, *xsk_ring_cons__comp_addr(&x->tx_comp, idx + i));
    if (n) {
        xsk_ring_cons__release(&x->tx_comp, n);
        x->st.tx_completed += n;
    }
}

/* Copy mode transmits at most a kernel batch (32 frames) per sendto(): kick until the kernel has
 * taken every descriptor on the TX ring (bounded), so the ring never backs up into RX. */
static void kick_tx(struct xt_xsk *x)
{
    for (int k = 0; k < 16; k++) {
        if (!xsk_ring_prod__needs_wakeup(&x->tx))
            return;
        if (xsk_prod_nb_free(&x->tx, x->ring_size) >= x->ring_size)
            return; /* the kernel consumed everything we produced */
        x->st.tx_kicks++;
        /* EAGAIN/EBUSY/ENOBUFS: the kernel is still busy with earlier frames; completions
         * follow and the next turn kicks again */
        if (sendto(xsk_socket__fd(x->tx_xsk), NULL, 0, MSG_DONTWAIT, NULL, 0) < 0 &&
            errno != EINTR)
            return;
    }
}

static uint16_t ip_csum20(const uint8_t *h, unsigned ihl)
{
    uint32_t sum = 0;
    for (unsigned i = 0; i < ihl; i += 2)
        if (i != 10)
            sum += (uint32_t)h[i] << 8 | h[i + 1];
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

/* Outbound ESP-in-UDP to a NAT-T peer: send to the address and port it was last authenticated
 * from (RFC 7296 2.23; RFC 3948). The native module built IPv4 + UDP with a zero UDP checksum. */
static void natt_rewrite(struct xt_xsk *x, struct xt_pkt *p)
{
    uint64_t v = __atomic_load_n(&x->natt[p->tunnel & (NATT_TUNNELS - 1)], __ATOMIC_RELAXED);
    uint8_t *h = p->data;
    if (!(v & NATT_VALID) || p->len < 28 || (h[0] >> 4) != 4 || h[9] != 17)
        return;
    unsigned ihl = (h[0] & 15) * 4;
    if (p->len < ihl + 8)
        return;
    uint32_t addr = (uint32_t)v;
    uint16_t port = (uint16_t)(v >> 32);
    uint8_t *udp = h + ihl;
    if (memcmp(h + 16, &addr, 4) == 0 && ((udp[2] << 8) | udp[3]) == port)
        return;
    memcpy(h + 16, &addr, 4);
    udp[2] = port >> 8;
    udp[3] = port & 0xff;
    uint16_t c = ip_csum20(h, ihl);
    h[10] = c >> 8;
    h[11] = c & 0xff;
    x->st.natt_rewrites++;
}

static void natt_learn(struct xt_xsk *x, uint32_t tunnel, uint32_t addr, uint16_t port)
{
    uint64_t *slot = &x->natt[tunnel & (NATT_TUNNELS - 1)];
    uint64_t v = NATT_VALID | (uint64_t)port << 32 | addr;
    if (__atomic_load_n(slot, __ATOMIC_RELAXED) != v) {
        __atomic_store_n(slot, v, __ATOMIC_RELAXED);
        x->st.natt_updates++;
    }
}

/* Put a processed packet (IP at p->data) on the TX ring slot idx with our Ethernet header. */
static void tx_put(struct xt_xsk *x, uint32_t idx, const struct xt_pkt *p)
{
    uint8_t *eth = p->data - ETH_HLEN;
    memcpy(eth, x->cfg.tx_dst_mac, 6);
    memcpy(eth + 6, x->cfg.tx_src_mac, 6);
    uint16_t type = (p->data[0] >> 4) == 6 ? ETH_P_IPV6 : ETH_P_IP;
    eth[12] = type >> 8;
    eth[13] = type & 0xff;
    struct xdp_desc *d = xsk_ring_prod__tx_desc(&x->tx, idx);
    d->addr = (uint64_t)(eth - (uint8_t *)x->area);
    d->len = p->len + ETH_HLEN;
    d->options = 0;
    x->st.tx_bytes += d->len;
}

/* One RX socket: returns the number of descriptors taken. */
static unsigned service(struct xt_xsk *x, struct rx_sock *s)
{
    uint32_t idx_rx, idx_tx = 0, room, n, nd = 0, ne = 0;

    refill(x, s);
    room = xsk_prod_nb_free(&x->tx, x->batch);
    if (room == 0) {
        x->st.tx_ring_full++;
        return 0;
    }
    n = xsk_ring_cons__peek(&s->rx, room < x->batch ? room : x->batch, &idx_rx);
    if (n == 0)
        return 0;
    for (uint32_t i = 0; i < n; i++) {
        const struct xdp_desc *d = xsk_ring_cons__rx_desc(&s->rx, idx_rx + i);
        uint64_t addr = xsk_umem__add_offset_to_addr(d->addr);
        uint64_t base = frame_base(x, addr);
        uint32_t off = (uint32_t)(addr - base);
        uint8_t *pkt = (uint8_t *)x->area + addr;
        x->st.rx_packets++;
        x->st.rx_bytes += d->len;
        if (off < XT_XSK_META_LEN + ETH_HLEN || d->len < ETH_HLEN + 20 ||
            off + d->len > x->frame_size) {
            x->st.runt++;
            frame_free(x, addr);
            continue;
        }
        uint8_t *meta = pkt - XT_XSK_META_LEN;
        uint32_t magic, tunnel;
        uint16_t kind;
        memcpy(&magic, meta, 4);
        memcpy(&kind, meta + 4, 2);
        memcpy(&tunnel, meta + 8, 4);
        memset(meta, 0, 4); /* a reused frame never looks steered */
        if (magic != XT_XSK_META_MAGIC ||
            (kind != XT_XSK_KIND_DECRYPT && kind != XT_XSK_KIND_ENCRYPT)) {
            x->st.bad_meta++;
            frame_free(x, addr);
            continue;
        }
        struct xt_pkt *p;
        if (kind == XT_XSK_KIND_DECRYPT) {
            p = &x->dpk[nd];
            x->dbase[nd] = base;
            const uint8_t *ip = pkt + ETH_HLEN;
            unsigned ihl = (ip[0] & 15) * 4;
            x->dsport[nd] = 0;
            if (ip[9] == 17 && ihl >= 20 && d->len >= ETH_HLEN + ihl + 8) {
                memcpy(&x->dsrc[nd], ip + 12, 4);
                x->dsport[nd] = (uint16_t)(ip[ihl] << 8 | ip[ihl + 1]);
            }
            nd++;
        } else {
            p = &x->epk[ne];
            x->ebase[ne] = base;
            ne++;
        }
        p->data = pkt + ETH_HLEN;
        p->len = d->len - ETH_HLEN;
        p->headroom = off + ETH_HLEN;
        p->tailroom = x->frame_size - off - d->len;
        p->tunnel = tunnel;
        p->spi = 0;
        p->verdict = 0;
        p->reserved = 0;
    }
    xsk_ring_cons__release(&s->rx, n);

    int crypto = !(x->cfg.flags & XT_XSK_F_NO_CRYPTO); /* off only in the path benchmark */
    if (crypto && nd)
        x->decrypt(x->esp, x->dpk, nd);
    if (crypto && ne)
        x->encrypt(x->esp, x->epk, ne);

    /* room >= n >= nd + ne: the reservation cannot fail */
    uint32_t ok = 0;
    for (uint32_t i = 0; i < nd; i++)
        ok += x->dpk[i].verdict == 0 && x->dpk[i].headroom >= ETH_HLEN;
    for (uint32_t i = 0; i < ne; i++)
        ok += x->epk[i].verdict == 0 && x->epk[i].headroom >= ETH_HLEN;
    if (ok && xsk_ring_prod__reserve(&x->tx, ok, &idx_tx) != ok)
        ok = 0; /* unreachable (room was checked); frames are freed below */
    uint32_t t = 0;
    for (uint32_t i = 0; i < nd; i++) {
        struct xt_pkt *p = &x->dpk[i];
        if (p->verdict == 0 && p->headroom >= ETH_HLEN && t < ok) {
            if (x->dsport[i] && crypto)
                natt_learn(x, p->tunnel, x->dsrc[i], x->dsport[i]);
            x->st.decrypt_ok++;
            tx_put(x, idx_tx + t++, p);
        } else {
            x->st.decrypt_drops[p->verdict < XT_XSK_STAT_VERDICTS ? p->verdict : 0]++;
            frame_free(x, x->dbase[i]);
        }
    }
    for (uint32_t i = 0; i < ne; i++) {
        struct xt_pkt *p = &x->epk[i];
        if (p->verdict == 0 && p->headroom >= ETH_HLEN && t < ok) {
            if (crypto)
                natt_rewrite(x, p);
            x->st.encrypt_ok++;
            tx_put(x, idx_tx + t++, p);
        } else {
            x->st.encrypt_drops[p->verdict < XT_XSK_STAT_VERDICTS ? p->verdict : 0]++;
            frame_free(x, x->ebase[i]);
        }
    }
    if (t) {
        xsk_ring_prod__submit(&x->tx, t);
        x->st.tx_packets += t;
    }
    return n;
}

int xt_xsk_run(struct xt_xsk *x)
{
    struct pollfd pfd[XT_XSK_MAX_RX + 1];
    int timeout = x->cfg.poll_ms ? (int)x->cfg.poll_ms : 100;

    for (unsigned i = 0; i < x->n_rx; i++) {
        pfd[i].fd = xsk_socket__fd(x->rx[i].xsk);
        pfd[i].events = POLLIN;
    }
    __atomic_store_n(&x->st.running, 1, __ATOMIC_RELEASE);
    while (!__atomic_load_n(&x->stop, __ATOMIC_ACQUIRE)) {
        unsigned moved = 0;
        drain_completions(x);
        for (unsigned i = 0; i < x->n_rx; i++)
            moved += service(x, &x->rx[i]);
        /* frames waiting on the TX ring need a kick in copy mode (and when the driver asks) */
        if (x->st.tx_packets != x->st.tx_completed)
            kick_tx(x);
        x->st.frames_free = x->n_free;
        if (moved)
            continue;
        if (x->st.tx_packets != x->st.tx_completed) {
            /* nothing received but frames in flight: let completions arrive */
            drain_completions(x);
            continue;
        }
        x->st.rx_wakeups++;
        int rc = poll(pfd, x->n_rx, timeout);
        if (rc < 0 && errno != EINTR) {
            int e = errno;
            __atomic_store_n(&x->st.running, 0, __ATOMIC_RELEASE);
            return -e;
        }
    }
    __atomic_store_n(&x->st.running, 0, __ATOMIC_RELEASE);
    return 0;
}

void xt_xsk_stop(struct xt_xsk *x)
{
    if (x)
        __atomic_store_n(&x->stop, 1, __ATOMIC_RELEASE);
}

void xt_xsk_stats(struct xt_xsk *x, struct xt_xsk_stats *out)
{
    struct xdp_statistics ks;
    socklen_t len;

    memcpy(out, &x->st, sizeof(*out));
    out->k_rx_dropped = out->k_rx_invalid = out->k_rx_ring_full = out->k_fill_empty = 0;
    for (unsigned i = 0; i < x->n_rx; i++) {
        len = sizeof(ks);
        memset(&ks, 0, sizeof(ks));
        if (getsockopt(xsk_socket__fd(x->rx[i].xsk), SOL_XDP, XDP_STATISTICS, &ks, &len) == 0) {
            out->k_rx_dropped += ks.rx_dropped;
            out->k_rx_invalid += ks.rx_invalid_descs;
            out->k_rx_ring_full += ks.rx_ring_full;
            out->k_fill_empty += ks.rx_fill_ring_empty_descs;
        }
    }
    len = sizeof(ks);
    memset(&ks, 0, sizeof(ks));
    if (getsockopt(xsk_socket__fd(x->tx_xsk), SOL_XDP, XDP_STATISTICS, &ks, &len) == 0)
        out->k_tx_invalid = ks.tx_invalid_descs;
}

int xt_xsk_natt_peer(struct xt_xsk *x, uint32_t tunnel, uint8_t *addr, uint16_t *port)
{
    uint64_t v = __atomic_load_n(&x->natt[tunnel & (NATT_TUNNELS - 1)], __ATOMIC_RELAXED);
    if (!(v & NATT_VALID))
        return 0;
    uint32_t a = (uint32_t)v;
    memcpy(addr, &a, 4);
    *port = (uint16_t)(v >> 32);
    return 1;
}

void xt_xsk_natt_forget(struct xt_xsk *x, uint32_t tunnel)
{
    __atomic_store_n(&x->natt[tunnel & (NATT_TUNNELS - 1)], 0, __ATOMIC_RELAXED);
}

void xt_xsk_free(struct xt_xsk *x)
{
    if (!x)
        return;
    if (x->tx_xsk)
        xsk_socket__delete(x->tx_xsk);
    for (int i = (int)x->n_rx - 1; i >= 0; i--)
        if (x->rx[i].xsk)
            xsk_socket__delete(x->rx[i].xsk);
    if (x->umem)
        xsk_umem__delete(x->umem);
    if (x->area)
        munmap(x->area, x->area_len);
    free(x->free_stack);
    if (x->natt_owned)
        free(x->natt);
    free(x);
}
