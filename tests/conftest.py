"""Shared fixtures: network namespaces, veth pairs and packet ports with guaranteed teardown.

Markers (pyproject.toml): ``netns`` needs root and network namespaces, ``peer`` needs the
strongSwan peer. Outside CI a missing privilege or tool skips those tests; under ``CI=true`` it
fails them, so a CI run can never pass by skipping the network tests.
"""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from pipeline import netns

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
PEER_SH = SHARED / "peers" / "strongswan" / "peer.sh"
IN_CI = os.environ.get("CI", "").lower() == "true"


def _missing_for(marker: str) -> str | None:
    if marker in ("netns", "peer"):
        if os.geteuid() != 0:
            return "needs root (network namespaces, XDP)"
        if shutil.which("ip") is None:
            return "needs iproute2 (ip)"
    if marker == "peer":
        if not PEER_SH.exists():
            return f"needs the strongSwan peer at {PEER_SH}"
        if shutil.which("swanctl") is None:
            return "needs strongSwan (swanctl): run make setup"
    return None


def pytest_sessionstart(session: pytest.Session) -> None:
    # A previous run killed hard (kill -9, CI timeout) may have left namespaces behind.
    netns.sweep_stale() if os.geteuid() == 0 else None
    # SIGTERM ends a pytest run without running fixture teardown; turn it into Ctrl-C.
    main_pid = os.getpid()

    def _term(signum, frame):
        if os.getpid() != main_pid:  # a forked helper (pyroute2, multiprocessing): just exit
            os._exit(128 + signum)
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _term)


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in ("netns", "peer"):
        if item.get_closest_marker(marker) is None:
            continue
        why = _missing_for(marker)
        if why:
            if IN_CI:
                pytest.fail(f"[{marker}] {why} (CI=true: a missing prerequisite is a failure)")
            pytest.skip(f"[{marker}] {why}")


@pytest.fixture
def lab():
    """A :class:`pipeline.netns.Lab`: namespaces, veths and ports removed after the test,
    whether it passed, failed or was interrupted."""
    with netns.Lab("t") as lab:
        yield lab


@pytest.fixture
def two_hosts(lab):
    """Two namespaces joined by one veth pair with addresses and static neighbour entries.

    Returns (lab, a, b) where a/b are namespaces with interface ``veth0`` and addresses
    10.99.0.1/24 and 10.99.0.2/24 (inside the private namespaces only).
    """
    a = lab.namespace("a")
    b = lab.namespace("b")
    lab.veth(a, "veth0", b, "veth0", "10.99.0.1/24", "10.99.0.2/24",
             mac_a="02:00:00:00:00:01", mac_b="02:00:00:00:00:02")
    a.add_neighbour("veth0", "10.99.0.2", "02:00:00:00:00:02")
    b.add_neighbour("veth0", "10.99.0.1", "02:00:00:00:00:01")
    return lab, a, b
