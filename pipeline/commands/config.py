"""`xtransit config check FILE`: validate a config file and print what it describes.

Exit status 0 when the file is valid, 2 when it is not (every error is printed, one per line, on
stderr). Pre-shared keys are never printed: only where they come from.
"""
from __future__ import annotations

from collections.abc import Sequence

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


@config.command("check")
@click.argument("file", type=click.Path(dir_okay=True, path_type=str))
def check(file: str) -> None:
    """Validate FILE and print a summary; exit status 2 when it is invalid."""
    try:
        cfg = load(file)
    except ConfigError as e:
        for err in e.errors:
            click.echo(str(err), err=True)
        n = len(e.errors)
        click.echo(f"{file}: {n} error{'s' if n != 1 else ''}", err=True)
        raise SystemExit(EXIT_INVALID) from None
    for line in summary(cfg):
        click.echo(line)
