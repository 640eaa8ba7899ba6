"""Thin asyncio UDP layer for the IKE core: ports 500 and 4500 (RFC 7296 2.23, RFC 3948).

On port 4500 IKE messages carry the 4-byte zero non-ESP marker, which is stripped before the
core sees them and added to what goes out from 4500; a single 0xFF byte is a NAT-keepalive;
anything else there is ESP-in-UDP and goes to ``esp_handler`` (the data path) if one is given.
Some peers send IKE_SA_INIT to 4500 without the marker (strongSwan with remote_port=4500 from
port 500); such a datagram is recognised by a full IKE_SA_INIT header check and accepted.
The core is driven from one event loop, so it needs no locking; timers run every ``tick``.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable

from .constants import IKE_PORT, NATT_PORT, NON_ESP_MARKER, ExchangeType
from .engine import Datagram, IkeEngine

log = logging.getLogger(__name__)

IP_FREEBIND = 15  # linux/in.h: bind before the address is configured


def looks_like_ike_sa_init(data: bytes) -> bool:
    """A marker-less IKE_SA_INIT request on 4500: header fields all consistent."""
    if len(data) < 28:
        return False
    version, exchange, flags = data[17], data[18], data[19]
    length = struct.unpack_from("!I", data, 24)[0]
    return (version >> 4 == 2 and exchange == ExchangeType.IKE_SA_INIT and flags & 0x08
            and length == len(data) and data[8:16] == bytes(8) and data[20:24] == bytes(4))


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, server: IkeServer, local: tuple[str, int]):
        self.server = server
        self.local = local
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data: bytes, addr):
        self.server.received(data, self.local, (addr[0], addr[1]))

    def error_received(self, exc):
        self.server.stats["socket_error"] += 1
        log.debug("socket error on %s: %s", self.local, exc)


class IkeServer:
    def __init__(self, engine: IkeEngine, addresses: list[str], *,
                 ports: tuple[int, int] = (IKE_PORT, NATT_PORT), tick: float = 0.5,
                 clock: Callable[[], float] = time.monotonic,
                 esp_handler: Callable[[bytes, tuple[str, int], tuple[str, int]], None] | None = None,
                 socket_factory: Callable[[str, int], socket.socket] | None = None):
        self.engine = engine
        self.addresses = addresses
        self.ike_port, self.natt_port = ports
        self.tick_interval = tick
        self.clock = clock
        self.esp_handler = esp_handler
        self.socket_factory = socket_factory or self.make_socket
        self.endpoints: dict[tuple[str, int], _Endpoint] = {}
        self.stats = engine.stats
        # Peers that talk IKE to our 4500 without the marker (the quirk above) get answers
        # without it too: such a peer sends from its port 500 socket, which expects none.
        self._no_marker: set[tuple[str, int]] = set()
        self._ticker: asyncio.Task | None = None

    @staticmethod
    def make_socket(addr: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        sock.bind((addr, port))
        sock.setblocking(False)
        return sock

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for addr in self.addresses:
            for port in (self.ike_port, self.natt_port):
                sock = self.socket_factory(addr, port)
                local = (addr, port)
                _, proto = await loop.create_datagram_endpoint(
                    lambda local=local: _Endpoint(self, local), sock=sock)
                self.endpoints[local] = proto
        self._ticker = asyncio.create_task(self._tick_loop())
        log.info("IKE listening on %s", ", ".join(f"{a}:{p}" for a, p in self.endpoints))

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for ep in self.endpoints.values():
            if ep.transport is not None:
                ep.transport.close()
        self.endpoints.clear()

    def received(self, data: bytes, local: tuple[str, int], remote: tuple[str, int]) -> None:
        if local[1] == self.natt_port:
            if data[:4] == NON_ESP_MARKER:
                data = data[4:]
                self._no_marker.discard(remote)
            elif data == b"\xff":
                self.stats["natt_keepalive"] += 1
                return
            elif looks_like_ike_sa_init(data):
                self.stats["ike_without_marker"] += 1
                self._no_marker.add(remote)
            else:
                self.stats["esp_in_udp"] += 1
                if self.esp_handler is not None:
                    self.esp_handler(data, local, remote)
                return
        self.send(self.engine.handle(data, local, remote, self.clock()))

    def send(self, datagrams: list[Datagram]) -> None:
        for d in datagrams:
            ep = self.endpoints.get(d.local)
            if ep is None:
                # The SA floated to an address/port we do not listen on: use our port there.
                ep = next((e for (a, p), e in self.endpoints.items() if p == d.local[1]), None)
            if ep is None or ep.transport is None:
                self.stats["send_no_socket"] += 1
                continue
            marker = d.local[1] == self.natt_port and d.remote not in self._no_marker
            data = NON_ESP_MARKER + d.data if marker else d.data
            ep.transport.sendto(data, d.remote)
            self.stats["datagrams_sent"] += 1

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval)
            self.send(self.engine.tick(self.clock()))
