"""Media named by an address (an image_url that is an http(s) URL), fetched only as the operator allows.

A LAN client that names an address makes the server fetch it: from the server's side of the network, past the
user's router, to a printer's page or a cloud metadata address. So fetching is off unless `--mediaurls` allows it:
`public` fetches only addresses every name resolves to on the public internet; `any` fetches LAN and loopback
addresses too. The address checked is the address connected to (resolved once, no second lookup a DNS answer could
change), redirects are not followed, and a file is cut at media.MAX_BYTES and 10 seconds.
"""

from __future__ import annotations

import enum
import http.client
import ipaddress
import socket
import ssl
import time
import urllib.parse

from .errors import RequestError
from .media import MAX_BYTES, MEDIA_MARKER, MediaItem, MediaKind, decode_base64, read_media


class MediaURLs(enum.Enum):
    """What --mediaurls allows."""
    OFF = "off"
    PUBLIC = "public"
    ANY = "any"


FETCH_SECONDS = 10.0


def fetch_url(url: str, where: str, policy: MediaURLs) -> bytes:
    """The bytes at an http(s) address, or a RequestError that says why not (the policy, the address, the reply)."""
    if policy is MediaURLs.OFF:
        raise RequestError(f"{where}: this server does not fetch addresses it is given (its operator can allow "
                           f"public ones with --mediaurls public); send the file as base64 or a data: URI")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RequestError(f"{where}: only http and https addresses are fetched")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise RequestError(f"{where}: the name {parts.hostname!r} does not resolve") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if policy is MediaURLs.PUBLIC and not all(a.is_global for a in addresses):
        raise RequestError(f"{where}: {parts.hostname} is a private, loopback or local address, which this server "
                           f"does not fetch (--mediaurls any allows it)", status=403)
    deadline = time.monotonic() + FETCH_SECONDS
    try:
        return _get(parts, str(addresses[0]), port, deadline, where)
    except (OSError, http.client.HTTPException) as e:
        raise RequestError(f"{where}: could not fetch {parts.hostname}: {e}", status=502) from None


def _get(parts: urllib.parse.SplitResult, address: str, port: int, deadline: float, where: str) -> bytes:
    sock = socket.create_connection((address, port), timeout=FETCH_SECONDS)
    if parts.scheme == "https":
        sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
    conn = http.client.HTTPConnection(parts.hostname, port, timeout=FETCH_SECONDS)
    conn.sock = sock                     # connected to the address checked above, not to a second lookup's
    try:
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("GET", path, headers={"Host": parts.netloc.rsplit("@", 1)[-1], "User-Agent": "KoboldLite",
                                           "Accept": "image/*, audio/*"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RequestError(f"{where}: {parts.hostname} answered {resp.status} {resp.reason}"
                               + (" (redirects are not followed)" if 300 <= resp.status < 400 else ""), status=502)
        data = bytearray()
        while len(data) <= MAX_BYTES:
            if time.monotonic() > deadline:
                raise RequestError(f"{where}: {parts.hostname} took longer than {FETCH_SECONDS:g} s", status=504)
            piece = resp.read1(65536)
            if not piece:
                return bytes(data)
            data += piece
        raise RequestError(f"{where}: larger than {MAX_BYTES >> 20} MiB", status=413)
    finally:
        conn.close()


def not_readable(where: str, kinds: tuple[MediaKind, ...], readable: tuple[MediaKind, ...]) -> RequestError:
    """Media the model cannot read: without a projector it reads text only."""
    what = " or ".join(k.value for k in kinds)
    if not readable:
        return RequestError(f"{where}: {what} input is not supported: this model reads text only (start the server "
                            f"with --mmproj FILE, the projector made for this model)")
    return RequestError(f"{where}: {what} input is not supported by this model's projector (it reads "
                        f"{' and '.join(k.value for k in readable)})")


class MediaList(list):
    """A request's media items, in the order their MEDIA_MARKERs stand in its prompt; it reads each as the
    server's --mediaurls allows."""

    def __init__(self, urls: MediaURLs = MediaURLs.OFF, readable: tuple[MediaKind, ...] | None = None):
        """`readable`: what the model's projector reads (() without one), checked before a file is read; None:
        checked later, when the prompt is made."""
        super().__init__()
        self.urls = urls
        self.readable = readable
        self.ignored: list[str] = []      # parts' fields known and not acted on (an image's "detail")

    def add(self, value: object, where: str, allowed: tuple[MediaKind, ...]) -> str:
        """Read base64, a data: URI or (if allowed) an address into the list; the marker for its place."""
        if self.readable is not None and not set(allowed) & set(self.readable):
            raise not_readable(where, allowed, self.readable)
        item = self.read(value, where, allowed)
        if self.readable is not None and item.kind not in self.readable:
            raise not_readable(where, (item.kind,), self.readable)
        self.append(item)
        return MEDIA_MARKER

    def read(self, value: object, where: str, allowed: tuple[MediaKind, ...]) -> MediaItem:
        if isinstance(value, str) and value[:8].lower().startswith(("http://", "https://")):
            return read_media(fetch_url(value, where, self.urls), where, allowed)
        return read_media(decode_base64(value, where), where, allowed)
