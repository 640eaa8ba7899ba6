"""Child SAs from the shared store into this node's data path, and from IKE into the store.

On a fleet node the IKE daemon hands its Child SAs to a :class:`StoreSaInstaller` (it writes
the store), and :class:`SaSync` is the only caller of the data path's installer, on every node
including the one that negotiated: one path, so no SA is installed twice on its own node.

``SaSync`` keeps an :class:`~pipeline.sa.SaInstaller` equal to the Child SA records in the
store. It starts (or restarts, or joins late) by listing every SA record at one revision R and
reconciling the installer with it, then watches from R + 1 and applies each event:

- a put of a new SPI installs it; a put carrying ``replaces`` (a rekey) whose old SPI is
  installed becomes one ``replace(old, new)``, and the old SPI stays *retired* (the data path
  keeps accepting it, RFC 7296 section 2.8) until its own record is deleted; a put of an
  installed SPI with changed parameters (a new NAT mapping) is ``delete`` then ``install``; a
  put of an SA equal to the installed one (a write retried across an etcd leader change, a node
  re-announcing) does nothing;
- a delete calls ``delete(spi)``, for a retired SPI too;
- a :class:`~pipeline.store.Resync` (the watch fell behind a compaction) is reconciled like the
  initial list: extra SPIs deleted, missing ones installed, changed ones replaced.

When the store fails the sync (etcd unreachable beyond the client's retries, a watch that
died), what is installed stays installed and the sync rebuilds from a fresh list as soon as the
store answers again (back-off 0.2 s to 30 s; ``failures`` counts these).

A record that does not decode (damaged, another fleet key, a newer format) or an installer
that raises is counted under a named reason in ``drops`` and logged with the store key only;
the sync carries on.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from collections import Counter
from dataclasses import dataclass

from .sa import ChildSaParams, SaInstaller
from .store import DELETE, Event, Resync, StoreError, WatchClosed
from .store.schema import ChildSaRecord, SchemaError, SharedState, decode_child_sa

log = logging.getLogger(__name__)

DROP_UNDECODABLE = "undecodable"      # the record does not decode (SchemaError)
DROP_BAD_KEY = "bad_key"              # not a Child SA key, or its SPI differs from the record's
DROP_INSTALL_FAILED = "install_failed"  # the installer raised
RETRY_MIN_S, RETRY_MAX_S = 0.2, 30.0    # rebuild back-off after a store failure


def _digest(value: bytes) -> bytes:
    """What an installed SA remembers of its record: 16 bytes, not the ~1 KB record."""
    return hashlib.blake2b(value, digest_size=16).digest()


@dataclass
class _Installed:
    key: str
    value: bytes                # _digest() of the record
    sa: ChildSaParams
    retired: bool = False       # replaced by a rekey; deleted when its record goes


class SaSync:
    """``SaSync(shared_state, installer)``; ``start()`` runs it in a thread, or drive it with
    ``rebuild()`` and ``step()``."""

    def __init__(self, state: SharedState, installer: SaInstaller, *, name: str = "sa-sync"):
        self.state = state
        self.installer = installer
        self.name = name
        self.prefix = state.layout.sas
        self.revision = 0                   # last store revision applied
        self.installed: dict[int, _Installed] = {}
        self._spi_of_key: dict[str, int] = {}
        self.drops: Counter[str] = Counter()
        self.applied = 0                    # installer calls made
        self._watch = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.error: BaseException | None = None   # the last store failure
        self.failures = 0                           # store failures survived by rebuilding

    # --- one record ---------------------------------------------------------------------
    def _decode(self, rec_key: str, value: bytes):
        try:
            tunnel, spi = self.state.layout.parse_sa(rec_key)
            r = decode_child_sa(self.state.fleet, rec_key, value)
        except SchemaError as e:
            reason = DROP_BAD_KEY if "not a Child SA key" in str(e) else DROP_UNDECODABLE
            self._drop(reason, rec_key, str(e))
            return None
        if r.sa.spi_in != spi or r.sa.tunnel_name != tunnel:
            self._drop(DROP_BAD_KEY, rec_key, "record's tunnel/SPI differ from its key")
            return None
        return r

    def _drop(self, reason: str, key: str, why: str) -> None:
        self.drops[reason] += 1
        log.warning("%s: skipped %s (%s): %s", self.name, key, reason, why)

    def _call(self, what: str, key: str, fn, *args) -> bool:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - any installer failure is counted, not fatal
            self._drop(DROP_INSTALL_FAILED, key, f"{what}: {type(e).__name__}: {e}")
            return False
        self.applied += 1
        return True

    def _put(self, key: str, raw: bytes, r: ChildSaRecord | None = None) -> None:
        spi_now = self._spi_of_key.get(key)
        value = _digest(raw)
        if spi_now is not None and self.installed[spi_now].value == value:
            return                                              # a repeated write
        if r is None:
            r = self._decode(key, raw)
            if r is None:
                return
        sa = r.sa
        if spi_now is not None:
            cur = self.installed[spi_now]
            if cur.sa == sa or cur.retired:
                # Rewritten unchanged, or an update of an SA a rekey already retired: nothing
                # to do in the data path.
                cur.value, cur.sa = value, sa
                return
            # Same SPI, new parameters: the installers add SPIs, they do not edit them.
            if not self._call("delete", key, self.installer.delete, spi_now):
                return
            del self.installed[spi_now], self._spi_of_key[key]
            if self._call("install", key, self.installer.install, sa):
                self.installed[sa.spi_in] = _Installed(key, value, sa)
                self._spi_of_key[key] = sa.spi_in
            return
        old = self.installed.get(r.replaces) if r.replaces is not None else None
        if old is not None and not old.retired and r.replaces != sa.spi_in:
            if self._call("replace", key, self.installer.replace, r.replaces, sa):
                old.retired = True
                self.installed[sa.spi_in] = _Installed(key, value, sa)
                self._spi_of_key[key] = sa.spi_in
            return
        if self._call("install", key, self.installer.install, sa):
            self.installed[sa.spi_in] = _Installed(key, value, sa)
            self._spi_of_key[key] = sa.spi_in

    def _delete(self, key: str) -> None:
        spi = self._spi_of_key.get(key)
        if spi is None:
            return                        # never installed (undecodable, or a failed install)
        if self._call("delete", key, self.installer.delete, spi):
            del self._spi_of_key[key]
            del self.installed[spi]

    def _reconcile(self, records, revision: int) -> None:
        want = {r.key: r.value for r in records}
        gone = [k for k in self._spi_of_key if k not in want]
        todo = []
        for key, raw in want.items():
            spi = self._spi_of_key.get(key)
            if spi is not None and self.installed[spi].value == _digest(raw):
                continue                                        # unchanged
            r = self._decode(key, raw)
            if r is not None:
                todo.append((key, raw, r))
        # A rekey caught half-way (both records there): the SA being replaced goes in first, so
        # the new one arrives as replace(old, new) and ends up the tunnel's current SA.
        replaced = {r.replaces for _, _, r in todo if r.replaces is not None}
        todo.sort(key=lambda t: t[2].sa.spi_in not in replaced)
        # Puts before deletes: a rekeyed SA whose old record is gone becomes one replace(), with
        # no moment where neither SPI is installed.
        for key, raw, r in todo:
            self._put(key, raw, r)
        for key in gone:
            self._delete(key)
        self.revision = revision

    # --- driving ------------------------------------------------------------------------
    def rebuild(self) -> int:
        """List every SA record at one revision R, reconcile the installer with it, and open
        the watch from R + 1. Returns R."""
        listing = self.state.store.list(self.prefix)
        self._reconcile(listing.records, listing.revision)
        if self._watch is not None:
            self._watch.close()
        self._watch = self.state.store.watch(self.prefix, listing.revision + 1)
        log.info("%s: %d SAs installed from the store at revision %d", self.name,
                 len(self.installed), listing.revision)
        return listing.revision

    def apply(self, item: Event | Resync) -> None:
        if isinstance(item, Resync):
            log.info("%s: store history compacted under the watch: reconciling at revision %d",
                     self.name, item.revision)
            self._reconcile(item.records, item.revision)
            return
        if item.kind == DELETE:
            self._delete(item.key)
        else:
            self._put(item.key, item.value)
        self.revision = item.revision

    def step(self, timeout: float) -> int:
        """Apply the next batch of changes (waiting up to ``timeout``); returns its size."""
        if self._watch is None:
            self.rebuild()
        batch = self._watch.get(timeout)
        for item in batch:
            self.apply(item)
        return len(batch)

    def _run(self) -> None:
        delay = RETRY_MIN_S
        while not self._stop.is_set():
            try:
                self.rebuild()
                self._ready.set()
                delay = RETRY_MIN_S
                while not self._stop.is_set():
                    self.step(0.5)
                return
            except WatchClosed as e:
                if self._stop.is_set():
                    return
                self.error = e
            except StoreError as e:
                self.error = e
            # The store failed us (etcd unreachable past its retries, a watch that died): keep
            # what is installed, rebuild from a fresh list when the store answers again.
            self.failures += 1
            log.error("%s: %s; rebuilding from the store in %.1f s", self.name, self.error,
                      delay)
            self._stop.wait(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    def start(self, timeout: float = 30.0) -> SaSync:
        """Rebuild and follow the store in a thread; returns once the first rebuild is done
        (StoreError if it did not succeed within ``timeout``)."""
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            err = self.error
            self.stop()
            raise StoreError(f"{self.name}: no rebuild from the store within {timeout} s"
                             + (f" (last: {err})" if err else ""))
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.close()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None


class StoreSaInstaller:
    """The ``SaInstaller`` the IKE daemon of a fleet node hands its Child SAs to: it writes them
    to the store, and every node's :class:`SaSync` (this node's too) installs them in its data
    path. One path into the data path, whichever node negotiated, rekeyed or deleted the SA.

    ``delete(spi_in)`` needs the record's key (``/sa/<tunnel>/<spi>``): it knows the tunnel of the
    SAs written through it and, given ``sync``, of every SA in the store (an SA negotiated on
    another node and deleted here); otherwise it searches the SA prefix.
    """

    def __init__(self, state: SharedState, sync: SaSync | None = None) -> None:
        self.state = state
        self.sync = sync
        self._tunnel_of: dict[int, str] = {}

    def install(self, sa: ChildSaParams) -> None:
        self.state.put_child_sa(sa)
        self._tunnel_of[sa.spi_in] = sa.tunnel_name

    def replace(self, old_spi_in: int, sa: ChildSaParams) -> None:
        """A rekey within one tunnel: the new record names the SPI it replaces."""
        self.state.rekey_child_sa(old_spi_in, sa)
        self._tunnel_of.pop(old_spi_in, None)
        self._tunnel_of[sa.spi_in] = sa.tunnel_name

    def delete(self, spi_in: int) -> None:
        key = self._key_of(spi_in)
        if key is not None:
            self.state.store.delete(key)
        self._tunnel_of.pop(spi_in, None)

    def _key_of(self, spi_in: int) -> str | None:
        tunnel = self._tunnel_of.get(spi_in)
        if tunnel is not None:
            return self.state.layout.sa(tunnel, spi_in)
        if self.sync is not None:
            inst = self.sync.installed.get(spi_in)
            if inst is not None:
                return inst.key
        suffix = f"/{spi_in:08x}"
        for rec in self.state.store.list(self.state.layout.sas).records:
            if rec.key.endswith(suffix):
                return rec.key
        return None
