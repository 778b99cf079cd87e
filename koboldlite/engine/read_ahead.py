"""A chat's next turn, read ahead while the loop is idle."""

from __future__ import annotations

from typing import Any, Callable

from ..jobs import Job, StopReason
from .llama_model import LlamaModel, common_prefix_length
from .slots import Slot
from .kv_pool import KVPool


class NextTurnReader:
    """After a chat reply most of the next prompt is known: the client sends the conversation back with the
    reply in it, and the template closes the reply's turn and opens the user's before the user's new words.
    While the loop is idle, those tokens are read into the reply's slot, so that the next turn's first token
    waits only on the new words (at 3000 tokens of context, 12 ms a token on a CPU). A guess the next prompt
    does not share is cut back by the usual reuse; a recurrent model's state cannot be cut, so none is made.

    It decides what to read; the engine reads it (Engine.read_ahead), in its one place that decodes."""

    MOST = 64          # tokens read ahead at most (a template's turn markers, a reply's last token)
    CUT_MOST = 8       # of the slot's last tokens a guess may replace (a stop string's tokens, not shown)

    def __init__(self, model: LlamaModel, pool: KVPool, log: Callable[[str], None],
                 tokenize: Callable[[str, Any], list[int]] | None = None):
        """`tokenize(text, request)`: the next turn's tokens as the request's own prompt would be made (with the
        request's images and audio where their markers stand, as the same placeholders); plain text by default."""
        self.model, self.pool, self.log = model, pool, log
        self.tokenize = tokenize or (lambda text, request: model.tokenize(text, add_bos=request.add_bos))
        self.tokens_read = 0

    def expect(self, slot: Slot, job: Job, reason: StopReason):
        """A reply ended: what the slot holds may go on as the next prompt (a chat's, ended by itself or its length)."""
        request = job.request
        usable = reason.finished and request.next_turn is not None and self.model.attention_only
        slot.expected = (request, job.buffer.text()) if usable else None

    def guess(self, slot: Slot) -> list[int]:
        """The tokens to read into this idle slot now, its cache first cut back to where the guess goes on from it;
        none where no guess is worth reading. Once per reply."""
        if slot.busy or slot.expected is None:
            return []
        request, reply = slot.expected
        slot.expected = None
        text = request.next_turn(reply)
        if not text:
            return []
        tokens = self.tokenize(text, request)
        keep = common_prefix_length(slot.cached, tokens)
        rest = tokens[keep:]
        if not rest or len(rest) > self.MOST or keep < max(len(slot.cached) - self.CUT_MOST, slot.shared_upto, 1):
            return []                      # not this conversation going on (or the slot's cache has gone)
        pool_full = self.model.shared_kv and self.model.pool_tokens - self.pool.cells_used() < len(rest)
        if len(tokens) >= self.model.n_ctx or pool_full:
            return []                      # no room to spare: no other slot's cache goes for a guess
        if keep < len(slot.cached):
            self.pool.truncate(slot, keep)
        return rest

    def was_read(self, slot: Slot, n: int):
        self.tokens_read += n
        self.log(f"read slot {slot.seq_id}'s next turn ahead ({n} tokens)")
