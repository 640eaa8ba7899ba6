/*
 * ring.h - batch consumer of a BPF ring buffer map (BPF_MAP_TYPE_RINGBUF), for the analytics
 * sampler (bpf/sample.h's xt_samples): every committed record goes into a caller-provided flat
 * array of fixed-size records in one call, so user space does no per-record callback.
 *
 * This header is the public C API *and* the cffi declaration (native/build_ring.py reads it,
 * drops the preprocessor lines except integer XT_ #defines and feeds the rest to ffi.cdef()).
 *
 * The ring is mmap()ed the way the kernel exposes it (Documentation/bpf/ringbuf.rst; libbpf's
 * ring_buffer__add() maps it the same way):
 *   offset 0, one page, read-write   the consumer position (u64), written by us only
 *   offset 1 page, read-only         the producer position page, then the data area mapped
 *                                    twice in a row, so a record that wraps past the end reads
 *                                    as one contiguous block
 * Each record in the data area is an 8-byte header (u32 length with the BUSY bit 1<<31 while the
 * producer still writes it and the DISCARD bit 1<<30 for a discarded one, u32 page offset) and
 * the payload, padded to 8 bytes. The consumer reads the producer position with acquire
 * semantics, walks the records from its own position and publishes the new position with release
 * semantics (the kernel reads it to compute free space).
 *
 * Why not ring_buffer__consume(): it calls a callback per record and consumes the record even
 * when the callback reports that there is no room for it; here a drain stops before a record it
 * cannot store, which stays in the ring for the next call.
 *
 * One consumer at a time per ring (the caller serialises drains); the producer side is the XDP
 * program on any CPU. The mapping keeps the map alive until xt_ring_close(), even after the
 * program and its map fd are closed.
 */
#ifndef XT_RING_H
#define XT_RING_H

#include <stdint.h>

/* Negative return values of xt_ring_open() (through *err) and xt_ring_drain(): -errno, or */
#define XT_RING_E_NOT_RINGBUF -1001 /* the fd is not a BPF_MAP_TYPE_RINGBUF map */
#define XT_RING_E_RECORD_SIZE -1002 /* rec_size is 0 or larger than the ring */

struct xt_ring;

/* Map the ring of map_fd (the fd may be closed afterwards). NULL on failure, with *err set to
 * -errno or an XT_RING_E_* code. */
struct xt_ring *xt_ring_open(int map_fd, int *err);

/* Move up to max committed records of exactly rec_size bytes into out (max * rec_size bytes,
 * record i at out + i * rec_size) and release their space in the ring. Records of any other
 * length are consumed and counted in *skipped (not copied); discarded records are consumed and
 * not counted. Stops at max records (the next one stays in the ring), at a record the producer
 * has not committed yet, or when the ring is empty. Returns the number of records copied, or a
 * negative XT_RING_E_* code. */
int64_t xt_ring_drain(struct xt_ring *r, void *out, uint32_t rec_size, uint32_t max,
                      uint64_t *skipped);

/* Bytes between the consumer and the producer position (records not yet drained, with their
 * headers and padding). */
uint64_t xt_ring_pending(const struct xt_ring *r);

/* Size of the data area in bytes (the map's max_entries). */
uint64_t xt_ring_size(const struct xt_ring *r);

/* Unmap and free; NULL is accepted. */
void xt_ring_close(struct xt_ring *r);

#endif /* XT_RING_H */
