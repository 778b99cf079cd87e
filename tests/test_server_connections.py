"""The server's own bookkeeping of connections: every place a connection takes (the cap on connections, the cap per
client address) is given back, also when the connection's thread could not be started."""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace

import pytest

from koboldlite.config import Config
from koboldlite.web.router import Router
from koboldlite.web.server import KoboldLiteServer
from koboldlite.web.handler import RequestHandler


@pytest.fixture
def server():
    config = Config(max_connections=4, max_connections_per_client=2)
    app = SimpleNamespace(config=config, log=lambda line: None, instance_id="test")
    s = KoboldLiteServer(("127.0.0.1", 0), RequestHandler, app, Router(), None)
    yield s
    s.server_close()


def places_left(s: KoboldLiteServer) -> int:
    """How many more connections the cap admits (the semaphore's count, taken and given back)."""
    n = 0
    while s._connections.acquire(blocking=False):
        n += 1
    for _ in range(n):
        s._connections.release()
    return n


def test_a_thread_that_cannot_start_gives_its_places_back(server, monkeypatch):
    a, b = socket.socketpair()
    refused = threading.Thread.start

    def no_thread(self):
        raise RuntimeError("can't start new thread")
    monkeypatch.setattr(threading.Thread, "start", no_thread)
    with pytest.raises(RuntimeError):
        server.process_request(a, ("192.0.2.7", 5000))
    monkeypatch.setattr(threading.Thread, "start", refused)
    assert places_left(server) == 4 and not server._per_client
    a.close()
    b.close()


def test_places_are_taken_per_client_and_given_back(server):
    """The cap per client address holds (the third connection from one address is refused at once), and a
    connection's end gives its places back."""
    pairs = [socket.socketpair() for _ in range(3)]
    done = threading.Event()
    finished = []

    def finish_request(request, client_address):
        finished.append(threading.current_thread())
        done.wait(10)
    server.finish_request = finish_request
    for (mine, _), port in zip(pairs, (1, 2, 3)):
        server.process_request(mine, ("192.0.2.8", port))
    assert server._per_client["192.0.2.8"] == 2 and places_left(server) == 2
    assert pairs[2][1].recv(1) == b""                  # the third was shut at once
    done.set()
    for t in finished:
        t.join(10)
    assert not server._per_client and places_left(server) == 4 and len(finished) == 2
    for a, b in pairs:
        a.close()
        b.close()
