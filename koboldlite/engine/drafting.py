"""Speculative decoding: drafts from the context or a draft model, checked by the model's own draws."""

from __future__ import annotations

import math
import os
import time

from ..errors import ModelLoadError
from .system_load import SystemLoad
from .llama_model import LlamaModel, ScratchContext, common_prefix_length


class NgramDrafter:
    """Draft tokens from a slot's own context (prompt lookup): the longest of its last MAX_N..MIN_N tokens that
    occurred before proposes what followed its latest earlier occurrence. The latest occurrence, because text
    that repeats (a passage rewritten, code edited, names in a story) repeats what was just read; the longest
    match, because a 2-token match is as often chance as copy. An index of every n-gram's latest continuation
    keeps a lookup O(1) whatever the context's length; it follows the context as it grows and is rebuilt when
    the context changes otherwise (a rewind, a shift).

    Each draft is a point mass (one proposed token per place), so the exact speculative-sampling rule reduces
    to: draw from the model's own distribution at each place and keep the draft while the draws equal it
    (see speculative_accept). The text's distribution is unchanged, and a seed draws the same numbers."""

    MIN_N, MAX_N = 3, 6

    def __init__(self):
        self.tokens: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}     # n-gram -> the position after its latest occurrence

    def sync(self, tokens: list[int]):
        """Follow the slot's context: appended tokens are indexed, any other change rebuilds the index."""
        n = len(self.tokens)
        if len(tokens) < n or tokens[:n] != self.tokens:
            self.tokens, self._next, n = [], {}, 0
        for i in range(n, len(tokens)):
            self.tokens.append(tokens[i])
            for k in range(self.MIN_N, self.MAX_N + 1):
                if i - k >= 0:
                    self._next[tuple(self.tokens[i - k:i])] = i

    def has_match(self) -> bool:
        t = self.tokens
        return len(t) > self.MIN_N and tuple(t[-self.MIN_N:]) in self._next

    def source(self) -> int | None:
        """Where the earlier text that the context's end repeats goes on: the position after the latest earlier
        occurrence of its longest repeated tail (MAX_N..MIN_N tokens); None if nothing repeats."""
        t = self.tokens
        for k in range(self.MAX_N, self.MIN_N - 1, -1):
            if len(t) > k:
                at = self._next.get(tuple(t[-k:]))
                if at is not None:
                    return at
        return None

    def repeat_length(self, most: int = 32) -> int:
        """For how many tokens (up to `most`) the context's end has been repeating the earlier text: a long
        repeat (text copied word for word) goes on far more often than a fresh 3-token match."""
        at = self.source()
        if at is None:
            return 0
        t, end, n = self.tokens, len(self.tokens), 0
        while n < most and at - 1 - n >= 0 and t[at - 1 - n] == t[end - 1 - n]:
            n += 1
        return n

    def propose(self, limit: int) -> list[int]:
        at = self.source()
        return [] if at is None else self.tokens[at:at + limit]


def speculative_accept(p, q, draft: int, rng) -> tuple[int, bool]:
    """The speculative-sampling rule for one place (Leviathan et al. 2023; Chen et al. 2023): keep the draft
    token d with probability min(1, p(d) / q(d)), else draw from the residual max(0, p - q), normalized. The
    token that comes out is distributed as p, whatever q was. Returns (token, kept the draft).
    With a point-mass q (n-gram and greedy drafts) this is: draw x from p, keep the draft iff x == d; the engine
    does that, drawing with the request's own sampler chain."""
    import numpy
    p, q = numpy.asarray(p, dtype=numpy.float64), numpy.asarray(q, dtype=numpy.float64)
    if q[draft] > 0 and rng.random() < min(1.0, p[draft] / q[draft]):
        return draft, True
    residual = numpy.maximum(p - q, 0.0)
    total = residual.sum()
    residual = residual / total if total > 0 else p
    return int(rng.choice(len(p), p=residual)), False


class DraftModel:
    """A small second model with the target's vocabulary that drafts greedily (a point mass again: the same rule
    keeps the text the target's). Its own llama context, one sequence per slot, each following its slot's context
    by common prefix: what the target kept of a draft is already in it, what it did not is cut."""

    def __init__(self, path: str, target: LlamaModel, n_ctx: int, n_threads: int, n_gpu_layers: int,
                 show_llama_log: bool = False):
        # Its decodes run between the target's on the same thread: on the target's threadpools where it has them.
        pools = target.threadpools.shared if target.threadpools else None
        self.model = LlamaModel(path, n_ctx=n_ctx, n_seq=target.n_seq, n_threads=n_threads,
                                n_gpu_layers=n_gpu_layers, n_batch=min(512, n_ctx), show_llama_log=show_llama_log,
                                share_threadpools=pools)
        mismatch = self._vocabulary_mismatch(target)
        if mismatch:
            self.model.close()
            raise ModelLoadError(f"the draft model {os.path.basename(path)} cannot draft for "
                                 f"{os.path.basename(target.path)}: {mismatch}")
        self.lib = self.model.lib
        self.cached: list[list[int]] = [[] for _ in range(target.n_seq)]
        self.batch = self.lib.llama_batch_init(self.model.n_batch, 0, 1)

    def _vocabulary_mismatch(self, target: LlamaModel) -> str | None:
        a, b = self.model, target
        if a.n_vocab != b.n_vocab:
            return f"its vocabulary has {a.n_vocab} tokens, the model's {b.n_vocab}"
        for t in range(a.n_vocab):
            if a.piece(t, special=True) != b.piece(t, special=True):
                return f"token {t} is {a.piece(t, special=True)!r} in one and {b.piece(t, special=True)!r} in the other"
        return None

    def _decode(self, seq: int, tokens: list[int], start: int) -> bool:
        lib, batch = self.lib, self.batch
        for at in range(0, len(tokens), self.model.n_batch):
            chunk = tokens[at:at + self.model.n_batch]
            for i, t in enumerate(chunk):
                batch.token[i], batch.pos[i] = t, start + at + i
                batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = 1, seq, i == len(chunk) - 1
            batch.n_tokens = len(chunk)
            if lib.llama_decode(self.model.ctx, batch) != 0:
                return False
        return True

    def propose(self, seq: int, context: list[int], limit: int) -> list[int]:
        """Up to `limit` tokens the draft model would write after `context` (its argmax each time)."""
        import numpy
        if len(context) + limit >= self.model.n_ctx:
            return []
        lib, memory = self.lib, self.model.memory
        cached = self.cached[seq]
        keep = min(common_prefix_length(cached, context), len(context) - 1)   # the last one gives the logits
        lib.llama_memory_seq_rm(memory, seq, keep, -1)
        del cached[keep:]
        if not self._decode(seq, context[keep:], keep):
            lib.llama_memory_seq_rm(memory, seq, -1, -1)
            cached.clear()
            return []
        cached.extend(context[keep:])
        draft = []
        n_vocab = self.model.n_vocab
        while True:
            logits = numpy.ctypeslib.as_array(lib.llama_get_logits_ith(self.model.ctx, -1), shape=(n_vocab,))
            token = int(logits.argmax())
            if self.model.is_end_of_generation(token):
                break
            draft.append(token)
            if len(draft) == limit or not self._decode(seq, [token], len(cached)):
                break
            cached.append(token)
        return draft

    def close(self):
        self.lib.llama_batch_free(self.batch)
        self.model.close()


class StepCost:
    """What a decode of n tokens costs here, measured at start-up (a few decodes of each width on this machine's
    llama.cpp build), and again after a reply on a quiet machine where start-up's measurement met busy programs
    (Speculation.measure_again): drafting pays only where a wider batch costs less than the tokens it is expected to
    add.
    On this project's 2-core CPU a 9-token batch costs about five 1-token steps; on a GPU it costs about one."""

    WIDTHS = (1, 2, 4, 8, 16, 32)
    # Measuring stops at the width that takes it past this (the wider ones are extrapolated): a slow device, where the
    # first decode of each batch shape also builds its kernels (Vulkan on Mesa's lavapipe), took two minutes to start.
    BUDGET_SECONDS = 5.0
    # Cores' worth of the other programs' CPU over the measurement that make it doubtful: one busy loop beside the
    # two threads of this project's 2-core machine takes about two thirds of a core, and doubled a 1-token step.
    # Lower than the thread count's noise allowance (CountControl.SLACK): a doubtful table costs one more
    # measurement after a reply, a wrong one the drafts' worth for the process's life.
    BUSY = 0.5

    def __init__(self, widths: list[int], seconds: list[float], beside_busy: bool = False):
        """`beside_busy`: measured while other programs took cores (see measure)."""
        self.widths, self.seconds, self.beside_busy = widths, seconds, beside_busy

    @classmethod
    def measure(cls, model: "LlamaModel | ScratchContext", batch, most: int, reps: int = 2,
                load: SystemLoad | None = None) -> "StepCost":
        """Time decodes of each width up to `most` after a short prefix, in sequence 0 (then emptied): about half
        a second on a CPU, BUDGET_SECONDS at most past the first two widths. The caller holds the llama lock, on the
        thread that makes every decode. `load`: the other programs' CPU use over the measurement decides
        beside_busy. Beside a busy program every width's decodes wait at barriers for a taken core, and by unequal
        amounts: servers started beside busy loops on this project's 2-core machine kept tables with a 1-token step
        at 2.9 s, drafted nothing or less for their whole lives, and copied a passage at 0.72 to 0.93 of the speed
        of servers started quiet (bench/README.md, issue 36)."""
        before = load.reading() if load is not None else None
        cost = cls._measured(model, batch, most, reps)
        if before is not None:
            others = load.others_between(before, load.reading())
            if others is None:          # too short a measurement to read the average: who runs at its end
                now = load.running_now()
                cost.beside_busy = now is not None and now > 0
            else:
                cost.beside_busy = others > cls.BUSY
        return cost

    @classmethod
    def _measured(cls, model, batch, most: int, reps: int) -> "StepCost":
        lib, ctx, memory = model.lib, model.ctx, model.memory
        # The batch holds n_batch tokens (--batchsize may be as small as 16): no decode here may be wider.
        prefix = min(64, model.n_batch)
        widths = [w for w in cls.WIDTHS if w <= min(max(2, most), model.n_batch)]
        filler = max(model.bos, 0)

        def decode(n: int, pos: int, logits: bool) -> float:
            for i in range(n):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = filler, pos + i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, logits
            batch.n_tokens = n
            started = time.perf_counter()
            ok = lib.llama_decode(ctx, batch) == 0
            return time.perf_counter() - started if ok else math.inf
        started = time.perf_counter()
        decode(prefix, 0, False)
        seconds = []
        for w in widths:
            if len(seconds) >= 2 and time.perf_counter() - started > cls.BUDGET_SECONDS:
                break
            runs = []
            for _ in range(reps + 1):                  # the first of each width warms it up
                runs.append(decode(w, prefix, True))
                lib.llama_memory_seq_rm(memory, 0, prefix, -1)
            seconds.append(min(runs[1:]))
        lib.llama_memory_seq_rm(memory, 0, -1, -1)
        if not all(math.isfinite(t) for t in seconds):
            return cls([1, 2], [1.0, 1e9])           # could not measure: never draft
        return cls(widths[:len(seconds)], seconds)

    def report(self) -> dict:
        return {"ms": {w: round(t * 1000, 2) for w, t in zip(self.widths, self.seconds)},
                "beside_busy_programs": self.beside_busy}

    def __call__(self, n: int) -> float:
        w, t = self.widths, self.seconds
        if n <= w[0]:
            return t[0]
        for i in range(1, len(w)):
            if n <= w[i]:
                return t[i - 1] + (t[i] - t[i - 1]) * (n - w[i - 1]) / (w[i] - w[i - 1])
        return t[-1] + (t[-1] - t[-2]) * (n - w[-1]) / (w[-1] - w[-2])      # on past the widest measured


class DraftControl:
    """How far a slot drafts in a step: as far as the tokens it is expected to gain outweigh what the wider
    batch costs. The gain of a draft of k tokens is a + a^2 + ... + a^k, a being the share of drafted tokens
    this slot's model has kept lately (a draft is kept up to its first miss); the cost is the extra decode
    time, valued at the batch's own tokens per second. Where that is nothing (text that does not repeat) it
    does not draft, and its estimate drifts back towards the prior, so it tries again later.

    Two estimates: one for a draft that goes on a long repeat (the context's end has been copying the earlier
    text for LONG_REPEAT tokens or more) and one for a fresh match. Measured on bench_speculative's workloads
    with SmolLM2, drafts of 8: a long repeat's first token was kept 95% of the time, 7 of 8 tokens on average;
    a fresh 3-token match's 73%, and 3.6 of 8 (each token checked kept about 80% of the time). One estimate for
    both learnt the fresh matches' misses and then drafted short, or not at all, through passages copied word
    for word."""

    LONG_REPEAT = 8
    PRIORS = {False: 0.8, True: 0.95}    # fresh match, long repeat: the share of checked tokens kept, measured
    LEARN = 0.15              # weight of each drafted token's outcome in the estimate
    DRIFT = 0.02              # per step without drafts, back towards the prior

    def __init__(self, most: int):
        self.most = most
        self.rates = dict(self.PRIORS)

    @property
    def rate(self) -> float:
        """The fresh matches' estimate."""
        return self.rates[False]

    @rate.setter
    def rate(self, value: float):
        self.rates[False] = value

    def length(self, width: int, cost: StepCost, long_repeat: bool = False, drafting: float = 0.0) -> int:
        """The best draft length for a slot joining a batch of `width` tokens; 0: no draft. `drafting`: seconds a
        drafted token costs to make (a draft model's decode of one token; drafts from the context cost nothing)."""
        rate = self.rates[long_repeat]
        base = cost(width)
        value = width / base                      # tokens per second of the batch without this draft
        best_k, best, gain, p = 0, 0.0, 0.0, 1.0
        for k in range(1, self.most + 1):
            p *= rate
            gain += p
            net = gain - (cost(width + k) - base + k * drafting) * value
            if net > best:
                best_k, best = k, net
        if not best_k:
            self.rates[long_repeat] = rate + self.DRIFT * (self.PRIORS[long_repeat] - rate)
        return best_k

    def update(self, drafted: int, kept: int, long_repeat: bool = False):
        """Tokens are checked in order up to the first one the model did not keep."""
        rate = self.rates[long_repeat]
        for i in range(min(drafted, kept + 1)):
            rate += self.LEARN * ((1.0 if i < kept else 0.0) - rate)
        self.rates[long_repeat] = rate


class SlotDrafts:
    """One reply's drafting: the index of its context's n-grams (none when a draft model drafts) and its acceptance
    estimates; `long_repeat` says whether this step's draft goes on a long repeat."""

    def __init__(self, most: int, from_context: bool):
        self.ngrams = NgramDrafter() if from_context else None
        self.control = DraftControl(most)
        self.long_repeat = False


class Speculation:
    """The engine's part of speculative decoding: which replies draft, how far each drafts in a step (as far as the
    tokens it is expected to gain pay for the wider batch, on this machine's measured step costs), and what their
    drafts were worth. Drafts come from each reply's own context, or from a draft model."""

    MEASUREMENTS_MOST = 4     # of the step costs: start-up's and 3 more (a machine always busy keeps the last)

    def __init__(self, most: int, draft_model: DraftModel | None = None):
        self.most = most                  # tokens a draft may propose per step; 0: no drafts
        self.draft_model = draft_model
        self.step_cost: StepCost | None = None   # measured on the thread that decodes (Engine.ready_on_this_thread)
        self.measurements = 0             # of the step costs: at start-up, and again while they were beside_busy
        self._widest = 0                  # the widest decode they time
        self._no_scratch = False          # llama.cpp made no scratch context: start-up's table stays
        self.drafting = 0.0               # seconds a drafted token costs to make: a draft model's 1-token decode
        self.paused = False               # for one step, after llama.cpp found no room for a batch with drafts

    def measure(self, model: LlamaModel, batch, n_slots: int, load: SystemLoad | None = None) -> bool:
        """The step costs, once, while every slot is empty; the caller holds the llama lock on the decoding thread.
        Whether it measured them now."""
        if not self.most or self.step_cost is not None:
            return False
        self._widest = min(model.n_batch - 64, n_slots * (1 + self.most), model.n_ctx // 2)
        self.step_cost = StepCost.measure(model, batch, self._widest, load=load)
        if self.draft_model is not None:     # its context is empty too: nothing drafted yet
            self.drafting = self._draft_token_seconds(self.draft_model.model, self.draft_model.batch)
        self.measurements += 1
        return True

    @staticmethod
    def _draft_token_seconds(draft: "LlamaModel | ScratchContext", batch) -> float:
        """What the draft model's decode of one token costs (it drafts one token a decode): a step of its own. The
        starter model drafting for itself made each drafted token cost a whole step, and drafted at 67-88 tokens/s
        where the one server in eight whose table happened to say no ran at 110 (bench/README.md, issue 36)."""
        return StepCost.measure(draft, batch, 1).seconds[0]

    @property
    def due_again(self) -> bool:
        """Whether the step costs were measured beside busy programs: measure_again at the next quiet moment."""
        return self.step_cost is not None and self.step_cost.beside_busy and \
            self.measurements < self.MEASUREMENTS_MOST and not self._no_scratch

    def measure_again(self, model: LlamaModel, batch, n_threads: int, load: SystemLoad | None):
        """The step costs again, at `n_threads` (the count start-up measured them at), where they were measured
        beside busy programs: the caller (the idle loop, after a reply) has found every core free. On a scratch
        context of the model, so that the slots' cached conversations stay as they are; a measurement that meets
        busy programs again is taken, and stays due (up to MEASUREMENTS_MOST). Raises ModelLoadError where llama.cpp
        makes no scratch context (no memory left for its buffers): then start-up's table stays, and none is tried
        again."""
        prefix = min(64, model.n_batch)
        try:
            with model.scratch_context(prefix + max(2, self._widest), n_threads) as scratch:
                self.step_cost = StepCost.measure(scratch, batch, self._widest, load=load)
            if self.draft_model is not None:
                draft = self.draft_model.model
                with draft.scratch_context(min(64, draft.n_batch) + 2, n_threads) as scratch:
                    self.drafting = self._draft_token_seconds(scratch, self.draft_model.batch)
        except ModelLoadError:
            self._no_scratch = True
            raise
        self.measurements += 1

    def report(self) -> dict | None:
        """The step costs the drafts are weighed against (None while drafts are off), and what a drafted token costs
        to make."""
        if not self.most or self.step_cost is None:
            return None
        return {**self.step_cost.report(), "measurements": self.measurements,
                "draft_token_ms": round(self.drafting * 1000, 2)}

    def for_reply(self, draft: bool) -> SlotDrafts | None:
        """A new reply's drafting, when drafts are on and its request did not turn them off."""
        return SlotDrafts(self.most, self.draft_model is None) if self.most and draft else None

    def propose(self, drafts: SlotDrafts, seq_id: int, context: list[int], limit: int, draft_min: int,
                width: int) -> list[int]:
        """Tokens to propose after `context` (the slot's cache and its drawn token): as many as pay for the wider
        batch (a batch of `width` tokens before this draft), at least `draft_min` where the context repeats, at most
        `limit` (its context, its reply's length, the batch)."""
        if limit <= 0:
            return []
        if self.draft_model is None:
            drafts.ngrams.sync(context)
            if not drafts.ngrams.has_match():
                return []                    # nothing repeats here: no cost, and the estimate stays as it is
            drafts.long_repeat = drafts.ngrams.repeat_length(DraftControl.LONG_REPEAT) >= DraftControl.LONG_REPEAT
        else:
            drafts.long_repeat = False
        paying = drafts.control.length(width, self.step_cost, drafts.long_repeat, self.drafting) \
            if self.step_cost else 0
        limit = min(limit, max(paying, draft_min))   # unmeasured: only what the request asks for
        if limit <= 0:
            return []
        if self.draft_model is not None:
            return self.draft_model.propose(seq_id, context, limit)
        return drafts.ngrams.propose(limit)
