"""The daemon's control socket: requests that must reach the running process (its SA keys
exist nowhere else), served by the daemon's asyncio loop.

    /run/xtransit/<node name>/control.sock     AF_UNIX stream, mode 0600

Protocol: the client sends one JSON object on one line, ``{"request": "<name>"}``; the daemon
answers with one JSON object on one line, ``{"ok": true, ...}`` or ``{"ok": false, "error":
"..."}``, and closes. Only peers whose SO_PEERCRED uid is 0 or the daemon's own uid are served
(the file mode already keeps others out; the credential check holds even if the mode is
changed or the socket is passed on). Requests:

* ``export-keys``: ``ikev2_decryption_table`` and ``esp_sa`` (Wireshark UAT rows from
  pipeline/ike/export.py). The answer holds keys; the daemon logs one ``keys_exported`` event
  with counts only.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("xtransit")

SOCKET_NAME = "control.sock"
MAX_REQUEST = 4096           # bytes of one request line
REQUEST_TIMEOUT_S = 5.0      # a client that connects and sends nothing is dropped after this


class ControlError(RuntimeError):
    """The client side: no daemon, refused, or a bad answer (the message says which)."""


def socket_path(run_root: Path, node: str) -> Path:
    return run_root / node / SOCKET_NAME


def peer_uid(sock: socket.socket) -> int:
    """The connecting process's uid as the kernel recorded it at connect (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


Handler = Callable[[int], dict[str, Any]]    # peer uid -> answer fields


class ControlServer:
    """One AF_UNIX listener on the running loop. ``handlers`` maps request names to callables
    run on the loop (so they see the IKE engine between two of its steps)."""

    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = Path(path)
        self.handlers = handlers
        self.refused = 0
        self._server: asyncio.base_events.Server | None = None
        self._sock: socket.socket | None = None

    async def start(self) -> ControlServer:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket() and _answers(self.path):
            raise ControlError(f"{self.path}: another daemon answers on it (same node name?)")
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()                      # a stale socket of a daemon that was killed
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
            sock.listen(8)
            sock.setblocking(False)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock,
                                                            limit=MAX_REQUEST)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                self.path.unlink()
            raise
        self._sock = sock
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            uid = peer_uid(writer.get_extra_info("socket"))
            # The request is read before any answer, also from a peer that will be refused:
            # closing with its bytes unread would reset the connection before it reads why.
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), REQUEST_TIMEOUT_S)
                req = json.loads(line)
                name = req["request"]
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ValueError, KeyError, TypeError):
                name = None
            if uid not in (0, os.getuid()):
                self.refused += 1
                log.warning("control socket: refused a client with uid %d (only root or uid %d)",
                            uid, os.getuid())
                await self._answer(writer, {"ok": False, "error": f"permission denied: uid {uid} "
                                            "is neither root nor the daemon's user"})
                return
            if name is None:
                await self._answer(writer, {"ok": False, "error": "bad request: expected one "
                                            'line {"request": NAME}'})
                return
            handler = self.handlers.get(name) if isinstance(name, str) else None
            if handler is None:
                await self._answer(writer, {"ok": False, "error": f"unknown request {name!r}; "
                                            f"known: {', '.join(sorted(self.handlers))}"})
                return
            try:
                out = handler(uid)
            except Exception as e:  # a failed request is an answer, not a crash
                log.debug("control request %s failed", name, exc_info=True)
                out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            await self._answer(writer, {"ok": True, **out} if "ok" not in out else out)
        except (ConnectionError, OSError) as e:
            log.debug("control client went away: %s", e)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        writer.write(json.dumps(obj).encode() + b"\n")
        await writer.drain()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(OSError):
            self.path.unlink()


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def request(path: Path, name: str, timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to the daemon and return its answer (``ok`` true). ControlError with a
    message fit for the command line otherwise."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except FileNotFoundError:
            raise ControlError(f"no control socket at {path}: is `xtransit run` running for "
                               "this node?") from None
        except PermissionError:
            raise ControlError(f"{path}: permission denied (run as root or as the daemon's "
                               "user)") from None
        except ConnectionRefusedError:
            raise ControlError(f"{path}: nothing listens on it (the daemon is not running)") \
                from None
        s.sendall(json.dumps({"request": name}).encode() + b"\n")
        buf = bytearray()
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except TimeoutError:
        raise ControlError(f"{path}: no answer within {timeout:g} s") from None
    except OSError as e:
        raise ControlError(f"{path}: {e.strerror or e}") from None
    finally:
        s.close()
    try:
        answer = json.loads(bytes(buf))
    except ValueError:
        raise ControlError(f"{path}: the daemon closed the connection without an answer") \
            from None
    if not isinstance(answer, dict) or not answer.get("ok"):
        err = answer.get("error") if isinstance(answer, dict) else None
        raise ControlError(f"the daemon refused: {err or 'no reason given'}")
    return answer


def for_edge(edge: Any, run_root: Path) -> ControlServer:
    """The control server of ``pipeline.run.Edge``: its requests and where it listens."""
    from .run import event

    def export_keys(uid: int) -> dict[str, Any]:
        if edge.engine is None:
            return {"ok": False, "error": "this node has no IPsec tunnels: no keys to export"}
        from .ike.export import wireshark_esp_table, wireshark_ikev2_table
        ike = wireshark_ikev2_table(edge.engine)
        esp = wireshark_esp_table(edge.engine)
        event("keys_exported", level=logging.WARNING, uid=uid,
              ike_sas=len(ike.splitlines()), esp_sas=len(esp.splitlines()))
        return {"ikev2_decryption_table": ike, "esp_sa": esp}

    return ControlServer(socket_path(run_root, edge.config.node.name),
                         {"export-keys": export_keys})


__all__ = ["ControlError", "ControlServer", "for_edge", "peer_uid", "request", "socket_path"]
