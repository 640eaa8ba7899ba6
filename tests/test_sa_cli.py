"""`xtransit sa list` and `xtransit sa export-keys --wireshark` against a real daemon.

The daemon (`xtransit run`) runs in a namespace with one IPsec tunnel; the real strongSwan peer
(../shared/peers/strongswan/peer.sh) is the customer router. `sa list` must show exactly the SPIs
and algorithms strongSwan reports (`swanctl --list-sas`) and no key; the exported Wireshark
tables must decrypt an ESP packet captured on the wire from that SA.
"""
from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from test_run import IPSEC, Log, config, xtransit

from pipeline.run import RUN_ROOT

REPO = Path(__file__).resolve().parents[1]
PEER_SH = (REPO / ".." / "shared" / "peers" / "strongswan" / "peer.sh").resolve()
PSK = "b-test-psk-of-enough-length-0123"
KEYID = "123456789_f5407d8db1a542b196c59f6d04ba8bd1"
PROBE = b"xtransit sa export-keys probe 0123456789"
WIRESHARK_IKE_COLUMNS = 8   # SPIi, SPIr, SK_ei, SK_er, encryption, SK_ai, SK_ar, integrity
WIRESHARK_ESP_COLUMNS = 8   # protocol, src, dst, SPI, encryption, key, authentication, key


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False, **kw)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


# --- what strongSwan reports ----------------------------------------------------------------

def swanctl_sas(ns_name: str) -> dict:
    """IKE SPIs, IKE algorithms, and the Child SA's SPIs and ESP algorithms from
    `swanctl --list-sas` in the peer's namespace (strongSwan's point of view: its ``in`` SPI is
    the one our edge sends with)."""
    out = subprocess.run([str(PEER_SH), "status", "--ns", ns_name], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    ike = re.search(r"ESTABLISHED, IKEv2, ([0-9a-f]{16})_i\*? ([0-9a-f]{16})_r", out)
    ike_alg = re.search(r"^\s+(AES_\S+/PRF_\S+)$", out, re.MULTILINE)
    child = re.search(r"INSTALLED, TUNNEL-in-UDP, ESP:(\S+)", out)
    spi_in = re.search(r"^\s+in\s+([0-9a-f]{8})", out, re.MULTILINE)
    spi_out = re.search(r"^\s+out\s+([0-9a-f]{8})", out, re.MULTILINE)
    assert ike and ike_alg and child and spi_in and spi_out, out
    return {"spi_i": ike[1], "spi_r": ike[2], "ike_alg": ike_alg[1], "esp_alg": child[1],
            "peer_in": spi_in[1], "peer_out": spi_out[1]}


# --- decrypting one captured ESP-in-UDP packet with only the exported key row -----------------

def _esp_from_frame(frame: bytes) -> bytes | None:
    """The ESP packet inside an Ethernet/IPv4/UDP(4500) frame; None for IKE or keepalives."""
    if len(frame) < 14 + 20 + 8 + 8 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return None
    ihl = (frame[14] & 0x0F) * 4
    udp = frame[14 + ihl:]
    if struct.unpack("!H", udp[2:4])[0] != 4500 or udp[8:12] == bytes(4):
        return None
    return udp[8:]


def decrypt_esp(esp: bytes, row: list[str]) -> tuple[int, bytes]:
    """(next header, inner packet) of one ESP packet (RFC 4303), from a Wireshark esp_sa row."""
    encr, key, integ, akey = row[4], bytes.fromhex(row[5][2:]), row[6], row[7]
    spi_seq = esp[:8]
    if encr == "AES-GCM with 16 octet ICV [RFC4106]":
        assert integ == "NULL" and akey == ""
        k, salt = key[:-4], key[-4:]                 # RFC 4106 8.1: key || 4-byte salt
        iv = esp[8:16]
        plain = AESGCM(k).decrypt(salt + iv, esp[16:], spi_seq)   # AAD: SPI || seq (no ESN)
    elif encr == "AES-CBC [RFC3602]":
        assert integ == "HMAC-SHA-256-128 [RFC4868]"
        icv = esp[-16:]
        mac = hmac.new(bytes.fromhex(akey[2:]), esp[:-16], hashlib.sha256).digest()[:16]
        assert hmac.compare_digest(mac, icv), "ICV mismatch with the exported integrity key"
        iv, ct = esp[8:24], esp[24:-16]
        d = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
        plain = d.update(ct) + d.finalize()
    else:
        raise AssertionError(f"unexpected algorithm {encr}")
    pad_len, next_header = plain[-2], plain[-1]
    body = plain[: len(plain) - 2 - pad_len]
    assert plain[len(body):-2] == bytes(range(1, pad_len + 1))   # RFC 4303 2.4 padding
    return next_header, body


# --- the daemon with a strongSwan peer --------------------------------------------------------

def peer_up(cust, *args: str) -> None:
    up = subprocess.run(
        [str(PEER_SH), "up", "--ns", cust.name, "--local", "10.99.0.2/24", "--remote",
         "192.0.2.1", "--id-type", "keyid", "--id", KEYID, "--psk", PSK, "--timeout", "10",
         "--retries", "2", *args],
        check=False, capture_output=True, text=True, timeout=60)
    assert up.returncode == 0, up.stderr[-2000:]


@pytest.fixture
def edge_and_peer(lab, tmp_path, request):
    """The daemon with one IPsec tunnel (site-b) and strongSwan up as its customer; the
    parameter is peer.sh's extra arguments, e.g. ("--esp", "aes256gcm16")."""
    edge, cust = lab.namespace("sa"), lab.namespace("sw")
    lab.veth(cust, "c0", edge, "e0", "10.99.0.2/24", "10.99.0.1/24")
    edge.add_address("lo", "192.0.2.1/32")
    cust.add_route("192.0.2.1/32", gateway="10.99.0.1")
    (tmp_path / "site-b.psk").write_text(PSK + "\n")
    (tmp_path / "site-b.psk").chmod(0o600)
    node = f"t-sa-{os.getpid()}-{edge.name.rsplit('-', 1)[1]}"
    cfg = tmp_path / "edge.toml"
    cfg.write_text(config(node, "e0", "10.1.0.0/24", str(tmp_path / "h.db"))
                   + IPSEC.format(state=tmp_path / "state.db"))
    proc = xtransit("run", "--config", str(cfg), "--log-format", "json", netns=edge.name)
    log = Log(proc)
    try:
        log.wait("started", 90)
        peer_up(cust, *request.param)
        log.wait("sa_installed", 10)
        yield proc, log, cfg, node, edge, cust, request.param
    finally:
        subprocess.run([str(PEER_SH), "down", "--ns", cust.name], check=False,
                       capture_output=True, timeout=30)
        _stop(proc)


@pytest.mark.netns
@pytest.mark.peer
@pytest.mark.parametrize("edge_and_peer", [("--esp", "aes256gcm16"), ("--esp", "aes128-sha256")],
                         indirect=True, ids=["aes256gcm16", "aes128-sha256"])
def test_list_and_export_keys_with_strongswan(edge_and_peer, lab, tmp_path):
    proc, log, cfg, node, _edge, cust, (_, esp) = edge_and_peer
    sw = swanctl_sas(cust.name)
    want_esp = {"aes256gcm16": "AES_GCM_16-256", "aes128-sha256": "AES_CBC-128/HMAC_SHA2_256_128"}

    # sa list --json: the SA exactly as strongSwan sees it (its "in" SPI is our outbound one)
    def one_child() -> bool:       # the status file is rewritten every second
        r = cli("sa", "list", "-c", str(cfg), "--json")
        return r.returncode == 0 and [len(x["children"]) for x in json.loads(r.stdout)] == [1]
    assert _wait(one_child, 5)
    listed = cli("sa", "list", "-c", str(cfg), "--json")
    assert listed.returncode == 0, listed.stderr
    (ike,) = json.loads(listed.stdout)
    (child,) = ike["children"]
    assert (ike["ike_spi_i"], ike["ike_spi_r"]) == (sw["spi_i"], sw["spi_r"])
    assert (child["spi_in"], child["spi_out"]) == (sw["peer_out"], sw["peer_in"])
    assert ike["algorithms"] == sw["ike_alg"] == "AES_GCM_16-256/PRF_HMAC_SHA2_256/ECP_384"
    assert child["algorithms"] == sw["esp_alg"] == want_esp[esp]
    assert (ike["tunnel"], ike["state"], ike["role"], ike["nat_t"]) == (
        "site-b", "established", "responder", True)      # libipsec always floats (peer README)
    assert (ike["peer"], ike["local"]) == ("10.99.0.2:4500", "192.0.2.1:4500")
    assert (child["ts_local"], child["ts_remote"]) == (
        ["10.10.2.0-10.10.2.255 proto 0 ports 0-65535"],
        ["10.10.1.0-10.10.1.255 proto 0 ports 0-65535"])

    # the table: one IKE SA line and one Child SA line with the same values
    text = cli("sa", "list", "-c", str(cfg))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split() == ["TUNNEL", "IKE", "SPI", "I", "IKE", "SPI", "R", "STATE", "ROLE",
                                "LOCAL", "PEER", "NAT-T", "ALGORITHMS", "AGE"]
    assert lines[1].split()[:9] == ["site-b", sw["spi_i"], sw["spi_r"], "established",
                                    "responder", "192.0.2.1:4500", "10.99.0.2:4500", "yes",
                                    sw["ike_alg"]]
    assert lines[2].split()[:6] == ["CHILD", "SPI", "IN", "SPI", "OUT", "ALGORITHMS"]
    assert lines[3].split()[:4] == [sw["peer_out"], sw["peer_in"], sw["esp_alg"], "-"]
    assert lines[3].endswith("10.10.2.0/24 === 10.10.1.0/24")
    assert len(lines) == 4

    # one real ESP packet from the peer's SA, captured as it leaves the customer router
    port = lab.port(cust, "c0")
    with cust.enter():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.bind(("10.10.1.1", 0))
        s.sendto(PROBE, ("10.10.2.1", 9))
    frame = port.recv(5, match=lambda f: _esp_from_frame(f) is not None, outgoing=True)
    assert frame is not None, "no ESP-in-UDP packet from the peer"
    captured = _esp_from_frame(frame)
    assert captured[:4].hex() == sw["peer_out"]

    # the data path counts it; sa list reports the data path's per-SA bytes
    def status() -> dict:
        return json.loads((RUN_ROOT / node / "status.json").read_text())

    def in_bytes() -> int:
        sas = status()["ipsec"]["tunnels"]["site-b"]["sas"]
        return next(x["bytes"] for x in sas if x["direction"] == "in"
                    and x["spi"] == int(sw["peer_out"], 16))
    assert _wait(lambda: in_bytes() > 0, 5)
    (again,) = json.loads(cli("sa", "list", "-c", str(cfg), "--json").stdout)
    assert again["children"][0]["bytes_in"] == in_bytes()

    # export-keys: only the two paths on stdout, a warning on stderr, files 0600
    out_dir = tmp_path / "keys"
    exp = cli("sa", "export-keys", "--wireshark", str(out_dir), "-c", str(cfg))
    assert exp.returncode == 0, exp.stderr
    assert exp.stdout == f"{out_dir / 'ikev2_decryption_table'}\n{out_dir / 'esp_sa'}\n"
    assert exp.stderr == ("warning: these files hold the keys of 1 IKE SA(s) and 2 ESP SA(s) "
                          "(mode 0600): anyone who reads them can decrypt this node's traffic; "
                          "delete them when done\n")
    for name in ("ikev2_decryption_table", "esp_sa"):
        assert stat.S_IMODE((out_dir / name).stat().st_mode) == 0o600
    ike_rows = list(csv.reader(io.StringIO((out_dir / "ikev2_decryption_table").read_text())))
    esp_rows = list(csv.reader(io.StringIO((out_dir / "esp_sa").read_text())))
    assert [len(r) for r in ike_rows] == [WIRESHARK_IKE_COLUMNS]
    assert [len(r) for r in esp_rows] == [WIRESHARK_ESP_COLUMNS] * 2
    assert ike_rows[0][:2] == [sw["spi_i"], sw["spi_r"]]
    assert ike_rows[0][4] == "AES-GCM-256 with 16 octet ICV [RFC5282]"
    assert {tuple(r[:4]) for r in esp_rows} == {
        ("IPv4", "10.99.0.2", "192.0.2.1", f"0x{sw['peer_out']}"),
        ("IPv4", "192.0.2.1", "10.99.0.2", f"0x{sw['peer_in']}")}
    row = next(r for r in esp_rows if r[3] == f"0x{sw['peer_out']}")
    next_header, inner = decrypt_esp(captured, row)
    assert next_header == 4                                   # IPv4 in tunnel mode
    ihl = (inner[0] & 0x0F) * 4
    assert (socket.inet_ntoa(inner[12:16]), socket.inet_ntoa(inner[16:20]), inner[9]) == (
        "10.10.1.1", "10.10.2.1", 17)
    assert struct.unpack("!H", inner[ihl + 2:ihl + 4])[0] == 9
    assert inner[ihl + 8:] == PROBE

    # keys_exported: logged once, counts only
    ev = log.wait("keys_exported", 10)
    assert (ev["ike_sas"], ev["esp_sas"], ev["uid"]) == (1, 2, 0)

    # no key and no PSK in list output or in the daemon's log
    secrets = {PSK, PSK.encode().hex()}
    for r in ike_rows:
        secrets |= {v for v in (r[2], r[3], r[5], r[6]) if v}
    for r in esp_rows:
        secrets |= {v[2:] for v in (r[5], r[7]) if v}
    secrets |= {s[:16] for s in list(secrets)}          # no fragment of one either
    _stop(proc)
    assert proc.returncode == 0
    log.wait("stopped", 10)
    logged = "\n".join(json.dumps(e) for e in log.seen)
    for output in (listed.stdout, text.stdout, logged, exp.stdout, exp.stderr):
        for secret in secrets:
            assert secret not in output and secret.upper() not in output

    # the socket goes with the daemon
    assert not (RUN_ROOT / node / "control.sock").exists()
    assert not (RUN_ROOT / node).exists()


def test_without_a_daemon_both_commands_exit_1(tmp_path):
    node = f"t-sa-none-{os.getpid()}"
    cfg = tmp_path / "edge.toml"
    cfg.write_text(config(node, "e0", "10.1.0.0/24"))
    out = tmp_path / "keys"
    exp = cli("sa", "export-keys", "--wireshark", str(out), "-c", str(cfg))
    assert exp.returncode == 1
    assert exp.stdout == ""
    assert exp.stderr == (f"xtransit sa export-keys: no running xtransit daemon for node "
                          f"{node!r} (no control socket at {RUN_ROOT / node / 'control.sock'}: "
                          "is `xtransit run` running for this node?)\n")
    assert not out.exists()
    lst = cli("sa", "list", "-c", str(cfg))
    assert lst.returncode == 1
    assert lst.stderr == (f"xtransit sa list: no running xtransit daemon for node {node!r}: "
                          f"{RUN_ROOT / node / 'status.json'} does not exist (start one with "
                          "`xtransit run -c CONFIG`)\n")


def test_list_with_a_dead_daemons_status_file_exits_1(tmp_path):
    """A daemon killed with SIGKILL leaves its status file: the pid in it decides."""
    node = f"t-sa-dead-{os.getpid()}"
    cfg = tmp_path / "edge.toml"
    cfg.write_text(config(node, "e0", "10.1.0.0/24"))
    dead = subprocess.Popen(["true"])
    dead.wait()
    d = RUN_ROOT / node
    d.mkdir(parents=True)
    try:
        (d / "status.json").write_text(json.dumps({"node": node, "pid": dead.pid,
                                                   "ike_sas": [], "ipsec": None}))
        lst = cli("sa", "list", "-c", str(cfg))
        assert lst.returncode == 1
        assert lst.stderr == (f"xtransit sa list: no running xtransit daemon for node {node!r}: "
                              f"the daemon that wrote {d / 'status.json'} (pid {dead.pid}) is "
                              "not running\n")
    finally:
        (d / "status.json").unlink()
        d.rmdir()


@pytest.mark.netns
def test_control_socket_serves_root_only(lab):
    """Mode 0600 keeps `nobody` out at connect; a `nobody` client that gets past the mode
    (CAP_DAC_OVERRIDE kept through setpriv) is refused by the SO_PEERCRED check."""
    a, b = lab.namespace("sa"), lab.namespace("peer")
    lab.veth(a, "e0", b, "p0", "10.99.0.1/24", "10.99.0.2/24")
    node = f"t-sa-{os.getpid()}-{a.name.rsplit('-', 1)[1]}"
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:     # readable by nobody
        os.chmod(tmp, 0o755)
        cfg = Path(tmp) / "edge.toml"
        cfg.write_text(config(node, "e0", "10.1.0.0/24", str(Path(tmp) / "h.db")))
        cfg.chmod(0o644)
        out = Path(tmp) / "keys"
        proc = xtransit("run", "--config", str(cfg), "--log-format", "json", netns=a.name)
        try:
            log = Log(proc)
            log.wait("started", 90)
            sock = RUN_ROOT / node / "control.sock"
            assert _wait(sock.exists, 5)
            st = sock.stat()
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
            assert st.st_uid == 0

            args = [sys.executable, "-m", "pipeline.cli", "sa", "export-keys", "--wireshark",
                    str(out), "-c", str(cfg)]
            plain = subprocess.run(["runuser", "-u", "nobody", "--", *args], cwd=REPO,
                                   capture_output=True, text=True, timeout=60, check=False)
            assert plain.returncode == 1
            assert plain.stderr == (f"xtransit sa export-keys: {sock}: permission denied (run "
                                    "as root or as the daemon's user)\n")
            past_mode = subprocess.run(
                ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                 "--inh-caps=+dac_override", "--ambient-caps=+dac_override", "--", *args],
                cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
            assert past_mode.returncode == 1
            uid = int(subprocess.run(["id", "-u", "nobody"], capture_output=True, text=True,
                                     check=True).stdout)
            assert past_mode.stderr == (
                f"xtransit sa export-keys: the daemon refused: permission denied: uid {uid} is "
                "neither root nor the daemon's user\n")
            assert not out.exists()

            # root is served; this node has no IPsec tunnel, so there is nothing to export
            root = cli("sa", "export-keys", "--wireshark", str(out), "-c", str(cfg))
            assert root.returncode == 1
            assert root.stderr == ("xtransit sa export-keys: the daemon refused: this node has "
                                   "no IPsec tunnels: no keys to export\n")
            assert not out.exists()
            assert _wait((RUN_ROOT / node / "status.json").exists, 5)
            lst = cli("sa", "list", "-c", str(cfg))
            assert (lst.returncode, lst.stdout) == (0, "no IKE SAs\n")
            _stop(proc)
            assert proc.returncode == 0
            assert not sock.exists()
        finally:
            _stop(proc)


def _sa_list(cfg: Path, *, check: bool = True) -> list[dict]:
    r = cli("sa", "list", "-c", str(cfg), "--json")
    if not check and r.returncode != 0:
        return []                   # the daemon writes its first status file within a second
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


EDGE_IDR = "fqdn:f5407d8db1a542b196c59f6d04ba8bd1.123456789.ipsec.example.net"


@pytest.mark.netns
@pytest.mark.peer
@pytest.mark.parametrize("edge_and_peer", [("--remote-id", EDGE_IDR)], indirect=True,
                         ids=["remote-id"])
def test_router_crash_and_restart_initial_contact_clears_the_data_path(edge_and_peer):
    """The router crashes (charon SIGKILLed: no DELETE) and starts again with the same config;
    its INITIAL_CONTACT (strongSwan sends it when the remote ID is specific, see
    test_ike_strongswan.py) makes the daemon delete the older IKE SA and its Child SA, in the
    native ESP data path too: `sa list` and the data path's SAs hold only the new pair."""
    _proc, log, cfg, node, _edge, cust, args = edge_and_peer
    assert _wait(lambda: [len(x["children"]) for x in _sa_list(cfg, check=False)] == [1], 5)
    (old,) = _sa_list(cfg)
    state = Path(os.environ.get("TMPDIR", "/tmp")) / "swan-peer" / cust.name
    os.kill(int((state / "run" / "charon.pid").read_text()), signal.SIGKILL)
    subprocess.run([str(PEER_SH), "down", "--ns", cust.name, "--no-delete"], check=True,
                   capture_output=True, timeout=30)
    peer_up(cust, *args)
    sw = swanctl_sas(cust.name)
    assert sw["spi_i"] != old["ike_spi_i"]

    down = log.wait("ike_sa_down", 10)
    assert (down["reason"], down["ike_sa"], down["tunnel"]) == (
        "initial_contact", f"{old['ike_spi_i']}/{old['ike_spi_r']}", "site-b")
    old_spi = old["children"][0]["spi_in"]
    assert log.wait("sa_deleted", 10)["spi_in"] == f"0x{old_spi}"

    def settled() -> bool:
        rows = _sa_list(cfg)
        return len(rows) == 1 and rows[0]["ike_spi_i"] == sw["spi_i"]
    assert _wait(settled, 5)
    (new,) = _sa_list(cfg)
    assert (new["ike_spi_i"], new["ike_spi_r"], new["state"]) == (sw["spi_i"], sw["spi_r"],
                                                                  "established")
    assert [(c["spi_in"], c["spi_out"]) for c in new["children"]] == [(sw["peer_out"],
                                                                      sw["peer_in"])]
    status = json.loads((RUN_ROOT / node / "status.json").read_text())
    in_dp = {(x["direction"], f"{x['spi']:08x}")
             for x in status["ipsec"]["tunnels"]["site-b"]["sas"]}
    assert in_dp == {("in", sw["peer_out"]), ("out", sw["peer_in"])}


# --- the control socket alone: bad input gets a clear answer, never a crash or a hang ---------

def test_control_socket_answers_bad_requests(tmp_path, monkeypatch):
    import asyncio

    from pipeline import control
    monkeypatch.setattr(control, "REQUEST_TIMEOUT_S", 0.3)
    path = tmp_path / "n" / "control.sock"
    calls = []

    def export(uid):
        calls.append(uid)
        return {"esp_sa": "x\n"}

    def broken(uid):
        raise ValueError("boom")

    def raw(data: bytes | None) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(path))
            if data is not None:
                s.sendall(data)
            buf = b""
            while chunk := s.recv(65536):
                buf += chunk
        return json.loads(buf)

    async def main():
        path.parent.mkdir()
        path.write_text("stale")          # a leftover file is replaced
        path.unlink()
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(path))             # a socket nobody listens on: replaced
        stale.close()
        srv = await control.ControlServer(path, {"export-keys": export,
                                                 "broken": broken}).start()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with pytest.raises(control.ControlError, match="another daemon answers on it"):
            await control.ControlServer(path, {}).start()
        run = asyncio.get_running_loop().run_in_executor
        try:
            bad = {"ok": False, "error": 'bad request: expected one line {"request": NAME}'}
            assert await run(None, raw, b"not json\n") == bad
            assert await run(None, raw, b'{"req": 1}\n') == bad
            assert await run(None, raw, b"x" * 10000 + b"\n") == bad     # over MAX_REQUEST
            assert await run(None, raw, None) == bad                    # silent: timed out
            assert await run(None, raw, b'{"request": "nope"}\n') == {
                "ok": False, "error": "unknown request 'nope'; known: broken, export-keys"}
            assert await run(None, raw, b'{"request": "broken"}\n') == {
                "ok": False, "error": "ValueError: boom"}
            got = await run(None, control.request, path, "export-keys")
            assert got == {"ok": True, "esp_sa": "x\n"} and calls == [os.getuid()]
        finally:
            await srv.close()
        assert not path.exists()

    asyncio.run(main())
    with pytest.raises(control.ControlError, match="no control socket at"):
        control.request(path, "export-keys")
