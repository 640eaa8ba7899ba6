"""No allocation on the per-packet path: native/esp_alloc_check.c interposes malloc/calloc/realloc/
free (libcrypto's calls included) and counts them over 200 encrypt+decrypt batches of every
transform, after a warm-up round in which the worker set up its slot of each SA (the lazy cipher
context); it also checks that the hook does see the allocations of that set-up, in the first
batch of a new SA."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

NATIVE = Path(__file__).resolve().parents[1] / "native"
SOURCES = ["esp_alloc_check.c", "esp.c", "esp_data.c", "esp_replay.c", "esp_bench.c"]


def test_batches_allocate_nothing(tmp_path):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is needed (make setup installs it)")
    exe = tmp_path / "esp_alloc_check"
    # a plain build and run, also under `make sanitize` (its preloaded libasan owns malloc)
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    subprocess.run([gcc, "-O1", "-std=gnu11", f"-I{NATIVE}", *[str(NATIVE / s) for s in SOURCES],
                    "-lcrypto", "-lpthread", "-o", str(exe)], check=True, timeout=120, env=env)
    res = subprocess.run([str(exe)], check=False, capture_output=True, text=True, timeout=120,
                         env=env)
    lines = res.stdout.splitlines()
    assert lines[0] == "allocations during 200 batches of 64 packets: 0", res.stdout + res.stderr
    assert int(lines[1].rsplit(":", 1)[1]) >= 3
    assert res.returncode == 0
