"""`xtransit run`: exit statuses, SIGHUP reload as map updates, SIGTERM leaves nothing attached.

The daemon runs as a real process in a namespace (nsenter --net, so its pinned maps are in the
host's BPF filesystem) with one veth pair to a second namespace.
"""
from __future__ import annotations

import ipaddress
import json
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.xdp import maps

REPO = Path(__file__).resolve().parents[1]


def config(node: str, ifname: str, prefix: str, history: str = "/nonexistent/a.db") -> str:
    return f"""
[node]
id = 9
name = "{node}"
ipsec_domain = "example.net"
tunnel_endpoints = ["192.0.2.1"]

[[node.interfaces]]
name = "{ifname}"
role = "both"

[tunnels.gre.site-a]
id = "0123456789abcdef0123456789abcdef"
index = 1
customer_endpoint = "198.51.100.10"
edge_endpoint = "192.0.2.1"
interface_address = "10.200.0.0/31"

[[routes]]
prefix = "{prefix}"
tunnel = "site-a"

[analytics]
http_port = 0
history_file = "{history}"
"""


def xtransit(*args: str, netns: str | None = None, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    if netns is not None:
        cmd = ["nsenter", f"--net=/run/netns/{netns}", "--", *cmd]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def test_invalid_config_exits_2(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(config("n", "eth0", "10.1.0.0/24").replace('prefix = "10.1.0.0/24"',
                                                                'prefix = "10.1.0.1/24"'))
    p = xtransit("run", "--config", str(cfg))
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2
    assert f"{cfg}: routes[0].prefix: host bits set in '10.1.0.1/24'" in err
    assert "1 error; nothing started" in err


def test_missing_config_file_exits_2(tmp_path):
    p = xtransit("run", "--config", str(tmp_path / "none.toml"))
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2
    assert "none.toml: file not found" in err


@pytest.mark.netns
def test_missing_interface_exits_3(lab, tmp_path):
    ns = lab.namespace("run")
    cfg = tmp_path / "edge.toml"
    cfg.write_text(config(f"t-run-{os.getpid()}", "nosuch0", "10.1.0.0/24"))
    p = xtransit("run", "--config", str(cfg), netns=ns.name)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 3
    assert "no such interface in this network namespace: nosuch0 (node.interfaces[0])" in err


class Log:
    """The daemon's JSON log lines (stderr), read by a thread."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: queue.Queue[dict] = queue.Queue()
        self.seen: list[dict] = []
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                self.lines.put({"raw": line.rstrip()})

    def wait(self, want: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                e = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            self.seen.append(e)
            if e.get("event") == want:
                return e
        raise AssertionError(f"no {want} event within {timeout} s; log: {self.seen}")


def _routes4(node: str) -> set[str]:
    fd = maps.open_pinned(maps.pin_dir(node) / "xt_routes4")
    try:
        out = set()
        for k in maps.keys(fd, 8):
            plen, addr = struct.unpack("=I4s", k)
            out.add(f"{ipaddress.IPv4Address(addr)}/{plen}")
        return out
    finally:
        os.close(fd)


def _xdp(ns, ifname: str) -> dict | None:
    link = json.loads(ns.run("ip", "-j", "-d", "link", "show", "dev", ifname).stdout)[0]
    return link.get("xdp")


@pytest.fixture
def daemon(lab, tmp_path):
    a, b = lab.namespace("run"), lab.namespace("peer")
    lab.veth(a, "e0", b, "p0", "10.99.0.1/24", "10.99.0.2/24")
    node = f"t-run-{os.getpid()}-{a.name.rsplit('-', 1)[1]}"
    cfg = tmp_path / "edge.toml"
    history = tmp_path / "history.db"
    cfg.write_text(config(node, "e0", "10.1.0.0/24", str(history)))
    proc = xtransit("run", "--config", str(cfg), "--log-format", "json", netns=a.name)
    try:
        yield proc, Log(proc), cfg, node, a, b
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.netns
def test_sighup_applies_changed_route(daemon):
    proc, seen, cfg, node, a, _ = daemon
    started = seen.wait("started", 90)
    assert started["interfaces"] == "e0:native"
    assert started["analytics"] == f"history {cfg.parent / 'history.db'}, http off"
    assert _routes4(node) == {"10.1.0.0/24"}
    cfg.write_text(config(node, "e0", "10.2.0.0/24", str(cfg.parent / "history.db")))
    proc.send_signal(signal.SIGHUP)
    ev = seen.wait("config_reloaded", 30)
    assert ev["changed"] == "routes4:2"            # one prefix added, one removed
    assert ev["needs_restart"] == "none"
    assert _routes4(node) == {"10.2.0.0/24"}
    assert _xdp(a, "e0")["mode"] == 1              # still attached (native), never detached
    # an invalid config on SIGHUP is reported and the running one stays
    cfg.write_text("[node]\nid = -1\n")
    proc.send_signal(signal.SIGHUP)
    bad = seen.wait("config_reload_failed", 30)
    assert bad["level"] == "error"
    assert _routes4(node) == {"10.2.0.0/24"}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


@pytest.mark.netns
def test_sigterm_leaves_nothing_attached(daemon):
    proc, seen, _, node, a, b = daemon
    seen.wait("started", 90)
    assert _xdp(a, "e0") is not None
    assert _xdp(b, "p0") is not None               # the veth peer's pass program
    assert maps.pin_dir(node).exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    seen.wait("stopped", 5)
    assert _xdp(a, "e0") is None
    assert _xdp(b, "p0") is None
    assert not maps.pin_dir(node).exists()
    assert "xdp" not in a.run("ip", "-d", "link", "show").stdout


# --- unit: log formats, the SA event adapter, the ESP build flags --------------------------------

def _record(event=None, **fields):
    import logging
    rec = logging.LogRecord("xtransit", logging.INFO, __file__, 1, "tunnel up", None, None)
    rec.created, rec.msecs = 0.0, 0.0
    if event:
        rec.event, rec.fields = event, fields
    return rec


def test_key_value_and_json_formats():
    from pipeline import run as r
    rec = _record("tunnel_up", kind="ipsec", tunnel="site b", peer="203.0.113.6")
    text = r.KeyValueFormatter().format(rec)
    assert text.split(" ", 1)[1] == ('level=info event=tunnel_up kind=ipsec tunnel="site b" '
                                     'peer=203.0.113.6 msg="tunnel up"')
    obj = json.loads(r.JsonFormatter().format(rec))
    assert {k: v for k, v in obj.items() if k != "ts"} == {
        "level": "info", "logger": "xtransit", "event": "tunnel_up", "kind": "ipsec",
        "tunnel": "site b", "peer": "203.0.113.6", "msg": "tunnel up"}
    plain = r.KeyValueFormatter().format(_record())
    assert plain.split(" ", 1)[1] == 'level=info logger=xtransit msg="tunnel up"'


def test_event_installer_logs_sa_and_tunnel_events_without_keys(caplog):
    import logging

    from pipeline import run as r
    from pipeline.sa import ChildSaParams, RecordingSaInstaller
    key = bytes(range(32))
    sa = ChildSaParams(tunnel_name="site-b", tunnel_id="t", account_id="a", ike_sa="x",
                       spi_in=0x1001, spi_out=0x2001, encr="aes-gcm-16", encr_key_bits=256,
                       integ=None, local_addr="192.0.2.1", remote_addr="203.0.113.6",
                       encap_local_port=4500, encap_remote_port=4500, enc_key_in=key,
                       enc_key_out=key, salt_in=b"salt", salt_out=b"salt")
    rec = RecordingSaInstaller()
    inst = r.EventInstaller(rec)
    with caplog.at_level(logging.INFO, logger="xtransit"):
        inst.install(sa)
        sa2 = ChildSaParams(**{**sa.__dict__, "spi_in": 0x1002, "spi_out": 0x2002})
        inst.replace(0x1001, sa2)
        inst.delete(0x1001)
        inst.delete(0x1002)
    events = [(x.event, x.fields) for x in caplog.records if getattr(x, "event", None)]
    assert [e for e, _ in events] == ["sa_installed", "tunnel_up", "sa_rekeyed", "sa_deleted",
                                      "sa_deleted", "tunnel_down"]
    assert events[0][1] == {"tunnel": "site-b", "spi_in": "0x00001001", "spi_out": "0x00002001",
                            "algorithms": "aes-gcm-16-256", "local": "192.0.2.1",
                            "peer": "203.0.113.6", "udp_encap": "4500->4500"}
    assert events[2][1]["old_spi_in"] == "0x00001001"
    assert rec.events == [("install", 0x1001), ("replace", 0x1002), ("delete", 0x1002)]
    text = "\n".join(r.KeyValueFormatter().format(x) for x in caplog.records)
    assert key.hex() not in text and "salt" not in text


def test_every_esp_steering_outcome_has_a_named_reason():
    """The edge build's ESP hooks count under reasons of bpf/drop_reasons.h, so `xtransit stats`
    and the analytics name them (not `reason_22`)."""
    from pipeline.xdp import reasons
    r = reasons.load()
    assert [(r.number(n), r.by_number[r.number(n)].verdict) for n in
            ("esp_steered", "esp_keepalive", "esp_ike", "esp_no_worker")] == [
        (20, "redirect"), (21, "drop"), (22, "pass"), (23, "drop")]


@pytest.mark.netns
def test_analytics_failure_is_reported_and_the_edge_runs(lab, tmp_path):
    a, b = lab.namespace("run"), lab.namespace("peer")
    lab.veth(a, "e0", b, "p0", "10.99.0.1/24", "10.99.0.2/24")
    node = f"t-run-{os.getpid()}-{a.name.rsplit('-', 1)[1]}"
    cfg = tmp_path / "edge.toml"
    cfg.write_text(config(node, "e0", "10.1.0.0/24", str(tmp_path / "no" / "dir" / "h.db")))
    proc = xtransit("run", "--config", str(cfg), "--log-format", "json", netns=a.name)
    try:
        log = Log(proc)
        failed = log.wait("analytics_failed", 90)
        assert failed["level"] == "error"
        assert failed["history_file"] == str(tmp_path / "no" / "dir" / "h.db")
        assert "unable to open database file" in failed["error"]
        assert log.wait("started", 30)["analytics"] == "off"
        assert _routes4(node) == {"10.1.0.0/24"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert _xdp(a, "e0") is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


IPSEC = """
[tunnels.ipsec.site-b]
id = "f5407d8db1a542b196c59f6d04ba8bd1"
account_id = "123456789"
index = 2
edge_endpoint = "192.0.2.1"
interface_address = "10.200.0.2/31"
psk_file = "site-b.psk"

[state]
backend = "sqlite"
path = "{state}"
"""


@pytest.mark.netns
def test_ipsec_node_starts_worker_and_ike_and_stops_clean(lab, tmp_path):
    """With an IPsec tunnel: the AF_XDP worker's internal veth and the IKE sockets exist while
    it runs; after SIGTERM no XDP program, no internal veth, no socket is left."""
    a, b = lab.namespace("run"), lab.namespace("peer")
    lab.veth(a, "e0", b, "p0", "10.99.0.1/24", "10.99.0.2/24")
    a.add_address("lo", "192.0.2.1/32")
    psk = tmp_path / "site-b.psk"
    psk.write_text("a-test-psk-of-enough-length-0123\n")
    psk.chmod(0o600)
    node = f"t-run-{os.getpid()}-{a.name.rsplit('-', 1)[1]}"
    cfg = tmp_path / "edge.toml"
    cfg.write_text(config(node, "e0", "10.1.0.0/24", str(tmp_path / "h.db"))
                   + IPSEC.format(state=tmp_path / "state.db"))
    proc = xtransit("run", "--config", str(cfg), "--log-format", "json", netns=a.name)
    try:
        log = Log(proc)
        started = log.wait("started", 90)
        assert (started["gre_tunnels"], started["ipsec_tunnels"]) == (1, 1)
        links = a.run("ip", "-o", "link", "show").stdout
        assert "xtesp0" in links and "xtesp1" in links
        udp = a.run("ss", "-Hlnu").stdout.split()
        assert "192.0.2.1:500" in udp and "192.0.2.1:4500" in udp
        key = Path(f"{tmp_path / 'state.db'}.key")
        assert key.stat().st_mode & 0o777 == 0o600       # the SQLite store's sealing key
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "xtesp" not in a.run("ip", "-o", "link", "show").stdout
        assert a.run("ss", "-Hlnu").stdout.strip() == ""
        assert _xdp(a, "e0") is None and _xdp(b, "p0") is None
        assert not maps.pin_dir(node).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.netns
def test_without_privileges_exits_4_and_points_to_doctor():
    import tempfile
    with tempfile.TemporaryDirectory(dir="/tmp") as d:   # readable by nobody (pytest's is not)
        os.chmod(d, 0o755)
        cfg = Path(d) / "edge.toml"
        cfg.write_text(config("t-unpriv", "eth0", "10.1.0.0/24"))
        cfg.chmod(0o644)
        p = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-m",
                            "pipeline.cli", "run", "--config", str(cfg)], cwd=REPO,
                           capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 4, p.stderr
    assert p.stderr == ("xtransit run: needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN): "
                        "run it as root; `xtransit doctor` checks the rest\n")


PEER_SH = (REPO / ".." / "shared" / "peers" / "strongswan" / "peer.sh").resolve()
SITE_C = """
[tunnels.ipsec.site-c]
id = "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0c"
account_id = "42"
index = 3
edge_endpoint = "192.0.2.1"
interface_address = "10.200.0.4/31"
psk_file = "site-c.psk"
"""


@pytest.mark.netns
@pytest.mark.peer
def test_sighup_adds_an_ipsec_tunnel_that_strongswan_then_uses(lab, tmp_path):
    """A tunnel added on SIGHUP is known to IKE and to the data path without a restart: the
    strongSwan peer authenticates as it and its Child SA is installed."""
    edge, cust = lab.namespace("run"), lab.namespace("sw")
    lab.veth(cust, "c0", edge, "e0", "10.99.0.2/24", "10.99.0.1/24")
    edge.add_address("lo", "192.0.2.1/32")
    cust.add_route("192.0.2.1/32", gateway="10.99.0.1")
    for name, key in (("site-b.psk", "b-test-psk-of-enough-length-0123"),
                      ("site-c.psk", "c-test-psk-of-enough-length-0123")):
        (tmp_path / name).write_text(key + "\n")
        (tmp_path / name).chmod(0o600)
    node = f"t-run-{os.getpid()}-{edge.name.rsplit('-', 1)[1]}"
    base = (config(node, "e0", "10.1.0.0/24", str(tmp_path / "h.db"))
            + IPSEC.format(state=tmp_path / "state.db"))
    cfg = tmp_path / "edge.toml"
    cfg.write_text(base)
    proc = xtransit("run", "--config", str(cfg), "--log-format", "json", netns=edge.name)
    try:
        log = Log(proc)
        log.wait("started", 90)
        cfg.write_text(base + SITE_C)
        proc.send_signal(signal.SIGHUP)
        ev = log.wait("config_reloaded", 30)
        assert ev["needs_restart"] == "none"
        assert ev["changed"] == "tunnels:1"
        up = subprocess.run(
            [str(PEER_SH), "up", "--ns", cust.name, "--local", "10.99.0.2/24", "--remote",
             "192.0.2.1", "--id-type", "keyid", "--id", "42_0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0c",
             "--psk", "c-test-psk-of-enough-length-0123", "--timeout", "10", "--retries", "2"],
            check=False, capture_output=True, text=True, timeout=60)
        assert up.returncode == 0, up.stderr[-2000:]
        assert log.wait("ike_sa_up", 10)["tunnel"] == "site-c"
        installed = log.wait("sa_installed", 10)
        assert (installed["tunnel"], installed["peer"], installed["udp_encap"]) == (
            "site-c", "10.99.0.2", "4500->4500")
        assert log.wait("tunnel_up", 10)["tunnel"] == "site-c"
        text = "\n".join(json.dumps(e) for e in log.seen)
        assert "c-test-psk" not in text and "b-test-psk" not in text
    finally:
        subprocess.run([str(PEER_SH), "down", "--ns", cust.name], check=False,
                       capture_output=True, timeout=30)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    assert proc.returncode == 0


def test_reloading_the_same_etcd_state_needs_no_restart(tmp_path):
    """An EtcdState holds a FleetKey, which compares by identity: two loads of one file must
    still count as the same store."""
    import shutil

    from pipeline import config as C
    from pipeline import run as r
    ex = tmp_path / "examples"
    shutil.copytree(REPO / "examples", ex)
    (ex / "keys" / "fleet.key").chmod(0o600)
    a, b = C.load(ex / "etcd.toml", env={}), C.load(ex / "etcd.toml", env={})
    assert r._state_id(a) == r._state_id(b)
    assert r._state_id(a) != r._state_id(C.load(ex / "edge.toml", env={}))


@pytest.mark.netns
def test_an_af_xdp_socket_for_every_rx_queue_in_use(lab, caplog):
    """AF_XDP bind refuses a queue past the device's real RX queue count, and a queue without
    a socket drops steered ESP: the count is the driver's channel count (ethtool -l)."""
    from pipeline.xsk import rx_queues as _rx_queues  # xtransit run and the static mode
    a, b = lab.namespace("q"), lab.namespace("q")
    lab.veth(a, "one", b, "one-p")
    with a.ipr() as ipr:
        for name, n in (("four", 4), ("twenty", 20)):
            ipr.link("add", ifname=name, kind="veth", num_rx_queues=n, num_tx_queues=n,
                     peer={"ifname": name + "-p", "num_rx_queues": n, "num_tx_queues": n})
    with a.enter():
        assert _rx_queues("one") == (0,)
        assert _rx_queues("four") == (0, 1, 2, 3)
        assert _rx_queues("lo") == (0,)               # no channel support: one queue
        with caplog.at_level("WARNING", logger="pipeline.xsk"):
            assert _rx_queues("twenty") == tuple(range(16))
    assert "twenty has 20 RX queues; AF_XDP sockets on the first 16 only" in caplog.text
