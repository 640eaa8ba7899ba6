"""The native ring buffer batch consumer (native/ring.c, ``pipeline._ring``) on a real BPF ring
buffer: a small XDP program run through BPF_PROG_TEST_RUN submits numbered records into a
one-page ring (25 records of 152 bytes fit), and the consumer must return exactly those records,
in order, across batch limits and the ring's wrap-around, skip (and count) records of another
size, pass over discarded ones, and free the space it consumed.
"""
from __future__ import annotations

import errno

import numpy as np
import pytest

from pipeline.xdp import testrun

pytestmark = pytest.mark.netns   # needs root for BPF

PROGRAM = rb"""
struct rec152 { u32 seq; u32 kind; u8 fill[144]; };
struct rec64 { u32 seq; u32 kind; u8 fill[56]; };

BPF_RINGBUF_OUTPUT(ring, 1);     /* one page: 4096 bytes */
BPF_ARRAY(mode, u32, 1);         /* 0: a 152-byte record, 1: a 64-byte one, 2: reserve + discard */
BPF_ARRAY(seqs, u32, 1);

int xdp_ring(struct xdp_md *ctx)
{
    u32 z = 0, seq;
    u32 *m = mode.lookup(&z), *s = seqs.lookup(&z);

    if (!m || !s)
        return XDP_ABORTED;
    seq = *s;
    *s = seq + 1;
    if (*m == 0) {
        struct rec152 *r = ring.ringbuf_reserve(sizeof(*r));
        if (!r)
            return XDP_DROP;
        r->seq = seq;
        r->kind = 152;
        __builtin_memset(r->fill, seq & 0xff, sizeof(r->fill));
        ring.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
    } else if (*m == 1) {
        struct rec64 *r = ring.ringbuf_reserve(sizeof(*r));
        if (!r)
            return XDP_DROP;
        r->seq = seq;
        r->kind = 64;
        __builtin_memset(r->fill, 0, sizeof(r->fill));
        ring.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
    } else {
        struct rec152 *r = ring.ringbuf_reserve(sizeof(*r));
        if (!r)
            return XDP_DROP;
        ring.ringbuf_discard(r, BPF_RB_NO_WAKEUP);
    }
    return XDP_PASS;
}
"""
REC = np.dtype([("seq", "=u4"), ("kind", "=u4"), ("fill", "u1", (144,))])
FRAME = bytes(64)


@pytest.fixture(scope="module")
def prog():
    from bcc import BPF
    b = BPF(text=PROGRAM)
    fn = b.load_func(b"xdp_ring", BPF.XDP)
    yield b, fn.fd
    b.cleanup()


@pytest.fixture
def ring(prog):
    """(program, entry fd, mapped ring) with the ring empty and the sequence at 0."""
    from pipeline._ring import ffi, lib
    b, fd = prog
    err = ffi.new("int *")
    r = ffi.gc(lib.xt_ring_open(b[b"ring"].map_fd, err), lib.xt_ring_close)
    assert err[0] == 0
    drain(r, 1000)                       # whatever an earlier test left
    b[b"seqs"][b[b"seqs"].Key(0)] = b[b"seqs"].Leaf(0)
    yield b, fd, r


def submit(b, fd: int, mode: int, n: int) -> list[int]:
    t = b[b"mode"]
    t[t.Key(0)] = t.Leaf(mode)
    return [testrun.run(fd, FRAME).action for _ in range(n)]


def drain(r, cap: int, rec_size: int = REC.itemsize) -> tuple[int, np.ndarray, int]:
    """(return value, the records copied, records skipped)."""
    from pipeline._ring import ffi, lib
    buf = bytearray(max(cap, 1) * REC.itemsize)
    skipped = ffi.new("uint64_t *")
    n = lib.xt_ring_drain(r, ffi.from_buffer(buf), rec_size, cap, skipped)
    recs = np.frombuffer(buf, dtype=REC)[:max(n, 0)].copy()
    return n, recs, int(skipped[0])


def test_open_errors(prog):
    from pipeline._ring import ffi, lib
    b, _fd = prog
    err = ffi.new("int *")
    assert lib.xt_ring_open(b[b"mode"].map_fd, err) == ffi.NULL
    assert err[0] == lib.XT_RING_E_NOT_RINGBUF
    assert lib.xt_ring_open(-1, err) == ffi.NULL
    assert err[0] in (-errno.EBADF, -errno.EBADFD)   # the kernel's answer to a bad fd (6.x: EBADFD)


def test_batches_in_order(ring):
    from pipeline._ring import lib
    b, fd, r = ring
    assert lib.xt_ring_size(r) == 4096
    assert submit(b, fd, 0, 10) == [testrun.XdpAction.PASS] * 10
    assert lib.xt_ring_pending(r) == 10 * 160          # 8-byte header + 152 bytes each
    got = []
    for want in (4, 4, 2, 0):
        n, recs, skipped = drain(r, 4)
        assert (n, skipped) == (want, 0)
        got += recs["seq"].tolist()
        assert all((rec["fill"] == rec["seq"] & 0xFF).all() and rec["kind"] == 152
                   for rec in recs)
    assert got == list(range(10))
    assert lib.xt_ring_pending(r) == 0


def test_wraps_around(ring):
    """100 records through a ring that holds 25: every one read whole, in order (records that
    straddle the end of the data area read through its second mapping)."""
    b, fd, r = ring
    got = []
    for _ in range(7):
        assert submit(b, fd, 0, 15) == [testrun.XdpAction.PASS] * 15
        n, recs, _ = drain(r, 100)
        assert n == 15
        assert all((rec["fill"] == rec["seq"] & 0xFF).all() for rec in recs)
        got += recs["seq"].tolist()
    assert got == list(range(105))


def test_full_ring_then_space_again(ring):
    b, fd, r = ring
    actions = submit(b, fd, 0, 30)
    assert actions == [testrun.XdpAction.PASS] * 25 + [testrun.XdpAction.DROP] * 5
    n, recs, _ = drain(r, 100)
    assert (n, recs["seq"].tolist()) == (25, list(range(25)))
    assert submit(b, fd, 0, 25) == [testrun.XdpAction.PASS] * 25   # consumed space came back
    n, recs, _ = drain(r, 100)
    assert (n, recs["seq"].tolist()) == (25, list(range(30, 55)))


def test_other_sizes_skipped_discarded_passed_over(ring):
    b, fd, r = ring
    submit(b, fd, 0, 2)        # seq 0, 1
    submit(b, fd, 1, 3)        # 2, 3, 4: 64 bytes
    submit(b, fd, 2, 2)        # 5, 6: discarded
    submit(b, fd, 0, 1)        # 7
    n, recs, skipped = drain(r, 100)
    assert (n, recs["seq"].tolist(), skipped) == (3, [0, 1, 7], 3)
    # a batch limit never drops the record after it, whatever lies between
    submit(b, fd, 0, 1)        # 8
    submit(b, fd, 1, 1)        # 9
    submit(b, fd, 0, 1)        # 10
    n, recs, skipped = drain(r, 1)
    assert (n, recs["seq"].tolist(), skipped) == (1, [8], 0)
    n, recs, skipped = drain(r, 1)
    assert (n, recs["seq"].tolist(), skipped) == (1, [10], 1)


def test_record_size_checked(ring):
    from pipeline._ring import lib
    b, fd, r = ring
    submit(b, fd, 0, 1)
    assert drain(r, 4, rec_size=0)[0] == lib.XT_RING_E_RECORD_SIZE
    assert drain(r, 4, rec_size=8192)[0] == lib.XT_RING_E_RECORD_SIZE
    n, recs, _ = drain(r, 4)                     # the record is still there
    assert (n, recs["seq"].tolist()) == (1, [0])
