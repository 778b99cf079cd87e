"""Typed access to a request body's fields, and the test of an ignored field that asks for something."""

from __future__ import annotations

import json
import math
from typing import Any, Callable

from .errors import RequestError


def _asks(value: Any) -> bool:
    """A value that asks for something (not absent, off, empty or zero)."""
    return value not in (None, False, 0, "", [], {})


def _more_than_one(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 1


def ignored_fields(body: dict, known: dict[str, Callable[[Any], bool]], prefix: str = "") -> list[str]:
    return [prefix + name for name, asks in known.items() if name in body and asks(body[name])]


class FieldReader:
    """Typed access to a JSON object's fields, with 400s that name the field."""

    def __init__(self, body: Any, what: str = "body"):
        if not isinstance(body, dict):
            raise RequestError(f"the request {what} must be a JSON object")
        self.body = body

    def has(self, *names: str) -> bool:
        return any(self.body.get(n) is not None for n in names)

    def value(self, *names: str) -> Any:
        """The first of these fields that is set, as sent (None if none is)."""
        return self._raw(names)[1]

    def _raw(self, names: tuple[str, ...]):
        for n in names:
            if self.body.get(n) is not None:
                return n, self.body[n]
        return names[0], None

    def number(self, *names: str, default: float, lo: float = -math.inf, hi: float = math.inf) -> float:
        name, v = self._raw(names)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RequestError(f"'{name}' must be a number")
        if not math.isfinite(v):
            raise RequestError(f"'{name}' must be a finite number")
        return float(min(max(v, lo), hi))

    def integer(self, *names: str, default: int, lo: int = -(1 << 62), hi: int = 1 << 62) -> int:
        name, v = self._raw(names)
        if v is None:
            return default
        if isinstance(v, float) and math.isfinite(v) and v == int(v):
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise RequestError(f"'{name}' must be a whole number")
        return min(max(v, lo), hi)

    def string(self, *names: str, default: str = "") -> str:
        name, v = self._raw(names)
        if v is None:
            return default
        if not isinstance(v, str):
            raise RequestError(f"'{name}' must be a string")
        return v

    def boolean(self, *names: str, default: bool = False) -> bool:
        name, v = self._raw(names)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise RequestError(f"'{name}' must be true or false")
        return v

    def string_list(self, *names: str) -> list[str]:
        name, v = self._raw(names)
        if v is None:
            return []
        if isinstance(v, str):
            return [v]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise RequestError(f"'{name}' must be a string or a list of strings")
        return list(v)

    def json_string_list(self, *names: str, default: list[str]) -> list[str]:
        """A list of strings, or a JSON-encoded one in a string (SillyTavern sends DRY breakers so)."""
        name, v = self._raw(names)
        if v is None:
            return list(default)
        if isinstance(v, str):
            try:
                v = json.loads(v) if v.strip() else []
            except ValueError:
                v = [v]          # a lone breaker given as plain text
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise RequestError(f"'{name}' must be a list of strings, or a JSON-encoded one")
        return v[:128]

    def sampler_order(self, *names: str, default: list[int]) -> list[int]:
        name, v = self._raw(names)
        if v is None:
            return list(default)
        if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= 6
                                              for i in v):
            raise RequestError(f"'{name}' must be a list of KoboldCpp sampler ids (0 to 6)")
        return list(dict.fromkeys(v))     # a repeated id runs once

    def token_bias(self, *names: str) -> dict[int, float]:
        """{"token id": bias} as an object, or [[id, bias], ...] as a list."""
        name, v = self._raw(names)
        if v is None:
            return {}
        pairs = v.items() if isinstance(v, dict) else v if isinstance(v, list) else None
        if pairs is None:
            raise RequestError(f"'{name}' must be an object of token id to bias")
        out = {}
        for pair in pairs:
            try:
                key, bias = pair
                token = int(key)
                if isinstance(bias, bool):
                    bias = -math.inf if bias is False else 0.0
                bias = float(bias)
            except (TypeError, ValueError):
                raise RequestError(f"'{name}' must map token ids to numbers") from None
            if math.isnan(bias):
                raise RequestError(f"'{name}' has a bias that is not a number")
            out[token] = bias
        return out

    def token_ids(self, *names: str) -> list[int]:
        """A list of ids, or a comma-separated string of them."""
        name, v = self._raw(names)
        if v is None or v == "":
            return []
        items = v.split(",") if isinstance(v, str) else v
        if not isinstance(items, list):
            raise RequestError(f"'{name}' must be a list of token ids")
        try:
            return [int(str(i).strip()) for i in items if str(i).strip()]
        except ValueError:
            raise RequestError(f"'{name}' must hold token ids (whole numbers)") from None
