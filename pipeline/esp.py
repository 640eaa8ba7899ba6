"""Thin, argument-checking wrapper over the native ESP module (native/esp.h, built as pipeline._esp).

Per-packet work never happens here: Python describes SAs (:class:`EspSaParams`), owns or borrows a
buffer of frames (:class:`PacketBatch`) and hands whole batches to C (:class:`EspWorker`). Sizes,
verdict names and error texts come from C, so they are typed once, in native/esp.h.

Keys travel as ``bytes`` (or any object with ``reveal()``, like ``pipeline.secret.Secret``), are
never part of a ``repr()`` and are wiped from the C parameter struct after each call.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import ipaddress
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Self

__all__ = [
    "ENCR_AES_CBC", "ENCR_AES_GCM_16", "ENCR_NULL", "INTEG_HMAC_SHA1_96", "INTEG_HMAC_SHA2_256_128",
    "INTEG_NONE", "VERDICTS", "EspContext", "EspError", "EspSaParams", "EspWorker", "PacketBatch",
    "SaStats",
]


def _load_native() -> Any:
    """pipeline._esp, or (make sanitize only) the sanitizer build named by XTRANSIT_ESP_MODULE."""
    path = os.environ.get("XTRANSIT_ESP_MODULE")
    if not path:
        from pipeline import _esp

        return _esp
    loader = importlib.machinery.ExtensionFileLoader("pipeline._esp", path)
    spec = importlib.util.spec_from_file_location("pipeline._esp", path, loader=loader)
    if spec is None:
        raise ImportError(f"cannot load native ESP module from {path}")
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


_native = _load_native()
ffi = _native.ffi
lib = _native.lib

#: Verdict (drop reason) names indexed by number, read from the one list in native/esp.h.
VERDICTS: tuple[str, ...] = tuple(
    ffi.string(lib.xt_esp_verdict_name(i)).decode() for i in range(lib.xt_esp_verdict_count())
)
_VERDICT_NUM = {name: i for i, name in enumerate(VERDICTS)}

# Algorithm names, the same strings as pipeline.sa uses on the SA installation interface.
ENCR_AES_GCM_16 = "aes-gcm-16"
ENCR_AES_CBC = "aes-cbc"
ENCR_NULL = "null"
INTEG_NONE = "none"
INTEG_HMAC_SHA2_256_128 = "hmac-sha2-256-128"
INTEG_HMAC_SHA1_96 = "hmac-sha1-96"

_ENC = {ENCR_NULL: lib.XT_ESP_ENC_NULL, ENCR_AES_GCM_16: lib.XT_ESP_ENC_AES_GCM_16,
        ENCR_AES_CBC: lib.XT_ESP_ENC_AES_CBC}
_AUTH = {INTEG_NONE: lib.XT_ESP_AUTH_NONE, INTEG_HMAC_SHA1_96: lib.XT_ESP_AUTH_HMAC_SHA1_96,
         INTEG_HMAC_SHA2_256_128: lib.XT_ESP_AUTH_HMAC_SHA256_128}
_DIR = {"in": lib.XT_ESP_DIR_IN, "out": lib.XT_ESP_DIR_OUT}
_MODE = {"tunnel": lib.XT_ESP_MODE_TUNNEL, "transport": lib.XT_ESP_MODE_TRANSPORT}
_LT_FLAGS = {
    "soft_packets": lib.XT_ESP_LT_SOFT_PACKETS, "soft_bytes": lib.XT_ESP_LT_SOFT_BYTES,
    "hard_packets": lib.XT_ESP_LT_HARD_PACKETS, "hard_bytes": lib.XT_ESP_LT_HARD_BYTES,
    "seq_exhausted": lib.XT_ESP_LT_SEQ_EXHAUSTED,
}


class EspError(ValueError):
    """An SA or batch request the native module refused; the message never holds key bytes."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise EspError(f"{what}: {ffi.string(lib.xt_esp_strerror(rc)).decode()}", rc)


def _raw(key: Any) -> bytes:
    if key is None:
        return b""
    if hasattr(key, "reveal"):
        key = key.reveal()
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise TypeError(f"key material must be bytes, not {type(key).__name__}")
    return bytes(key)


def _ipv4(addr: str | ipaddress.IPv4Address | None, what: str) -> bytes:
    if addr is None:
        return b"\0\0\0\0"
    try:
        return ipaddress.IPv4Address(addr).packed
    except ValueError:
        raise EspError(f"{what} must be an IPv4 address, got {addr!r}") from None


def _u(value: int, bits: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << bits):
        raise EspError(f"{what} must be an integer in 0..{(1 << bits) - 1}, got {value!r}")
    return value


@dataclass(frozen=True)
class EspSaParams:
    """One ESP SA (one direction). Keys and salt are excluded from repr().

    ``spi`` keys inbound SAs; ``tunnel_id`` keys outbound SAs (and is reported for inbound
    packets). ``local``/``remote`` are the outer IPv4 addresses (outbound: source/destination;
    inbound: ``local`` is checked against the destination when ``check_dst``). Setting
    ``encap_sport``/``encap_dport`` turns on UDP encapsulation (RFC 3948, usually 4500/4500).
    ``node_id`` is the 16 high bits of every IV this node sends under the SA: give each edge node
    sharing the SA its own. ``allow_null`` is the opt-in for NULL encryption or no integrity.
    """

    spi: int
    direction: str
    encryption: str
    enc_key: Any = field(default=b"", repr=False)
    salt: Any = field(default=b"", repr=False)
    integrity: str = INTEG_NONE
    auth_key: Any = field(default=b"", repr=False)
    tunnel_id: int = 0
    mode: str = "tunnel"
    local: str | None = None
    remote: str | None = None
    encap_sport: int | None = None
    encap_dport: int | None = None
    replay_window: int = 1024
    soft_packets: int = 0
    hard_packets: int = 0
    soft_bytes: int = 0
    hard_bytes: int = 0
    node_id: int = 0
    ttl: int = 64
    allow_null: bool = False
    esn: bool = False
    check_dst: bool = False

    @property
    def key(self) -> int:
        """The lookup key of the SA in its table: SPI (inbound) or tunnel id (outbound)."""
        return self.spi if self.direction == "in" else self.tunnel_id

    def _fill(self, p: Any) -> None:
        if self.esn:
            raise EspError("extended sequence numbers (ESN) are not supported; "
                           "negotiate ESN=0", lib.XT_ESP_E_ESN)
        if self.direction not in _DIR:
            raise EspError(f"direction must be 'in' or 'out', got {self.direction!r}")
        if self.encryption not in _ENC:
            raise EspError(f"unsupported encryption {self.encryption!r}; one of {sorted(_ENC)}")
        if self.integrity not in _AUTH:
            raise EspError(f"unsupported integrity {self.integrity!r}; one of {sorted(_AUTH)}")
        if self.mode not in _MODE:
            raise EspError(f"mode must be 'tunnel' or 'transport', got {self.mode!r}")
        enc_key, salt, auth_key = _raw(self.enc_key), _raw(self.salt), _raw(self.auth_key)
        if self.encryption == ENCR_NULL and enc_key:
            raise EspError("NULL encryption takes no key")
        if self.encryption != ENCR_NULL and len(enc_key) not in (16, 32):
            raise EspError(f"{self.encryption} needs a 16- or 32-byte key, got {len(enc_key)} bytes")
        if self.encryption == ENCR_AES_GCM_16 and len(salt) != 4:
            raise EspError(f"aes-gcm-16 needs a 4-byte salt (RFC 4106 8.1), got {len(salt)} bytes")
        if self.encryption != ENCR_AES_GCM_16 and salt:
            raise EspError(f"{self.encryption} takes no salt")
        if self.integrity == INTEG_NONE and auth_key:
            raise EspError("integrity 'none' takes no key")
        if self.integrity != INTEG_NONE and not 1 <= len(auth_key) <= lib.XT_ESP_MAX_AUTH_KEY:
            raise EspError(f"{self.integrity} needs a 1..{lib.XT_ESP_MAX_AUTH_KEY}-byte key")
        if (self.encap_sport is None) != (self.encap_dport is None):
            raise EspError("UDP encapsulation needs both encap_sport and encap_dport")
        p.spi = _u(self.spi, 32, "spi")
        p.tunnel_id = _u(self.tunnel_id, 32, "tunnel_id")
        p.direction = _DIR[self.direction]
        p.mode = _MODE[self.mode]
        p.enc_alg = _ENC[self.encryption]
        p.auth_alg = _AUTH[self.integrity]
        p.enc_key_len = len(enc_key)
        p.auth_key_len = len(auth_key)
        p.ttl = _u(self.ttl, 8, "ttl")
        ffi.memmove(p.enc_key, enc_key, len(enc_key))
        ffi.memmove(p.salt, salt, len(salt))
        ffi.memmove(p.auth_key, auth_key, len(auth_key))
        flags = 0
        if self.allow_null:
            flags |= lib.XT_ESP_F_ALLOW_NULL
        if self.encap_sport is not None:
            flags |= lib.XT_ESP_F_UDP_ENCAP
            p.encap_sport = _u(self.encap_sport, 16, "encap_sport")
            p.encap_dport = _u(self.encap_dport, 16, "encap_dport")
        if self.check_dst:
            flags |= lib.XT_ESP_F_CHECK_DST
        p.flags = flags
        ffi.memmove(p.local_addr, _ipv4(self.local, "local"), 4)
        ffi.memmove(p.remote_addr, _ipv4(self.remote, "remote"), 4)
        if self.direction == "out" and (self.local is None or self.remote is None):
            raise EspError("an outbound SA needs local and remote outer addresses")
        p.node_id = _u(self.node_id, 16, "node_id")
        p.replay_window = _u(self.replay_window, 32, "replay_window")
        p.soft_packets = _u(self.soft_packets, 64, "soft_packets")
        p.hard_packets = _u(self.hard_packets, 64, "hard_packets")
        p.soft_bytes = _u(self.soft_bytes, 64, "soft_bytes")
        p.hard_bytes = _u(self.hard_bytes, 64, "hard_bytes")

    def headroom_needed(self) -> int:
        """Bytes an outbound frame needs before the inner packet (outer IPv4, UDP, ESP, IV)."""
        return self._size(lib.xt_esp_headroom_needed)

    def tailroom_needed(self) -> int:
        """Bytes an outbound frame needs after the inner packet (worst-case padding, trailer, ICV)."""
        return self._size(lib.xt_esp_tailroom_needed)

    def _size(self, fn: Any) -> int:
        p = ffi.new("struct xt_esp_sa_params *")
        try:
            self._fill(p)
            return int(fn(p))
        finally:
            ffi.memmove(p, bytes(ffi.sizeof(p[0])), ffi.sizeof(p[0]))


@dataclass(frozen=True)
class SaStats:
    """Counters of one SA, summed over workers."""

    packets: int
    bytes: int
    drops: dict[str, int]          # every verdict name except "ok", zero included
    lifetime_packets: int
    lifetime_bytes: int
    lifetime: frozenset[str]       # reached limits: soft_packets, hard_bytes, seq_exhausted, ...
    seq: int                       # outbound: last sequence number sent; inbound: highest accepted
    iv_counter: int                # outbound: next IV counter value

    @property
    def needs_rekey(self) -> bool:
        return bool(self.lifetime & {"soft_packets", "soft_bytes", "hard_packets", "hard_bytes",
                                     "seq_exhausted"})

    @property
    def expired(self) -> bool:
        return bool(self.lifetime & {"hard_packets", "hard_bytes"})


def _drops(arr: Any) -> dict[str, int]:
    return {name: int(arr[i]) for i, name in enumerate(VERDICTS) if name != "ok"}


class EspContext:
    """One SA database. Control calls are safe from any thread while workers process batches."""

    def __init__(self, max_workers: int = 1, buckets_log2: int = 0) -> None:
        _u(max_workers, 7, "max_workers")
        self._ctx = lib.xt_esp_ctx_new(max_workers, buckets_log2)
        if self._ctx == ffi.NULL:
            raise EspError(f"cannot create an ESP context (max_workers {max_workers} must be "
                           f"1..64, buckets_log2 {buckets_log2} 0 or 4..24)")
        self._workers: set[EspWorker] = set()
        self._lock = threading.Lock()

    def add_sa(self, sa: EspSaParams) -> None:
        """Add an SA, or replace (rekey) the one with the same SPI / tunnel id."""
        p = ffi.new("struct xt_esp_sa_params *")
        try:
            sa._fill(p)
            rc = lib.xt_esp_sa_add(self._ptr(), p)
        finally:
            ffi.memmove(p, bytes(ffi.sizeof(p[0])), ffi.sizeof(p[0]))
        _check(rc, f"SA {sa.direction} spi 0x{sa.spi:08x} tunnel {sa.tunnel_id}")

    def del_sa(self, direction: str, key: int) -> None:
        if direction not in _DIR:
            raise EspError(f"direction must be 'in' or 'out', got {direction!r}")
        _check(lib.xt_esp_sa_del(self._ptr(), _DIR[direction], _u(key, 32, "key")),
               f"delete SA {direction} {key:#x}")

    def sa_stats(self, direction: str, key: int) -> SaStats:
        if direction not in _DIR:
            raise EspError(f"direction must be 'in' or 'out', got {direction!r}")
        s = ffi.new("struct xt_esp_sa_stats *")
        _check(lib.xt_esp_sa_stats(self._ptr(), _DIR[direction], _u(key, 32, "key"), s),
               f"stats of SA {direction} {key:#x}")
        return SaStats(
            packets=s.packets, bytes=s.bytes, drops=_drops(s.drops),
            lifetime_packets=s.lifetime_packets, lifetime_bytes=s.lifetime_bytes,
            lifetime=frozenset(n for n, f in _LT_FLAGS.items() if s.lifetime_flags & f),
            seq=s.seq, iv_counter=s.iv_counter,
        )

    def sa_slots(self, direction: str, key: int) -> int:
        """How many workers have set up their slot of the SA (counters and cipher context, made
        lazily on each worker's first packet for it): 0 until a worker processes a packet."""
        if direction not in _DIR:
            raise EspError(f"direction must be 'in' or 'out', got {direction!r}")
        rc = int(lib.xt_esp_sa_slots(self._ptr(), _DIR[direction], _u(key, 32, "key")))
        _check(rc, f"slots of SA {direction} {key:#x}")
        return rc

    def stats(self) -> dict[str, Any]:
        """Drops before an SA was found (by reason), SA counts, retired SAs, longest hash chain."""
        s = ffi.new("struct xt_esp_ctx_stats *")
        lib.xt_esp_ctx_stats(self._ptr(), s)
        return {"drops": _drops(s.drops), "sa_in": s.sa_in, "sa_out": s.sa_out,
                "retired": s.retired, "max_chain": s.max_chain}

    def reclaim(self) -> int:
        return int(lib.xt_esp_reclaim(self._ptr()))

    def worker(self) -> EspWorker:
        w = lib.xt_esp_worker_new(self._ptr())
        if w == ffi.NULL:
            raise EspError("no free worker slot (raise max_workers)")
        worker = EspWorker(self, w)
        with self._lock:
            self._workers.add(worker)
        return worker

    def test_set_next(self, tunnel_id: int, next_seq: int, next_iv_counter: int) -> None:
        """TEST HOOK: next outbound sequence number and IV counter, to reproduce recorded packets."""
        _check(lib.xt_esp_test_set_next(self._ptr(), tunnel_id, next_seq, next_iv_counter),
               "test_set_next")

    def test_fail_slot_setup(self, n: int) -> None:
        """TEST HOOK: the next ``n`` lazy slot set-ups fail (those packets drop as crypto_error)."""
        _check(lib.xt_esp_test_fail_slot_setup(self._ptr(), _u(n, 32, "n")), "test_fail_slot_setup")

    def close(self) -> None:
        with self._lock:
            for w in list(self._workers):
                w._release()
            self._workers.clear()
        if self._ctx is not None:
            lib.xt_esp_ctx_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_ctx", None) is not None:
            self.close()

    def _ptr(self) -> Any:
        if self._ctx is None:
            raise EspError("ESP context is closed")
        return self._ctx

    def _forget(self, worker: EspWorker) -> None:
        with self._lock:
            self._workers.discard(worker)


class EspWorker:
    """A packet-processing slot: use each worker from one thread at a time."""

    def __init__(self, ctx: EspContext, handle: Any) -> None:
        self._ctx = ctx
        self._w = handle

    def decrypt(self, batch: PacketBatch) -> int:
        """Decrypt batch.count frames in place; returns how many passed (verdict "ok")."""
        return int(lib.xt_esp_decrypt_batch(self._handle(), batch._checked(), batch.count))

    def encrypt(self, batch: PacketBatch) -> int:
        """Encrypt batch.count frames in place (tunnel ids select the SAs)."""
        return int(lib.xt_esp_encrypt_batch(self._handle(), batch._checked(), batch.count))

    @property
    def handle(self) -> Any:
        """The ``struct xt_esp_worker *`` for C callers (the AF_XDP loop calls the batch
        functions with it directly); valid until close()."""
        return self._handle()

    def close(self) -> None:
        self._release()
        self._ctx._forget(self)

    def _release(self) -> None:
        if self._w is not None:
            lib.xt_esp_worker_free(self._w)
            self._w = None

    def _handle(self) -> Any:
        if self._w is None:
            raise EspError("worker is closed")
        return self._w

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PacketBatch:
    """Frames in one contiguous buffer: frame i spans [i*frame_size, (i+1)*frame_size).

    The buffer is the caller's (any writable buffer: bytearray, mmap, numpy array, later the AF_XDP
    UMEM) or a new bytearray. ``set(i, pkt)`` places a packet at ``headroom`` in frame i; after a
    batch call ``get(i)``/``verdict(i)`` read the result wherever C moved it within the frame.
    """

    def __init__(self, capacity: int, frame_size: int = 2048, headroom: int = 128,
                 buffer: Any = None) -> None:
        if capacity < 1 or frame_size < 64 or not 0 <= headroom < frame_size:
            raise EspError("need capacity >= 1, frame_size >= 64, 0 <= headroom < frame_size")
        self.capacity, self.frame_size, self.headroom = capacity, frame_size, headroom
        self.buffer = bytearray(capacity * frame_size) if buffer is None else buffer
        self._mv = memoryview(self.buffer).cast("B")
        if self._mv.readonly or len(self._mv) < capacity * frame_size:
            raise EspError(f"buffer must be writable and hold {capacity} x {frame_size} bytes")
        self._base = ffi.from_buffer(self.buffer, require_writable=True)
        self.pkts = ffi.new("struct xt_pkt[]", capacity)
        self.count = 0

    def set(self, i: int, packet: bytes, tunnel: int = 0) -> None:
        """Place `packet` in frame i at the batch headroom; count grows to cover frame i."""
        self.place(i, self.headroom, len(packet), tunnel)
        off = i * self.frame_size + self.headroom
        self._mv[off:off + len(packet)] = packet

    def place(self, i: int, offset: int, length: int, tunnel: int = 0) -> None:
        """Describe a packet already in frame i at `offset` (for buffers filled elsewhere)."""
        if not 0 <= i < self.capacity:
            raise IndexError(f"frame {i} out of 0..{self.capacity - 1}")
        if offset < 0 or length < 0 or offset + length > self.frame_size:
            raise EspError(f"packet of {length} bytes at {offset} does not fit a "
                           f"{self.frame_size}-byte frame")
        pk = self.pkts[i]
        pk.data = self._base + i * self.frame_size + offset
        pk.len = length
        pk.headroom = offset
        pk.tailroom = self.frame_size - offset - length
        pk.tunnel = _u(tunnel, 32, "tunnel")
        pk.verdict = 0
        self.count = max(self.count, i + 1)

    def fill(self, packets: list[bytes], tunnel: int = 0) -> None:
        if len(packets) > self.capacity:
            raise EspError(f"{len(packets)} packets for a batch of {self.capacity}")
        self.count = 0
        for i, pkt in enumerate(packets):
            self.set(i, pkt, tunnel)

    def offset(self, i: int) -> int:
        return int(ffi.cast("uint8_t *", self.pkts[i].data) - ffi.cast("uint8_t *", self._base))

    def get(self, i: int) -> bytes:
        off = self.offset(i)
        return bytes(self._mv[off:off + self.pkts[i].len])

    def verdict(self, i: int) -> str:
        return VERDICTS[self.pkts[i].verdict]

    def verdicts(self) -> list[str]:
        return [VERDICTS[self.pkts[i].verdict] for i in range(self.count)]

    def spi(self, i: int) -> int:
        return int(self.pkts[i].spi)

    def tunnel(self, i: int) -> int:
        return int(self.pkts[i].tunnel)

    def _checked(self) -> Any:
        if self._base is None:
            raise EspError("batch buffer was released")
        return self.pkts

    def release(self) -> None:
        """Drop this batch's hold on the buffer (needed before closing an mmap given to it)."""
        self._mv.release()
        esp_buf, self._base = self._base, None
        if hasattr(ffi, "release"):
            ffi.release(esp_buf)
        self.count = 0

    def results(self) -> list[tuple[str, bytes | None]]:
        """(verdict, packet or None) for every frame of the batch."""
        return [(self.verdict(i), self.get(i) if self.pkts[i].verdict == 0 else None)
                for i in range(self.count)]


def verdict_number(name: str) -> int:
    return _VERDICT_NUM[name]
