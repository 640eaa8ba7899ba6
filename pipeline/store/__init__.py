"""The state store shared by every edge node: interface, SQLite and etcd backends, schema."""
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
