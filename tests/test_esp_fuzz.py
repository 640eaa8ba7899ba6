"""Fuzz smoke: the fuzz driver of `make fuzz` (native/esp_fuzz.c) built here without sanitizers and
run on a small number of inputs, and random frames through the Python-facing batch call."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from esp_support import SUITES, outer_ipv4, suite_sas
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import esp

NATIVE = Path(__file__).resolve().parents[1] / "native"
SOURCES = ["esp_fuzz.c", "esp.c", "esp_data.c", "esp_replay.c", "esp_bench.c"]


def test_fuzz_driver_smoke(tmp_path):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is needed (make setup installs it)")
    exe = tmp_path / "esp_fuzz"
    subprocess.run([gcc, "-O1", "-std=gnu11", f"-I{NATIVE}", *[str(NATIVE / s) for s in SOURCES],
                    "-lcrypto", "-lpthread", "-o", str(exe)], check=True, timeout=120)
    res = subprocess.run([str(exe), "30000", "3"], check=False, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("esp_fuzz: 30016 inputs, no crash (second worker: ")
    counts = dict(kv.split("=") for kv in res.stdout.split("verdicts:")[1].split())
    assert set(counts) <= set(esp.VERDICTS)
    # the corpus reaches deep: accepted packets, ICV failures and post-decrypt checks all occur
    assert {"ok", "icv_mismatch", "bad_padding", "truncated", "unknown_spi"} <= set(counts)


@pytest.fixture(scope="module")
def rx():
    ctx = esp.EspContext()
    for k, suite in enumerate(SUITES):
        ctx.add_sa(suite_sas(suite, spi=0x1000 + k)[1])
    w = ctx.worker()
    yield w
    w.close()
    ctx.close()


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(st.binary(max_size=300), min_size=1, max_size=16),
       spi=st.integers(0x1000, 0x1000 + len(SUITES) - 1), head=st.integers(0, 64))
def test_random_frames_get_a_named_verdict(rx, frames, spi, head):
    b = esp.PacketBatch(len(frames), frame_size=512, headroom=head)
    # half of them carry a known SPI after an IPv4/ESP header so the SA path is reached
    frames = [outer_ipv4(spi.to_bytes(4, "big") + f[:4].ljust(4, b"\1") + f) if i % 2 else f
              for i, f in enumerate(frames)]
    b.fill(frames)
    rx.decrypt(b)
    for i, v in enumerate(b.verdicts()):
        assert v in esp.VERDICTS and v != "ok"
        pk = b.pkts[i]
        assert pk.headroom == head and pk.len == len(frames[i])
