"""The data path's SaInstaller (pipeline/ipsec.py) on the native ESP module, without the network:
install / replace / delete semantics, counters banked per tunnel, static SAs from a file.
Packets are built and checked with the independent reference (tests/esp_support.py)."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from esp_support import RefSa, ipv4, outer_ipv4, ref_decrypt, ref_encrypt

from pipeline import config, esp, ipsec
from pipeline.sa import ChildSaParams, SaInstaller

REPO = Path(__file__).resolve().parent.parent
LOCAL, REMOTE = "192.0.2.1", "192.0.2.2"
K1, S1, K2, S2 = bytes(range(16)), b"\x01\x02\x03\x04", bytes(range(16, 32)), b"\x05\x06\x07\x08"


def child(spi_in: int, spi_out: int, tunnel: str = "tid", key_in: bytes = K1,
          key_out: bytes = K2, **kw) -> ChildSaParams:
    return ChildSaParams(tunnel_name="t", tunnel_id=tunnel, account_id="a", ike_sa="x",
                         spi_in=spi_in, spi_out=spi_out, encr="aes-gcm-16", encr_key_bits=128,
                         integ=None, local_addr=LOCAL, remote_addr=REMOTE, enc_key_in=key_in,
                         enc_key_out=key_out, salt_in=S1, salt_out=S2, **kw)


@pytest.fixture
def dp():
    d = ipsec.IpsecDataPath({"tid": ipsec.TunnelInfo("t", 5, replay_protection=True)},
                            node_id=0x0102)
    yield d
    d.close()


def decrypt(dp, packets: list[bytes]) -> list[tuple[str, bytes | None]]:
    with dp.ctx.worker() as w:
        b = esp.PacketBatch(len(packets))
        b.fill(packets)
        w.decrypt(b)
        return b.results()


def encrypt(dp, inner: bytes, tunnel: int = 5) -> tuple[str, bytes | None]:
    with dp.ctx.worker() as w:
        b = esp.PacketBatch(1)
        b.fill([inner], tunnel=tunnel)
        w.encrypt(b)
        return b.results()[0]


INNER = ipv4(b"payload", "10.10.0.1", "198.51.100.9", ttl=60)


def from_peer(spi: int, seq: int, key: bytes = K1, salt: bytes = S1) -> bytes:
    return outer_ipv4(ref_encrypt(RefSa(spi, "aes-gcm-16", key, salt), INNER, seq, bytes(8)),
                      src=REMOTE, dst=LOCAL)


def test_is_an_sa_installer(dp):
    assert isinstance(dp, SaInstaller)


def test_install_pair_both_directions(dp):
    dp.install(child(0x100, 0x200))
    assert decrypt(dp, [from_peer(0x100, 1)]) == [("ok", INNER)]
    verdict, out = encrypt(dp, INNER)
    assert verdict == "ok"
    assert out[9] == 50 and out[12:16] == bytes([192, 0, 2, 1]) and out[16:20] == bytes([192, 0, 2, 2])
    nh, plain, seq = ref_decrypt(RefSa(0x200, "aes-gcm-16", K2, S2), out[20:])
    assert (nh, plain, seq) == (4, INNER, 1)
    assert out[28:30] == b"\x01\x02"          # the node id leads the IV (anycast IV uniqueness)
    assert dp.installed() == {0x100: ("t", 5, 0x200, True)}


def test_inbound_checks_destination_endpoint(dp):
    dp.install(child(0x100, 0x200))
    other = outer_ipv4(ref_encrypt(RefSa(0x100, "aes-gcm-16", K1, S1), INNER, 1, bytes(8)),
                       src=REMOTE, dst="192.0.2.77")
    assert decrypt(dp, [other]) == [("unknown_spi", None)]


def test_replace_keeps_old_inbound_until_delete(dp):
    dp.install(child(0x100, 0x200))
    assert decrypt(dp, [from_peer(0x100, 1)])[0][0] == "ok"
    assert encrypt(dp, INNER)[0] == "ok"            # one packet out under the old SA
    k3, k4 = b"\x33" * 16, b"\x44" * 16
    dp.replace(0x100, child(0x101, 0x201, key_in=k3, key_out=k4))
    # both inbound SAs accept
    assert decrypt(dp, [from_peer(0x100, 2), from_peer(0x101, 1, key=k3)]) == [("ok", INNER)] * 2
    # outbound is the new SA at once, starting at sequence 1
    _, out = encrypt(dp, INNER)
    assert ref_decrypt(RefSa(0x201, "aes-gcm-16", k4, S2), out[20:])[2] == 1
    assert dp.installed() == {0x100: ("t", 5, 0x200, False), 0x101: ("t", 5, 0x201, True)}
    # deleting the old pair removes only the old inbound SA
    dp.delete(0x100)
    assert decrypt(dp, [from_peer(0x100, 3), from_peer(0x101, 2, key=k3)]) == [
        ("unknown_spi", None), ("ok", INNER)]
    assert encrypt(dp, INNER)[0] == "ok"
    st = dp.stats()["tunnels"]["t"]
    assert st["in"]["packets"] == 4                 # 2 under the old SA (banked) + 2 new
    assert st["out"]["packets"] == 3                # 1 old (banked) + 2 new
    dp.delete(0x101)
    assert encrypt(dp, INNER)[0] == "unknown_tunnel"
    assert dp.stats()["tunnels"]["t"]["in"]["packets"] == 4
    dp.delete(0x101)                                # already gone: no error


def test_second_install_for_a_tunnel_keeps_counts(dp):
    """A new pair for a tunnel without a rekey exchange (a new IKE SA after INITIAL_CONTACT):
    outbound switches, the older inbound SA stays until deleted, no count is lost."""
    dp.install(child(0x100, 0x200))
    assert encrypt(dp, INNER)[0] == "ok"
    dp.install(child(0x101, 0x201, key_out=b"\x44" * 16))
    _, out = encrypt(dp, INNER)
    assert ref_decrypt(RefSa(0x201, "aes-gcm-16", b"\x44" * 16, S2), out[20:])[2] == 1
    assert dp.stats()["tunnels"]["t"]["out"]["packets"] == 2
    assert decrypt(dp, [from_peer(0x100, 1)]) == [("ok", INNER)]


def test_duplicate_inbound_spi_refused(dp):
    dp.install(child(0x100, 0x200))
    with pytest.raises(ipsec.IpsecError, match="already installed"):
        dp.install(child(0x100, 0x300))


def test_unknown_tunnel_refused(dp):
    with pytest.raises(ipsec.IpsecError, match="unknown IPsec tunnel"):
        dp.install(child(0x100, 0x200, tunnel="nope"))


def test_replay_protection_follows_the_tunnel():
    for protect, want in ((True, ["ok", "replay"]), (False, ["ok", "ok"])):
        d = ipsec.IpsecDataPath({"tid": ipsec.TunnelInfo("t", 5, replay_protection=protect)})
        try:
            d.install(child(0x100, 0x200))
            pkt = from_peer(0x100, 1)
            assert [v for v, _ in decrypt(d, [pkt, pkt])] == want
        finally:
            d.close()


def test_esn_refused_clearly(dp):
    with pytest.raises(esp.EspError, match="extended sequence numbers"):
        dp.install(child(0x100, 0x200, esn=True))
    assert dp.installed() == {}


def test_natt_outbound_is_udp_encapsulated(dp):
    dp.install(child(0x100, 0x200, encap_local_port=4500, encap_remote_port=41000))
    _, out = encrypt(dp, INNER)
    assert out[9] == 17
    assert struct.unpack("!HH", out[20:24]) == (4500, 41000)
    assert ref_decrypt(RefSa(0x200, "aes-gcm-16", K2, S2), out[28:])[1] == INNER


def test_keys_never_in_repr_or_errors(dp):
    sa = child(0x100, 0x200, key_in=b"\xab" * 16)
    assert "abab" not in repr(sa) and "\\xab" not in repr(sa)
    bad = child(0x100, 0x200, key_in=b"\xab" * 15)
    with pytest.raises(esp.EspError) as e:
        dp.install(bad)
    assert "ab" * 4 not in str(e.value) and "\\xab" not in str(e.value)


def test_config_tunnels(dp):
    cfg = config.load(REPO / "examples" / "edge.toml")
    d = ipsec.IpsecDataPath.from_config(cfg)
    try:
        t = cfg.tunnel("site-b")
        info = d.tunnel(t.id)
        assert (info.name, info.index, info.mss, info.replay_protection) == ("site-b", 2, 1360,
                                                                            False)
        assert d.node_id == cfg.node.id
    finally:
        d.close()


# --- static SAs --------------------------------------------------------------------------------

STATIC = """
[[sa]]
tunnel = "debug-1"
index = 77
local = "192.0.2.1"
remote = "192.0.2.2"
spi_in = 0x10000001
spi_out = 0x20000001
encryption = "aes-gcm-16"
enc_key_in = "000102030405060708090a0b0c0d0e0f01020304"
enc_key_out = "101112131415161718191a1b1c1d1e1f05060708"
replay_window = 0

[[sa]]
tunnel = "debug-2"
index = 78
local = "192.0.2.1"
remote = "198.51.100.3"
spi_in = 0x10000002
spi_out = 0x20000002
encryption = "aes-cbc"
integrity = "hmac-sha1-96"
enc_key_in = "00112233445566778899aabbccddeeff"
enc_key_out = "ffeeddccbbaa99887766554433221100"
integ_key_in = "0102030405060708090a0b0c0d0e0f1011121314"
integ_key_out = "1415161718191a1b1c1d1e1f2021222324252627"
encap_local_port = 4500
encap_remote_port = 4500
"""


def write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    p = tmp_path / "static.toml"
    p.write_text(text)
    os.chmod(p, mode)
    return p


def test_static_sas_installed_and_work(tmp_path):
    entries = ipsec.load_static_sas(write(tmp_path, STATIC))
    assert [(i.name, i.index) for i, _ in entries] == [("debug-1", 77), ("debug-2", 78)]
    d = ipsec.IpsecDataPath({})
    try:
        ipsec.install_static(d, entries)
        assert sorted(d.installed()) == [0x10000001, 0x10000002]
        pkt = outer_ipv4(ref_encrypt(RefSa(0x10000001, "aes-gcm-16", bytes(range(16)),
                                           b"\x01\x02\x03\x04"), INNER, 9, bytes(8)),
                         src=REMOTE, dst=LOCAL)
        assert decrypt(d, [pkt]) == [("ok", INNER)]
        verdict, out = encrypt(d, INNER, tunnel=78)
        assert verdict == "ok" and out[9] == 17
        ref = RefSa(0x20000002, "aes-cbc", bytes.fromhex("ffeeddccbbaa99887766554433221100"),
                    b"", "hmac-sha1-96",
                    bytes.fromhex("1415161718191a1b1c1d1e1f2021222324252627"))
        assert ref_decrypt(ref, out[28:])[1] == INNER
    finally:
        d.close()


def test_static_file_readable_by_others_refused(tmp_path):
    with pytest.raises(ipsec.IpsecError, match="chmod 600"):
        ipsec.load_static_sas(write(tmp_path, STATIC, 0o644))


@pytest.mark.parametrize("edit,match", [
    (("replay_window = 0", "replay_windw = 0"), r"sa\[0\]: unknown key"),
    (('enc_key_in = "000102030405060708090a0b0c0d0e0f01020304"', 'enc_key_in = "zz5ecret"'),
     r"sa\[0\]\.enc_key_in: expected a hex string \(value not shown\)"),
    (('enc_key_in = "000102030405060708090a0b0c0d0e0f01020304"',
      'enc_key_in = "000102030405060708090a0b0c0d0e0f"'), r"key \|\| 4-byte salt"),
    (('remote = "192.0.2.2"', 'remote = "nowhere"'), r"sa\[0\]\.remote: not an IPv4"),
    (("index = 77\n", ""), r"sa\[0\]: missing index"),
    (("encap_local_port = 4500\n", ""), "needs encap_local_port and encap_remote_port"),
])
def test_static_file_errors_name_the_field(tmp_path, edit, match):
    text = STATIC.replace(*edit, 1)
    with pytest.raises(ipsec.IpsecError, match=match) as e:
        ipsec.load_static_sas(write(tmp_path, text))
    assert "5ecret" not in str(e.value) and "0001020304" not in str(e.value)
