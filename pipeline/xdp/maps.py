"""Pinned maps of a running data plane, through the bpf(2) syscall (no bcc needed).

The data plane (dataplane.py) pins its maps under ``/sys/fs/bpf/xtransit/<node name>/``;
``xtransit stats`` opens them here by path and reads the per-CPU counters. Layouts mirror
bpf/structs.h: ``struct xt_tunnel_stats`` (four u64), ``struct xt_counter`` (two u64),
``struct xt_drop_key`` (two u32) -> u64.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import reasons as _reasons

PIN_ROOT = Path("/sys/fs/bpf/xtransit")
BPF_FS_MAGIC = 0xCAFE4A11
_SYS_BPF = 321  # x86_64
_BPF_MAP_LOOKUP_ELEM, _BPF_MAP_GET_NEXT_KEY, _BPF_OBJ_PIN, _BPF_OBJ_GET = 1, 4, 6, 7
_OBJ_ATTR = struct.Struct("=QII")          # pathname, bpf_fd, file_flags
_ELEM_ATTR = struct.Struct("=I4xQQQ")      # map_fd, key, value / next_key, flags

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.restype = ctypes.c_long


class MapError(OSError):
    pass


def _bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, len(attr))
    rc = _libc.syscall(_SYS_BPF, cmd, buf, len(attr))
    if rc < 0:
        err = ctypes.get_errno()
        raise MapError(err, os.strerror(err))
    return rc


def possible_cpus(path: Path = Path("/sys/devices/system/cpu/possible")) -> int:
    """Per-CPU map values have one slot per possible CPU ("0-1", "0,2-3")."""
    n = 0
    for part in path.read_text().strip().split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def ensure_bpffs(root: Path = Path("/sys/fs/bpf")) -> None:
    """Mount the BPF filesystem at /sys/fs/bpf when it is not (Debian does not by default)."""
    class _Statfs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]
    st = _Statfs()
    if _libc.statfs(str(root).encode(), ctypes.byref(st)) == 0 and st.f_type == BPF_FS_MAGIC:
        return
    proc = subprocess.run(["mount", "-t", "bpf", "bpf", str(root)], capture_output=True, check=False,
                          text=True)
    if proc.returncode != 0:
        raise MapError(0, f"cannot mount the BPF filesystem at {root}: {proc.stderr.strip()}")


def pin(fd: int, path: Path) -> None:
    p = ctypes.create_string_buffer(str(path).encode())
    try:
        _bpf(_BPF_OBJ_PIN, _OBJ_ATTR.pack(ctypes.addressof(p), fd, 0))
    except MapError as e:
        raise MapError(e.errno, f"pinning at {path}: {e.strerror}") from None


def open_pinned(path: Path) -> int:
    p = ctypes.create_string_buffer(str(path).encode())
    try:
        return _bpf(_BPF_OBJ_GET, _OBJ_ATTR.pack(ctypes.addressof(p), 0, 0))
    except MapError as e:
        raise MapError(e.errno, f"opening pinned map {path}: {e.strerror}") from None


def lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        _bpf(_BPF_MAP_LOOKUP_ELEM, _ELEM_ATTR.pack(fd, ctypes.addressof(k), ctypes.addressof(v),
                                                   0))
    except MapError as e:
        if e.errno == 2:  # ENOENT
            return None
        raise
    return v.raw


def keys(fd: int, key_size: int) -> list[bytes]:
    out: list[bytes] = []
    cur = None
    nxt = ctypes.create_string_buffer(key_size)
    while True:
        k = ctypes.create_string_buffer(cur, key_size) if cur is not None else None
        try:
            _bpf(_BPF_MAP_GET_NEXT_KEY, _ELEM_ATTR.pack(
                fd, ctypes.addressof(k) if k is not None else 0, ctypes.addressof(nxt), 0))
        except MapError as e:
            if e.errno == 2:
                return out
            raise
        cur = nxt.raw
        out.append(cur)


@dataclass(frozen=True)
class TunnelCounters:
    decap_packets: int = 0
    decap_bytes: int = 0
    encap_packets: int = 0
    encap_bytes: int = 0


@dataclass
class Counters:
    """Sums over CPUs of everything the data plane counts."""
    tunnels: dict[int, TunnelCounters]
    tunnel_reasons: dict[int, dict[str, int]]      # tunnel index -> reason name -> packets
    reasons: dict[str, tuple[int, int]]            # reason name -> (packets, bytes)


def _sum_percpu(raw: bytes, fields: int, ncpu: int) -> list[int]:
    per = struct.unpack(f"={fields * ncpu}Q", raw)
    return [sum(per[c * fields + f] for c in range(ncpu)) for f in range(fields)]


def read_counters(fds: dict[str, int], indexes: list[int]) -> Counters:
    """Read the counters through open map fds (pinned or the loader's own)."""
    ncpu = possible_cpus()
    rs = _reasons.load()
    tunnels = {}
    for i in indexes:
        raw = lookup(fds["xt_tunnel_stats"], struct.pack("=I", i), 32 * ncpu)
        tunnels[i] = TunnelCounters(*_sum_percpu(raw, 4, ncpu)) if raw else TunnelCounters()
    reasons = {}
    for n in range(rs.max):
        raw = lookup(fds["xt_reason_stats"], struct.pack("=I", n), 16 * ncpu)
        if raw:
            p, b = _sum_percpu(raw, 2, ncpu)
            if p:
                reasons[rs.name(n)] = (p, b)
    per_tunnel: dict[int, dict[str, int]] = {}
    for k in keys(fds["xt_tunnel_drops"], 8):
        tunnel, reason = struct.unpack("=II", k)
        raw = lookup(fds["xt_tunnel_drops"], k, 8 * ncpu)
        if raw:
            n = _sum_percpu(raw, 1, ncpu)[0]
            if n:
                per_tunnel.setdefault(tunnel, {})[rs.name(reason)] = n
    return Counters(tunnels, per_tunnel, reasons)


COUNTER_MAPS = ("xt_tunnel_stats", "xt_reason_stats", "xt_tunnel_drops")


def pin_dir(node_name: str, root: Path = PIN_ROOT) -> Path:
    return root / node_name


def read_pinned(node_name: str, indexes: list[int], root: Path = PIN_ROOT) -> Counters:
    """The counters of the data plane running for ``node_name`` (MapError when none runs)."""
    d = pin_dir(node_name, root)
    fds = {}
    try:
        for name in COUNTER_MAPS:
            fds[name] = open_pinned(d / name)
        return read_counters(fds, indexes)
    finally:
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
