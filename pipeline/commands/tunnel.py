"""`xtransit tunnel list|show`: the configured tunnels and their state on the running edge.

State comes from the daemon's status file (/run/xtransit/<node>/status.json): a GRE tunnel is
``up`` once decapsulated traffic was seen (``down`` after GRE_IDLE_S without any), an IPsec
tunnel is ``up`` while it has an SA pair in the data path (``negotiating`` with an IKE SA but no
Child SA yet); ``-`` when no daemon runs. Counters are the data path's (`xtransit stats`).
"""
from __future__ import annotations

import json
from typing import Any

import click

from ..config import ConfigError, GreTunnel
from ..xdp import maps
from .stats import RUN_ROOT, esp_status


def _status(node: str) -> dict[str, Any]:
    try:
        st = json.loads((RUN_ROOT / node / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    return st if isinstance(st, dict) else {}


def tunnel_rows(cfg, status: dict[str, Any], counters: maps.Counters | None) -> list[dict]:
    """One dict per configured tunnel: identity, endpoints, state, SAs, packets each way."""
    esp = (status.get("ipsec") or {}).get("tunnels") or {}
    ike_by_tunnel: dict[str, list[dict]] = {}
    for sa in status.get("ike_sas") or ():
        ike_by_tunnel.setdefault(sa.get("tunnel"), []).append(sa)
    rows = []
    for t in cfg.tunnels:
        row: dict[str, Any] = {
            "name": t.name, "kind": t.kind, "index": t.index, "id": t.id,
            "edge": str(t.edge_endpoint),
            "customer": str(t.customer_endpoint) if t.customer_endpoint else "(dynamic)",
            "mtu": t.mtu, "mss": t.mss}
        if isinstance(t, GreTunnel):
            c = counters.tunnels.get(t.index) if counters else None
            gre = (status.get("gre") or {}).get(t.name)
            row["state"] = "-" if gre is None else ("up" if gre.get("up") else "down")
            row["packets_out"] = c.decap_packets if c else None    # from the customer
            row["packets_in"] = c.encap_packets if c else None     # to the customer
            row["ike_sas"] = row["child_sas"] = None
        else:
            e = esp.get(t.name)
            ikes = ike_by_tunnel.get(t.name, [])
            children = sum(len(sa.get("children") or ()) for sa in ikes)
            if not status:
                row["state"] = "-"
            elif e is not None and any(s.get("direction") == "out" for s in e.get("sas", ())):
                row["state"] = "up"
            else:
                row["state"] = "negotiating" if ikes else "down"
            row["packets_out"] = e["in"]["packets"] if e else None   # decrypted
            row["packets_in"] = e["out"]["packets"] if e else None   # encrypted
            row["ike_sas"], row["child_sas"] = len(ikes), children
            row["pin_node"] = t.pin_node        # None: every node encrypts its own share
            if ikes:
                row["peer"] = ikes[-1].get("peer")
        rows.append(row)
    return rows


def _v(x: Any) -> str:
    return "-" if x is None else str(x)


def render(rows: list[dict]) -> list[str]:
    table = [["TUNNEL", "TYPE", "INDEX", "EDGE", "CUSTOMER", "STATE", "IKE/CHILD SAS",
              "PKTS IN", "PKTS OUT"]]
    for r in rows:
        sas = "-" if r["ike_sas"] is None else f"{r['ike_sas']}/{r['child_sas']}"
        table.append([r["name"], r["kind"], str(r["index"]), r["edge"], r["customer"],
                      r["state"], sas, _v(r["packets_in"]), _v(r["packets_out"])])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table]


def _load(config_file: str):
    from ..fleet_config import load_node
    from ..store import StoreError
    try:
        return load_node(config_file)
    except ConfigError as e:
        for err in e.errors:
            click.echo(str(err), err=True)
        raise SystemExit(2) from None
    except StoreError as e:
        click.echo(f"{config_file}: state store: {e}", err=True)
        raise SystemExit(1) from None


def _counters(cfg) -> maps.Counters | None:
    try:
        return maps.read_pinned(cfg.node.name, sorted(t.index for t in cfg.tunnels))
    except maps.MapError:
        return None


@click.group("tunnel")
def tunnel() -> None:
    """Configured tunnels and their state on the running edge."""


@tunnel.command("list")
@click.option("--config", "-c", "config_file", required=True,
              type=click.Path(dir_okay=False, path_type=str), help="Configuration file (TOML).")
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
def list_(config_file: str, as_json: bool) -> None:
    """Every tunnel: type, endpoints, state (up / down / negotiating; - without a running
    daemon), SAs, packets to (IN) and from (OUT) the customer."""
    cfg = _load(config_file)
    rows = tunnel_rows(cfg, _status(cfg.node.name), _counters(cfg))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for line in render(rows):
        click.echo(line)


@tunnel.command("show")
@click.option("--config", "-c", "config_file", required=True,
              type=click.Path(dir_okay=False, path_type=str), help="Configuration file (TOML).")
@click.argument("name")
def show(config_file: str, name: str) -> None:
    """One tunnel: its configuration, routes, state and counters (no keys)."""
    cfg = _load(config_file)
    try:
        t = cfg.tunnel(name)
    except KeyError:
        click.echo(f"no tunnel named {name!r} in {config_file} (tunnels: "
                   f"{', '.join(x.name for x in cfg.tunnels) or 'none'})", err=True)
        raise SystemExit(1) from None
    status = _status(cfg.node.name)
    row = next(r for r in tunnel_rows(cfg, status, _counters(cfg)) if r["name"] == name)
    lines = [f"tunnel      {t.name} ({t.kind}, index {t.index}, id {t.id})",
             f"endpoints   edge {row['edge']}  customer {row['customer']}",
             f"interface   {t.interface_address}  mtu {t.mtu}  mss {t.mss}  ttl {t.ttl}",
             f"state       {row['state']}",
             (f"packets     in (to the customer) {_v(row['packets_in'])}  out (from the "
             f"customer) {_v(row['packets_out'])}"),
             "routes      " + (", ".join(f"{r.prefix} (priority {r.priority})"
                                         for r in cfg.routes_for(name)) or "none")]
    if t.kind == "ipsec":
        pin = ("not pinned (each node encrypts what reaches it)" if t.pin_node is None else
               f"node {t.pin_node}" + (" (this node)" if t.pin_node == cfg.node.id else
                                       ": other nodes carry its traffic there in GRE"))
        lines.append(f"encrypts    {pin}")
        lines.append(f"identities  {t.identities.fqdn}, {t.identities.user_fqdn}, key id "
                     f"{t.identities.key_id.decode(errors='replace')}; psk from {t.psk_source}")
        for sa in status.get("ike_sas") or ():
            if sa.get("tunnel") != name:
                continue
            lines.append(f"IKE SA      {sa['ike_spi_i']}/{sa['ike_spi_r']} {sa['state']} peer "
                         f"{sa['peer']} NAT-T {sa['nat_t']} {sa['algorithms']}")
            for c in sa.get("children") or ():
                lines.append(f"  Child SA  in {c['spi_in']} out {c['spi_out']} "
                             f"{c['algorithms']}")
        e = ((status.get("ipsec") or {}).get("tunnels") or {}).get(name)
        if e:
            drops = {f"{d}_{k}": v for d in ("in", "out")
                     for k, v in (e[d].get("drops") or {}).items() if v}
            lines.append("ESP drops   " + (" ".join(f"{k}={v}" for k, v in sorted(drops.items()))
                                           or "none"))
    for line in lines:
        click.echo(line)


__all__ = ["esp_status", "render", "tunnel", "tunnel_rows"]
