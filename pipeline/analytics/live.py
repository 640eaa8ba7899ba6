"""Current rates per tunnel, refreshed: what `xtransit stats --watch` shows.

A :class:`Collector` over the pins of the running data plane (and nothing else: no history is
written), one table per refresh: packets and bits per second in (to the customer) and out (from
the customer), and drops per second by reason.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable

from .collector import EGRESS, INGRESS, NODE, Collector, Tick, XdpSource

CLEAR = "\x1b[H\x1b[2J"


def _si(v: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}"


def rate_lines(cfg, tick: Tick) -> list[str]:
    """The rates table of one tick, a row per configured tunnel (and one for drops that belong
    to no tunnel, when there are any)."""
    rates, drops = tick.rates(), tick.drop_rates()
    rows = [["TUNNEL", "IN PPS", "IN BPS", "OUT PPS", "OUT BPS", "DROPS/S (reason=rate)"]]
    names = [t.name for t in cfg.tunnels]
    if any(t == NODE for t, _ in drops):
        names.append(NODE)
    for name in names:
        ipps, ibps = rates.get((name, INGRESS), (0.0, 0.0))
        opps, obps = rates.get((name, EGRESS), (0.0, 0.0))
        d = " ".join(f"{r}={_si(v)}" for (t, r), v in sorted(drops.items()) if t == name and v)
        rows.append([name or "(no tunnel)", _si(ipps), _si(ibps), _si(opps), _si(obps),
                     d or "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(v.ljust(w) if i in (0, 5) else v.rjust(w)
                      for i, (v, w) in enumerate(zip(r, widths))).rstrip() for r in rows]


def watch(cfg, interval: float = 1.0, count: int | None = None,
          echo: Callable[[str], None] | None = None, clear: bool | None = None,
          sources: list | None = None) -> int:
    """Print the rates table every ``interval`` seconds (``count`` times, or until Ctrl-C).
    Returns how many tables were printed. The screen is cleared between tables on a terminal.
    ``sources``: what to read (default: the pinned XDP maps of ``cfg``'s node)."""
    echo = echo or (lambda s: print(s, flush=True))
    clear = sys.stdout.isatty() if clear is None else clear
    coll = Collector(sources or [XdpSource.for_config(cfg)], interval=interval)
    coll.tick()
    shown = 0
    try:
        while count is None or shown < count:
            time.sleep(interval)
            tick = coll.tick()
            if tick is None:
                continue
            if coll.errors and not tick.traffic:
                echo(f"no running data plane for node {cfg.node.name!r} "
                     f"({sum(coll.errors.values())} failed reads)")
            lines = rate_lines(cfg, tick)
            stamp = time.strftime("%H:%M:%S", time.gmtime(tick.ts))
            echo((CLEAR if clear else "") + f"{stamp} UTC, rates over {tick.interval:.2f} s")
            for line in lines:
                echo(line)
            shown += 1
    except KeyboardInterrupt:
        pass
    return shown
