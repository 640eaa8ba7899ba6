"""BPF_PROG_TEST_RUN for XDP programs loaded by bcc (bcc has no wrapper of its own).

``run(fd, packet)`` runs the program once on the bytes and returns the verdict and the packet as
the program left it; ``repeat`` runs it N times in the kernel and reports the mean duration per
run (for benchmarks only). ``live_frames`` runs it with BPF_F_TEST_XDP_LIVE_FRAMES, where
XDP_TX/XDP_REDIRECT really transmit: the load generator's technique (as xdp-trafficgen).

The attr layout is ``union bpf_attr``'s ``test`` member (include/uapi/linux/bpf.h):
prog_fd, retval, data_size_in, data_size_out, data_in, data_out, repeat, duration, ctx_size_in,
ctx_size_out, ctx_in, ctx_out, flags, cpu, batch_size.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import enum
import os
import struct
from dataclasses import dataclass

_SYS_BPF = 321  # x86_64
_BPF_PROG_TEST_RUN = 10
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
_ATTR = struct.Struct("=IIIIQQIIIIQQIII4x")  # 80 bytes
_XDP_MD = struct.Struct("=IIIIII")  # data, data_end, data_meta, ingress_ifindex, rx_queue, egress

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.restype = ctypes.c_long


class XdpAction(enum.IntEnum):
    ABORTED = 0
    DROP = 1
    PASS = 2
    TX = 3
    REDIRECT = 4


@dataclass(frozen=True)
class TestRunResult:
    action: XdpAction | int
    packet: bytes
    duration_ns: int  # mean per run, as the kernel reports it


class TestRunError(OSError):
    pass


def _xdp_ctx(data_len: int, ingress_ifindex: int, rx_queue: int) -> bytes:
    return _XDP_MD.pack(0, data_len, 0, ingress_ifindex, rx_queue, 0)


def _call(attr: bytearray) -> None:
    buf = (ctypes.c_char * len(attr)).from_buffer(attr)
    rc = _libc.syscall(_SYS_BPF, _BPF_PROG_TEST_RUN, buf, len(attr))
    if rc != 0:
        err = ctypes.get_errno()
        raise TestRunError(err, f"BPF_PROG_TEST_RUN: {os.strerror(err)}")


def run(prog_fd: int, packet: bytes, *, repeat: int = 1, ingress_ifindex: int = 0,
        rx_queue: int = 0, out_size: int = 16384) -> TestRunResult:
    """Run an XDP program on ``packet`` (an Ethernet frame). With ``ingress_ifindex`` set the
    program sees that device as ctx->ingress_ifindex (the device must exist in the caller's
    namespace), which FIB lookups and redirects need."""
    if len(packet) < 14:
        raise ValueError(f"an XDP test packet needs at least 14 bytes (Ethernet), got {len(packet)}")
    data_in = ctypes.create_string_buffer(bytes(packet), len(packet))
    data_out = ctypes.create_string_buffer(out_size)
    ctx = None
    ctx_len = 0
    if ingress_ifindex or rx_queue:
        ctx = ctypes.create_string_buffer(_xdp_ctx(len(packet), ingress_ifindex, rx_queue))
        ctx_len = _XDP_MD.size
    attr = bytearray(_ATTR.pack(
        prog_fd, 0, len(packet), out_size, ctypes.addressof(data_in), ctypes.addressof(data_out),
        repeat, 0, ctx_len, 0, ctypes.addressof(ctx) if ctx is not None else 0, 0, 0, 0, 0))
    _call(attr)
    (_, retval, _, size_out, _, _, _, duration, *_rest) = _ATTR.unpack(bytes(attr))
    try:
        action: XdpAction | int = XdpAction(retval)
    except ValueError:
        action = retval
    return TestRunResult(action, data_out.raw[:size_out], duration)


def live_frames(prog_fd: int, frame: bytes, *, repeat: int, ingress_ifindex: int,
                batch_size: int = 64, rx_queue: int = 0) -> int:
    """Run with BPF_F_TEST_XDP_LIVE_FRAMES: each run's XDP_TX/XDP_REDIRECT really sends the
    frame (from a page pool whose pages are reused without reset: the program must rewrite every
    header it depends on). Returns the mean nanoseconds per run as the kernel reports it."""
    data_in = ctypes.create_string_buffer(bytes(frame), len(frame))
    ctx = ctypes.create_string_buffer(_xdp_ctx(len(frame), ingress_ifindex, rx_queue))
    attr = bytearray(_ATTR.pack(
        prog_fd, 0, len(frame), 0, ctypes.addressof(data_in), 0, repeat, 0, _XDP_MD.size, 0,
        ctypes.addressof(ctx), 0, BPF_F_TEST_XDP_LIVE_FRAMES, 0, batch_size))
    _call(attr)
    return _ATTR.unpack(bytes(attr))[7]
