"""SQLite backend specifics: WAL, file mode, several processes on one file, compaction."""
from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from pipeline.store import CompactedError, Resync, StoreError, WatchClosed
from pipeline.store.sqlite import SqliteStore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def drain(watch, until_revision, timeout=20.0):
    out = []
    deadline = time.monotonic() + timeout
    while not out or out[-1].revision < until_revision:
        left = deadline - time.monotonic()
        assert left > 0, f"watch at {watch.revision}, wanted {until_revision}"
        out.extend(watch.get(min(left, 0.5)))
    return out


def test_wal_mode_and_owner_only_files(tmp_path):
    path = tmp_path / "state.db"
    with SqliteStore(path) as s:
        s.put("/k", b"v")
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
        for f in (path, tmp_path / "state.db-wal"):
            assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f


def test_other_process_writes_reach_watch(tmp_path):
    """Two processes write the same file at once; a watch in a third handle sees all 200 writes,
    once each, with contiguous revisions."""
    path = tmp_path / "state.db"
    s = SqliteStore(path)
    w = s.watch("/sa/", 1)
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {REPO!r})
        from pipeline.store.sqlite import SqliteStore
        s = SqliteStore({str(path)!r})
        for i in range(100):
            s.put(f"/sa/child/{{i:03d}}", b"c%d" % i)
        s.close()
        """)])
    for i in range(100):
        s.put(f"/sa/parent/{i:03d}", b"p%d" % i)
    assert child.wait(60) == 0
    assert s.revision() == 200
    got = drain(w, 200)
    assert [e.revision for e in got] == list(range(1, 201))
    assert {e.key for e in got} == {f"/sa/{who}/{i:03d}" for who in ("child", "parent")
                                    for i in range(100)}
    w.close()
    s.close()


def test_watch_wakes_without_inotify(tmp_path):
    with SqliteStore(tmp_path / "s.db") as s:
        w = s.watch("/a/", 1)
        w._notifier.close()               # as on a system without inotify: polling only
        r = s.put("/a/x", b"1")
        assert [(e.key, e.revision) for e in drain(w, r)] == [("/a/x", r)]


def test_watch_behind_compaction_resyncs(tmp_path):
    """A watcher that fell behind a compaction gets the whole prefix, then new events."""
    with SqliteStore(tmp_path / "s.db") as s:
        r1 = s.put("/p/a", b"1")
        w = s.watch("/p/", r1 + 1)
        s.put("/p/a", b"2")
        s.put("/p/b", b"3")
        s.delete("/p/a")
        s.put("/q/other", b"x")
        s.compact(s.revision())
        got = w.get(5.0)
        assert len(got) == 1 and isinstance(got[0], Resync)
        assert [(r.key, r.value) for r in got[0].records] == [("/p/b", b"3")]
        assert got[0].revision == s.revision()
        r = s.put("/p/c", b"4")
        assert [(e.key, e.revision) for e in drain(w, r)] == [("/p/c", r)]
        w.close()


def test_quiet_prefix_is_not_resynced_by_others_compaction(tmp_path):
    with SqliteStore(tmp_path / "s.db") as s:
        w = s.watch("/p/", 1)
        assert w.get(0.1) == []
        for i in range(10):
            s.put(f"/q/{i}", b"x")
        assert w.get(0.2) == []           # the watch covers revisions it had nothing to report
        s.compact(s.revision())
        r = s.put("/p/a", b"1")
        got = drain(w, r)
        assert [type(x).__name__ for x in got] == ["Event"]


def test_automatic_compaction_bounds_the_log(tmp_path):
    with SqliteStore(tmp_path / "s.db", retain_revisions=10, compact_every=5) as s:
        for i in range(30):
            s.put(f"/k/{i % 3}", b"%d" % i)
        with pytest.raises(CompactedError):
            s.list("/k/", 5)
        at = s.list("/k/", 20)
        assert [(r.key, r.value) for r in at.records] == \
            [("/k/0", b"18"), ("/k/1", b"19"), ("/k/2", b"17")]
        conn = sqlite3.connect(tmp_path / "s.db")
        # Compacted at revision 30 - 10 = 20 (the 30th write): rows 20..30 stay, and below 20 only
        # each key's latest row (what a list at revision 20 reads).
        assert conn.execute("SELECT rev FROM log ORDER BY rev").fetchall() == \
            [(r,) for r in (17, 18, 19, *range(20, 31))]
        conn.close()


def test_closed_store_and_bad_file(tmp_path):
    s = SqliteStore(tmp_path / "s.db")
    w = s.watch("/a/", 1)
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.put("/a/x", b"1")
    with pytest.raises(WatchClosed):
        w.get(0.1)
    with pytest.raises(StoreError, match="cannot create: No such file or directory"):
        SqliteStore(tmp_path / "no-such-dir" / "s.db")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="junk.db"):
        SqliteStore(junk)
    with SqliteStore(tmp_path / "t.db") as t, \
            pytest.raises(StoreError, match="beyond the current revision"):
        t.compact(5)


def test_open_store_from_config(tmp_path):
    from pipeline import config as C
    from pipeline.store import open_store
    from pipeline.store.etcd import EtcdStore
    with open_store(C.SqliteState(tmp_path / "cfg.db")) as s:
        assert isinstance(s, SqliteStore) and s.put("/a", b"1") == 1
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"")
    e = open_store(C.EtcdState(("https://127.0.0.1:1",), None, tmp_path / "f", ca,
                               None, None))
    assert isinstance(e, EtcdStore) and e.targets == ["127.0.0.1:1"]
    e.close()
    with pytest.raises(StoreError, match="unknown state backend"):
        open_store(object())
