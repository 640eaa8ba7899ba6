"""etcd backend against a real 3-member TLS cluster: certificates, member failures, compaction.

One cluster for the module; after each test every member is running and thawed again. Writers
create each key with a create-only CAS, so a write retried across a leader election cannot be
applied twice, and the events a watcher must see are exactly the (key, revision) pairs the
writer got back: any lost or repeated event fails the exact comparison.
"""
from __future__ import annotations

import itertools
import time

import pytest
from etcd_cluster import EtcdCluster, require_etcd

from pipeline.store import DELETE, PUT, Resync, StoreError
from pipeline.store.etcd import EtcdStore, EtcdTls

_counter = itertools.count()


@pytest.fixture(scope="module")
def cl(tmp_path_factory):
    require_etcd()
    with EtcdCluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@pytest.fixture(autouse=True)
def healthy(cl):
    yield
    for i, m in enumerate(cl.members):
        if m.frozen:
            cl.thaw(i)
        if m.proc is None:
            cl.restart(i)
    cl.wait_healthy()


@pytest.fixture
def p():
    return f"/etcd/{next(_counter)}/"


def order(cl, first: int) -> list[str]:
    """The cluster's endpoints, member ``first`` first."""
    eps = cl.endpoints
    return [eps[first]] + [e for i, e in enumerate(eps) if i != first]


def follower(cl) -> int:
    with cl.client() as c:
        leader = c.leader()
    assert leader is not None
    return next(i for i in range(3) if cl.index_of(leader) != i)


def create_keys(store, p, names, value=b"v"):
    out = []
    for n in names:
        r = store.cas(f"{p}{n}", value + n.encode(), 0)
        assert r.ok, (n, r)
        out.append((f"{p}{n}", r.revision))
    return out


def drain(watch, until_revision, timeout=20.0):
    out = []
    deadline = time.monotonic() + timeout
    while not out or out[-1].revision < until_revision:
        left = deadline - time.monotonic()
        assert left > 0, f"watch at {watch.revision}, wanted {until_revision} ({watch.endpoint})"
        out.extend(watch.get(min(left, 0.5)))
    return out


# --- TLS ---------------------------------------------------------------------------------------
def test_tls_client_certificate_required(cl):
    pki = cl.pki
    no_cert = EtcdStore(cl.endpoints, tls=EtcdTls(pki["ca"]), retry_for=0.5, timeout=0.5)
    with pytest.raises(StoreError, match="etcd"):
        no_cert.revision()
    no_cert.close()
    stranger = EtcdStore(cl.endpoints, tls=EtcdTls(pki["ca"], pki["stranger_cert"],
                                                   pki["stranger_key"]),
                         retry_for=0.5, timeout=0.5)
    with pytest.raises(StoreError, match="etcd"):
        stranger.put("/x", b"1")
    stranger.close()
    with cl.client() as good:
        assert good.revision() >= 1


def test_endpoint_and_tls_settings_checked(cl):
    with pytest.raises(StoreError, match="plain http but TLS"):
        EtcdStore(["http://127.0.0.1:2379"], tls=cl.tls)
    with pytest.raises(StoreError, match="https but no TLS"):
        EtcdStore(["https://127.0.0.1:2379"])
    with pytest.raises(StoreError, match="no endpoints"):
        EtcdStore([])
    with pytest.raises(StoreError, match="ca_file"):
        EtcdStore(cl.endpoints, tls=EtcdTls(cl.base / "missing.pem"))
    with pytest.raises(StoreError, match="both cert_file and key_file"):
        EtcdStore(cl.endpoints, tls=EtcdTls(cl.pki["ca"], cl.pki["client_cert"]))


# --- member failures ---------------------------------------------------------------------------
@pytest.mark.parametrize("failure", ["kill", "freeze"])
def test_watch_survives_member_failure(cl, p, failure):
    """The member the watcher streams from is killed / frozen (SIGSTOP) between two batches of
    writes made through the other members: the watcher resumes on another member and sees
    every write exactly once, before the member comes back."""
    victim = follower(cl)
    watcher = cl.client(order(cl, victim))
    writer = cl.client([e for i, e in enumerate(cl.endpoints) if i != victim])
    start = writer.revision() + 1
    w = watcher.watch(p, start)
    before = create_keys(writer, p, [f"a{i:02d}" for i in range(30)])
    got = drain(w, before[-1][1])
    assert w.endpoint == cl.endpoints[victim].removeprefix("https://")
    (cl.kill if failure == "kill" else cl.freeze)(victim)
    after = create_keys(writer, p, [f"b{i:02d}" for i in range(30)])
    got += drain(w, after[-1][1])
    assert [(e.kind, e.key, e.revision) for e in got] == \
        [(PUT, k, r) for k, r in before + after]
    assert w.reconnects >= 1
    assert w.endpoint != cl.endpoints[victim].removeprefix("https://")
    assert w.get(0.3) == []
    w.close()
    watcher.close()
    writer.close()


def test_writes_retry_through_leader_loss(cl, p):
    """The leader is killed under a writer connected to it: each create-only CAS is retried on
    another member through the election, and each key is written exactly once."""
    with cl.client() as c:
        leader = cl.index_of(c.leader())
    writer = cl.client(order(cl, leader), retry_for=20.0)
    first = create_keys(writer, p, ["k00"])
    cl.kill(leader)
    rest = create_keys(writer, p, [f"k{i:02d}" for i in range(1, 20)])
    listing = writer.list(p)
    assert [(r.key, r.mod_revision, r.version, r.value) for r in listing.records] == \
        [(k, rev, 1, b"v" + k.rsplit("/", 1)[1].encode()) for k, rev in first + rest]
    assert writer.endpoint != cl.endpoints[leader].removeprefix("https://")
    writer.close()


def test_compaction_while_watcher_is_cut_off_resyncs(cl, p):
    """The watcher's member freezes; meanwhile keys change and the history is compacted. The
    watcher resumes elsewhere, finds its revision compacted, re-reads the prefix (Resync) and
    then carries on with new events."""
    victim = follower(cl)
    # Slow failure detection (3 s + 3 s) so the writes and the compaction below, made through
    # healthy members, surely land before the watcher moves.
    watcher = cl.client(order(cl, victim), keepalive_s=3.0, keepalive_timeout_s=3.0)
    writer = cl.client([e for i, e in enumerate(cl.endpoints) if i != victim])
    start = writer.revision() + 1
    w = watcher.watch(p, start)
    created = create_keys(writer, p, ["a", "b", "c"])
    assert [e.key for e in drain(w, created[-1][1])] == [k for k, _ in created]
    cl.freeze(victim)
    writer.put(p + "a", b"changed")
    writer.delete(p + "b")
    create_keys(writer, p, ["d"])
    writer.compact(writer.revision())
    expected = writer.list(p)
    items = drain(w, expected.revision, timeout=30.0)
    assert isinstance(items[0], Resync)
    assert items[0].revision >= expected.revision
    assert [(r.key, r.value) for r in items[0].records] == \
        [(p + "a", b"changed"), (p + "c", b"vc"), (p + "d", b"vd")]
    assert w.resyncs == 1
    cl.thaw(victim)
    r = writer.delete(p + "c").revision
    tail = [e for e in items[1:]] + drain(w, r)
    assert [(e.kind, e.key, e.revision) for e in tail] == [(DELETE, p + "c", r)]
    w.close()
    watcher.close()
    writer.close()


def test_list_paginates_at_one_revision(cl, p):
    with cl.client(page_size=7) as c:
        created = create_keys(c, p, [f"{i:03d}" for i in range(50)])
        at = c.revision()
        c.put(p + "000", b"later")                  # after the listing's revision
        listing = c.list(p, at)
        assert listing.revision == at
        assert [(r.key, r.mod_revision) for r in listing.records] == created
        assert listing.records[0].value == b"v000"


# --- a node's SaSync through member failures -----------------------------------------------
@pytest.mark.parametrize("failure", ["kill", "freeze"])
def test_sa_sync_survives_member_failure(cl, failure):
    """Node B's SaSync watches through the member that is then killed / frozen; the SAs node A
    installs, rekeys and deletes meanwhile reach B's installer exactly once each, in order."""
    from test_store_schema import child_sa

    from pipeline.sa import RecordingSaInstaller
    from pipeline.store.crypto import FleetKey
    from pipeline.store.schema import Layout, SharedState
    from pipeline.sync import SaSync

    fleet = FleetKey(b"etcd-failure-fleet-key-0123456789abcdef")
    layout = Layout(f"/syncfail{next(_counter)}/")
    victim = follower(cl)
    a = SharedState(cl.client([e for i, e in enumerate(cl.endpoints) if i != victim]), fleet,
                    layout, node=1)
    inst = RecordingSaInstaller()
    b = SaSync(SharedState(cl.client(order(cl, victim)), fleet, layout), inst).start()
    sas = [child_sa(i) for i in range(25)]
    for sa in sas[:10]:
        a.put_child_sa(sa)
    assert inst.wait_for(lambda s: len(s) == 10, 20)
    assert b._watch.endpoint == cl.endpoints[victim].removeprefix("https://")
    (cl.kill if failure == "kill" else cl.freeze)(victim)
    for sa in sas[10:20]:
        a.put_child_sa(sa)
    for old, new in zip(sas[:3], sas[20:23], strict=True):
        a.rekey_child_sa(old.spi_in, new)
    for sa in sas[3:5]:
        a.delete_child_sa(sa.tunnel_name, sa.spi_in)
    final = {sa.spi_in: sa for sa in sas[5:23]}
    assert inst.wait_for(lambda s: s == final, 30)
    assert inst.events == (
        [("install", sa.spi_in) for sa in sas[:20]]
        + [("replace", sa.spi_in) for sa in sas[20:23]]
        + [("delete", sa.spi_in) for sa in sas[3:5]])
    assert b._watch.reconnects >= 1 and b.failures == 0 and not b.drops
    b.stop()
    b.state.store.close()
    a.store.close()


def test_killed_node_process_recovers_every_sa(cl, tmp_path):
    """Node B is a real process following the store; it is killed with SIGKILL, node A changes
    SAs meanwhile, and the restarted process installs exactly the SAs the store holds."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from test_store_schema import child_sa

    from pipeline.store.crypto import FleetKey
    from pipeline.store.schema import Layout, SharedState

    fleet_raw = b"node-restart-fleet-key-0123456789abcdef"
    root = f"/restart{next(_counter)}/"
    out = tmp_path / "installed.json"
    tests = os.path.dirname(os.path.abspath(__file__))
    node_b = f"""
import json, os, sys, time
sys.path[:0] = [{tests!r}, {os.path.dirname(tests)!r}]
from pipeline.sa import RecordingSaInstaller
from pipeline.store.crypto import FleetKey
from pipeline.store.etcd import EtcdStore, EtcdTls
from pipeline.store.schema import Layout, SharedState
from pipeline.sync import SaSync
tls = EtcdTls({str(cl.tls.ca_file)!r}, {str(cl.tls.cert_file)!r}, {str(cl.tls.key_file)!r})
store = EtcdStore({cl.endpoints!r}, tls=tls, keepalive_s=1.0, keepalive_timeout_s=1.0)
inst = RecordingSaInstaller()
SaSync(SharedState(store, FleetKey({fleet_raw!r}), Layout({root!r})), inst).start()
while True:
    with open({str(out)!r} + ".tmp", "w") as f:
        json.dump(sorted(inst.sas), f)
    os.replace({str(out)!r} + ".tmp", {str(out)!r})
    time.sleep(0.05)
"""

    def wait_installed(proc, want, timeout=20.0):
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, "node B exited"
            try:
                got = json.loads(out.read_text())
            except (OSError, ValueError):
                got = None
            if got == sorted(want):
                return
            assert time.monotonic() < deadline, (got, sorted(want))
            time.sleep(0.05)

    a = SharedState(cl.client(), FleetKey(fleet_raw), Layout(root), node=1)
    sas = [child_sa(i) for i in range(40)]
    procs = []
    try:
        for sa in sas[:20]:
            a.put_child_sa(sa)
        procs.append(subprocess.Popen([sys.executable, "-c", node_b]))
        wait_installed(procs[-1], [sa.spi_in for sa in sas[:20]])
        procs[-1].send_signal(signal.SIGKILL)
        procs[-1].wait(10)
        out.unlink()
        for sa in sas[:5]:
            a.delete_child_sa(sa.tunnel_name, sa.spi_in)
        for old, new in zip(sas[5:10], sas[20:25], strict=True):
            a.rekey_child_sa(old.spi_in, new)
        for sa in sas[25:35]:
            a.put_child_sa(sa)
        procs.append(subprocess.Popen([sys.executable, "-c", node_b]))
        wait_installed(procs[-1], [sa.spi_in for sa in sas[10:35]])
        a.delete_child_sa("site-c", sas[10].spi_in)          # and it follows again
        wait_installed(procs[-1], [sa.spi_in for sa in sas[11:35]])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        a.store.close()
