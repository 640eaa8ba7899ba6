"""Rolling traffic history in SQLite: fine points (1 s) for a while, coarse points (1 min) for
long, sampled-header counts per minute, and a bound on the file's size.

Every point holds what was counted during its interval (packets, bytes, drops), not a rate: a
rate is the count divided by the resolution, and sums over any span stay exact. Coarse points
are rolled up from the fine ones once their interval is complete, so the two resolutions agree.

Bounded disk use (database, write-ahead log and its index together): the file is created with
``auto_vacuum = INCREMENTAL``; after the retention windows are applied, while the files are
above ``max_bytes`` (less room for the log to grow) the oldest tenth of the fine points (then
the coarse points, then the samples) is deleted and the freed pages are given back.
"""
from __future__ import annotations

import sqlite3
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .collector import EGRESS, INGRESS, NODE, Tick

FINE = 1
WAL_PAGES = 16
_SCHEMA = """
CREATE TABLE IF NOT EXISTS traffic (
    res INTEGER NOT NULL, ts INTEGER NOT NULL, tunnel TEXT NOT NULL, direction TEXT NOT NULL,
    packets INTEGER NOT NULL, bytes INTEGER NOT NULL,
    PRIMARY KEY (res, ts, tunnel, direction)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS drops (
    res INTEGER NOT NULL, ts INTEGER NOT NULL, tunnel TEXT NOT NULL, reason TEXT NOT NULL,
    packets INTEGER NOT NULL,
    PRIMARY KEY (res, ts, tunnel, reason)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS samples (
    minute INTEGER NOT NULL, tunnel TEXT NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (minute, tunnel, kind, key)) WITHOUT ROWID;
"""


class StoreError(RuntimeError):
    """The history file cannot be opened or used; the message names it."""


@dataclass(frozen=True)
class Point:
    ts: int
    res: int
    in_packets: int     # ingress: to the customer
    in_bytes: int
    out_packets: int    # egress: from the customer
    out_bytes: int
    drops: int

    @property
    def in_pps(self) -> float:
        return self.in_packets / self.res

    @property
    def out_pps(self) -> float:
        return self.out_packets / self.res

    @property
    def in_bps(self) -> float:
        return 8 * self.in_bytes / self.res

    @property
    def out_bps(self) -> float:
        return 8 * self.out_bytes / self.res

    @property
    def drop_pps(self) -> float:
        return self.drops / self.res


class History:
    """The history file. ``coarse`` is the coarse resolution in seconds (the config's
    ``history_interval``), kept ``coarse_retention`` seconds; fine points ``fine_retention``."""

    def __init__(self, path: str | Path, *, fine_retention: int = 3600, coarse: int = 60,
                 coarse_retention: int = 30 * 86400, max_bytes: int = 256 << 20,
                 tunnel_names: dict[int, str] | None = None, readonly: bool = False) -> None:
        if coarse < 2 or fine_retention < coarse:
            raise StoreError(f"{path}: coarse resolution {coarse} s must be at least 2 s and "
                             f"fine points must be kept at least that long ({fine_retention} s)")
        self.path = Path(path)
        self.fine_retention, self.coarse = fine_retention, coarse
        self.coarse_retention, self.max_bytes = coarse_retention, max_bytes
        self.tunnel_names = dict(tunnel_names or {})
        self.lock = threading.Lock()
        try:
            if readonly:
                self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10,
                                          check_same_thread=False)
            else:
                self.db = sqlite3.connect(self.path, timeout=10, check_same_thread=False)
                self.db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # before the first table
                # WAL with synchronous=NORMAL: a commit a second without an fsync each; the
                # write-ahead log is checkpointed every WAL_PAGES pages and cut back to that size
                self.db.execute("PRAGMA journal_mode = WAL")
                self.db.execute("PRAGMA synchronous = NORMAL")
                self.db.execute(f"PRAGMA wal_autocheckpoint = {WAL_PAGES}")
                self.page_size = self.db.execute("PRAGMA page_size").fetchone()[0]
                self.db.execute(f"PRAGMA journal_size_limit = {WAL_PAGES * self.page_size}")
                self.db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise StoreError(f"analytics history {self.path}: {e}") from None
        self._rolled: int | None = None
        if not readonly:
            row = self.db.execute("SELECT MAX(ts) FROM traffic WHERE res = ?",
                                  (coarse,)).fetchone()
            self._rolled = row[0] + coarse if row[0] is not None else None

    @classmethod
    def for_config(cls, cfg, readonly: bool = False) -> History:
        a = cfg.analytics
        return cls(a.history_file, fine_retention=a.fine_retention, coarse=a.history_interval,
                   coarse_retention=a.history_retention, max_bytes=a.history_max_bytes,
                   tunnel_names={t.index: t.name for t in cfg.tunnels}, readonly=readonly)

    def close(self) -> None:
        self.db.close()

    # --- writing ---------------------------------------------------------------------------
    def __call__(self, tick: Tick) -> None:
        """A collector sink: file the tick, roll up completed coarse intervals, prune."""
        self.add(tick)

    def add(self, tick: Tick) -> None:
        ts = int(tick.ts)
        with self.lock, self.db:
            self.db.executemany(
                "INSERT INTO traffic VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
                "packets = packets + excluded.packets, bytes = bytes + excluded.bytes",
                [(FINE, ts, t, d, p, b) for (t, d), (p, b) in tick.traffic.items()])
            self.db.executemany(
                "INSERT INTO drops VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
                "packets = packets + excluded.packets",
                [(FINE, ts, t, r, n) for (t, r), n in tick.drops.items() if n])
            self._add_samples(tick.samples)
            if self._rolled is None:
                self._rolled = ts // self.coarse * self.coarse
            done = ts // self.coarse * self.coarse
            if done > self._rolled:
                self._rollup(self._rolled, done)
                self._rolled = done
                self._prune(ts)
        self.enforce_bound()

    def _add_samples(self, counts: Counter) -> None:
        rows = []
        for (minute, index, kind, key), n in counts.items():
            name = NODE if index == 0 else self.tunnel_names.get(index, f"index-{index}")
            rows.append((minute, name, kind, key, n))
        self.db.executemany(
            "INSERT INTO samples VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
            "count = count + excluded.count", rows)

    def add_samples(self, counts: Counter) -> None:
        with self.lock, self.db:
            self._add_samples(counts)

    def _rollup(self, start: int, end: int) -> None:
        c = self.coarse
        self.db.execute(
            "INSERT INTO traffic SELECT ?, ts / ? * ?, tunnel, direction, SUM(packets), "
            "SUM(bytes) FROM traffic WHERE res = ? AND ts >= ? AND ts < ? "
            "GROUP BY ts / ?, tunnel, direction ON CONFLICT DO UPDATE SET "
            "packets = packets + excluded.packets, bytes = bytes + excluded.bytes",
            (c, c, c, FINE, start, end, c))
        self.db.execute(
            "INSERT INTO drops SELECT ?, ts / ? * ?, tunnel, reason, SUM(packets) "
            "FROM drops WHERE res = ? AND ts >= ? AND ts < ? "
            "GROUP BY ts / ?, tunnel, reason ON CONFLICT DO UPDATE SET "
            "packets = packets + excluded.packets", (c, c, c, FINE, start, end, c))

    def _prune(self, now: int) -> None:
        for table in ("traffic", "drops"):
            self.db.execute(f"DELETE FROM {table} WHERE res = ? AND ts < ?",
                            (FINE, now - self.fine_retention))
            self.db.execute(f"DELETE FROM {table} WHERE res = ? AND ts < ?",
                            (self.coarse, now - self.coarse_retention))
        self.db.execute("DELETE FROM samples WHERE minute < ?", (now - self.coarse_retention,))

    def size(self) -> int:
        """Bytes on disk: the database's pages (in use and free ones not yet given back), the
        write-ahead log and its index."""
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        logs = sum(p.stat().st_size for p in (Path(f"{self.path}-wal"), Path(f"{self.path}-shm"))
                   if p.exists())
        return pages * self.db.execute("PRAGMA page_size").fetchone()[0] + logs

    def enforce_bound(self) -> int:
        """Delete the oldest points until database and log are below 80% of ``max_bytes`` (the
        next ticks need room below the bound: the log grows by up to WAL_PAGES pages before a
        checkpoint). Returns how many deletion rounds it took."""
        rounds = 0
        with self.lock:
            limit = self.max_bytes - 2 * WAL_PAGES * 4096
            if self.size() <= limit:
                return 0
            while self.size() > limit * 0.8 and self._delete_oldest():
                self.db.execute("PRAGMA incremental_vacuum").fetchall()  # one page per row
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                rounds += 1
        return rounds

    def _delete_oldest(self) -> bool:
        with self.db:
            for table, where, col in (("traffic", "res = 1", "ts"), ("drops", "res = 1", "ts"),
                                      ("traffic", "res > 1", "ts"), ("drops", "res > 1", "ts"),
                                      ("samples", "1", "minute")):
                lo, hi = self.db.execute(
                    f"SELECT MIN({col}), MAX({col}) FROM {table} WHERE {where}").fetchone()
                if lo is None:
                    continue
                cut = lo + max(1, (hi - lo) // 10)
                self.db.execute(f"DELETE FROM {table} WHERE {where} AND {col} < ?",
                                (cut,))
                if table != "samples" and where == "res = 1":
                    other = "drops" if table == "traffic" else "traffic"
                    self.db.execute(f"DELETE FROM {other} WHERE res = 1 AND ts < ?",
                                    (cut,))
                return True
        return False

    # --- reading ---------------------------------------------------------------------------
    def resolution_for(self, since_seconds: int) -> int:
        """Fine points when the span fits in what is kept of them, else coarse."""
        return FINE if since_seconds <= self.fine_retention else self.coarse

    def points(self, tunnel: str, since: int, until: int | None = None,
               res: int = FINE) -> list[Point]:
        """The tunnel's points with since <= ts (< until), oldest first; intervals with no
        traffic and no drops have no point."""
        until = until if until is not None else 1 << 62
        with self.lock:
            rows = self.db.execute(
                "SELECT ts, direction, packets, bytes FROM traffic WHERE res = ? AND tunnel = ? "
                "AND ts >= ? AND ts < ?", (res, tunnel, since, until)).fetchall()
            drops = self.db.execute(
                "SELECT ts, SUM(packets) FROM drops WHERE res = ? AND tunnel = ? AND ts >= ? "
                "AND ts < ? GROUP BY ts", (res, tunnel, since, until)).fetchall()
        by_ts: dict[int, list[int]] = {}
        for ts, d, p, b in rows:
            v = by_ts.setdefault(ts, [0, 0, 0, 0, 0])
            if d == INGRESS:
                v[0] += p
                v[1] += b
            elif d == EGRESS:
                v[2] += p
                v[3] += b
        for ts, n in drops:
            by_ts.setdefault(ts, [0, 0, 0, 0, 0])[4] += n
        return [Point(ts, res, *v) for ts, v in sorted(by_ts.items())
                if any(v)]

    def drops(self, tunnel: str, since: int, until: int | None = None,
              res: int = FINE) -> dict[str, int]:
        until = until if until is not None else 1 << 62
        with self.lock:
            rows = self.db.execute(
                "SELECT reason, SUM(packets) FROM drops WHERE res = ? AND tunnel = ? AND ts >= ? "
                "AND ts < ? GROUP BY reason", (res, tunnel, since, until)).fetchall()
        return {r: n for r, n in rows}

    def top(self, tunnel: str, since: int, kind: str, limit: int = 10) -> list[tuple[str, int]]:
        """The most frequent keys of one kind (src, dport, proto, tcp_flags, samples,
        drop_reason) among the tunnel's samples since ``since`` (minute granularity)."""
        with self.lock:
            return [(k, n) for k, n in self.db.execute(
                "SELECT key, SUM(count) AS n FROM samples WHERE tunnel = ? AND kind = ? "
                "AND minute >= ? GROUP BY key ORDER BY n DESC, key LIMIT ?",
                (tunnel, kind, since // 60 * 60, limit))]

    def tunnels(self) -> list[str]:
        with self.lock:
            return [r[0] for r in self.db.execute("SELECT DISTINCT tunnel FROM traffic")]
