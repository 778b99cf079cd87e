"""The request handler: one instance per connection."""

from __future__ import annotations

import hmac
import http.server
import socket
import ssl
import urllib.parse

from ..version import __version__
from ..errors import RequestError, ServiceError
from ..jobs import Job
from ..service.exchange import JSONResponse, Request, Response, StreamResponse, api_key_of
from ..api.common import error_body, error_response, unauthorized
from .router import Route
from .server import KoboldLiteServer


class RequestHandler(http.server.BaseHTTPRequestHandler):
    """One instance per connection: TLS handshake, then keep-alive requests."""

    protocol_version = "HTTP/1.1"
    server_version = f"KoboldLite/{__version__}"
    sys_version = ""
    server: "KoboldLiteServer"

    def setup(self):
        """Handshake here, in the connection's own thread, with a deadline: never on the accepting thread."""
        # Small writes (headers, then body; one SSE event per token) must leave at once, not wait
        # for Nagle's algorithm to meet the client's delayed ACK (40 ms a request).
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        config = self.server.app.config
        self.request.settimeout(config.handshake_timeout)
        if isinstance(self.request, ssl.SSLSocket):
            deadline = self.server.reaper.arm(self.request, config.handshake_timeout)
            try:
                self.request.do_handshake()
            finally:
                self.server.reaper.disarm(deadline)
        self.timeout = config.idle_timeout
        super().setup()
        self._watched_job: Job | None = None
        self._request_deadline: int | None = None
        self._cors: dict[str, str] = {}

    def handle_one_request(self):
        """Wait idly for a request's first byte; from there the whole request has a deadline."""
        try:
            if not self.rfile.peek(1):
                self.close_connection = True
                return
        except (OSError, ValueError):      # idle timeout, reset, or shut by the reaper
            self.close_connection = True
            return
        self._request_deadline = self.server.reaper.arm(self.connection, self.server.app.config.request_timeout)
        self._cors = {}      # each answer's own: never the last request's on a kept-alive connection
        try:
            super().handle_one_request()
        finally:
            self._request_read()

    def _request_read(self):
        self.server.reaper.disarm(self._request_deadline)
        self._request_deadline = None

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a bad request line, oversize headers...) as JSON, like ours."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"   # errors found before the version is read still get a status line
        if code == 505:
            code = 400    # a bogus HTTP version is the client's error, like any other bad input
        text = message or self.responses.get(code, ("error",))[0]
        error = RequestError(text, code, "invalid_request" if code < 500 else "server_error")
        self._send(JSONResponse(error_body("kobold", error),
                                code))

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format, *args):
        self.server.app.log(f"{self.address_string()} {format % args}")

    def log_request(self, code="-", size="-"):
        if self.server.app.config.debug:
            super().log_request(code, size)

    def do_OPTIONS(self):
        """A CORS preflight: answered for pages that may make the request, refused (403) for the others."""
        self._request_read()
        self._body_unread = self._declared_length()
        try:
            access = self.server.access
            access.check_host(self.headers.get("Host"))
            self._cors = access.cors_headers(
                self.headers.get("Origin"), self.headers.get("Host"), key_ok=False, protected=True,
                preflight=True, private_network=self.headers.get("Access-Control-Request-Private-Network") == "true",
                requested_headers=self.headers.get("Access-Control-Request-Headers", ""))
            response = Response(204, b"", "text/plain")
        except RequestError as e:
            self._cors = e.headers
            response = JSONResponse(error_body(self.server.router.style_of(self._target()[0]), e), e.status)
        self._send(response)
        if self._body_unread:
            self._linger()

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_HEAD(self):
        self._dispatch("HEAD")

    # -- dispatch ------------------------------------------------------------

    def _target(self) -> tuple[str, str]:
        """The request's path (without a trailing slash) and query string."""
        url = urllib.parse.urlsplit(self.path)
        return url.path.rstrip("/") or "/", url.query

    def _dispatch(self, method: str):
        """Match the route, check the request against it, run its handler, send what it returns. An error answers
        in the shape of the route's API (its style, from the route table; for a path no route has, the router's
        guess from the table)."""
        app = self.server.app
        path, query_string = self._target()
        route: Route | None = None
        request = None
        self._body_unread = self._declared_length()
        try:
            self.server.access.check_host(self.headers.get("Host"))
            try:
                route = self.server.router.match("GET" if method == "HEAD" else method, path)
            except RequestError:          # a 404 or 405, readable by the pages that may call
                self._cors = self.server.access.cors_headers(self.headers.get("Origin"), self.headers.get("Host"),
                                                             False, False)
                raise
            authorized, key_ok = self._authorized(route)
            self._cors = self.server.access.cors_headers(self.headers.get("Origin"), self.headers.get("Host"),
                                                         key_ok, route.protected)
            body = self._read_body()
            self._request_read()
            if route.protected and not authorized:
                raise unauthorized(route.style)
            if route.needs_model and not app.ready.is_set():
                raise RequestError("the model is still loading", status=503, kind="service_unavailable")
            query = dict(urllib.parse.parse_qsl(query_string))
            request = Request(app, method, path, query, self.headers, body, authorized,
                              client=self.client_address[0], watch_hangup=self.watch_hangup, style=route.style)
            response = route.handler(app, request)
            if request.ignored:
                response.headers["X-KoboldLite-Ignored"] = ",".join(request.ignored)
        except Exception as e:
            if request is not None and request.job is not None:
                request.job.cancel()
            response = self._error_response(e, route.style if route else self.server.router.style_of(path),
                                            f"{method} {path}")
        try:
            if isinstance(response, StreamResponse):
                self._send_stream(response)
            else:
                self._send(response, head_only=method == "HEAD")
                if self._body_unread:
                    self._linger()
        finally:
            self._unwatch_hangup()
            if request is not None:
                request.release()

    def _error_response(self, error: Exception, style: str, what: str) -> Response:
        if isinstance(error, (RequestError, ServiceError)):
            return error_response(style, error)
        # A bug must cost one request, never the server.
        self.server.app.log(f"internal error on {what}: {type(error).__name__}: {error}")
        return error_response(style, RequestError("internal server error", 500, "server_error"))

    LINGER_BYTES = 64 * 1024 * 1024     # at most this much of an unread body is read and thrown away...
    LINGER_SECONDS = 10.0               # ...within this long

    def _linger(self):
        """An answer sent before the body was read (413, 411, 404...): read and discard the rest of the
        body, up to a bound and a deadline, then close. Closing at once would reset the connection under a
        client still writing its body, and clients that write first (Python's http.client, curl) would
        never see the answer (nginx calls this a lingering close)."""
        self.close_connection = True
        try:
            self.wfile.flush()
            # The answer is complete: end our side now, so a client that reads to the end sees it at once.
            socket.socket.shutdown(self.connection, socket.SHUT_WR)
        except OSError:
            return
        deadline = self.server.reaper.arm(self.connection, self.LINGER_SECONDS)
        try:
            left = min(self._body_unread, self.LINGER_BYTES)
            while left > 0:
                data = self.rfile.read1(min(left, 1 << 16))
                if not data:
                    break
                left -= len(data)
        except (OSError, ValueError):
            pass
        finally:
            self.server.reaper.disarm(deadline)

    def _declared_length(self) -> int:
        """The Content-Length the client announced, as far as it can be believed; 0 if none."""
        try:
            return max(0, int(self.headers.get("Content-Length") or 0))
        except ValueError:
            return 0

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise RequestError("chunked request bodies are not supported; send Content-Length", status=411,
                               kind="length_required")
        length = self.headers.get("Content-Length")
        if not length:
            return b""
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise RequestError("bad Content-Length header") from None
        if n > self.server.app.config.max_body_bytes:
            self.close_connection = True
            raise RequestError(f"the request body is larger than {self.server.app.config.max_body_bytes} bytes",
                               status=413, kind="request_too_large")
        data = self.rfile.read(n)
        self._body_unread = 0
        if len(data) < n:
            self.close_connection = True
            raise RequestError("the request body ended early")
        return data

    def _authorized(self, route: Route) -> tuple[bool, bool]:
        """(authorized, key_ok): whether the request may use what the password guards, and whether it
        carried the right password. A wrong one counts against its address (AuthThrottle); an address over
        the limit is answered 429 for anything that needs or offers a password, whatever it offers."""
        config = self.server.app.config
        password = config.adminpassword if route.admin and config.adminpassword else config.password
        if not password:
            return True, False
        offered = api_key_of(self.headers)
        if not offered and not route.protected:
            return False, False
        address = self.client_address[0]
        wait = self.server.auth_throttle.retry_after(address)
        if wait:      # the page learns the same whatever it offered: its key is not looked at
            self._cors = self.server.access.cors_headers(self.headers.get("Origin"), self.headers.get("Host"),
                                                         False, route.protected)
            raise RequestError(f"too many wrong passwords from this address: try again in {wait} s", status=429,
                               kind="rate_limit_error", headers={"Retry-After": str(wait)})
        if not offered:
            return False, False
        ok = hmac.compare_digest(offered.encode(), password.encode())
        if not ok:
            self.server.auth_throttle.failed(address)
        return ok, ok

    # -- hang-ups ------------------------------------------------------------

    def watch_hangup(self, job: Job):
        self._watched_job = job
        self.server.generation_started()
        self.server.hangups.watch(self.connection, job.cancel)

    def _unwatch_hangup(self):
        if self._watched_job is not None:
            self.server.hangups.unwatch(self.connection)
            self._watched_job = None
            self.server.generation_answered()

    # -- writing -------------------------------------------------------------

    def _start_response(self, response: Response):
        self.send_response(response.status)
        for k, v in self._cors.items():
            self.send_header(k, v)
        self.send_header("X-KoboldLite-Instance", self.server.app.instance_id)
        self.send_header("Content-Type", response.content_type)
        for k, v in response.headers.items():
            self.send_header(k, v)

    def _send(self, response: Response, head_only: bool = False):
        self._start_response(response)
        self.send_header("Content-Length", str(len(response.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head_only and response.body:
            self.wfile.write(response.body)

    def _send_stream(self, response: StreamResponse):
        self.close_connection = True
        self._start_response(response)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for chunk in response.chunks:
                self.wfile.write(chunk)
        except (OSError, ValueError):
            pass                         # the client went away: its generation is cancelled below
        finally:
            if response.job is not None and not response.job.buffer.done:
                response.job.cancel()
