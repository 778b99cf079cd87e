"""Text assembly, pure: UTF-8 and stop strings, thinking blocks, banned phrases."""

from __future__ import annotations

import codecs
import re
from typing import Any


class TextAssembler:
    """Turns token bytes into text that is safe to show.

    Never emits half a UTF-8 character, nor any text that might still turn
    out to be the start of a stop string: that part is held back until the
    next token settles it. Hidden text (a control token the client does not
    see, such as a chat template's start of turn) counts for stop strings but
    is never emitted.
    """

    def __init__(self, stop_strings: list[str] = (), trim_stop: bool = True):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in stop_strings if s]
        self._trim_stop = trim_stop
        self._pending = ""
        self._hidden: list[tuple[int, int]] = []   # spans of _pending never to be emitted
        self.stopped_by: str | None = None

    def feed(self, data: bytes, hidden: bool = False) -> str:
        """Add one token's bytes; return the text now safe to emit (nothing once stopped)."""
        if self.stopped_by is not None:
            return ""
        if hidden:
            if not self._stops:
                return ""
            text = data.decode("utf-8", errors="replace")
            self._hidden.append((len(self._pending), len(self._pending) + len(text)))
            self._pending += text
        else:
            self._pending += self._decoder.decode(data)
        if not self._stops:
            return self._take(len(self._pending))
        hit = self._earliest_stop()
        if hit is not None:
            index, stop = hit
            self.stopped_by = stop
            out = self._take(index if self._trim_stop else index + len(stop))
            self._pending, self._hidden = "", []
            return out
        return self._take(len(self._pending) - self._held_back_length())

    def flush(self) -> str:
        """The end of generation: whatever is held back is real text after all."""
        if self.stopped_by is not None:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        return self._take(len(self._pending))

    def _take(self, cut: int) -> str:
        """Remove and return the first `cut` characters of the pending text, less hidden spans."""
        out, self._pending = self._pending[:cut], self._pending[cut:]
        if self._hidden:
            shown, last = [], 0
            for start, end in self._hidden:
                if start >= cut:
                    break
                shown.append(out[last:start])
                last = min(end, cut)
            shown.append(out[last:])
            out = "".join(shown)
            self._hidden = [(max(start - cut, 0), end - cut) for start, end in self._hidden if end > cut]
        return out

    def _earliest_stop(self) -> tuple[int, str] | None:
        best = None
        for stop in self._stops:
            i = self._pending.find(stop)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, stop)
        return best

    def _held_back_length(self) -> int:
        """Length of the longest tail of the pending text that begins some stop string."""
        text = self._pending
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest


class ReasoningSplitter:
    """Splits a reply into its reasoning and its answer where the model writes a thinking block first
    (<think>...</think>, [THINK]...[/THINK], <thinking>...</thinking>), as it streams. A tag that may
    still be forming is held back. `opened_by_prompt`: the template ended the prompt inside a block.
    Only a block at the start of the reply counts: later tags are part of the answer."""

    TAGS = (("<think>", "</think>"), ("[THINK]", "[/THINK]"), ("<thinking>", "</thinking>"))

    def __init__(self, opened_by_prompt: str | None = None):
        self._close = opened_by_prompt      # the closing tag while inside a block
        self._state = "reasoning" if opened_by_prompt else "start"
        self._pending = ""

    @classmethod
    def for_prompt(cls, prompt: str) -> "ReasoningSplitter":
        tail = prompt.rstrip()
        return cls(next((close for open_, close in cls.TAGS if tail.endswith(open_)), None))

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, answer) text now safe to show."""
        self._pending += text
        reasoning = answer = ""
        if self._state == "start":
            head = self._pending.lstrip()
            tag = next(((o, c) for o, c in self.TAGS if head.startswith(o)), None)
            if tag:
                self._state, self._close = "reasoning", tag[1]
                self._pending = head[len(tag[0]):]
            elif any(o.startswith(head) for o, _ in self.TAGS):
                return "", ""                # may still become a tag
            else:
                self._state = "answer"
        if self._state == "reasoning":
            end = self._pending.find(self._close)
            if end < 0:
                keep = next((n for n in range(min(len(self._close) - 1, len(self._pending)), 0, -1)
                             if self._pending.endswith(self._close[:n])), 0)
                reasoning, self._pending = self._pending[:len(self._pending) - keep], self._pending[len(self._pending) - keep:]
                return reasoning, ""
            reasoning = self._pending[:end]
            self._pending = self._pending[end + len(self._close):]
            self._state = "after"
        if self._state == "after":       # the new lines between the block and the answer, in whatever pieces
            self._pending = self._pending.lstrip("\n")
            if self._pending:
                self._state = "answer"
        if self._state == "answer":
            answer, self._pending = self._pending, ""
        return reasoning, answer

    def flush(self) -> tuple[str, str]:
        rest, self._pending = self._pending, ""
        return (rest, "") if self._state == "reasoning" else ("", rest)

    def split(self, text: str) -> tuple[str, str]:
        """A whole reply at once."""
        r1, a1 = self.feed(text)
        r2, a2 = self.flush()
        return r1 + r2, a1 + a2


class PhraseGuard:
    """Banned phrases (KoboldCpp's anti-slop): holds back generated tokens whose text may still become
    one, and says when one is complete, so that the generation can take it back.

    Matching is case-insensitive, on the phrase as given (a leading space counts), as KoboldCpp
    matches. `push` returns the tokens now safe to show, or how many trailing tokens (the newest
    included) complete a banned phrase: the fewest whose text contains it, so the phrase begins in
    the first of them. Those were never released, so no client has seen any part of them.

    A take-back can leave text already shown as the start of a phrase again ("so" shown, " so so!" taken back):
    the end of what was shown is kept (`_shown`) and matched with what follows, so a phrase that would begin in
    it and end in new tokens is caught too; then all the pending tokens go, and the first of them is what the
    generation bans there.
    """

    MAX_PHRASES = 768          # KoboldCpp's limit

    def __init__(self, phrases: list[str] = ()):
        phrases = sorted({p.lower() for p in phrases if p.strip()})[:self.MAX_PHRASES]
        self._pattern = re.compile("|".join(map(re.escape, phrases))) if phrases else None
        self._prefixes = {p[:n] for p in phrases for n in range(1, len(p))}
        self._longest = max(map(len, phrases), default=0)
        self.pending: list[tuple[int, bytes, Any]] = []     # (token, its text's bytes, what goes with it)
        self._shown = ""          # the end of the text released so far, as long as a phrase could reach back

    @property
    def active(self) -> bool:
        return self._pattern is not None

    @staticmethod
    def _text(items) -> str:
        return b"".join(data for _, data, _ in items).decode("utf-8", errors="ignore").lower()

    def push(self, token: int, data: bytes, payload: Any = None) -> tuple[list[tuple[int, bytes, Any]], int]:
        """(released tokens, 0), or ([], n) when the last n tokens complete a banned phrase (dropped here)."""
        if self._pattern is None:
            return [(token, data, payload)], 0
        self.pending.append((token, data, payload))
        text = self._shown + self._text(self.pending)
        if self._pattern.search(text):
            n = 1
            while n < len(self.pending) and not self._pattern.search(self._text(self.pending[-n:])):
                n += 1
            del self.pending[-n:]
            return [], n
        held = next((n for n in range(min(self._longest - 1, len(text)), 0, -1) if text[-n:] in self._prefixes), 0)
        keep = 0
        while keep < len(self.pending) and len(self._text(self.pending[len(self.pending) - keep:])) < held:
            keep += 1
        cut = len(self.pending) - keep
        released, self.pending = self.pending[:cut], self.pending[cut:]
        if released:
            self._shown = (self._shown + self._text(released))[-(self._longest - 1):] if self._longest > 1 else ""
        return released, 0

    def flush(self) -> list[tuple[int, bytes, Any]]:
        """The end of generation: what is held back is not a banned phrase after all."""
        out, self.pending, self._shown = self.pending, [], ""
        return out
