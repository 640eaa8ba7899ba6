"""Issue 7, pinning: the IPsec tunnel of tests/test_anycast.py pinned to node A, so that A alone
encrypts it and the peer's sequence-number check never sees two senders. Same topology, real
processes (etcd x3, `xtransit run` x3, charon); every edge also has a fleet address
(172.31.0.X on lo, routed by the router to that node's Internet side) and lists the others'
in ``[[fleet.nodes]]``.

strongSwan's userspace ESP has a fixed 128-packet replay window (see test_anycast.py): without
pinning, the first replies a new node encrypts after a route change are dropped as replays.
Pinned, replies entering B or C are carried to A in GRE and encrypted there, so the peer gets
every one. A pin change (SIGHUP, map updates only) moves the sender: the new pin node numbers
from 1, so that change costs exactly what a route change costs without pinning.
"""
from __future__ import annotations

import hashlib
import signal
import time

import pytest
from test_anycast import NODES, Anycast, etcd3, node_config  # noqa: F401 - etcd3 is a fixture

from pipeline.xdp import maps

pytestmark = [pytest.mark.netns, pytest.mark.peer, pytest.mark.slow]

FLEET = {x: f"172.31.0.{x}" for x in NODES}
INDEX = 1            # the tunnel's index in test_anycast's config
PAYLOAD = 256 * 1024


class PinnedAnycast(Anycast):
    def __init__(self, lab, tmp, cluster, pin: int) -> None:
        super().__init__(lab, tmp, cluster)
        self.pin = pin
        for x, ns in self.edges.items():
            ns.add_address("lo", f"{FLEET[x]}/32")
            self.rtr.run("ip", "route", "replace", f"{FLEET[x]}/32", "via", f"10.0.{x}.1")

    def config_text(self, x: int) -> str:
        nodes = "".join(f'[[fleet.nodes]]\nid = {i}\naddress = "{a}"\n' for i, a in FLEET.items())
        return node_config(x, self.names[x], self.cluster, self.tmp, self.prefix, self.dpd,
                           node_extra=f'fleet_address = "{FLEET[x]}"',
                           tunnel_extra=f"pin_node = {self.pin}", tail=nodes)

    def repin(self, pin: int) -> None:
        """Every node re-reads its file (SIGHUP): the new pin applies as map updates."""
        self.pin = pin
        for x, d in self.daemons.items():
            d.config.write_text(self.config_text(x))
            d.poll_events()
            seen = len(self.events(x, "config_reloaded"))
            d.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while len(self.events(x, "config_reloaded")) == seen:
                assert d.proc.poll() is None and time.monotonic() < deadline, d.tail(20)
                time.sleep(0.1)
            ev = self.events(x, "config_reloaded")[-1]
            assert ev["needs_restart"] == "none", ev
            assert "tunnels:1" in ev["changed"].split(","), ev

    def reasons(self, x: int) -> dict[str, int]:
        """This node's per-tunnel reason counters (its pinned maps)."""
        return maps.read_pinned(self.names[x], [INDEX]).tunnel_reasons.get(INDEX, {})


def test_pinned_tunnel_is_encrypted_by_one_node_only(lab, tmp_path, etcd3):  # noqa: F811
    net = PinnedAnycast(lab, tmp_path, etcd3, pin=1)
    try:
        net.start()
        net.connect()
        net.daemons[1].wait_event("ike_sa_up", 10)
        first = net.peer_sas()
        for x in NODES:
            net.daemons[x].wait_event("sa_installed", 30, spi_in=f"0x{first['spi_out']:08x}")

        # --- through A, the pin node ------------------------------------------------------
        assert net.ping(5) == 5
        assert net.tunnel(1)["out"]["packets"] == 5

        # --- through B: B decrypts the requests, the replies are carried to A and encrypted
        # there; the peer's replay window drops none of them ---------------------------------
        net.route_to(2)
        assert net.ping(10) == 10
        tb, ta = net.tunnel(2), net.tunnel(1)
        assert (tb["in"]["packets"], tb["out"]["packets"]) == (10, 0)
        assert (ta["in"]["packets"], ta["out"]["packets"]) == (5, 15)
        # (inbound ESP is counted per tunnel by the worker, not here: its tunnel is known
        # only after decryption)
        assert net.reasons(2) == {"pinned_forwarded": 10}
        assert net.reasons(1) == {"esp_steered": 5, "pinned_steered": 10}
        assert net.peer_sas()["in_packets"] == 15

        # --- through C ---------------------------------------------------------------------
        net.route_to(3)
        assert net.ping(5) == 5
        assert net.tunnel(3)["out"]["packets"] == 0
        assert net.tunnel(1)["out"]["packets"] == 20
        assert net.reasons(3) == {"pinned_forwarded": 5}
        assert net.reasons(1) == {"esp_steered": 5, "pinned_steered": 15}

        # --- pin moved to C by SIGHUP (no restart): C numbers from 1, so its first 20 replies
        # are replays to the peer (A sent 1..20), exactly as an unpinned route change ------
        net.repin(3)
        assert net.ping(25) == 5
        assert net.tunnel(3)["out"]["packets"] == 25
        assert net.tunnel(1)["out"]["packets"] == 20
        assert net.reasons(3) == {"esp_steered": 25, "pinned_forwarded": 5}

        # --- back through B, now carrying to C: no loss, and TCP both ways ------------------
        net.route_to(2)
        assert net.ping(5) == 5
        assert net.reasons(2) == {"pinned_forwarded": 15}
        assert net.reasons(3) == {"esp_steered": 25, "pinned_forwarded": 5, "pinned_steered": 5}
        assert net.tunnel(2)["out"]["packets"] == 0
        got = net.tcp_transfer(PAYLOAD)
        assert got == (PAYLOAD, hashlib.sha256(bytes(range(256)) * (PAYLOAD // 256)).hexdigest())
        assert net.tunnel(2)["out"]["packets"] == 0           # B still encrypted nothing
        assert net.tunnel(1)["out"]["packets"] == 20          # nor A after the change
        # every TCP packet to the site B received was carried to C and encrypted there
        carried = net.reasons(2)["pinned_forwarded"] - 15
        assert carried > 0
        assert net.reasons(3) == {"esp_steered": 25, "pinned_forwarded": 5,
                                  "pinned_steered": 5 + carried}
        assert net.tunnel(3)["out"]["packets"] == 30 + carried
        now = net.peer_sas()
        assert (now["ike"], now["child"]) == (first["ike"], first["child"])   # same SAs
        assert now["in_packets"] == net.tunnel(1)["out"]["packets"] + \
            net.tunnel(3)["out"]["packets"] - 20                # only C's 20 replays lost
        for x in NODES:
            assert [e["tunnel"] for e in net.events(x, "ike_sa_up")] == (
                ["site-any"] if x == 1 else [])
    finally:
        net.close()
