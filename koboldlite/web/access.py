"""Who may use the server: web pages (Host and Origin), password guessers."""

from __future__ import annotations

import collections
import ipaddress
import math
import re
import socket
import threading
import time
import urllib.parse
from typing import Callable

from ..errors import RequestError
from ..config import normalized_origin


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
