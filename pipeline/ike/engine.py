"""The IKE core's front door: datagrams in, datagrams out, timers as ``tick(now)``.

``IkeEngine`` owns the IKE SAs, finds the SA of each message, enforces message IDs and windows
(RFC 7296 section 2.3), answers retransmitted requests from the cached response, hands the
exchange to its task, protects and fragments the answer, and runs the timers (retransmission,
half-open expiry, liveness, Child SA rekey and expiry). It does no I/O: the UDP layer
(``server.py``) or a test moves the bytes.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

from ..sa import SaInstaller
from .constants import ExchangeType, Flag, Notify, PayloadType
from .crypto import skeyseed_rekey
from .message import (
    DropMessage,
    Message,
    Reassembly,
    decrypt,
    decrypt_fragment,
    encrypt,
    encrypt_fragments,
)
from .payloads import (
    EncryptedFragmentPayload,
    EncryptedPayload,
    IkeProtocolError,
    NoncePayload,
    NotifyPayload,
    Payload,
)
from .proposal import Selection
from .state import ChildSa, Endpoint, IkeSa, IkeState, Pending, random_spi
from .tasks import (
    ChildCreateTask,
    IkeInitTask,
    IkeRekeyTask,
    InformationalTask,
    InitiatorProfile,
    Retry,
    Task,
    responder_task,
)
from .tunnels import TunnelDirectory

log = logging.getLogger(__name__)


class Datagram(NamedTuple):
    data: bytes
    local: Endpoint   # address and port to send from
    remote: Endpoint  # address and port to send to


@dataclass
class EngineConfig:
    half_open_cookie_threshold: int = 32   # cookies above this many half-open SAs (RFC 7296 2.6)
    half_open_timeout: float = 30.0
    retransmit_timeout: float = 2.0
    retransmit_base: float = 1.8
    retransmit_tries: int = 5
    retransmit_max_interval: float = 30.0
    max_half_open: int = 10000             # beyond this, new IKE_SA_INIT requests are dropped
    fragmentation: bool = True
    fragment_size: int = 1280              # largest IKE datagram before RFC 7383 fragmentation
    cookie_secret_lifetime: float = 300.0
    rekeyed_sa_timeout: float = 30.0
    pfs_group_for_edge_rekey: bool = True  # the edge's own Child SA rekeys use the IKE SA's group


class IkeEngine:
    def __init__(self, directory: TunnelDirectory, installer: SaInstaller,
                 config: EngineConfig | None = None, now: float = 0.0):
        self.directory = directory
        self.installer = installer
        self.config = config or EngineConfig()
        self.now = now
        self.sas: dict[bytes, IkeSa] = {}             # by our SPI
        self.init_index: dict[tuple[bytes, str, int], IkeSa] = {}  # (SPIi, peer ip, port)
        self.child_spis: set[int] = set()
        self.stats: Counter[str] = Counter()
        self._half_open = 0  # responder IKE SAs in HALF_OPEN (kept as a count: O(1) per packet)
        self._cookie_secret = os.urandom(32)
        self._cookie_prev = self._cookie_secret
        self._cookie_version = 0
        self._cookie_rotated = now
        # IKE SAs changed since the last take_changes() (by our SPI): what a node sharing its
        # IKE SAs (pipeline/ike/fleet.py) writes to the store. Bookkeeping only, no I/O.
        self.changed: dict[bytes, IkeSa] = {}
        self.track_changes = False
        self.installer_sa: IkeSa | None = None  # the IKE SA of the installer call being made

    # ------------------------------------------------------------------ public API
    def handle(self, data: bytes, local: Endpoint, remote: Endpoint, now: float) -> list[Datagram]:
        """One IKE datagram (non-ESP marker already stripped) -> datagrams to send."""
        self.now = now
        try:
            return self._handle(data, local, remote)
        except DropMessage as exc:
            self.stats["drop_" + exc.reason] += 1
            log.debug("dropped datagram from %s: %s", remote, exc.reason)
        except IkeProtocolError as exc:
            self.stats["drop_malformed"] += 1
            log.debug("dropped malformed datagram from %s: %s", remote, exc.reason)
        except Exception as exc:
            self.stats["internal_error"] += 1
            log.error("internal error on datagram from %s: %s", remote, type(exc).__name__,
                      exc_info=log.isEnabledFor(logging.DEBUG))
        return []

    def initiate(self, profile: InitiatorProfile, local: Endpoint, remote: Endpoint,
                 now: float) -> list[Datagram]:
        """Start an IKE SA as initiator (two-peer tests, benchmark load)."""
        self.now = now
        sa = IkeSa(initiator=True, spi_i=random_spi(8), spi_r=bytes(8), local=local,
                   remote=remote, now=now, tunnel=profile.tunnel)
        self.sas[sa.spi_i] = sa
        sa.queue.append(IkeInitTask(profile))
        return self._kick(sa)

    def start(self, sa: IkeSa, task: Task, now: float) -> list[Datagram]:
        """Queue an exchange on an established IKE SA (rekey, delete, liveness)."""
        self.now = now
        sa.queue.append(task)
        return self._kick(sa)

    def tick(self, now: float) -> list[Datagram]:
        self.now = now
        out: list[Datagram] = []
        if now - self._cookie_rotated >= self.config.cookie_secret_lifetime:
            self._cookie_prev, self._cookie_secret = self._cookie_secret, os.urandom(32)
            self._cookie_version = (self._cookie_version + 1) & 0xFF
            self._cookie_rotated = now
        for sa in list(self.sas.values()):
            try:
                out += self._timers(sa)
            except Exception as exc:  # noqa: BLE001
                self.stats["internal_error"] += 1
                log.error("internal error in timers of %s: %s", sa.name, type(exc).__name__)
        return out

    def half_open(self) -> int:
        return self._half_open

    # ------------------------------------------------------------------ shared IKE SAs (issue 7)
    def adopt(self, sa: IkeSa) -> None:
        """Take over an IKE SA another node established or changed (``persist.loads``).

        It replaces any copy of it held here, without touching the data path: its Child SAs are
        already installed on every node from the store. Nothing is sent; the caller hands the
        datagram that made it load the SA to ``handle()`` next."""
        old = self.sas.get(sa.local_spi)
        if old is not None and old is not sa:
            self.forget(old)
        self.sas[sa.local_spi] = sa
        self.child_spis.update(sa.children)
        self.stats["ike_adopted"] += 1

    def forget(self, sa: IkeSa) -> None:
        """Drop this node's copy of an IKE SA another node now holds (or deleted): no DELETE
        is sent and no Child SA is uninstalled."""
        if self.sas.get(sa.local_spi) is not sa:
            return
        del self.sas[sa.local_spi]
        self.child_spis.difference_update(sa.children)
        self.changed.pop(sa.local_spi, None)
        self.stats["ike_forgotten"] += 1

    def take_changes(self) -> list[IkeSa]:
        """The IKE SAs changed since the last call (a destroyed one is in state DEAD)."""
        out = list(self.changed.values())
        self.changed.clear()
        return out

    def _changed(self, sa: IkeSa) -> None:
        if self.track_changes:
            self.changed[sa.local_spi] = sa

    def established_sas(self) -> list[IkeSa]:
        return [sa for sa in self.sas.values() if sa.state == IkeState.ESTABLISHED]

    # ------------------------------------------------------------------ callbacks for tasks
    def allocate_child_spi(self) -> int:
        while True:
            spi = int.from_bytes(random_spi(4), "big")
            if spi not in self.child_spis:
                self.child_spis.add(spi)
                return spi

    def established(self, sa: IkeSa) -> None:
        if sa.state == IkeState.HALF_OPEN:
            self._half_open -= 1
        sa.state = IkeState.ESTABLISHED
        sa.established_at = self.now
        self._changed(sa)
        if sa.tunnel is not None and sa.tunnel.ike_lifetime:
            sa.rekey_at = self.now + sa.tunnel.ike_lifetime * (0.85 + 0.05 * random.random())
        self.stats["ike_established"] += 1
        log.info("IKE SA %s established with %s (tunnel %s, %s%s)", sa.name, sa.remote,
                 sa.tunnel.name if sa.tunnel else "-", sa.sel.describe(),
                 ", NAT" if sa.nat_detected else "")

    def add_child(self, sa: IkeSa, child: ChildSa) -> None:
        sa.children[child.spi_in] = child
        self.child_spis.add(child.spi_in)
        self._changed(sa)
        self.installer_sa = sa
        self.installer.install(child.params(sa))
        self.stats["child_installed"] += 1

    def replace_child(self, sa: IkeSa, old: ChildSa, new: ChildSa) -> None:
        old.rekeyed = True
        sa.children[new.spi_in] = new
        self.child_spis.add(new.spi_in)
        self._changed(sa)
        self.installer_sa = sa
        self.installer.replace(old.spi_in, new.params(sa))
        self.stats["child_rekeyed"] += 1

    def remove_child(self, sa: IkeSa, spi_in: int) -> None:
        child = sa.children.pop(spi_in, None)
        if child is None:
            return
        self.child_spis.discard(spi_in)
        self._changed(sa)
        self.installer_sa = sa
        self.installer.delete(spi_in)
        self.stats["child_deleted"] += 1

    def initial_contact(self, sa: IkeSa) -> None:
        """INITIAL_CONTACT: the peer restarted; drop its older IKE SAs silently (RFC 7296 3.16)."""
        for other in list(self.sas.values()):
            if other is not sa and other.tunnel is sa.tunnel and other.state in (
                    IkeState.ESTABLISHED, IkeState.REKEYED, IkeState.DELETING):
                self.destroy(other, "initial_contact", uninstall=True)

    def rekey_ike(self, old: IkeSa, sel: Selection, *, initiator: bool, spi_i: bytes, spi_r: bytes,
                  ni: bytes, nr: bytes, g_ir: bytes) -> IkeSa:
        new = IkeSa(initiator=initiator, spi_i=spi_i, spi_r=spi_r, local=old.local,
                    remote=old.remote, now=self.now, tunnel=old.tunnel)
        new.state = IkeState.ESTABLISHED  # authenticated through the old SA: never half-open
        new.ni, new.nr = ni, nr
        new.nat_local, new.nat_remote = old.nat_local, old.nat_remote
        new.frag_supported = old.frag_supported
        new.peer_ids = old.peer_ids
        # RFC 7296 section 2.18: the old SA's PRF makes SKEYSEED, the new PRF the keys.
        new.derive(sel, skeyseed_rekey(old.prf, old.keys.sk_d, g_ir, ni, nr))
        new.children, old.children = old.children, {}
        self.sas[new.local_spi] = new
        old.state = IkeState.REKEYED
        old.rekeyed_at = self.now
        self._changed(old)
        self.established(new)
        self.stats["ike_rekeyed"] += 1
        return new

    def destroy(self, sa: IkeSa, reason: str, uninstall: bool = True) -> None:
        if self.sas.get(sa.local_spi) is not sa:
            return
        del self.sas[sa.local_spi]
        if sa.init_key is not None:
            self.init_index.pop(sa.init_key, None)
        for spi in list(sa.children):
            if uninstall:
                self.remove_child(sa, spi)
        if sa.state == IkeState.HALF_OPEN:
            self._half_open -= 1
        sa.state = IkeState.DEAD
        self._changed(sa)
        self.stats["ike_destroyed_" + reason] += 1
        log.info("IKE SA %s removed (%s)", sa.name, reason)

    # ------------------------------------------------------------------ dispatch
    def _handle(self, data: bytes, local: Endpoint, remote: Endpoint) -> list[Datagram]:
        try:
            msg = Message.parse(data)
        except IkeProtocolError as exc:
            if (exc.notify == Notify.INVALID_MAJOR_VERSION and data[18] == ExchangeType.IKE_SA_INIT
                    and not data[19] & Flag.RESPONSE):
                # RFC 7296 section 2.5: answer with the version we speak in the header.
                self.stats["invalid_major_version_answered"] += 1
                m = Message(data[0:8], data[8:16], ExchangeType.IKE_SA_INIT, Flag.RESPONSE,
                            int.from_bytes(data[20:24], "big"),
                            [NotifyPayload(Notify.INVALID_MAJOR_VERSION)])
                return [Datagram(m.serialize(), local, remote)]
            raise
        if msg.exchange == ExchangeType.IKE_SA_INIT and not msg.is_response:
            return self._init_request(msg, local, remote)
        our_spi = msg.spi_r if msg.from_initiator else msg.spi_i
        sa = self.sas.get(our_spi)
        if sa is None:
            raise DropMessage("unknown_spi")
        if msg.is_response:
            return self._response(sa, msg)
        return self._request(sa, msg, local, remote)

    # -- IKE_SA_INIT request (responder): stateless checks, then a half-open SA
    def _init_request(self, msg: Message, local: Endpoint, remote: Endpoint) -> list[Datagram]:
        if msg.msg_id != 0 or any(msg.spi_r) or not msg.from_initiator:
            raise DropMessage("bad_ike_sa_init")
        key = (msg.spi_i, remote[0], remote[1])
        existing = self.init_index.get(key)
        if existing is not None:
            if existing.init_request == msg.raw and existing.state != IkeState.DEAD:
                # RFC 7296 section 2.1: a retransmitted request gets the same answer.
                self.stats["retransmit_answered"] += 1
                return [Datagram(existing.init_response, local, remote)]
            raise DropMessage("duplicate_spi_i")

        def reply(payloads: list[Payload], spi_r: bytes = bytes(8)) -> list[Datagram]:
            m = Message(msg.spi_i, spi_r, msg.exchange, Flag.RESPONSE, 0, payloads)
            return [Datagram(m.serialize(), local, remote)]

        try:
            msg.check_critical()
            nonce = msg.get(PayloadType.NONCE)
            if not isinstance(nonce, NoncePayload):
                raise IkeProtocolError(Notify.INVALID_SYNTAX, "IKE_SA_INIT without nonce")
            cookie = msg.notify(Notify.COOKIE)
            valid_cookie = cookie is not None and self._cookie_ok(cookie.data, nonce.data, msg.spi_i,
                                                                  remote[0])
            if self.half_open() >= self.config.max_half_open:
                raise DropMessage("half_open_limit")
            if self.half_open() >= self.config.half_open_cookie_threshold and not valid_cookie:
                self.stats["cookie_sent"] += 1
                return reply([NotifyPayload(Notify.COOKIE,
                                            self._cookie(nonce.data, msg.spi_i, remote[0]))])
            if valid_cookie:
                self.stats["cookie_accepted"] += 1
            sa = IkeSa(initiator=False, spi_i=msg.spi_i, spi_r=random_spi(8), local=local,
                       remote=remote, now=self.now)
            task = IkeInitTask()
            task.process_r(self, sa, msg.payloads)
            payloads = task.build_r(self, sa)
        except IkeProtocolError as exc:
            self.stats["init_refused_" + _notify_name(exc.notify)] += 1
            log.info("IKE_SA_INIT from %s refused: %s", remote, exc.reason)
            return reply([NotifyPayload(exc.notify, exc.data)])
        resp = Message(sa.spi_i, sa.spi_r, msg.exchange, Flag.RESPONSE, 0, payloads).serialize()
        sa.init_request, sa.init_response = msg.raw, resp
        sa.expected_peer_id = 1
        sa.last_response, sa.last_response_id = [resp], 0
        self.sas[sa.spi_r] = sa
        self._half_open += 1
        self.init_index[key] = sa
        sa.init_key = key
        self.stats["ike_sa_init_answered"] += 1
        return [Datagram(resp, local, remote)]

    def _cookie(self, ni: bytes, spi_i: bytes, ip: str, secret: bytes | None = None,
                version: int | None = None) -> bytes:
        """Cookie = VersionIDofSecret | Hash(Ni | IPi | SPIi | secret) (RFC 7296 section 2.6)."""
        v = self._cookie_version if version is None else version
        s = self._cookie_secret if secret is None else secret
        return bytes([v]) + hashlib.sha256(ni + ip.encode() + spi_i + s).digest()

    def _cookie_ok(self, data: bytes, ni: bytes, spi_i: bytes, ip: str) -> bool:
        if len(data) != 33:
            return False
        for secret, version in ((self._cookie_secret, self._cookie_version),
                                (self._cookie_prev, (self._cookie_version - 1) & 0xFF)):
            if data[0] == version and hmac.compare_digest(
                    data, self._cookie(ni, spi_i, ip, secret, version)):
                return True
        return False

    # -- decrypting (SK or SKF) an incoming message for ``sa``
    def _open(self, sa: IkeSa, msg: Message) -> list[Payload] | None:
        if sa.sk is None:
            raise DropMessage("no_keys")
        last = msg.payloads[-1] if msg.payloads else None
        if isinstance(last, EncryptedFragmentPayload):
            plain = decrypt_fragment(msg, sa.sk)
            if sa.reassembly is None or sa.reassembly.msg_id != msg.msg_id or (
                    sa.reassembly.is_response != msg.is_response):
                sa.reassembly = Reassembly(msg.msg_id, last.total, msg.is_response)
            payloads = sa.reassembly.add(msg, plain)
            if payloads is None:
                self.stats["fragment_held"] += 1
                return None
            sa.reassembly = None
            self.stats["fragments_reassembled"] += 1
            return payloads
        if isinstance(last, EncryptedPayload):
            return decrypt(msg, sa.sk)
        raise DropMessage("unprotected_message")

    def _request(self, sa: IkeSa, msg: Message, local: Endpoint, remote: Endpoint) -> list[Datagram]:
        if msg.from_initiator == sa.initiator:
            raise DropMessage("wrong_initiator_flag")
        if msg.msg_id == sa.last_response_id and sa.last_response:
            last = msg.payloads[-1] if msg.payloads else None
            if isinstance(last, EncryptedFragmentPayload) and last.number != 1:
                return []  # RFC 7383 section 2.6.1: answer on the first fragment only
            self.stats["retransmit_answered"] += 1
            return [Datagram(d, local, remote) for d in sa.last_response]
        if msg.msg_id != sa.expected_peer_id:
            raise DropMessage("unexpected_message_id")
        if sa.state == IkeState.HALF_OPEN and msg.exchange != ExchangeType.IKE_AUTH:
            raise DropMessage("not_authenticated")
        if sa.state != IkeState.HALF_OPEN and msg.exchange == ExchangeType.IKE_AUTH:
            raise DropMessage("unexpected_ike_auth")
        try:
            payloads = self._open(sa, msg)
        except IkeProtocolError as exc:
            # Authentic (it decrypted) but malformed inside: answer, do not drop (RFC 7296 2.21).
            payloads, syntax_error = [], exc
        else:
            syntax_error = None
            if payloads is None:
                return []
        sa.last_heard = self.now
        if (local, remote) != (sa.local, sa.remote) and (sa.nat_detected or local[1] == 4500):
            # RFC 7296 section 2.23: follow the peer's NAT mapping on authenticated requests.
            sa.local, sa.remote = local, remote
            self.stats["peer_address_updated"] += 1
            for child in sa.children.values():
                if not child.rekeyed:
                    # ESP follows the peer's current address and port (issue 6, RFC 3948):
                    # the pair is installed again with the new encapsulation ports.
                    self.installer_sa = sa
                    self.installer.delete(child.spi_in)
                    self.installer.install(child.params(sa))
        task: Task | None = None
        try:
            if syntax_error is not None:
                raise syntax_error
            inner = Message(msg.spi_i, msg.spi_r, msg.exchange, msg.flags, msg.msg_id, payloads)
            inner.check_critical()
            task = responder_task(msg.exchange, payloads)
            task.process_r(self, sa, payloads)
            response = task.build_r(self, sa)
        except IkeProtocolError as exc:
            self.stats["request_error_" + _notify_name(exc.notify)] += 1
            log.info("IKE SA %s: %s request refused: %s", sa.name,
                     ExchangeType(msg.exchange).name, exc.reason)
            response = [NotifyPayload(exc.notify, exc.data)]
        flags = Flag.RESPONSE | (Flag.INITIATOR if sa.initiator else 0)
        out = Message(sa.spi_i, sa.spi_r, msg.exchange, flags, msg.msg_id)
        datagrams = self._protect(sa, out, response)
        sa.last_response, sa.last_response_id = datagrams, msg.msg_id
        sa.expected_peer_id = msg.msg_id + 1
        self._changed(sa)
        # RFC 7296 section 2.11: the response goes where the request came from.
        result = [Datagram(d, local, remote) for d in datagrams]
        if task is not None and task.destroy_after_response:
            reason = "deleted_by_peer" if msg.exchange == ExchangeType.INFORMATIONAL else "auth_failed"
            self.destroy(sa, reason, uninstall=True)
        elif sa.state == IkeState.HALF_OPEN:
            # IKE_AUTH answered with an error before authentication: no state stays behind.
            self.destroy(sa, "auth_failed", uninstall=True)
        else:
            result += self._kick(sa)
        return result

    def _protect(self, sa: IkeSa, msg: Message, payloads: list[Payload]) -> list[bytes]:
        data = encrypt(msg, payloads, sa.sk)
        if sa.frag_supported and len(data) > self.config.fragment_size:
            self.stats["fragmented_messages"] += 1
            return encrypt_fragments(msg, payloads, sa.sk, self.config.fragment_size)
        return [data]

    def _response(self, sa: IkeSa, msg: Message) -> list[Datagram]:
        p = sa.pending
        if p is None or msg.msg_id != p.msg_id or msg.from_initiator == sa.initiator:
            raise DropMessage("unexpected_response")
        if msg.exchange == ExchangeType.IKE_SA_INIT:
            payloads = msg.payloads
            if any(msg.spi_r):
                sa.spi_r = msg.spi_r
            sa.init_response = msg.raw
        else:
            payloads = self._open(sa, msg)
            if payloads is None:
                return []
        sa.last_heard = self.now
        self._changed(sa)
        task = p.task
        try:
            task.process_i(self, sa, payloads)
        except Retry:
            self.stats["request_retried"] += 1
            sa.pending = None
            sa.queue.insert(0, task)
            if msg.exchange == ExchangeType.IKE_SA_INIT:
                sa.spi_r = bytes(8)
                return self._kick(sa)
            sa.next_request_id += 1
            return self._kick(sa)
        except IkeProtocolError as exc:
            self.stats["response_error_" + _notify_name(exc.notify)] += 1
            log.info("IKE SA %s: %s failed: %s", sa.name, ExchangeType(msg.exchange).name,
                     exc.reason)
            sa.pending = None
            if sa.state in (IkeState.INIT_SENT, IkeState.AUTH_SENT):
                self.destroy(sa, "failed", uninstall=True)
                return []
            sa.next_request_id += 1
            return self._kick(sa)
        sa.pending = None
        sa.next_request_id += 1
        if sa.state == IkeState.DEAD:
            return []
        return self._kick(sa)

    def _kick(self, sa: IkeSa) -> list[Datagram]:
        """Send the next queued request if none is outstanding (window size 1)."""
        if sa.pending is not None or not sa.queue or sa.state == IkeState.DEAD:
            return []
        task = sa.queue.pop(0)
        payloads = task.build_i(self, sa)
        flags = Flag.INITIATOR if sa.initiator else 0
        msg = Message(sa.spi_i, sa.spi_r, task.exchange, flags, sa.next_request_id)
        if task.exchange == ExchangeType.IKE_SA_INIT:
            msg.payloads = payloads
            data = msg.serialize()
            sa.init_request = data
            datagrams = [data]
        else:
            datagrams = self._protect(sa, msg, payloads)
        sa.pending = Pending(task, msg.msg_id, datagrams, self.now)
        self._changed(sa)
        if (isinstance(task, InformationalTask) and not task.payloads and sa.tunnel is not None
                and sa.tunnel.dpd_timeout):
            # A liveness check is retried until the tunnel's dead-peer timeout (issue 6).
            sa.pending.deadline = self.now + sa.tunnel.dpd_timeout
        return [Datagram(d, sa.local, sa.remote) for d in datagrams]

    # ------------------------------------------------------------------ timers
    def _timers(self, sa: IkeSa) -> list[Datagram]:
        now, cfg = self.now, self.config
        if sa.state == IkeState.HALF_OPEN:
            if now - sa.created >= cfg.half_open_timeout:
                self.destroy(sa, "half_open_timeout", uninstall=True)
            return []
        if sa.state == IkeState.REKEYED:
            if now - sa.rekeyed_at >= cfg.rekeyed_sa_timeout:
                self.destroy(sa, "rekeyed", uninstall=False)
            return []
        p = sa.pending
        if p is not None:
            due = p.sent_at + min(cfg.retransmit_timeout * cfg.retransmit_base ** (p.tries - 1),
                                  cfg.retransmit_max_interval)
            if p.deadline and now >= p.deadline:
                self.destroy(sa, "peer_dead", uninstall=True)
                return []
            if now >= due:
                if not p.deadline and p.tries >= cfg.retransmit_tries:
                    self.destroy(sa, "peer_dead", uninstall=True)
                    return []
                p.tries += 1
                p.sent_at = now
                self.stats["retransmitted"] += 1
                return [Datagram(d, sa.local, sa.remote) for d in p.datagrams]
            return []
        if sa.state != IkeState.ESTABLISHED:
            return []
        tunnel = sa.tunnel
        for child in list(sa.children.values()):
            if child.rekeyed:
                if now >= child.expire_at:  # the peer never deleted the rekeyed SA
                    self.remove_child(sa, child.spi_in)
                continue
            if now >= child.expire_at:
                self.stats["child_expired"] += 1
                sa.queue.append(InformationalTask([_esp_delete(child)]))
                self.remove_child(sa, child.spi_in)
            elif now >= child.rekey_at and not child.rekey_pending:
                child.rekey_pending = True
                group = sa.sel.dh if cfg.pfs_group_for_edge_rekey else 0
                sa.queue.append(ChildCreateTask(rekey=child, pfs_group=group))
        if sa.rekey_at and now >= sa.rekey_at and not any(isinstance(t, IkeRekeyTask) for t in sa.queue):
            sa.rekey_at = 0.0
            sa.queue.append(IkeRekeyTask())
        if (tunnel is not None and tunnel.dpd_interval and not sa.queue
                and now - sa.last_heard >= tunnel.dpd_interval):
            sa.queue.append(InformationalTask())  # liveness check (RFC 7296 section 2.4)
            self.stats["liveness_sent"] += 1
        return self._kick(sa)


def _esp_delete(child: ChildSa):
    from .constants import ProtocolId
    from .payloads import DeletePayload

    return DeletePayload(ProtocolId.ESP, [child.spi_in.to_bytes(4, "big")])


def _notify_name(value: int) -> str:
    try:
        return Notify(value).name.lower()
    except ValueError:
        return str(value)


__all__ = ["Datagram", "EngineConfig", "IkeEngine"]
