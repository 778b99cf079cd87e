"""The built-in page's files."""

from __future__ import annotations

import gzip
import hashlib
import os

from ..service.exchange import Response
from .router import Route


class StaticFiles:
    """The page's files (web/ui_files.py), held from the start. Only these exact paths are ever served,
    so no request path (`..`, encoded dots, absolute paths) can reach any other file."""

    TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
             ".js": "text/javascript; charset=utf-8", ".json": "application/json", ".svg": "image/svg+xml",
             ".png": "image/png", ".ico": "image/x-icon", ".webmanifest": "application/manifest+json",
             ".txt": "text/plain; charset=utf-8"}
    COMPRESSIBLE = (".html", ".css", ".js", ".json", ".svg", ".webmanifest", ".txt")
    # The page renders model output (sanitized markdown): were anything to slip through, the browser still runs
    # no inline script, no event handler attribute and no style attribute, and fetches nothing from elsewhere.
    HEADERS = {"Cache-Control": "no-cache", "Vary": "Accept-Encoding", "X-Content-Type-Options": "nosniff",
               "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                                          "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; "
                                          "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"}

    def __init__(self, files: dict[str, bytes]):
        """`files`: each file's content by its path under the page's root ("index.html")."""
        self.files: dict[str, tuple[bytes, bytes | None, str, str]] = {}
        for name, data in sorted(files.items()):
            url = "/" + name
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
