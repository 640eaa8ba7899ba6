"""A real 3-member etcd cluster on loopback for tests, with TLS everywhere.

``EtcdCluster(tmpdir)`` generates a CA, a server certificate (IP SAN 127.0.0.1) and a client
certificate with ``cryptography``, starts three ``/usr/bin/etcd`` processes on distinct free
ports with their data under ``tmpdir``, client-certificate auth on the client and peer ports,
fast elections (50 ms heartbeat, 500 ms election timeout), revision auto-compaction and a
keepalive floor low enough for the test clients. ``stop()`` (or leaving the ``with`` block)
kills exactly the processes it started, frozen ones included.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pipeline.store import StoreError
from pipeline.store.etcd import EtcdStore, EtcdTls

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
LOCALHOST = "127.0.0.1"
# Test clients ping every 1 s with a 1 s ack timeout (a frozen member is noticed in ~2 s);
# the servers must accept pings that often.
CLIENT_KEEPALIVE_S = 1.0
CLIENT_KEEPALIVE_TIMEOUT_S = 1.0


def require_etcd() -> None:
    """Skip when etcd is not installed; under CI=true that is a failure (make setup installs
    Debian's etcd-server)."""
    import pytest
    if os.path.exists(ETCD) and os.access(ETCD, os.X_OK):
        return
    why = f"needs etcd ({ETCD}, Debian's etcd-server): run make setup"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{why} (CI=true: a missing prerequisite is a failure)")
    pytest.skip(why)


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind((LOCALHOST, 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_pki(d: Path) -> dict[str, Path]:
    """CA, server and client certificates (ECDSA P-256) under ``d``; returns their paths."""
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("xtransit test CA"))
          .issuer_name(name("xtransit test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start)
          .not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn, usages, san):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(start).not_valid_after(end)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return key, b.sign(ca_key, hashes.SHA256())

    out = {"ca": d / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    for role, usages, san in (
            ("server", both, [x509.IPAddress(ipaddress.ip_address(LOCALHOST)),
                              x509.DNSName("localhost")]),
            ("client", [ExtendedKeyUsageOID.CLIENT_AUTH], None),
            ("stranger", [ExtendedKeyUsageOID.CLIENT_AUTH], None)):
        key, cert = leaf(f"xtransit test {role}", usages, san)
        if role == "stranger":  # self-signed: not from the cluster's CA
            cert = (x509.CertificateBuilder().subject_name(name("stranger"))
                    .issuer_name(name("stranger")).public_key(key.public_key())
                    .serial_number(x509.random_serial_number()).not_valid_before(start)
                    .not_valid_after(end).sign(key, hashes.SHA256()))
        out[f"{role}_cert"] = d / f"{role}.pem"
        out[f"{role}_key"] = d / f"{role}-key.pem"
        out[f"{role}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{role}_key"].write_bytes(_pem_key(key))
        os.chmod(out[f"{role}_key"], 0o600)
    return out


class Member:
    def __init__(self, name: str, client_port: int, peer_port: int, data_dir: Path) -> None:
        self.name = name
        self.client_port = client_port
        self.peer_port = peer_port
        self.data_dir = data_dir
        self.proc: subprocess.Popen | None = None
        self.frozen = False

    @property
    def client_url(self) -> str:
        return f"https://{LOCALHOST}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"https://{LOCALHOST}:{self.peer_port}"


class EtcdCluster:
    def __init__(self, base: Path, size: int = 3, auto_compaction_retention: int = 10_000):
        self.base = Path(base)
        self.pki = make_pki(self.base / "pki")
        ports = _free_ports(2 * size)
        self.members = [Member(f"m{i}", ports[2 * i], ports[2 * i + 1], self.base / f"m{i}")
                        for i in range(size)]
        self.token = f"xtransit-test-{os.getpid()}-{time.monotonic_ns()}"
        self.retention = auto_compaction_retention
        self.tls = EtcdTls(self.pki["ca"], self.pki["client_cert"], self.pki["client_key"])

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def _argv(self, m: Member, state: str) -> list[str]:
        p = self.pki
        cluster = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        return [
            ETCD, "--name", m.name, "--data-dir", str(m.data_dir),
            "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
            "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", cluster, "--initial-cluster-state", state,
            "--initial-cluster-token", self.token,
            "--cert-file", str(p["server_cert"]), "--key-file", str(p["server_key"]),
            "--trusted-ca-file", str(p["ca"]), "--client-cert-auth",
            "--peer-cert-file", str(p["server_cert"]), "--peer-key-file", str(p["server_key"]),
            "--peer-trusted-ca-file", str(p["ca"]), "--peer-client-cert-auth",
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--auto-compaction-mode", "revision",
            "--auto-compaction-retention", str(self.retention),
            "--grpc-keepalive-min-time", "500ms",
            "--logger", "zap", "--log-level", "warn",
            "--log-outputs", str(self.base / f"{m.name}.log"),
        ]

    def start_member(self, i: int, state: str = "new") -> None:
        m = self.members[i]
        m.proc = subprocess.Popen(self._argv(m, state), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        m.frozen = False

    def start(self, timeout: float = 20.0) -> EtcdCluster:
        for i in range(len(self.members)):
            self.start_member(i)
        self.wait_healthy(timeout)
        return self

    def client(self, endpoints: list[str] | None = None, **kw) -> EtcdStore:
        kw.setdefault("keepalive_s", CLIENT_KEEPALIVE_S)
        kw.setdefault("keepalive_timeout_s", CLIENT_KEEPALIVE_TIMEOUT_S)
        kw.setdefault("timeout", 1.0)
        return EtcdStore(endpoints or self.endpoints, tls=self.tls, **kw)

    def wait_healthy(self, timeout: float = 20.0, members: list[int] | None = None) -> None:
        """Every (or the given) running member answers a linearizable read."""
        deadline = time.monotonic() + timeout
        for i in members if members is not None else range(len(self.members)):
            m = self.members[i]
            while True:
                if m.proc is not None and m.proc.poll() is not None:
                    raise RuntimeError(f"etcd member {m.name} exited with {m.proc.returncode}: "
                                       f"{self.log_tail(i)}")
                c = self.client([m.client_url], retry_for=0.0, timeout=0.5)
                try:
                    c.revision()
                    break
                except StoreError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"etcd member {m.name} not healthy after "
                                           f"{timeout} s: {self.log_tail(i)}") from None
                    time.sleep(0.05)
                finally:
                    c.close()

    def log_tail(self, i: int, n: int = 5) -> str:
        p = self.base / f"{self.members[i].name}.log"
        try:
            return " | ".join(p.read_text().splitlines()[-n:])
        except OSError:
            return "(no log)"

    def index_of(self, endpoint: str) -> int:
        return [m.client_url.removeprefix("https://") for m in self.members].index(
            endpoint.removeprefix("https://"))

    def kill(self, i: int) -> None:
        m = self.members[i]
        if m.proc is not None:
            if m.frozen:
                m.proc.send_signal(signal.SIGCONT)
            m.proc.kill()
            m.proc.wait(10)
            m.proc = None
            m.frozen = False

    def freeze(self, i: int) -> None:
        m = self.members[i]
        m.proc.send_signal(signal.SIGSTOP)
        m.frozen = True

    def thaw(self, i: int) -> None:
        m = self.members[i]
        m.proc.send_signal(signal.SIGCONT)
        m.frozen = False

    def restart(self, i: int, timeout: float = 20.0) -> None:
        """Start a killed member again on its data dir (it rejoins the cluster)."""
        self.start_member(i, state="existing")
        self.wait_healthy(timeout, [i])

    def stop(self) -> None:
        """Kill every member this cluster started (their data dirs are throw-away)."""
        for m in self.members:
            if m.proc is not None:
                m.proc.kill()
        for m in self.members:
            if m.proc is not None:
                m.proc.wait(10)
                m.proc = None
                m.frozen = False

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
