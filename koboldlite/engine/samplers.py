"""Sampling: llama.cpp's sampler chain in KoboldCpp's order, and our own samplers for what it lacks."""

from __future__ import annotations

import collections
import ctypes
import math
from typing import Callable

from ..errors import Invalid
from ..generation import (
    SAMPLER_REP_PEN, SAMPLER_TEMP, SAMPLER_TFS, SAMPLER_TOP_A, SAMPLER_TOP_K, SAMPLER_TOP_P, SAMPLER_TYPICAL,
    SamplerSettings
)
from ..jobs import TokenLogprob
from .llama_model import LlamaModel


class CandidateSampler:
    """A sampler of our own in llama.cpp's chain, through its `llama_sampler_i` interface.

    `apply` gets the candidate array as one numpy view (id, logit, p) over llama.cpp's own buffer and
    works on it whole; `accept` sees each token the chain accepts. A filter keeps the best `n` by
    sorting the view in place and shrinking the array's size, as llama.cpp's own filters do.
    """

    def __init__(self, lib, name: str, apply: Callable, accept: Callable[[int], None] | None = None):
        import numpy
        self._np = numpy
        self._token_data = lib.llama_token_data
        self._name = name.encode()
        self._apply_fn = apply
        self._accept_fn = accept
        self._callbacks = [lib.llama_sampler_i_name(lambda smpl: self._name),
                           lib.llama_sampler_i_apply(self._apply)]
        iface = lib.llama_sampler_i()
        iface.name, iface.apply = self._callbacks
        if accept is not None:
            self._callbacks.append(lib.llama_sampler_i_accept(lambda smpl, token: accept(token)))
            iface.accept = self._callbacks[-1]
        self._iface = iface           # llama.cpp keeps a pointer to it: it lives as long as this object
        self.sampler = lib.llama_sampler_init(ctypes.byref(iface), None)

    def _apply(self, smpl, cur_p):
        arr = cur_p.contents
        if arr.size == 0:
            return
        data = (self._token_data * arr.size).from_address(ctypes.cast(arr.data, ctypes.c_void_p).value)
        keep = self._apply_fn(self._np.ctypeslib.as_array(data), arr.sorted)
        if keep is not None:          # the view is now sorted by logit, best first: keep the best `keep`
            arr.size = max(1, keep)
            arr.sorted = True

    @staticmethod
    def sort(view) -> None:
        order = view["logit"].argsort(kind="stable")[::-1]
        view[:] = view[order]


def softmax(logits):
    import numpy
    e = numpy.exp(logits - logits.max())
    return e / e.sum()


def top_a_filter(a: float):
    """KoboldCpp's top-a: drop tokens less likely than a * p_max squared."""
    def apply(view, sorted_):
        if not sorted_:
            CandidateSampler.sort(view)
        p = softmax(view["logit"])
        below = p < a * p[0] * p[0]
        return int(below.argmax()) if below.any() else None
    return apply


def tail_free_filter(z: float):
    """KoboldCpp's tail-free sampling: cut where the normalised curvature of the sorted
    probabilities has summed past z."""
    import numpy
    def apply(view, sorted_):
        if len(view) <= 2:
            return None
        if not sorted_:
            CandidateSampler.sort(view)
        p = softmax(view["logit"])
        d2 = numpy.abs(numpy.diff(p, 2))
        total = d2.sum()
        d2 = d2 / total if total > 1e-6 else numpy.full(len(d2), 1.0 / len(d2))
        past = numpy.cumsum(d2) > z
        past[:1] = False                       # keep at least one
        return int(past.argmax()) if past.any() else None
    return apply


def smoothing_transform(factor: float, curve: float):
    """KoboldCpp's quadratic (and, with a curve above 1, cubic) smoothing of the logits around the best one."""
    k, c = (3 - curve) / 2, (curve - 1) / 2
    def apply(view, sorted_):
        logits = view["logit"]
        h = logits.max()
        d = logits - h
        view["logit"] = -(k * factor * d * d) + (c * factor * d * d * d) + h
        return None
    return apply


class SlopedRepetitionPenalty:
    """KoboldCpp's repetition penalty with `rep_pen_slope`: tokens seen in the older half of the
    range get 1 + (rep_pen - 1) * slope, the newer half the full rep_pen; presence penalty on all."""

    def __init__(self, n_vocab: int, last_n: int, rep_pen: float, slope: float, presence: float):
        import numpy
        self._np = numpy
        self.history: collections.deque[int] = collections.deque(maxlen=max(1, last_n))
        self.rep_pen, self.reduced, self.presence = rep_pen, 1 + (rep_pen - 1) * slope, presence
        self.n_vocab = n_vocab

    def accept(self, token: int):
        self.history.append(token)

    def apply(self, view, sorted_):
        np = self._np
        if not self.history:
            return None
        recent = np.fromiter(self.history, dtype=np.int32, count=len(self.history))
        penalty = np.ones(self.n_vocab, dtype=np.float32)
        seen = np.zeros(self.n_vocab, dtype=bool)
        split = len(recent) // 2
        penalty[recent[:split]] = self.reduced
        penalty[recent[split:]] = self.rep_pen
        seen[recent] = True
        ids = view["id"]
        logits = view["logit"]
        p = penalty[ids]
        view["logit"] = np.where(logits <= 0, logits * p, logits / p) - np.where(seen[ids], self.presence, 0.0)
        return None


def min_tokens_guard(eog_tokens: list[int], count: int):
    """No end of generation before `count` tokens: end tokens are masked until then."""
    import numpy
    eog = numpy.array(eog_tokens, dtype=numpy.int32)
    state = {"seen": 0}
    def apply(view, sorted_):
        if state["seen"] < count:
            view["logit"] = numpy.where(numpy.isin(view["id"], eog), -numpy.inf, view["logit"])
        return None
    def accept(token):
        state["seen"] += 1
    return apply, accept


class PositionBans:
    """Tokens banned at one position of a reply only (where a banned phrase began).

    A sampler that counts the tokens the chain accepts, so it knows which position it samples for.
    If the bans would leave no candidate at all it bans nothing and says `exhausted`: the
    generation then ends there instead of looping.
    """

    def __init__(self):
        self.by_index: dict[int, set[int]] = {}
        self.index = 0
        self.exhausted = False

    def ban(self, index: int, token: int) -> int:
        self.by_index.setdefault(index, set()).add(token)
        return len(self.by_index[index])

    def apply(self, view, sorted_):
        import numpy
        bans = self.by_index.get(self.index)
        if bans:
            hit = numpy.isin(view["id"], numpy.fromiter(bans, dtype=numpy.int32, count=len(bans)))
            if not (~hit & (view["logit"] > -numpy.inf)).any():
                self.exhausted = True
            else:
                view["logit"] = numpy.where(hit, -numpy.inf, view["logit"])
        return None

    def accept(self, token: int):
        self.index += 1


class DrawSnapshot:
    """The candidates the final draw chooses from, after every other sampler, as log-probabilities
    (KoboldCpp reports these): a sampler placed just before the draw, only when asked for."""

    def __init__(self, n_top: int):
        self.n_top = n_top
        self.ids = self.logprobs = None

    def apply(self, view, sorted_):
        import numpy
        logits = view["logit"]
        alive = logits > -numpy.inf
        ids, kept = view["id"][alive], logits[alive].astype(numpy.float64)
        top = kept.max()
        self.ids, self.logprobs = ids.copy(), kept - top - numpy.log(numpy.exp(kept - top).sum())
        return None

    def entry(self, token: int) -> TokenLogprob:
        import numpy
        where = numpy.flatnonzero(self.ids == token)
        order = numpy.argsort(-self.logprobs, kind="stable")[:self.n_top]
        return TokenLogprob(token, float(self.logprobs[where[0]]) if len(where) else -math.inf,
                            [(int(self.ids[i]), float(self.logprobs[i])) for i in order])


class SamplerChain:
    """llama.cpp's native sampler chain for one generation's settings, in KoboldCpp's order:
    logit bias and bans, (min_tokens), DRY, grammar, then `sampler_order` (top-k, top-a, top-p with
    min-p, tail-free, typical, temperature or dynamic temperature with smoothing and n-sigma,
    repetition penalty), then XTC, then the draw. Our own samplers fill only what llama.cpp lacks."""

    def __init__(self, model: LlamaModel, s: SamplerSettings, seed: int, banned_token_ids: list[int] = (),
                 position_bans: PositionBans | None = None, snapshot: DrawSnapshot | None = None):
        lib = model.lib
        self.lib = lib
        self.chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        self._own: list[CandidateSampler] = []      # kept alive while the chain uses them
        self._history_samplers = []                  # samplers that must see the prompt (penalties, DRY)
        self.snapshot = snapshot
        self._candidates = self._view = self._ids = None   # the candidate array, reused token to token
        self._may_dead_end = bool(s.grammar)
        try:
            if position_bans is not None:
                self._own_sampler("phrase-bans", position_bans.apply, position_bans.accept)
            self._build(model, s, seed, banned_token_ids)
        except Exception:
            self.free()
            raise

    def _build(self, model: LlamaModel, s: SamplerSettings, seed: int, banned_token_ids):
        lib = self.lib
        bias = dict(s.logit_bias)
        for t in banned_token_ids:
            bias[t] = -math.inf
        if s.ban_eos:
            for t in model.eog_tokens:
                bias[t] = -math.inf
        bias = {t: b for t, b in bias.items() if model.valid_token(t)}
        if bias:
            arr = (lib.llama_logit_bias * len(bias))(*[lib.llama_logit_bias(t, b) for t, b in bias.items()])
            self._add(lib.llama_sampler_init_logit_bias(model.n_vocab, len(bias), arr))
        if s.min_tokens > 0 and not s.ban_eos:
            self._own_sampler("min_tokens", *min_tokens_guard(model.eog_tokens, s.min_tokens))
        if s.dry_multiplier > 0:
            breakers = [b.encode() for b in s.dry_sequence_breakers]
            array = (ctypes.c_char_p * max(1, len(breakers)))(*breakers)
            last_n = model.n_ctx if s.dry_penalty_last_n <= 0 else s.dry_penalty_last_n
            dry = lib.llama_sampler_init_dry(model.vocab, s.dry_multiplier, s.dry_base, s.dry_allowed_length,
                                             last_n, array, len(breakers))
            self._add(dry)
            self._history_samplers.append((dry, last_n))
        if s.grammar:
            grammar = lib.llama_sampler_init_grammar(model.vocab, s.grammar.encode(), b"root")
            if not grammar:
                raise Invalid("the grammar could not be parsed")
            self._add(grammar)
        if s.mirostat:
            self._add_repetition_penalty(model, s)
            self._add_temperature(s, dynamic=False)
            self._add_snapshot()
            if s.mirostat == 1:
                self._add(lib.llama_sampler_init_mirostat(model.n_vocab, seed, s.mirostat_tau, s.mirostat_eta, 100))
            else:
                self._add(lib.llama_sampler_init_mirostat_v2(seed, s.mirostat_tau, s.mirostat_eta))
            return
        for step in s.sampler_order:
            if step == SAMPLER_TOP_K and s.top_k > 0:
                self._add(lib.llama_sampler_init_top_k(s.top_k))
            elif step == SAMPLER_TOP_A and s.top_a > 0:
                self._own_sampler("top-a", top_a_filter(s.top_a))
            elif step == SAMPLER_TOP_P:
                if s.top_p < 1.0:
                    self._add(lib.llama_sampler_init_top_p(s.top_p, 1))
                if s.min_p > 0.0:
                    self._add(lib.llama_sampler_init_min_p(s.min_p, 1))
            elif step == SAMPLER_TFS and s.tfs < 1.0:
                self._own_sampler("tail-free", tail_free_filter(s.tfs))
            elif step == SAMPLER_TYPICAL and s.typical < 1.0:
                self._add(lib.llama_sampler_init_typical(s.typical, 1))
            elif step == SAMPLER_TEMP:
                self._add_temperature(s, dynamic=True)
            elif step == SAMPLER_REP_PEN:
                self._add_repetition_penalty(model, s)
        if s.xtc_probability > 0 and s.xtc_threshold <= 0.5:    # above 0.5 no two tokens can both pass it
            self._add(lib.llama_sampler_init_xtc(s.xtc_probability, s.xtc_threshold, 1, seed))
        self._add_snapshot()
        self._add(lib.llama_sampler_init_dist(seed))

    def _add_snapshot(self):
        if self.snapshot is not None:
            self._own_sampler("draw-snapshot", self.snapshot.apply)

    def _add_temperature(self, s: SamplerSettings, dynamic: bool):
        lib = self.lib
        if s.temperature <= 0.0:
            self._add(lib.llama_sampler_init_top_k(1))       # greedy, at temperature's place in the order
            return
        if dynamic and s.dynatemp_range > 0:
            self._add(lib.llama_sampler_init_temp_ext(s.temperature, s.dynatemp_range, s.dynatemp_exponent))
        else:
            self._add(lib.llama_sampler_init_temp(s.temperature))
        if s.smoothing_factor > 0:
            self._own_sampler("smoothing", smoothing_transform(s.smoothing_factor, s.smoothing_curve))
        if dynamic and s.nsigma > 0:
            self._add(lib.llama_sampler_init_top_n_sigma(s.nsigma))

    def _add_repetition_penalty(self, model: LlamaModel, s: SamplerSettings):
        if s.rep_pen == 1.0 and not s.presence_penalty and not s.frequency_penalty:
            return
        if s.rep_pen_slope < 1.0 and s.rep_pen > 1.0 and not s.frequency_penalty:
            sloped = SlopedRepetitionPenalty(model.n_vocab, s.rep_pen_range, s.rep_pen, s.rep_pen_slope,
                                             s.presence_penalty)
            own = self._own_sampler("rep-pen-slope", sloped.apply, sloped.accept)
            self._history_samplers.append((own, s.rep_pen_range))
            return
        penalties = self.lib.llama_sampler_init_penalties(model.n_vocab, s.rep_pen_range, s.rep_pen,
                                                          s.frequency_penalty, s.presence_penalty)
        self._add(penalties)
        self._history_samplers.append((penalties, s.rep_pen_range))

    def _own_sampler(self, name: str, apply: Callable, accept: Callable[[int], None] | None = None):
        own = CandidateSampler(self.lib, name, apply, accept)
        self._own.append(own)
        self._add(own.sampler)
        return own.sampler

    def _add(self, sampler):
        self.lib.llama_sampler_chain_add(self.chain, sampler)

    def remember_prompt(self, tokens: list[int]):
        """Repetition penalties and DRY count the prompt too (as KoboldCpp's do); the grammar must not see it."""
        tokens = [t for t in tokens if t >= 0]      # a media chunk's placeholders are no vocabulary token
        for sampler, last_n in self._history_samplers:
            for t in tokens[-last_n:] if last_n > 0 else ():
                self.lib.llama_sampler_accept(sampler, t)

    def replay(self, tokens: list[int]):
        """Accept tokens already generated (after a rewind, into a new chain): grammar, penalties, DRY."""
        for t in tokens:
            self.lib.llama_sampler_accept(self.chain, t)

    def sample(self, ctx, index: int, n_vocab: int) -> int | None:
        """Draw a token from the logits at batch `index`; None when nothing may be drawn (a grammar,
        bans and biases that together leave no candidate). llama_sampler_sample would then draw a
        forbidden token and the grammar would abort the process on accepting it, so with a grammar the
        chain is applied here and a token is accepted only if it was allowed. Without one, bans and
        biases never forbid the whole vocabulary, and llama.cpp draws on its own."""
        lib = self.lib
        if not self._may_dead_end:
            return lib.llama_sampler_sample(self.chain, ctx, index)     # the whole draw in C
        import numpy
        if self._candidates is None or len(self._candidates) != n_vocab:
            self._candidates = (lib.llama_token_data * n_vocab)()
            self._view = numpy.ctypeslib.as_array(self._candidates)
            self._ids = numpy.arange(n_vocab, dtype=numpy.int32)
        view = self._view
        view["id"] = self._ids             # anew each time: filters reorder the array in place
        view["logit"] = numpy.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, index), shape=(n_vocab,))
        view["p"] = 0.0
        arr = lib.llama_token_data_array(self._candidates, n_vocab, -1, False)
        lib.llama_sampler_apply(self.chain, ctypes.byref(arr))
        if not 0 <= arr.selected < arr.size:
            return None
        chosen = arr.data[arr.selected]
        if not chosen.logit > -math.inf:
            return None
        lib.llama_sampler_accept(self.chain, chosen.id)
        return chosen.id

    def free(self):
        if self.chain:
            self.lib.llama_sampler_free(self.chain)
            self.chain = None
