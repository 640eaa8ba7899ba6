"""The state store interface every edge node shares: one small key-value API with revisions.

The model is etcd v3's: every write gets the next store-wide *revision*; each key remembers the
revision that created it (``create_revision``), the one that last changed it (``mod_revision``)
and how many times it changed since it was created (``version``). Reads can be made at a past
revision, watches start at a revision, and compare-and-swap checks a key's ``mod_revision``.
History older than the *compaction* revision is gone: reading before it, or watching from before
it, raises :class:`CompactedError`, and a watch that falls behind a compaction delivers a
:class:`Resync` (the whole prefix at one revision) and then carries on with events.

Values are opaque bytes here; what they mean, and the encryption of key material, is
``pipeline.store.schema``'s business.
"""
from __future__ import annotations

import abc
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Self

PUT = "put"
DELETE = "delete"


class StoreError(Exception):
    """A store operation failed (after its retries); the message names the operation."""


class CompactedError(StoreError):
    """The revision asked for is older than the store's compaction revision."""

    def __init__(self, requested: int, compact_revision: int) -> None:
        super().__init__(f"revision {requested} is compacted (history kept from "
                         f"revision {compact_revision})")
        self.requested = requested
        self.compact_revision = compact_revision


class WatchClosed(StoreError):
    """The watch was closed (by its owner or because its store was closed)."""


@dataclass(frozen=True)
class Record:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int

    def __repr__(self) -> str:  # values may be ciphertext or config: show their size only
        return (f"Record({self.key!r}, {len(self.value)} bytes, create={self.create_revision}, "
                f"mod={self.mod_revision}, version={self.version})")


@dataclass(frozen=True)
class Listing:
    """Every key under a prefix as of ``revision`` (sorted by key)."""

    records: tuple[Record, ...]
    revision: int


@dataclass(frozen=True)
class Event:
    """One change. ``revision`` is the store revision of the change (the key's new
    ``mod_revision`` for a put); ``value`` is None for a delete."""

    kind: str
    key: str
    value: bytes | None
    revision: int
    create_revision: int = 0
    version: int = 0

    def __repr__(self) -> str:
        size = "-" if self.value is None else f"{len(self.value)} bytes"
        return f"Event({self.kind} {self.key!r} rev={self.revision} {size})"


@dataclass(frozen=True)
class Resync:
    """The watch lost history to a compaction: ``records`` is the whole prefix at ``revision``
    and replaces what the watcher knew; events after ``revision`` follow."""

    records: tuple[Record, ...]
    revision: int


@dataclass(frozen=True)
class CasResult:
    """Outcome of a compare-and-swap. ``revision`` is the new ``mod_revision`` when ``ok``;
    otherwise ``current`` is what the key holds now (None: absent)."""

    ok: bool
    revision: int
    current: Record | None = None


def prefix_end(prefix: str) -> bytes:
    """The smallest key greater than every key starting with ``prefix`` (etcd's range_end),
    as UTF-8 bytes: keys order bytewise in both backends."""
    b = bytearray(prefix.encode())
    while b:
        if b[-1] < 0xFF:
            b[-1] += 1
            return bytes(b)
        b.pop()
    return b"\0"  # empty prefix: every key (etcd's "all keys >= key" convention)


def check_key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError("a store key is a non-empty str")
    if "\0" in key:
        raise ValueError("a store key cannot contain NUL")
    return key


def check_value(value: bytes) -> bytes:
    if isinstance(value, (bytearray, memoryview)):
        value = bytes(value)
    if not isinstance(value, bytes):
        raise TypeError(f"a store value is bytes, not {type(value).__name__}")
    return value


class Watch(abc.ABC):
    """Changes under one prefix, in revision order, each exactly once.

    ``get(timeout)`` returns the next batch (a list of :class:`Event` and at most one leading
    :class:`Resync`), or an empty list when nothing arrived in time. ``revision`` is the last
    revision delivered. Iterating yields items until the watch is closed.
    """

    prefix: str

    @property
    @abc.abstractmethod
    def revision(self) -> int:
        """The last revision this watch delivered (its start revision - 1 before any)."""

    @abc.abstractmethod
    def get(self, timeout: float | None = None) -> list[Event | Resync]:
        """Next batch, [] on timeout; raises WatchClosed once closed."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop watching; a blocked ``get`` returns by raising WatchClosed."""

    def __iter__(self) -> Iterator[Event | Resync]:
        while True:
            try:
                batch = self.get(1.0)
            except WatchClosed:
                return
            yield from batch

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class QueueWatch(Watch):
    """A watch fed by a background thread through a queue (the etcd backend uses it)."""

    _CLOSED = object()

    def __init__(self, prefix: str, start_revision: int) -> None:
        self.prefix = prefix
        self._revision = start_revision - 1
        self._q: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._error: BaseException | None = None

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def _push(self, items: list[Event | Resync]) -> None:
        if items:
            self._q.put(items)

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._closed.set()
        self._q.put(self._CLOSED)

    def get(self, timeout: float | None = None) -> list[Event | Resync]:
        deadline = None if timeout is None else time.monotonic() + timeout
        out: list[Event | Resync] = []
        while True:
            try:
                if out:
                    item = self._q.get_nowait()
                else:
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    item = self._q.get(timeout=left)
            except queue.Empty:
                break
            if item is self._CLOSED:
                self._q.put(item)  # stay closed for the next caller
                if out:
                    break
                raise WatchClosed(str(self._error) if self._error else "watch closed")
            out.extend(item)
        if out:
            self._revision = out[-1].revision
        return out

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._q.put(self._CLOSED)


class Store(abc.ABC):
    """The shared state store. Thread-safe; every method may raise :class:`StoreError`."""

    @abc.abstractmethod
    def revision(self) -> int:
        """The store's current revision (0 for an empty, never-written store)."""

    @abc.abstractmethod
    def get(self, key: str) -> Record | None:
        ...

    @abc.abstractmethod
    def put(self, key: str, value: bytes) -> int:
        """Write ``key``; returns the new revision."""

    @abc.abstractmethod
    def delete(self, key: str, expected_revision: int | None = None) -> CasResult:
        """Remove ``key``. With ``expected_revision`` only if its ``mod_revision`` matches.
        ``ok`` is False when the key was absent or did not match; ``revision`` is the
        revision of the delete when ``ok``."""

    @abc.abstractmethod
    def cas(self, key: str, value: bytes, expected_revision: int) -> CasResult:
        """Write ``key`` only if its ``mod_revision`` is ``expected_revision`` (0: only if the
        key does not exist)."""

    @abc.abstractmethod
    def list(self, prefix: str, revision: int | None = None) -> Listing:
        """Every key under ``prefix`` at ``revision`` (default: now)."""

    @abc.abstractmethod
    def watch(self, prefix: str, start_revision: int) -> Watch:
        """Changes under ``prefix`` with revision >= ``start_revision``. A start before the
        compaction revision gives a :class:`Resync` first."""

    @abc.abstractmethod
    def compact(self, revision: int) -> None:
        """Drop history before ``revision`` (reads at ``revision`` and later still work)."""

    @abc.abstractmethod
    def close(self) -> None:
        ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
