"""The one request type every API turns into, and its sampler settings."""

from __future__ import annotations

import dataclasses
from typing import Callable

from .fields import FieldReader


@dataclasses.dataclass
class SamplerSettings:
    temperature: float = 0.75
    top_k: int = 100
    top_p: float = 0.92
    min_p: float = 0.0
    typical: float = 1.0
    rep_pen: float = 1.0
    rep_pen_range: int = 320
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    seed: int = -1                   # -1: a fresh random seed
    logit_bias: dict[int, float] = dataclasses.field(default_factory=dict)
    banned_token_ids: list[int] = dataclasses.field(default_factory=list)
    banned_strings: list[str] = dataclasses.field(default_factory=list)   # phrases, taken back if written
    ban_eos: bool = False
    grammar: str = ""
    # KoboldCpp 1.102's samplers; each default is neutral (the output is as without it).
    top_a: float = 0.0
    tfs: float = 1.0
    rep_pen_slope: float = 1.0
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    smoothing_factor: float = 0.0
    smoothing_curve: float = 1.0
    nsigma: float = 0.0
    xtc_threshold: float = 0.1
    xtc_probability: float = 0.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 0          # 0: the whole context
    dry_sequence_breakers: list[str] = dataclasses.field(default_factory=lambda: list(DRY_DEFAULT_BREAKERS))
    sampler_order: list[int] = dataclasses.field(default_factory=lambda: list(KOBOLD_SAMPLER_ORDER))
    min_tokens: int = 0                  # no end of sequence before this many tokens
    draft: bool = True                   # speculative drafts for this request (off: "nodraft": true)
    draft_min: int = 0                   # draft at least this many tokens where the context repeats, paying or not


# KoboldCpp's sampler ids, as `sampler_order` names them.
SAMPLER_TOP_K, SAMPLER_TOP_A, SAMPLER_TOP_P, SAMPLER_TFS, SAMPLER_TYPICAL, SAMPLER_TEMP, SAMPLER_REP_PEN = range(7)


KOBOLD_SAMPLER_ORDER = (SAMPLER_REP_PEN, SAMPLER_TOP_K, SAMPLER_TOP_A, SAMPLER_TFS, SAMPLER_TYPICAL, SAMPLER_TOP_P,
                        SAMPLER_TEMP)


DRY_DEFAULT_BREAKERS = ("\n", ":", "\"", "*")


@dataclasses.dataclass
class GenerationRequest:
    """What every API turns a request into, and all the engine needs."""
    prompt: str
    memory: str = ""
    max_length: int | None = 180     # None: until the context is full
    max_context_length: int | None = None
    # KoboldCpp's rule, for the Kobold API only: a story longer than the context less `max_length`
    # (at most half the context) loses its oldest text; memory stays. Elsewhere a prompt that does
    # not fit is a 400.
    cut_overlong_prompt: bool = False
    stop_strings: list[str] = dataclasses.field(default_factory=list)
    trim_stop: bool = True
    sampler: SamplerSettings = dataclasses.field(default_factory=SamplerSettings)
    genkey: str = ""
    render_special: bool = False
    add_bos: bool = True             # the model's BOS, when the model wants one
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)   # e.g. a chat template's end of turn
    # Old KoboldAI clients poll /api/extra/generate/check without a genkey; only their generations
    # are shown to such a check, so an unkeyed OpenAI or Ollama reply is never readable by others.
    checkable_without_genkey: bool = False
    ignored_fields: list[str] = dataclasses.field(default_factory=list)   # sent, known, not acted on
    keep_prefix: str = ""            # text in front (a chat's system turn) that a context shift keeps, as memory
    client: str = ""                 # the client's address: the queue takes turns between clients
    logprobs: bool = False           # report each token's log-probability...
    top_logprobs: int = 0            # ...and this many most likely alternatives
    logprobs_after_samplers: bool = False   # from the distribution the draw used (KoboldCpp), not the model's
    # A chat's next prompt up to its user's new words, given this reply's text (ChatTemplate); read ahead while idle
    next_turn: Callable[[str], str | None] | None = None
    # Images and audio, in the order MEDIA_MARKER stands for them in memory and prompt (koboldlite/media.py).
    media: list = dataclasses.field(default_factory=list)
    # The prompt laid out as tokens already (a fill-in-the-middle prompt, engine/infill.py): read as they are, with
    # no BOS added and no memory; `prompt` is then their text, for logs and the reasoning splitter.
    prompt_tokens: list[int] | None = None
    # llama-server's per-request LoRA scales {adapter id: scale} (adapters left out: 0); None: the global scales
    lora: dict[int, float] | None = None


def parse_sampler_settings(f: FieldReader, d: SamplerSettings | None = None) -> SamplerSettings:
    """The Kobold sampler fields, over defaults `d`; the OpenAI and Ollama adapters pass theirs through it too.
    Where llama-server or Ollama name a field otherwise, both names are read."""
    d = d or SamplerSettings()
    return SamplerSettings(
        temperature=f.number("temperature", default=d.temperature, lo=0.0, hi=100.0),
        top_k=f.integer("top_k", default=d.top_k, lo=0, hi=1 << 20),
        top_p=f.number("top_p", default=d.top_p, lo=0.0, hi=1.0),
        min_p=f.number("min_p", default=d.min_p, lo=0.0, hi=1.0),
        typical=f.number("typical", "typical_p", default=d.typical, lo=0.0, hi=1.0),
        rep_pen=f.number("rep_pen", "repetition_penalty", "repeat_penalty", default=d.rep_pen, lo=0.01, hi=100.0),
        rep_pen_range=f.integer("rep_pen_range", "repeat_last_n", default=d.rep_pen_range, lo=0, hi=1 << 20),
        presence_penalty=f.number("presence_penalty", default=d.presence_penalty, lo=-100.0, hi=100.0),
        frequency_penalty=f.number("frequency_penalty", default=d.frequency_penalty, lo=-100.0, hi=100.0),
        mirostat=f.integer("mirostat", "mirostat_mode", default=d.mirostat, lo=0, hi=2),
        mirostat_tau=f.number("mirostat_tau", default=d.mirostat_tau, lo=0.0, hi=100.0),
        mirostat_eta=f.number("mirostat_eta", default=d.mirostat_eta, lo=0.0, hi=1.0),
        seed=f.integer("sampler_seed", "seed", default=d.seed, lo=-1, hi=(1 << 32) - 2),
        logit_bias=f.token_bias("logit_bias"),
        banned_token_ids=f.token_ids("banned_tokens_ids", "custom_token_bans"),
        banned_strings=f.string_list("banned_tokens") + f.string_list("banned_strings"),
        ban_eos=f.boolean("ban_eos_token", "use_default_badwordsids", "bypass_eos", default=d.ban_eos),
        grammar=f.string("grammar", "grammar_string"),
        top_a=f.number("top_a", default=d.top_a, lo=0.0, hi=1.0),
        tfs=f.number("tfs", "tfs_z", default=d.tfs, lo=0.0, hi=1.0),
        rep_pen_slope=f.number("rep_pen_slope", default=d.rep_pen_slope, lo=0.0, hi=1.0),
        dynatemp_range=f.number("dynatemp_range", default=d.dynatemp_range, lo=0.0, hi=100.0),
        dynatemp_exponent=f.number("dynatemp_exponent", default=d.dynatemp_exponent, lo=0.0, hi=100.0),
        smoothing_factor=f.number("smoothing_factor", default=d.smoothing_factor, lo=0.0, hi=100.0),
        smoothing_curve=f.number("smoothing_curve", default=d.smoothing_curve, lo=1.0, hi=100.0),
        nsigma=f.number("nsigma", "top_n_sigma", default=d.nsigma, lo=0.0, hi=100.0),
        xtc_threshold=f.number("xtc_threshold", default=d.xtc_threshold, lo=0.0, hi=1.0),
        xtc_probability=f.number("xtc_probability", default=d.xtc_probability, lo=0.0, hi=1.0),
        dry_multiplier=f.number("dry_multiplier", default=d.dry_multiplier, lo=0.0, hi=100.0),
        dry_base=f.number("dry_base", default=d.dry_base, lo=1.0, hi=100.0),
        dry_allowed_length=f.integer("dry_allowed_length", default=d.dry_allowed_length, lo=1, hi=1 << 16),
        dry_penalty_last_n=f.integer("dry_penalty_last_n", default=d.dry_penalty_last_n, lo=-1, hi=1 << 24),
        dry_sequence_breakers=f.json_string_list("dry_sequence_breakers", default=d.dry_sequence_breakers),
        sampler_order=f.sampler_order("sampler_order", default=d.sampler_order),
        min_tokens=f.integer("min_tokens", default=d.min_tokens, lo=0, hi=1 << 20),
        draft=not f.boolean("nodraft", default=not d.draft),
        draft_min=f.integer("draft_min", default=d.draft_min, lo=0, hi=64),
    )
