"""The store across machines: etcd v3 over gRPC.

The protobuf/gRPC stubs are aetcd's (generated for current protobuf); the client around them is
ours, synchronous, and does what aetcd's does not:

- client-certificate TLS (``EtcdTls``), one gRPC channel per endpoint;
- gRPC keepalive with a short ping timeout, so a frozen member (SIGSTOP, a hung host) breaks the
  connection within ``keepalive_s + keepalive_timeout_s`` instead of stalling a watch silently;
- the ``hasleader`` metadata (etcd's WithRequireLeader): a member cut off from the leader
  refuses calls and cancels watches instead of serving stale data;
- endpoint failover with retry: a call that fails with UNAVAILABLE or DEADLINE_EXCEEDED (member
  down, frozen, leader election) moves to the next endpoint and is retried until ``retry_for``
  seconds have passed. A retried write may have been applied by the first try: a put then
  happens twice (same value, two revisions); a CAS or delete whose retry finds its own result
  already there reports success (see ``cas``);
- watches resume from the last delivered revision + 1 on another member, so no event is lost
  or repeated; when the history they need was compacted, they re-read the prefix and deliver
  it as a :class:`Resync`, then watch from that read's revision + 1.

Run the servers with auto-compaction (``--auto-compaction-mode=revision
--auto-compaction-retention=N``) and a keepalive floor at or below ours
(``--grpc-keepalive-min-time``, default 5 s: a client pinging more often is disconnected with
"too_many_pings").
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from aetcd.rpc import kv_pb2, rpc_pb2, rpc_pb2_grpc

from .base import (
    DELETE,
    PUT,
    CasResult,
    CompactedError,
    Event,
    Listing,
    QueueWatch,
    Record,
    Resync,
    Store,
    StoreError,
    Watch,
    check_key,
    check_value,
    prefix_end,
)

log = logging.getLogger(__name__)

_RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_METADATA = (("hasleader", "true"),)
_COMPACTED = "required revision has been compacted"
_FUTURE = "required revision is a future revision"


@dataclass(frozen=True)
class EtcdTls:
    """Client-certificate TLS: the CA that signed the servers' certificates, and our
    certificate and key (PEM files)."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(p: Path | None, what: str) -> bytes | None:
            if p is None:
                return None
            try:
                return Path(p).read_bytes()
            except OSError as e:
                raise StoreError(f"etcd TLS {what} '{p}': {e.strerror}") from None
        if (self.cert_file is None) != (self.key_file is None):
            raise StoreError("etcd TLS: give both cert_file and key_file, or neither")
        return grpc.ssl_channel_credentials(read(self.ca_file, "ca_file"),
                                            read(self.key_file, "key_file"),
                                            read(self.cert_file, "cert_file"))


def _target(endpoint: str, tls: EtcdTls | None) -> str:
    ep = endpoint.strip()
    if ep.startswith("https://"):
        if tls is None:
            raise StoreError(f"etcd endpoint {endpoint!r} is https but no TLS files are set")
        ep = ep[len("https://"):]
    elif ep.startswith("http://"):
        if tls is not None:
            raise StoreError(f"etcd endpoint {endpoint!r} is plain http but TLS is configured")
        ep = ep[len("http://"):]
    ep = ep.rstrip("/")
    if not ep or ":" not in ep:
        raise StoreError(f"etcd endpoint {endpoint!r}: expected [https://]host:port")
    return ep


def _record(kv) -> Record:
    return Record(kv.key.decode(), bytes(kv.value), kv.create_revision, kv.mod_revision,
                  kv.version)


class _Retryable(Exception):
    pass


class EtcdStore(Store):
    """``EtcdStore(["https://10.0.0.1:2379", ...], tls=EtcdTls(...))``."""

    def __init__(self, endpoints: Sequence[str], *, tls: EtcdTls | None = None,
                 timeout: float = 2.0, retry_for: float = 15.0, keepalive_s: float = 5.0,
                 keepalive_timeout_s: float = 2.0, page_size: int = 10_000) -> None:
        if not endpoints:
            raise StoreError("etcd store: no endpoints")
        self.targets = [_target(e, tls) for e in endpoints]
        self.timeout = timeout
        self.retry_for = retry_for
        self.page_size = page_size
        self._creds = tls.credentials() if tls is not None else None
        self._options = [
            ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
            ("grpc.http2.ping_timeout_ms", int(keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.enable_retries", 0),
            ("grpc.max_receive_message_length", 256 << 20),
        ]
        self._lock = threading.Lock()
        self._channels: dict[int, grpc.Channel] = {}
        self._current = 0
        self._closed = False
        self._watches: set[EtcdWatch] = set()

    # --- endpoints ----------------------------------------------------------------------
    def _channel(self, i: int) -> grpc.Channel:
        with self._lock:
            if self._closed:
                raise StoreError("etcd store is closed")
            ch = self._channels.get(i)
            if ch is None:
                t = self.targets[i]
                ch = (grpc.secure_channel(t, self._creds, self._options) if self._creds
                      else grpc.insecure_channel(t, self._options))
                self._channels[i] = ch
            return ch

    def _pick(self) -> int:
        with self._lock:
            return self._current

    def _failed(self, i: int) -> None:
        """Endpoint ``i`` failed: the next call goes to the one after it."""
        with self._lock:
            if self._current == i:
                self._current = (i + 1) % len(self.targets)

    @property
    def endpoint(self) -> str:
        """The endpoint calls go to now."""
        return self.targets[self._pick()]

    def _call(self, what: str, fn):
        """``fn(channel, ambiguous)`` with failover: retried on another endpoint while the
        failure is UNAVAILABLE/DEADLINE_EXCEEDED and ``retry_for`` has not passed. ``ambiguous``
        is True on a retry after a failure that may have hidden a success."""
        deadline = time.monotonic() + self.retry_for
        ambiguous = False
        delay = 0.05
        while True:
            i = self._pick()
            try:
                return fn(self._channel(i), ambiguous)
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
                if _COMPACTED in details:
                    raise CompactedError(-1, -1) from None
                if code not in _RETRY_CODES:
                    raise StoreError(f"{what}: etcd {code.name}: {details}") from None
                err = f"{code.name}: {details}"
            except _Retryable as e:
                err = str(e)
            ambiguous = True
            self._failed(i)
            if time.monotonic() + delay > deadline:
                raise StoreError(f"{what}: etcd unavailable for {self.retry_for:.0f} s "
                                 f"(last: {err})")
            log.info("etcd %s on %s failed (%s); retrying on %s", what, self.targets[i], err,
                     self.endpoint)
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _kv(self, ch) -> rpc_pb2_grpc.KVStub:
        return rpc_pb2_grpc.KVStub(ch)

    # --- Store --------------------------------------------------------------------------
    def revision(self) -> int:
        def fn(ch, _amb):
            r = self._kv(ch).Range(rpc_pb2.RangeRequest(key=b"\0", count_only=True),
                                   timeout=self.timeout, metadata=_METADATA)
            return r.header.revision
        return self._call("revision", fn)

    def get(self, key: str) -> Record | None:
        k = check_key(key).encode()

        def fn(ch, _amb):
            r = self._kv(ch).Range(rpc_pb2.RangeRequest(key=k), timeout=self.timeout,
                                   metadata=_METADATA)
            return _record(r.kvs[0]) if r.kvs else None
        return self._call(f"get {key!r}", fn)

    def put(self, key: str, value: bytes) -> int:
        k, v = check_key(key).encode(), check_value(value)

        def fn(ch, _amb):
            r = self._kv(ch).Put(rpc_pb2.PutRequest(key=k, value=v), timeout=self.timeout,
                                 metadata=_METADATA)
            return r.header.revision
        return self._call(f"put {key!r}", fn)

    def _txn(self, ch, compare, success) -> rpc_pb2.TxnResponse:
        return self._kv(ch).Txn(rpc_pb2.TxnRequest(compare=compare, success=success),
                                timeout=self.timeout, metadata=_METADATA)

    def delete(self, key: str, expected_revision: int | None = None) -> CasResult:
        k = check_key(key).encode()

        def fn(ch, ambiguous):
            if expected_revision is None:
                compare = [rpc_pb2.Compare(key=k, target=rpc_pb2.Compare.VERSION,
                                           result=rpc_pb2.Compare.GREATER, version=0)]
            else:
                compare = [rpc_pb2.Compare(key=k, target=rpc_pb2.Compare.MOD,
                                           result=rpc_pb2.Compare.EQUAL,
                                           mod_revision=expected_revision)]
            r = self._txn(ch, compare, [rpc_pb2.RequestOp(
                request_delete_range=rpc_pb2.DeleteRangeRequest(key=k))])
            if r.succeeded:
                return CasResult(True, r.header.revision, None)
            cur = self.get(key)
            if cur is None and ambiguous:
                # The try that failed may have deleted it; the key is gone either way.
                return CasResult(True, r.header.revision, None)
            return CasResult(False, 0, cur)
        return self._call(f"delete {key!r}", fn)

    def cas(self, key: str, value: bytes, expected_revision: int) -> CasResult:
        k, v = check_key(key).encode(), check_value(value)

        def fn(ch, ambiguous):
            compare = [rpc_pb2.Compare(key=k, target=rpc_pb2.Compare.MOD,
                                       result=rpc_pb2.Compare.EQUAL,
                                       mod_revision=expected_revision)]
            r = self._txn(ch, compare, [rpc_pb2.RequestOp(
                request_put=rpc_pb2.PutRequest(key=k, value=v))])
            if r.succeeded:
                return CasResult(True, r.header.revision, None)
            cur = self.get(key)
            if (ambiguous and cur is not None and cur.value == v
                    and cur.mod_revision > expected_revision):
                # Our first try was applied before its answer was lost (a leader change): the
                # key holds exactly our value, written after the revision we expected.
                return CasResult(True, cur.mod_revision, None)
            return CasResult(False, 0, cur)
        return self._call(f"cas {key!r}", fn)

    def list(self, prefix: str, revision: int | None = None) -> Listing:
        start, end = prefix.encode(), prefix_end(prefix)

        def fn(ch, _amb):
            records: list[Record] = []
            at = revision or 0
            key = start
            while True:
                try:
                    r = self._kv(ch).Range(
                        rpc_pb2.RangeRequest(key=key, range_end=end, revision=at,
                                             limit=self.page_size),
                        timeout=self.timeout * 4, metadata=_METADATA)
                except grpc.RpcError as e:
                    d = e.details() or ""
                    if _COMPACTED in d:
                        raise CompactedError(at, -1) from None
                    if _FUTURE in d:
                        raise StoreError(f"list at revision {at}: a future revision") from None
                    raise
                if at == 0:
                    at = r.header.revision   # every further page at the first page's revision
                records.extend(_record(kv) for kv in r.kvs)
                if not r.more or not r.kvs:
                    return Listing(tuple(records), at)
                key = r.kvs[-1].key + b"\0"
        return self._call(f"list {prefix!r}", fn)

    def watch(self, prefix: str, start_revision: int) -> Watch:
        if start_revision < 1:
            raise ValueError("a watch starts at revision 1 or later")
        w = EtcdWatch(self, prefix, start_revision)
        with self._lock:
            if self._closed:
                raise StoreError("etcd store is closed")
            self._watches.add(w)
        w.start()
        return w

    def compact(self, revision: int) -> None:
        def fn(ch, _amb):
            try:
                self._kv(ch).Compact(rpc_pb2.CompactionRequest(revision=revision, physical=True),
                                     timeout=self.timeout * 5, metadata=_METADATA)
            except grpc.RpcError as e:
                if _COMPACTED in (e.details() or ""):
                    return  # already compacted at or beyond it
                raise
        self._call(f"compact {revision}", fn)

    def member_list(self) -> list[tuple[int, str, list[str]]]:
        """(id, name, client URLs) of every member (for tools and tests)."""
        def fn(ch, _amb):
            r = rpc_pb2_grpc.ClusterStub(ch).MemberList(rpc_pb2.MemberListRequest(),
                                                        timeout=self.timeout)
            return [(m.ID, m.name, list(m.clientURLs)) for m in r.members]
        return self._call("member list", fn)

    def leader(self) -> str | None:
        """The endpoint (of ours) of the current leader, asking each member in turn."""
        for i, t in enumerate(self.targets):
            try:
                r = rpc_pb2_grpc.MaintenanceStub(self._channel(i)).Status(
                    rpc_pb2.StatusRequest(), timeout=self.timeout)
            except grpc.RpcError:
                continue
            if r.leader and r.leader == r.header.member_id:
                return t
        return None

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            watches, self._watches = list(self._watches), set()
        for w in watches:
            w.close()
        for w in watches:
            w.join(5.0)
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            ch.close()

    def _forget(self, w: EtcdWatch) -> None:
        with self._lock:
            self._watches.discard(w)


class EtcdWatch(QueueWatch):
    """One etcd watch stream at a time, on the store's current endpoint; on a stream failure
    it moves to the next endpoint and re-creates the watch from the last revision + 1."""

    def __init__(self, store: EtcdStore, prefix: str, start_revision: int) -> None:
        super().__init__(prefix, start_revision)
        self._store = store
        self._next = start_revision
        self._call_lock = threading.Lock()
        self._call = None
        self._attempt_done: threading.Event | None = None
        self.reconnects = 0          # streams re-created after a failure (for tests, metrics)
        self.resyncs = 0
        self.endpoint: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"etcd-watch {prefix}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _requests(self, done: threading.Event):
        yield rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
            key=self.prefix.encode(), range_end=prefix_end(self.prefix),
            start_revision=self._next, progress_notify=True))
        # Keep the stream open (a half-closed stream ends the watch) until this attempt ends.
        done.wait()

    def _resync(self) -> None:
        listing = self._store.list(self.prefix)
        self.resyncs += 1
        self._push([Resync(listing.records, listing.revision)])
        self._next = listing.revision + 1

    def _stream(self, i: int, done: threading.Event) -> bool:
        """Run one watch stream; True when it ended because the history was compacted."""
        ch = self._store._channel(i)
        call = rpc_pb2_grpc.WatchStub(ch).Watch(self._requests(done), metadata=_METADATA)
        with self._call_lock:
            self._call = call
        if self.closed:
            call.cancel()
        for resp in call:
            if resp.canceled:
                if resp.compact_revision:
                    log.info("etcd watch %r: revision %d compacted (kept from %d): re-reading",
                             self.prefix, self._next, resp.compact_revision)
                    return True
                raise _Retryable(f"watch canceled by the server: {resp.cancel_reason or '?'}")
            if resp.events:
                items = []
                for ev in resp.events:
                    kv = ev.kv
                    if ev.type == kv_pb2.Event.PUT:
                        items.append(Event(PUT, kv.key.decode(), bytes(kv.value),
                                           kv.mod_revision, kv.create_revision, kv.version))
                    else:
                        items.append(Event(DELETE, kv.key.decode(), None, kv.mod_revision,
                                           kv.create_revision, 0))
                self._push(items)
                self._next = items[-1].revision + 1
            elif not resp.created and resp.header.revision >= self._next:
                # A timed progress notification (progress_notify): every event up to
                # header.revision was delivered. Timed ones travel in order with the events; we
                # never *request* progress: etcd releases without the fix for etcd issue 15220
                # could answer a request ahead of events still queued, and resuming past those
                # events would lose them.
                self._next = resp.header.revision + 1
        raise _Retryable("watch stream ended")

    def _run(self) -> None:
        delay = 0.05
        try:
            while not self.closed:
                i = self._store._pick()
                self.endpoint = self._store.targets[i]
                done = threading.Event()
                self._attempt_done = done
                try:
                    if self._stream(i, done):
                        self._resync()
                    delay = 0.05
                    continue
                except grpc.RpcError as e:
                    if self.closed:
                        break
                    err = f"{e.code().name}: {e.details()}"
                except _Retryable as e:
                    err = str(e)
                except CompactedError:
                    continue  # the re-read raced a compaction: read again
                finally:
                    done.set()
                    with self._call_lock:
                        self._call = None
                if self.closed:
                    break
                self.reconnects += 1
                self._store._failed(i)
                log.info("etcd watch %r on %s failed (%s); resuming from revision %d on %s",
                         self.prefix, self.targets_name(i), err, self._next,
                         self._store.endpoint)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        except StoreError as e:
            self._fail(e)
            return
        except BaseException as e:  # never die silently: the owner sees it on get()
            log.exception("etcd watch %r: unexpected error", self.prefix)
            self._fail(StoreError(f"watch {self.prefix!r}: {type(e).__name__}: {e}"))
            return
        finally:
            self._store._forget(self)

    def targets_name(self, i: int) -> str:
        return self._store.targets[i]

    def close(self) -> None:
        super().close()
        with self._call_lock:
            call = self._call
        if call is not None:
            call.cancel()
        done = self._attempt_done
        if done is not None:
            done.set()
