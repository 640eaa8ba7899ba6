"""Tunnels and routes shared through the store: one configuration for the whole anycast fleet.

A node whose file says ``[state] config_source = "store"`` keeps only its own ``[node]``,
``[state]`` and ``[analytics]`` locally; its tunnels and routes are the records under
``<root>v1/tunnel/`` and ``<root>v1/route/`` (pipeline/store/schema.py), which
``xtransit config push -c NODE.toml FLEET.toml`` publishes. The records go through the same
validator as a file (``config.load(..., shared=...)``), so a node refuses from the store
exactly what it would refuse from a file, and ``xtransit run`` applies changes live: a watch
on both prefixes triggers the same reload as SIGHUP (map updates only).

A pre-shared key is never written to the store: a tunnel record names where each node reads
it (``psk_file`` or ``psk_env``), which must then exist on every node.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, EtcdState, Route, load
from .store import Store, StoreError, open_store
from .store.schema import (
    Layout,
    SchemaError,
    decode_route,
    decode_tunnel,
    encode_route,
    encode_tunnel,
)

log = logging.getLogger("xtransit")


def layout_for(state) -> Layout:
    """The key layout a node's ``[state]`` uses (etcd: its ``prefix``)."""
    return Layout(state.prefix) if isinstance(state, EtcdState) else Layout()


# --- records <-> the configuration file's tables ------------------------------------------------
def tunnel_table(rec: dict) -> tuple[str, str, dict[str, Any]]:
    """(kind, name, the TOML table) of a decoded tunnel record."""
    t: dict[str, Any] = {k: rec[k] for k in ("id", "index", "edge_endpoint", "interface_address",
                                             "ttl", "mtu", "mss") if rec.get(k) is not None}
    if rec.get("description"):
        t["description"] = rec["description"]
    if rec["kind"] == "gre":
        t["customer_endpoint"] = rec.get("customer_endpoint")
        if rec.get("key") is not None:
            t["key"] = rec["key"]
    else:
        t["account_id"] = rec.get("account_id")
        if rec.get("customer_endpoint") is not None:
            t["customer_endpoint"] = rec["customer_endpoint"]
        src = str(rec.get("psk_source", ""))
        kind, _, where = src.partition(":")
        if kind not in ("file", "env") or not where:
            raise SchemaError(f"tunnel {rec['name']}: bad psk_source record")
        t["psk_file" if kind == "file" else "psk_env"] = where
        for k in ("allow_null_cipher", "replay_protection", "ike_lifetime", "child_lifetime",
                  "dpd_interval", "dpd_timeout", "pin_node"):
            if rec.get(k) is not None:
                t[k] = rec[k]
    return rec["kind"], rec["name"], t


def documents(tunnels: list[dict], routes: list[Route]) -> dict[str, Any]:
    """The ``tunnels`` and ``routes`` documents a file would hold, from store records."""
    doc: dict[str, dict[str, Any]] = {}
    for rec in tunnels:
        kind, name, table = tunnel_table(rec)
        doc.setdefault(kind, {})[name] = table
    return {"tunnels": doc,
            "routes": [{"prefix": str(r.prefix), "tunnel": r.tunnel, "priority": r.priority}
                       for r in routes]}


@dataclass
class Snapshot:
    shared: dict[str, Any]     # the documents for config.load(shared=...)
    revision: int              # the store revision both lists were read at
    bad: list[str]             # records that could not be decoded (named, not fatal)


def read(store: Store, layout: Layout) -> Snapshot:
    """Both prefixes at one revision."""
    tl = store.list(layout.tunnels)
    rl = store.list(layout.routes, revision=tl.revision)
    tunnels, routes, bad = [], [], []
    for r in tl.records:
        try:
            rec = decode_tunnel(r.key, r.value)
            tunnel_table(rec)
            tunnels.append(rec)
        except SchemaError as e:
            bad.append(str(e))
    for r in rl.records:
        try:
            routes.append(decode_route(r.key, r.value))
        except SchemaError as e:
            bad.append(str(e))
    return Snapshot(documents(tunnels, routes), tl.revision, bad)


def load_node(path: str | Path, store: Store | None = None) -> Config:
    """A node's configuration: the file alone, or (``config_source = "store"``) the file with
    the store's tunnels and routes. ConfigError for either; StoreError when the store is
    unreachable. ``store``: an open store to read (else one is opened and closed here)."""
    cfg = load(path)
    if cfg.state.config_source != "store":
        return cfg
    own = store is None
    store = store or open_store(cfg.state)
    try:
        snap = read(store, layout_for(cfg.state))
    finally:
        if own:
            store.close()
    for why in snap.bad:
        log.warning("store record skipped: %s", why)
    return load(path, shared=snap.shared)


# --- publishing ---------------------------------------------------------------------------------
@dataclass
class PushResult:
    added: list[str]
    changed: list[str]
    removed: list[str]
    unchanged: int
    revision: int


@dataclass
class PushStep:
    what: str                 # "added", "changed" or "removed"
    name: str                 # ``tunnel <name>`` or ``route <prefix> -> <tunnel>``
    key: str
    value: bytes | None       # None: delete


def plan(fleet: Config, layout: Layout, have_tunnels: Iterable[Any] = (),
         have_routes: Iterable[Any] = ()) -> tuple[list[PushStep], int]:
    """What makes the store's tunnels and routes exactly ``fleet``'s, given the records it holds
    (``store.list(...).records``): the steps in the order they must be applied, and how many
    records stay as they are. Routes are written after tunnels and deleted before them, so a
    node watching never sees a route to a tunnel that does not exist yet or any more."""
    want_t = {layout.tunnel(t.name): (f"tunnel {t.name}", encode_tunnel(t))
              for t in (*fleet.gre_tunnels, *fleet.ipsec_tunnels)}
    want_r = {layout.route(r.tunnel, str(r.prefix)): (f"route {r.prefix} -> {r.tunnel}",
                                                       encode_route(r)) for r in fleet.routes}
    have_t = {r.key: r for r in have_tunnels}
    have_r = {r.key: r for r in have_routes}

    def names(recs: dict, key: str, decode: Callable) -> str:
        try:
            obj = decode(key, recs[key].value)
        except SchemaError:
            return key
        return f"route {obj.prefix} -> {obj.tunnel}" if isinstance(obj, Route) \
            else f"tunnel {obj['name']}"

    steps: list[PushStep] = []
    unchanged = 0
    for key in sorted(set(have_r) - set(want_r)):
        steps.append(PushStep("removed", names(have_r, key, decode_route), key, None))
    for want, have in ((want_t, have_t), (want_r, have_r)):
        for key, (name, value) in sorted(want.items()):
            old = have.get(key)
            if old is not None and old.value == value:
                unchanged += 1
                continue
            steps.append(PushStep("changed" if old is not None else "added", name, key, value))
    for key in sorted(set(have_t) - set(want_t)):
        steps.append(PushStep("removed", names(have_t, key, decode_tunnel), key, None))
    return steps, unchanged


def push(fleet: Config, store: Store, layout: Layout) -> PushResult:
    """Make the store's tunnels and routes exactly ``fleet``'s (:func:`plan`, applied)."""
    steps, unchanged = plan(fleet, layout, store.list(layout.tunnels).records,
                            store.list(layout.routes).records)
    res = PushResult([], [], [], unchanged, store.revision())
    for st in steps:
        getattr(res, st.what).append(st.name)
        if st.value is None:
            res.revision = store.delete(st.key).revision or res.revision
        else:
            res.revision = store.put(st.key, st.value)
    return res


# --- following the store ------------------------------------------------------------------------
class ConfigWatch:
    """Calls ``on_change()`` (from its own thread) after any change under the tunnel or route
    prefix since ``revision``; a watch that breaks is re-opened from the last revision seen
    (a resync after compaction also counts as a change)."""

    def __init__(self, store: Store, layout: Layout, revision: int,
                 on_change: Callable[[], None]) -> None:
        self.store, self.layout, self.on_change = store, layout, on_change
        self._stop = threading.Event()
        self._revision = {layout.tunnels: revision, layout.routes: revision}
        self._threads = [threading.Thread(target=self._run, args=(p,), daemon=True,
                                          name=f"config-watch {p}") for p in self._revision]

    def start(self) -> ConfigWatch:
        for t in self._threads:
            t.start()
        return self

    def _run(self, prefix: str) -> None:
        while not self._stop.is_set():
            try:
                with self.store.watch(prefix, self._revision[prefix] + 1) as w:
                    while not self._stop.is_set():
                        items = w.get(timeout=0.5)
                        if not items:
                            continue
                        for it in items:        # an Event or a Resync: both have revision
                            self._revision[prefix] = max(self._revision[prefix], it.revision)
                        self.on_change()
            except StoreError as e:
                if self._stop.is_set():
                    return
                log.warning("config watch on %s: %s; re-opening", prefix, e)
                self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)


__all__ = ["ConfigError", "ConfigWatch", "PushResult", "Snapshot", "documents", "layout_for",
           "load_node", "push", "read", "tunnel_table"]
