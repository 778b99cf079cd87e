"""Routes: exact paths to handlers, per method, each with its API's style; the style of a path no route has."""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable

from ..errors import RequestError
from ..service.app import App
from ..service.exchange import Request, Response


@dataclasses.dataclass
class Route:
    handler: Callable[[App, "Request"], Response]
    protected: bool = False     # needs the password when one is set
    style: str = "kobold"       # whose clients call it: the shape of its errors (api/common.error_body)
    needs_model: bool = True
    admin: bool = False         # KoboldCpp's admin API: --adminpassword, when set, instead of --password


# The order an Allow header lists methods in.
METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS")


def path_segments(path: str) -> tuple[str, ...]:
    return tuple(s for s in path.split("/") if s)


class Router:
    """Exact paths to routes, per method; /api/latest/... is /api/v1/...; then, for GET, the fallback (the built-in
    page's files). The table is the one place that says an endpoint's style (web/routes.py declares it): the
    handler asks the router for it, for paths that match nothing too."""

    def __init__(self, fallback: Callable[[str], "Route | None"] | None = None):
        self._routes: dict[tuple[str, str], Route] = {}
        self._prefixes: list[tuple[str, str, Route]] = []     # (method, prefix, route): /v1/responses/{id}
        # For each run of leading path segments, how many registered paths of each style begin with it.
        self._styles: dict[tuple[str, ...], collections.Counter] = {}
        self.fallback = fallback

    def add(self, methods: str, paths: str, handler, **kw):
        route = Route(handler, **kw)
        for path in paths.split():
            self._count_style(path, route.style)
            for method in methods.split():
                self._routes[(method, path)] = route

    def add_prefix(self, methods: str, prefixes: str, handler, **kw):
        """Paths that are the prefix and one more segment (an id), after the exact paths."""
        route = Route(handler, **kw)
        for prefix in prefixes.split():
            self._count_style(prefix, route.style)
            self._prefixes += [(method, prefix, route) for method in methods.split()]

    def _count_style(self, path: str, style: str):
        segments = path_segments(path)
        for n in range(1, len(segments) + 1):
            self._styles.setdefault(segments[:n], collections.Counter())[style] += 1

    @staticmethod
    def _canonical(path: str) -> str:
        if path.startswith("/api/latest/"):
            return "/api/v1/" + path[len("/api/latest/"):]
        return path

    @staticmethod
    def _under(prefix: str, path: str) -> bool:
        rest = path[len(prefix):]
        return path.startswith(prefix) and bool(rest) and "/" not in rest

    def match(self, method: str, path: str) -> Route:
        """The route for a request, or a 404; a 405 (with `Allow`) when the path has routes for other methods."""
        path = self._canonical(path)
        route = self._routes.get((method, path))
        if route is None:
            route = next((r for m, prefix, r in self._prefixes if m == method and self._under(prefix, path)), None)
        if route is None and method == "GET" and self.fallback is not None:
            route = self.fallback(path)
        if route is None:
            allowed = self.allowed_methods(path)
            if allowed:
                raise RequestError(f"{method} is not allowed on {path}", status=405, kind="method_not_allowed",
                                   headers={"Allow": ", ".join(allowed)})
            raise RequestError(f"no such endpoint: {path}", status=404, kind="not_found")
        return route

    def allowed_methods(self, path: str) -> list[str]:
        """The methods a path's routes answer, HEAD beside GET, and OPTIONS (preflights are answered anywhere);
        none for a path no route has."""
        methods = {m for m, p in self._routes if p == path}
        methods |= {m for m, prefix, _ in self._prefixes if self._under(prefix, path)}
        if not methods:
            return []
        if "GET" in methods:
            methods.add("HEAD")
        methods.add("OPTIONS")
        return [m for m in METHOD_ORDER if m in methods]

    def style_of(self, path: str) -> str:
        """The style of the routes that share the most leading segments with `path` (of most of them, if they
        differ: /v1/... is OpenAI's, though /v1/messages is Anthropic's); the Kobold API's when none does. For a
        path that has a route, its route's style is the answer (Route.style)."""
        segments = path_segments(self._canonical(path))
        for n in range(len(segments), 0, -1):
            styles = self._styles.get(segments[:n])
            if styles:
                return styles.most_common(1)[0][0]
        return Route.style
