"""The analytics history (SQLite) and the collector's arithmetic, without a data plane.

Ticks are built by hand with known counts; the collector is fed by in-memory sources that return
cumulative readings (as the XDP maps and the ESP module do), including resets.
"""
from __future__ import annotations

import os
from collections import Counter

import pytest

from pipeline.analytics.collector import EGRESS, INGRESS, NODE, Collector, EspSource, Reading, Tick
from pipeline.analytics.store import History, StoreError


def tick(ts: int, traffic: dict, drops: dict | None = None, samples: Counter | None = None):
    return Tick(float(ts) + 0.25, 1.0, traffic, drops or {}, {}, samples or Counter())


def test_rollup_sums_complete_minutes_only(tmp_path):
    h = History(tmp_path / "h.db", fine_retention=3600, coarse=60)
    for ts in range(960, 1090):                 # minutes 960, 1020 complete; 1080 partial
        h.add(tick(ts, {("a", INGRESS): (ts % 7, 100 * (ts % 7)), ("a", EGRESS): (1, 60)},
                   {("a", "unknown_tunnel"): ts % 2}))
    coarse = h.points("a", 0, res=60)
    assert [p.ts for p in coarse] == [960, 1020]
    for p in coarse:
        r = range(p.ts, p.ts + 60)
        assert (p.in_packets, p.in_bytes) == (sum(t % 7 for t in r), sum(100 * (t % 7) for t in r))
        assert (p.out_packets, p.out_bytes, p.drops) == (60, 3600, 30)
        assert (p.in_pps, p.out_bps) == (p.in_packets / 60, 8 * 3600 / 60)
    fine = h.points("a", 1080, res=1)
    assert [p.ts for p in fine] == list(range(1080, 1090))
    assert h.drops("a", 960, 1080, res=60) == {"unknown_tunnel": 60}
    h.close()
    # reopened: rollup continues where it stopped, nothing rolled twice
    h = History(tmp_path / "h.db", fine_retention=3600, coarse=60)
    for ts in range(1090, 1150):
        h.add(tick(ts, {("a", EGRESS): (1, 60)}))
    assert [(p.ts, p.out_packets) for p in h.points("a", 0, res=60)] == [
        (960, 60), (1020, 60), (1080, 60)]


def test_retention_windows(tmp_path):
    h = History(tmp_path / "h.db", fine_retention=120, coarse=60, coarse_retention=600)
    for ts in range(1500):
        h.add(tick(ts, {("a", EGRESS): (1, 10)}))
    fine = h.points("a", 0, res=1)
    assert fine[0].ts >= 1440 - 120 and fine[-1].ts == 1499
    coarse = h.points("a", 0, res=60)
    assert coarse[0].ts >= 1440 - 600 and coarse[-1].ts == 1380
    assert all(p.out_packets == 60 for p in coarse)


def test_disk_use_bounded(tmp_path):
    """Many tunnels, 15 minutes of 1-second points into 384 KiB: database and log never grow
    past the bound, and what is kept is the newest."""
    bound = 384 << 10
    h = History(tmp_path / "h.db", fine_retention=3600, coarse=60, max_bytes=bound)
    sizes = []
    tunnels = [f"tunnel-{i:03d}" for i in range(40)]
    for ts in range(900):
        h.add(tick(ts, {(t, d): (ts, ts * 100) for t in tunnels for d in (INGRESS, EGRESS)},
                   {(tunnels[0], "inner_malformed"): 1},
                   Counter({(ts // 60 * 60, 1, "src", f"192.0.2.{ts % 200}"): 1})))
        if ts % 10 == 0:
            sizes.append(on_disk(tmp_path))
    assert max(sizes + [on_disk(tmp_path)]) <= bound
    assert max(sizes) > bound // 2                              # it did fill up
    assert h.size() <= bound
    pts = h.points(tunnels[5], 0)
    assert pts[-1].ts == 899 and pts[-1].in_packets == 899     # the newest second is kept
    assert pts[0].ts > 0                                        # the oldest were deleted
    h.close()


def on_disk(d) -> int:
    return sum(os.path.getsize(d / f) for f in ("h.db", "h.db-wal", "h.db-shm") if (d / f).exists())


def test_top_orders_by_count_then_key(tmp_path):
    h = History(tmp_path / "h.db", tunnel_names={3: "c"})
    h.add_samples(Counter({(600, 3, "src", "192.0.2.1"): 5, (600, 3, "src", "192.0.2.2"): 9,
                           (660, 3, "src", "192.0.2.1"): 4, (660, 0, "src", "10.0.0.1"): 2,
                           (660, 3, "dport", "80"): 7}))
    assert h.top("c", 600, "src") == [("192.0.2.1", 9), ("192.0.2.2", 9)]
    assert h.top("c", 660, "src") == [("192.0.2.1", 4)]
    assert h.top(NODE, 0, "src") == [("10.0.0.1", 2)]
    assert h.top("c", 0, "dport", limit=1) == [("80", 7)]


def test_missing_history_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="nothere.db"):
        History(tmp_path / "nothere.db", readonly=True)
    with pytest.raises(StoreError, match="coarse"):
        History(tmp_path / "x.db", fine_retention=30, coarse=60)


class Counters:
    """An in-memory source: cumulative readings set by the test, like a data path's counters."""

    def __init__(self) -> None:
        self.reading = Reading("gen-1")

    def read(self) -> Reading:
        return self.reading


def test_collector_deltas_resets_and_generations():
    src = Counters()
    t = [100.0]
    c = Collector([src], clock=lambda: t[0], monotonic=lambda: t[0])
    src.reading = Reading("gen-1", {("a", EGRESS): (10, 1000)}, {("a", "x"): 2},
                          {"decap_forwarded": (10, 1200)})
    assert c.tick() is None                              # baseline: earlier counts not ours
    t[0] += 2
    src.reading = Reading("gen-1", {("a", EGRESS): (30, 3000)}, {("a", "x"): 5},
                          {"decap_forwarded": (30, 3600)})
    k = c.tick()
    assert (k.traffic[("a", EGRESS)], k.drops[("a", "x")], k.interval) == ((20, 2000), 3, 2.0)
    assert k.rates()[("a", EGRESS)] == (10.0, 8000.0)
    assert k.drop_rates()[("a", "x")] == 1.5
    t[0] += 1
    # same generation, counters went down: a reset; the new values are what was counted since
    src.reading = Reading("gen-1", {("a", EGRESS): (4, 400)}, {("a", "x"): 1}, {})
    k = c.tick()
    assert (k.traffic[("a", EGRESS)], k.drops[("a", "x")]) == ((4, 400), 1)
    t[0] += 1
    # a new generation whose counters are already above the old ones: still counted from zero
    src.reading = Reading("gen-2", {("a", EGRESS): (50, 5000)}, {}, {})
    k = c.tick()
    assert k.traffic[("a", EGRESS)] == (50, 5000)
    snap = c.snapshot()
    assert snap["traffic"][("a", EGRESS)] == (74, 7400)
    assert snap["drops"][("a", "x")] == 4


class Failing:
    def __init__(self) -> None:
        self.fail = True

    def read(self) -> Reading:
        if self.fail:
            raise FileNotFoundError(2, "no pinned map")
        return Reading("g", {("a", INGRESS): (7, 70)})


def test_source_down_is_counted_not_fatal():
    src = Failing()
    t = [0.0]
    c = Collector([src], clock=lambda: t[0], monotonic=lambda: t[0])
    c.tick()
    t[0] = 1
    assert c.tick().traffic == {}
    assert c.errors == {"Failing": 2}
    src.fail = False
    t[0] = 2
    # a source that comes up after the collector (a data plane started later) counts from zero
    assert c.tick().traffic == {("a", INGRESS): (7, 70)}
    t[0] = 3
    assert c.tick().traffic == {("a", INGRESS): (0, 0)}


def test_esp_source_directions_and_drops():
    stats = {"tunnels": {"t1": {"index": 4, "in": {"packets": 5, "bytes": 500,
                                                    "drops": {"replay": 2}},
                                "out": {"packets": 3, "bytes": 330, "drops": {}}, "sas": []}},
             "no_sa": {"unknown_spi": 6, "not_esp": 0}}
    r = EspSource(lambda: stats).read()
    assert r.traffic == {("t1", EGRESS): (5, 500), ("t1", INGRESS): (3, 330)}
    assert r.drops == {("t1", "esp_replay"): 2, (NODE, "esp_unknown_spi"): 6}
