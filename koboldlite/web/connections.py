"""Connections watched: clients that hang up, requests that overstay their deadline."""

from __future__ import annotations

import select
import socket
import threading
import time
from typing import Callable


class HangupWatcher:
    """One thread that notices when the client of a running generation hangs up.

    It waits in epoll for peer hang-ups (EPOLLRDHUP) on the sockets of
    in-flight generations and cancels their jobs at once, so a client that
    leaves never keeps the model busy. Where epoll is missing it watches for
    readability and peeks for end-of-file instead.
    """

    def __init__(self, use_epoll: bool | None = None):
        self._lock = threading.Lock()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._use_epoll = hasattr(select, "epoll") if use_epoll is None else use_epoll
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        if self._use_epoll:
            self._epoll = select.epoll()
            self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        self._socks: dict[int, socket.socket] = {}
        threading.Thread(target=self._run, name="hangup-watcher", daemon=True).start()

    def watch(self, sock: socket.socket, on_hangup: Callable[[], None]):
        fd = sock.fileno()
        with self._lock:
            self._callbacks[fd] = on_hangup
            self._socks[fd] = sock
            if self._use_epoll:
                self._epoll.register(fd, select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR)
        if not self._use_epoll:
            self._wake_w.send(b"x")

    def unwatch(self, sock: socket.socket):
        fd = sock.fileno()
        with self._lock:
            if self._callbacks.pop(fd, None) is not None:
                self._socks.pop(fd, None)
                if self._use_epoll:
                    try:
                        self._epoll.unregister(fd)
                    except OSError:
                        pass

    def _fire(self, fd: int, sock: socket.socket):
        """The client of `sock` hung up: cancel its job, unless `sock` is no longer the one watched under this
        descriptor. An event is reported by descriptor, and between the wait that saw it and this call the
        connection may have ended another way and a new one been given the same number: firing then would
        cancel the new client's job (a stream answered with no text under load, seen in the mixed-load soak)."""
        with self._lock:
            if self._socks.get(fd) is not sock:
                return
            callback = self._callbacks.pop(fd, None)
            self._socks.pop(fd, None)
            if callback is not None and self._use_epoll:
                try:
                    self._epoll.unregister(fd)
                except OSError:
                    pass
        if callback is not None:
            callback()

    def _run(self):
        while True:
            # The sockets watched as the wait begins: an event is theirs only. One watched since is reported
            # again by the next wait (epoll's readiness is level-triggered) and fired then.
            with self._lock:
                socks = dict(self._socks)
            if self._use_epoll:
                events = self._epoll.poll()
                for fd, _ in events:
                    if fd != self._wake_r.fileno() and fd in socks:
                        self._fire(fd, socks[fd])
            else:
                readable = set(select.select([self._wake_r, *socks.values()], [], [])[0])
                if self._wake_r in readable:
                    try:
                        self._wake_r.recv(4096)
                    except OSError:
                        pass
                for fd, s in socks.items():
                    if s not in readable:
                        continue
                    if _peer_closed(s):
                        self._fire(fd, s)
                    else:
                        # Data, not a hang-up: stop watching, or select() would report it forever.
                        with self._lock:
                            if self._socks.get(fd) is s:
                                self._socks.pop(fd, None)


def _peer_closed(sock: socket.socket) -> bool:
    """Peek under any TLS layer: end-of-file means the client has gone."""
    raw = socket.socket(sock.family, sock.type, fileno=sock.fileno())
    try:
        return raw.recv(1, socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)) == b""
    except (BlockingIOError, InterruptedError, socket.timeout):
        return False
    except OSError:
        return True
    finally:
        raw.detach()     # the handle belongs to the connection


class DeadlineReaper:
    """Shuts connections that overstay a deadline.

    Socket timeouts apply to each read, so a client that trickles one byte a
    second (slowloris) never trips them; a handshake, or a request's line,
    headers and body, must instead finish by a deadline, or the socket is
    shut and its thread's blocked read ends at once.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._deadlines: dict[int, tuple[float, socket.socket]] = {}
        self._tokens = iter(range(1, 1 << 62))
        threading.Thread(target=self._run, name="deadline-reaper", daemon=True).start()

    def arm(self, sock: socket.socket, seconds: float) -> int:
        with self._cond:
            token = next(self._tokens)
            self._deadlines[token] = (time.monotonic() + seconds, sock)
            self._cond.notify()
            return token

    def disarm(self, token: int | None):
        if token is not None:
            with self._cond:
                self._deadlines.pop(token, None)

    def _run(self):
        with self._cond:
            while True:
                if not self._deadlines:
                    self._cond.wait()
                    continue
                token, (deadline, sock) = min(self._deadlines.items(), key=lambda item: item[1][0])
                left = deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)      # woken early when a nearer deadline is armed
                    continue
                del self._deadlines[token]
                try:
                    # The plain socket's shutdown: SSLSocket.shutdown would drop its TLS state
                    # under the feet of the thread still using it.
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass
