"""Slots: one KV-cache sequence each, and the reply using it."""

from __future__ import annotations

from ..text import PhraseGuard, TextAssembler
from ..generation import GenerationRequest
from ..jobs import Job
from .samplers import PositionBans, SamplerChain
from .drafting import DraftControl, NgramDrafter


class Slot:
    """One KV-cache sequence and the generation using it, if any."""

    def __init__(self, seq_id: int):
        self.seq_id = seq_id
        self.cached: list[int] = []     # tokens whose keys and values are in this sequence
        self.job: Job | None = None
        self.sampler: SamplerChain | None = None
        self.assembler: TextAssembler | None = None
        self.to_prefill: list[int] = []  # prompt tokens still to be decoded
        self.next_token: int | None = None  # sampled, to be decoded in the next step
        # Positions below this may be cells shared with another slot's sequence (a prompt's start lent
        # or borrowed in a shared pool). llama.cpp keeps one position per cell, so these are never moved.
        self.shared_upto = 0
        self.lender: Slot | None = None  # the slot whose cells this one's first `borrowed` positions are
        self.borrowed = 0
        self.generated: list[int] = []   # this job's tokens so far (those a rewind took back excluded)
        self.guard: PhraseGuard = PhraseGuard()
        self.bans: PositionBans | None = None
        self.rewinds = 0
        self.t_admitted = 0.0
        self.t_first_token = 0.0
        self.last_used = 0.0
        self.drafter: NgramDrafter | None = None
        self.draft_control: DraftControl | None = None
        self.long_repeat = False         # this step's draft goes on a long repeat (DraftControl)
        self.expected: tuple[GenerationRequest, str] | None = None   # a chat's reply, for NextTurnReader

    @property
    def busy(self) -> bool:
        return self.job is not None


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
