"""Shared objects in the store: the fleet key file, sealed SA keys (checked with an independent
AES-GCM open, then by grepping the raw SQLite file and the etcd data dirs), IKE SA records with
compare-and-swap, tunnels and routes."""
from __future__ import annotations

import base64
import dataclasses
import ipaddress
import json
import os
import re
import struct
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from etcd_cluster import EtcdCluster, require_etcd
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import config as C
from pipeline.sa import ChildSaParams, Selector
from pipeline.store.crypto import FleetKey, FleetKeyError
from pipeline.store.schema import (
    IkeSaConflict,
    Layout,
    SchemaError,
    SharedState,
    decode_child_sa,
    encode_child_sa,
)
from pipeline.store.sqlite import SqliteStore

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FLEET = b"test-fleet-key-0123456789abcdef-0123456789"


@pytest.fixture
def fleet_file(tmp_path):
    f = tmp_path / "fleet.key"
    f.write_bytes(FLEET + b"\n")
    os.chmod(f, 0o600)
    return f


@pytest.fixture
def fleet(fleet_file):
    return FleetKey.from_file(fleet_file)


def child_sa(i: int, tunnel: str = "site-c", **kw) -> ChildSaParams:
    """A Child SA with keys unique to ``i`` (so a grep for them cannot match by accident)."""
    keys = {f: os.urandom(n) for f, n in (("enc_key_in", 32), ("enc_key_out", 32),
                                          ("salt_in", 4), ("salt_out", 4))}
    sa = ChildSaParams(
        tunnel_name=tunnel, tunnel_id="0b1d2c3e", account_id="123456789",
        ike_sa=f"{i:016x}/{i + 1:016x}", spi_in=0xC0000000 + i, spi_out=0xD0000000 + i,
        encr="aes-gcm-16", encr_key_bits=256, integ=None, local_addr="192.0.2.1",
        remote_addr="198.51.100.7", encap_local_port=4500, encap_remote_port=31337,
        lifetime_soft_s=3000, lifetime_hard_s=3600,
        ts_local=(Selector(ipaddress.ip_address("0.0.0.0"),
                           ipaddress.ip_address("255.255.255.255")),),
        ts_remote=(Selector(ipaddress.ip_address("172.20.0.0"),
                            ipaddress.ip_address("172.20.255.255"), 6, 443, 443),),
        **keys)
    return dataclasses.replace(sa, **kw)


def secrets_of(sa: ChildSaParams) -> list[bytes]:
    return [v for v in (sa.enc_key_in, sa.enc_key_out, sa.integ_key_in, sa.integ_key_out)
            if v] + [sa.enc_key_in + sa.salt_in, sa.enc_key_out + sa.salt_out]


# --- fleet key file --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_fleet_key_file_readable_by_others_is_refused(fleet_file, mode):
    os.chmod(fleet_file, mode)
    with pytest.raises(FleetKeyError, match=f"mode {mode:04o}.*chmod 600") as e:
        FleetKey.from_file(fleet_file)
    assert FLEET.decode() not in str(e.value)


def test_fleet_key_file_errors(tmp_path, fleet_file):
    with pytest.raises(FleetKeyError, match="not found"):
        FleetKey.from_file(tmp_path / "nope")
    short = tmp_path / "short.key"
    short.write_bytes(b"  too-short \n")
    os.chmod(short, 0o600)
    with pytest.raises(FleetKeyError, match="shorter than 32 bytes"):
        FleetKey.from_file(short)
    link = tmp_path / "link.key"
    link.symlink_to(fleet_file)
    with pytest.raises(FleetKeyError, match="cannot open"):
        FleetKey.from_file(link)
    d = tmp_path / "dir.key"
    d.mkdir(mode=0o700)
    with pytest.raises(FleetKeyError, match="not a regular file|cannot open"):
        FleetKey.from_file(d)


def test_fleet_key_never_printed(fleet):
    assert FLEET.decode() not in repr(fleet)
    with pytest.raises(TypeError):
        import pickle
        pickle.dumps(fleet)


# --- Child SA records --------------------------------------------------------------------------
def test_child_sa_record_layout_checked_independently(fleet):
    """The stored JSON holds the SA's public fields in clear and its keys sealed exactly as
    documented: open the seal here with our own HKDF + AES-GCM, not with the module's code."""
    sa = child_sa(1, integ_key_in=b"I" * 32, integ_key_out=b"O" * 32)
    key = Layout().sa("site-c", sa.spi_in)
    assert key == "/xtransit/v1/sa/site-c/c0000001"
    value = encode_child_sa(fleet, key, sa, replaces=0xC0000000, node=7)
    obj = json.loads(value)
    assert (obj["format"], obj["spi_in"], obj["spi_out"], obj["encap_remote_port"],
            obj["replaces"], obj["node"]) == (1, 0xC0000001, 0xD0000001, 31337, 0xC0000000, 7)
    assert obj["ts_remote"] == [["172.20.0.0", "172.20.255.255", 6, 443, 443]]
    blob = base64.b64decode(obj["keys"])
    kid = HKDF(hashes.SHA256(), 4, None, b"xtransit store v1 key id").derive(FLEET)
    aes = HKDF(hashes.SHA256(), 32, None, b"xtransit store v1 aes-gcm").derive(FLEET)
    assert blob[0] == 1 and blob[1:5] == kid
    plain = AESGCM(aes).decrypt(blob[5:17], blob[17:], blob[:17] + key.encode())
    expect = b"".join(struct.pack("!H", len(v)) + v for v in
                      (sa.enc_key_in, sa.enc_key_out, sa.salt_in, sa.salt_out, b"I" * 32,
                       b"O" * 32))
    assert plain == expect
    for s in secrets_of(sa):
        assert s not in value and base64.b64encode(s) not in value
    back = decode_child_sa(fleet, key, value)
    assert (back.sa, back.replaces, back.node) == (sa, 0xC0000000, 7)


def test_child_sa_record_tamper_and_wrong_key(fleet, tmp_path):
    sa = child_sa(2)
    layout = Layout()
    key = layout.sa("site-c", sa.spi_in)
    value = encode_child_sa(fleet, key, sa)
    # Moved under another SPI: the store key is the associated data.
    with pytest.raises(SchemaError, match="copied from another record"):
        decode_child_sa(fleet, layout.sa("site-c", sa.spi_in + 1), value)
    obj = json.loads(value)
    blob = bytearray(base64.b64decode(obj["keys"]))
    blob[-1] ^= 1
    obj["keys"] = base64.b64encode(bytes(blob)).decode()
    with pytest.raises(SchemaError, match="failed authentication"):
        decode_child_sa(fleet, key, json.dumps(obj).encode())
    other = FleetKey(b"another-fleet-key-0123456789abcdef-000")
    with pytest.raises(SchemaError, match="another fleet key"):
        decode_child_sa(other, key, value)
    with pytest.raises(SchemaError, match="not JSON"):
        decode_child_sa(fleet, key, b"\xff\x00")
    with pytest.raises(SchemaError, match="unknown format 2"):
        decode_child_sa(fleet, key, json.dumps({**json.loads(value), "format": 2}).encode())
    with pytest.raises(SchemaError, match="bad Child SA record"):
        decode_child_sa(fleet, key, json.dumps({"format": 1, "keys": "AA=="}).encode())
    assert layout.parse_sa(key) == ("site-c", sa.spi_in)
    with pytest.raises(SchemaError):
        layout.parse_sa("/xtransit/v1/sa/site-c/zz")


def _grep(paths: list[Path], needles: list[bytes]) -> list[tuple[str, bytes]]:
    """(file, needle) for every needle found in a file: one regex pass per file, with the
    zero fill of preallocated files (etcd's 64 MiB WAL segments) cut off first."""
    pattern = re.compile(b"|".join(re.escape(n) for n in needles))
    hits = []
    for p in paths:
        data = p.read_bytes().rstrip(b"\0")
        hits += sorted({(str(p), m.group()) for m in pattern.finditer(data)})
    return hits


def test_keys_never_in_the_sqlite_file(tmp_path, fleet):
    path = tmp_path / "state.db"
    sas = [child_sa(i, integ_key_in=os.urandom(32)) for i in range(40)]
    with SqliteStore(path) as s:
        shared = SharedState(s, fleet, node=1)
        for sa in sas[:20]:
            shared.put_child_sa(sa)
        for old, new in zip(sas[:10], sas[20:30], strict=True):
            shared.rekey_child_sa(old.spi_in, new)
        for sa in sas[30:]:
            shared.put_child_sa(sa)
        shared.create_ike_sa(1, 2, 1, b"IKE-STATE-SK_d=" + sas[0].enc_key_in)
        files = [f for f in tmp_path.iterdir() if f.name.startswith("state.db")]
        assert {f.name for f in files} >= {"state.db", "state.db-wal"}
        needles = [n for sa in sas for n in secrets_of(sa)]
        assert _grep(files, needles) == []
        # The grep does see the data: public fields are in clear in the same files.
        assert _grep(files, [b"198.51.100.7", b"site-c/c0000027"]) != []
        assert shared.child_sa("site-c", sas[39].spi_in).sa == sas[39]


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    require_etcd()
    with EtcdCluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


def test_keys_never_in_the_etcd_data_dirs(etcd, fleet):
    sas = [child_sa(i, tunnel="grep-me", integ_key_out=os.urandom(20)) for i in range(30)]
    with etcd.client() as s:
        shared = SharedState(s, fleet, node=2)
        for sa in sas:
            shared.put_child_sa(sa)
        shared.create_ike_sa(3, 4, 1, b"IKE-STATE-SK_d=" + sas[1].enc_key_out)
        assert shared.child_sa("grep-me", sas[5].spi_in).sa == sas[5]
    # Positive control first: the records reached every member's raft log (wal/) and, once the
    # backend's batch commit ran (100 ms), its bbolt database (snap/db).
    marker = b"/xtransit/v1/sa/grep-me/c000001d"
    deadline = time.monotonic() + 10
    for m in etcd.members:
        assert _grep(list(m.data_dir.rglob("*.wal")), [marker]), m.name
        while not _grep([m.data_dir / "member" / "snap" / "db"], [marker]):
            assert time.monotonic() < deadline, f"{m.name}: record not in snap/db"
            time.sleep(0.1)
    files = [p for m in etcd.members for p in m.data_dir.rglob("*") if p.is_file()]
    assert len(files) >= 6
    needles = [n for sa in sas for n in secrets_of(sa)]
    assert _grep(files, needles) == []


# --- IKE SA records: compare-and-swap ---------------------------------------------------------
def test_ike_sa_cas_between_two_nodes(tmp_path, fleet):
    with SqliteStore(tmp_path / "s.db") as s:
        a = SharedState(s, fleet, node=1)
        b = SharedState(SqliteStore(tmp_path / "s.db"), fleet, node=2)
        rev = a.create_ike_sa(0x1111, 0x2222, 1, b"state v1")
        with pytest.raises(IkeSaConflict) as e:
            b.create_ike_sa(0x1111, 0x2222, 1, b"state from b")
        assert e.value.current.state == b"state v1" and e.value.current.node == 1
        seen_a, seen_b = a.ike_sa(0x1111, 0x2222), b.ike_sa(0x1111, 0x2222)
        assert seen_a.revision == seen_b.revision == rev
        # Both try to update from the same read: the second loses and sees the first's state.
        rev2 = b.update_ike_sa(0x1111, 0x2222, 1, b"state v2 by b", seen_b.revision)
        with pytest.raises(IkeSaConflict, match=f"expected revision {rev}") as e:
            a.update_ike_sa(0x1111, 0x2222, 1, b"state v2 by a", seen_a.revision)
        assert (e.value.current.state, e.value.current.revision, e.value.current.node) == \
            (b"state v2 by b", rev2, 2)
        assert "state v2" not in repr(e.value.current)
        with pytest.raises(IkeSaConflict):
            a.delete_ike_sa(0x1111, 0x2222, rev)
        a.delete_ike_sa(0x1111, 0x2222, rev2)
        assert a.ike_sa(0x1111, 0x2222) is None
        b.store.close()


# --- tunnels and routes ------------------------------------------------------------------------
def test_tunnels_and_routes_psk_left_out(tmp_path, fleet):
    psk = "site-c-psk-abcdefghijklmnop0123"
    cfg = C.load(EXAMPLES / "fleet.toml", env={"SITE_C_PSK": psk})
    with SqliteStore(tmp_path / "s.db") as s:
        shared = SharedState(s, fleet)
        for t in cfg.tunnels:
            shared.put_tunnel(t)
        for r in cfg.routes:
            shared.put_route(r)
        assert sorted(shared.routes(), key=str) == sorted(cfg.routes, key=str)
        rec = s.get("/xtransit/v1/tunnel/site-c")
        obj = json.loads(rec.value)
        assert (obj["kind"], obj["account_id"], obj["psk_source"], obj["customer_endpoint"]) == \
            ("ipsec", "123456789", "env:SITE_C_PSK", None)
        assert psk.encode() not in (tmp_path / "s.db-wal").read_bytes()
        assert s.get("/xtransit/v1/route/branch-1/172.21.0.0%2F16") is not None


# --- Hypothesis: any Child SA round-trips; any change to the sealed keys is refused ----------
_addr4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
_sel = st.builds(lambda a, b, proto, p1, p2: Selector(min(a, b), max(a, b), proto, min(p1, p2),
                                                      max(p1, p2)),
                 _addr4, _addr4, st.integers(0, 255), st.integers(0, 65535),
                 st.integers(0, 65535))
_port = st.none() | st.integers(1, 65535)
_keybytes = st.binary(min_size=0, max_size=64)


@st.composite
def child_sas(draw):
    return ChildSaParams(
        tunnel_name=draw(st.text(min_size=1, max_size=20).filter(lambda s: "\0" not in s)),
        tunnel_id=draw(st.text(max_size=32)), account_id=draw(st.text(max_size=12)),
        ike_sa=draw(st.text(max_size=40)), spi_in=draw(st.integers(1, 2**32 - 1)),
        spi_out=draw(st.integers(1, 2**32 - 1)),
        encr=draw(st.sampled_from(["aes-gcm-16", "aes-cbc", "null"])),
        encr_key_bits=draw(st.sampled_from([0, 128, 256])),
        integ=draw(st.none() | st.just("hmac-sha2-256-128")),
        local_addr=str(draw(_addr4)), remote_addr=str(draw(_addr4)),
        encap_local_port=draw(_port), encap_remote_port=draw(_port),
        replay_window=draw(st.integers(0, 4096)), esn=draw(st.booleans()),
        lifetime_soft_s=draw(st.integers(0, 10**6)), lifetime_hard_s=draw(st.integers(0, 10**6)),
        ts_local=tuple(draw(st.lists(_sel, max_size=3))),
        ts_remote=tuple(draw(st.lists(_sel, max_size=3))),
        enc_key_in=draw(_keybytes), enc_key_out=draw(_keybytes), salt_in=draw(_keybytes),
        salt_out=draw(_keybytes), integ_key_in=draw(_keybytes), integ_key_out=draw(_keybytes))


FLEET_FOR_PROPS = FleetKey(b"hypothesis-fleet-key-0123456789abcdef-x")


@settings(max_examples=150, deadline=None)
@given(sa=child_sas(), flip=st.integers(0, 10**6), bit=st.integers(0, 7))
def test_child_sa_round_trip_and_tamper(sa, flip, bit):
    fleet = FLEET_FOR_PROPS
    key = Layout().sa(sa.tunnel_name, sa.spi_in)
    value = encode_child_sa(fleet, key, sa)
    back = decode_child_sa(fleet, key, value)
    assert back.sa == sa and (back.replaces, back.node) == (None, None)
    assert Layout().parse_sa(key) == (sa.tunnel_name, sa.spi_in)
    for k in (sa.enc_key_in, sa.enc_key_out, sa.integ_key_in, sa.integ_key_out):
        # (Keys of printable bytes could match the generated text fields by chance.)
        if len(k) >= 8 and any(b < 0x20 or b > 0x7E for b in k):
            assert k not in value and base64.b64encode(k) not in value
            assert k.hex().encode() not in value
    obj = json.loads(value)
    blob = bytearray(base64.b64decode(obj["keys"]))
    blob[flip % len(blob)] ^= 1 << bit
    obj["keys"] = base64.b64encode(bytes(blob)).decode()
    with pytest.raises(SchemaError):
        decode_child_sa(fleet, key, json.dumps(obj).encode())
