"""The engine: admission, the generation step, a reply's end. Scheduler drives it through the protocol
scheduler.GenerationEngine, on the generation thread."""

from __future__ import annotations

import dataclasses
import functools
import secrets
import threading
import time
from typing import Callable

from ..errors import ModelLoadError, RequestError
from ..generation import GenerationRequest
from ..jobs import Job, PromptProgress, StopReason, TokenLogprob
from .llama_model import LlamaModel
from .adapters import LoraAdapters, ScaleKey
from .drafting import DraftModel, Speculation
from .slots import Slot, SlotState, put_tokens
from .prompt_cache import PromptCache, model_identity
from .kv_pool import KVPool
from .read_ahead import NextTurnReader
from .preparation import count_prompt_tokens, prepare_job, tokens_with_media
from .replies import ReplyWriter, new_reply
from .admission import bring_back, choose_slot
from .projector import Projector, decode_media
from .cpu_threads import ThreadGovernor


@dataclasses.dataclass
class StepBatch:
    """What one step decodes: the batch's length, and what each slot put in it."""
    n: int = 0
    # (slot, batch index of its first logits, the draft tokens whose logits follow): the slots that draw this step
    due: list[tuple[Slot, int, list[int]]] = dataclasses.field(default_factory=list)
    added: list[tuple[Slot, int]] = dataclasses.field(default_factory=list)   # (slot, tokens of its own decoded)
    drafted: bool = False           # drafts were proposed this step (in the batch, or left out for a short prompt)
    interleaved: int = 0            # cells several replies put side by side in a shared pool


# One decode's answer, as llama_decode gives it.
DECODE_OK, DECODE_NO_ROOM = 0, 1


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
    # Steps a LoRA scale set keeps the batch while replies under another wait: every change makes llama.cpp build its
    # graph again (12 ms on the starter model, near a step's cost: bench/results/lora.md), so turns of one step
    # would halve the speed; turns of 8 wait a waiting reply at most 8 steps.
    GROUP_TURN_STEPS = 8

    def __init__(self, model: LlamaModel, context_shift: bool = True, draft_most: int = 0,
                 draft_model: DraftModel | None = None, prompt_cache: PromptCache | None = None,
                 log: Callable[[str], None] = lambda line: None, projector: Projector | None = None,
                 threads: ThreadGovernor | None = None, adapters: LoraAdapters | None = None):
        """`threads`: the counts each decode runs with (default: the model's context's own, fixed); `adapters`: the
        model's LoRA adapters (default: none)."""
        self.model = model
        self.adapters = adapters if adapters is not None else LoraAdapters(model, [])
        self._step_key: ScaleKey = ()       # the LoRA scales of the last step's slots (their groups take turns)
        self._turn_steps = 0                # steps of the current turn
        self.projector = projector
        self.lib = model.lib
        # Context shift: reuse a cache whose front turns a client dropped, and shift a full context
        # instead of stopping. Needs a model whose cache positions can move.
        self.context_shift = context_shift and model.can_shift
        self.llama_lock = threading.Lock()
        self.slots = [Slot(i) for i in range(model.n_seq)]
        self._batch = self.lib.llama_batch_init(model.n_batch, 0, model.n_seq)
        self.pool = KVPool(model, self.slots, self.llama_lock, self.context_shift, prompt_cache)
        self.log = log
        self.next_turns = NextTurnReader(model, self.pool, log, tokenize=self._turn_tokens)
        self.speculation = Speculation(draft_most, draft_model)
        self.replies = ReplyWriter(model, self.pool)
        self.threads = threads or ThreadGovernor(self.lib.llama_n_threads(model.ctx),
                                                 threads=self.lib.llama_n_threads(model.ctx),
                                                 threads_batch=self.lib.llama_n_threads_batch(model.ctx))
        self._threads_set = 0               # the count last given to llama.cpp (0: its own, from the context)

    @property
    def n_slots(self) -> int:
        return len(self.slots)

    @property
    def compactions(self) -> int:
        return self.pool.compactions

    @property
    def set_aside(self) -> int:
        return self.pool.set_aside

    @property
    def step_cost(self):
        return self.speculation.step_cost

    @functools.cached_property
    def identity(self) -> dict:
        """What a saved state of this engine's model and layout must have been made by (engine/saved_slots.py)."""
        return model_identity(self.model)

    # -- on request threads -------------------------------------------------

    def prepare(self, request: GenerationRequest) -> Job:
        """The job, under the LoRA scales it asks for (or the global ones as they are now)."""
        adapter_key = self.adapters.key_for(request.lora)
        job = prepare_job(self.model, request, self.context_shift, self.projector)
        job.adapter_key = adapter_key
        return job

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return count_prompt_tokens(self.model, request, self.projector)

    # -- on the generation thread ------------------------------------------

    def ready_on_this_thread(self):
        """What is done before the first job, on the thread that will make every decode (the generation loop's).
        llama.cpp's CPU backend runs a team of OpenMP threads per calling thread: one decode made on another
        thread (start-up's) left its team beside the loop's, and every later step took twice as long on this
        2-core machine. So the step cost is measured here, while every slot is still empty."""
        if not any(s.cached for s in self.slots):
            with self.llama_lock:
                measured = self.speculation.measure(self.model, self._batch, len(self.slots), self.threads.load)
            if measured and self.speculation.due_again:
                self.log("drafts: the step costs were measured beside busy programs; measured again after a reply "
                         "once every core is free")

    def _turn_tokens(self, text: str, request) -> list[int]:
        """A chat's next turn as its prompt will be: its media as the placeholders the slot's cache holds."""
        if not request.media or self.projector is None:
            return self.model.tokenize(text, add_bos=request.add_bos)
        try:
            return tokens_with_media(self.model, self.projector, text, request.add_bos,
                                     iter(enumerate(request.media)), {})
        except (StopIteration, RequestError):
            return []                       # the rendered turn places the media otherwise: no guess

    def keep_ahead(self):
        """The loop is idle: get ahead of the next requests. Each chat's expected next turn is read into its slot,
        then the prompt cache takes copies of the idle slots' conversations (KVPool.keep_ahead); step costs that
        start-up measured beside busy programs are measured again once the cores are free."""
        for slot in self.slots:
            self.read_ahead(slot)
        self.pool.keep_ahead()
        self._measure_step_costs_again()

    def _measure_step_costs_again(self):
        """Where start-up measured the step costs beside busy programs and every core is free now: again."""
        if not self.speculation.due_again or not self.threads.cores_free():
            return
        try:
            with self.llama_lock:
                self.speculation.measure_again(self.model, self._batch, self.threads.generation.most,
                                               self.threads.load)
        except ModelLoadError as e:
            self.log(f"drafts: the step costs could not be measured again ({e}); start-up's stay")
            return
        cost = self.speculation.step_cost
        ms = ", ".join(f"{w}: {t}" for w, t in cost.report()["ms"].items())
        self.log(f"drafts: step costs measured again ({'beside busy programs still' if cost.beside_busy else 'quiet'}"
                 f"), ms by tokens in the batch: {ms}")

    def read_ahead(self, slot: Slot) -> int:
        """Read the idle slot's expected next turn (NextTurnReader), if it has one worth reading; the tokens read."""
        tokens = self.next_turns.guess(slot)
        if not tokens:
            return 0
        n = put_tokens(self._batch, 0, slot, tokens, logits_last=False)
        with self.llama_lock:
            status = self._decode(n, slot.adapter_key)
        if status != DECODE_OK:
            if status != DECODE_NO_ROOM:          # no room changed nothing; else the sequence is unknown
                self.pool.truncate(slot, 0)
            return 0
        slot.cached.extend(tokens)
        self.next_turns.was_read(slot, len(tokens))
        return len(tokens)

    def admit(self, job: Job) -> bool:
        """Place a job in the free slot whose cache it reuses most, and make that cache hold what it reuses."""
        free = [s for s in self.slots if not s.busy]
        if not free:
            return False
        self.ready_on_this_thread()         # the Scheduler has done it; an engine driven directly does it here
        prompt = job.prompt_tokens
        slot = choose_slot(free, prompt, lambda cached, p: self.pool.plan_reuse(cached, p)[0],
                           usable=lambda s: s.adapter_key == job.adapter_key)
        slot.expected = None
        if slot.adapter_key != job.adapter_key:
            # Its cells were computed under other LoRA scales: kept in the prompt cache under those, never reused.
            self.pool.stash(slot)
            self.pool.drop(slot)
            slot.adapter_key = job.adapter_key
        source = bring_back(self.pool, self.slots, slot, prompt)
        keep = self.pool.reuse(slot, prompt)
        keep = self.pool.borrow_prefix(slot, prompt, keep)
        keep = self._at_a_media_start(job, slot, prompt, keep)
        if not self.pool.make_room(len(prompt) - keep + 1, keep=slot):
            return False                   # a shared pool held by running replies: wait in the queue
        self.pool.set_aside_idle(slot, len(prompt) - keep + job.max_new_tokens)
        seed = job.request.sampler.seed
        job.stats.seed = seed if seed >= 0 else secrets.randbelow(1 << 31)
        job.stats.cached_tokens = keep
        job.stats.cache_source = source if keep else "none"
        now = time.monotonic()
        slot.start(new_reply(self.model, job, self.speculation.for_reply(job.request.sampler.draft), now),
                   prompt[keep:])
        slot.last_used = now
        self._report_progress(slot)
        return True

    @staticmethod
    def _report_progress(slot: Slot):
        """How much of its prompt the slot's job has read (a few reports a prompt: one at its start, one a chunk)."""
        job, reply = slot.job, slot.reply
        if job.stats.first_token_at:        # a context shift reading its cache again is no prompt reading
            return
        job.buffer.report_progress(PromptProgress(
            total=len(job.prompt_tokens), cache=job.stats.cached_tokens,
            processed=len(job.prompt_tokens) - len(slot.to_prefill),
            time_ms=int((time.monotonic() - reply.t_admitted) * 1000)))

    def _at_a_media_start(self, job: Job, slot: Slot, prompt: list[int], keep: int) -> int:
        """A reused cache that ends inside a media chunk's run gives back that run: a chunk is decoded whole."""
        start = keep
        while 0 < start < len(prompt) and prompt[start] < 0 and prompt[start] not in job.media:
            start -= 1
        if start != keep:
            self.pool.truncate(slot, start)
        return start

    def step(self) -> list[Job]:
        """Decode one batch and draw for every slot that is due; return the jobs that ended."""
        finished = [self._finish(s, StopReason.ABORTED) for s in self.slots if s.busy and s.job.cancelled.is_set()]
        if self.pool.compaction_due():
            self.pool.compact()
        finished += self._read_media()
        group = self._step_group()
        drafts = self._room_and_drafts(finished, group)
        batch = self._fill(drafts, group)
        if batch.n == 0:
            return finished
        with self.llama_lock:
            status = self._decode(batch.n, self._step_key)
            self.speculation.paused = False
            if status == DECODE_NO_ROOM and batch.drafted:
                # No cells for the batch in a nearly full pool (llama.cpp changed nothing): nothing of this step
                # was kept, so the next one does the same work without drafts (and the room they were given).
                self.speculation.paused = True
                return finished
            if status == DECODE_OK:
                for slot, n in batch.added:
                    reading = slot.state is SlotState.READING_PROMPT
                    slot.decoded(n)
                    if reading:
                        self._report_progress(slot)
                self.pool.interleaved += batch.interleaved
                draws = [(slot, self._draw(slot, i, draft), draft) for slot, i, draft in batch.due]
        if status != DECODE_OK:
            return finished + [self._finish(slot, StopReason.FAILED, f"llama_decode failed ({status})")
                               for slot, _ in batch.added]
        return finished + self._take(draws)

    def _step_group(self) -> list[Slot]:
        """The busy slots this step decodes: those under one LoRA scale set, since llama.cpp applies one set to a
        whole batch (llama-server batches only slots whose adapters are equal, too). Several sets take turns of
        GROUP_TURN_STEPS steps, in a fixed order; with one set (always, without adapters) every busy slot."""
        keys = sorted({s.adapter_key for s in self.slots if s.busy})
        if len(keys) > 1:
            if self._step_key not in keys or self._turn_steps >= self.GROUP_TURN_STEPS:
                self._step_key = next((k for k in keys if k > self._step_key), keys[0])
                self._turn_steps = 0
            self._turn_steps += 1
        elif keys:
            self._step_key = keys[0]
        return [s for s in self.slots if s.busy and s.adapter_key == self._step_key]

    def _read_media(self) -> list[Job]:
        """Every media chunk that a reading slot's prompt has come to, each in a decode of its own; the jobs
        that failed."""
        failed = []
        for slot in self.slots:
            while slot.state is SlotState.READING_PROMPT and slot.to_prefill and slot.to_prefill[0] < 0:
                chunk = slot.job.media[slot.to_prefill[0]]
                started = time.perf_counter()
                with self.llama_lock:
                    self.adapters.apply(slot.adapter_key)
                    status = decode_media(self.model, self.projector, chunk, slot.seq_id, len(slot.cached))
                slot.job.stats.media_chunks += 1
                slot.job.stats.media_seconds += time.perf_counter() - started
                if status != DECODE_OK:
                    failed.append(self._finish(slot, StopReason.FAILED,
                                               f"decoding the {chunk.kind.value} failed ({status})"))
                    break
                self.pool.decoded()
                slot.decoded(chunk.n_tokens)
                self._report_progress(slot)
        return failed

    def _decode(self, n: int, adapter_key: ScaleKey) -> int:
        """Decode the batch's first n tokens under these LoRA scales, with as many threads as the governor gives it
        (and tell it what that cost); the caller holds the llama lock."""
        self.adapters.apply(adapter_key)
        self._batch.n_tokens = n
        count = self.threads.count(n)
        if count != self._threads_set:
            self.model.set_threads(count)
            self._threads_set = count
            draft = self.speculation.draft_model
            if draft is not None and n <= self.threads.GENERATION_WIDTH:   # its decodes sit between the steps
                draft.model.set_threads(count)
        started = time.perf_counter()
        status = self.lib.llama_decode(self.model.ctx, self._batch)
        if status == DECODE_OK:
            self.threads.record(n, time.perf_counter() - started)
            self.pool.decoded()
        return status

    def _room_and_drafts(self, finished: list[Job], group: list[Slot]) -> dict[int, list[int]]:
        """Each generating slot's room for this step (of the step's `group`), a context shift where it has none (or
        the end of its reply at its length), and how far it drafts; its draft by sequence id."""
        drafts: dict[int, list[int]] = {}
        taking = 0                          # cells the generating slots take in this step
        width = sum(1 for s in group if s.state is SlotState.GENERATING)   # the batch before drafts
        for slot in group:
            if slot.state is not SlotState.GENERATING:
                continue
            job = slot.job
            full = len(slot.cached) >= job.n_ctx or not self.pool.make_room(taking + 1)
            if full and self.context_shift:       # its own context, or its share of a full pool
                shifted = self.pool.shift(slot)
                job.stats.shifted_tokens += shifted
                full = not shifted or not self.pool.make_room(taking + 1)
            if full:
                finished.append(self._finish(slot, StopReason.LENGTH))
                continue
            draft = [] if self.speculation.paused else self._draft(slot, self.model.n_batch - taking - 1, width)
            if draft and not self.pool.make_room(taking + 1 + len(draft)):
                draft = []
            drafts[slot.seq_id] = draft
            taking += 1 + len(draft)
            width += len(draft)
        return drafts

    def _draft(self, slot: Slot, room: int, width: int) -> list[int]:
        reply, job = slot.reply, slot.job
        if reply.drafts is None:
            return []
        limit = min(room, job.n_ctx - len(slot.cached) - 1, job.max_new_tokens - job.stats.generated_tokens - 1)
        if job.media and self.speculation.draft_model is not None:
            return []                       # a draft model cannot read the media chunks its context holds
        draft = self.speculation.propose(reply.drafts, slot.seq_id, slot.cached + [slot.next_token], limit,
                                         job.request.sampler.draft_min, width)
        cut = next((i for i, t in enumerate(draft) if t < 0), len(draft))
        return draft[:cut]                  # never a media placeholder that repeated text proposed

    def _fill(self, drafts: dict[int, list[int]], group: list[Slot]) -> StepBatch:
        """The step's batch: every generating slot's drawn token (and its draft), and prompt to read. A short new
        prompt gets a step of its own: its first token comes sooner, and the others lose one short step. A long one
        is read in chunks beside the others' tokens, so they keep streaming while it is read."""
        batch = StepBatch(drafted=any(drafts.values()))
        prefilling = [s for s in group if s.state is SlotState.READING_PROMPT]
        generating = [s for s in group if s.state is SlotState.GENERATING]
        short_prefill = bool(prefilling) and sum(len(s.to_prefill) for s in prefilling) <= self.SHORT_PROMPT
        if not short_prefill:
            for slot in generating:
                # The drawn token and its draft, each with logits; only the drawn one is the cache's for now:
                # the draft's cells are kept or cut once the model has checked it.
                draft = drafts.get(slot.seq_id, [])
                first = batch.n
                batch.n = put_tokens(self._batch, batch.n, slot, [slot.next_token, *draft], logits_last=True,
                                     logits_all=bool(draft))
                batch.due.append((slot, first, draft))
                batch.added.append((slot, 1))
            if len(generating) > 1:         # cells side by side: a token and its draft each
                batch.interleaved = sum(1 + len(drafts.get(s.seq_id, ())) for s in generating)
        budget = self.model.n_batch if short_prefill or not generating else self.PREFILL_CHUNK_WHILE_STREAMING
        for slot in prefilling:
            room = min(budget, self.model.n_batch - batch.n)
            if room <= 0:
                break
            chunk = slot.to_prefill[:room]
            media_at = next((i for i, t in enumerate(chunk) if t < 0), None)
            if media_at is not None:            # the text before a media chunk; the chunk next step
                chunk = chunk[:media_at]
                if not chunk:
                    continue
            if len(chunk) == len(slot.to_prefill) > 1 and self._reproducible(slot):
                # The prompt's last token is read in a step of its own, as it is when the rest is cached:
                # a batch of one rounds differently from a long one, and so a seed gives the same text
                # whether or not the prompt was cached.
                chunk = chunk[:-1]
            done = len(chunk) == len(slot.to_prefill)
            batch.n = put_tokens(self._batch, batch.n, slot, chunk, logits_last=done)
            budget -= len(chunk)
            if done:
                batch.due.append((slot, batch.n - 1, []))
            batch.added.append((slot, len(chunk)))
        return batch

    def _reproducible(self, slot: Slot) -> bool:
        """Whether a fixed seed can give this slot's reply again: always with a context per slot; in a
        shared pool only when it runs alone (beside others their cells interleave with its own, and the
        arithmetic rounds differently). Where it cannot, the step that keeps it so is not spent."""
        return not self.model.shared_kv or not any(s.busy for s in self.slots if s is not slot)

    def _draw(self, slot: Slot, index: int, draft: list[int]) -> list[tuple[int | None, TokenLogprob | None]]:
        """The model's own draws at each place from batch index `index` on: a draft is checked while the draws
        equal it. The caller holds the llama lock."""
        reply, draws = slot.reply, []
        for j in range(len(draft) + 1):
            token = reply.sampler.sample(self.model.ctx, index + j, self.model.n_vocab)
            draws.append((token, self.replies.logprob_entry(reply, index + j, token) if token is not None else None))
            if j == len(draft) or token != draft[j]:
                break
        return draws

    def _take(self, drawn: list[tuple[Slot, list, list[int]]]) -> list[Job]:
        """Each slot's draws into its reply: a draft token is kept while the draws equal it; the jobs that ended."""
        finished, now = [], time.monotonic()
        for slot, draws, draft in drawn:
            reply, job = slot.reply, slot.job
            if job.stats.generated_tokens == 0:
                reply.t_first_token = job.stats.first_token_at = now
                job.stats.prompt_seconds = now - reply.t_admitted
            kept, ended, error = 0, None, None
            try:
                for j, (token, entry) in enumerate(draws):
                    rewinds = reply.rewinds
                    ended = self.replies.accept(slot, token, entry)
                    if ended or reply.rewinds != rewinds or j >= len(draft) or token != draft[j]:
                        break
                    slot.draft_token_kept()           # decoded in this step already
                    kept += 1
            except Exception as e:  # one request's failure must not end its batch-mates
                ended, error = StopReason.FAILED, f"generation failed: {type(e).__name__}: {e}"
            if draft:
                job.stats.drafted_tokens += len(draft)
                job.stats.draft_accepted += kept
                reply.drafts.control.update(len(draft), kept, reply.drafts.long_repeat)
                if kept < len(draft):
                    self.pool.truncate(slot, len(slot.cached))     # the cells of what was not kept go
            if ended:
                finished.append(self._finish(slot, ended, error))
        return finished

    def _finish(self, slot: Slot, reason: StopReason, error: str | None = None) -> Job:
        reply = slot.reply
        job = reply.job
        if reason.finished:
            self.replies.flush(reply)
        self.next_turns.expect(slot, job, reason)
        if reply.t_first_token and job.stats.generated_tokens:
            job.stats.generation_seconds = time.monotonic() - reply.t_first_token
        slot.finish()
        if reason is StopReason.FAILED:
            self.pool.drop(slot)   # after a failed decode the sequence's state is unknown
        reply.sampler.free()
        job.end(reason, error)
        return job

    def abort_all(self) -> list[Job]:
        return [self._finish(s, StopReason.ABORTED) for s in self.slots if s.busy]

    def fail_all(self, error: str) -> list[Job]:
        return [self._finish(s, StopReason.FAILED, error) for s in self.slots if s.busy]
