"""BPF_PROG_TEST_RUN wrapper on small bcc programs: verdict and exact bytes out."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.xdp import testrun
from pipeline.xdp.testrun import XdpAction

pytestmark = pytest.mark.netns  # loading BPF programs needs root

SRC = Path(__file__).parent / "bpf" / "testrun_probe.c"


@pytest.fixture(scope="module")
def bpf():
    from bcc import BPF
    b = BPF(src_file=str(SRC).encode())
    yield b
    b.cleanup()


def test_verdict_and_bytes(bpf):
    fn = bpf.load_func(b"swap_macs", bpf.XDP)
    frame = bytes(range(6)) + bytes(range(10, 16)) + b"\x08\x00" + b"x" * 50
    res = testrun.run(fn.fd, frame)
    assert res.action is XdpAction.TX
    assert res.packet == bytes(range(10, 16)) + bytes(range(6)) + frame[12:]


def test_frame_shorter_than_ethernet_header_rejected(bpf):
    fn = bpf.load_func(b"swap_macs", bpf.XDP)
    with pytest.raises(ValueError, match="14 bytes"):
        testrun.run(fn.fd, b"\x00" * 13)


def test_headroom_allows_push(bpf):
    fn = bpf.load_func(b"push4", bpf.XDP)
    res = testrun.run(fn.fd, b"\x01" * 60)
    assert res.action is XdpAction.PASS
    assert res.packet == b"\xde\xad\xbe\xef" + b"\x01" * 60


def test_repeat_reports_duration(bpf):
    fn = bpf.load_func(b"swap_macs", bpf.XDP)
    res = testrun.run(fn.fd, b"\x00" * 64, repeat=1000)
    assert res.action is XdpAction.TX
    assert res.duration_ns > 0
