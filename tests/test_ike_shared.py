"""IKE SAs shared through the store (issue 7): two edge nodes A and B, each an IkeEngine with
SharedIkeSas in front and a data path (RecordingSaInstaller fed by SaSync), one store (SQLite,
and a 3-member etcd cluster), and our initiator as the peer. The "route" decides which node
gets the peer's datagrams."""
from __future__ import annotations

import itertools
import json

import pytest
from etcd_cluster import EtcdCluster, require_etcd
from ike_peers import CUSTOMER, DOMAIN, EDGE, TUNNEL, profile

from pipeline.ike import persist
from pipeline.ike.constants import DhGroup
from pipeline.ike.engine import IkeEngine
from pipeline.ike.fleet import SharedIkeSas
from pipeline.ike.payloads import DeletePayload
from pipeline.ike.state import IkeState
from pipeline.ike.tasks import ChildCreateTask, IkeRekeyTask, InformationalTask
from pipeline.ike.tunnels import TunnelDirectory
from pipeline.sa import RecordingSaInstaller
from pipeline.store.crypto import FleetKey
from pipeline.store.schema import IkeSaConflict, Layout, SharedState
from pipeline.store.sqlite import SqliteStore
from pipeline.sync import SaSync, StoreSaInstaller

FLEET = FleetKey(b"ike-share-test-fleet-key-0123456789abcdef")
_roots = itertools.count()


class Node:
    def __init__(self, open_store, layout: Layout, node_id: int, clock=lambda: 1000.0):
        self.store = open_store()
        self.shared = SharedState(self.store, FLEET, layout, node=node_id)
        self.datapath = RecordingSaInstaller()
        self.sync = SaSync(self.shared, self.datapath, name=f"sync-{node_id}")
        self.sync.rebuild()
        self.engine = IkeEngine(TunnelDirectory([TUNNEL], DOMAIN),
                                StoreSaInstaller(self.shared, self.sync))
        self.ike = SharedIkeSas(self.engine, self.shared, clock=clock).start()

    def settle(self):
        """Apply every store change to this node's data path and IKE copies."""
        while self.sync.step(0.05) or self.ike.poll(0.05):
            pass

    def close(self):
        self.ike.close()
        self.sync.stop()
        self.store.close()


class Fleet:
    def __init__(self, open_store):
        layout = Layout(f"/ike{next(_roots)}/")
        self.a, self.b = Node(open_store, layout, 1), Node(open_store, layout, 2)
        self.route = self.a
        self.peer_dp = RecordingSaInstaller()
        self.peer = IkeEngine(TunnelDirectory([], DOMAIN), self.peer_dp)
        self.now = 1000.0
        self.to_peer: list[bytes] = []       # every datagram an edge node sent to the peer

    def nodes(self):
        return (self.a, self.b)

    def run(self, from_peer=(), from_edge=(), settle=True):
        q = [("p", d) for d in from_peer] + [("e", d) for d in from_edge]
        for _ in range(100):
            if not q:
                break
            side, d = q.pop(0)
            if side == "p":
                self.last_from_peer = d.data
                q += [("e", x) for x in self.route.ike.handle(d.data, d.remote, d.local,
                                                              self.now)]
            else:
                self.to_peer.append(d.data)
                q += [("p", x) for x in self.peer.handle(d.data, d.remote, d.local, self.now)]
        assert not q
        for n in self.nodes() if settle else ():
            n.settle()

    def establish(self):
        self.run(self.peer.initiate(profile(), (CUSTOMER, 500), (EDGE, 500), self.now))
        (sa,) = self.peer.established_sas()
        return sa

    def peer_request(self, task, settle=True):
        (sa,) = self.peer.established_sas()
        self.run(self.peer.start(sa, task, self.now), settle=settle)

    def close(self):
        for n in self.nodes():
            n.close()


@pytest.fixture(scope="module")
def etcd_cluster(tmp_path_factory):
    require_etcd()
    with EtcdCluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "etcd"])
def fleet(request, tmp_path):
    if request.param == "sqlite":
        f = Fleet(lambda: SqliteStore(tmp_path / "state.db"))
    else:
        f = Fleet(request.getfixturevalue("etcd_cluster").client)
    yield f
    f.close()


@pytest.fixture
def sqlite_fleet(tmp_path):
    f = Fleet(lambda: SqliteStore(tmp_path / "state.db"))
    yield f
    f.close()


def _pairs(peer_dp: RecordingSaInstaller, edge_dp: RecordingSaInstaller):
    """Every edge SA matches the peer's SA of the other direction, keys included."""
    assert len(peer_dp.sas) == len(edge_dp.sas) == 1
    (p,), (e,) = peer_dp.sas.values(), edge_dp.sas.values()
    assert (e.spi_in, e.spi_out) == (p.spi_out, p.spi_in)
    assert (e.enc_key_in, e.salt_in, e.enc_key_out, e.salt_out) == (
        p.enc_key_out, p.salt_out, p.enc_key_in, p.salt_in)
    return e


def test_liveness_and_child_rekey_through_the_other_node(fleet):
    peer_sa = fleet.establish()
    first = _pairs(fleet.peer_dp, fleet.a.datapath)
    assert fleet.b.datapath.sas == fleet.a.datapath.sas          # B installed it from the store
    st = fleet.a.shared.ike_sa(int.from_bytes(peer_sa.spi_i, "big"),
                               int.from_bytes(peer_sa.spi_r, "big"))
    assert (st.node, st.state_format) == (1, persist.FORMAT)
    (a_sa,) = fleet.a.engine.sas.values()
    assert (a_sa.expected_peer_id, a_sa.next_request_id) == (2, 0)

    fleet.route = fleet.b
    fleet.peer_request(InformationalTask())                       # liveness, message ID 2
    assert fleet.b.engine.stats["ike_adopted"] == 1
    (b_sa,) = fleet.b.engine.sas.values()
    assert (b_sa.spi_i, b_sa.spi_r) == (peer_sa.spi_i, peer_sa.spi_r)
    assert (b_sa.expected_peer_id, b_sa.last_response_id) == (3, 2)
    assert peer_sa.next_request_id == 3 and peer_sa.pending is None
    assert fleet.a.engine.sas == {}                  # B wrote it: A dropped its copy
    assert fleet.a.engine.stats["ike_forgotten"] == 1

    # The peer rekeys the Child SA (with PFS) through B: message ID 3.
    child = peer_sa.children[first.spi_out]
    fleet.peer_request(ChildCreateTask(rekey=child, pfs_group=DhGroup.ECP_384))
    (b_sa,) = fleet.b.engine.sas.values()
    new = _pairs(fleet.peer_dp, fleet.b.datapath)
    assert new.spi_in != first.spi_in
    for n in fleet.nodes():                           # the same new keys on A and on B
        assert n.datapath.sas == {new.spi_in: new}
        assert n.datapath.events == [("install", first.spi_in), ("replace", new.spi_in)]
    # the peer's DELETE of the old SA came in (message ID 4) and B's answer went out
    assert b_sa.expected_peer_id == 5 and list(b_sa.children) == [new.spi_in]
    assert fleet.a.store.get(fleet.a.shared.layout.sa("cust-a", first.spi_in)) is None


def test_a_delete_through_b_removes_what_a_installed(fleet):
    peer_sa = fleet.establish()
    spi = _pairs(fleet.peer_dp, fleet.a.datapath).spi_in
    assert spi in fleet.b.datapath.sas
    fleet.route = fleet.b
    fleet.peer_request(InformationalTask([DeletePayload(1, [])]))
    assert peer_sa.state == IkeState.DEAD and fleet.peer.sas == {}
    for n in fleet.nodes():
        assert n.datapath.sas == {}
        assert n.datapath.events == [("install", spi), ("delete", spi)]
        assert n.engine.sas == {}
    assert fleet.a.store.list(fleet.a.shared.layout.base).records == ()
    assert fleet.b.engine.stats["ike_destroyed_deleted_by_peer"] == 1


def test_retransmitted_request_answered_from_the_cache_on_the_other_node(fleet):
    fleet.establish()
    fleet.peer_request(InformationalTask())           # answered by A
    answer, request = fleet.to_peer[-1], fleet.last_from_peer
    # The peer lost A's answer and retransmits to B: B answers with A's exact bytes.
    fleet.route = fleet.b
    sent = fleet.b.ike.handle(request, (EDGE, 500), (CUSTOMER, 500), fleet.now)
    assert [d.data for d in sent] == [answer]
    assert fleet.b.engine.stats["retransmit_answered"] == 1
    (b_sa,) = fleet.b.engine.sas.values()
    assert b_sa.expected_peer_id == 3


def test_the_edges_liveness_check_answered_to_the_other_node(fleet):
    fleet.establish()
    (a_sa,) = fleet.a.engine.sas.values()
    fleet.now += TUNNEL.dpd_interval + 1
    out = fleet.a.ike.tick(fleet.now)                 # A asks (message ID 0 of the edge)
    assert len(out) == 1 and a_sa.pending is not None
    fleet.route = fleet.b                             # ...and the answer arrives at B
    answer = fleet.peer.handle(out[0].data, out[0].remote, out[0].local, fleet.now)
    assert len(answer) == 1
    assert fleet.b.ike.handle(answer[0].data, answer[0].remote, answer[0].local,
                              fleet.now) == []
    (b_sa,) = fleet.b.engine.sas.values()
    assert (b_sa.pending, b_sa.next_request_id) == (None, 1)
    assert fleet.b.engine.stats["unexpected_response"] == 0
    fleet.a.settle()
    assert fleet.a.engine.sas == {}
    # A has no timer left for it: no retransmission, no dead-peer verdict
    fleet.now += 300
    assert fleet.a.ike.tick(fleet.now) == [] and fleet.a.engine.stats["retransmitted"] == 0


def test_the_edges_child_rekey_answered_to_the_other_node(fleet):
    """A CREATE_CHILD_SA the edge started (its DH private value and nonce travel in the
    record) is completed by the node that gets the answer."""
    fleet.establish()
    old = _pairs(fleet.peer_dp, fleet.a.datapath)
    (a_sa,) = fleet.a.engine.sas.values()
    out = fleet.a.engine.start(a_sa, ChildCreateTask(rekey=a_sa.children[old.spi_in],
                                                     pfs_group=DhGroup.ECP_384), fleet.now)
    fleet.a.ike.commit(fleet.now)
    fleet.route = fleet.b
    fleet.run(from_edge=out)
    new = _pairs(fleet.peer_dp, fleet.b.datapath)
    assert new.spi_in != old.spi_in
    for n in fleet.nodes():
        assert n.datapath.sas == {new.spi_in: new}
    (b_sa,) = fleet.b.engine.sas.values()
    assert b_sa.next_request_id == 2                   # the rekey, then B's DELETE of the old


def test_ike_sa_rekey_through_b_then_use_the_new_sa(fleet):
    peer_sa = fleet.establish()
    fleet.route = fleet.b
    fleet.peer_request(IkeRekeyTask())
    (new_peer,) = fleet.peer.established_sas()
    assert new_peer is not peer_sa
    (b_new,) = fleet.b.engine.established_sas()
    assert b_new.keys.sk_d == new_peer.keys.sk_d
    layout = fleet.a.shared.layout
    keys = [r.key for r in fleet.a.store.list(layout.ike_sas).records]
    assert keys == [layout.ike_sa(int.from_bytes(new_peer.spi_i, "big"),
                                  int.from_bytes(new_peer.spi_r, "big"))]
    fleet.route = fleet.a                             # the new IKE SA, adopted by A
    fleet.peer_request(InformationalTask())
    (a_new,) = fleet.a.engine.established_sas()
    assert (a_new.spi_r, a_new.expected_peer_id) == (new_peer.spi_r, 1)


def test_concurrent_change_is_resolved_by_cas_never_overwritten(fleet):
    peer_sa = fleet.establish()
    fleet.route = fleet.b
    fleet.peer_request(InformationalTask())           # B holds it at revision r
    (b_sa,) = fleet.b.engine.sas.values()
    spis = (int.from_bytes(peer_sa.spi_i, "big"), int.from_bytes(peer_sa.spi_r, "big"))
    # A loads the same revision, then B changes it (peer's request 3) before A writes.
    st = fleet.a.shared.ike_sa(*spis)
    stale = fleet.a.ike._adopt(st, fleet.now)
    fleet.peer_request(InformationalTask(), settle=False)
    assert fleet.a.shared.ike_sa(*spis).node == 2 and b_sa.expected_peer_id == 4
    # A's own change on its stale copy (a liveness check from message ID 0) loses the CAS:
    out = fleet.a.engine.start(stale, InformationalTask(), fleet.now)
    assert len(out) == 1
    with pytest.raises(Exception) as exc:
        fleet.a.ike.commit(fleet.now)
    assert type(exc.value).__name__ == "_Conflict"
    assert fleet.a.engine.stats["ike_cas_conflict"] == 1
    now = fleet.a.shared.ike_sa(*spis)
    assert now.node == 2                               # B's record stands
    (a_sa,) = fleet.a.engine.sas.values()
    assert a_sa is not stale and a_sa.expected_peer_id == 4 and a_sa.pending is None
    assert fleet.a.ike.revisions[a_sa.local_spi] == now.revision
    # and the schema refuses a blind update at the old revision
    with pytest.raises(IkeSaConflict):
        fleet.a.shared.update_ike_sa(*spis, persist.FORMAT, b"x", st.revision)


def test_a_restarted_node_takes_back_the_ike_sas_it_wrote(fleet):
    peer_sa = fleet.establish()
    fleet.route = fleet.b
    fleet.peer_request(InformationalTask())           # B writes it last
    (b_sa,) = fleet.b.engine.sas.values()
    fleet.b.ike.close()
    # B restarts: a new engine, the same node id, the same store.
    b2 = Node(lambda: fleet.b.store, fleet.b.shared.layout, 2, clock=lambda: fleet.now)
    (back,) = b2.engine.sas.values()
    assert (back.spi_i, back.spi_r) == (peer_sa.spi_i, peer_sa.spi_r)
    assert (back.expected_peer_id, back.last_response) == (3, b_sa.last_response)
    assert b2.engine.stats["ike_adopted"] == 1 and fleet.a.engine.sas == {}
    # its timers run again there: a liveness check after the tunnel's interval
    out = b2.ike.tick(fleet.now + TUNNEL.dpd_interval + 1)
    assert len(out) == 1 and back.pending is not None and back.pending.msg_id == 0
    b2.ike.close()
    b2.sync.stop()
    # A (node 1) wrote nothing last: a restarted A takes nothing
    a2 = Node(lambda: fleet.a.store, fleet.a.shared.layout, 1, clock=lambda: fleet.now)
    assert a2.engine.sas == {}
    a2.ike.close()
    a2.sync.stop()


def test_persist_round_trip_with_another_clock():
    from ike_peers import Pair
    p = Pair()
    p.start(profile())
    (sa,) = p.resp.established_sas()
    blob = persist.dumps(sa, now=0.0)
    back = persist.loads(blob, p.resp.directory, now=5000.0)
    assert persist.dumps(back, now=5000.0) == blob
    assert back.rekey_at - 5000.0 == pytest.approx(sa.rekey_at - 0.0, abs=1e-3)
    (c,) = back.children.values()
    assert c.expire_at == 5000.0 + TUNNEL.child_lifetime and c.keys == sa.children[c.spi_in].keys
    assert (back.tunnel, back.local, back.remote) == (TUNNEL, sa.local, sa.remote)
    assert (back.sk.ekey_out, back.sk.akey_out, back.sk.ekey_in, back.sk.akey_in) == (
        sa.sk.ekey_out, sa.sk.akey_out, sa.sk.ekey_in, sa.sk.akey_in)


def test_persist_refuses_what_it_cannot_carry():
    from ike_peers import Pair
    p = Pair()
    p.start(profile())
    (sa,) = p.resp.established_sas()
    blob = persist.dumps(sa, now=0.0)
    obj = json.loads(blob)
    cases = {
        "format 2": dict(obj, format=2),
        "tunnel": dict(obj, tunnel="gone"),
        "keys": dict(obj, keys=obj["keys"][:3]),
        "ni": dict(obj, ni="zz"),
        "state": dict(obj, state="half-open"),
    }
    secret = sa.keys.sk_d.hex()
    for name, bad in cases.items():
        with pytest.raises(persist.PersistError) as e:
            persist.loads(json.dumps(bad).encode(), p.resp.directory, 0.0)
        assert secret not in str(e.value), name
    with pytest.raises(persist.PersistError):
        persist.loads(b"\x80not json", p.resp.directory, 0.0)
    # A request in flight that cannot be rebuilt (the rekey of a Child SA that is gone) is
    # abandoned: its message ID skipped, the IKE SA adopted all the same.
    gone = dict(obj, next_request_id=4, pending={
        "msg_id": 4, "datagrams": [], "sent_age": 0.0, "tries": 1, "deadline_in": None,
        "task": {"kind": "child_create", "rekey": 7, "pfs_group": 0, "dh": None, "ni": "",
                 "spi_in": 9, "retried": False}})
    back = persist.loads(json.dumps(gone).encode(), p.resp.directory, 0.0)
    assert (back.pending, back.next_request_id) == (None, 5)
    half = next(iter(p.init.sas.values()))
    half.state = IkeState.HALF_OPEN
    with pytest.raises(persist.PersistError):
        persist.dumps(half, 0.0)


def test_no_ike_key_in_clear_in_the_store_file(sqlite_fleet, tmp_path):
    fleet = sqlite_fleet
    fleet.establish()
    (a_sa,) = fleet.a.engine.sas.values()
    (child,) = a_sa.children.values()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("state.db*"))
    assert b"/v1/ike/" in raw                          # the IKE SA record is in these files
    for k in (a_sa.keys.sk_d, a_sa.keys.sk_ei, a_sa.keys.sk_er, child.keys.encr_i):
        assert k not in raw and k.hex().encode() not in raw


def test_tick_writes_pending_liveness_and_store_outage_retried(fleet, monkeypatch):
    fleet.establish()
    (a_sa,) = fleet.a.engine.sas.values()
    spis = (int.from_bytes(a_sa.spi_i, "big"), int.from_bytes(a_sa.spi_r, "big"))
    from pipeline.store import StoreError

    def down(*a, **k):
        raise StoreError("store down (test)")
    monkeypatch.setattr(fleet.a.shared, "update_ike_sa", down)
    fleet.now += TUNNEL.dpd_interval + 1
    assert len(fleet.a.ike.tick(fleet.now)) == 1       # IKE goes on without the store
    assert fleet.a.engine.stats["ike_store_write_failed"] == 1
    assert json.loads(persist.dumps(a_sa, fleet.now))["pending"]["msg_id"] == 0
    before = fleet.a.shared.ike_sa(*spis)
    assert before.revision == fleet.a.ike.revisions[a_sa.local_spi]
    assert json.loads(before.state)["pending"] is None
    monkeypatch.undo()
    fleet.a.ike.tick(fleet.now + 0.1)                  # written at the next tick
    st = fleet.a.shared.ike_sa(*spis)
    assert st.revision > before.revision
    assert json.loads(st.state)["pending"]["msg_id"] == 0


def test_a_conflict_in_the_timers_loses_only_that_ike_sa(fleet, monkeypatch):
    """Two IKE SAs on A are due a liveness check; another node changed the first one and the
    watch has not told A yet: only the first one's request is dropped (and the store's version
    adopted), the second one's goes out and is written."""
    first = fleet.establish()
    fleet.run(fleet.peer.initiate(profile(initial_contact=False), (CUSTOMER, 500), (EDGE, 500),
                                  fleet.now))
    second = next(s for s in fleet.peer.established_sas() if s is not first)
    assert len(fleet.a.engine.sas) == 2
    fleet.route = fleet.b
    fleet.run(fleet.peer.start(first, InformationalTask(), fleet.now), settle=False)
    monkeypatch.setattr(fleet.a.ike, "poll", lambda timeout=0.0: 0)   # the watch lags
    fleet.now += TUNNEL.dpd_interval + 1
    out = fleet.a.ike.tick(fleet.now)
    assert [d.data[:16] for d in out] == [second.spi_i + second.spi_r]
    assert fleet.a.engine.stats["ike_cas_conflict"] == 1
    a1 = fleet.a.engine.sas[first.spi_r]
    assert (a1.expected_peer_id, a1.pending) == (3, None)      # B's version, adopted
    st = fleet.a.shared.ike_sa(int.from_bytes(second.spi_i, "big"),
                               int.from_bytes(second.spi_r, "big"))
    assert (st.node, json.loads(st.state)["pending"]["msg_id"]) == (1, 0)


def test_a_request_processed_on_two_nodes_at_once(fleet, monkeypatch):
    """The peer's IKE SA rekey reaches B, and (a duplicate) A, whose read of the store raced
    with B's write: A's attempt loses the compare-and-swap, is undone (the IKE SA it created
    included), and the request is answered from B's cached response."""
    old_peer = fleet.establish()
    (request,) = fleet.peer.start(old_peer, IkeRekeyTask(), fleet.now)
    (answer,) = fleet.b.ike.handle(request.data, request.remote, request.local, fleet.now)
    delete = fleet.peer.handle(answer.data, answer.remote, answer.local, fleet.now)
    (new_peer,) = fleet.peer.established_sas()           # the peer's DELETE of the old: held
    real = fleet.a.ike._refresh
    calls = []

    def racing(data, now):
        calls.append(now)
        if len(calls) > 1:
            real(data, now)                # the first read saw the store before B's write
    monkeypatch.setattr(fleet.a.ike, "_refresh", racing)
    sent = fleet.a.ike.handle(request.data, request.remote, request.local, fleet.now)
    assert [d.data for d in sent] == [answer.data]
    assert fleet.a.engine.stats["ike_cas_conflict"] == 1 and len(calls) == 2
    assert fleet.a.engine.stats["retransmit_answered"] == 1
    # A holds B's version of the old IKE SA and nothing of its own lost attempt
    assert [(sa.spi_r, sa.state.value) for sa in fleet.a.engine.sas.values()] == [
        (old_peer.spi_r, "rekeyed")]
    layout = fleet.a.shared.layout

    def keys():
        return [r.key for r in fleet.a.store.list(layout.ike_sas).records]
    key_of = {sa.spi_r: layout.ike_sa(int.from_bytes(sa.spi_i, "big"),
                                      int.from_bytes(sa.spi_r, "big"))
              for sa in (old_peer, new_peer)}
    assert sorted(keys()) == sorted(key_of.values())
    fleet.route = fleet.b
    fleet.run(from_peer=delete)                         # the peer deletes the old one via B
    assert keys() == [key_of[new_peer.spi_r]] and fleet.a.engine.sas == {}
