"""Smoke run of bench/bench_gre_cost.py (the full run is `make bench`): it must run and its own
checks (decap and encap really forwarded under the benchmark) must hold. No timing asserts."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns
REPO = Path(__file__).resolve().parents[1]


def test_bench_gre_cost_smoke():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_gre_cost.py"), "--smoke"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [ln.split()[0] for ln in proc.stdout.splitlines() if ln.strip()[:1].isdigit()]
    assert rows == ["10", "1000"]
    assert "decap flatness" in proc.stdout and "encap flatness" in proc.stdout
