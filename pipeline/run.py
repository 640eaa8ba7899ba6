"""`xtransit run`: the edge daemon, composing the pieces the other modules provide.

    edge = Edge(config_path)
    edge.start()                 # data plane, AF_XDP workers, state sync, IKE, analytics
    asyncio.run(edge.serve())    # until SIGTERM/SIGINT; SIGHUP reloads (map updates only)
    edge.close()                 # idempotent; nothing stays attached

What runs, in this order (and stops in the reverse order):

1. the XDP edge program (pipeline/xdp/dataplane.py) on every ``node.interfaces`` entry, built
   with ESP steering (``-DXT_FEATURE_ESP``) when the config has IPsec tunnels;
2. for IPsec tunnels: the state store (``[state]``: SQLite by default, etcd), the native ESP data
   path (pipeline/ipsec.py ``IpsecDataPath``) fed by the store through ``SaSync``, one AF_XDP
   worker for the configured interfaces (``IpsecEdge``, whose sockets go into the edge program's
   XSKMAP), and the IKE responder (pipeline/ike/) on UDP 500/4500 of every tunnel endpoint. The
   responder writes Child SAs to the store (``StoreSaInstaller``); ``SaSync`` installs what the
   store holds, so a node that negotiated and a node that did not take the same path;
3. the analytics collector, when ``pipeline.analytics`` provides one (see :func:`_analytics`).

Customer-side GRE mode needs nothing special: a node whose tunnel endpoint is the customer
router's address and whose GRE tunnel's ``customer_endpoint`` is the edge's anycast address,
with routes (e.g. the Internet prefixes) into that tunnel, encapsulates toward the edge and
decapsulates what comes back with the same program (examples/demo-gre-cpe.toml; make demo
runs one).

Events (one log line each, ``event=<name>`` and key=value fields, or one JSON object per line
with ``--log-format json``): ``started``, ``stopped``, ``config_reloaded``,
``config_reload_failed``, ``analytics_failed``, ``worker_failed``, ``ike_sa_up``, ``ike_sa_down``,
``ike_sa_adopted`` (an IKE SA another node wrote, taken over from the store, issue 7),
``child_sa_up``, ``child_sa_rekeyed``,
``child_sa_down``, ``sa_installed``, ``sa_rekeyed``, ``sa_deleted``, ``tunnel_up``,
``tunnel_down`` (IPsec: the tunnel has / no longer has an SA pair in the data path; GRE: decapsulated
traffic seen / none for ``GRE_IDLE_S`` seconds). Keys never appear in any of them.

Status: every second the daemon writes ``/run/xtransit/<node name>/status.json`` (IKE and Child
SAs without keys, native ESP counters per tunnel, AF_XDP worker counters), which is how
separate commands see what only this process holds. Beside it, ``control.sock`` (mode 0600,
root or the daemon's uid only; pipeline/control.py) answers ``xtransit sa export-keys`` and logs
``keys_exported`` (counts, never keys); ``control_failed`` when it cannot be opened.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, SqliteState

log = logging.getLogger("xtransit")

GRE_IDLE_S = 30.0           # a GRE tunnel with no decapsulated packet for this long is "down"
STATUS_INTERVAL_S = 1.0
RUN_ROOT = Path("/run/xtransit")
# The edge program with ESP steering hooks (bpf/esp_steer.h) for nodes with IPsec tunnels.
ESP_CFLAGS = ("-DXT_FEATURE_ESP",)


# --- errors with exit statuses (pipeline/commands/run.py maps them) ------------------------------

class RunError(RuntimeError):
    exit_status = 1


class InterfaceMissing(RunError):
    exit_status = 3


class KernelFeatureMissing(RunError):
    exit_status = 4


# --- structured logging ----------------------------------------------------------------------

def event(name: str, msg: str = "", level: int = logging.INFO, **fields: Any) -> None:
    """Log one notable event: ``event=<name>`` plus fields (never keys or PSKs)."""
    log.log(level, msg or name.replace("_", " "), extra={"event": name, "fields": fields})


def _value(v: Any) -> str:
    s = str(v)
    if s == "" or any(c in s for c in ' "=\n'):
        return json.dumps(s)
    return s


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=info event=tunnel_up tunnel=site-a ... msg="..."``, one line per record."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [f"ts={self.formatTime(record, '%Y-%m-%dT%H:%M:%S')}.{int(record.msecs):03d}",
                 f"level={record.levelname.lower()}"]
        ev = getattr(record, "event", None)
        if ev:
            parts.append(f"event={ev}")
            parts += [f"{k}={_value(v)}" for k, v in getattr(record, "fields", {}).items()]
        else:
            parts.append(f"logger={record.name}")
        parts.append(f"msg={_value(record.getMessage())}")
        if record.exc_info and log.isEnabledFor(logging.DEBUG):
            parts.append(f"exc={_value(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, event (when it is one), fields, logger, msg."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": f"{self.formatTime(record, '%Y-%m-%dT%H:%M:%S')}.{int(record.msecs):03d}",
            "level": record.levelname.lower(), "logger": record.name}
        ev = getattr(record, "event", None)
        if ev:
            out["event"] = ev
            out.update({k: v for k, v in getattr(record, "fields", {}).items()
                        if k not in out})
        out["msg"] = record.getMessage()
        return json.dumps(out, default=str)


def setup_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)


# --- adapters (see the report: what the owning modules could provide instead) ------------------

def fleet_key_for(state: SqliteState):
    """The key that seals SA keys in a SQLite store. ``[state]`` has no ``fleet_key_file`` for
    SQLite, so it lives beside the database (``<db>.key``, mode 0600), created on first use."""
    from .store.crypto import FleetKey
    path = Path(f"{state.path}.key")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, secrets.token_hex(32).encode() + b"\n")
        finally:
            os.close(fd)
    return FleetKey.from_file(path)


class EventInstaller:
    """``SaInstaller`` in front of the data path: logs SA and tunnel up/down events."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._tunnel_of: dict[int, str] = {}
        self._live: dict[str, set[int]] = {}       # tunnel -> inbound SPIs installed

    @staticmethod
    def _fields(sa) -> dict[str, Any]:
        alg = sa.encr + (f"-{sa.encr_key_bits}" if sa.encr_key_bits else "")
        if sa.integ:
            alg += "/" + sa.integ
        f = {"tunnel": sa.tunnel_name, "spi_in": f"0x{sa.spi_in:08x}",
             "spi_out": f"0x{sa.spi_out:08x}", "algorithms": alg,
             "local": sa.local_addr, "peer": sa.remote_addr}
        if sa.udp_encap:
            f["udp_encap"] = f"{sa.encap_local_port}->{sa.encap_remote_port}"
        return f

    def _up(self, sa) -> None:
        spis = self._live.setdefault(sa.tunnel_name, set())
        first = not spis
        spis.add(sa.spi_in)
        self._tunnel_of[sa.spi_in] = sa.tunnel_name
        if first:
            event("tunnel_up", kind="ipsec", tunnel=sa.tunnel_name, peer=sa.remote_addr)

    def install(self, sa) -> None:
        self.inner.install(sa)
        event("sa_installed", **self._fields(sa))
        self._up(sa)

    def replace(self, old_spi_in: int, sa) -> None:
        self.inner.replace(old_spi_in, sa)
        event("sa_rekeyed", old_spi_in=f"0x{old_spi_in:08x}", **self._fields(sa))
        self._up(sa)

    def delete(self, spi_in: int) -> None:
        self.inner.delete(spi_in)
        tunnel = self._tunnel_of.pop(spi_in, None)
        event("sa_deleted", spi_in=f"0x{spi_in:08x}", tunnel=tunnel or "-")
        spis = self._live.get(tunnel) if tunnel else None
        if spis is not None:
            spis.discard(spi_in)
            if not spis:
                del self._live[tunnel]
                event("tunnel_down", kind="ipsec", tunnel=tunnel)


def _event_engine_class():
    """The IKE engine with event lines for IKE and Child SAs (a subclass: the engine has no
    observer hooks; each override calls the engine's own method first)."""
    from .ike.engine import IkeEngine
    from .ike.state import IkeState

    class EventEngine(IkeEngine):
        def established(self, sa) -> None:
            super().established(sa)
            event("ike_sa_up", tunnel=sa.tunnel.name if sa.tunnel else "-", ike_sa=sa.name,
                  peer=f"{sa.remote[0]}:{sa.remote[1]}", algorithms=sa.sel.describe(),
                  nat_t=bool(sa.nat_detected))

        def destroy(self, sa, reason: str, uninstall: bool = True) -> None:
            known = self.sas.get(sa.local_spi) is sa
            was = sa.state
            super().destroy(sa, reason, uninstall)
            if known and was in (IkeState.ESTABLISHED, IkeState.DELETING, IkeState.REKEYED):
                event("ike_sa_down", tunnel=sa.tunnel.name if sa.tunnel else "-",
                      ike_sa=sa.name, reason=reason)

        def adopt(self, sa) -> None:
            super().adopt(sa)
            event("ike_sa_adopted", tunnel=sa.tunnel.name if sa.tunnel else "-", ike_sa=sa.name,
                  peer=f"{sa.remote[0]}:{sa.remote[1]}", next_request_id=sa.next_request_id,
                  expected_peer_id=sa.expected_peer_id)

        def add_child(self, sa, child) -> None:
            super().add_child(sa, child)
            event("child_sa_up", tunnel=sa.tunnel.name if sa.tunnel else "-", ike_sa=sa.name,
                  spi_in=f"0x{child.spi_in:08x}", spi_out=f"0x{child.spi_out:08x}",
                  algorithms=child.sel.describe(),
                  ts_local=",".join(str(t) for t in child.ts_local),
                  ts_remote=",".join(str(t) for t in child.ts_remote))

        def replace_child(self, sa, old, new) -> None:
            super().replace_child(sa, old, new)
            event("child_sa_rekeyed", tunnel=sa.tunnel.name if sa.tunnel else "-",
                  old_spi_in=f"0x{old.spi_in:08x}", spi_in=f"0x{new.spi_in:08x}",
                  algorithms=new.sel.describe())

        def remove_child(self, sa, spi_in: int) -> None:
            had = spi_in in sa.children
            super().remove_child(sa, spi_in)
            if had:
                event("child_sa_down", tunnel=sa.tunnel.name if sa.tunnel else "-",
                      spi_in=f"0x{spi_in:08x}")

    return EventEngine


class AnalyticsRun:
    """The analytics collector of pipeline/analytics, fed by this process's own map fds and
    the native ESP counters: 1-second history into ``[analytics].history_file``, Prometheus
    on ``http_address:http_port`` (0: off). Packet sampling needs the edge program built with
    -DXT_FEATURE_SAMPLE, which bpf/xdp_edge.c does not include yet: not started."""

    def __init__(self, edge: Edge) -> None:
        from .analytics.collector import Collector, EspSource, XdpSource
        from .analytics.exporter import Exporter
        from .analytics.store import History
        cfg = edge.config
        self.history = History.for_config(cfg)
        self.xdp = XdpSource({t.index: t.name for t in cfg.tunnels},
                             fds=edge.dataplane.program.map_fds(),
                             generation=id(edge.dataplane.program))
        sources: list[Any] = [self.xdp]
        if edge.datapath is not None:
            sources.append(EspSource(edge.datapath.stats))
        self.collector = Collector(sources, sinks=[self.history])
        self.exporter = None
        try:
            self.collector.start()
            a = cfg.analytics
            if a.http_port:
                self.exporter = Exporter(self.collector, str(a.http_address), a.http_port)
        except BaseException:
            self.close()
            raise
        self.describe = (f"history {self.history.path}, " +
                         (f"http://{cfg.analytics.http_address}:{self.exporter.port}/metrics"
                          if self.exporter else "http off"))

    def update(self, cfg: Config) -> None:
        """New tunnel names for the counters (a reload)."""
        self.xdp.tunnels = {t.index: t.name for t in cfg.tunnels}
        with contextlib.suppress(AttributeError):
            self.history.tunnel_names = {t.index: t.name for t in cfg.tunnels}

    def close(self) -> None:
        self.collector.close()
        if self.exporter is not None:
            self.exporter.close()
        self.history.close()


def _analytics(edge: Edge) -> AnalyticsRun | None:
    """The analytics hook: None when pipeline/analytics is not in this tree."""
    import importlib.util
    if importlib.util.find_spec("pipeline.analytics.collector") is None:
        return None
    return AnalyticsRun(edge)


# --- the daemon ----------------------------------------------------------------------------

def _check_interfaces(cfg: Config) -> None:
    missing = []
    for i, iface in enumerate(cfg.node.interfaces):
        try:
            socket.if_nametoindex(iface.name)
        except OSError:
            missing.append(f"{iface.name} (node.interfaces[{i}])")
    if missing:
        raise InterfaceMissing(f"{cfg.path}: no such interface in this network namespace: "
                               f"{', '.join(missing)} (check `ip link`)")


def _local_addresses() -> set[str]:
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        return {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)}


def _wants_ipsec(cfg: Config) -> bool:
    """IPsec machinery (ESP steering, AF_XDP worker, IKE) runs for IPsec tunnels, and always on
    a node that takes its tunnels from the store (the fleet may add one at any time)."""
    return bool(cfg.ipsec_tunnels) or cfg.state.config_source == "store"


def _state_id(cfg: Config) -> tuple:
    """What identifies the store (an EtcdState's FleetKey compares by identity)."""
    s = cfg.state
    if isinstance(s, SqliteState):
        return ("sqlite", s.path)
    return ("etcd", s.endpoints, s.prefix, s.fleet_key.key_id, s.ca_file, s.cert_file,
            s.key_file)


@dataclass
class _GreLiveness:
    packets: int = 0
    last_seen: float = 0.0
    up: bool = False


class Edge:
    """The composition. ``start()`` raises RunError subclasses (exit statuses) or ConfigError."""

    def __init__(self, config_path: str | Path) -> None:
        self.config_path = str(config_path)
        self.config: Config | None = None
        self.dataplane = None
        self.datapath = None
        self.installer: EventInstaller | None = None
        self.ipsec_edge = None
        self.store = None
        self.shared = None
        self.sync = None
        self.engine = None
        self.ike = None
        self.analytics = None
        self._gre: dict[str, _GreLiveness] = {}
        self._stop: asyncio.Event | None = None
        self._reload_pending = False
        self.status_path: Path | None = None

    # --- start / stop ----------------------------------------------------------------------
    def _load(self) -> Config:
        """The file, and with ``config_source = "store"`` the fleet's tunnels and routes."""
        from .fleet_config import load_node
        from .store import StoreError
        try:
            return load_node(self.config_path)
        except StoreError as e:
            raise RunError(f"state store ([state] in {self.config_path}): {e}") from e

    def start(self) -> Edge:
        cfg = self._load()                     # ConfigError: exit status 2
        self.config = cfg
        if os.geteuid() != 0:
            raise KernelFeatureMissing("needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN): "
                                       "run it as root; `xtransit doctor` checks the rest")
        _check_interfaces(cfg)
        try:
            self._start_dataplane(cfg)
            if _wants_ipsec(cfg):
                self._start_ipsec(cfg)
            self._start_analytics()
            self._watch_config(cfg)
        except BaseException:
            self.close()
            raise
        self.status_path = RUN_ROOT / cfg.node.name / "status.json"
        event("started", node=cfg.node.name, node_id=cfg.node.id,
              interfaces=",".join(f"{i.name}:{i.xdp_mode}" for i in cfg.node.interfaces),
              endpoints=",".join(str(a) for a in cfg.node.tunnel_endpoints),
              gre_tunnels=len(cfg.gre_tunnels), ipsec_tunnels=len(cfg.ipsec_tunnels),
              routes=len(cfg.routes),
              analytics=self.analytics.describe if self.analytics else "off")
        return self

    def _start_analytics(self) -> None:
        """Analytics is for people, the data path for customers: when it cannot start (its
        history file cannot be opened, its port is taken) the edge runs without it."""
        try:
            self.analytics = _analytics(self)
        except Exception as e:  # noqa: BLE001 - any analytics failure is reported, not fatal
            event("analytics_failed", level=logging.ERROR, error=f"{type(e).__name__}: {e}",
                  history_file=str(self.config.analytics.history_file),
                  http_port=self.config.analytics.http_port)

    def _start_dataplane(self, cfg: Config) -> None:
        try:
            from .xdp.dataplane import Dataplane, DataplaneError, LoadError
        except ImportError as e:
            raise KernelFeatureMissing(f"cannot load the XDP loader ({e}): bcc missing? "
                                       "run `xtransit doctor`") from e
        cflags = ESP_CFLAGS if _wants_ipsec(cfg) else ()
        try:
            self.dataplane = Dataplane(cfg, cflags=cflags).start()
        except LoadError as e:
            raise KernelFeatureMissing(f"{e}\nthe kernel refused the XDP program: run "
                                       "`xtransit doctor`") from e
        except DataplaneError as e:
            text = str(e)
            if "no interface" in text:
                raise InterfaceMissing(text) from e
            raise KernelFeatureMissing(f"{text}\nrun `xtransit doctor` to see which kernel "
                                       "feature is missing") from e
        except ModuleNotFoundError as e:
            raise KernelFeatureMissing(f"{e}: run `xtransit doctor`") from e
        for t in cfg.gre_tunnels:
            self._gre[t.name] = _GreLiveness()

    def _start_ipsec(self, cfg: Config) -> None:
        from .ike.server import IkeServer
        from .ike.tunnels import from_config
        from .ipsec import IpsecDataPath, IpsecEdge, RxDevice
        from .store import open_store
        from .store.schema import Layout, SharedState
        from .sync import SaSync, StoreSaInstaller
        from .xsk import rx_queues

        local = _local_addresses()
        for a in cfg.node.tunnel_endpoints:
            if str(a) not in local:
                log.warning("tunnel endpoint %s is not an address of this host: IKE to it "
                            "will not arrive (add it, e.g. to lo)", a)
        if isinstance(cfg.state, SqliteState):
            try:
                fleet = fleet_key_for(cfg.state)
            except OSError as e:
                raise RunError(f"state store key beside {cfg.state.path}: {e}") from e
            layout = Layout()
        else:
            fleet = cfg.state.fleet_key
            layout = Layout(cfg.state.prefix)
        from .store import StoreError
        try:
            self.store = open_store(cfg.state)
        except StoreError as e:
            raise RunError(f"state store ([state] in {cfg.path}): {e}") from e
        self.shared = SharedState(self.store, fleet, layout, node=cfg.node.id)
        self.datapath = IpsecDataPath.from_config(cfg)
        self.installer = EventInstaller(self.datapath)
        devices = [RxDevice(i.name, rx_queues(i.name), i.xdp_mode)
                   for i in cfg.node.interfaces]
        try:
            self.ipsec_edge = IpsecEdge(self.datapath, devices,
                                        [str(a) for a in cfg.node.tunnel_endpoints],
                                        edge_bpf=self.dataplane.program.bpf)
        except OSError as e:
            raise KernelFeatureMissing(f"AF_XDP worker: {e}: run `xtransit doctor`") from e
        try:
            self.sync = SaSync(self.shared, self.installer).start()
        except StoreError as e:
            raise RunError(f"state store ([state] in {cfg.path}): {e}") from e
        self.engine = _event_engine_class()(from_config(cfg), StoreSaInstaller(self.shared,
                                                                                self.sync))
        # IKE SAs go through the store too (issue 7): any node behind the anycast address
        # processes the peer's next request on the latest state (pipeline/ike/fleet.py).
        from .ike.fleet import SharedIkeSas
        self.ike_shared = SharedIkeSas(self.engine, self.shared).start()
        self.ike = IkeServer(self.ike_shared, [str(a) for a in cfg.node.tunnel_endpoints])

    def _watch_config(self, cfg: Config) -> None:
        """``config_source = "store"``: a change under the tunnel or route prefix is a reload
        (the same map updates as SIGHUP), within STATUS_INTERVAL_S."""
        if cfg.state.config_source != "store":
            return
        from .fleet_config import ConfigWatch, layout_for
        from .store import StoreError, open_store
        try:
            self._config_store = open_store(cfg.state)
            rev = self._config_store.revision()
            self.config_watch = ConfigWatch(self._config_store, layout_for(cfg.state), rev,
                                            self._request_reload).start()
        except StoreError as e:
            raise RunError(f"state store ([state] in {cfg.path}): {e}") from e

    def close(self) -> None:
        """Stop everything that started, in reverse order. Idempotent."""
        if getattr(self, "config_watch", None) is not None:
            self.config_watch.stop()
            self.config_watch = None
        if getattr(self, "_config_store", None) is not None:
            with contextlib.suppress(Exception):
                self._config_store.close()
            self._config_store = None
        if self.analytics is not None:
            with contextlib.suppress(Exception):
                self.analytics.close()
            self.analytics = None
        if getattr(self, "ike_shared", None) is not None:
            self.ike_shared.close()
            self.ike_shared = None
        if self.sync is not None:
            self.sync.stop()
            self.sync = None
        if self.ipsec_edge is not None:
            self.ipsec_edge.close()
            self.ipsec_edge = None
        if self.datapath is not None:
            self.datapath.close()
            self.datapath = None
        if self.store is not None:
            with contextlib.suppress(Exception):
                self.store.close()
            self.store = None
        if self.dataplane is not None:
            self.dataplane.close()
            self.dataplane = None
        if self.status_path is not None:
            with contextlib.suppress(OSError):
                self.status_path.unlink()
            with contextlib.suppress(OSError):
                self.status_path.parent.rmdir()

    # --- the loop --------------------------------------------------------------------------
    async def serve(self) -> None:
        """Run until SIGTERM or SIGINT; SIGHUP reloads. Closes the IKE sockets on the way out
        (``close()`` does the rest)."""
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._request_reload)
        if self.ike is not None:
            await self.ike.start()
        control = await self._start_control()
        try:
            while not self._stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), STATUS_INTERVAL_S)
                if self._reload_pending:
                    self._reload_pending = False
                    self.reload()
                self._watch_gre(time.monotonic())
                self._watch_workers()
                self._write_status()
        finally:
            if control is not None:
                await control.close()
            if self.ike is not None:
                await self.ike.close()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    async def _start_control(self):
        """The control socket (pipeline/control.py: ``xtransit sa export-keys``). Like
        analytics it is for people: when it cannot start the edge runs without it."""
        from . import control
        try:
            return await control.for_edge(self, RUN_ROOT).start()
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            event("control_failed", level=logging.ERROR, error=f"{type(e).__name__}: {e}")
            return None

    def _request_reload(self) -> None:
        self._reload_pending = True       # applied by the loop within STATUS_INTERVAL_S

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    # --- reload ----------------------------------------------------------------------------
    def reload(self) -> bool:
        """Re-read the config; apply what can change by map updates. False if not applied."""
        old = self.config
        try:
            new = self._load()
        except ConfigError as e:
            event("config_reload_failed", level=logging.ERROR, file=self.config_path,
                  errors=len(e.errors), first=str(e.errors[0]))
            return False
        except RunError as e:
            event("config_reload_failed", level=logging.ERROR, file=self.config_path,
                  first=str(e))
            return False
        restart = []
        if new.node.interfaces != old.node.interfaces:
            restart.append("node.interfaces")
        if new.node.tunnel_endpoints != old.node.tunnel_endpoints and self.ike is not None:
            restart.append("node.tunnel_endpoints (IKE sockets)")
        if _wants_ipsec(new) != _wants_ipsec(old):
            restart.append("IPsec tunnels added to or all removed from a node")
        if _state_id(new) != _state_id(old) or new.node.id != old.node.id:
            restart.append("state / node.id")
        try:
            changed = self.dataplane.apply(new)
        except Exception as e:  # noqa: BLE001 - a config the data plane refuses: keep the old
            event("config_reload_failed", level=logging.ERROR, file=self.config_path,
                  first=f"data plane: {e}")
            return False
        if self.datapath is not None and _wants_ipsec(new):
            from .ike.tunnels import from_config
            from .ipsec import TunnelInfo
            for t in new.ipsec_tunnels:
                self.datapath.add_tunnel(t.id, TunnelInfo.from_config(t))
            self.engine.directory = from_config(new)
            gone = {t.name for t in old.ipsec_tunnels} - {t.name for t in new.ipsec_tunnels}
            for sa in list(self.engine.sas.values()):
                if sa.tunnel is not None and sa.tunnel.name in gone:
                    self.engine.destroy(sa, "tunnel_removed")
        self._gre = {t.name: self._gre.get(t.name, _GreLiveness()) for t in new.gre_tunnels}
        if self.analytics is not None:
            self.analytics.update(new)
        self.config = new
        event("config_reloaded", file=self.config_path,
              changed=",".join(f"{k}:{v}" for k, v in changed.items() if v) or "none",
              needs_restart=";".join(restart) or "none")
        return True

    # --- periodic work ---------------------------------------------------------------------
    def _watch_gre(self, now: float) -> None:
        if not self._gre or self.dataplane is None:
            return
        try:
            counters = self.dataplane.counters()
        except Exception:  # noqa: BLE001 - counters are best effort here
            return
        for t in self.config.gre_tunnels:
            st = self._gre.get(t.name)
            c = counters.tunnels.get(t.index)
            if st is None or c is None:
                continue
            if c.decap_packets != st.packets:
                st.packets, st.last_seen = c.decap_packets, now
                if not st.up:
                    st.up = True
                    event("tunnel_up", kind="gre", tunnel=t.name,
                          peer=str(t.customer_endpoint))
            elif st.up and now - st.last_seen > GRE_IDLE_S:
                st.up = False
                event("tunnel_down", kind="gre", tunnel=t.name, peer=str(t.customer_endpoint),
                      idle_s=int(now - st.last_seen))

    def _watch_workers(self) -> None:
        """An AF_XDP worker that stopped on its own (a fatal socket error) is an event, once;
        IPsec traffic through its device stops until a restart."""
        if self.ipsec_edge is None:
            return
        for w in self.ipsec_edge.workers:
            rc = w.exit_code
            if rc is not None and not getattr(w, "_xt_reported", False):
                w._xt_reported = True
                event("worker_failed", level=logging.ERROR, error=os.strerror(-rc) if rc < 0
                      else f"exit {rc}", hint="IPsec traffic stopped: restart xtransit")

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"node": self.config.node.name, "pid": os.getpid(),
                               "time": time.time(), "ike_sas": [], "ipsec": None}
        if self.engine is not None:
            from .ike.export import sa_rows
            out["ike_sas"] = sa_rows(self.engine, time.monotonic())
        if self.ipsec_edge is not None:
            out["ipsec"] = self.ipsec_edge.stats()
        out["gre"] = {n: {"up": s.up} for n, s in self._gre.items()}
        return out

    def _write_status(self) -> None:
        if self.status_path is None:
            return
        try:
            data = json.dumps(self.status(), default=str)
            self.status_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.status_path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
            with os.fdopen(fd, "w") as f:
                f.write(data)
            os.replace(tmp, self.status_path)
        except Exception as e:  # noqa: BLE001 - status is informational; never stop the edge
            log.debug("status file not written: %s", e)


def run(config_path: str) -> int:
    """Start, serve until a stop signal, close. Returns 0; start() errors propagate.

    From the first step to the last a signal never takes the default action (which would end
    the process with programs attached): SIGTERM before ``serve()`` installs its handlers is
    a KeyboardInterrupt (start()'s with-blocks unwind and detach; after start, close() runs),
    SIGHUP is remembered as a pending reload, and both are ignored while closing."""
    edge = Edge(config_path)

    def _early(signum, frame):
        raise KeyboardInterrupt

    def _hup(signum, frame):
        edge._reload_pending = True

    signal.signal(signal.SIGTERM, _early)
    signal.signal(signal.SIGHUP, _hup)
    edge.start()
    try:
        asyncio.run(edge.serve())
    except KeyboardInterrupt:
        pass
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        edge.close()
        event("stopped", node=edge.config.node.name if edge.config else "-")
    return 0
