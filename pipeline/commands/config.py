"""`xtransit config check FILE`: validate a config file and print what it describes.
`xtransit config push -c NODE.toml FLEET.toml`: publish the fleet's tunnels and routes to the
store, for nodes with ``[state] config_source = "store"`` (pipeline/fleet_config.py).

Exit status 0 when the file is valid, 2 when it is not (every error is printed, one per line, on
stderr), 1 when the store cannot be reached. Pre-shared keys are never printed: only where they
come from.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click

from ..config import Config, ConfigError, EtcdState, GreTunnel, IpsecTunnel, load

EXIT_INVALID = 2


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*headers).rstrip()] + [fmt.format(*r).rstrip() for r in rows]


def _duration(seconds: int) -> str:
    if seconds % 86400 == 0:
        return f"{seconds // 86400}d"
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def _options(t: GreTunnel | IpsecTunnel) -> str:
    if isinstance(t, GreTunnel):
        return f"key={t.key}" if t.key is not None else ""
    opts = [f"account={t.account_id}", f"psk={t.psk_source}",
            f"ike={_duration(t.ike_lifetime)}", f"child={_duration(t.child_lifetime)}",
            f"dpd={_duration(t.dpd_interval)}/{_duration(t.dpd_timeout)}"
            if t.dpd_interval else "dpd=off"]
    if t.allow_null_cipher:
        opts.append("null-cipher-allowed")
    if t.replay_protection:
        opts.append("replay-protection")
    if t.pin_node is not None:
        opts.append(f"pinned-to-node={t.pin_node}")
    return " ".join(opts)


def summary(cfg: Config) -> list[str]:
    """The lines `config check` prints for a valid config (no secret is in any of them)."""
    n = cfg.node
    lines = [
        f"{cfg.path}: OK",
        "",
        f"node        {n.name} (id {n.id})",
        f"endpoints   {', '.join(str(a) for a in n.tunnel_endpoints)}",
        f"interfaces  {', '.join(f'{i.name} ({i.role}, xdp {i.xdp_mode})' for i in n.interfaces)}",
        f"ipsec       identities <tunnel id>.<account id>.ipsec.{n.ipsec_domain}",
        "",
    ]
    if n.fleet_address is not None or cfg.fleet_nodes:
        others = ", ".join(f"{f.id}={f.address}" for f in cfg.fleet_nodes if f.id != n.id)
        lines[-1:-1] = [(f"fleet       this node {n.fleet_address or '(no fleet_address)'}; "
                         f"others {others or 'none'}")]
    tunnels = cfg.tunnels
    if tunnels:
        rows = [[t.name, t.kind, f"{t.index}{'' if t.index_configured else '*'}", t.id,
                 str(t.edge_endpoint),
                 str(t.customer_endpoint) if t.customer_endpoint is not None else "(dynamic)",
                 str(t.interface_address), str(t.mtu), str(t.mss), str(t.ttl), _options(t)]
                for t in tunnels]
        lines += _table(["TUNNEL", "TYPE", "INDEX", "ID", "EDGE", "CUSTOMER", "INTERFACE", "MTU",
                         "MSS", "TTL", "OPTIONS"], rows)
        if not all(t.index_configured for t in tunnels):
            lines.append("* index assigned automatically; set `index` to keep counters stable")
    else:
        lines.append("no tunnels")
    lines.append("")
    if cfg.routes:
        order = sorted(cfg.routes, key=lambda r: (r.prefix.version, r.prefix, r.priority, r.tunnel))
        lines += _table(["PREFIX", "TUNNEL", "PRIORITY"],
                        [[str(r.prefix), r.tunnel, str(r.priority)] for r in order])
    else:
        lines.append("no routes")
    lines.append("")
    s = cfg.state
    if isinstance(s, EtcdState):
        tls = "tls" if s.ca_file or s.cert_file else "no tls"
        lines.append(f"state       etcd {', '.join(s.endpoints)} prefix {s.prefix} ({tls}, "
                     f"fleet key from {s.fleet_key_file})")
    else:
        lines.append(f"state       sqlite {s.path}")
    a = cfg.analytics
    http = f"http {a.http_address}:{a.http_port}" if a.http_port else "http off"
    lines.append(f"analytics   1 in {a.sample_rate} packets, {http}, history "
                 f"{_duration(a.history_interval)} for {_duration(a.history_retention)}")
    return lines


@click.group("config")
def config() -> None:
    """Validate and inspect configuration files."""


def _invalid(file: str, e: ConfigError) -> None:
    for err in e.errors:
        click.echo(str(err), err=True)
    n = len(e.errors)
    click.echo(f"{file}: {n} error{'s' if n != 1 else ''}", err=True)
    raise SystemExit(EXIT_INVALID) from None


@config.command("check")
@click.argument("file", type=click.Path(dir_okay=True, path_type=str))
def check(file: str) -> None:
    """Validate FILE and print a summary; exit status 2 when it is invalid. With
    ``[state] config_source = "store"`` the tunnels and routes are read from the store."""
    from ..fleet_config import load_node
    from ..store import StoreError
    try:
        cfg = load_node(file)
    except ConfigError as e:
        _invalid(file, e)
    except StoreError as e:
        click.echo(f"{file}: state store: {e}", err=True)
        raise SystemExit(1) from None
    for line in summary(cfg):
        click.echo(line)
    if cfg.state.config_source == "store":
        click.echo("tunnels and routes: from the state store ([state] config_source)")


def _dry_run_plan(fleet, layout):
    """The push plan against the store as it is, without writing to it: a SQLite store that does
    not exist yet is empty (opening it would create the file)."""
    from .. import fleet_config
    from ..config import SqliteState
    from ..store import open_store
    if isinstance(fleet.state, SqliteState) and not Path(fleet.state.path).exists():
        return fleet_config.plan(fleet, layout)
    with open_store(fleet.state) as store:
        return fleet_config.plan(fleet, layout, store.list(layout.tunnels).records,
                                 store.list(layout.routes).records)


@config.command("push")
@click.option("--config", "-c", "node_file", required=True,
              type=click.Path(dir_okay=False, path_type=str),
              help="A node's configuration: its [state] names the store, its [node] is what "
                   "the tunnels are checked against.")
@click.option("--dry-run", is_flag=True, help="Validate and show what would change; write "
                                               "nothing.")
@click.argument("fleet_file", type=click.Path(dir_okay=False, path_type=str))
def push(node_file: str, fleet_file: str, dry_run: bool) -> None:
    """Publish FLEET_FILE's [tunnels] and [[routes]] to the state store: every node with
    ``[state] config_source = "store"`` applies them live (map updates). Tunnels and routes
    in the store that FLEET_FILE no longer has are deleted. Pre-shared keys are not written:
    each node reads them from the psk_file / psk_env a tunnel names."""
    import tomllib

    from .. import fleet_config
    from ..store import StoreError, open_store
    try:
        doc = tomllib.loads(Path(fleet_file).read_text(encoding="utf-8"))
    except OSError as e:
        click.echo(f"{fleet_file}: cannot read: {e.strerror}", err=True)
        raise SystemExit(EXIT_INVALID) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        click.echo(f"{fleet_file}: TOML syntax error: {e}", err=True)
        raise SystemExit(EXIT_INVALID) from None
    extra = sorted(set(doc) - {"tunnels", "routes"})
    if extra:
        click.echo(f"{fleet_file}: only [tunnels] and [[routes]] are published; "
                   f"{', '.join(extra)} belong in each node's own file", err=True)
        raise SystemExit(EXIT_INVALID)
    try:
        node = load(node_file)
        if node.state.config_source != "store":
            click.echo(f"{node_file}: [state] config_source is \"file\": nodes configured like "
                       "this do not read the store; set config_source = \"store\"", err=True)
            raise SystemExit(EXIT_INVALID)
        shared = {"tunnels": doc.get("tunnels", {}), "routes": doc.get("routes", [])}
        fleet = load(node_file, shared=shared, shared_file=fleet_file)
    except ConfigError as e:
        _invalid(f"{fleet_file} (checked against {node_file})", e)
    layout = fleet_config.layout_for(fleet.state)
    try:
        if dry_run:
            steps, unchanged = _dry_run_plan(fleet, layout)
            for st in steps:
                click.echo(f"{st.what:8} {st.name}")
            counts = {w: sum(st.what == w for st in steps) for w in ("added", "changed",
                                                                     "removed")}
            click.echo(f"dry run: would push {counts['added']} added, {counts['changed']} "
                       f"changed, {counts['removed']} removed, {unchanged} unchanged; nothing "
                       f"written")
            return
        with open_store(fleet.state) as store:
            res = fleet_config.push(fleet, store, layout)
    except StoreError as e:
        click.echo(f"state store ([state] in {node_file}): {e}", err=True)
        raise SystemExit(1) from None
    for what, names in (("added", res.added), ("changed", res.changed),
                        ("removed", res.removed)):
        for n in names:
            click.echo(f"{what:8} {n}")
    click.echo(f"pushed: {len(res.added)} added, {len(res.changed)} changed, "
               f"{len(res.removed)} removed, {res.unchanged} unchanged (store revision "
               f"{res.revision})")
