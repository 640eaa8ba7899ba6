"""The store benchmark runner in its smoke mode (no timing asserted: figures live in
bench/RESULTS.md). It starts its own 3-member etcd cluster and node processes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_store_quick_mode():
    res = subprocess.run([sys.executable, "-m", "bench.bench_store", "--quick"], cwd=REPO,
                         check=False, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [ln.split("|")[1:3] for ln in res.stdout.splitlines()
            if ln.startswith("| ") and not ln.startswith(("| store", "| into"))]
    assert [(name.strip(), n.strip()) for name, n in rows] == [
        ("etcd, 3 members, A->B,C", "20"), ("sqlite, one file, A->B,C", "20"),
        ("sqlite", "1,000"), ("etcd", "1,000"), ("sqlite", "1,000")]
    assert res.stdout.count("target ") == 4
