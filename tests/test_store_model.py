"""Model-based check of both store backends: random sequences of put, delete, CAS, compaction,
lists at past revisions and watches from past revisions, compared with a plain-Python history
of every revision (Hypothesis stateful testing). Short runs here; the SQLite one is cheap, the
etcd one runs a few sequences against the real cluster."""
from __future__ import annotations

import itertools
import tempfile
import time
from pathlib import Path

import pytest
from etcd_cluster import EtcdCluster, require_etcd
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pipeline.store import DELETE, PUT, CompactedError, Resync
from pipeline.store.sqlite import SqliteStore

KEYS = st.sampled_from(["a", "b", "c", "d/e", "d/f"])
VALUES = st.binary(min_size=0, max_size=8)
_roots = itertools.count()


class StoreModel(RuleBasedStateMachine):
    """Subclasses set ``open_store`` (returns a fresh store handle and a key prefix)."""

    open_store = None

    def __init__(self):
        super().__init__()
        self.store, self.p = type(self).open_store()
        self.base = self.store.revision()
        self.history: list[tuple[int, str, bytes | None]] = []   # (revision, key, value)
        self.compacted = 0

    def teardown(self):
        self.store.close()

    # model helpers
    @property
    def rev(self) -> int:
        return self.history[-1][0] if self.history else self.base

    def state_at(self, rev: int) -> dict[str, tuple[bytes, int, int, int]]:
        """key -> (value, create, mod, version) at ``rev``."""
        out: dict[str, tuple[bytes, int, int, int]] = {}
        for r, k, v in self.history:
            if r > rev:
                break
            if v is None:
                out.pop(k, None)
            else:
                old = out.get(k)
                out[k] = (v, old[1] if old else r, r, old[3] + 1 if old else 1)
        return out

    def record(self, key: str, value: bytes | None, rev: int) -> None:
        assert rev == self.rev + 1, (rev, self.rev)
        self.history.append((rev, key, value))

    # rules
    @rule(k=KEYS, v=VALUES)
    def put(self, k, v):
        self.record(k, v, self.store.put(self.p + k, v))

    @rule(k=KEYS)
    def delete(self, k):
        res = self.store.delete(self.p + k)
        assert res.ok == (k in self.state_at(self.rev))
        if res.ok:
            self.record(k, None, res.revision)

    @rule(k=KEYS, v=VALUES, stale=st.booleans())
    def cas(self, k, v, stale):
        cur = self.state_at(self.rev).get(k)
        expected = (cur[2] if cur else 0) + (1 if stale else 0)
        res = self.store.cas(self.p + k, v, expected)
        assert res.ok == (not stale)
        if res.ok:
            self.record(k, v, res.revision)
        else:
            assert (res.current.value if res.current else None) == (cur[0] if cur else None)

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def compact(self, data):
        # Revisions are drawn as positions in the history: etcd's absolute revisions differ
        # from one run to the next, and Hypothesis replays draws.
        revs = [r for r, _, _ in self.history if r >= self.compacted]
        at = revs[data.draw(st.integers(0, len(revs) - 1))] if revs else self.rev
        self.store.compact(at)
        self.compacted = max(self.compacted, at)

    @precondition(lambda self: self.history)
    @rule(data=st.data(), sub=st.sampled_from(["", "d/"]))
    def list_at(self, data, sub):
        at = self.history[data.draw(st.integers(0, len(self.history) - 1))][0]
        if at < self.compacted:
            with pytest.raises(CompactedError):
                self.store.list(self.p + sub, at)
            return
        got = self.store.list(self.p + sub, at)
        want = sorted((k, *t) for k, t in self.state_at(at).items() if k.startswith(sub))
        assert got.revision == at
        assert [(r.key.removeprefix(self.p), r.value, r.create_revision, r.mod_revision,
                 r.version) for r in got.records] == want

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def watch_from(self, data):
        start = self.history[data.draw(st.integers(0, len(self.history) - 1))][0]
        with self.store.watch(self.p, start) as w:
            items = []
            deadline = time.monotonic() + 10
            while not items or items[-1].revision < self.rev:
                assert time.monotonic() < deadline, items
                items.extend(w.get(0.5))
        if start < self.compacted:
            assert isinstance(items[0], Resync)
            snap = {r.key.removeprefix(self.p): r.value for r in items[0].records}
            assert snap == {k: t[0] for k, t in self.state_at(items[0].revision).items()}
            items = items[1:]
            start = self.rev + 1 if not items else items[0].revision
        want = [(PUT if v is not None else DELETE, k, v, r) for r, k, v in self.history
                if r >= start]
        assert [(e.kind, e.key.removeprefix(self.p), e.value, e.revision) for e in items] == want

    @invariant()
    def current_matches(self):
        now = self.store.list(self.p)
        assert {r.key.removeprefix(self.p): r.value for r in now.records} == \
            {k: t[0] for k, t in self.state_at(self.rev).items()}


def _sqlite():
    d = Path(tempfile.mkdtemp(prefix="store-model-"))
    return SqliteStore(d / "s.db"), "/m/"


class SqliteModel(StoreModel):
    open_store = staticmethod(_sqlite)


TestSqliteModel = SqliteModel.TestCase
TestSqliteModel.settings = settings(max_examples=40, stateful_step_count=25, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def etcd_cluster(tmp_path_factory):
    require_etcd()
    with EtcdCluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


def test_etcd_model(etcd_cluster):
    class EtcdModel(StoreModel):
        open_store = staticmethod(lambda: (etcd_cluster.client(), f"/m{next(_roots)}/"))
    EtcdModel.TestCase.settings = settings(max_examples=6, stateful_step_count=20,
                                           deadline=None,
                                           suppress_health_check=list(HealthCheck))
    EtcdModel.TestCase("runTest").runTest()
