"""The rest of koboldlite.py, being split into the modules below it."""

from __future__ import annotations

import collections
import dataclasses
import errno
import gzip
import hashlib
import hmac
import http.server
import ipaddress
import math
import os
import re
import select
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.parse
import webbrowser
from typing import Callable

from .paths import program_folder
from .version import __version__
from .errors import ConfigError, ModelLoadError, RequestError
from .model_files import is_model_url
from .config import Config, load_config, make_tls_context, normalized_origin
from .desktop import double_click_arguments, is_double_click_start, keep_window_open
from .jobs import Job
from .engine.llama_model import LlamaModel
from .service.downloads import ConsoleProgress, DownloadError, ModelDownload
from .service.app import App
from .service.exchange import JSONResponse, Request, Response, StreamResponse
from .api.common import error_body, error_response, unauthorized
from .api.kobold import (
    kobold_abort, kobold_check, kobold_detokenize, kobold_extra_version, kobold_generate, kobold_generate_stream,
    kobold_info_version, kobold_json_to_grammar, kobold_last_logprobs, kobold_max_context_length, kobold_max_length,
    kobold_model, kobold_perf, kobold_preloadstory, kobold_tokencount, kobold_true_max_context_length, sd_models
)
from .api.openai import openai_chat_completions, openai_completions, openai_embeddings, openai_models
from .api.ollama import (
    ollama_chat, ollama_embed, ollama_embeddings_legacy, ollama_generate, ollama_ps, ollama_show, ollama_tags,
    ollama_version
)
from .api.anthropic import anthropic_count_tokens, anthropic_messages_route
from .api.responses import responses_by_id, responses_create, responses_input_tokens
from .api.admin import admin_list_options, admin_reload_config, ollama_delete, ollama_pull, router_load, router_unload
from .api.slots import (
    admin_check_state, admin_clear_state, admin_load_state, admin_save_state, slots_action, slots_list
)
from .api.ops import apply_template, detokenize, health, health_live, metrics, props, tokenize


@dataclasses.dataclass
class Route:
    handler: Callable[[App, "Request"], Response]
    protected: bool = False     # needs the password when one is set
    style: str = "kobold"       # error body shape
    needs_model: bool = True
    admin: bool = False         # KoboldCpp's admin API: --adminpassword, when set, instead of --password


class StaticFiles:
    """The files of embedded_ui/, read once at start. Only these exact paths are ever served,
    so no request path (`..`, encoded dots, absolute paths) can reach any other file."""

    TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
             ".js": "text/javascript; charset=utf-8", ".json": "application/json", ".svg": "image/svg+xml",
             ".png": "image/png", ".ico": "image/x-icon", ".webmanifest": "application/manifest+json"}
    COMPRESSIBLE = (".html", ".css", ".js", ".json", ".svg", ".webmanifest")
    HEADERS = {"Cache-Control": "no-cache", "Vary": "Accept-Encoding", "X-Content-Type-Options": "nosniff",
               "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                                          "base-uri 'none'; frame-ancestors 'none'"}

    def __init__(self, directory: str):
        self.files: dict[str, tuple[bytes, bytes | None, str, str]] = {}
        for root, _, names in os.walk(directory):
            for name in sorted(names):
                full = os.path.join(root, name)
                url = "/" + os.path.relpath(full, directory).replace(os.sep, "/")
                with open(full, "rb") as f:
                    data = f.read()
                ext = os.path.splitext(name)[1].lower()
                packed = gzip.compress(data, 9, mtime=0) if ext in self.COMPRESSIBLE else None
                etag = '"' + hashlib.sha256(data).hexdigest()[:20] + '"'
                self.files[url] = (data, packed, self.TYPES.get(ext, "application/octet-stream"), etag)
        if "/index.html" in self.files:
            self.files["/"] = self.files["/index.html"]
        if "/favicon.svg" in self.files:
            self.files["/favicon.ico"] = self.files["/favicon.svg"]   # asked for by browsers and clients anyway

    def route(self, path: str) -> "Route | None":
        return Route(self.serve, needs_model=False) if path in self.files else None

    def serve(self, app, req) -> Response:
        data, packed, content_type, etag = self.files[req.path]
        headers = {**self.HEADERS, "ETag": etag}
        if req.headers.get("If-None-Match") == etag:
            return Response(304, b"", content_type, headers)
        if packed is not None and "gzip" in req.headers.get("Accept-Encoding", ""):
            return Response(200, packed, content_type, {**headers, "Content-Encoding": "gzip"})
        return Response(200, data, content_type, headers)


UI_DIR = os.path.join(program_folder(), "embedded_ui")


class Router:
    """Exact paths to routes, per method; /api/latest/... is /api/v1/...; then, for GET, the fallback (the built-in
    page's files)."""

    def __init__(self, fallback: Callable[[str], "Route | None"] | None = None):
        self._routes: dict[tuple[str, str], Route] = {}
        self._prefixes: list[tuple[str, str, Route]] = []     # (method, prefix, route): /v1/responses/{id}
        self.fallback = fallback

    def add(self, methods: str, paths: str, handler, **kw):
        route = Route(handler, **kw)
        for path in paths.split():
            for method in methods.split():
                self._routes[(method, path)] = route

    def add_prefix(self, methods: str, prefixes: str, handler, **kw):
        """Paths that are the prefix and one more segment (an id), after the exact paths."""
        route = Route(handler, **kw)
        self._prefixes += [(method, prefix, route) for prefix in prefixes.split() for method in methods.split()]

    def match(self, method: str, path: str) -> Route:
        if path.startswith("/api/latest/"):
            path = "/api/v1/" + path[len("/api/latest/"):]
        route = self._routes.get((method, path))
        if route is None:
            route = next((r for m, prefix, r in self._prefixes if m == method and path.startswith(prefix)
                          and "/" not in path[len(prefix):] and path[len(prefix):]), None)
        if route is None and method == "GET" and self.fallback is not None:
            route = self.fallback(path)
        if route is None:
            if any(p == path for _, p in self._routes) or any(
                    path.startswith(prefix) and "/" not in path[len(prefix):] for _, prefix, _ in self._prefixes):
                raise RequestError(f"{method} is not allowed on {path}", status=405, kind="method_not_allowed")
            raise RequestError(f"no such endpoint: {path}", status=404, kind="not_found")
        return route


def build_router(static: StaticFiles | None = None) -> Router:
    r = Router(static.route if static is not None else None)
    r.add("GET", "/api/v1/model", kobold_model)
    r.add("GET", "/api/v1/info/version", kobold_info_version)
    r.add("GET", "/api/v1/config/max_length", kobold_max_length)
    r.add("GET", "/api/v1/config/max_context_length", kobold_max_context_length)
    r.add("POST", "/api/v1/generate", kobold_generate, protected=True)
    r.add("GET", "/api/extra/version", kobold_extra_version, needs_model=False)
    r.add("GET", "/api/extra/true_max_context_length", kobold_true_max_context_length)
    r.add("POST", "/api/extra/generate/stream", kobold_generate_stream, protected=True)
    r.add("GET POST", "/api/extra/generate/check", kobold_check, protected=True)
    r.add("POST", "/api/extra/abort", kobold_abort, protected=True)
    r.add("POST", "/api/extra/last_logprobs", kobold_last_logprobs, protected=True)
    r.add("POST", "/api/extra/embeddings", openai_embeddings, protected=True)       # KoboldCpp: OpenAI's shape
    r.add("POST", "/api/extra/tokencount /api/extra/tokenize", kobold_tokencount, protected=True)
    r.add("POST", "/api/extra/detokenize", kobold_detokenize, protected=True)
    r.add("POST", "/api/extra/json_to_grammar", kobold_json_to_grammar, protected=True)
    r.add("GET", "/sdapi/v1/sd-models", sd_models)
    r.add("GET", "/api/extra/perf", kobold_perf)
    r.add("GET", "/api/admin/list_options", admin_list_options, protected=True, admin=True)
    r.add("POST", "/api/admin/reload_config", admin_reload_config, protected=True, admin=True, needs_model=False)
    r.add("POST", "/api/admin/save_state", admin_save_state, protected=True, admin=True)
    r.add("POST", "/api/admin/load_state", admin_load_state, protected=True, admin=True)
    r.add("GET POST", "/api/admin/check_state", admin_check_state, protected=True, admin=True)
    r.add("POST", "/api/admin/clear_state", admin_clear_state, protected=True, admin=True)          # open, as KoboldCpp's: counts and timings, no text
    # Open, as KoboldCpp's: KoboldAI Lite reads it before it asks for the password.
    r.add("GET", "/api/extra/preloadstory", kobold_preloadstory)

    r.add("GET", "/v1/models /models", openai_models, style="openai")
    r.add("POST", "/v1/completions /completions", openai_completions, protected=True, style="openai")
    r.add("POST", "/v1/chat/completions /chat/completions", openai_chat_completions, protected=True,
          style="openai")
    r.add("POST", "/v1/embeddings /embeddings", openai_embeddings, protected=True, style="openai")
    r.add("POST", "/v1/responses /responses", responses_create, protected=True, style="openai")
    r.add("POST", "/v1/responses/input_tokens /responses/input_tokens", responses_input_tokens, protected=True,
          style="openai")
    r.add_prefix("GET DELETE", "/v1/responses/ /responses/", responses_by_id, protected=True, style="openai")

    r.add("POST", "/v1/messages /messages", anthropic_messages_route, protected=True, style="anthropic")
    r.add("POST", "/v1/messages/count_tokens /messages/count_tokens", anthropic_count_tokens, protected=True,
          style="anthropic")

    r.add("GET", "/api/tags", ollama_tags, style="ollama")     # open, as llama-server's: clients list models first
    r.add("GET", "/api/ps", ollama_ps, protected=True, style="ollama")
    r.add("GET", "/api/version", ollama_version, style="ollama", needs_model=False)
    r.add("POST", "/api/show", ollama_show, protected=True, style="ollama")
    r.add("POST", "/api/generate", ollama_generate, protected=True, style="ollama")
    r.add("POST", "/api/chat", ollama_chat, protected=True, style="ollama")
    r.add("POST", "/api/embed", ollama_embed, protected=True, style="ollama")
    r.add("POST", "/api/embeddings", ollama_embeddings_legacy, protected=True, style="ollama")
    r.add("POST", "/api/pull", ollama_pull, protected=True, style="ollama", needs_model=False)
    r.add("DELETE", "/api/delete", ollama_delete, protected=True, style="ollama")

    r.add("GET", "/health", health, needs_model=False, style="openai")
    r.add("GET", "/health/live", health_live, needs_model=False, style="openai")
    r.add("GET", "/props", props, protected=True, style="openai")
    r.add("POST", "/tokenize", tokenize, protected=True, style="openai")
    r.add("POST", "/detokenize", detokenize, protected=True, style="openai")
    r.add("POST", "/apply-template", apply_template, protected=True, style="openai")
    r.add("GET", "/metrics", metrics, protected=True, style="openai")
    r.add("POST", "/models/load", router_load, protected=True, style="openai")
    r.add("GET", "/slots", slots_list, protected=True, style="openai")
    r.add_prefix("POST", "/slots/", slots_action, protected=True, style="openai")
    r.add("POST", "/models/unload", router_unload, protected=True, style="openai")
    return r


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

    def _fire(self, fd: int):
        with self._lock:
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
            if self._use_epoll:
                events = self._epoll.poll()
                for fd, _ in events:
                    if fd == self._wake_r.fileno():
                        continue
                    self._fire(fd)
            else:
                with self._lock:
                    socks = list(self._socks.items())
                readable, _, _ = select.select([self._wake_r] + [s for _, s in socks], [], [])
                for s in readable:
                    if s is self._wake_r:
                        try:
                            self._wake_r.recv(4096)
                        except OSError:
                            pass
                        continue
                    if _peer_closed(s):
                        self._fire(s.fileno())
                    else:
                        # Data, not a hang-up: stop watching, or select() would report it forever.
                        with self._lock:
                            self._socks.pop(s.fileno(), None)


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


class AccessPolicy:
    """Which web pages may use the server behind their user's back: none but those the user runs.

    Two checks, as Ollama makes them. The Host check defeats DNS rebinding (a name that first resolves
    to an attacker's server, then to this machine, makes a page "same-origin" with us): a request naming
    this server by a DNS name that is not local, nor this machine's, nor given with --hostname, is refused;
    IP literals always pass, because no rebinding is possible with them. The origin check refuses a
    request whose `Origin` is not allowed before any work is done, simple requests (which browsers send
    without a preflight) included. Requests from programs carry no Origin and are not affected. With a
    password, the password is the gate: a page that has it may call from anywhere.
    """

    HOSTED_LITE = "https://lite.koboldai.net"       # KoboldCpp's hosted KoboldAI Lite calls local servers
    LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
    METHODS = "GET, POST, PUT, DELETE, OPTIONS"
    ALLOW_HEADERS = ("Authorization, Content-Type, genkey, X-Api-Key, Accept, anthropic-version, "
                     "anthropic-beta, anthropic-dangerous-direct-browser-access")
    HEADER_NAME = re.compile(r"[A-Za-z0-9-]{1,64}")
    EXPOSE = "X-KoboldLite-Instance, X-KoboldLite-Ignored, Retry-After"
    ANY_ORIGIN = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Methods": METHODS,
                  "Access-Control-Allow-Headers": ALLOW_HEADERS, "Access-Control-Max-Age": "86400",
                  "Access-Control-Expose-Headers": EXPOSE}

    def __init__(self, hostnames: list[str], cors_origins: list[str], password_set: bool):
        own = {socket.gethostname().lower().rstrip(".")}
        try:
            own.add(socket.getfqdn().lower().rstrip("."))
        except OSError:
            pass
        own |= {f"{name}.local" for name in list(own) if "." not in name}    # its mDNS name on a LAN
        self.any_host = "*" in hostnames
        self.names = own | {h.lower().rstrip(".") for h in hostnames if h != "*"}
        self.any_origin = "*" in cors_origins
        self.origins = {self.HOSTED_LITE} | {normalized_origin(o) for o in cors_origins if o != "*"}
        self.password_set = password_set

    @staticmethod
    def host_of(value: str) -> str | None:
        """The host of a Host header in lower case (brackets kept around IPv6), or None if malformed."""
        value = value.strip().lower()
        if value.startswith("["):
            end = value.find("]")
            host, rest = value[:end + 1], value[end + 1:]
            return host if end > 0 and (not rest or (rest[0] == ":" and rest[1:].isdigit())) else None
        host, colon, port = value.partition(":")
        return host if host and (not colon or port.isdigit()) else None

    @staticmethod
    def is_ip_literal(host: str) -> bool:
        try:
            ipaddress.ip_address(urllib.parse.unquote(host.strip("[]")))
            return True
        except ValueError:
            return False

    def check_host(self, header: str | None):
        """A 403 for a Host that names this server by a name it does not know (DNS rebinding). No Host at all
        (HTTP/1.0, health checkers) is not a browser's request and passes."""
        if header is None or self.any_host:
            return
        host = self.host_of(header)
        if host is not None and (self.is_ip_literal(host) or host.rstrip(".") in self.names
                                 or host.rstrip(".") == "localhost" or host.rstrip(".").endswith(".localhost")):
            return
        raise RequestError(f"this server is not reached by the name {header!r} (a web page may be trying DNS "
                           f"rebinding); to serve it under that name, start it with --hostname "
                           f"{(host or header).rstrip('.')}", status=403, kind="forbidden")

    def origin_allowed(self, origin: str, host_header: str | None) -> bool:
        normal = normalized_origin(origin)
        if normal is None:
            return False
        if normal in self.origins:
            return True
        scheme, _, netloc = normal.partition("://")
        if host_header is not None and netloc == normalized_origin(f"{scheme}://{host_header}").partition("://")[2]:
            return True          # the server's own page (scheme aside: a TLS-terminating balancer changes it)
        return scheme in ("http", "https") and self.host_of(netloc) in self.LOOPBACK_NAMES

    def cors_headers(self, origin: str | None, host_header: str | None, key_ok: bool, protected: bool,
                     preflight: bool = False, private_network: bool = False,
                     requested_headers: str = "") -> dict[str, str]:
        """The CORS headers of an answer to this request; a 403 for a page that may not make it."""
        if self.any_origin:
            return dict(self.ANY_ORIGIN)
        if origin is None:
            return {"Vary": "Origin"}
        # A preflight carries no password: with one set, the request that follows is gated by it.
        if self.origin_allowed(origin, host_header) or (self.password_set and (key_ok or preflight)):
            headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                       "Access-Control-Expose-Headers": self.EXPOSE}
            if preflight:
                # The SDKs add headers of their own (x-stainless-...): a page that may call may send them.
                extra = [h.strip() for h in requested_headers.split(",") if self.HEADER_NAME.fullmatch(h.strip())]
                headers.update({"Access-Control-Allow-Methods": self.METHODS,
                                "Access-Control-Allow-Headers": ", ".join([self.ALLOW_HEADERS, *extra[:32]]),
                                "Access-Control-Max-Age": "600"})
                if private_network:      # Chrome's Private Network Access preflight
                    headers["Access-Control-Allow-Private-Network"] = "true"
            return headers
        if self.password_set and protected:
            return {"Vary": "Origin"}    # the password check answers: 401, as without an Origin
        raise RequestError(f"web pages from {origin} may not use this server; to allow them, start it with "
                           f"--cors-origin {normalized_origin(origin) or origin}", status=403, kind="forbidden",
                           headers={"Vary": "Origin"})


class AuthThrottle:
    """Wrong passwords per client address: after LIMIT within WINDOW seconds, that address is answered 429
    until the oldest of them is WINDOW old, whatever it offers; other addresses are never slowed."""

    LIMIT = 10
    WINDOW = 60.0
    MAX_ADDRESSES = 4096         # bounded memory against a client that cycles addresses

    def __init__(self, log: Callable[[str], None]):
        self._log = log
        self._lock = threading.Lock()
        self._failures: dict[str, collections.deque] = {}

    def _recent(self, address: str, now: float) -> collections.deque | None:
        times = self._failures.get(address)
        while times and times[0] <= now - self.WINDOW:
            times.popleft()
        if times is not None and not times:
            del self._failures[address]
            return None
        return times

    def retry_after(self, address: str) -> int:
        """Seconds until this address may try again; 0 if it may now."""
        now = time.monotonic()
        with self._lock:
            times = self._recent(address, now)
            if times is None or len(times) < self.LIMIT:
                return 0
            return max(1, math.ceil(times[0] + self.WINDOW - now))

    def failed(self, address: str):
        now = time.monotonic()
        with self._lock:
            times = self._recent(address, now)
            if times is None:
                if len(self._failures) >= self.MAX_ADDRESSES:
                    del self._failures[next(iter(self._failures))]      # the longest-tracked address
                times = self._failures[address] = collections.deque()
            times.append(now)
            count = len(times)
        if count >= self.LIMIT:
            self._log(f"password: {count} wrong passwords from {address} within {self.WINDOW:.0f}s: refusing "
                      f"its requests for {math.ceil(self.WINDOW)}s at most (429)")
        else:
            self._log(f"password: wrong password from {address} ({count} of {self.LIMIT} allowed a minute)")


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
            response = JSONResponse(error_body("kobold", e), e.status)
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

    def _dispatch(self, method: str):
        app = self.server.app
        url = urllib.parse.urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        style = "anthropic" if path.startswith(("/v1/messages", "/messages")) else \
            "openai" if path.startswith(("/v1/", "/responses")) or path in ("/models", "/completions",
                                                                           "/chat/completions") else "kobold"
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
            style = route.style
            authorized, key_ok = self._authorized(route)
            self._cors = self.server.access.cors_headers(self.headers.get("Origin"), self.headers.get("Host"),
                                                         key_ok, route.protected)
            body = self._read_body()
            self._request_read()
            if route.protected and not authorized:
                raise unauthorized(style)
            if route.needs_model and not app.ready.is_set():
                raise RequestError("the model is still loading", status=503, kind="service_unavailable")
            query = dict(urllib.parse.parse_qsl(url.query))
            request = Request(app, method, path, query, self.headers, body, authorized,
                              client=self.client_address[0], watch_hangup=self.watch_hangup, style=style)
            response = route.handler(app, request)
            if request.ignored:
                response.headers["X-KoboldLite-Ignored"] = ",".join(request.ignored)
        except RequestError as e:
            if request is not None and request.job is not None:
                request.job.cancel()
            response = error_response(style, e)
        except Exception as e:  # a bug must cost one request, never the server
            if request is not None and request.job is not None:
                request.job.cancel()
            app.log(f"internal error on {method} {path}: {type(e).__name__}: {e}")
            response = error_response(style, RequestError("internal server error", 500, "server_error"))
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
        offered = ""
        auth = self.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            offered = auth[7:].strip()
        elif self.headers.get("X-Api-Key"):
            offered = self.headers.get("X-Api-Key", "").strip()
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
        super().__init__(address, handler_class)

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
        super().process_request(request, client_address)

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


def fetch_model_urls(config: Config):
    """--model URL: download each (with a bar on the console) before anything loads; the file stays."""
    folder = config.modeldir or os.getcwd()
    fetched = []
    for source in [config.model, *config.models]:
        if is_model_url(source):
            download = ModelDownload(source, folder)
            download.progress = ConsoleProgress(download.name)
            if not os.path.isfile(download.path):
                print(f"Downloading {source} into {folder}", file=sys.stderr, flush=True)
            source = download.run()
        fetched.append(source)
    config.model, config.models = fetched[0], fetched[1:]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    double_click = is_double_click_start(argv)
    status = serve(double_click_arguments if double_click else lambda: argv, double_click)
    if status != 0 and double_click:
        keep_window_open()
    return status


def serve(arguments: Callable[[], list[str]], double_click: bool = False) -> int:
    try:
        config = load_config(arguments())
        tls = make_tls_context(*config.ssl) if config.ssl else None
    except ConfigError as e:
        print(f"koboldlite: error: {e}", file=sys.stderr)
        return 2

    try:
        fetch_model_urls(config)
        app = App(config)
    except (ConfigError, DownloadError) as e:
        print(f"koboldlite: error: {e}", file=sys.stderr)
        return 2
    router = build_router(StaticFiles(UI_DIR) if os.path.isdir(UI_DIR) else None)
    try:
        server = KoboldLiteServer((config.host, config.port), RequestHandler, app, router, tls)
    except OSError as e:
        if not (double_click and e.errno == errno.EADDRINUSE):
            reason = "the port is already in use" if e.errno == errno.EADDRINUSE else str(e)
            print(f"koboldlite: error: cannot listen on {config.host}:{config.port}: {reason}", file=sys.stderr)
            return 2
        # A double-click user cannot pick another port: take a free one and say so.
        print(f"Port {config.port} is in use; serving on a free port instead.", file=sys.stderr)
        server = KoboldLiteServer((config.host, 0), RequestHandler, app, router, tls)
    if not app.instance_id:
        app.instance_id = f"{socket.gethostname()}:{server.server_address[1]}"
    # Serve from now on: /api/extra/version answers while the model loads, the rest says 503.
    threading.Thread(target=server.serve_forever, name="http-accept", daemon=True).start()

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    entries = app.catalog.entries()
    if app.catalog.several:
        print(f"Models: {', '.join(e.name for e in entries)} ({len(entries)}; up to {config.maxmodels} loaded at "
              f"once{f', unloaded after {config.idleunload:g} s idle' if config.idleunload else ''})",
              file=sys.stderr, flush=True)
    print(f"KoboldLite {__version__}: loading {config.model}", file=sys.stderr, flush=True)
    try:
        served = app.roster.acquire(app.catalog.find(None))
    except RequestError as e:
        app.flush_log()                   # its lines first: the error is the last line a user sees
        print(f"koboldlite: error: {getattr(e, 'cause', None) or e}", file=sys.stderr)
        server.server_close()
        return 2
    if config.embeddings_model:
        try:
            app.embeddings_source = LlamaModel(config.embeddings_model, n_ctx=64, n_seq=1, n_threads=1,
                                               n_gpu_layers=served.gpu.n_gpu_layers, show_llama_log=config.debug,
                                               devices=served.gpu.devices if served.gpu.chosen else None)
        except ModelLoadError as e:
            print(f"koboldlite: error: embeddings model: {e}", file=sys.stderr)
            server.server_close()
            return 2
    print(served.template_origin, file=sys.stderr, flush=True)
    if not served.engine.context_shift:
        print("context shift: off (--noshift)" if config.noshift else
              "context shift: off, this model's cache cannot be shifted: a trimmed chat is read again in "
              "full, and a reply ends when the context is full", file=sys.stderr, flush=True)
    model, cfg = served.model, served.config
    urls = served_urls(server, config.host)
    if not is_loopback_host(config.host) and not config.password:
        print("WARNING: serving the network without --password: anyone who can reach this machine "
              "can use the model.", file=sys.stderr)
    if not is_loopback_host(config.host) and config.password and not tls:
        print("WARNING: the password crosses the network in clear text over plain HTTP: anyone on the network "
              "can read it; add --ssl cert.pem key.pem (README: Using it on your LAN, with TLS).", file=sys.stderr)
    print(f"Model {model.name} ready: context {model.n_ctx}, {cfg.parallel} slot(s), "
          f"{cfg.threads} threads", flush=True)
    mem = served.memory
    pool = (f"{mem['kv_cells']} tokens shared by {cfg.parallel} slot(s)" if model.shared_kv
            else f"{model.n_ctx} tokens for each of {cfg.parallel} slot(s)")
    print(f"Memory: model {mem['model_mib']:.0f} MiB, KV cache {mem['kv_cache_mib']:.0f} MiB ({pool}, "
          f"{'/'.join(mem['kv_types']) or model.kv_type}), compute buffers {mem['compute_mib']:.0f} MiB; "
          f"flash attention {mem['flash_attn'] or 'auto'}, model {mem['load_mode'] or 'loaded'}", flush=True)
    if served.gpu.devices:
        parts = "; ".join(f"{name}: model {row['model']:.0f} MiB, KV {row['kv']:.0f} MiB, compute {row['compute']:.0f} MiB"
                          for name, row in mem["devices"].items())
        print(f"GPU: offloaded {mem['layers_offloaded']}/{mem['layers_total']} layers; {parts}", flush=True)
    app.ready.set()
    app.roster.release(served)
    for url in urls:
        print(f"Serving at {url}", flush=True)
    print(f"KoboldAI API at {urls[0]}/api", flush=True)
    if config.launch:
        webbrowser.open(urls[0])

    stop.wait()
    print("Stopping: ending running generations.", file=sys.stderr, flush=True)
    app.roster.stop()
    server.wait_answers_written(timeout=5.0)
    server.shutdown()
    server.server_close()
    app.flush_log()
    return 0
