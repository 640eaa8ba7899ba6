"""Anti-replay (RFC 4303 3.4.3 and Appendix A): the window cases of the issue, its edges, and a
Hypothesis comparison with a plain model of the rule."""
from __future__ import annotations

import pytest
from esp_support import SUITES, ipv4, outer_ipv4, ref_encrypt, suite_sas
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import esp

INNER = ipv4(b"replay test")


class Rx:
    def __init__(self, window: int | None = 1024, suite=SUITES[0]):
        kw = {} if window is None else {"replay_window": window}
        _, in_sa, self.ref = suite_sas(suite, **kw)
        self.ctx = esp.EspContext()
        self.ctx.add_sa(in_sa)
        self.w = self.ctx.worker()
        self.batch = esp.PacketBatch(64, frame_size=256, headroom=0)

    def packet(self, seq: int, forge: bool = False) -> bytes:
        wire = bytearray(outer_ipv4(ref_encrypt(self.ref, INNER, seq, seq.to_bytes(8, "big"))))
        if forge:
            wire[-1] ^= 1
        return bytes(wire)

    def send(self, *seqs: int, forge: bool = False) -> list[str]:
        self.batch.fill([self.packet(s, forge) for s in seqs])
        self.w.decrypt(self.batch)
        return self.batch.verdicts()

    def stats(self) -> esp.SaStats:
        return self.ctx.sa_stats("in", 0x1000)

    def close(self):
        self.ctx.close()


@pytest.fixture
def rx():
    r = Rx()
    yield r
    r.close()


def test_default_window_is_1024():
    r = Rx(window=None)
    try:
        assert r.send(2000, 977, 976) == ["ok", "ok", "replay"]  # 2000 - 1024 = 976 is out
    finally:
        r.close()


def test_in_order(rx):
    assert rx.send(*range(1, 41)) == ["ok"] * 40
    assert rx.stats().seq == 40 and rx.stats().packets == 40


def test_duplicate(rx):
    assert rx.send(1, 2, 3, 2, 3, 3) == ["ok", "ok", "ok", "replay", "replay", "replay"]
    assert rx.stats().drops["replay"] == 3


def test_duplicate_in_one_batch_and_seq_zero(rx):
    assert rx.send(7, 7, 0) == ["ok", "replay", "replay"]


def test_old_beyond_the_window(rx):
    assert rx.send(5000) == ["ok"]
    # window 1024: 3977..5000 are inside, 3976 is not
    assert rx.send(3976, 3977, 1, 4999) == ["replay", "ok", "replay", "ok"]


def test_reordered_within_the_window(rx):
    assert rx.send(10, 8, 9, 1, 5, 3, 2, 4, 6, 7) == ["ok"] * 10
    assert rx.send(*range(1, 11)) == ["replay"] * 10
    assert rx.stats().seq == 10


def test_window_zero_accepts_everything():
    r = Rx(window=0)
    try:
        assert r.send(1, 1, 5000, 1, 1, 0) == ["ok"] * 6
        assert r.stats().drops["replay"] == 0
    finally:
        r.close()


def test_forged_high_sequence_number_does_not_move_the_window(rx):
    assert rx.send(100) == ["ok"]
    assert rx.send(1_000_000, forge=True) == ["icv_mismatch"]
    assert rx.stats().seq == 100
    # had the forgery moved the window, 99 would now be far to its left
    assert rx.send(99, 1_000_000) == ["ok", "ok"]


def test_large_jump_clears_stale_bits(rx):
    assert rx.send(1, 2, 3) == ["ok"] * 3
    # jump by exactly the bitmap's period: old bits at the same positions must not count
    for top in (2048 + 1, 4096 * 8 + 2, 2**32 - 1):
        assert rx.send(top) == ["ok"]
        assert rx.send(top - 1, top - 1023, top - 1024) == ["ok", "ok", "replay"]


def test_highest_sequence_number(rx):
    assert rx.send(2**32 - 1, 2**32 - 1) == ["ok", "replay"]


@settings(max_examples=40, deadline=None)
@given(window=st.sampled_from([1, 32, 64, 65, 100, 1024]),
       seqs=st.lists(st.integers(0, 3000), min_size=1, max_size=60))
def test_window_matches_the_rfc_rule(window, seqs):
    r = Rx(window=window)
    try:
        got = r.send(*seqs)
        top, seen, want = 0, set(), []
        for s in seqs:
            ok = s != 0 and (s > top or (top - s < window and s not in seen))
            want.append("ok" if ok else "replay")
            if ok:
                seen.add(s)
                top = max(top, s)
        assert got == want
    finally:
        r.close()
