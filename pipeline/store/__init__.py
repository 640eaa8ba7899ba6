"""The state store shared by every edge node: interface, SQLite and etcd backends, schema.

- ``base``: the ``Store`` interface (put, get, delete, list at a revision, watch from a
  revision, compare-and-swap on a key's mod_revision, compact) and its value types.
- ``sqlite.SqliteStore(path)``: one machine, no server; processes share the file.
- ``etcd.EtcdStore(endpoints, tls=EtcdTls(ca, cert, key))``: a fleet; TLS, keepalive, failover,
  watch resume, resync after compaction.
- ``crypto.FleetKey.from_file(path)``: the owner-only fleet key file; AES-GCM sealing.
- ``schema``: the key layout (``/xtransit/v1/{tunnel,route,sa,ike}/...``), the record encodings
  and ``SharedState`` (typed reads and writes: Child SAs, rekeys, IKE SA records by CAS).
- ``pipeline.sync``: ``SaSync`` (store -> data path installer on every node) and
  ``StoreSaInstaller`` (the IKE daemon's installer on a fleet node: writes the store).

``open_store(config.state)`` opens the backend the configuration names.
"""
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
)

__all__ = ["DELETE", "PUT", "CasResult", "CompactedError", "Event", "Listing", "Record", "Resync",
           "Store", "StoreError", "Watch", "WatchClosed"]


def open_store(state) -> Store:
    """The store a node's ``[state]`` configuration names (``config.SqliteState`` or
    ``config.EtcdState``). etcd's client (grpc) is imported only when it is used."""
    backend = getattr(state, "backend", None)
    if backend == "sqlite":
        from .sqlite import SqliteStore
        return SqliteStore(state.path)
    if backend == "etcd":
        from .etcd import EtcdStore, EtcdTls
        tls = None
        if state.ca_file is not None:
            tls = EtcdTls(state.ca_file, state.cert_file, state.key_file)
        return EtcdStore(state.endpoints, tls=tls)
    raise StoreError(f"unknown state backend {backend!r}")


__all__ += ["open_store"]
