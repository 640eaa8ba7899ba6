"""`xtransit analytics` on a history written here with known counts (no data plane needed)."""
from __future__ import annotations

import time
from collections import Counter

import pytest
from click.testing import CliRunner
from gre_support import toml

from pipeline.analytics.collector import EGRESS, INGRESS, Tick
from pipeline.analytics.store import History
from pipeline.cli import cli
from pipeline.commands.analytics import parse_duration


@pytest.fixture
def setup(tmp_path):
    db = tmp_path / "an.db"
    cfg = tmp_path / "edge.toml"
    cfg.write_text(toml() + f'\n[analytics]\nhistory_file = "{db}"\nsample_rate = 100\n')
    now = int(time.time())
    h = History(db, tunnel_names={1: "plain", 2: "keyed"})
    for i, ts in enumerate(range(now - 5, now)):
        h.add(Tick(ts + 0.5, 1.0, {("plain", INGRESS): (10 * i, 1000 * i),
                                   ("plain", EGRESS): (i, 125 * i)},
                   {("plain", "inner_malformed"): i % 2}, {},
                   Counter({(ts // 60 * 60, 1, "src", f"192.0.2.{i % 2}"): i + 1,
                            (ts // 60 * 60, 1, "dport", "443"): i + 1})))
    h.close()
    return cfg, now


def run(*args: str):
    return CliRunner().invoke(cli, ["analytics", *args], catch_exceptions=False)


def test_table_rows_and_totals(setup):
    cfg, _ = setup
    r = run("-c", str(cfg), "--tunnel", "plain", "--since", "1m")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split() == ["TIME", "(UTC)", "IN", "PPS", "IN", "BPS", "OUT", "PPS", "OUT",
                                "BPS", "DROPS/S"]
    # the first second had no traffic and no drops: no point; then i = 1..4
    rows = [ln.split()[2:] for ln in lines[1:5]]
    assert rows[0] == ["10", "8.00k", "1", "1.00k", "1"]
    assert rows[3] == ["40", "32.00k", "4", "4.00k", "0"]
    assert lines[-2] == "total  in 100 packets 10000 bytes  out 10 packets 1250 bytes  " \
                        "(4 points at 1 s)"
    assert lines[-1] == "drops  inner_malformed=2"


def test_plot_written(setup, tmp_path):
    cfg, _ = setup
    png = tmp_path / "p.png"
    r = run("-c", str(cfg), "--tunnel", "plain", "--since", "2m", "--plot", str(png))
    assert r.exit_code == 0, r.output
    assert r.output == f"wrote {png} (4 points at 1 s)\n"
    import matplotlib.image as mpimg
    img = mpimg.imread(png)
    assert img.shape[:2] == (600, 1000) and png.stat().st_size > 10_000
    blue = (abs(img[..., 0] - 0x1f / 255) < 0.05) & (abs(img[..., 2] - 0xb4 / 255) < 0.05)
    assert blue.sum() > 100                      # tab:blue: the in lines


def test_top(setup):
    cfg, _ = setup
    r = run("top", "-c", str(cfg), "--tunnel", "plain", "--since", "10m")
    assert r.exit_code == 0, r.output
    out = r.output.splitlines()
    assert out[0] == "plain: samples since 10m (1 in 100 frames, plus dropped frames up to " \
                     "100/s per CPU)"
    i = out.index("SOURCE     SAMPLES  SHARE")
    assert out[i + 1:i + 3] == ["192.0.2.0        9  60.0%", "192.0.2.1        6  40.0%"]
    i = out.index("DST PORT  SAMPLES   SHARE")
    assert out[i + 1] == "443            15  100.0%"
    assert "TCP FLAGS  -" in out


def test_errors_are_clear(setup, tmp_path):
    cfg, _ = setup
    r = CliRunner().invoke(cli, ["analytics", "-c", str(cfg), "--tunnel", "nope"])
    assert r.exit_code == 2 and "no tunnel 'nope'" in r.output and "plain" in r.output
    r = CliRunner().invoke(cli, ["analytics", "-c", str(cfg)])
    assert r.exit_code == 2 and "--tunnel NAME is required" in r.output
    r = CliRunner().invoke(cli, ["analytics", "-c", str(cfg), "--tunnel", "plain", "--since",
                                 "ten"])
    assert r.exit_code == 2 and "not a duration" in r.output
    r = CliRunner().invoke(cli, ["analytics", "-c", str(cfg), "--db", str(tmp_path / "x.db"),
                                 "--tunnel", "plain"])
    assert r.exit_code == 1
    assert r.output == (f"no analytics history at {tmp_path / 'x.db'}: `xtransit run` writes it "
                        "while the edge runs ([analytics] history_file in the config; --db reads "
                        "another file)\n")
    assert not (tmp_path / "x.db").exists()
    r = CliRunner().invoke(cli, ["analytics", "-c", str(tmp_path / "none.toml"), "--tunnel",
                                 "plain"])
    assert r.exit_code == 2 and "none.toml" in r.output
    r = CliRunner().invoke(cli, ["analytics", "-c", str(cfg), "--tunnel", "keyed", "--plot",
                                 str(tmp_path / "k.png")])
    assert r.exit_code == 1 and "nothing to plot" in r.output


def test_durations():
    assert [parse_duration(s) for s in ("90", "90s", "10m", "1h", "1h30m", "30d")] == [
        90, 90, 600, 3600, 5400, 30 * 86400]
    for bad in ("", "1x", "h", "1h 30m", "-5"):
        with pytest.raises(Exception, match="not a duration"):
            parse_duration(bad)
