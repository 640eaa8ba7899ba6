"""The UDP layer on real sockets in a namespace: ports 500/4500, non-ESP marker, keepalives, ESP."""
from __future__ import annotations

import asyncio
import socket
import threading

import pytest
from ike_peers import TUNNEL, profile

from pipeline.ike.engine import IkeEngine
from pipeline.ike.message import Message
from pipeline.ike.server import IkeServer, looks_like_ike_sa_init
from pipeline.ike.tunnels import TunnelDirectory
from pipeline.sa import RecordingSaInstaller

pytestmark = pytest.mark.netns
ADDR = "127.0.0.1"


@pytest.fixture
def served(lab):
    ns = lab.namespace("ikesrv")
    esp_seen = []
    engine = IkeEngine(TunnelDirectory([TUNNEL], "example.net"), RecordingSaInstaller())
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def factory(addr, port):
        with ns.enter():
            return IkeServer.make_socket(addr, port)

    server = IkeServer(engine, [ADDR], socket_factory=factory,
                       esp_handler=lambda data, local, remote: esp_seen.append((data, local)))
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(5)

    def client(port):
        with ns.enter():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((ADDR, port))
        s.settimeout(2)
        return s

    yield engine, esp_seen, client
    asyncio.run_coroutine_threadsafe(server.close(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def _init_request() -> bytes:
    from pipeline.ike.engine import IkeEngine as E
    from pipeline.sa import RecordingSaInstaller as R

    (d,) = E(TunnelDirectory([], "example.net"), R()).initiate(
        profile(), (ADDR, 500), (ADDR, 500), 0.0)
    return d.data


def test_ports_markers_keepalive_and_esp(served):
    engine, esp_seen, client = served
    req = _init_request()
    assert looks_like_ike_sa_init(req) and not looks_like_ike_sa_init(b"\x01\x02\x03\x04" + req[4:60])
    c500 = client(500 + 10000)
    c500.sendto(req, (ADDR, 500))  # port 500: no marker either way
    data, src = c500.recvfrom(65535)
    assert src == (ADDR, 500) and Message.parse(data).spi_i == req[:8]
    c4500 = client(4500 + 10000)
    req2 = _init_request()
    c4500.sendto(b"\0\0\0\0" + req2, (ADDR, 4500))  # port 4500 with the marker: answered with it
    data, src = c4500.recvfrom(65535)
    assert src == (ADDR, 4500) and data[:4] == b"\0\0\0\0"
    assert Message.parse(data[4:]).spi_i == req2[:8]
    req3 = _init_request()
    c500.sendto(req3, (ADDR, 4500))  # the strongSwan quirk: no marker to 4500, none back
    data, _ = c500.recvfrom(65535)
    assert Message.parse(data).spi_i == req3[:8]
    c4500.sendto(b"\xff", (ADDR, 4500))                      # NAT-T keepalive
    esp = b"\x00\x00\x10\x01" + b"\x00\x00\x00\x01" + bytes(40)
    c4500.sendto(esp, (ADDR, 4500))                          # ESP in UDP: to the data path
    for _ in range(100):
        if esp_seen:
            break
        threading.Event().wait(0.02)
    assert esp_seen == [(esp, (ADDR, 4500))]
    assert engine.stats["natt_keepalive"] == 1 and engine.stats["esp_in_udp"] == 1
    assert engine.stats["ike_without_marker"] == 1 and engine.stats["ike_sa_init_answered"] == 3
