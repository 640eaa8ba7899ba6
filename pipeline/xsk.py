"""Python side of the AF_XDP worker (native/xsk.h, built as pipeline._xsk).

:class:`XskWorker` creates the sockets and the UMEM, puts the RX sockets into the steering
program's XSKMAP and runs the C loop on a thread of its own: the loop is one cffi call, which
releases the GIL and returns only when :meth:`XskWorker.stop` sets the stop flag (seen within
``poll_ms``). ``close()`` stops, joins and frees the sockets and the UMEM; it is idempotent and
also runs from ``__del__`` and from :func:`stop_on_sigterm`.

The ESP work is done by an :class:`pipeline.esp.EspWorker` (a slot of an ``EspContext``): the C
loop calls the ESP module's batch functions through pointers, so the two extensions stay
separate (and ``make sanitize`` can swap the ESP module).
"""
from __future__ import annotations

import array
import contextlib
import fcntl
import ipaddress
import logging
import os
import signal
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Any, Self

from pipeline import esp as _esp
from pipeline._xsk import ffi, lib

log = logging.getLogger(__name__)

__all__ = ["MODE_AUTO", "MODE_COPY", "MODE_ZEROCOPY", "NattTable", "XskError", "XskStats",
           "XskWorker", "stop_on_sigterm"]

MODE_AUTO, MODE_COPY, MODE_ZEROCOPY = "auto", "copy", "zerocopy"
_MODES = {MODE_AUTO: lib.XT_XSK_MODE_AUTO, MODE_COPY: lib.XT_XSK_MODE_COPY,
          MODE_ZEROCOPY: lib.XT_XSK_MODE_ZEROCOPY}


MAX_RX_QUEUES = 16      # bpf/esp_steer.h XT_ESP_MAX_QUEUES: sockets per device
_SIOCETHTOOL = 0x8946
_ETHTOOL_GCHANNELS = 0x3C


def rx_queues(ifname: str) -> tuple[int, ...]:
    """Every RX queue in use on a device gets an AF_XDP socket (steered packets arriving on a
    queue without one are dropped as esp_no_worker). The count is the driver's channel count
    (`ethtool -l`: rx + combined), which is the kernel's real_num_rx_queues that AF_XDP bind
    checks; a driver without channel support has one queue."""
    chan = array.array("I", [_ETHTOOL_GCHANNELS] + [0] * 8)
    addr, _ = chan.buffer_info()
    ifreq = struct.pack("16sP", ifname.encode()[:15], addr) + bytes(16)
    n = 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            fcntl.ioctl(s.fileno(), _SIOCETHTOOL, ifreq)
            # struct ethtool_channels: cmd, max_rx, max_tx, max_other, max_combined,
            # rx_count, tx_count, other_count, combined_count
            n = max(1, chan[5] + chan[8])
        except OSError:
            pass
    if n > MAX_RX_QUEUES:
        log.warning("%s has %d RX queues; AF_XDP sockets on the first %d only (reduce them "
                    "with `ethtool -L %s combined %d`)", ifname, n, MAX_RX_QUEUES, ifname,
                    MAX_RX_QUEUES)
    return tuple(range(min(n, MAX_RX_QUEUES)))


class XskError(OSError):
    """Creating or running the AF_XDP worker failed; the message names the device and the cause."""


def _mac(value: str, what: str) -> bytes:
    try:
        raw = bytes.fromhex(value.replace(":", ""))
    except ValueError:
        raw = b""
    if len(raw) != 6:
        raise XskError(f"{what} must be a MAC address like 02:00:00:00:00:01, got {value!r}")
    return raw


def _ifname(name: str, what: str) -> bytes:
    raw = name.encode()
    if not 0 < len(raw) < lib.XT_XSK_IFNAMSIZ:
        raise XskError(f"{what} must be an interface name of 1..15 bytes, got {name!r}")
    return raw


@dataclass(frozen=True)
class XskStats:
    rx_packets: int
    rx_bytes: int
    tx_packets: int
    tx_bytes: int
    tx_completed: int
    decrypt_ok: int
    encrypt_ok: int
    decrypt_drops: dict[str, int]   # by ESP verdict name, non-zero only
    encrypt_drops: dict[str, int]
    bad_meta: int
    runt: int
    tx_ring_full: int
    fill_short: int
    tx_kicks: int
    rx_wakeups: int
    natt_updates: int
    natt_rewrites: int
    frames_free: int
    frames_total: int
    k_rx_dropped: int
    k_rx_invalid: int
    k_rx_ring_full: int
    k_fill_empty: int
    k_tx_invalid: int
    tx_budget: int
    zerocopy: bool
    running: bool
    tx_direct: int          # frames sent straight out of an egress device
    tx_slow: int            # frames sent through the internal veth (the kernel FIB routes them)
    nh_lookups: int         # next-hop cache misses asked of the kernel FIB
    nh_lookup_errors: int
    nh_lookup_ns: int       # time the worker spent in them
    nh_no_route: int        # lookups without a usable answer (no neighbour yet, unreachable...)
    nh_deferred: int        # misses over the per-batch lookup budget
    nh_flushes: int
    slow_ttl: int           # transit frames with TTL / hop limit <= 1: the kernel answers ICMP
    slow_mtu: int           # frames over the egress MTU: the kernel fragments or answers ICMP
    direct_ports: int


def _verdicts(arr: Any) -> dict[str, int]:
    return {name: int(arr[i]) for i, name in enumerate(_esp.VERDICTS) if name != "ok" and arr[i]}


class NattTable:
    """NAT-T peers (address and port ESP-in-UDP was last authenticated from, per tunnel), shared
    by the workers of one edge: the worker that decrypts a tunnel's traffic need not be the one
    that encrypts for it."""

    def __init__(self) -> None:
        self.ptr = ffi.new(f"uint64_t[{lib.XT_XSK_NATT_TUNNELS}]")


class XskWorker:
    """One AF_XDP worker: RX on ``rx`` (list of (ifname, queue)), TX on ``tx_ifname``.

    ``tx_src_mac``/``tx_dst_mac`` form the Ethernet header of everything the worker sends
    (``tx_ifname``'s own MAC and its veth peer's). ``esp_worker`` must stay open while this
    worker exists. ``tx_queue``: the queue of ``tx_ifname`` to transmit on (one per worker);
    ``natt_table``: a :class:`NattTable` shared with the other workers. ``tx_budget``: frames the
    kernel sends per sendto() in copy mode (Linux >= 6.17; 0 keeps the kernel's 32, which
    measured as fast as 256 here: bench/RESULTS.md). ``direct``: egress devices as (ifname,
    queue) the worker transmits on itself when the kernel FIB routes a frame there (the queue is
    that of a TX-only socket; a device this worker receives on transmits on its RX socket);
    ``nh_prog_fd`` is the next-hop lookup program and ``nh_ifindex`` the device the lookups run
    as (the router end of the internal veth); see native/xsk.h. ``bench_no_crypto``
    (benchmarks only) forwards every frame unchanged: the
    ceiling of the AF_XDP path itself.
    """

    def __init__(self, esp_worker: _esp.EspWorker, rx: list[tuple[str, int]], tx_ifname: str,
                 tx_src_mac: str, tx_dst_mac: str, *, mode: str = MODE_AUTO,
                 ring_size: int = 2048, frame_size: int = 2048, batch: int = 64,
                 poll_ms: int = 50, bench_no_crypto: bool = False, tx_queue: int = 0,
                 natt_table: NattTable | None = None, tx_budget: int = 0,
                 direct: list[tuple[str, int]] | None = None, nh_prog_fd: int = -1,
                 nh_ifindex: int = 0, nh_ttl_ms: int = 0) -> None:
        direct = list(direct or [])
        if len(direct) > lib.XT_XSK_MAX_DIRECT:
            raise XskError(f"at most {lib.XT_XSK_MAX_DIRECT} direct egress devices, "
                           f"got {len(direct)}")
        if direct and (nh_prog_fd < 0 or nh_ifindex <= 0):
            raise XskError("direct egress devices need the next-hop lookup program and device")
        if not 1 <= len(rx) <= lib.XT_XSK_MAX_RX:
            raise XskError(f"need 1..{lib.XT_XSK_MAX_RX} RX (device, queue) pairs, got {len(rx)}")
        if mode not in _MODES:
            raise XskError(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
        if not 1 <= batch <= lib.XT_XSK_MAX_BATCH:
            raise XskError(f"batch must be 1..{lib.XT_XSK_MAX_BATCH}, got {batch}")
        if ring_size < 64 or ring_size & (ring_size - 1):
            raise XskError(f"ring_size must be a power of two >= 64, got {ring_size}")
        if frame_size not in (2048, 4096):
            raise XskError(f"frame_size must be 2048 or 4096, got {frame_size}")
        self._esp_worker = esp_worker
        cfg = ffi.new("struct xt_xsk_config *")
        for i, (name, queue) in enumerate(rx):
            raw = _ifname(name, "RX device")
            ffi.memmove(cfg.rx_ifname[i], raw, len(raw))
            cfg.rx_queue[i] = queue
        cfg.n_rx = len(rx)
        raw = _ifname(tx_ifname, "TX device")
        ffi.memmove(cfg.tx_ifname, raw, len(raw))
        ffi.memmove(cfg.tx_src_mac, _mac(tx_src_mac, "tx_src_mac"), 6)
        ffi.memmove(cfg.tx_dst_mac, _mac(tx_dst_mac, "tx_dst_mac"), 6)
        cfg.ring_size, cfg.frame_size, cfg.batch = ring_size, frame_size, batch
        cfg.mode = _MODES[mode]
        cfg.poll_ms = poll_ms
        cfg.flags = lib.XT_XSK_F_NO_CRYPTO if bench_no_crypto else 0
        cfg.tx_queue = tx_queue
        cfg.tx_budget = tx_budget
        for i, (name, queue) in enumerate(direct):
            raw = _ifname(name, "direct egress device")
            ffi.memmove(cfg.direct_ifname[i], raw, len(raw))
            cfg.direct_queue[i] = queue
        cfg.n_direct = len(direct)
        cfg.nh_prog_fd = nh_prog_fd
        cfg.nh_ifindex = nh_ifindex
        cfg.nh_ttl_ms = nh_ttl_ms
        self._natt_table = natt_table   # kept alive as long as this worker
        if natt_table is not None:
            cfg.natt_table = int(ffi.cast("uintptr_t", natt_table.ptr))
        ef, el = _esp.ffi, _esp.lib
        cfg.esp_worker = int(ef.cast("uintptr_t", esp_worker._handle()))
        cfg.esp_decrypt = int(ef.cast("uintptr_t", ef.addressof(el, "xt_esp_decrypt_batch")))
        cfg.esp_encrypt = int(ef.cast("uintptr_t", ef.addressof(el, "xt_esp_encrypt_batch")))
        err = ffi.new("char[256]")
        self._x = lib.xt_xsk_new(cfg, err, 256)
        if self._x == ffi.NULL:
            self._x = None
            raise XskError(ffi.string(err).decode(errors="replace"))
        self.rx = list(rx)
        self.direct = direct
        self._thread: threading.Thread | None = None
        self._rc: int | None = None
        self._lock = threading.Lock()

    # --- maps -----------------------------------------------------------------------------
    def insert_into(self, xskmap_fd: int, i: int, key: int) -> None:
        """Place RX socket ``i`` into the XSKMAP ``xskmap_fd`` at ``key``."""
        rc = lib.xt_xsk_map_insert(self._ptr(), i, xskmap_fd, key)
        if rc < 0:
            raise XskError(-rc, f"XSKMAP update for {self.rx[i][0]} queue {self.rx[i][1]} "
                                f"(key {key})")

    # --- the loop -------------------------------------------------------------------------
    def start(self, cpu: int | None = None) -> None:
        """Run the loop on a thread of its own (pinned to ``cpu`` when given)."""
        with self._lock:
            if self._thread is not None:
                raise XskError("worker already started")
            self._thread = threading.Thread(target=self._run, args=(cpu,), name="xsk-worker",
                                            daemon=True)
            self._thread.start()

    def _run(self, cpu: int | None) -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})  # 0: this thread only
        self._rc = int(lib.xt_xsk_run(self._x))  # blocks with the GIL released

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the loop to return and wait for it (idempotent)."""
        if self._x is None:
            return
        lib.xt_xsk_stop(self._x)
        t = self._thread
        if t is not None:
            t.join(timeout)
            if t.is_alive():
                raise XskError(f"AF_XDP worker did not stop within {timeout} s")

    @property
    def exit_code(self) -> int | None:
        """0 after a requested stop, -errno after a fatal error, None while running."""
        return self._rc

    def close(self) -> None:
        """Stop the loop, close the sockets, free the UMEM (idempotent)."""
        with self._lock:
            if self._x is None:
                return
            self.stop()
            lib.xt_xsk_free(self._x)
            self._x = None

    # --- observation ----------------------------------------------------------------------
    def stats(self) -> XskStats:
        s = ffi.new("struct xt_xsk_stats *")
        lib.xt_xsk_stats(self._ptr(), s)
        return XskStats(
            rx_packets=s.rx_packets, rx_bytes=s.rx_bytes, tx_packets=s.tx_packets,
            tx_bytes=s.tx_bytes, tx_completed=s.tx_completed, decrypt_ok=s.decrypt_ok,
            encrypt_ok=s.encrypt_ok, decrypt_drops=_verdicts(s.decrypt_drops),
            encrypt_drops=_verdicts(s.encrypt_drops), bad_meta=s.bad_meta, runt=s.runt,
            tx_ring_full=s.tx_ring_full, fill_short=s.fill_short, tx_kicks=s.tx_kicks,
            rx_wakeups=s.rx_wakeups, natt_updates=s.natt_updates,
            natt_rewrites=s.natt_rewrites, frames_free=s.frames_free,
            frames_total=s.frames_total, k_rx_dropped=s.k_rx_dropped,
            k_rx_invalid=s.k_rx_invalid, k_rx_ring_full=s.k_rx_ring_full,
            k_fill_empty=s.k_fill_empty, k_tx_invalid=s.k_tx_invalid, tx_budget=s.tx_budget,
            zerocopy=bool(s.zerocopy), running=bool(s.running), tx_direct=s.tx_direct,
            tx_slow=s.tx_slow, nh_lookups=s.nh_lookups, nh_lookup_errors=s.nh_lookup_errors,
            nh_lookup_ns=s.nh_lookup_ns,
            nh_no_route=s.nh_no_route, nh_deferred=s.nh_deferred, nh_flushes=s.nh_flushes,
            slow_ttl=s.slow_ttl, slow_mtu=s.slow_mtu, direct_ports=s.direct_ports)

    def direct_status(self) -> dict[str, int]:
        """Per direct egress device: its ifindex when the worker transmits there, else the
        -errno of the socket that could not be made (its frames take the internal veth)."""
        return {name: int(lib.xt_xsk_direct_status(self._ptr(), i))
                for i, (name, _) in enumerate(self.direct)}

    def nh_flush(self) -> None:
        """Empty the next-hop cache (a route, neighbour, address or link changed)."""
        lib.xt_xsk_nh_flush(self._ptr())

    def nh_set_l4(self, on: bool) -> None:
        """Next-hop lookups with the TCP/UDP ports (the kernel's routing looks at them) or
        without; empties the cache."""
        lib.xt_xsk_nh_set_l4(self._ptr(), 1 if on else 0)

    def natt_peer(self, tunnel: int) -> tuple[str, int] | None:
        """(address, port) ESP-in-UDP for ``tunnel`` was last authenticated from, or None."""
        addr = ffi.new("uint8_t[4]")
        port = ffi.new("uint16_t *")
        if not lib.xt_xsk_natt_peer(self._ptr(), tunnel, addr, port):
            return None
        return str(ipaddress.IPv4Address(bytes(ffi.buffer(addr, 4)))), int(port[0])

    def natt_forget(self, tunnel: int) -> None:
        lib.xt_xsk_natt_forget(self._ptr(), tunnel)

    def _ptr(self) -> Any:
        if self._x is None:
            raise XskError("AF_XDP worker is closed")
        return self._x

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def stop_on_sigterm(*closers: Any) -> Any:
    """Install a SIGTERM handler (main thread only) that closes ``closers`` in order and then
    raises SystemExit(143), so ``finally`` blocks and context managers still run. Returns the
    previous handler."""
    def _handler(signum: int, frame: Any) -> None:
        for c in closers:
            with contextlib.suppress(Exception):
                c.close()
        raise SystemExit(128 + signum)
    return signal.signal(signal.SIGTERM, _handler)
