"""The embedded store: one SQLite file in WAL mode, for the nodes of one machine, no server.

Tables:

- ``kv``: the current value of every key (key, value, create_rev, mod_rev, version);
- ``log``: one row per revision (the revision log): what the write did to which key. Lists at
  a past revision and watches read it; compaction thins it;
- ``meta``: the current revision and the compaction revision.

Every write is one ``BEGIN IMMEDIATE`` transaction that takes the next revision, so revisions
commit in order and a reader never sees a gap. Several processes may share the file (WAL lets
readers run beside the one writer). A watch learns of a commit from inotify on the database's
directory (a commit appends to ``<db>-wal``), falling back to polling when inotify is not
available, and then reads the new log rows from where it left off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import select
import sqlite3
import struct
import threading
import time
from pathlib import Path

from .base import (
    DELETE,
    PUT,
    CasResult,
    CompactedError,
    Event,
    Listing,
    Record,
    Resync,
    Store,
    StoreError,
    Watch,
    WatchClosed,
    check_key,
    check_value,
    prefix_end,
)

log = logging.getLogger(__name__)

_KIND_PUT, _KIND_DELETE = 0, 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS kv (
    key BLOB PRIMARY KEY, value BLOB NOT NULL,
    create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL, version INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS log (
    rev INTEGER PRIMARY KEY, key BLOB NOT NULL, kind INTEGER NOT NULL, value BLOB,
    create_rev INTEGER NOT NULL, version INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS log_key_rev ON log (key, rev);
INSERT OR IGNORE INTO meta VALUES ('revision', 0), ('compact', 0);
"""
WATCH_BATCH = 4096            # log rows read per watch poll
POLL_FALLBACK_S = 0.01        # watch poll period when inotify is not available
POLL_SAFETY_S = 1.0           # re-read even without a notification (a missed inotify event)


def _range(prefix: str) -> tuple[str, tuple]:
    """SQL condition and arguments for "key starts with prefix" (bytewise, index-friendly)."""
    if not prefix:
        return "1", ()
    return "key >= ? AND key < ?", (prefix.encode(), prefix_end(prefix))


def _record(row) -> Record:
    key, value, create_rev, mod_rev, version = row
    return Record(key.decode(), bytes(value), create_rev, mod_rev, version)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


class SqliteStore(Store):
    """``SqliteStore(path)``: open (creating if needed, mode 0600) the store file at ``path``.

    ``retain_revisions``: every ``compact_every`` writes, history older than that many
    revisions is compacted away (the log does not grow without bound); 0 disables it.
    """

    def __init__(self, path: str | os.PathLike, *, retain_revisions: int = 100_000,
                 compact_every: int = 10_000) -> None:
        self.path = Path(path)
        if not self.path.exists():
            # The file holds SA records (keys encrypted, metadata not): owner only. SQLite gives
            # the -wal and -shm files the same mode as the database.
            try:
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            except OSError as e:
                raise StoreError(f"sqlite store {self.path}: cannot create: {e.strerror}") \
                    from None
        self.retain_revisions = retain_revisions
        self.compact_every = compact_every
        self._lock = threading.Lock()
        self._closed = False
        self._watches: set[SqliteWatch] = set()
        try:
            self._conn = _connect(self.path)
            mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"sqlite store {self.path}: cannot enable WAL mode (got {mode})")
            # NORMAL in WAL mode: a commit survives a process crash; a power cut may lose the
            # last commits but never corrupts the file.
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
        except sqlite3.Error as e:
            raise StoreError(f"sqlite store {self.path}: {e}") from None

    # --- helpers ------------------------------------------------------------------------
    def _meta(self, conn: sqlite3.Connection) -> tuple[int, int]:
        rows = dict(conn.execute("SELECT name, value FROM meta").fetchall())
        return rows["revision"], rows["compact"]

    def _write(self, what: str, fn):
        """Run ``fn(conn, next_revision)`` in one write transaction; fn returns (result, used)
        where ``used`` says whether the revision was taken."""
        with self._lock:
            if self._closed:
                raise StoreError(f"{what}: store is closed")
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    rev, _ = self._meta(conn)
                    result, used = fn(conn, rev + 1)
                    if used:
                        conn.execute("UPDATE meta SET value = ? WHERE name = 'revision'",
                                     (rev + 1,))
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise StoreError(f"{what}: sqlite: {e}") from None
        if used and self.retain_revisions and (rev + 1) % self.compact_every == 0:
            floor = rev + 1 - self.retain_revisions
            if floor > 0:
                self.compact(floor)
        return result

    @staticmethod
    def _current(conn, key: bytes):
        return conn.execute("SELECT key, value, create_rev, mod_rev, version FROM kv "
                            "WHERE key = ?", (key,)).fetchone()

    @staticmethod
    def _do_put(conn, rev: int, key: bytes, value: bytes, cur) -> None:
        create, version = (rev, 1) if cur is None else (cur[2], cur[4] + 1)
        conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?, ?)",
                     (key, value, create, rev, version))
        conn.execute("INSERT INTO log VALUES (?, ?, ?, ?, ?, ?)",
                     (rev, key, _KIND_PUT, value, create, version))

    @staticmethod
    def _do_delete(conn, rev: int, key: bytes, cur) -> None:
        conn.execute("DELETE FROM kv WHERE key = ?", (key,))
        conn.execute("INSERT INTO log VALUES (?, ?, ?, NULL, ?, 0)",
                     (rev, key, _KIND_DELETE, cur[2]))

    # --- Store --------------------------------------------------------------------------
    def revision(self) -> int:
        with self._lock:
            try:
                return self._meta(self._conn)[0]
            except sqlite3.Error as e:
                raise StoreError(f"revision: sqlite: {e}") from None

    def get(self, key: str) -> Record | None:
        k = check_key(key).encode()
        with self._lock:
            try:
                row = self._current(self._conn, k)
            except sqlite3.Error as e:
                raise StoreError(f"get {key!r}: sqlite: {e}") from None
        return None if row is None else _record(row)

    def put(self, key: str, value: bytes) -> int:
        k, v = check_key(key).encode(), check_value(value)

        def fn(conn, rev):
            self._do_put(conn, rev, k, v, self._current(conn, k))
            return rev, True
        return self._write(f"put {key!r}", fn)

    def delete(self, key: str, expected_revision: int | None = None) -> CasResult:
        k = check_key(key).encode()

        def fn(conn, rev):
            cur = self._current(conn, k)
            if cur is None:
                return CasResult(False, 0, None), False
            if expected_revision is not None and cur[3] != expected_revision:
                return CasResult(False, 0, _record(cur)), False
            self._do_delete(conn, rev, k, cur)
            return CasResult(True, rev, None), True
        return self._write(f"delete {key!r}", fn)

    def cas(self, key: str, value: bytes, expected_revision: int) -> CasResult:
        k, v = check_key(key).encode(), check_value(value)

        def fn(conn, rev):
            cur = self._current(conn, k)
            if (0 if cur is None else cur[3]) != expected_revision:
                return CasResult(False, 0, None if cur is None else _record(cur)), False
            self._do_put(conn, rev, k, v, cur)
            return CasResult(True, rev, None), True
        return self._write(f"cas {key!r}", fn)

    def list(self, prefix: str, revision: int | None = None) -> Listing:
        cond, args = _range(prefix)
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN")
                try:
                    return _list(conn, cond, args, revision, *self._meta(conn))
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as e:
                raise StoreError(f"list {prefix!r}: sqlite: {e}") from None

    def watch(self, prefix: str, start_revision: int) -> Watch:
        if start_revision < 1:
            raise ValueError("a watch starts at revision 1 or later")
        w = SqliteWatch(self, prefix, start_revision)
        with self._lock:
            self._watches.add(w)
        return w

    def compact(self, revision: int) -> None:
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    rev, compact = self._meta(conn)
                    if revision > rev:
                        raise StoreError(f"compact {revision}: beyond the current revision {rev}")
                    if revision > compact:
                        # Keep every row from `revision` on; below it keep, per key, only the
                        # latest row and only if it is a put (a list at `revision` needs it).
                        conn.execute(
                            "DELETE FROM log WHERE rev < ?1 AND (kind = 1 OR rev < "
                            "(SELECT MAX(l2.rev) FROM log l2 WHERE l2.key = log.key "
                            "AND l2.rev < ?1))", (revision,))
                        conn.execute("UPDATE meta SET value = ? WHERE name = 'compact'",
                                     (revision,))
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise StoreError(f"compact {revision}: sqlite: {e}") from None

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            watches, self._watches = list(self._watches), set()
        for w in watches:
            w.close()
        with self._lock:
            self._conn.close()

    def _forget(self, w: SqliteWatch) -> None:
        with self._lock:
            self._watches.discard(w)


def _list(conn, cond: str, args: tuple, revision: int | None, rev: int, compact: int) -> Listing:
    if revision is None or revision == rev:
        rows = conn.execute(f"SELECT key, value, create_rev, mod_rev, version FROM kv "
                            f"WHERE {cond} ORDER BY key", args).fetchall()
        return Listing(tuple(_record(r) for r in rows), rev)
    if revision > rev:
        raise StoreError(f"list at revision {revision}: a future revision (now {rev})")
    if revision < compact:
        raise CompactedError(revision, compact)
    rows = conn.execute(
        f"SELECT l.key, l.value, l.create_rev, l.rev, l.version FROM log l "
        f"JOIN (SELECT key, MAX(rev) AS rev FROM log WHERE {cond} AND rev <= ? GROUP BY key) m "
        f"ON l.rev = m.rev WHERE l.kind = 0 ORDER BY l.key", (*args, revision)).fetchall()
    return Listing(tuple(_record(r) for r in rows), revision)


# --- change notification: inotify on the database directory ----------------------------------
_IN_MODIFY, _IN_CREATE, _IN_MOVED_TO = 0x2, 0x100, 0x80
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
_libc = None


def _inotify_libc():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


class _Notifier:
    """A readable fd that fires when ``<db>-wal`` (or the db itself) is written; None-safe:
    ``fd`` is None when inotify is not available and the watch polls instead."""

    def __init__(self, db: Path) -> None:
        self.fd: int | None = None
        self._names = {db.name.encode(), (db.name + "-wal").encode()}
        try:
            libc = _inotify_libc()
            fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "inotify_init1")
            wd = libc.inotify_add_watch(fd, str(db.parent).encode(),
                                        _IN_MODIFY | _IN_CREATE | _IN_MOVED_TO)
            if wd < 0:
                err = ctypes.get_errno()
                os.close(fd)
                raise OSError(err, "inotify_add_watch")
            self.fd = fd
        except (OSError, AttributeError) as e:
            log.warning("sqlite store watch: no inotify (%s); polling every %.0f ms",
                        e, POLL_FALLBACK_S * 1000)

    def drain(self) -> bool:
        """Consume pending events; True if one concerned the database."""
        hit = False
        while self.fd is not None:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            off = 0
            while off + 16 <= len(buf):
                _wd, _mask, _cookie, n = struct.unpack_from("iIII", buf, off)
                name = buf[off + 16:off + 16 + n].rstrip(b"\0")
                hit = hit or name in self._names
                off += 16 + n
        return hit

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class SqliteWatch(Watch):
    def __init__(self, store: SqliteStore, prefix: str, start_revision: int) -> None:
        self.prefix = prefix
        self._store = store
        self._next = start_revision
        self._delivered = start_revision - 1
        self._cond, self._args = _range(prefix)
        self._notifier = _Notifier(store.path)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._closed = threading.Event()
        self._conn = _connect(store.path)

    @property
    def revision(self) -> int:
        return self._delivered

    def _poll(self) -> list[Event | Resync]:
        conn = self._conn
        conn.execute("BEGIN")
        try:
            rev, compact = self._store._meta(conn)
            if self._next < compact:
                listing = _list(conn, self._cond, self._args, None, rev, compact)
                self._next = rev + 1
                return [Resync(listing.records, rev)]
            rows = conn.execute(
                f"SELECT rev, key, kind, value, create_rev, version FROM log "
                f"WHERE rev >= ? AND {self._cond} ORDER BY rev LIMIT {WATCH_BATCH}",
                (self._next, *self._args)).fetchall()
        finally:
            conn.execute("COMMIT")
        out = [Event(PUT if kind == _KIND_PUT else DELETE, key.decode(),
                     None if value is None else bytes(value), r, create, version)
               for r, key, kind, value, create, version in rows]
        # Nothing else under the prefix up to `rev`: the watch has covered it (so a compaction
        # of other keys' history does not force a needless resync).
        self._next = out[-1].revision + 1 if len(rows) == WATCH_BATCH else rev + 1
        return out

    def get(self, timeout: float | None = None) -> list[Event | Resync]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._closed.is_set():
                raise WatchClosed("watch closed")
            self._notifier.drain()
            try:
                items = self._poll()
            except sqlite3.Error as e:
                raise StoreError(f"watch {self.prefix!r}: sqlite: {e}") from None
            if items:
                self._delivered = items[-1].revision
                return items
            left = POLL_SAFETY_S if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return []
            if self._notifier.fd is None:
                left = min(left, POLL_FALLBACK_S)
            fds = [self._wake_r] + ([self._notifier.fd] if self._notifier.fd is not None else [])
            select.select(fds, [], [], min(left, POLL_SAFETY_S))

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self._store._forget(self)

    def __del__(self) -> None:
        for fd in (getattr(self, "_wake_r", None), getattr(self, "_wake_w", None)):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        n = getattr(self, "_notifier", None)
        if n is not None:
            n.close()
        c = getattr(self, "_conn", None)
        if c is not None:
            c.close()
