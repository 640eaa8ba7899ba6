"""An established IKE SA as bytes, and back: what another edge node needs to carry it on.

Anycast (issue 7): the peer's next IKE request (a Child SA rekey, a DELETE, a liveness check)
may arrive at any node. The node that established or last changed an IKE SA writes it to the
shared store (``pipeline/store/schema.py`` seals the whole blob with the fleet key: it holds
SK_d, SK_a*, SK_e*, SK_p*, Child SA keys and any DH private value in flight); a node that gets
a message for SPIs it does not hold loads the blob and ``IkeEngine.adopt()``s the result.

Format ``FORMAT`` (1): one JSON object (no pickle: nothing in the blob can run code), bytes as
hex. It holds

- SPIs, role, the tunnel's *name* (the node takes the tunnel, with its PSK, from its own
  configuration), local and peer address and port (NAT-T floats included), NAT flags;
- the negotiated IKE algorithms, the seven SK_* keys, Ni and Nr (the rekey of the IKE SA
  derives from SK_d and the old PRF, RFC 7296 section 2.18), the peer's IDs;
- message IDs: our next request, the peer's next expected request, and the cached last
  response with its ID (RFC 7296 section 2.3: a retransmitted request is answered from it,
  on whichever node it lands);
- our outstanding request (window size 1) and queued requests, when they are exchanges this
  module knows how to rebuild: INFORMATIONAL (liveness, DELETE), CREATE_CHILD_SA for a Child
  SA rekey or a new Child SA with the edge's own proposals, and the IKE SA rekey (their DH
  private value and nonce go with them, so the response can be processed on another node);
  anything else in flight is written as "abandoned": the adopting node skips its message ID;
- every Child SA: SPIs, algorithms, traffic selectors, keys, role, rekey state;
- times as offsets from the writer's clock (``now``), so nodes need no common monotonic clock:
  an SA that rekeys in 600 s on the writer rekeys in 600 s on the reader.

A blob of another format, or one that does not decode, is a ``PersistError`` (the message
names the field, never a key).
"""
from __future__ import annotations

import json
from typing import Any

from .crypto import EcpPrivate, IkeKeys, ModpPrivate, dh_generate
from .payloads import DeletePayload, TrafficSelector
from .proposal import Selection
from .state import ChildKeys, ChildSa, IkeSa, IkeState, Pending
from .tasks import ChildCreateTask, IkeRekeyTask, InformationalTask, Task
from .tunnels import TunnelDirectory

FORMAT = 1
SHARED_STATES = (IkeState.ESTABLISHED, IkeState.REKEYED, IkeState.DELETING)


class PersistError(ValueError):
    """A blob that cannot become an IKE SA here (never contains key bytes)."""


def _h(b: bytes) -> str:
    return b.hex()


def _b(v: Any, what: str) -> bytes:
    if not isinstance(v, str):
        raise PersistError(f"{what}: not a hex string")
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise PersistError(f"{what}: not a hex string") from None


def _sel(s: Selection) -> dict:
    return {"number": s.number, "protocol": s.protocol, "spi": _h(s.spi), "encr": s.encr,
            "key_bits": s.key_bits, "integ": s.integ, "prf": s.prf, "dh": s.dh, "esn": s.esn}


def _unsel(d: dict) -> Selection:
    return Selection(int(d["number"]), int(d["protocol"]), _b(d["spi"], "selection spi"),
                     int(d["encr"]), int(d["key_bits"]), int(d["integ"]), int(d["prf"]),
                     int(d["dh"]), bool(d["esn"]))


def _ts(t: TrafficSelector) -> list:
    return [t.ts_type, t.ip_proto, t.start_port, t.end_port, _h(t.start_addr), _h(t.end_addr)]


def _unts(v: list) -> TrafficSelector:
    ts_type, proto, sp, ep, start, end = v
    return TrafficSelector(int(ts_type), int(proto), int(sp), int(ep), _b(start, "ts"),
                           _b(end, "ts"))


def _dh(dh) -> list | None:
    if dh is None:
        return None
    if isinstance(dh, ModpPrivate):
        return [int(dh.group), format(dh._x, "x")]
    if isinstance(dh, EcpPrivate):
        return [int(dh.group), format(dh._key.private_numbers().private_value, "x")]
    raise PersistError(f"DH private value of type {type(dh).__name__} is not persistable")


def _undh(v):
    if v is None:
        return None
    group, private = v
    return dh_generate(int(group), int(private, 16))


def _task(task: Task) -> dict | None:
    """A request of ours as data, or None when it cannot be rebuilt elsewhere."""
    if type(task) is InformationalTask:
        dels = []
        for p in task.payloads:
            if not isinstance(p, DeletePayload):
                return None
            dels.append([p.protocol, [_h(s) for s in p.spis]])
        return {"kind": "informational", "deletes": dels}
    if type(task) is ChildCreateTask and task.proposals is None:
        return {"kind": "child_create",
                "rekey": task.rekey.spi_in if task.rekey is not None else None,
                "pfs_group": task.pfs_group, "dh": _dh(task.dh), "ni": _h(task.ni),
                "spi_in": task.spi_in, "retried": task.retried}
    if type(task) is IkeRekeyTask:
        return {"kind": "ike_rekey", "dh": _dh(task.dh), "ni": _h(task.ni),
                "new_spi": _h(task.new_spi)}
    return None


def _untask(d: dict, sa: IkeSa) -> Task:
    kind = d.get("kind")
    if kind == "informational":
        return InformationalTask([DeletePayload(int(proto), [_b(s, "delete spi") for s in spis])
                                  for proto, spis in d["deletes"]])
    if kind == "child_create":
        rekey = None
        if d["rekey"] is not None:
            rekey = sa.children.get(int(d["rekey"]))
            if rekey is None:
                raise PersistError("queued Child SA rekey of an unknown Child SA")
        t = ChildCreateTask(rekey=rekey, pfs_group=int(d["pfs_group"]))
        t.dh, t.ni, t.spi_in = _undh(d["dh"]), _b(d["ni"], "ni"), int(d["spi_in"])
        t.retried = bool(d["retried"])
        return t
    if kind == "ike_rekey":
        t = IkeRekeyTask()
        t.dh, t.ni, t.new_spi = _undh(d["dh"]), _b(d["ni"], "ni"), _b(d["new_spi"], "new_spi")
        return t
    raise PersistError(f"unknown task kind {kind!r}")


def _child(c: ChildSa, now: float) -> dict:
    return {"spi_in": c.spi_in, "spi_out": c.spi_out, "sel": _sel(c.sel),
            "ts_local": [_ts(t) for t in c.ts_local], "ts_remote": [_ts(t) for t in c.ts_remote],
            "age": _t(now - c.created), "rekey_in": _t(c.rekey_at - now), "expire_in": _t(c.expire_at - now),
            "keys": [_h(c.keys.encr_i), _h(c.keys.integ_i), _h(c.keys.encr_r),
                     _h(c.keys.integ_r)],
            "initiator": c.initiator, "rekeyed": c.rekeyed, "rekey_pending": c.rekey_pending,
            "collision_nonce": _h(c.collision_nonce), "bytes_in": c.bytes_in,
            "bytes_out": c.bytes_out}


def _unchild(d: dict, now: float) -> ChildSa:
    k = [_b(x, "child keys") for x in d["keys"]]
    return ChildSa(int(d["spi_in"]), int(d["spi_out"]), _unsel(d["sel"]),
                   [_unts(t) for t in d["ts_local"]], [_unts(t) for t in d["ts_remote"]],
                   now - float(d["age"]), now + float(d["rekey_in"]), now + float(d["expire_in"]),
                   ChildKeys(*k), bool(d["initiator"]), bool(d["rekeyed"]),
                   bool(d["rekey_pending"]), _b(d["collision_nonce"], "collision nonce"),
                   int(d["bytes_in"]), int(d["bytes_out"]))


def _t(seconds: float) -> float:
    """Times are kept to the millisecond (a blob read and written again is the same blob)."""
    return round(seconds, 3)


def _ep(v) -> tuple[str, int]:
    addr, port = v
    if not isinstance(addr, str):
        raise PersistError("endpoint address is not a string")
    return addr, int(port)


def dumps(sa: IkeSa, now: float) -> bytes:
    """The IKE SA as bytes (``FORMAT``). Only an SA in ``SHARED_STATES`` is shared."""
    if sa.state not in SHARED_STATES:
        raise PersistError(f"IKE SA in state {sa.state.value} is not shared")
    if sa.keys is None or sa.sel is None:
        raise PersistError("IKE SA without keys")
    keys = sa.keys
    obj: dict[str, Any] = {
        "format": FORMAT, "initiator": sa.initiator, "spi_i": _h(sa.spi_i), "spi_r": _h(sa.spi_r),
        "local": list(sa.local), "remote": list(sa.remote),
        "tunnel": sa.tunnel.name if sa.tunnel is not None else None,
        "state": sa.state.value, "age": _t(now - sa.created), "heard_age": _t(now - sa.last_heard),
        "established_age": _t(now - sa.established_at),
        "rekey_in": _t(sa.rekey_at - now) if sa.rekey_at else None,
        "rekeyed_age": _t(now - sa.rekeyed_at) if sa.rekeyed_at else None,
        "sel": _sel(sa.sel),
        "keys": [_h(keys.sk_d), _h(keys.sk_ai), _h(keys.sk_ar), _h(keys.sk_ei), _h(keys.sk_er),
                 _h(keys.sk_pi), _h(keys.sk_pr)],
        "ni": _h(sa.ni), "nr": _h(sa.nr),
        "nat_local": sa.nat_local, "nat_remote": sa.nat_remote,
        "frag_supported": sa.frag_supported,
        "peer_ids": None if sa.peer_ids is None else [sa.peer_ids[0], _h(sa.peer_ids[1])],
        "next_request_id": sa.next_request_id, "expected_peer_id": sa.expected_peer_id,
        "last_response": [_h(d) for d in sa.last_response],
        "last_response_id": sa.last_response_id,
        "children": [_child(c, now) for c in sa.children.values()],
        "pending": None, "queue": [],
    }
    p = sa.pending
    if p is not None:
        obj["pending"] = {"msg_id": p.msg_id, "task": _task(p.task),
                          "datagrams": [_h(d) for d in p.datagrams], "sent_age": _t(now - p.sent_at),
                          "tries": p.tries,
                          "deadline_in": _t(p.deadline - now) if p.deadline else None}
    for t in sa.queue:
        d = _task(t)
        if d is not None:
            obj["queue"].append(d)
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def loads(blob: bytes, directory: TunnelDirectory, now: float) -> IkeSa:
    """An IKE SA from ``dumps()``; its tunnel comes from ``directory`` (this node's config)."""
    try:
        obj = json.loads(blob.decode())
    except (ValueError, UnicodeDecodeError):
        raise PersistError("IKE SA state is not JSON") from None
    if not isinstance(obj, dict):
        raise PersistError("IKE SA state is not a JSON object")
    if obj.get("format") != FORMAT:
        raise PersistError(f"IKE SA state format {obj.get('format')!r} (this node reads "
                           f"{FORMAT})")
    try:
        return _loads(obj, directory, now)
    except PersistError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else type(e).__name__
        raise PersistError(f"IKE SA state does not decode ({what})") from None


def _loads(obj: dict, directory: TunnelDirectory, now: float) -> IkeSa:
    tunnel = None
    if obj["tunnel"] is not None:
        tunnel = directory.tunnels.get(obj["tunnel"])
        if tunnel is None:
            raise PersistError(f"IKE SA of tunnel {obj['tunnel']!r}, which this node does not "
                               "have")
    sa = IkeSa(initiator=bool(obj["initiator"]), spi_i=_b(obj["spi_i"], "spi_i"),
               spi_r=_b(obj["spi_r"], "spi_r"), local=_ep(obj["local"]),
               remote=_ep(obj["remote"]), now=now - float(obj["age"]), tunnel=tunnel)
    if len(sa.spi_i) != 8 or len(sa.spi_r) != 8:
        raise PersistError("IKE SPIs must be 8 bytes")
    sa.state = IkeState(obj["state"])
    if sa.state not in SHARED_STATES:
        raise PersistError(f"IKE SA state {sa.state.value} is not shared")
    sa.last_heard = now - float(obj["heard_age"])
    sa.established_at = now - float(obj["established_age"])
    sa.rekey_at = now + float(obj["rekey_in"]) if obj["rekey_in"] is not None else 0.0
    sa.rekeyed_at = now - float(obj["rekeyed_age"]) if obj["rekeyed_age"] is not None else 0.0
    sa.ni, sa.nr = _b(obj["ni"], "ni"), _b(obj["nr"], "nr")
    sel = _unsel(obj["sel"])
    keys = IkeKeys(*(_b(k, "IKE keys") for k in obj["keys"]))
    _install_keys(sa, sel, keys)
    sa.nat_local, sa.nat_remote = bool(obj["nat_local"]), bool(obj["nat_remote"])
    sa.frag_supported = bool(obj["frag_supported"])
    if obj["peer_ids"] is not None:
        sa.peer_ids = (int(obj["peer_ids"][0]), _b(obj["peer_ids"][1], "peer id"))
    sa.next_request_id = int(obj["next_request_id"])
    sa.expected_peer_id = int(obj["expected_peer_id"])
    sa.last_response = [_b(d, "last response") for d in obj["last_response"]]
    sa.last_response_id = int(obj["last_response_id"])
    for d in obj["children"]:
        c = _unchild(d, now)
        sa.children[c.spi_in] = c
    rebuilt: list[Task] = []
    p = obj["pending"]
    if p is not None:
        task = None
        if p["task"] is not None:
            try:
                task = _untask(p["task"], sa)
            except PersistError:
                task = None         # e.g. the rekey of a Child SA that is gone meanwhile
        if task is None:
            # An exchange this node cannot carry on (see the module doc): its message ID is
            # skipped, so our next request is not taken for a retransmission of it.
            sa.next_request_id = max(sa.next_request_id, int(p["msg_id"]) + 1)
        else:
            rebuilt.append(task)
            sa.pending = Pending(task, int(p["msg_id"]),
                                 [_b(d, "pending datagram") for d in p["datagrams"]],
                                 now - float(p["sent_age"]), int(p["tries"]),
                                 now + float(p["deadline_in"]) if p["deadline_in"] is not None
                                 else 0.0)
    for d in obj["queue"]:
        try:
            t = _untask(d, sa)
        except PersistError:
            continue                # not started yet: the timers queue what is still due
        rebuilt.append(t)
        sa.queue.append(t)
    # A Child SA rekey that was queued on the writer as a task this format does not carry is
    # started again by the reader's timers.
    rekeying = {t.rekey.spi_in for t in rebuilt
                if isinstance(t, ChildCreateTask) and t.rekey is not None}
    for c in sa.children.values():
        if c.rekey_pending and c.spi_in not in rekeying:
            c.rekey_pending = False
    return sa


def _install_keys(sa: IkeSa, sel: Selection, keys: IkeKeys) -> None:
    """What ``IkeSa.derive`` sets, from the stored keys instead of SKEYSEED."""
    from .crypto import PrfAlg, sk_cipher
    from .message import SkKeys
    cipher = sk_cipher(sel.encr, sel.key_bits, sel.integ)
    sa.sel, sa.prf, sa.keys = sel, PrfAlg(sel.prf), keys
    if sa.initiator:
        sa.sk = SkKeys(cipher, keys.sk_ei, keys.sk_ai, keys.sk_er, keys.sk_ar)
    else:
        sa.sk = SkKeys(cipher, keys.sk_er, keys.sk_ar, keys.sk_ei, keys.sk_ai)


__all__ = ["FORMAT", "SHARED_STATES", "PersistError", "dumps", "loads"]
