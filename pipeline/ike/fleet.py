"""IKE SAs shared by every edge node behind one anycast address (issue 7): the store side.

``SharedIkeSas`` sits between the UDP layer (``server.py``) and the I/O-free ``IkeEngine`` and
has the same ``handle(data, local, remote, now)`` / ``tick(now)`` / ``stats`` face, so the
server drives it like an engine. Around every call it:

1. before: for a message on an established IKE SA (not IKE_SA_INIT), reads that SA's record
   from the store (``SharedState.ike_sa``). Absent here, or held here at another revision than
   the store's: the record is decoded (``persist.loads``) and ``engine.adopt()``ed, so a rekey,
   DELETE or liveness check arriving at this node is processed on the latest state (message
   IDs continue, a retransmitted request is answered from the cached response). A record the
   store no longer has (deleted through another node) drops this node's copy;
2. after: writes every IKE SA the engine changed: ``create_ike_sa`` for a new one, then
   ``update_ike_sa`` with compare-and-swap on the revision this node read or wrote. A conflict
   means another node changed the SA meanwhile; a record is never silently overwritten. For a
   message, nothing of the attempt leaves the node (its datagrams, its Child SA writes, the
   IKE SAs it created), the store's version is adopted and the datagram processed again (at
   most ``MAX_ATTEMPTS`` times). For the timers, only the IKE SA that lost is undone (its
   datagrams and Child SA writes dropped, the store's version adopted); the others go out and
   are written. A destroyed IKE SA's record is deleted (CAS on its revision too);
3. Child SA writes of the engine (``StoreSaInstaller``), each attributed to its IKE SA
   (``IkeEngine.installer_sa``), are held until that IKE SA's record is written, then made: the
   store never has Child SAs of an exchange whose IKE SA state lost a race.

Only the last writer keeps an IKE SA in memory: a watch on the IKE SA prefix drops this
node's copy when another node writes or deletes it, so one node runs its timers (liveness,
rekeys, expiry). When that node's own request (a liveness check, a rekey) is answered to
another node (the route moved), the answer is processed there: the request in flight is part
of the record (``persist``). A node that restarts takes back the IKE SAs it wrote last
(``start()``); the IKE SAs of a node that never comes back are held by no one until the peer's
next message (the peer's own rekeys and liveness checks keep them going; ours wait).

Not shared: half-open SAs (IKE_SA_INIT and IKE_AUTH must reach the same node; a route change
between the two makes the peer retry). Store failures do not stop IKE: the answer is sent, the
changes stay marked and are written at the next tick (``ike_store_write_failed``); meanwhile
another node would act on the older state. Store calls block the event loop for one round
trip (IKE messages are rare next to ESP).
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

from ..store import DELETE, Resync, StoreError
from ..store.schema import IkeSaConflict, IkeSaState, SchemaError, SharedState, decode_ike_sa
from .constants import ExchangeType, Flag
from .engine import Datagram, IkeEngine
from .persist import FORMAT, SHARED_STATES, PersistError, dumps, loads
from .state import IkeSa, IkeState

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


class _Conflict(Exception):
    def __init__(self, lost: list[IkeSa]) -> None:
        super().__init__(", ".join(sa.name for sa in lost))
        self.headers = {sa.spi_i + sa.spi_r for sa in lost}   # IKE header SPIs of their datagrams


class DeferredInstaller:
    """Holds the engine's installer calls, each with the IKE SA it was made for
    (``IkeEngine.installer_sa``), until ``flush()``; ``discard(sa)`` drops one IKE SA's."""

    def __init__(self, inner, engine: IkeEngine) -> None:
        self.inner = inner
        self.engine = engine
        self.calls: list[tuple[bytes | None, str, tuple]] = []

    def _owner(self) -> bytes | None:
        sa = self.engine.installer_sa
        return None if sa is None else sa.local_spi

    def install(self, sa) -> None:
        self.calls.append((self._owner(), "install", (sa,)))

    def replace(self, old_spi_in: int, sa) -> None:
        self.calls.append((self._owner(), "replace", (old_spi_in, sa)))

    def delete(self, spi_in: int) -> None:
        self.calls.append((self._owner(), "delete", (spi_in,)))

    def flush(self) -> None:
        while self.calls:
            _, name, args = self.calls[0]
            getattr(self.inner, name)(*args)     # StoreError: the rest stays for the retry
            self.calls.pop(0)

    def discard(self, owners: set[bytes]) -> None:
        self.calls = [c for c in self.calls if c[0] not in owners]


def _spis(sa: IkeSa) -> tuple[int, int]:
    return int.from_bytes(sa.spi_i, "big"), int.from_bytes(sa.spi_r, "big")


class SharedIkeSas:
    def __init__(self, engine: IkeEngine, shared: SharedState, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.shared = shared
        self.clock = clock
        self.stats = engine.stats
        self.revisions: dict[bytes, int] = {}     # our SPI -> store revision of our copy
        self.installer = DeferredInstaller(engine.installer, engine)
        engine.installer = self.installer
        engine.track_changes = True
        self._watch = None
        self._watch_from = 0

    # --- the engine's face ---------------------------------------------------------------
    def handle(self, data: bytes, local, remote, now: float) -> list[Datagram]:
        for _ in range(MAX_ATTEMPTS):
            self._refresh(data, now)
            out = self.engine.handle(data, local, remote, now)
            try:
                self.commit(now, atomic=True)
            except _Conflict:
                continue
            return out
        self.stats["ike_cas_gave_up"] += 1
        return []

    def tick(self, now: float) -> list[Datagram]:
        self.poll()
        out = self.engine.tick(now)
        try:
            self.commit(now)
        except _Conflict as c:
            # What the stale copy wanted to send goes nowhere (the adopted state runs its
            # timers at the next tick); the other IKE SAs' datagrams go out.
            return [d for d in out if d.data[:16] not in c.headers]
        return out

    # --- start / stop --------------------------------------------------------------------
    def start(self, now: float | None = None) -> SharedIkeSas:
        """Take back the IKE SAs this node (``SharedState.node``) wrote last, so that a
        restarted node runs their timers again, then follow the IKE SA prefix (copies written
        elsewhere are dropped)."""
        now = self.clock() if now is None else now
        listing = self.shared.store.list(self.shared.layout.ike_sas)
        if self.shared.node is not None:
            for rec in listing.records:
                try:
                    st = decode_ike_sa(self.shared.fleet, self.shared.layout, rec)
                except SchemaError as e:
                    self.stats["ike_record_undecodable"] += 1
                    log.warning("%s", e)
                    continue
                if st.node == self.shared.node:
                    self._adopt(st, now)
        self._open_watch(listing.revision + 1)
        return self

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None

    def _open_watch(self, start: int) -> None:
        self._watch_from = start
        self._watch = self.shared.store.watch(self.shared.layout.ike_sas, start)

    # --- before: the latest state of the SA this datagram is for --------------------------
    def _refresh(self, data: bytes, now: float) -> None:
        if len(data) < 28 or data[18] == ExchangeType.IKE_SA_INIT:
            return
        spi_i, spi_r = data[0:8], data[8:16]
        if not any(spi_r) or not any(spi_i):
            return
        ours = spi_r if data[19] & Flag.INITIATOR else spi_i
        held = self.engine.sas.get(ours)
        if held is not None and held.state not in SHARED_STATES:
            return                                  # half-open or dying here: this node's
        try:
            st = self.shared.ike_sa(int.from_bytes(spi_i, "big"), int.from_bytes(spi_r, "big"))
        except StoreError as e:
            self.stats["ike_store_read_failed"] += 1
            log.warning("IKE SA %s/%s: store read failed (%s); using this node's copy",
                        spi_i.hex(), spi_r.hex(), e)
            return
        except SchemaError as e:
            self.stats["ike_record_undecodable"] += 1
            log.warning("%s", e)
            return
        if st is None:
            if held is not None and ours in self.revisions:
                # Shared once and now gone: deleted through another node.
                self._forget(held)
            return
        if held is not None and self.revisions.get(ours) == st.revision:
            return
        self._adopt(st, now)

    def _adopt(self, st: IkeSaState, now: float) -> IkeSa | None:
        name = f"{st.spi_i:016x}/{st.spi_r:016x}"
        if st.state_format != FORMAT:
            self.stats["ike_adopt_failed"] += 1
            log.warning("IKE SA %s: state format %d (this node reads %d)", name,
                        st.state_format, FORMAT)
            return None
        try:
            sa = loads(st.state, self.engine.directory, now)
        except PersistError as e:
            self.stats["ike_adopt_failed"] += 1
            log.warning("IKE SA %s: not adopted: %s", name, e)
            return None
        self.engine.adopt(sa)
        self.revisions[sa.local_spi] = st.revision
        log.info("IKE SA %s adopted from the store (revision %d, written by node %s)", name,
                 st.revision, st.node)
        return sa

    def _forget(self, sa: IkeSa) -> None:
        self.engine.forget(sa)
        self.revisions.pop(sa.local_spi, None)

    # --- after: write what changed ------------------------------------------------------
    def commit(self, now: float | None = None, *, atomic: bool = False) -> None:
        """Write the engine's changed IKE SAs, then the Child SA writes made for them.

        A conflict (another node changed an IKE SA after this node read it) undoes what was
        done on the stale copy: its Child SA writes are dropped and the store's version is
        adopted. ``atomic`` (the processing of one message): everything the attempt produced
        is undone, the IKE SAs it created included, and the caller processes the message
        again; otherwise (timers) the other IKE SAs' changes are written as usual. Raises
        ``_Conflict`` naming the IKE SAs lost."""
        now = self.clock() if now is None else now
        changes = self.engine.take_changes()
        shared_before = set(self.revisions)
        lost: list[IkeSa] = []
        for n, sa in enumerate(changes):
            try:
                self._write(sa, now)
            except IkeSaConflict as e:
                self.stats["ike_cas_conflict"] += 1
                log.info("IKE SA %s changed by another node (%s): reloading", sa.name, e)
                lost.append(sa)
                if atomic:
                    for other in changes:
                        if other is not sa:
                            self._undo(other, created=other.local_spi not in shared_before)
                self._lost(sa, e.current, now)
                if atomic:
                    break
            except StoreError as e:
                self.stats["ike_store_write_failed"] += 1
                log.error("IKE SA %s not written to the store (%s); retried at the next tick",
                          sa.name, e)
                for other in changes[n:]:
                    self.engine.changed.setdefault(other.local_spi, other)
                return
        try:
            self.installer.flush()
        except StoreError as e:
            self.stats["ike_store_write_failed"] += 1
            log.error("Child SA writes failed (%s); retried at the next tick", e)
        if lost:
            raise _Conflict(lost)

    def _write(self, sa: IkeSa, now: float) -> None:
        key = sa.local_spi
        rev = self.revisions.get(key)
        if sa.state == IkeState.DEAD or self.engine.sas.get(key) is not sa:
            if sa.state == IkeState.DEAD and rev is not None:
                self.shared.delete_ike_sa(*_spis(sa), rev)
                self.revisions.pop(key, None)
            return
        if sa.state not in SHARED_STATES:
            return
        blob = dumps(sa, now)
        if rev is None:
            self.revisions[key] = self.shared.create_ike_sa(*_spis(sa), FORMAT, blob)
        else:
            self.revisions[key] = self.shared.update_ike_sa(*_spis(sa), FORMAT, blob, rev)

    def _undo(self, sa: IkeSa, created: bool) -> None:
        """Another product of an attempt that lost: its Child SA writes are dropped, its
        record too if the attempt created it, and this node's copy (the store has the truth)."""
        self.installer.discard({sa.local_spi})
        rev = self.revisions.get(sa.local_spi)
        if created and rev is not None:
            with contextlib.suppress(IkeSaConflict, StoreError):
                self.shared.delete_ike_sa(*_spis(sa), rev)
        if self.engine.sas.get(sa.local_spi) is sa:
            self.engine.forget(sa)
        self.revisions.pop(sa.local_spi, None)

    def _lost(self, sa: IkeSa, current: IkeSaState | None, now: float) -> None:
        """The stale copy ``sa`` goes (with its Child SA writes); the store's version comes."""
        self.installer.discard({sa.local_spi})
        if self.engine.sas.get(sa.local_spi) is sa:
            self.engine.forget(sa)
        self.revisions.pop(sa.local_spi, None)
        if current is not None:
            self._adopt(current, now)

    # --- copies written elsewhere ---------------------------------------------------------
    def poll(self, timeout: float = 0.0) -> int:
        """Drop the copies of IKE SAs another node wrote or deleted since the last poll
        (waiting up to ``timeout`` for news). Returns the number of store events seen."""
        if self._watch is None:
            return 0
        try:
            batch = self._watch.get(timeout)
        except StoreError as e:
            log.warning("IKE SA watch failed (%s): reopening", e)
            try:
                self._open_watch(max(self._watch_from, self._watch.revision + 1))
            except StoreError:
                pass
            return 0
        for item in batch:
            if isinstance(item, Resync):
                have = {r.key: r.mod_revision for r in item.records}
                for sa in list(self.engine.sas.values()):
                    if sa.local_spi in self.revisions:
                        key = self.shared.layout.ike_sa(*_spis(sa))
                        if have.get(key) != self.revisions[sa.local_spi]:
                            self._forget(sa)
                continue
            sa = self._held(item.key)
            if sa is None:
                continue
            mine = self.revisions.get(sa.local_spi)
            if item.kind == DELETE or mine is None or item.revision > mine:
                log.info("IKE SA %s now held by another node: copy dropped", sa.name)
                self._forget(sa)
        return len(batch)

    def _held(self, key: str) -> IkeSa | None:
        name = key.removeprefix(self.shared.layout.ike_sas)
        try:
            spi_i, spi_r = (bytes.fromhex(x) for x in name.split("_"))
        except ValueError:
            return None
        for ours in (spi_r, spi_i):
            sa = self.engine.sas.get(ours)
            if sa is not None and sa.spi_i == spi_i and sa.spi_r == spi_r:
                return sa
        return None


__all__ = ["DeferredInstaller", "SharedIkeSas"]
