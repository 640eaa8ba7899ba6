"""One conformance suite for every store backend: SQLite (a fresh file per test) and etcd (a real
3-member TLS cluster on loopback, one per module; each test works under its own key prefix).

Revisions are checked relative to the store's revision before the test (etcd starts at 1 and
is shared by the module's tests), never against timing.
"""
from __future__ import annotations

import itertools
import threading
import time

import pytest
from etcd_cluster import EtcdCluster, require_etcd

from pipeline.store import DELETE, PUT, CompactedError, Event, Resync, StoreError, WatchClosed
from pipeline.store.sqlite import SqliteStore

_counter = itertools.count()


@pytest.fixture(scope="module")
def etcd_cluster(tmp_path_factory):
    require_etcd()
    with EtcdCluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


class Backend:
    """Opens handles on one store: ``open()`` again gives a second, independent client (another
    node's view of the same data)."""

    def __init__(self, kind, opener):
        self.kind = kind
        self._opener = opener
        self._handles = []

    def open(self):
        h = self._opener()
        self._handles.append(h)
        return h

    def close(self):
        for h in self._handles:
            h.close()


@pytest.fixture(params=["sqlite", "etcd"])
def backend(request, tmp_path):
    if request.param == "sqlite":
        path = tmp_path / "state.db"
        b = Backend("sqlite", lambda: SqliteStore(path))
    else:
        cluster = request.getfixturevalue("etcd_cluster")
        b = Backend("etcd", cluster.client)
    yield b
    b.close()


@pytest.fixture
def store(backend):
    return backend.open()


@pytest.fixture
def p():
    """A key prefix of this test's own."""
    return f"/conf/{next(_counter)}/"


def drain(watch, until_revision, timeout=10.0):
    """Items from ``watch`` until one has revision >= ``until_revision``."""
    out = []
    deadline = time.monotonic() + timeout
    while not out or out[-1].revision < until_revision:
        left = deadline - time.monotonic()
        assert left > 0, f"watch stopped at {out[-1].revision if out else None}, " \
                         f"wanted {until_revision}: {out}"
        out.extend(watch.get(min(left, 1.0)))
    return out


def test_put_get_versions(store, p):
    r0 = store.revision()
    assert store.get(p + "a") is None
    r1 = store.put(p + "a", b"one")
    assert r1 == r0 + 1 == store.revision()
    rec = store.get(p + "a")
    assert (rec.key, rec.value, rec.create_revision, rec.mod_revision, rec.version) == \
        (p + "a", b"one", r1, r1, 1)
    r2 = store.put(p + "a", b"\x00two\xff")
    rec = store.get(p + "a")
    assert (rec.value, rec.create_revision, rec.mod_revision, rec.version) == \
        (b"\x00two\xff", r1, r2, 2)
    assert r2 == r1 + 1
    assert store.put(p + "empty", b"") == r2 + 1
    assert store.get(p + "empty").value == b""


def test_delete(store, p):
    r1 = store.put(p + "a", b"1")
    res = store.delete(p + "a")
    assert (res.ok, res.revision) == (True, r1 + 1)
    assert store.get(p + "a") is None
    again = store.delete(p + "a")
    assert (again.ok, again.current) == (False, None)
    assert store.revision() == r1 + 1          # deleting nothing takes no revision
    # Conditional delete.
    r3 = store.put(p + "b", b"2")
    stale = store.delete(p + "b", expected_revision=r3 - 1)
    assert stale.ok is False and stale.current.mod_revision == r3
    assert store.get(p + "b").value == b"2"
    ok = store.delete(p + "b", expected_revision=r3)
    assert (ok.ok, ok.revision) == (True, r3 + 1)
    # A re-created key starts a new life: new create_revision, version 1.
    r5 = store.put(p + "a", b"again")
    rec = store.get(p + "a")
    assert (rec.create_revision, rec.version) == (r5, 1)


def test_cas(store, p):
    k = p + "ike"
    created = store.cas(k, b"v1", 0)                 # 0: only if absent
    assert created.ok and created.revision == store.get(k).mod_revision
    dup = store.cas(k, b"other", 0)
    assert (dup.ok, dup.current.value, dup.current.mod_revision) == \
        (False, b"v1", created.revision)
    upd = store.cas(k, b"v2", created.revision)
    assert upd.ok and upd.revision == created.revision + 1
    stale = store.cas(k, b"v3", created.revision)    # someone else's revision by now
    assert (stale.ok, stale.current.value, stale.current.version) == (False, b"v2", 2)
    assert store.get(k).value == b"v2"
    # CAS on an absent key with a non-zero expectation fails, reporting absence.
    gone = store.cas(p + "nothing", b"x", 5)
    assert (gone.ok, gone.current) == (False, None)
    assert store.get(p + "nothing") is None


def test_cas_race_two_nodes(backend, p):
    """Two nodes read the same revision and both try to update: exactly one wins, the other
    learns the winner's value; nothing is silently overwritten."""
    a, b = backend.open(), backend.open()
    k = p + "ike"
    base = a.cas(k, b"state-0", 0).revision
    results = {}
    barrier = threading.Barrier(2)

    def go(name, s):
        barrier.wait()
        results[name] = s.cas(k, f"state-{name}".encode(), base)
    threads = [threading.Thread(target=go, args=(n, s)) for n, s in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [n for n, r in results.items() if r.ok]
    assert len(winners) == 1
    loser = "b" if winners[0] == "a" else "a"
    assert results[loser].current.value == f"state-{winners[0]}".encode()
    assert a.get(k).value == f"state-{winners[0]}".encode()
    assert a.get(k).version == 2


def test_list_prefix_and_past_revision(store, p):
    store.put(p + "b", b"B1")
    store.put(p + "a", b"A1")
    store.put(p[:-1] + "x", b"sibling")               # same start, not under the prefix
    store.put(p + "sub/c", b"C1")
    mid = store.revision()
    store.put(p + "a", b"A2")
    store.delete(p + "b")
    now = store.list(p)
    assert now.revision == store.revision()
    assert [(r.key, r.value) for r in now.records] == [(p + "a", b"A2"), (p + "sub/c", b"C1")]
    old = store.list(p, mid)
    assert old.revision == mid
    assert [(r.key, r.value, r.version) for r in old.records] == \
        [(p + "a", b"A1", 1), (p + "b", b"B1", 1), (p + "sub/c", b"C1", 1)]
    assert [r.key for r in store.list(p + "sub/").records] == [p + "sub/c"]
    assert store.list(p + "none/").records == ()
    with pytest.raises(StoreError, match="future"):
        store.list(p, store.revision() + 1000)


def test_watch_delivers_each_change_once_in_order(store, p):
    start = store.revision() + 1
    with store.watch(p, start) as w:
        store.put(p + "a", b"1")
        store.put("/elsewhere" + p, b"not ours")
        store.put(p + "b", b"2")
        store.put(p + "a", b"3")
        last = store.delete(p + "b").revision
        got = drain(w, last)
        assert [(e.kind, e.key, e.value, e.revision) for e in got] == [
            (PUT, p + "a", b"1", start),
            (PUT, p + "b", b"2", start + 2),
            (PUT, p + "a", b"3", start + 3),
            (DELETE, p + "b", None, start + 4),
        ]
        assert (got[2].create_revision, got[2].version) == (start, 2)
        assert w.revision == last
        assert w.get(0.2) == []                     # nothing more, nothing repeated


def test_watch_from_past_revision_replays_history(store, p):
    r1 = store.put(p + "a", b"1")
    store.put(p + "a", b"2")
    r3 = store.put(p + "b", b"3")
    with store.watch(p, r1 + 1) as w:
        got = drain(w, r3)
    assert [(e.key, e.value, e.revision) for e in got] == [(p + "a", b"2", r1 + 1),
                                                          (p + "b", b"3", r3)]


def test_watch_many_writes_from_two_clients(backend, p):
    """200 writes from two clients interleaved: the watcher on a third sees each once."""
    a, b, watcher = backend.open(), backend.open(), backend.open()
    start = watcher.revision() + 1
    w = watcher.watch(p, start)
    revs = {}

    def write(s, name):
        for i in range(100):
            revs[(name, i)] = s.put(f"{p}{name}/{i:03d}", f"{name}{i}".encode())
    ta = threading.Thread(target=write, args=(a, "a"))
    tb = threading.Thread(target=write, args=(b, "b"))
    ta.start(), tb.start()
    ta.join(), tb.join()
    got = drain(w, max(revs.values()))
    w.close()
    assert len(got) == 200
    assert [e.revision for e in got] == sorted(revs.values())
    assert {(e.key, e.value) for e in got} == \
        {(f"{p}{n}/{i:03d}", f"{n}{i}".encode()) for n in "ab" for i in range(100)}


def test_compaction(store, p):
    r1 = store.put(p + "a", b"1")
    store.put(p + "b", b"x")
    store.delete(p + "b")
    r4 = store.put(p + "a", b"2")
    store.put(p + "c", b"3")
    store.compact(r4)
    with pytest.raises(CompactedError):
        store.list(p, r1)
    at = store.list(p, r4)                          # the compaction revision stays readable
    assert [(r.key, r.value) for r in at.records] == [(p + "a", b"2")]
    # A watch from before the compaction starts with a re-read of the whole prefix.
    now = store.revision()
    with store.watch(p, r1) as w:
        first = w.get(5.0)
        assert isinstance(first[0], Resync)
        assert first[0].revision >= now
        assert [(r.key, r.value) for r in first[0].records] == [(p + "a", b"2"), (p + "c", b"3")]
        r7 = store.put(p + "d", b"4")
        rest = [e for e in first[1:]] + drain(w, r7)
        assert [(e.kind, e.key, e.revision) for e in rest] == [(PUT, p + "d", r7)]


def test_watch_close_unblocks_get(store, p):
    w = store.watch(p, store.revision() + 1)
    errors = []

    def consume():
        try:
            while True:
                w.get(30.0)
        except WatchClosed as e:
            errors.append(e)
    t = threading.Thread(target=consume)
    t.start()
    w.close()
    t.join(10)
    assert not t.is_alive() and len(errors) == 1
    assert list(w) == []          # iterating a closed watch ends at once


def test_bad_input(store, p):
    with pytest.raises(ValueError):
        store.put("", b"x")
    with pytest.raises(ValueError):
        store.put(p + "nul\0", b"x")
    with pytest.raises(TypeError, match="bytes, not str"):
        store.put(p + "a", "text")
    with pytest.raises(ValueError):
        store.watch(p, 0)
    assert store.get(p + "a") is None


def test_event_repr_hides_values(store, p):
    secretish = b"\x13\x37" * 16
    r = store.put(p + "k", secretish)
    with store.watch(p, r) as w:
        ev = drain(w, r)[0]
    assert isinstance(ev, Event)
    assert secretish.hex() not in repr(ev) and repr(secretish) not in repr(ev)
    assert repr(secretish) not in repr(store.get(p + "k"))
