"""`xtransit stats CONFIG`: per-tunnel counters and rates of the running edge.

Reads the maps the data plane pinned under /sys/fs/bpf/xtransit/<node name>/ (summed over
CPUs): packets and bytes decapsulated (customer -> Internet) and encapsulated (the other way)
per tunnel, every other outcome per tunnel by reason, and the node-wide count of each reason.
An IPsec tunnel's traffic is counted by the native ESP module inside the daemon: those rows
come from the daemon's status file (/run/xtransit/<node>/status.json, rewritten every second),
decrypted as DECAP and encrypted as ENCAP.

``--rates`` adds one table of packets and bits per second in each direction and drops per
second by reason, measured over ``--interval``; ``--watch`` refreshes that table until Ctrl-C.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from ..config import ConfigError
from ..xdp import maps

RUN_ROOT = Path(os.environ.get("XTRANSIT_RUN_ROOT", "/run/xtransit"))


def esp_status(node: str) -> dict[str, Any] | None:
    """The ``ipsec`` part of the daemon's status file (None when no daemon writes one)."""
    try:
        status = json.loads((RUN_ROOT / node / "status.json").read_text())
    except (OSError, ValueError):
        return None
    return status.get("ipsec") if isinstance(status, dict) else None


def render(cfg, counters: maps.Counters, esp: dict[str, Any] | None = None) -> list[str]:
    rows = [["TUNNEL", "INDEX", "DECAP PKTS", "DECAP BYTES", "ENCAP PKTS", "ENCAP BYTES",
             "OTHER (reason=packets)"]]
    esp_tunnels = (esp or {}).get("tunnels") or {}
    for t in cfg.tunnels:
        c = counters.tunnels.get(t.index, maps.TunnelCounters())
        other = dict(counters.tunnel_reasons.get(t.index, {}))
        dp, db, ep, eb = c.decap_packets, c.decap_bytes, c.encap_packets, c.encap_bytes
        e = esp_tunnels.get(t.name) if t.kind == "ipsec" else None
        if e is not None:       # decrypted / encrypted by the ESP module
            dp, db = e["in"]["packets"], e["in"]["bytes"]
            ep, eb = e["out"]["packets"], e["out"]["bytes"]
            for d in ("in", "out"):
                for reason, v in (e[d].get("drops") or {}).items():
                    if v:
                        other[f"esp_{d}_{reason}"] = v
        rows.append([t.name, str(t.index), str(dp), str(db), str(ep), str(eb),
                     " ".join(f"{k}={v}" for k, v in sorted(other.items())) or "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines += ["", "REASON  PACKETS  BYTES (node-wide)"]
    for name, (p, b) in sorted(counters.reasons.items()):
        lines.append(f"{name}  {p}  {b}")
    if esp_tunnels:
        lines.append("IPsec rows: decrypted (DECAP) and encrypted (ENCAP) by the ESP module "
                     "(daemon status file)")
    lines += worker_lines((esp or {}).get("workers") or [])
    return lines


def worker_lines(workers: list[dict[str, Any]]) -> list[str]:
    """One row per AF_XDP worker: what it took, where it sent it (straight out of the egress
    device, or through the internal veth to the kernel's forwarding and why), what was lost."""
    if not workers:
        return []
    rows = [["WORKER", "RX", "DECRYPTED", "ENCRYPTED", "DIRECT", "VIA VETH", "TTL<=1", "TOO BIG",
             "NO ROUTE", "FIB LOOKUPS", "RX RING FULL"]]
    for i, w in enumerate(workers):
        rows.append([str(i)] + [str(int(w.get(k, 0))) for k in (
            "rx_packets", "decrypt_ok", "encrypt_ok", "tx_direct", "tx_slow", "slow_ttl",
            "slow_mtu", "nh_no_route", "nh_lookups", "k_rx_ring_full")])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [""] + ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]


@click.command("stats")
@click.argument("config_file", required=False, type=click.Path(dir_okay=False, path_type=str))
@click.option("--config", "-c", "config_opt", type=click.Path(dir_okay=False, path_type=str),
              help="Configuration file (or give it as the argument).")
@click.option("--rates", is_flag=True, help="Also print packets and bits per second per tunnel "
                                            "and direction, measured over --interval.")
@click.option("--watch", is_flag=True, help="Refresh the rates table every --interval until "
                                            "Ctrl-C.")
@click.option("--interval", type=click.FloatRange(0.1, 3600), default=1.0, show_default=True,
              help="Seconds between readings.")
@click.option("--count", type=click.IntRange(1), default=None,
              help="With --watch: stop after this many tables.")
def stats(config_file: str | None, config_opt: str | None, rates: bool, watch: bool,
          interval: float, count: int | None) -> None:
    """Print the per-tunnel counters (and rates) of the edge running with CONFIG_FILE."""
    path = config_opt or config_file
    if path is None:
        raise click.UsageError("give the configuration file (argument or -c)")
    from ..fleet_config import load_node
    from ..store import StoreError
    try:
        cfg = load_node(path)
    except ConfigError as e:
        for err in e.errors:
            click.echo(str(err), err=True)
        raise SystemExit(2) from None
    except StoreError as e:
        click.echo(f"{path}: state store: {e}", err=True)
        raise SystemExit(1) from None
    try:
        counters = maps.read_pinned(cfg.node.name, sorted(t.index for t in cfg.tunnels))
    except maps.MapError as e:
        click.echo(f"no running data plane for node {cfg.node.name!r}: {e.strerror}", err=True)
        raise SystemExit(1) from None
    if not watch:
        for line in render(cfg, counters, esp_status(cfg.node.name)):
            click.echo(line)
    if rates or watch:
        from ..analytics.collector import EspSource, XdpSource
        from ..analytics.live import watch as live_watch
        sources: list[Any] = [XdpSource.for_config(cfg)]
        if cfg.ipsec_tunnels:
            sources.append(EspSource(lambda: esp_status(cfg.node.name) or {},
                                     generation=cfg.node.name))
        if not watch:
            click.echo("")
        live_watch(cfg, interval=interval, count=count if watch else 1, echo=click.echo,
                   sources=sources)
