"""The server: ThreadingHTTPServer with TLS around its listening socket and caps on connections."""

from __future__ import annotations

import collections
import http.server
import ipaddress
import selectors
import socket
import ssl
import sys
import threading

from ..service.app import App
from .router import Router
from .connections import DeadlineReaper, HangupWatcher
from .access import AccessPolicy, AuthThrottle


class KoboldLiteServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with TLS around the listening socket and a cap on connections.

    The listening socket is wrapped with do_handshake_on_connect=False, so
    accept() never handshakes; each connection's thread does (RequestHandler.setup).
    """

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler_class: type, app: App, router: Router,
                 tls: ssl.SSLContext | None = None):
        """`handler_class` is instantiated per connection, as socketserver does (RequestHandler)."""
        self.app = app
        self.router = router
        self.tls = tls
        self.hangups = HangupWatcher()
        self.reaper = DeadlineReaper()
        self.access = AccessPolicy(app.config.hostname, app.config.cors_origin, bool(app.config.password))
        self.auth_throttle = AuthThrottle(app.log)
        self._connections = threading.BoundedSemaphore(app.config.max_connections)
        self._per_client: collections.Counter[str] = collections.Counter()   # open connections per address
        self._per_client_lock = threading.Lock()
        self._answering = 0                  # generation responses still being written
        self._answering_cond = threading.Condition()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self._wake_up, self._waker = socket.socketpair()   # shutdown() writes a byte: the idle loop needs no timer
        self._stopping = False
        self._stopped = threading.Event()
        super().__init__(address, handler_class)

    def serve_forever(self, poll_interval: float | None = None):
        """socketserver's loop, woken by a connection or by shutdown(), never by a timer: socketserver's own
        looks for a shutdown twice a second, and an idle server should use no CPU at all (issue 36). Run on the
        http-accept thread; `poll_interval` is not used."""
        self._stopped.clear()
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self, selectors.EVENT_READ)
                selector.register(self._wake_up, selectors.EVENT_READ)
                while not self._stopping:
                    ready = selector.select()
                    if not self._stopping and any(key.fileobj is self for key, _ in ready):
                        self._handle_request_noblock()
                    self.service_actions()
        finally:
            self._stopped.set()

    def shutdown(self):
        """Stop serve_forever() and wait until it has; called from another thread (main.shut_down)."""
        self._stopping = True
        self._waker.send(b"x")
        self._stopped.wait()

    def server_close(self):
        super().server_close()
        self._wake_up.close()
        self._waker.close()

    def server_bind(self):
        super().server_bind()
        if self.tls is not None:
            self.socket = self.tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def process_request(self, request, client_address):
        with self._per_client_lock:
            mine = self._per_client[client_address[0]] < self.app.config.max_connections_per_client
            if mine:
                self._per_client[client_address[0]] += 1
        if not mine or not self._connections.acquire(blocking=False):
            if mine:
                self._client_left(client_address[0])
            self.shutdown_request(request)     # over a cap: refuse rather than queue threads
            return
        try:
            super().process_request(request, client_address)     # starts the connection's thread
        except BaseException:
            # No thread will end this connection (the system has none to give): its place is given back here,
            # and socketserver's caller closes the socket.
            self._connections.release()
            self._client_left(client_address[0])
            raise

    def process_request_thread(self, request, client_address):
        # ThreadingMixIn's steps, but the client's place is given back before its socket closes: a
        # client that has seen its connection end may connect again at once.
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self._connections.release()
            self._client_left(client_address[0])
            self.shutdown_request(request)

    def _client_left(self, address: str):
        with self._per_client_lock:
            self._per_client[address] -= 1
            if self._per_client[address] <= 0:
                del self._per_client[address]

    def generation_started(self):
        with self._answering_cond:
            self._answering += 1

    def generation_answered(self):
        with self._answering_cond:
            self._answering -= 1
            self._answering_cond.notify_all()

    def wait_answers_written(self, timeout: float) -> bool:
        """At shutdown: let aborted streams write their last event before the process ends."""
        with self._answering_cond:
            return self._answering_cond.wait_for(lambda: self._answering == 0, timeout)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ssl.SSLError, ConnectionError, TimeoutError, socket.timeout)):
            return   # failed handshakes, resets and idle clients are routine
        self.app.log(f"error on connection from {client_address[0]}: {type(exc).__name__}: {exc}")

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def served_urls(server: KoboldLiteServer, host: str) -> list[str]:
    port = server.server_address[1]
    scheme = server.scheme
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        unspecified = False
    if not unspecified:
        shown = f"[{host}]" if ":" in host else host
        return [f"{scheme}://{shown}:{port}"]
    urls = [f"{scheme}://{'[::1]' if host == '::' else '127.0.0.1'}:{port}"]
    addresses = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            addr = info[4][0]
            if not ipaddress.ip_address(addr.split("%")[0]).is_loopback:
                addresses.add(addr)
    except OSError:
        pass
    for addr in sorted(addresses):
        if ":" in addr:
            if host == "::":
                urls.append(f"{scheme}://[{addr}]:{port}")
        else:
            urls.append(f"{scheme}://{addr}:{port}")
    return urls
