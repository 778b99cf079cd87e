"""Slots: one KV-cache sequence each, the reply using it, and the states a slot goes through."""

from __future__ import annotations

import dataclasses
import enum

from ..text import PhraseGuard, TextAssembler
from ..generation import GenerationRequest
from ..jobs import Job
from .samplers import PositionBans, SamplerChain
from .drafting import SlotDrafts


class SlotState(enum.Enum):
    """Where a slot is in a step, as llama.cpp's server names its slots' states.

    IDLE: no reply; its cache may hold a conversation that a later prompt reuses. READING_PROMPT: prompt tokens
    wait to be decoded (`to_prefill`). SAMPLING: all it holds is decoded, and this step draws its next token from
    the logits. GENERATING: a drawn token waits to be decoded (`next_token`). Only Slot's methods move a slot, and
    only as SLOT_MOVES allows: a slot never has a token to decode and prompt to read at once.
    """

    IDLE = "idle"
    READING_PROMPT = "reading prompt"
    SAMPLING = "sampling"
    GENERATING = "generating"


SLOT_MOVES = {
    SlotState.IDLE: {SlotState.READING_PROMPT},
    # A long prompt is read in chunks; its last is decoded with logits to draw from.
    SlotState.READING_PROMPT: {SlotState.READING_PROMPT, SlotState.SAMPLING, SlotState.IDLE},
    SlotState.SAMPLING: {SlotState.GENERATING, SlotState.IDLE},
    # Decoded (or decoded already, as a kept draft token); or its cells were lost and it reads them again.
    SlotState.GENERATING: {SlotState.SAMPLING, SlotState.READING_PROMPT, SlotState.IDLE},
}


@dataclasses.dataclass(eq=False)
class Reply:
    """The generation a slot runs: its job, and what turns the model's draws into the job's text."""
    job: Job
    sampler: SamplerChain
    assembler: TextAssembler      # UTF-8 and stop strings
    guard: PhraseGuard            # banned phrases, held back until they cannot be one
    bans: PositionBans | None     # where a banned phrase began, the token it began with is banned
    drafts: SlotDrafts | None     # speculative drafting, when this reply drafts
    generated: list[int] = dataclasses.field(default_factory=list)   # its tokens (those a rewind took back excluded)
    rewinds: int = 0
    t_admitted: float = 0.0
    t_first_token: float = 0.0


class Slot:
    """One KV-cache sequence (what its cells hold, what it shares with other slots) and the reply using it."""

    def __init__(self, seq_id: int):
        self.seq_id = seq_id
        self.state = SlotState.IDLE
        self.cached: list[int] = []     # tokens whose keys and values are in this sequence
        self.reply: Reply | None = None
        self.to_prefill: list[int] = []  # READING_PROMPT: prompt tokens still to be decoded
        self.next_token: int | None = None  # GENERATING: drawn, to be decoded in the next step
        # Positions below this may be cells shared with another slot's sequence (a prompt's start lent
        # or borrowed in a shared pool). llama.cpp keeps one position per cell, so these are never moved.
        self.shared_upto = 0
        self.lender: Slot | None = None  # the slot whose cells this one's first `borrowed` positions are
        self.borrowed = 0
        self.last_used = 0.0
        self.expected: tuple[GenerationRequest, str] | None = None   # a chat's reply, for NextTurnReader
        self.adapter_key: tuple = ()    # the LoRA scales its cells were computed under (engine/adapters.py)

    @property
    def busy(self) -> bool:
        return self.reply is not None

    @property
    def job(self) -> Job | None:
        return self.reply.job if self.reply is not None else None

    def _move(self, state: SlotState):
        if state not in SLOT_MOVES[self.state]:
            raise RuntimeError(f"slot {self.seq_id} cannot go from {self.state.value} to {state.value}")
        self.state = state

    def start(self, reply: Reply, to_prefill: list[int]):
        """A reply begins: what of its prompt the cache does not hold is still to read (one token at least)."""
        self._move(SlotState.READING_PROMPT)
        self.reply, self.to_prefill, self.next_token = reply, list(to_prefill), None
        self.expected = None

    def decoded(self, n: int):
        """A decode took this slot's next `n` tokens: its drawn token, or that many of its prompt's."""
        if self.state is SlotState.GENERATING:
            self.cached.append(self.next_token)
            self.next_token = None
            self._move(SlotState.SAMPLING)
            return
        self.cached.extend(self.to_prefill[:n])
        del self.to_prefill[:n]
        self._move(SlotState.READING_PROMPT if self.to_prefill else SlotState.SAMPLING)

    def drew(self, token: int):
        """The draw kept a token that is not in the cache yet: it is decoded in the next step (or, a rewind's
        token, decoded again)."""
        self._move(SlotState.GENERATING)
        self.next_token = token

    def draft_token_kept(self):
        """The token just drawn equals the draft's token at this place, whose cells this step decoded already."""
        self.cached.append(self.next_token)
        self.next_token = None
        self._move(SlotState.SAMPLING)

    def read_again(self):
        """Its cells are gone: all it held, and the token it drew last, are read again as prompt."""
        pending = self.cached + ([self.next_token] if self.next_token is not None else []) + self.to_prefill
        self._move(SlotState.READING_PROMPT)
        self.cached, self.next_token, self.to_prefill = [], None, pending

    def finish(self) -> Reply:
        """The reply is over: the slot keeps what its cache holds (a prompt cut short holds what was decoded)."""
        reply = self.reply
        self._move(SlotState.IDLE)
        self.reply, self.to_prefill, self.next_token = None, [], None
        return reply


def put_tokens(batch, n: int, slot: Slot, tokens: list[int], logits_last: bool, logits_all: bool = False) -> int:
    """Append a slot's tokens to a llama batch from index n, at the positions after what its sequence holds;
    the batch's new length."""
    pos = len(slot.cached)
    seq = slot.seq_id
    last = len(tokens) - 1
    for i, t in enumerate(tokens):
        batch.token[n] = t
        batch.pos[n] = pos + i
        batch.n_seq_id[n] = 1
        batch.seq_id[n][0] = seq
        batch.logits[n] = logits_all or (logits_last and i == last)
        n += 1
    return n
