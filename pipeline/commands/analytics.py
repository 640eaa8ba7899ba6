"""`xtransit analytics`: a tunnel's traffic history and its sampled top talkers.

    xtransit analytics -c CONFIG --tunnel NAME --since 1h            history as a table
    xtransit analytics -c CONFIG --tunnel NAME --since 1h --plot F   ... as a PNG
    xtransit analytics top -c CONFIG --tunnel NAME --since 10m       top sources, ports, mix
    xtransit analytics serve -c CONFIG                               collector + /metrics

The history comes from the analytics store (the [analytics] table: history_file and its
retention) written by the collector (``serve``, or ``xtransit run``). ``in`` is traffic to the
customer (ingress), ``out`` traffic from the customer (egress). The config file defaults to
$XTRANSIT_CONFIG, else /etc/xtransit/xtransit.toml.
"""
from __future__ import annotations

import re
import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import click

from ..config import ConfigError, load

DEFAULT_CONFIG = "/etc/xtransit/xtransit.toml"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """'90s', '10m', '1h', '30d', '1h30m' or plain seconds -> seconds."""
    text = text.strip().lower()
    if text.isdigit():
        return int(text)
    parts = re.findall(r"(\d+)([smhd])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise click.BadParameter(f"not a duration: {text!r} (use e.g. 90s, 10m, 1h, 30d)")
    return sum(int(n) * _UNITS[u] for n, u in parts)


def _si(v: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.2f}"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in
                      enumerate(zip(r, widths))).rstrip() for r in rows]


def _config(path: str | None):
    try:
        return load(path or DEFAULT_CONFIG)
    except ConfigError as e:
        for err in e.errors:
            click.echo(str(err), err=True)
        raise SystemExit(2) from None
    except OSError as e:
        click.echo(f"cannot read config {path or DEFAULT_CONFIG}: {e.strerror}", err=True)
        raise SystemExit(2) from None


def _history(cfg, db: str | None):
    from ..analytics.store import History, StoreError
    path = db or cfg.analytics.history_file
    if not Path(path).exists():
        click.echo(f"no analytics history at {path}: `xtransit run` writes it while the edge "
                   f"runs ([analytics] history_file in the config; --db reads another file)",
                   err=True)
        raise SystemExit(1)
    try:
        a = cfg.analytics
        return History(path, fine_retention=a.fine_retention, coarse=a.history_interval,
                       coarse_retention=a.history_retention, max_bytes=a.history_max_bytes,
                       tunnel_names={t.index: t.name for t in cfg.tunnels}, readonly=True)
    except StoreError as e:
        click.echo(f"no analytics history: {e}", err=True)
        raise SystemExit(1) from None


def _check_tunnel(cfg, name: str) -> None:
    names = [t.name for t in cfg.tunnels]
    if name not in names:
        raise click.BadParameter(f"no tunnel {name!r} in {cfg.path} (tunnels: "
                                 f"{', '.join(names) or 'none'})", param_hint="--tunnel")


_config_option = click.option("-c", "--config", "config_file", envvar="XTRANSIT_CONFIG",
                              type=click.Path(dir_okay=False), default=None,
                              help=f"Config file (default $XTRANSIT_CONFIG or {DEFAULT_CONFIG}).")
_db_option = click.option("--db", type=click.Path(dir_okay=False), default=None,
                          help="History file (default: the config's analytics.history_file).")


@click.group("analytics", invoke_without_command=True)
@_config_option
@_db_option
@click.option("--tunnel", "tunnel", default=None, help="Tunnel name (from the config).")
@click.option("--since", default="1h", show_default=True, help="How far back: 90s, 10m, 1h, 30d.")
@click.option("--resolution", type=click.Choice(["auto", "fine", "coarse"]), default="auto",
              show_default=True, help="fine: 1-second points; coarse: history_interval points.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG of bits and packets per second in and out, with drops.")
@click.pass_context
def analytics(ctx: click.Context, config_file, db, tunnel, since, resolution, plot_file) -> None:
    """Traffic history of a tunnel (table or --plot PNG); `top` for sampled top talkers."""
    if ctx.invoked_subcommand is not None:
        return
    if tunnel is None:
        raise click.UsageError("--tunnel NAME is required (or a subcommand: top, serve)")
    cfg = _config(config_file)
    _check_tunnel(cfg, tunnel)
    span = parse_duration(since)
    hist = _history(cfg, db)
    try:
        res = {"auto": hist.resolution_for(span), "fine": 1,
               "coarse": hist.coarse}[resolution]
        now = int(time.time())
        start = (now - span) // res * res
        points = hist.points(tunnel, start, res=res)
        drops = hist.drops(tunnel, start, res=res)
    finally:
        hist.close()
    if plot_file:
        if not points:
            click.echo(f"no traffic recorded for {tunnel} in the last {since}: nothing to plot",
                       err=True)
            raise SystemExit(1)
        from ..analytics.plot import render
        render(points, plot_file, title=f"{tunnel}: last {since}", res=res, start=start,
               end=now + 1)
        click.echo(f"wrote {plot_file} ({len(points)} points at {res} s)")
        return
    rows = [["TIME (UTC)", "IN PPS", "IN BPS", "OUT PPS", "OUT BPS", "DROPS/S"]]
    for p in points:
        rows.append([datetime.fromtimestamp(p.ts, UTC).strftime("%Y-%m-%d %H:%M:%S"),
                     _si(p.in_pps), _si(p.in_bps), _si(p.out_pps), _si(p.out_bps),
                     _si(p.drop_pps)])
    for line in _table(rows):
        click.echo(line)
    tot = [sum(getattr(p, f) for p in points) for f in
           ("in_packets", "in_bytes", "out_packets", "out_bytes")]
    click.echo("")
    click.echo(f"total  in {tot[0]} packets {tot[1]} bytes  out {tot[2]} packets {tot[3]} bytes"
               f"  ({len(points)} points at {res} s)")
    click.echo("drops  " + (" ".join(f"{r}={n}" for r, n in sorted(drops.items())) or "-"))


@analytics.command("top")
@_config_option
@_db_option
@click.option("--tunnel", required=True, help="Tunnel name; '' for frames of no tunnel.")
@click.option("--since", default="10m", show_default=True, help="How far back (minutes).")
@click.option("--limit", default=10, show_default=True, type=click.IntRange(1, 1000))
@click.pass_context
def top(ctx: click.Context, config_file, db, tunnel, since, limit) -> None:
    """Sampled top source addresses, destination ports, protocols and TCP flags of a tunnel."""
    parent = ctx.parent.params if ctx.parent else {}
    cfg = _config(config_file or parent.get("config_file"))
    if tunnel:
        _check_tunnel(cfg, tunnel)
    span = parse_duration(since)
    hist = _history(cfg, db or parent.get("db"))
    try:
        start = int(time.time()) - span
        sections = {kind: hist.top(tunnel, start, kind, limit) for kind in
                    ("samples", "src", "dport", "proto", "tcp_flags", "drop_reason")}
    finally:
        hist.close()
    rate = cfg.analytics.sample_rate
    click.echo(f"{tunnel or '(no tunnel)'}: samples since {since} "
               f"(1 in {rate} frames, plus dropped frames up to "
               f"{cfg.analytics.drop_sample_limit}/s per CPU)")
    titles = {"samples": "SAMPLE KIND", "src": "SOURCE", "dport": "DST PORT", "proto": "PROTOCOL",
              "tcp_flags": "TCP FLAGS", "drop_reason": "DROP REASON"}
    for kind, items in sections.items():
        click.echo("")
        if not items:
            click.echo(f"{titles[kind]}  -")
            continue
        total = sum(n for _, n in items)
        rows = [[titles[kind], "SAMPLES", "SHARE"]]
        rows += [[k, str(n), f"{100 * n / total:.1f}%"] for k, n in items]
        for line in _table(rows):
            click.echo(line)


@analytics.command("serve")
@_config_option
@click.option("--seconds", type=float, default=None, help="Stop after this long (default: "
              "until SIGTERM or Ctrl-C).")
@click.pass_context
def serve(ctx: click.Context, config_file, seconds) -> None:
    """Collect the running data plane's counters into the history and serve /metrics."""
    from ..analytics.collector import Collector, XdpSource
    from ..analytics.exporter import Exporter
    from ..analytics.store import History
    parent = ctx.parent.params if ctx.parent else {}
    cfg = _config(config_file or parent.get("config_file"))
    hist = History.for_config(cfg)
    coll = Collector([XdpSource.for_config(cfg)], sinks=[hist])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    exporter = None
    try:
        coll.start()
        if cfg.analytics.http_port:
            exporter = Exporter(coll, str(cfg.analytics.http_address), cfg.analytics.http_port)
            click.echo(f"metrics on http://{cfg.analytics.http_address}:{exporter.port}/metrics")
        click.echo(f"collecting into {hist.path}", )
        try:
            stop.wait(seconds)
        except KeyboardInterrupt:
            pass
    finally:
        coll.close()
        if exporter is not None:
            exporter.close()
        hist.close()
