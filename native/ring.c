/*
 * ring.c - batch consumer of a BPF ring buffer map; see ring.h for the layout and the protocol.
 */
#include "ring.h"

#include <errno.h>
#include <linux/bpf.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <bpf/bpf.h>

#ifndef BPF_RINGBUF_BUSY_BIT
#define BPF_RINGBUF_BUSY_BIT (1U << 31)
#define BPF_RINGBUF_DISCARD_BIT (1U << 30)
#define BPF_RINGBUF_HDR_SZ 8
#endif

struct xt_ring {
	uint64_t *consumer_pos; /* mapping 1: the consumer page (read-write) */
	uint64_t *producer_pos; /* mapping 2: the producer page, then data twice (read-only) */
	const uint8_t *data;
	uint64_t mask;          /* data size - 1 (a power of two) */
	size_t page_size;
};

struct xt_ring *xt_ring_open(int map_fd, int *err)
{
	struct bpf_map_info info;
	uint32_t len = sizeof(info);
	struct xt_ring *r;
	void *p;
	int dummy;

	if (!err)
		err = &dummy;
	memset(&info, 0, sizeof(info));
	if (bpf_obj_get_info_by_fd(map_fd, &info, &len)) {
		*err = -errno;
		return NULL;
	}
	if (info.type != BPF_MAP_TYPE_RINGBUF || !info.max_entries ||
	    (info.max_entries & (info.max_entries - 1))) {
		*err = XT_RING_E_NOT_RINGBUF;
		return NULL;
	}
	r = calloc(1, sizeof(*r));
	if (!r) {
		*err = -ENOMEM;
		return NULL;
	}
	r->page_size = (size_t)sysconf(_SC_PAGESIZE);
	r->mask = (uint64_t)info.max_entries - 1;
	p = mmap(NULL, r->page_size, PROT_READ | PROT_WRITE, MAP_SHARED, map_fd, 0);
	if (p == MAP_FAILED) {
		*err = -errno;
		free(r);
		return NULL;
	}
	r->consumer_pos = p;
	p = mmap(NULL, r->page_size + 2 * (size_t)info.max_entries, PROT_READ, MAP_SHARED, map_fd,
		 (off_t)r->page_size);
	if (p == MAP_FAILED) {
		*err = -errno;
		munmap(r->consumer_pos, r->page_size);
		free(r);
		return NULL;
	}
	r->producer_pos = p;
	r->data = (const uint8_t *)p + r->page_size;
	*err = 0;
	return r;
}

static inline uint64_t record_span(uint32_t len)
{
	len &= ~(BPF_RINGBUF_BUSY_BIT | BPF_RINGBUF_DISCARD_BIT);
	return ((uint64_t)len + BPF_RINGBUF_HDR_SZ + 7) & ~(uint64_t)7;
}

int64_t xt_ring_drain(struct xt_ring *r, void *out, uint32_t rec_size, uint32_t max,
		      uint64_t *skipped)
{
	uint64_t cons, prod, n_skipped = 0;
	uint8_t *dst = out;
	int64_t n = 0;

	if (!rec_size || rec_size > r->mask + 1)
		return XT_RING_E_RECORD_SIZE;
	/* our own position: only this consumer writes it */
	cons = __atomic_load_n(r->consumer_pos, __ATOMIC_ACQUIRE);
	while ((uint64_t)n < max) {
		const uint8_t *hdr;
		uint32_t len;

		/* pairs with the producer's release store of its position in
		 * __bpf_ringbuf_reserve(): the headers up to prod are initialised */
		prod = __atomic_load_n(r->producer_pos, __ATOMIC_ACQUIRE);
		if (cons >= prod)
			break;
		while (cons < prod && (uint64_t)n < max) {
			hdr = r->data + (cons & r->mask);
			/* pairs with bpf_ringbuf_commit()'s release exchange of the length */
			len = __atomic_load_n((const uint32_t *)hdr, __ATOMIC_ACQUIRE);
			if (len & BPF_RINGBUF_BUSY_BIT)
				goto done; /* not committed yet: records behind it wait too */
			if (!(len & BPF_RINGBUF_DISCARD_BIT)) {
				if (len == rec_size) {
					memcpy(dst + (size_t)n * rec_size, hdr + BPF_RINGBUF_HDR_SZ,
					       rec_size);
					n++;
				} else {
					n_skipped++;
				}
			}
			cons += record_span(len);
		}
	}
done:
	/* release: our reads of the records happen before the kernel may reuse their space */
	__atomic_store_n(r->consumer_pos, cons, __ATOMIC_RELEASE);
	if (skipped)
		*skipped += n_skipped;
	return n;
}

uint64_t xt_ring_pending(const struct xt_ring *r)
{
	uint64_t cons = __atomic_load_n(r->consumer_pos, __ATOMIC_ACQUIRE);
	uint64_t prod = __atomic_load_n(r->producer_pos, __ATOMIC_ACQUIRE);

	return prod - cons;
}

uint64_t xt_ring_size(const struct xt_ring *r)
{
	return r->mask + 1;
}

void xt_ring_close(struct xt_ring *r)
{
	if (!r)
		return;
	munmap(r->producer_pos, r->page_size + 2 * (size_t)(r->mask + 1));
	munmap(r->consumer_pos, r->page_size);
	free(r);
}
