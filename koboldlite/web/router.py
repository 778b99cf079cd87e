"""Routes: exact paths to handlers, per method."""

from __future__ import annotations

import dataclasses
from typing import Callable

from ..errors import RequestError
from ..service.app import App
from ..service.exchange import Request, Response


@dataclasses.dataclass
class Route:
    handler: Callable[[App, "Request"], Response]
    protected: bool = False     # needs the password when one is set
    style: str = "kobold"       # error body shape
    needs_model: bool = True
    admin: bool = False         # KoboldCpp's admin API: --adminpassword, when set, instead of --password


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
