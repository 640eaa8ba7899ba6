"""A value that must never be printed: pre-shared keys, the fleet key, SA keys.

``Secret`` holds bytes and refuses to show them: ``repr()``, ``str()`` and ``format()`` all give
``<redacted>``, it cannot be pickled (so it cannot leak into a state store or a log record by
accident), and equality is constant-time. Code that needs the bytes calls ``reveal()``, which makes
every use easy to find with grep.
"""
from __future__ import annotations

import hmac

REDACTED = "<redacted>"


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: bytes | bytearray | memoryview | str) -> None:
        if isinstance(value, str):
            value = value.encode("utf-8")
        elif isinstance(value, (bytearray, memoryview)):
            value = bytes(value)
        elif not isinstance(value, bytes):
            # Name the type only: the value may be the secret itself in the wrong shape.
            raise TypeError(f"Secret needs bytes or str, not {type(value).__name__}")
        object.__setattr__(self, "_value", value)

    def reveal(self) -> bytes:
        """The secret bytes. Callers must not log, print or persist them."""
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return f"Secret({REDACTED})"

    def __str__(self) -> str:
        return REDACTED

    def __format__(self, spec: str) -> str:
        return format(REDACTED, spec)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        # bytes hashing is SipHash with a per-process random key: nothing to recover from it.
        return hash((Secret, self._value))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Secret is immutable")

    def __reduce__(self):  # pickle, copy.copy via reduce
        raise TypeError("a Secret cannot be pickled; pass it in memory or re-read its source")

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict) -> Secret:
        return self
