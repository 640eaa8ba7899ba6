"""A PNG of one tunnel's history: bits and packets per second in and out, with drops.

Two panels sharing the time axis: bits per second (ingress to the customer, egress from the
customer) and packets per second (the same two, and drops per second). matplotlib with the Agg
backend: no display needed.
"""
from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from .store import Point


def _si(v: float, _pos=None) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.3g}"


def render(points: list[Point], path: str | Path, *, title: str, res: int,
           start: int | None = None, end: int | None = None) -> Path:
    """Write the PNG of [start, end) (default: the points' span); ``points`` may have gaps
    (idle intervals): they are drawn as zero. Each point is a step ``res`` seconds wide."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    if not points:
        raise ValueError("no points to plot")
    by_ts = {p.ts: p for p in points}
    lo = min(points[0].ts, start if start is not None else points[0].ts) // res * res
    hi = max(points[-1].ts + res, end if end is not None else 0)
    ts = list(range(lo, hi, res))
    pts = [by_ts.get(t, Point(t, res, 0, 0, 0, 0, 0)) for t in ts]
    pts.append(pts[-1])          # the last step's right edge
    x = [datetime.fromtimestamp(t, UTC).replace(tzinfo=None) for t in (*ts, ts[-1] + res)]
    fig, (ax_b, ax_p) = plt.subplots(2, 1, sharex=True, figsize=(10, 6), dpi=100)
    try:
        ax_b.plot(x, [p.in_bps for p in pts], label="in (to customer)", color="tab:blue",
                  drawstyle="steps-post")
        ax_b.plot(x, [p.out_bps for p in pts], label="out (from customer)", color="tab:green",
                  drawstyle="steps-post")
        ax_b.set_ylabel("bits/s")
        ax_p.plot(x, [p.in_pps for p in pts], label="in (to customer)", color="tab:blue",
                  drawstyle="steps-post")
        ax_p.plot(x, [p.out_pps for p in pts], label="out (from customer)", color="tab:green",
                  drawstyle="steps-post")
        ax_p.plot(x, [p.drop_pps for p in pts], label="drops", color="tab:red",
                  drawstyle="steps-post")
        ax_p.set_ylabel("packets/s")
        for ax in (ax_b, ax_p):
            ax.yaxis.set_major_formatter(FuncFormatter(_si))
            ax.grid(True, alpha=0.3)
            ax.legend(loc="upper left", fontsize="small")
            ax.set_ylim(bottom=0)
        ax_p.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        ax_p.set_xlim(x[0], x[-1])
        ax_p.set_xlabel(f"UTC, {res}-second points")
        fig.suptitle(title)
        fig.autofmt_xdate()
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)
    return out
