"""JSON cut short: the value a prefix of a JSON text had written so far (a tool call that a length limit stopped
in the middle still goes back to its client as a call, with the arguments written so far)."""

from __future__ import annotations

import json
from typing import Any

_WHITESPACE = " \t\r\n"
_LITERALS = {"true": True, "false": False, "null": None}


class _Cut(Exception):
    """The text ended inside what was being read."""


class PartialJSON:
    """Reads a JSON prefix: objects and arrays keep the members that were complete (and a string value cut short
    keeps its characters so far); a member whose key or value had not begun is left out. `value()` is None when
    not even the outermost value had begun."""

    def __init__(self, text: str):
        self.text = text
        self.i = 0
        self._cut: list = []          # the objects and arrays the text ended inside, innermost first

    def value(self) -> Any:
        try:
            return json.loads(self.text)
        except ValueError:
            pass
        try:
            return self._value()
        except _Cut as cut:
            return cut.args[0] if cut.args else None
        except ValueError:
            return None

    def was_cut(self, container: Any) -> bool:
        """Whether the text ended inside this object or array of the value (as opposed to after its end)."""
        return any(c is container for c in self._cut)

    def _skip(self):
        while self.i < len(self.text) and self.text[self.i] in _WHITESPACE:
            self.i += 1
        if self.i >= len(self.text):
            raise _Cut()

    def _value(self) -> Any:
        self._skip()
        c = self.text[self.i]
        if c == "{":
            return self._object()
        if c == "[":
            return self._array()
        if c == '"':
            return self._string()
        return self._scalar()

    def _object(self) -> dict:
        out: dict = {}
        self.i += 1
        while True:
            try:
                self._skip()
                if self.text[self.i] == "}":
                    self.i += 1
                    return out
                if self.text[self.i] == ",":
                    self.i += 1
                    self._skip()
                key = self._string(whole=True)
                self._skip()
                if self.text[self.i] != ":":
                    raise ValueError("':' expected")
                self.i += 1
                out[key] = self._member()
            except _Cut as cut:
                if cut.args and cut.args[0] is not _NOTHING:
                    out[key] = cut.args[0]
                self._cut.append(out)
                raise _Cut(out) from None

    def _member(self) -> Any:
        """A member's value; cut short, the part of it written so far (nothing, if it had not begun)."""
        try:
            return self._value()
        except _Cut as cut:
            raise _Cut(cut.args[0] if cut.args else _NOTHING) from None

    def _array(self) -> list:
        out: list = []
        self.i += 1
        while True:
            try:
                self._skip()
                if self.text[self.i] == "]":
                    self.i += 1
                    return out
                if self.text[self.i] == ",":
                    self.i += 1
                out.append(self._member())
            except _Cut as cut:
                if cut.args and cut.args[0] is not _NOTHING:
                    out.append(cut.args[0])
                self._cut.append(out)
                raise _Cut(out) from None

    def _string(self, whole: bool = False) -> str:
        """A string; cut short, its characters so far (a key must be whole: a cut key is no member)."""
        if self.text[self.i] != '"':
            raise ValueError("a string expected")
        j = self.i + 1
        while j < len(self.text):
            if self.text[j] == "\\":
                j += 2
                continue
            if self.text[j] == '"':
                value = json.loads(self.text[self.i:j + 1])
                self.i = j + 1
                return value
            j += 1
        if whole:
            raise _Cut()
        body = self.text[self.i + 1:]
        for end in range(len(body), -1, -1):      # a cut escape (`\u00`) is left out
            try:
                raise _Cut(json.loads('"' + body[:end] + '"'))
            except ValueError:
                continue
        raise _Cut()

    def _scalar(self) -> Any:
        j = self.i
        while j < len(self.text) and self.text[j] not in ",]}" + _WHITESPACE:
            j += 1
        word = self.text[self.i:j]
        if j >= len(self.text):
            raise _Cut()                  # a number or literal may go on: not yet a value
        self.i = j
        if word in _LITERALS:
            return _LITERALS[word]
        return json.loads(word)


_NOTHING = object()


def partial_json(text: str) -> Any:
    """What the JSON prefix `text` had written so far (see PartialJSON); None when nothing had begun."""
    return PartialJSON(text).value()
