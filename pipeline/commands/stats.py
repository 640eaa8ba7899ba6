"""`xtransit stats CONFIG`: per-tunnel counters of the running data plane.

Reads the maps the data plane pinned under /sys/fs/bpf/xtransit/<node name>/ (summed over
CPUs): packets and bytes decapsulated (customer -> Internet) and encapsulated (the other way)
per tunnel, every other outcome per tunnel by reason, and the node-wide count of each reason.
"""
from __future__ import annotations

import click

from ..config import ConfigError, load
from ..xdp import maps


def render(cfg, counters: maps.Counters) -> list[str]:
    rows = [["TUNNEL", "INDEX", "DECAP PKTS", "DECAP BYTES", "ENCAP PKTS", "ENCAP BYTES",
             "OTHER (reason=packets)"]]
    for t in cfg.tunnels:
        c = counters.tunnels.get(t.index, maps.TunnelCounters())
        other = " ".join(f"{k}={v}" for k, v in sorted(counters.tunnel_reasons.get(t.index,
                                                                                   {}).items()))
        rows.append([t.name, str(t.index), str(c.decap_packets), str(c.decap_bytes),
                     str(c.encap_packets), str(c.encap_bytes), other or "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines += ["", "REASON  PACKETS  BYTES (node-wide)"]
    for name, (p, b) in sorted(counters.reasons.items()):
        lines.append(f"{name}  {p}  {b}")
    return lines


@click.command("stats")
@click.argument("config_file", type=click.Path(dir_okay=False, path_type=str))
def stats(config_file: str) -> None:
    """Print the per-tunnel counters of the data plane running with CONFIG_FILE."""
    try:
        cfg = load(config_file)
    except ConfigError as e:
        for err in e.errors:
            click.echo(str(err), err=True)
        raise SystemExit(2) from None
    try:
        counters = maps.read_pinned(cfg.node.name, sorted(t.index for t in cfg.tunnels))
    except maps.MapError as e:
        click.echo(f"no running data plane for node {cfg.node.name!r}: {e.strerror}", err=True)
        raise SystemExit(1) from None
    for line in render(cfg, counters):
        click.echo(line)
