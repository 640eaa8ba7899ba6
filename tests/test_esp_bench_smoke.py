"""The ESP benchmark runner in its smoke mode (no timing asserted: figures live in bench/RESULTS.md).
It runs in a child process because it pins itself to one core."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_runner_quick_mode():
    res = subprocess.run([sys.executable, "-m", "bench.bench_esp", "--quick"], cwd=REPO,
                         check=False, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = [ln for ln in res.stdout.splitlines() if ln.startswith("| ") and "pps" not in ln]
    assert [r.split("|")[1].strip() + "/" + r.split("|")[2].strip() for r in rows] == [
        f"{s}/{op}" for s in ("64", "576", "1400", "imix") for op in ("decrypt", "encrypt")]
    assert res.stdout.count("target ") == 4
