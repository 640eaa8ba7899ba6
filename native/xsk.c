/* xsk.c - the AF_XDP worker of the IPsec data path (API and model: xsk.h). */
#define _GNU_SOURCE
#include "xsk.h"
#include "esp.h"

#include <bpf/bpf.h>
#include <errno.h>
#include <linux/if_ether.h>
#include <arpa/inet.h>
#include <linux/if_xdp.h>
#include <net/if.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
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
    struct xsk_ring_cons comp; /* this socket's ctx: completions of its TX ring when it has one */
    struct xsk_ring_prod tx;   /* used when the device is a direct egress device */
    int has_tx;
};

/* A TX ring the worker sends on: the internal veth (port 0) or a direct egress device. */
struct port {
    struct xsk_ring_prod *tx;
    struct xsk_ring_cons *comp;
    int fd;
    uint32_t ifindex;
    uint64_t sent, completed;
    /* a TX-only socket of its own (NULL when an RX socket's TX ring is used) */
    struct xsk_socket *own;
    struct xsk_ring_prod own_tx, own_fill;
    struct xsk_ring_cons own_comp;
};

/* Next-hop cache entry: the kernel FIB's answer for one lookup key (see xsk.h). */
#define NH_KEY_WORDS 6
struct nh_entry {
    uint64_t key[NH_KEY_WORDS];
    uint32_t gen;
    uint32_t expires_ms;
    int32_t port;      /* index into ports[] (>= 1), or 0: the internal veth */
    uint32_t mtu;
    uint8_t smac[6], dmac[6];
};

/* bpf/nexthop.h struct xt_nh_result */
struct nh_result {
    uint32_t magic;
    int32_t rc;
    uint32_t ifindex;
    uint32_t mtu;
    uint8_t smac[6];
    uint8_t dmac[6];
};

#define SLOW_PORT 0
#define MAX_PORTS (1 + XT_XSK_MAX_DIRECT)

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
    struct port ports[MAX_PORTS]; /* [0] = the internal veth, [1..n_direct] direct devices */
    unsigned n_ports;
    struct nh_entry *nh;          /* [XT_XSK_NH_SLOTS] */
    uint32_t nh_gen;              /* the cache's generation; entries of another one are stale */
    uint32_t nh_flush_req;        /* bumped by xt_xsk_nh_flush() from any thread */
    uint32_t nh_ttl_ms;
    uint32_t nh_flush_seen;
    uint32_t nh_l4;               /* lookups and keys include TCP/UDP ports (xt_xsk_nh_set_l4) */
    uint32_t nh_l4_now;           /* the worker's copy, taken at a flush */
    int direct_status[XT_XSK_MAX_DIRECT];
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
    uint8_t oport[2 * XT_XSK_MAX_BATCH];     /* per good frame: the port it leaves on */
    uint8_t omac[2 * XT_XSK_MAX_BATCH][12];  /* and its Ethernet destination + source */
    struct xt_pkt *opk[2 * XT_XSK_MAX_BATCH];
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

/* Direct egress device d of the config: the TX ring of our RX socket there, or a TX-only socket
 * on direct_queue[d]. A device that cannot have one keeps its status (-errno) and its frames take
 * the internal veth; that is not an error of the worker. */
static void add_direct(struct xt_xsk *x, unsigned d, const struct xsk_socket_config *scfg)
{
    char name[XT_XSK_IFNAMSIZ + 1] = {0};
    struct port *pt = &x->ports[x->n_ports];
    int rc = 0;

    memcpy(name, x->cfg.direct_ifname[d], XT_XSK_IFNAMSIZ);
    uint32_t ifindex = if_nametoindex(name);
    if (ifindex == 0) {
        x->direct_status[d] = -ENODEV;
        return;
    }
    for (unsigned p = 1; p < x->n_ports; p++)
        if (x->ports[p].ifindex == ifindex) {
            x->direct_status[d] = (int)ifindex; /* named twice */
            return;
        }
    memset(pt, 0, sizeof(*pt));
    for (unsigned i = 0; i < x->n_rx; i++) {
        struct rx_sock *s = &x->rx[i];
        if (s->has_tx && strncmp(x->cfg.rx_ifname[i], name, XT_XSK_IFNAMSIZ) == 0) {
            pt->tx = &s->tx;
            pt->comp = &s->comp;
            pt->fd = xsk_socket__fd(s->xsk);
            break;
        }
    }
    if (!pt->tx) {
        for (int tries = 0; tries < BUSY_RETRIES; tries++) {
            rc = xsk_socket__create_shared(&pt->own, name, x->cfg.direct_queue[d], x->umem, NULL,
                                           &pt->own_tx, &pt->own_fill, &pt->own_comp, scfg);
            if (rc != -EBUSY)
                break;
            usleep(BUSY_WAIT_US);
        }
        if (rc) {
            pt->own = NULL;
            x->direct_status[d] = rc;
            return;
        }
        pt->tx = &pt->own_tx;
        pt->comp = &pt->own_comp;
        pt->fd = xsk_socket__fd(pt->own);
    }
    pt->ifindex = ifindex;
    x->direct_status[d] = (int)ifindex;
    x->n_ports++;
}

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
    if (cfg->n_direct > XT_XSK_MAX_DIRECT || (cfg->n_direct && cfg->nh_prog_fd <= 0)) {
        errf(err, errlen, "%s: at most 8 direct devices, each needing the next-hop lookup "
             "program (%s)", "config", EINVAL);
        free(x);
        return NULL;
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
    x->nh_ttl_ms = cfg->nh_ttl_ms ? cfg->nh_ttl_ms : 1000;
    x->nh_gen = 1; /* the zeroed entries carry generation 0: all stale */
    if (cfg->n_direct)
        x->nh = calloc(XT_XSK_NH_SLOTS, sizeof(*x->nh));
    if (x->area == MAP_FAILED || !x->free_stack || !x->natt || (cfg->n_direct && !x->nh)) {
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
        /* the first RX socket of this worker on a direct egress device transmits there too */
        for (unsigned d = 0; d < cfg->n_direct; d++)
            if (strncmp(cfg->direct_ifname[d], cfg->rx_ifname[i], XT_XSK_IFNAMSIZ) == 0)
                s->has_tx = 1;
        for (unsigned j = 0; j < i && s->has_tx; j++)
            if (x->rx[j].has_tx &&
                strncmp(cfg->rx_ifname[j], cfg->rx_ifname[i], XT_XSK_IFNAMSIZ) == 0)
                s->has_tx = 0;
        struct xsk_ring_prod *txr = s->has_tx ? &s->tx : NULL;
        for (int tries = 0; tries < BUSY_RETRIES; tries++) {
            if (i == 0)
                rc = xsk_socket__create(&s->xsk, name, cfg->rx_queue[i], x->umem, &s->rx, txr,
                                        &scfg);
            else
                rc = xsk_socket__create_shared(&s->xsk, name, cfg->rx_queue[i], x->umem, &s->rx,
                                               txr, &s->fill, &s->comp, &scfg);
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
    x->ports[0].tx = &x->tx;
    x->ports[0].comp = &x->tx_comp;
    x->ports[0].fd = xsk_socket__fd(x->tx_xsk);
    x->n_ports = 1;
    for (unsigned d = 0; d < cfg->n_direct; d++)
        add_direct(x, d, &scfg);
    x->st.direct_ports = x->n_ports - 1;
    x->st.tx_budget = 32;
    if (cfg->tx_budget) {
        unsigned int budget = cfg->tx_budget > x->ring_size ? x->ring_size : cfg->tx_budget;
        /* older kernels refuse the option: they keep 32 */
        if (setsockopt(xsk_socket__fd(x->tx_xsk), SOL_XDP, XDP_MAX_TX_SKB_BUDGET, &budget,
                       sizeof(budget)) == 0)
            x->st.tx_budget = budget;
        for (unsigned p = 1; p < x->n_ports; p++)
            setsockopt(x->ports[p].fd, SOL_XDP, XDP_MAX_TX_SKB_BUDGET, &budget, sizeof(budget));
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
    for (unsigned p = 0; p < x->n_ports; p++) {
        struct port *pt = &x->ports[p];
        uint32_t idx, n = xsk_ring_cons__peek(pt->comp, x->ring_size, &idx);
        for (uint32_t i = 0; i < n; i++)
            frame_free(x, *xsk_ring_cons__comp_addr(pt->comp, idx + i));
        if (n) {
            xsk_ring_cons__release(pt->comp, n);
            pt->completed += n;
            x->st.tx_completed += n;
        }
    }
}

/* Copy mode transmits at most a kernel batch (32 frames) per sendto(): kick until the kernel has
 * taken every descriptor on the TX ring (bounded), so the ring never backs up into RX. */
static void kick_port(struct xt_xsk *x, struct port *pt)
{
    for (int k = 0; k < 16; k++) {
        if (!xsk_ring_prod__needs_wakeup(pt->tx))
            return;
        if (xsk_prod_nb_free(pt->tx, x->ring_size) >= x->ring_size)
            return; /* the kernel consumed everything we produced */
        x->st.tx_kicks++;
        /* EAGAIN/EBUSY/ENOBUFS: the kernel is still busy with earlier frames; completions
         * follow and the next turn kicks again */
        if (sendto(pt->fd, NULL, 0, MSG_DONTWAIT, NULL, 0) < 0 && errno != EINTR)
            return;
    }
}

static void kick_tx(struct xt_xsk *x)
{
    for (unsigned p = 0; p < x->n_ports; p++)
        if (x->ports[p].sent != x->ports[p].completed)
            kick_port(x, &x->ports[p]);
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

/* Put a processed packet (IP at p->data) on TX ring slot idx, with Ethernet destination and
 * source macs[0..5], macs[6..11]. */
static void tx_put(struct xt_xsk *x, struct xsk_ring_prod *tx, uint32_t idx, const struct xt_pkt *p,
                   const uint8_t *macs)
{
    uint8_t *eth = p->data - ETH_HLEN;
    memcpy(eth, macs, 12);
    uint16_t type = (p->data[0] >> 4) == 6 ? ETH_P_IPV6 : ETH_P_IP;
    eth[12] = type >> 8;
    eth[13] = type & 0xff;
    struct xdp_desc *d = xsk_ring_prod__tx_desc(tx, idx);
    d->addr = (uint64_t)(eth - (uint8_t *)x->area);
    d->len = p->len + ETH_HLEN;
    d->options = 0;
    x->st.tx_bytes += d->len;
}

/* --- next-hop cache (xsk.h) ------------------------------------------------------------------- */

#define NH_NEGATIVE_MS 50 /* a lookup without a usable answer is asked again after this */

static inline uint32_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint32_t)((uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u);
}

/* The inputs xdp_esp_fwd gives bpf_fib_lookup for this packet (family, TOS or flow label, protocol,
 * source, destination; with l4, the TCP/UDP ports of a packet that is not a fragment, which the
 * kernel's port rules and L4 multipath hash look at). Returns 4 or 6, or 0 when the packet is not
 * IP. *l4_off: the offset of the ports in the packet when they are part of the key, else 0. */
static int nh_key(const struct xt_pkt *p, int l4, uint64_t key[NH_KEY_WORDS], unsigned *l4_off)
{
    const uint8_t *h = p->data;
    unsigned off = 0;
    int fam = 0;

    memset(key, 0, NH_KEY_WORDS * sizeof(uint64_t));
    *l4_off = 0;
    if (p->len >= 20 && (h[0] >> 4) == 4) {
        key[0] = 4 | (uint64_t)h[1] << 8 | (uint64_t)h[9] << 16;
        memcpy(&key[1], h + 12, 8);
        fam = 4;
        if ((h[6] & 0x3f) == 0 && h[7] == 0) /* not a fragment (MF and offset clear) */
            off = (h[0] & 15) * 4u;
    } else if (p->len >= 40 && (h[0] >> 4) == 6) {
        uint32_t flow = ((uint32_t)h[0] << 24 | (uint32_t)h[1] << 16 | (uint32_t)h[2] << 8 | h[3]) &
                        0x0fffffff;
        key[0] = 6 | (uint64_t)h[6] << 8 | (uint64_t)flow << 16;
        memcpy(&key[1], h + 8, 32);
        fam = 6;
        off = 40; /* ports only right after the fixed header (no extension headers) */
    }
    uint8_t proto = fam == 4 ? h[9] : fam == 6 ? h[6] : 0;
    if (l4 && off >= 20 && (proto == 6 || proto == 17) && p->len >= off + 4 && off + 4 <= 64) {
        key[5] = (uint64_t)1 << 32 | (uint32_t)h[off] << 24 | (uint32_t)h[off + 1] << 16 |
                 (uint32_t)h[off + 2] << 8 | h[off + 3];
        *l4_off = off;
    }
    return fam;
}

static inline uint32_t nh_hash(const uint64_t key[NH_KEY_WORDS])
{
    uint64_t h = 0x9e3779b97f4a7c15ULL;
    for (int i = 0; i < NH_KEY_WORDS; i++) {
        h ^= key[i];
        h *= 0xff51afd7ed558ccdULL;
        h ^= h >> 33;
    }
    return (uint32_t)h;
}

/* Ask the kernel FIB (the lookup program, once) and fill entry e, whose key is set. l4_off: where
 * the ports are when the lookup is to use them (bpf/nexthop.h reads them there), else 0. */
static void nh_resolve(struct xt_xsk *x, const struct xt_pkt *p, int fam, unsigned l4_off,
                       struct nh_entry *e, uint32_t now)
{
    uint8_t in[ETH_HLEN + 64], out[ETH_HLEN + 64];
    unsigned ip_len = l4_off ? l4_off + 4 : (fam == 4 ? 20u : 40u);
    unsigned len = ETH_HLEN + ip_len;
    struct nh_result r;

    memset(in, 0, ETH_HLEN);
    in[0] = l4_off ? XT_XSK_NH_F_PORTS : 0; /* the request flags ride in the destination MAC */
    in[12] = fam == 4 ? 0x08 : 0x86;
    in[13] = fam == 4 ? 0x00 : 0xdd;
    memcpy(in + ETH_HLEN, p->data, ip_len);
    struct __sk_buff ctx = {.ifindex = x->cfg.nh_ifindex}; /* the skb's device: router end */
    LIBBPF_OPTS(bpf_test_run_opts, o, .data_in = in, .data_size_in = len, .data_out = out,
                .data_size_out = sizeof(out), .ctx_in = &ctx, .ctx_size_in = sizeof(ctx),
                .repeat = 1);
    e->gen = x->nh_gen;
    e->port = SLOW_PORT;
    e->mtu = 0;
    e->expires_ms = now + NH_NEGATIVE_MS;
    struct timespec t0, t1;
    x->st.nh_lookups++;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int rc = bpf_prog_test_run_opts(x->cfg.nh_prog_fd, &o);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    x->st.nh_lookup_ns += (uint64_t)((t1.tv_sec - t0.tv_sec) * 1000000000LL +
                                     (t1.tv_nsec - t0.tv_nsec));
    if (rc != 0 || o.retval != 0 /* XT_NH_DONE */ || o.data_size_out < sizeof(r)) {
        x->st.nh_lookup_errors++;
        return;
    }
    memcpy(&r, out, sizeof(r));
    if (r.magic != XT_XSK_NH_MAGIC) {
        x->st.nh_lookup_errors++;
        return;
    }
    if (r.rc != 0 /* BPF_FIB_LKUP_RET_SUCCESS */) {
        x->st.nh_no_route++;
        return;
    }
    e->expires_ms = now + x->nh_ttl_ms;
    e->mtu = r.mtu;
    memcpy(e->dmac, r.dmac, 6);
    memcpy(e->smac, r.smac, 6);
    for (unsigned i = 1; i < x->n_ports; i++)
        if (x->ports[i].ifindex == r.ifindex)
            e->port = (int32_t)i; /* another device: stays SLOW_PORT, cached as an answer */
}

/* Decide where good frame number t (packet p) leaves: x->oport[t] and x->omac[t]. transit: a
 * decrypted inner packet (TTL / hop limit is ours to decrement, RFC 1812 5.3.1, as the forwarder
 * does); otherwise outer ESP the edge originates. */
static void route_out(struct xt_xsk *x, struct xt_pkt *p, int transit, unsigned t, uint32_t now,
                      unsigned *budget)
{
    uint64_t key[NH_KEY_WORDS];
    unsigned l4_off;
    uint8_t *h = p->data;

    x->oport[t] = SLOW_PORT;
    memcpy(x->omac[t], x->cfg.tx_dst_mac, 6);
    memcpy(x->omac[t] + 6, x->cfg.tx_src_mac, 6);
    if (x->n_ports <= 1)
        return;
    int fam = nh_key(p, x->nh_l4_now, key, &l4_off);
    if (!fam)
        return;
    if (transit && (fam == 4 ? h[8] : h[7]) <= 1) {
        x->st.slow_ttl++; /* the forwarder passes it to the kernel, which answers ICMP */
        return;
    }
    struct nh_entry *e = &x->nh[nh_hash(key) & (XT_XSK_NH_SLOTS - 1)];
    if (e->gen != x->nh_gen || (int32_t)(e->expires_ms - now) <= 0 ||
        memcmp(e->key, key, sizeof(key)) != 0) {
        if (*budget == 0) {
            x->st.nh_deferred++;
            return;
        }
        (*budget)--;
        memcpy(e->key, key, sizeof(key));
        nh_resolve(x, p, fam, l4_off, e, now);
    }
    if (e->port == SLOW_PORT)
        return;
    if (p->len > e->mtu) {
        x->st.slow_mtu++;
        return;
    }
    if (transit && fam == 4) {
        uint16_t c16;
        memcpy(&c16, h + 10, 2);
        uint32_t check = c16;
        check += htons(0x0100); /* as ip_decrease_ttl() and bpf/esp_steer.h esp_ttl_dec() */
        c16 = (uint16_t)(check + (check >= 0xFFFF));
        memcpy(h + 10, &c16, 2);
        h[8]--;
    } else if (transit) {
        h[7]--;
    }
    x->oport[t] = (uint8_t)e->port;
    memcpy(x->omac[t], e->dmac, 6);
    memcpy(x->omac[t] + 6, e->smac, 6);
}

/* One RX socket: returns the number of descriptors taken. */
static unsigned service(struct xt_xsk *x, struct rx_sock *s)
{
    uint32_t idx_rx, room, n, nd = 0, ne = 0;

    refill(x, s);
    room = x->batch;
    for (unsigned p = 0; p < x->n_ports; p++) {
        uint32_t r = xsk_prod_nb_free(x->ports[p].tx, x->batch);
        room = r < room ? r : room; /* every frame may go to any port */
    }
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

    /* the good frames, decrypted then encrypted, each with the port it leaves on */
    uint32_t ng = 0, now = x->n_ports > 1 ? now_ms() : 0;
    unsigned budget = XT_XSK_NH_LOOKUPS;
    for (uint32_t i = 0; i < nd; i++) {
        struct xt_pkt *p = &x->dpk[i];
        if (p->verdict == 0 && p->headroom >= ETH_HLEN) {
            if (x->dsport[i] && crypto)
                natt_learn(x, p->tunnel, x->dsrc[i], x->dsport[i]);
            x->st.decrypt_ok++;
            x->opk[ng] = p;
            route_out(x, p, 1, ng++, now, &budget);
        } else {
            x->st.decrypt_drops[p->verdict < XT_XSK_STAT_VERDICTS ? p->verdict : 0]++;
            frame_free(x, x->dbase[i]);
        }
    }
    for (uint32_t i = 0; i < ne; i++) {
        struct xt_pkt *p = &x->epk[i];
        if (p->verdict == 0 && p->headroom >= ETH_HLEN) {
            if (crypto)
                natt_rewrite(x, p); /* before the route: it may change the destination */
            x->st.encrypt_ok++;
            x->opk[ng] = p;
            route_out(x, p, 0, ng++, now, &budget);
        } else {
            x->st.encrypt_drops[p->verdict < XT_XSK_STAT_VERDICTS ? p->verdict : 0]++;
            frame_free(x, x->ebase[i]);
        }
    }
    /* room >= n >= ng on every port: the reservations cannot fail */
    uint32_t cnt[MAX_PORTS] = {0}, idx[MAX_PORTS], put[MAX_PORTS] = {0};
    for (uint32_t g = 0; g < ng; g++)
        cnt[x->oport[g]]++;
    for (unsigned p = 0; p < x->n_ports; p++)
        if (cnt[p] && xsk_ring_prod__reserve(x->ports[p].tx, cnt[p], &idx[p]) != cnt[p])
            cnt[p] = 0; /* unreachable (room was checked); its frames are freed below */
    for (uint32_t g = 0; g < ng; g++) {
        unsigned p = x->oport[g];
        if (put[p] < cnt[p]) {
            tx_put(x, x->ports[p].tx, idx[p] + put[p]++, x->opk[g], x->omac[g]);
        } else {
            x->st.tx_ring_full++;
            frame_free(x, (uint64_t)(x->opk[g]->data - (uint8_t *)x->area));
        }
    }
    for (unsigned p = 0; p < x->n_ports; p++) {
        if (!put[p])
            continue;
        xsk_ring_prod__submit(x->ports[p].tx, put[p]);
        x->ports[p].sent += put[p];
        x->st.tx_packets += put[p];
        if (p == SLOW_PORT)
            x->st.tx_slow += put[p];
        else
            x->st.tx_direct += put[p];
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
        uint32_t req = __atomic_load_n(&x->nh_flush_req, __ATOMIC_ACQUIRE);
        if (req != x->nh_flush_seen) {
            x->nh_flush_seen = req;
            x->nh_l4_now = __atomic_load_n(&x->nh_l4, __ATOMIC_ACQUIRE);
            x->nh_gen++;
            x->st.nh_flushes++;
        }
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
    out->k_tx_invalid = 0; /* every TX ring: a frame over a device's MTU is refused there */
    for (unsigned p = 0; p < x->n_ports; p++) {
        len = sizeof(ks);
        memset(&ks, 0, sizeof(ks));
        if (getsockopt(x->ports[p].fd, SOL_XDP, XDP_STATISTICS, &ks, &len) == 0)
            out->k_tx_invalid += ks.tx_invalid_descs;
    }
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

int xt_xsk_direct_status(struct xt_xsk *x, unsigned i)
{
    if (!x || i >= x->cfg.n_direct)
        return -EINVAL;
    return x->direct_status[i];
}

void xt_xsk_nh_flush(struct xt_xsk *x)
{
    if (x)
        __atomic_fetch_add(&x->nh_flush_req, 1, __ATOMIC_RELEASE);
}

void xt_xsk_nh_set_l4(struct xt_xsk *x, int on)
{
    if (!x)
        return;
    __atomic_store_n(&x->nh_l4, on ? 1u : 0u, __ATOMIC_RELEASE);
    xt_xsk_nh_flush(x); /* the keys change shape: start afresh */
}

void xt_xsk_free(struct xt_xsk *x)
{
    if (!x)
        return;
    for (unsigned p = 1; p < x->n_ports; p++)
        if (x->ports[p].own)
            xsk_socket__delete(x->ports[p].own);
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
    free(x->nh);
    if (x->natt_owned)
        free(x->natt);
    free(x);
}
