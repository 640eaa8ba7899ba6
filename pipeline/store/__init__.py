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
