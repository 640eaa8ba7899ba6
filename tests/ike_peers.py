"""Two in-memory IKE cores talking through a tiny simulated network (optionally with a NAT)."""
from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.ike.constants import DhGroup, Encr, IdType, Prf
from pipeline.ike.engine import Datagram, EngineConfig, IkeEngine
from pipeline.ike.payloads import TrafficSelector
from pipeline.ike.proposal import esp_proposal, ike_proposal
from pipeline.ike.tasks import InitiatorProfile
from pipeline.ike.tunnels import IkeTunnel, TunnelDirectory
from pipeline.sa import RecordingSaInstaller

DOMAIN = "example.net"
EDGE = "192.0.2.1"
CUSTOMER = "198.51.100.2"
PSK = b"sw-test-psk-0123456789"

TUNNEL = IkeTunnel(
    name="cust-a", tunnel_id="f5407d8db1a542b196c59f6d04ba8bd1", account_id="123456789",
    edge_endpoint=EDGE, customer_endpoint=CUSTOMER, psk=PSK,
)


def profile(tunnel: IkeTunnel = TUNNEL, *, id_type: int = IdType.FQDN, id_data: bytes | None = None,
            ike=None, esp=None, psk: bytes | None = None, **kw) -> InitiatorProfile:
    if id_data is None:
        id_data = {
            IdType.FQDN: f"{tunnel.tunnel_id}.{tunnel.account_id}.ipsec.{DOMAIN}".encode(),
            IdType.RFC822_ADDR: f"ipsec@{tunnel.tunnel_id}.{tunnel.account_id}.ipsec.{DOMAIN}".encode(),
            IdType.KEY_ID: f"{tunnel.account_id}_{tunnel.tunnel_id}".encode(),
            IdType.IPV4_ADDR: bytes(int(x) for x in CUSTOMER.split(".")),
        }[id_type]
    if psk is not None:
        from dataclasses import replace

        tunnel = replace(tunnel, psk=psk)
    ike = ike or [ike_proposal(Encr.AES_GCM_16, 256, 0, Prf.HMAC_SHA2_256, DhGroup.ECP_384)]
    esp = esp or [esp_proposal(Encr.AES_GCM_16, 256, 0, b"")]
    kw.setdefault("ts_i", [TrafficSelector.from_network("10.10.1.0/24")])
    kw.setdefault("ts_r", [TrafficSelector.from_network("10.10.2.0/24")])
    return InitiatorProfile(tunnel, id_type, id_data, ike, esp, **kw)


@dataclass
class Pair:
    tunnels: list[IkeTunnel] = field(default_factory=lambda: [TUNNEL])
    config_r: EngineConfig = field(default_factory=EngineConfig)
    config_i: EngineConfig = field(default_factory=EngineConfig)
    nat: str | None = None  # public address the initiator appears from, if behind a NAT

    def __post_init__(self):
        self.ri = RecordingSaInstaller()
        self.ii = RecordingSaInstaller()
        self.resp = IkeEngine(TunnelDirectory(self.tunnels, DOMAIN), self.ri, self.config_r)
        self.init = IkeEngine(TunnelDirectory([], DOMAIN), self.ii, self.config_i)
        self.now = 0.0
        self.wire: list[tuple[str, bytes]] = []  # ("i>r"|"r>i", datagram)
        self.drop_to_initiator = False
        self._nat_ports: dict[tuple[str, int], int] = {}
        self.remote_seen: list[tuple[str, int]] = []

    # NAT: initiator (CUSTOMER, p) <-> (nat, 30000+n)
    def _out(self, ep):
        if self.nat is None:
            return ep
        if ep not in self._nat_ports:
            self._nat_ports[ep] = 30000 + len(self._nat_ports)
        return (self.nat, self._nat_ports[ep])

    def _in(self, ep):
        if self.nat is None:
            return ep
        for inside, port in self._nat_ports.items():
            if (self.nat, port) == ep:
                return inside
        raise AssertionError(f"no NAT mapping for {ep}")

    def start(self, prof: InitiatorProfile) -> None:
        local = (self.nat and "10.0.0.2") or CUSTOMER
        self.deliver_from_i(self.init.initiate(prof, (local, 500), (EDGE, 500), self.now))

    def deliver_from_i(self, dgs: list[Datagram]) -> None:
        self._run([("i", d) for d in dgs])

    def deliver_from_r(self, dgs: list[Datagram]) -> None:
        self._run([("r", d) for d in dgs])

    def _run(self, queue):
        for _ in range(200):
            if not queue:
                return
            side, d = queue.pop(0)
            if side == "i":
                self.wire.append(("i>r", d.data))
                src = self._out(d.local)
                self.remote_seen.append(src)
                queue += [("r", x) for x in self.resp.handle(d.data, d.remote, src, self.now)]
            else:
                self.wire.append(("r>i", d.data))
                if self.drop_to_initiator:
                    continue
                queue += [("i", x) for x in self.init.handle(d.data, self._in(d.remote), d.local,
                                                           self.now)]
        raise AssertionError("exchange did not settle")

    def tick(self, dt: float) -> None:
        self.now += dt
        self.deliver_from_r(self.resp.tick(self.now))
        self.deliver_from_i(self.init.tick(self.now))

    def only_sa(self, installer: RecordingSaInstaller):
        assert len(installer.sas) == 1, installer.sas
        return next(iter(installer.sas.values()))
