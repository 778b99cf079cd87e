"""A reply's drawn tokens made into its text: shown, held back (a stop string, a banned phrase forming), or taken back
(a banned phrase completed), and why the reply ends. Runs on the generation thread, inside Engine.step."""

from __future__ import annotations

import math
import os

from ..text import PhraseGuard, TextAssembler
from ..jobs import Job, StopReason, TokenLogprob
from .llama_model import LlamaModel
from .samplers import DrawSnapshot, PositionBans, SamplerChain
from .drafting import SlotDrafts
from .slots import Reply, Slot
from .kv_pool import KVPool

# For the fault tests only: with KOBOLDLITE_FAULT_INJECTION=MARKER set, a generation whose
# prompt holds MARKER raises inside the generation loop. Unset (always, in use): no effect.
FAULT_INJECTION_MARKER = os.environ.get("KOBOLDLITE_FAULT_INJECTION") or None


def new_reply(model: LlamaModel, job: Job, drafts: SlotDrafts | None, now: float) -> Reply:
    """A reply's parts for a job the engine admits: its sampler chain has seen the prompt."""
    request = job.request
    guard = PhraseGuard(request.sampler.banned_strings)
    reply = Reply(job, None, TextAssembler(request.stop_strings, request.trim_stop), guard,
                  PositionBans() if guard.active else None, drafts, t_admitted=now)
    reply.sampler = sampler_for(model, reply)
    return reply


def sampler_for(model: LlamaModel, reply: Reply) -> SamplerChain:
    """The reply's sampler chain, having seen its prompt and what it has generated so far (a rewind makes one anew)."""
    job, request = reply.job, reply.job.request
    snapshot = DrawSnapshot(request.top_logprobs) if request.logprobs and request.logprobs_after_samplers else None
    if reply.bans is not None:
        reply.bans.index = 0
    chain = SamplerChain(model, request.sampler, job.stats.seed, job.banned_token_ids, reply.bans, snapshot)
    chain.remember_prompt(job.prompt_tokens)
    chain.replay(reply.generated)
    return chain


class ReplyWriter:
    """Takes each token a slot's reply draws: its text goes to the reply's job, through the phrase guard and the
    stop-string assembler; a completed banned phrase is rewound (cache, position, samplers) and banned where it
    began; and it says when the reply ends, and why."""

    MAX_BANS_AT_ONE_PLACE = 64     # then a phrase ban leaves no way on: the reply ends there
    MAX_REWINDS = 1024

    def __init__(self, model: LlamaModel, pool: KVPool):
        self.model, self.pool = model, pool

    def accept(self, slot: Slot, token: int | None, entry: TokenLogprob | None = None) -> StopReason | None:
        """Take one drawn token (None: nothing may be drawn); None while the reply goes on."""
        reply = slot.reply
        job = reply.job
        if FAULT_INJECTION_MARKER and FAULT_INJECTION_MARKER in job.request.prompt:
            raise RuntimeError("fault injected for a test")
        if token is None or (reply.bans is not None and reply.bans.exhausted):
            return StopReason.END           # nothing may follow: the grammar, bans and biases allow no token
        if self.model.is_end_of_generation(token) or token in job.stop_tokens:
            return StopReason.END
        job.stats.generated_tokens += 1
        reply.generated.append(token)
        released, rewind = reply.guard.push(token, self.model.piece(token, job.request.render_special), entry)
        if rewind:
            return self._rewind(slot, rewind)
        for released_token, data, released_entry in released:
            self._emit(reply, released_token, data, released_entry)
        if reply.assembler.stopped_by is not None:
            job.stats.stop_string = reply.assembler.stopped_by
            return StopReason.STOP_STRING
        if job.stats.generated_tokens >= job.max_new_tokens:
            return StopReason.LENGTH
        slot.drew(token)
        return None

    def flush(self, reply: Reply):
        """The reply came to its own end: what was held back (a phrase or a stop string that never completed) is
        its text after all."""
        for token, data, entry in reply.guard.flush():
            self._emit(reply, token, data, entry)
        tail = reply.assembler.flush()
        if tail:
            reply.job.buffer.append(tail)

    def _emit(self, reply: Reply, token: int, data: bytes, entry: TokenLogprob | None):
        """A token's text goes to the stop-string assembler, and what it lets through to the readers."""
        job = reply.job
        if entry is not None:
            job.logprobs.append(entry)
        if not data and not job.request.render_special:
            # A control token shows no text, yet a stop string may name it (a template's start of turn).
            text = reply.assembler.feed(self.model.piece(token, special=True), hidden=True)
        else:
            text = reply.assembler.feed(data)
        if text:
            job.buffer.append(text)

    def _rewind(self, slot: Slot, n: int) -> StopReason | None:
        """Take back the last n tokens (a banned phrase begins in the first): the KV cache, the position
        and the samplers' state go back to where it began, its first token is banned there, and the
        token before it is decoded again to draw anew."""
        reply = slot.reply
        first = reply.generated[-n]
        del reply.generated[-n:]
        reply.job.stats.generated_tokens -= n
        # The newest token was drawn but not decoded; the n - 1 before it are the cache's last.
        cut = len(slot.cached) - n
        again = slot.cached[cut]
        self.pool.truncate(slot, cut)
        slot.drew(again)
        reply.rewinds += 1
        banned_here = reply.bans.ban(len(reply.generated), first)
        if banned_here > self.MAX_BANS_AT_ONE_PLACE or reply.rewinds > self.MAX_REWINDS:
            return StopReason.END
        reply.sampler.free()
        reply.sampler = sampler_for(self.model, reply)
        return None

    def logprob_entry(self, reply: Reply, batch_index: int, token: int) -> TokenLogprob | None:
        """The drawn token's log-probability and the top alternatives, only when the request asks: from the
        draw's candidates (KoboldCpp's way), or from the model's own distribution (the logits llama.cpp just
        computed; OpenAI's and llama-server's way)."""
        request = reply.job.request
        if not request.logprobs:
            return None
        if request.logprobs_after_samplers:
            return reply.sampler.snapshot.entry(token)
        import numpy
        logits = numpy.ctypeslib.as_array(self.model.lib.llama_get_logits_ith(self.model.ctx, batch_index),
                                          shape=(self.model.n_vocab,)).astype(numpy.float64)
        top = logits.max()
        norm = top + math.log(numpy.exp(logits - top).sum())
        n = request.top_logprobs
        best = numpy.argpartition(-logits, n)[:n] if n else numpy.array([], dtype=numpy.int64)
        best = best[numpy.argsort(-logits[best], kind="stable")]
        return TokenLogprob(token, float(logits[token] - norm), [(int(t), float(logits[t] - norm)) for t in best])
