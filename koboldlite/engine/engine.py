"""The engine: admission, the generation step, a reply's end."""

from __future__ import annotations

import functools
import math
import os
import secrets
import threading
import time
from typing import Callable

from ..errors import ContextOverflow
from ..text import PhraseGuard, TextAssembler
from ..generation import GenerationRequest
from ..jobs import Job, StopReason, TokenLogprob
from .llama_model import LlamaModel, common_prefix_length
from .samplers import DrawSnapshot, PositionBans, SamplerChain
from .drafting import DraftControl, DraftModel, NgramDrafter, StepCost
from .slots import Slot, put_tokens
from .prompt_cache import PromptCache, model_identity
from .kv_pool import KVPool
from .read_ahead import NextTurnReader


# For the fault tests only: with KOBOLDLITE_FAULT_INJECTION=MARKER set, a generation whose
# prompt holds MARKER raises inside the generation loop. Unset (always, in use): no effect.
FAULT_INJECTION_MARKER = os.environ.get("KOBOLDLITE_FAULT_INJECTION") or None


class Engine:
    """Prepares requests (on the caller's thread) and runs the one generation loop.

    Only the generation thread calls into the llama context (admission, steps, rewinds, shifts):
    that is what keeps two threads from ever calling into it at once. Every such call is also made
    under `llama_lock`, which therefore never waits today; it is there so that anything added later
    that must touch the context from another thread (a state save, say) has one lock to take.
    Each step decodes one token for every generating slot, plus a chunk of
    prompt for a newly admitted one, in a single batch.
    """

    SHORT_PROMPT = 128                   # new prompts up to this many tokens get a step of their own
    PREFILL_CHUNK_WHILE_STREAMING = 128  # else, prompt tokens read per step while others generate

    def __init__(self, model: LlamaModel, context_shift: bool = True, draft_most: int = 0,
                 draft_model: DraftModel | None = None, prompt_cache: PromptCache | None = None,
                 log: Callable[[str], None] = lambda line: None):
        self.model = model
        self.lib = model.lib
        self.draft_most = draft_most     # tokens a speculative draft may propose per step; 0: no drafts
        self.draft_model = draft_model   # drafts from a small model; else from the context (n-grams)
        # Context shift: reuse a cache whose front turns a client dropped, and shift a full context
        # instead of stopping. Needs a model whose cache positions can move.
        self.context_shift = context_shift and model.can_shift
        self.llama_lock = threading.Lock()
        self.slots = [Slot(i) for i in range(model.n_seq)]
        self._batch = self.lib.llama_batch_init(model.n_batch, 0, model.n_seq)
        self.pool = KVPool(model, self.slots, self.llama_lock, self.context_shift, prompt_cache)
        self.next_turns = NextTurnReader(model, self.pool, self._batch, self.llama_lock, log)
        self.step_cost: StepCost | None = None      # measured on the thread that decodes: see ready_on_this_thread
        self._drafts_paused = False                 # for one step, after llama.cpp found no room for the drafts

    @property
    def compactions(self) -> int:
        return self.pool.compactions

    def ready_on_this_thread(self):
        """What is done before the first job, on the thread that will make every decode (the generation loop's).
        llama.cpp's CPU backend runs a team of OpenMP threads per calling thread: one decode made on another
        thread (start-up's) left its team beside the loop's, and every later step took twice as long on this
        2-core machine. So the step cost is measured here, while every slot is still empty."""
        if self.draft_most and self.step_cost is None and not any(s.cached for s in self.slots):
            most = min(self.model.n_batch - 64, len(self.slots) * (1 + self.draft_most), self.model.n_ctx // 2)
            with self.llama_lock:
                self.step_cost = StepCost.measure(self.model, self._batch, most)

    # -- on request threads -------------------------------------------------

    def _tokenize(self, request: GenerationRequest) -> tuple[list[int], list[int]]:
        m = self.model
        memory = m.tokenize(request.memory, add_bos=request.add_bos) if request.memory else []
        return memory, m.tokenize(request.prompt, add_bos=request.add_bos and not memory)

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """The tokens `prepare` would read for this request, before any cut to fit (count_tokens endpoints)."""
        memory, prompt = self._tokenize(request)
        return len(memory) + len(prompt)

    def prepare(self, request: GenerationRequest) -> Job:
        """Tokenize, fit the prompt into the context, check the grammar: a job ready to queue.

        The reply never takes room from the prompt: it is capped by what the prompt leaves.
        Only a Kobold request cuts its prompt, and only as KoboldCpp does (see GenerationRequest).
        """
        m = self.model
        n_ctx = m.n_ctx
        if request.max_context_length is not None:
            n_ctx = max(16, min(n_ctx, request.max_context_length))
        memory, prompt = self._tokenize(request)
        tokens = memory + prompt
        truncated = 0
        if request.cut_overlong_prompt:
            # Room for the reply as KoboldCpp keeps it, but an over-large max_length takes at most half.
            reserve = min(request.max_length or n_ctx, n_ctx // 2)
            room = n_ctx - reserve
            if len(tokens) > room:
                keep_prompt = max(room - len(memory), 1)
                tokens = (memory + prompt[-keep_prompt:])[-room:]    # the oldest story text goes first
                truncated = len(memory) + len(prompt) - len(tokens)
        elif len(tokens) >= n_ctx:
            raise ContextOverflow(len(tokens), n_ctx)
        if not tokens:
            tokens = [m.bos if m.bos >= 0 else m.eos]
        room_left = n_ctx - len(tokens)
        if request.max_length is None:
            max_new = room_left            # until the context is full
        elif self.context_shift:
            max_new = request.max_length   # past a full context, by shifting it
        else:
            max_new = min(request.max_length, room_left)
        max_new = max(1, max_new)
        if request.sampler.grammar:
            m.check_grammar(request.sampler.grammar)
        banned = [t for t in request.sampler.banned_token_ids if m.valid_token(t)]
        job = Job(request, tokens, max_new)
        job.n_ctx = n_ctx
        keep = memory if not truncated or not memory else []
        if request.keep_prefix:
            keep = m.tokenize(request.keep_prefix, add_bos=request.add_bos)
        job.n_keep = min(common_prefix_length(keep, tokens), n_ctx // 2)
        job.banned_token_ids = banned

        job.stats.truncated_tokens = truncated
        return job

    # -- on the generation thread ------------------------------------------

    def keep_ahead(self):
        """The loop is idle: get ahead of the next requests. Each chat's expected next turn is read into its slot
        (NextTurnReader), then the prompt cache takes copies of the idle slots' conversations (KVPool.keep_ahead)."""
        for slot in self.slots:
            self.next_turns.read(slot)
        self.pool.keep_ahead()

    def admit(self, job: Job) -> bool:
        """Place a job in the free slot whose cache it reuses most, and make that cache hold what it reuses."""
        free = [s for s in self.slots if not s.busy]
        if not free:
            return False
        self.ready_on_this_thread()         # the Scheduler has done it; an engine driven directly does it here
        slot = self._choose_slot(free, job.prompt_tokens)
        slot.expected = None
        source = self._bring_back(slot, job.prompt_tokens)
        keep = self.pool.reuse(slot, job.prompt_tokens)
        keep = self.pool.borrow_prefix(slot, job.prompt_tokens, keep)
        if not self.pool.make_room(len(job.prompt_tokens) - keep + 1, keep=slot):
            return False                   # a shared pool held by running replies: wait in the queue
        seed = job.request.sampler.seed
        if seed < 0:
            seed = secrets.randbelow(1 << 31)
        job.stats.seed = seed
        job.stats.cached_tokens = keep
        job.stats.cache_source = source if keep else "none"
        slot.job = job
        slot.generated = []
        slot.guard = PhraseGuard(job.request.sampler.banned_strings)
        slot.bans = PositionBans() if slot.guard.active else None
        slot.rewinds = 0
        slot.sampler = self._sampler_for(slot)
        slot.assembler = TextAssembler(job.request.stop_strings, job.request.trim_stop)
        slot.to_prefill = job.prompt_tokens[keep:]
        slot.next_token = None
        drafting = self.draft_most > 0 and job.request.sampler.draft
        slot.drafter = NgramDrafter() if drafting else None
        slot.draft_control = DraftControl(self.draft_most) if drafting else None
        slot.t_admitted = slot.last_used = time.monotonic()
        return True

    RESTORE_MIN_GAIN = 64     # a kept state is restored only if it saves this many more tokens than the slots'

    def _bring_back(self, slot: Slot, prompt: list[int]) -> str:
        """Where this prompt's cache comes from: "slot" (a slot's, as ever), or "ram" / "disk" when a displaced
        conversation kept in the prompt cache starts it for longer than any slot's cache: it is restored into
        the chosen slot (whose own conversation, if worth it, goes to the cache first)."""
        pool, cache = self.pool, self.pool.cache
        own = pool.plan_reuse(slot.cached, prompt)[0] if slot.cached else 0
        if cache is None:
            return "slot"
        entry, common = cache.best(prompt)
        others = max((common_prefix_length(s.cached, prompt) for s in self.slots if s is not slot), default=0)
        if entry is None or common < max(own, others if self.model.shared_kv else 0) + self.RESTORE_MIN_GAIN:
            pool.stash(slot, own)             # what of it this prompt will not reuse is about to go
            return "slot"
        pool.stash(slot)
        if not pool.make_room(len(entry.tokens) - len(slot.cached) + len(prompt) - common + 1, keep=slot):
            return "slot"
        where = "ram" if entry.data is not None else "disk"
        data = cache.data_of(entry)
        if data is None or not pool.restore(slot, entry.tokens, data):
            return "slot"
        if common == len(entry.tokens):
            cache.taken(entry)                # the slot holds it all now
        return where

    def _sampler_for(self, slot: Slot) -> SamplerChain:
        """The slot's job's sampler chain, having seen its prompt and what it has generated so far."""
        job = slot.job
        request = job.request
        snapshot = DrawSnapshot(request.top_logprobs) if request.logprobs and request.logprobs_after_samplers else None
        if slot.bans is not None:
            slot.bans.index = 0
        chain = SamplerChain(self.model, request.sampler, job.stats.seed, job.banned_token_ids, slot.bans, snapshot)
        chain.remember_prompt(job.prompt_tokens)
        chain.replay(slot.generated)
        return chain

    def _choose_slot(self, free: list[Slot], prompt: list[int]) -> Slot:
        """The free slot where this prompt costs least: prompt tokens still to read plus cached tokens
        thrown away (a shift's savings count). Only the least recently used slot and the slots this
        prompt continues are candidates: those whose cache it reuses at least half of (a chat going
        on), or that supply at least half of it (the same prompt sent again, to regenerate a reply).

        Counting what is thrown away keeps a common opening ("Chapter", a system prompt) from
        evicting another user's long story while a cheaper slot is free.
        """
        lru = min(free, key=lambda s: s.last_used)
        costs = {}
        for s in free:
            reused = self.pool.plan_reuse(s.cached, prompt)[0] if s.cached else 0
            if s is lru or (reused and (2 * reused >= len(s.cached) or 2 * reused >= len(prompt))):
                costs[s.seq_id] = (len(prompt) - reused) + (len(s.cached) - reused)
        return min(free, key=lambda s: (costs.get(s.seq_id, math.inf), s is lru))

    @property
    def n_slots(self) -> int:
        return len(self.slots)

    def step(self) -> list[Job]:
        """Decode one batch and sample for every slot that is due; return the jobs that ended."""
        finished: list[Job] = []
        for slot in self.slots:
            if slot.busy and slot.job.cancelled.is_set():
                finished.append(self._finish(slot, StopReason.ABORTED))
        if self.pool.compaction_due():
            self.pool.compact()
        batch = self._batch
        n = 0
        # (slot, batch index of its first logits, the draft tokens whose logits follow)
        due: list[tuple[Slot, int, list[int]]] = []
        added: list[tuple[Slot, list[int]]] = []
        drafts: dict[int, list[int]] = {}
        taking = 0                          # cells the generating slots take in this step
        width = sum(1 for s in self.slots if s.busy and s.next_token is not None)    # the batch before drafts
        for slot in self.slots:
            if not slot.busy or slot.next_token is None:
                continue
            full = len(slot.cached) >= slot.job.n_ctx or not self.pool.make_room(taking + 1)
            if full and self.context_shift and self.pool.shift(slot):   # its own context, or its share of a full pool
                full = not self.pool.make_room(taking + 1)
            if full:
                finished.append(self._finish(slot, StopReason.LENGTH))
            else:
                draft = [] if self._drafts_paused else self._draft(slot, self.model.n_batch - taking - 1, width)
                if draft and not self.pool.make_room(taking + 1 + len(draft)):
                    draft = []
                drafts[slot.seq_id] = draft
                taking += 1 + len(draft)
                width += len(draft)
        prefilling = [s for s in self.slots if s.busy and s.to_prefill]
        generating = [s for s in self.slots if s.busy and s.next_token is not None]
        # A short new prompt gets a step of its own: its first token comes sooner, and the others
        # lose one short step. A long one is read in chunks beside the others' tokens, so they keep
        # streaming while it is read.
        short_prefill = prefilling and sum(len(s.to_prefill) for s in prefilling) <= self.SHORT_PROMPT
        if not short_prefill:
            for slot in generating:
                # The sampled token and its draft, each with logits; only the sampled one is the cache's
                # for now: the draft's cells are kept or cut once the model has checked it.
                draft = drafts.get(slot.seq_id, [])
                first = n
                n = put_tokens(batch, n, slot, [slot.next_token, *draft], logits_last=True, logits_all=bool(draft))
                due.append((slot, first, draft))
                added.append((slot, [slot.next_token]))
        budget = self.model.n_batch if short_prefill or not generating else self.PREFILL_CHUNK_WHILE_STREAMING
        for slot in prefilling:
            room = min(budget, self.model.n_batch - n)
            if room <= 0:
                break
            chunk = slot.to_prefill[:room]
            if len(chunk) == len(slot.to_prefill) > 1 and self._reproducible(slot):
                # The prompt's last token is read in a step of its own, as it is when the rest is cached:
                # a batch of one rounds differently from a long one, and so a seed gives the same text
                # whether or not the prompt was cached.
                chunk = chunk[:-1]
            done = len(chunk) == len(slot.to_prefill)
            n = put_tokens(batch, n, slot, chunk, logits_last=done)
            budget -= len(chunk)
            if done:
                due.append((slot, n - 1, []))
            added.append((slot, chunk))
        if n == 0:
            return finished
        batch.n_tokens = n
        with self.llama_lock:
            status = self.lib.llama_decode(self.model.ctx, batch)
            self._drafts_paused = False
            if status == 1 and any(drafts.values()):
                # No cells for the batch in a nearly full pool (llama.cpp found no room for it, and changed
                # nothing): nothing of this step was kept, so the next one does the same work without drafts.
                self._drafts_paused = True
                return finished
            if status != 0:
                for slot, _ in added:
                    finished.append(self._finish(slot, StopReason.FAILED, f"llama_decode failed ({status})"))
                return finished
            self.pool.decoded()
            for slot, chunk in added:
                slot.cached.extend(chunk)
                if slot.next_token is None:
                    del slot.to_prefill[:len(chunk)]
                else:
                    slot.next_token = None
            if len(generating) > 1 and not short_prefill:      # cells side by side: a token and its draft each
                self.pool.interleaved += sum(1 + len(drafts.get(s.seq_id, ())) for s in generating)
            sampled = []
            for slot, i, draft in due:
                # The model's own draw at each place; a draft is checked while the draws equal it.
                draws = []
                for j in range(len(draft) + 1):
                    token = slot.sampler.sample(self.model.ctx, i + j, self.model.n_vocab)
                    draws.append((token, self._logprob_entry(slot, i + j, token) if token is not None else None))
                    if j == len(draft) or token != draft[j]:
                        break
                sampled.append((slot, draws, draft))
        now = time.monotonic()
        for slot, draws, draft in sampled:
            job = slot.job
            if job.stats.generated_tokens == 0:
                slot.t_first_token = now
                job.stats.prompt_seconds = now - slot.t_admitted
            kept = 0
            try:
                for j, (token, entry) in enumerate(draws):
                    rewinds = slot.rewinds
                    ended = self._accept(slot, token, entry)
                    if ended or slot.rewinds != rewinds:
                        break
                    if j < len(draft) and token == draft[j]:
                        slot.cached.append(token)      # decoded in this step already
                        slot.next_token = None
                        kept += 1
                    else:
                        break
            except Exception as e:  # one request's failure must not end its batch-mates
                ended = StopReason.FAILED
                error = f"generation failed: {type(e).__name__}: {e}"
            else:
                error = None
            if draft:
                job.stats.drafted_tokens += len(draft)
                job.stats.draft_accepted += kept
                slot.draft_control.update(len(draft), kept, slot.long_repeat)
                if kept < len(draft):
                    self.pool.truncate(slot, len(slot.cached))     # the cells of what was not kept go
            if ended:
                finished.append(self._finish(slot, ended, error))
        return finished

    def _draft(self, slot: Slot, room: int, width: int) -> list[int]:
        """Tokens to propose after the slot's sampled token: as many as pay for the wider batch, never past
        its context, its reply's length, or the batch."""
        if slot.drafter is None:
            return []
        job = slot.job
        limit = min(room, job.n_ctx - len(slot.cached) - 1, job.max_new_tokens - job.stats.generated_tokens - 1)
        if limit <= 0:
            return []
        context = slot.cached + [slot.next_token]
        if self.draft_model is None:
            slot.drafter.sync(context)
            if not slot.drafter.has_match():
                return []                    # nothing repeats here: no cost, and the estimate stays as it is
        slot.long_repeat = (self.draft_model is None
                            and slot.drafter.repeat_length(DraftControl.LONG_REPEAT) >= DraftControl.LONG_REPEAT)
        cost = self.step_cost        # unmeasured: only what the request asks for
        paying = slot.draft_control.length(width, cost, slot.long_repeat) if cost else 0
        limit = min(limit, max(paying, job.request.sampler.draft_min))
        if limit <= 0:
            return []
        if self.draft_model is not None:
            return self.draft_model.propose(slot.seq_id, context, limit)
        return slot.drafter.propose(limit)

    def _reproducible(self, slot: Slot) -> bool:
        """Whether a fixed seed can give this slot's reply again: always with a context per slot; in a
        shared pool only when it runs alone (beside others their cells interleave with its own, and the
        arithmetic rounds differently). Where it cannot, the step that keeps it so is not spent."""
        return not self.model.shared_kv or not any(s.busy for s in self.slots if s is not slot)

    def _logprob_entry(self, slot: Slot, batch_index: int, token: int) -> TokenLogprob | None:
        """The sampled token's log-probability and the top alternatives, only when the request asks:
        from the draw's candidates (KoboldCpp's way), or from the model's own distribution (the
        logits llama.cpp just computed; OpenAI's and llama-server's way)."""
        request = slot.job.request
        if not request.logprobs:
            return None
        if request.logprobs_after_samplers:
            return slot.sampler.snapshot.entry(token)
        import numpy
        logits = numpy.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.model.ctx, batch_index),
                                          shape=(self.model.n_vocab,)).astype(numpy.float64)
        top = logits.max()
        norm = top + math.log(numpy.exp(logits - top).sum())
        n = request.top_logprobs
        best = numpy.argpartition(-logits, n)[:n] if n else numpy.array([], dtype=numpy.int64)
        best = best[numpy.argsort(-logits[best], kind="stable")]
        return TokenLogprob(token, float(logits[token] - norm), [(int(t), float(logits[t] - norm)) for t in best])

    MAX_BANS_AT_ONE_PLACE = 64     # then a phrase ban leaves no way on: the reply ends there
    MAX_REWINDS = 1024

    def _accept(self, slot: Slot, token: int, entry: TokenLogprob | None = None) -> StopReason | None:
        """Take one sampled token: emit its text, or take back a banned phrase, or say why generation ends."""
        job = slot.job
        if FAULT_INJECTION_MARKER and FAULT_INJECTION_MARKER in job.request.prompt:
            raise RuntimeError("fault injected for a test")
        if token is None or (slot.bans is not None and slot.bans.exhausted):
            return StopReason.END           # nothing may follow: the grammar, bans and biases allow no token
        if self.model.is_end_of_generation(token) or token in job.stop_tokens:
            return StopReason.END
        job.stats.generated_tokens += 1
        slot.generated.append(token)
        released, rewind = slot.guard.push(token, self.model.piece(token, job.request.render_special), entry)
        if rewind:
            return self._rewind(slot, rewind)
        for released_token, data, released_entry in released:
            self._emit(slot, released_token, data, released_entry)
        if slot.assembler.stopped_by is not None:
            job.stats.stop_string = slot.assembler.stopped_by
            return StopReason.STOP_STRING
        if job.stats.generated_tokens >= job.max_new_tokens:
            return StopReason.LENGTH
        slot.next_token = token
        return None

    def _emit(self, slot: Slot, token: int, data: bytes, entry: TokenLogprob | None):
        """A token's text goes to the stop-string assembler, and what it lets through to the readers."""
        job = slot.job
        if entry is not None:
            job.logprobs.append(entry)
        if not data and not job.request.render_special:
            # A control token shows no text, yet a stop string may name it (a template's start of turn).
            text = slot.assembler.feed(self.model.piece(token, special=True), hidden=True)
        else:
            text = slot.assembler.feed(data)
        if text:
            job.buffer.append(text)

    def _rewind(self, slot: Slot, n: int) -> StopReason | None:
        """Take back the last n tokens (a banned phrase begins in the first): the KV cache, the position
        and the samplers' state go back to where it began, its first token is banned there, and the
        token before it is decoded again to sample anew."""
        job = slot.job
        first = slot.generated[-n]
        del slot.generated[-n:]
        job.stats.generated_tokens -= n
        # The newest token was sampled but not decoded; the n - 1 before it are the cache's last.
        cut = len(slot.cached) - n
        slot.next_token = slot.cached[cut]
        self.pool.truncate(slot, cut)
        slot.rewinds += 1
        banned_here = slot.bans.ban(len(slot.generated), first)
        if banned_here > self.MAX_BANS_AT_ONE_PLACE or slot.rewinds > self.MAX_REWINDS:
            return StopReason.END
        slot.sampler.free()
        slot.sampler = self._sampler_for(slot)
        return None

    def _finish(self, slot: Slot, reason: StopReason, error: str | None = None) -> Job:
        job = slot.job
        if reason.finished:
            for token, data, entry in slot.guard.flush():
                self._emit(slot, token, data, entry)
            tail = slot.assembler.flush()
            if tail:
                job.buffer.append(tail)
        self.next_turns.expect(slot, job, reason)
        if slot.t_first_token and job.stats.generated_tokens:
            job.stats.generation_seconds = time.monotonic() - slot.t_first_token
        if slot.to_prefill:
            # The prompt was not fully read in: the cache holds only what was decoded.
            slot.to_prefill = []
        if reason is StopReason.FAILED:
            slot.cached = []       # after a failed decode the sequence's state is unknown
            self.pool.trimmed(slot)
        slot.sampler.free()
        slot.sampler = None
        slot.job = None
        slot.next_token = None
        slot.t_first_token = 0.0
        job.end(reason, error)
        return job

    def abort_all(self) -> list[Job]:
        return [self._finish(s, StopReason.ABORTED) for s in self.slots if s.busy]

    @functools.cached_property
    def identity(self) -> dict:
        """What a saved state of this engine's model and layout must have been made by (engine/saved_slots.py)."""
        return model_identity(self.model)

    def fail_all(self, error: str) -> list[Job]:
        return [self._finish(s, StopReason.FAILED, error) for s in self.slots if s.busy]
