"""SaSync: Child SAs written by one node reach the installers of the others, through SQLite and
through a 3-member etcd cluster; a restarted node rebuilds from the store and resumes."""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest
from etcd_cluster import EtcdCluster, require_etcd
from test_store_schema import child_sa

from pipeline.sa import RecordingSaInstaller
from pipeline.store.crypto import FleetKey
from pipeline.store.schema import Layout, SharedState
from pipeline.store.sqlite import SqliteStore
from pipeline.sync import DROP_BAD_KEY, DROP_INSTALL_FAILED, DROP_UNDECODABLE, SaSync

FLEET = FleetKey(b"sync-test-fleet-key-0123456789abcdef-xyz")
_roots = itertools.count()


@pytest.fixture(scope="module")
def etcd_cluster(tmp_path_factory):
    require_etcd()
    with EtcdCluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "etcd"])
def open_store(request, tmp_path):
    """Opens a new handle on one shared store per call (each "node" has its own)."""
    handles = []
    if request.param == "sqlite":
        def opener():
            handles.append(SqliteStore(tmp_path / "state.db"))
            return handles[-1]
    else:
        cluster = request.getfixturevalue("etcd_cluster")

        def opener():
            handles.append(cluster.client())
            return handles[-1]
    yield opener
    for h in handles:
        h.close()


@pytest.fixture
def layout():
    return Layout(f"/sync{next(_roots)}/")


def node(open_store, layout, node_id):
    return SharedState(open_store(), FLEET, layout, node=node_id)


def same(sas: dict, expected: list) -> bool:
    return sas == {sa.spi_in: sa for sa in expected}


def test_sas_propagate_install_rekey_delete(open_store, layout):
    a = node(open_store, layout, 1)
    b_inst, c_inst = RecordingSaInstaller(), RecordingSaInstaller()
    b = SaSync(node(open_store, layout, 2), b_inst, name="b").start()
    c = SaSync(node(open_store, layout, 3), c_inst, name="c").start()
    s1, s2, s3 = child_sa(1), child_sa(2, tunnel="other"), child_sa(3)
    a.put_child_sa(s1)
    a.put_child_sa(s2)
    a.rekey_child_sa(s1.spi_in, s3)               # new record replaces s1, then s1 deleted
    a.put_child_sa(s2)                            # the same write again (a retried put)
    a.delete_child_sa("other", s2.spi_in)
    for inst in (b_inst, c_inst):
        assert inst.wait_for(lambda sas, i=inst: same(sas, [s3]) and len(i.events) == 4, 20)
        assert inst.events == [("install", s1.spi_in), ("install", s2.spi_in),
                               ("replace", s3.spi_in), ("delete", s2.spi_in)]
        assert inst.sas[s3.spi_in].enc_key_in == s3.enc_key_in
    assert (b.drops, c.drops) == ({}, {})
    b.stop()
    c.stop()


def test_restarted_node_rebuilds_then_follows(open_store, layout):
    a = node(open_store, layout, 1)
    sas = [child_sa(i) for i in range(10)]
    for sa in sas[:6]:
        a.put_child_sa(sa)
    first = RecordingSaInstaller()
    b = SaSync(node(open_store, layout, 2), first, name="b").start()
    assert first.wait_for(lambda s: same(s, sas[:6]), 20)
    b.stop()
    # While node B is down: one SA deleted, one rekeyed, two new.
    a.delete_child_sa("site-c", sas[0].spi_in)
    a.rekey_child_sa(sas[1].spi_in, sas[6])
    a.put_child_sa(sas[7])
    a.put_child_sa(sas[8])
    # B restarts with an empty data path: it installs exactly what the store holds...
    again = RecordingSaInstaller()
    b2 = SaSync(node(open_store, layout, 2), again, name="b2").start()
    expect = sas[2:9]
    assert same(again.sas, expect)
    assert sorted(again.events) == sorted(("install", sa.spi_in) for sa in expect)
    # ...and follows from the listing's revision + 1.
    a.put_child_sa(sas[9])
    a.delete_child_sa("site-c", sas[2].spi_in)
    assert again.wait_for(lambda s: same(s, sas[3:10]), 20)
    assert again.events[-2:] == [("install", sas[9].spi_in), ("delete", sas[2].spi_in)]
    b2.stop()


def test_changed_sa_reinstalled_and_bad_records_counted(open_store, layout):
    a = node(open_store, layout, 1)
    inst = RecordingSaInstaller()
    b = SaSync(node(open_store, layout, 2), inst, name="b").start()
    s1 = child_sa(1)
    a.put_child_sa(s1)
    moved = dataclasses.replace(s1, encap_remote_port=40000)   # NAT mapping changed
    a.put_child_sa(moved)
    store = a.store
    store.put(layout.sa("site-c", 0xC0000099), b"not json")
    # A valid record filed under the wrong SPI is refused, not installed under either.
    wrong = json.loads(store.get(layout.sa("site-c", s1.spi_in)).value)
    store.put(layout.sa("site-c", 0xC0000098), json.dumps(wrong).encode())
    store.put(layout.sas + "junk", b"{}")
    s2 = child_sa(2)
    a.put_child_sa(s2)
    assert inst.wait_for(lambda s: same(s, [moved, s2]), 20)
    assert inst.events == [("install", s1.spi_in), ("delete", s1.spi_in),
                           ("install", s1.spi_in), ("install", s2.spi_in)]
    assert b.drops == {DROP_UNDECODABLE: 2, DROP_BAD_KEY: 1}
    b.stop()


class FlakyInstaller(RecordingSaInstaller):
    def install(self, sa):
        if sa.spi_in % 2:
            raise OSError("SA table full")
        super().install(sa)


def test_installer_failure_counted_not_fatal(tmp_path):
    with SqliteStore(tmp_path / "s.db") as s:
        a = SharedState(s, FLEET)
        for i in range(1, 7):
            a.put_child_sa(child_sa(i))
        inst = FlakyInstaller()
        sync = SaSync(SharedState(SqliteStore(tmp_path / "s.db"), FLEET), inst)
        sync.rebuild()
        assert sorted(inst.sas) == [0xC0000002, 0xC0000004, 0xC0000006]
        assert sync.drops == {DROP_INSTALL_FAILED: 3}
        sync.state.store.close()


def test_resync_after_compaction_reconciles(tmp_path):
    """A node that fell behind a compaction reconciles with the whole prefix: extra SAs go,
    missing ones come, a rekey becomes one replace."""
    path = tmp_path / "s.db"
    with SqliteStore(path) as s:
        a = SharedState(s, FLEET)
        sas = [child_sa(i) for i in range(6)]
        for sa in sas[:4]:
            a.put_child_sa(sa)
        inst = RecordingSaInstaller()
        b = SaSync(SharedState(SqliteStore(path), FLEET), inst)
        b.rebuild()
        assert same(inst.sas, sas[:4])
        a.delete_child_sa("site-c", sas[0].spi_in)
        a.rekey_child_sa(sas[1].spi_in, sas[4])
        a.put_child_sa(sas[5])
        s.compact(s.revision())
        assert b.step(5.0) == 1                      # one Resync item
        assert same(inst.sas, sas[2:6])
        assert inst.events[4:] == [("replace", sas[4].spi_in), ("install", sas[5].spi_in),
                                   ("delete", sas[0].spi_in)]
        assert b.revision == s.revision()
        b.state.store.close()


def test_two_processes_share_sqlite(tmp_path):
    """Node A is another process writing the SQLite file; node B here installs what it writes."""
    path = tmp_path / "s.db"
    SqliteStore(path).close()
    inst = RecordingSaInstaller()
    b = SaSync(SharedState(SqliteStore(path), FLEET), inst).start()
    tests = os.path.dirname(os.path.abspath(__file__))
    code = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{tests!r}, {os.path.dirname(tests)!r}]
        from test_store_schema import child_sa
        from pipeline.store.crypto import FleetKey
        from pipeline.store.schema import SharedState
        from pipeline.store.sqlite import SqliteStore
        a = SharedState(SqliteStore({str(path)!r}), FleetKey({FLEET_RAW!r}), node=1)
        for i in range(50):
            a.put_child_sa(child_sa(i))
        a.delete_child_sa("site-c", 0xC0000000)
        """)
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=60).returncode == 0
    assert inst.wait_for(lambda s: sorted(s) == [0xC0000000 + i for i in range(1, 50)], 20)
    assert len(inst.events) == 51
    b.stop()
    b.state.store.close()


FLEET_RAW = b"sync-test-fleet-key-0123456789abcdef-xyz"


def test_sync_rebuilds_after_its_watch_dies(tmp_path):
    """The watch under a running sync dies; changes made meanwhile arrive through a rebuild."""
    path = tmp_path / "s.db"
    with SqliteStore(path) as s:
        a = SharedState(s, FLEET)
        s1, s2 = child_sa(1), child_sa(2)
        a.put_child_sa(s1)
        inst = RecordingSaInstaller()
        b = SaSync(SharedState(SqliteStore(path), FLEET), inst).start()
        assert same(inst.sas, [s1])
        b._watch.close()
        a.put_child_sa(s2)
        a.delete_child_sa("site-c", s1.spi_in)
        assert inst.wait_for(lambda sas: same(sas, [s2]), 20)
        assert b.failures == 1 and "closed" in str(b.error)
        assert inst.events == [("install", s1.spi_in), ("install", s2.spi_in),
                               ("delete", s1.spi_in)]
        b.stop()
        b.state.store.close()


def test_start_fails_cleanly_when_the_store_is_unreachable(etcd_cluster):
    from pipeline.store import StoreError
    from pipeline.store.etcd import EtcdStore
    dead = EtcdStore(["https://127.0.0.1:1"], tls=etcd_cluster.tls, retry_for=0.3, timeout=0.2)
    sync = SaSync(SharedState(dead, FLEET), RecordingSaInstaller())
    with pytest.raises(StoreError, match="no rebuild from the store within 1.0 s"):
        sync.start(timeout=1.0)
    assert sync.failures >= 1 and sync._thread is None
    dead.close()


def test_ike_on_any_node_through_store_installer(open_store, layout):
    """Each node's IKE daemon hands SAs to a StoreSaInstaller; each node's SaSync installs into
    its data path. An SA negotiated on A, rekeyed through B and deleted through C (which never
    wrote it) reaches every data path, A's included, exactly once per change."""
    from pipeline.sync import StoreSaInstaller
    nodes = {}
    for n in "abc":
        state = node(open_store, layout, ord(n))
        dp = RecordingSaInstaller()
        sync = SaSync(state, dp, name=n).start()
        nodes[n] = (StoreSaInstaller(state, sync), dp, sync)
    s1, s2 = child_sa(1), child_sa(2)
    nodes["a"][0].install(s1)
    assert all(dp.wait_for(lambda s: same(s, [s1]), 20) for _, dp, _ in nodes.values())
    nodes["b"][0].replace(s1.spi_in, s2)
    assert all(dp.wait_for(lambda s: same(s, [s2]), 20) for _, dp, _ in nodes.values())
    nodes["c"][0].delete(s2.spi_in)
    for _, dp, sync in nodes.values():
        assert dp.wait_for(lambda s: s == {}, 20)
        assert dp.events == [("install", s1.spi_in), ("replace", s2.spi_in),
                             ("delete", s2.spi_in)]
        sync.stop()
    # Without an index or a record of its own, the installer finds the key by listing.
    s3 = child_sa(3, tunnel="t3")
    nodes["a"][0].install(s3)
    lone = StoreSaInstaller(nodes["b"][0].state)
    lone.delete(s3.spi_in)
    lone.delete(0x0BADBAD0)                          # unknown: nothing to do, no error
    assert nodes["b"][0].state.store.list(layout.sas).records == ()


def test_native_esp_data_path_through_the_store(tmp_path):
    """The real data-path installer (pipeline.ipsec.IpsecDataPath, native ESP SA table) behind
    SaSync: a rekey keeps the old inbound SA until its record is deleted (RFC 7296 2.8), a NAT
    mapping change re-installs the pair, a delete removes it."""
    from pipeline.ipsec import IpsecDataPath, TunnelInfo
    path = tmp_path / "s.db"
    dp = IpsecDataPath({"0b1d2c3e": TunnelInfo("site-c", 3)}, node_id=2)
    with SqliteStore(path) as s:
        a = SharedState(s, FLEET, node=1)
        b = SaSync(SharedState(SqliteStore(path), FLEET), dp)
        b.rebuild()
        s1, s2 = child_sa(1), child_sa(2)
        a.put_child_sa(s1)
        b.step(2.0)
        assert dp.installed() == {s1.spi_in: ("site-c", 3, s1.spi_out, True)}
        a.put_child_sa(s2, replaces=s1.spi_in)            # the rekey's first half
        b.step(2.0)
        assert dp.installed() == {s1.spi_in: ("site-c", 3, s1.spi_out, False),
                                  s2.spi_in: ("site-c", 3, s2.spi_out, True)}
        a.delete_child_sa("site-c", s1.spi_in)             # ...and its second
        b.step(2.0)
        assert dp.installed() == {s2.spi_in: ("site-c", 3, s2.spi_out, True)}
        a.put_child_sa(dataclasses.replace(s2, encap_remote_port=40000))
        b.step(2.0)
        assert dp.installed() == {s2.spi_in: ("site-c", 3, s2.spi_out, True)}
        assert b.installed[s2.spi_in].sa.encap_remote_port == 40000
        a.delete_child_sa("site-c", s2.spi_in)
        b.step(2.0)
        assert dp.installed() == {}
        assert not b.drops and b.applied == 6     # install, replace, delete, delete+install, delete
        b.state.store.close()
    dp.close()


def test_rebuild_during_a_rekey_keeps_the_new_sa_current(tmp_path):
    """A node starts while a rekey is half done (new record written, old not yet deleted) and
    the new SA's key sorts first: the old SA still goes in first, the new one replaces it."""
    from pipeline.ipsec import IpsecDataPath, TunnelInfo
    path = tmp_path / "s.db"
    with SqliteStore(path) as s:
        a = SharedState(s, FLEET)
        old, new = child_sa(5), child_sa(2)
        a.put_child_sa(old)
        a.put_child_sa(new, replaces=old.spi_in)
        dp = IpsecDataPath({"0b1d2c3e": TunnelInfo("site-c", 3)})
        rec = RecordingSaInstaller()
        for inst in (dp, rec):
            sync = SaSync(SharedState(SqliteStore(path), FLEET), inst)
            sync.rebuild()
            sync.state.store.close()
        assert rec.events == [("install", old.spi_in), ("replace", new.spi_in)]
        assert dp.installed() == {old.spi_in: ("site-c", 3, old.spi_out, False),
                                  new.spi_in: ("site-c", 3, new.spi_out, True)}
        dp.close()
