"""The collector: every counter of the data path, once a second, as deltas, totals and rates.

Sources are read each tick and return a :class:`Reading` (cumulative counters as the data path
keeps them):

- :class:`XdpSource` reads the XDP program's per-CPU maps (``xt_tunnel_stats``,
  ``xt_reason_stats``, ``xt_tunnel_drops``; bpf/maps.h) through the pins of a running data
  plane (``/sys/fs/bpf/xtransit/<node>/``) or through open map fds, and sums the per-CPU values
  with numpy;
- :class:`EspSource` wraps a callable returning ``IpsecDataPath.stats()`` (pipeline/ipsec.py):
  per-tunnel packets, bytes and drops by reason of the native ESP module's SAs.

Directions, named from the customer's side: ``egress`` is traffic leaving the customer through
the tunnel (GRE decapsulated, ESP decrypted: customer -> Internet), ``ingress`` is traffic to the
customer (GRE encapsulated, ESP encrypted).

Counter resets: a restarted data plane starts its counters at zero. A source reports a
``generation`` that changes when its counters were recreated (a new pin, a new program); on a
change, and whenever a counter is below its previous value, the delta is the new value itself
(what was counted since the restart), never negative.
"""
from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np

from ..xdp import maps as _maps
from ..xdp import reasons as _reasons

log = logging.getLogger(__name__)

INGRESS, EGRESS = "ingress", "egress"
DIRECTIONS = (INGRESS, EGRESS)
NODE = ""        # the tunnel label of node-wide reason counters


@dataclass
class Reading:
    """Cumulative counters of one source at one moment."""
    generation: object
    traffic: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    # (tunnel, direction) -> (packets, bytes)
    drops: dict[tuple[str, str], int] = field(default_factory=dict)
    # (tunnel, reason) -> packets; tunnel NODE for node-wide drops without a tunnel
    reasons: dict[str, tuple[int, int]] = field(default_factory=dict)
    # node-wide: reason -> (packets, bytes), every verdict (forwarded included)


def _percpu(raw: bytes, fields: int, ncpu: int) -> np.ndarray:
    """Sum per-CPU u64 values: ``raw`` is ncpu slots of ``fields`` u64 each."""
    return np.frombuffer(raw, dtype=np.uint64, count=fields * ncpu).reshape(ncpu, fields).sum(
        axis=0, dtype=np.uint64)


class XdpSource:
    """The XDP program's counters. ``tunnels`` maps tunnel index -> name (the config's).

    Either ``pin_dir`` (a running data plane's pins, reopened every read so a restarted data
    plane is followed) or ``fds`` (map name -> fd, e.g. ``Program.map_fds()``, with
    ``generation`` naming the program)."""

    def __init__(self, tunnels: dict[int, str], *, pin_dir: Path | None = None,
                 fds: dict[str, int] | None = None, generation: object = None) -> None:
        if (pin_dir is None) == (fds is None):
            raise ValueError("XdpSource needs exactly one of pin_dir and fds")
        self.tunnels = dict(tunnels)
        self.pin_dir, self.fds, self._generation = pin_dir, fds, generation
        self.ncpu = _maps.possible_cpus()
        self.reason_names = _reasons.load()
        self.drop_reasons = {r.name for r in self.reason_names.by_number.values()
                             if r.verdict == "drop"}

    @classmethod
    def for_config(cls, cfg, pin_root: Path = _maps.PIN_ROOT) -> XdpSource:
        return cls({t.index: t.name for t in cfg.tunnels},
                   pin_dir=_maps.pin_dir(cfg.node.name, pin_root))

    def _open(self) -> tuple[dict[str, int], object, bool]:
        if self.fds is not None:
            return self.fds, self._generation, False
        fds: dict[str, int] = {}
        try:
            for name in _maps.COUNTER_MAPS:
                fds[name] = _maps.open_pinned(self.pin_dir / name)
            st = os.stat(self.pin_dir / "xt_tunnel_stats")
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        return fds, (st.st_ino, st.st_ctime_ns), True

    def read(self) -> Reading:
        fds, gen, owned = self._open()
        try:
            return self._read(fds, gen)
        finally:
            if owned:
                for fd in fds.values():
                    with contextlib.suppress(OSError):
                        os.close(fd)

    def _read(self, fds: dict[str, int], gen: object) -> Reading:
        n, rs = self.ncpu, self.reason_names
        out = Reading(gen)
        for idx, name in self.tunnels.items():
            raw = _maps.lookup(fds["xt_tunnel_stats"], struct.pack("=I", idx), 32 * n)
            if raw is None:
                continue
            dp, db, ep, eb = (int(v) for v in _percpu(raw, 4, n))
            out.traffic[(name, EGRESS)] = (dp, db)       # decap: from the customer
            out.traffic[(name, INGRESS)] = (ep, eb)      # encap: to the customer
        for num in range(rs.max):
            raw = _maps.lookup(fds["xt_reason_stats"], struct.pack("=I", num), 16 * n)
            if raw is not None:
                p, b = (int(v) for v in _percpu(raw, 2, n))
                if p:
                    out.reasons[rs.name(num)] = (p, b)
        drops_fd = fds["xt_tunnel_drops"]
        for k in _maps.keys(drops_fd, 8):
            idx, reason = struct.unpack("=II", k)
            raw = _maps.lookup(drops_fd, k, 8 * n)
            if raw is None:
                continue
            name = self.tunnels.get(idx, f"index-{idx}")
            key = (name, rs.name(reason))
            out.drops[key] = out.drops.get(key, 0) + int(_percpu(raw, 1, n)[0])
        # drops the program could not pin on a tunnel (unknown tunnel, malformed outer header)
        attributed: dict[str, int] = {}
        for (_t, r), v in out.drops.items():
            attributed[r] = attributed.get(r, 0) + v
        for r, (p, _b) in out.reasons.items():
            if r in self.drop_reasons and p > attributed.get(r, 0):
                out.drops[(NODE, r)] = p - attributed.get(r, 0)
        return out


class EspSource:
    """The native ESP module's counters through ``stats()`` (``IpsecDataPath.stats``)."""

    def __init__(self, stats: Callable[[], dict[str, Any]], generation: object = None) -> None:
        self.stats = stats
        self.generation = generation if generation is not None else id(stats)

    def read(self) -> Reading:
        s = self.stats()
        out = Reading(self.generation)
        for name, t in s.get("tunnels", {}).items():
            # "in": decrypted, from the customer; "out": encrypted, to the customer
            for d, direction in (("in", EGRESS), ("out", INGRESS)):
                c = t.get(d, {})
                out.traffic[(name, direction)] = (int(c.get("packets", 0)),
                                                  int(c.get("bytes", 0)))
                for reason, v in c.get("drops", {}).items():
                    key = (name, f"esp_{reason}")
                    out.drops[key] = out.drops.get(key, 0) + int(v)
        for reason, v in (s.get("no_sa") or {}).items():
            if v:
                out.drops[(NODE, f"esp_{reason}")] = int(v)
        return out


@dataclass
class Tick:
    """One collection: what happened since the previous one."""
    ts: float                                        # wall clock (seconds)
    interval: float                                  # seconds since the previous tick
    traffic: dict[tuple[str, str], tuple[int, int]]  # (tunnel, direction) -> (packets, bytes)
    drops: dict[tuple[str, str], int]                # (tunnel, reason) -> packets
    reasons: dict[str, tuple[int, int]]              # node-wide reason -> (packets, bytes)
    samples: Counter = field(default_factory=Counter)
    # (minute, tunnel index, kind, key) -> sampled frames (samples.Mix)

    def rates(self) -> dict[tuple[str, str], tuple[float, float]]:
        """(tunnel, direction) -> (packets per second, bits per second)."""
        return {k: (p / self.interval, 8 * b / self.interval) for k, (p, b) in
                self.traffic.items()} if self.interval > 0 else {}

    def drop_rates(self) -> dict[tuple[str, str], float]:
        return {k: v / self.interval for k, v in self.drops.items()} if self.interval > 0 else {}


def _delta(cur: int, prev: int | None) -> int:
    """Counter increase; a counter below its previous value was reset and counts from zero."""
    if prev is None or cur < prev:
        return cur
    return cur - prev


class Collector:
    """Reads its sources each tick; keeps monotonic totals (for Prometheus) and hands each
    :class:`Tick` to the sinks (the history store). ``tick()`` is one collection; ``start()``
    runs it once a second in a thread until ``close()``."""

    def __init__(self, sources: Iterable, *, interval: float = 1.0,
                 sinks: Iterable[Callable[[Tick], None]] = (),
                 samplers: Iterable = (),
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.sources = list(sources)
        self.interval = interval
        self.sinks = list(sinks)
        self.samplers = list(samplers)     # samples.Sampler: drained every tick
        self.clock, self.monotonic = clock, monotonic
        self.lock = threading.Lock()
        self.totals_traffic: dict[tuple[str, str], list[int]] = {}
        self.totals_drops: dict[tuple[str, str], int] = {}
        self.totals_reasons: dict[str, list[int]] = {}
        self.errors: dict[str, int] = {}
        self.last: Tick | None = None
        self._prev: list[Reading | None] = [None] * len(self.sources)
        self._t_prev: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- one collection --------------------------------------------------------------------
    def tick(self) -> Tick | None:
        """Read every source and account the increase since the previous tick. The first tick
        only sets the baseline (returns None): counts from before the collector started are
        not attributed to its first second."""
        now_m, now = self.monotonic(), self.clock()
        readings: list[Reading | None] = []
        for src in self.sources:
            try:
                readings.append(src.read())
            except OSError as e:          # the data plane is not running (yet, or restarting)
                key = type(src).__name__
                if not self.errors.get(key):
                    log.warning("analytics: cannot read %s: %s", key, e)
                self.errors[key] = self.errors.get(key, 0) + 1
                readings.append(None)
        first = self._t_prev is None
        interval = 0.0 if first else now_m - self._t_prev
        self._t_prev = now_m
        traffic: dict[tuple[str, str], list[int]] = {}
        drops: dict[tuple[str, str], int] = {}
        reasons: dict[str, list[int]] = {}
        for i, r in enumerate(readings):
            if r is None:
                continue       # keep the previous reading: the next good one counts from it
            prev = self._prev[i]
            self._prev[i] = r
            if first:
                continue
            if prev is None or prev.generation != r.generation:
                prev = Reading(r.generation)      # recreated counters: all of it is new
            for k, (p, b) in r.traffic.items():
                pp, pb = prev.traffic.get(k, (None, None))
                acc = traffic.setdefault(k, [0, 0])
                acc[0] += _delta(p, pp)
                acc[1] += _delta(b, pb)
            for k, v in r.drops.items():
                drops[k] = drops.get(k, 0) + _delta(v, prev.drops.get(k))
            for k, (p, b) in r.reasons.items():
                pp, pb = prev.reasons.get(k, (None, None))
                acc = reasons.setdefault(k, [0, 0])
                acc[0] += _delta(p, pp)
                acc[1] += _delta(b, pb)
        for sampler in self.samplers:
            sampler.drain()
        if first:
            return None          # samples stay in the samplers' mix for the next tick
        mix: Counter = Counter()
        for sampler in self.samplers:
            mix.update(sampler.mix.take())
        tick = Tick(now, interval, {k: (v[0], v[1]) for k, v in traffic.items()}, drops,
                    {k: (v[0], v[1]) for k, v in reasons.items()}, mix)
        with self.lock:
            for k, (p, b) in tick.traffic.items():
                t = self.totals_traffic.setdefault(k, [0, 0])
                t[0] += p
                t[1] += b
            for k, v in drops.items():
                self.totals_drops[k] = self.totals_drops.get(k, 0) + v
            for k, (p, b) in tick.reasons.items():
                t = self.totals_reasons.setdefault(k, [0, 0])
                t[0] += p
                t[1] += b
            self.last = tick
        for sink in self.sinks:
            sink(tick)
        return tick

    def snapshot(self) -> dict[str, Any]:
        """Totals since the collector started, and the last tick's rates (a consistent copy)."""
        with self.lock:
            return {"traffic": {k: tuple(v) for k, v in self.totals_traffic.items()},
                    "drops": dict(self.totals_drops),
                    "reasons": {k: tuple(v) for k, v in self.totals_reasons.items()},
                    "rates": self.last.rates() if self.last else {},
                    "drop_rates": self.last.drop_rates() if self.last else {}}

    # --- the loop --------------------------------------------------------------------------
    def start(self) -> Collector:
        self.tick()
        self._thread = threading.Thread(target=self._loop, name="xtransit-analytics",
                                        daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        nxt = self.monotonic() + self.interval
        while not self._stop.wait(max(0.0, nxt - self.monotonic())):
            self.tick()
            nxt += self.interval
            if nxt < self.monotonic():          # fell behind (suspended): skip, don't burst
                nxt = self.monotonic() + self.interval

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
