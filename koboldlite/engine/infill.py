"""Fill-in-the-middle prompts, laid out from the model's own FIM tokens as llama-server lays them out
(format_prompt_infill), for /infill, OpenAI completions' `suffix` and Ollama generate's `suffix`. Only the
vocabulary is read here, on the request's thread.

The layout (the repository-level pattern of arXiv:2409.12186, where the model has its tokens):

    [FIM_REP]myproject\\n [FIM_SEP]filename0\\n text0 ... [FIM_SEP]filename\\n  (the extra context)
    [BOS] [FIM_PRE] prefix prompt [FIM_SUF] suffix [FIM_MID]

Without FIM_SEP each extra chunk follows a "--- snippet ---" line instead, and without FIM_REP the project line is
left out. The prefix keeps its last 3/4 of a batch; the suffix its first quarter less the prompt and two tokens; the
extra context the last of what is left of the context beside a batch and twice the reply.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import Invalid
from .llama_model import LlamaModel


# Where the layout has no FIM_SEP, a chunk of extra context follows this line (llama-server's separator).
SNIPPET_SEPARATOR = "\n\n--- snippet ---\n\n"


@dataclasses.dataclass(frozen=True)
class FimTokens:
    """The model's fill-in-the-middle tokens (llama_vocab_fim_*), None where its vocabulary has none."""
    pre: int | None
    suf: int | None
    mid: int | None
    rep: int | None
    sep: int | None

    @classmethod
    def of(cls, model: LlamaModel) -> "FimTokens":
        lib, vocab = model.lib, model.vocab

        def token(read) -> int | None:
            value = read(vocab)
            return value if value >= 0 else None
        return cls(token(lib.llama_vocab_fim_pre), token(lib.llama_vocab_fim_suf), token(lib.llama_vocab_fim_mid),
                   token(lib.llama_vocab_fim_rep), token(lib.llama_vocab_fim_sep))

    def check(self, model_name: str):
        """Invalid (a 400) naming what is missing, when the model cannot fill in the middle."""
        missing = [f"{role} token is missing. " for role, token in (("prefix", self.pre), ("suffix", self.suf),
                                                                   ("middle", self.mid)) if token is None]
        if missing:
            # llama-server's words first (clients match on them), then why.
            raise Invalid(f"Infill is not supported by this model: {''.join(missing)}({model_name} declares no "
                          "fill-in-the-middle tokens: its GGUF has no tokenizer.ggml.fim_pre_token_id, "
                          "fim_suf_token_id and fim_mid_token_id, nor tokens llama.cpp knows by their text)")


@dataclasses.dataclass
class InfillParts:
    """What a request asks to fill: the text before and after the gap (each a string, or llama-server's mixed list
    of strings and token ids), files of extra context as (filename, text), and `prompt`, text that the prefix
    continues with (special tokens in it are read as such)."""
    prefix: Any
    suffix: Any
    extra: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    prompt: str = ""


def mixed_tokens(model: LlamaModel, value: Any, where: str) -> list[int]:
    """A string, or a list of strings and token ids, as tokens; text never read as special tokens (llama-server's
    tokenize_mixed without them)."""
    if isinstance(value, str):
        return model.tokenize(value, parse_special=False)
    if isinstance(value, list):
        out = []
        for item in value:
            if isinstance(item, str):
                out += model.tokenize(item, parse_special=False)
            elif isinstance(item, int) and not isinstance(item, bool) and model.valid_token(item):
                out.append(item)
            else:
                raise Invalid(f"'{where}' holds {item!r}: a list of strings and token ids "
                              f"(0..{model.n_vocab - 1}) is expected")
        return out
    raise Invalid(f"'{where}' must be a string (or a list of strings and token ids)")


def extra_context_tokens(model: LlamaModel, fim: FimTokens, extra: list[tuple[str, str]]) -> list[int]:
    """The files of extra context, each behind its name, and the current file's name (llama-server's 'filename')."""
    def text(s: str) -> list[int]:
        return model.tokenize(s, parse_special=False)
    out = [fim.rep] + text("myproject\n") if fim.rep is not None else []
    for filename, chunk in extra:
        out += [fim.sep] + text(filename + "\n") if fim.sep is not None else text(SNIPPET_SEPARATOR)
        out += text(chunk)
    if fim.sep is not None:
        out += [fim.sep] + text("filename\n")
    return out


def infill_tokens(model: LlamaModel, fim: FimTokens, parts: InfillParts, n_batch: int, n_predict: int,
                  n_ctx: int) -> list[int]:
    """The prompt, as llama-server's format_prompt_infill lays it out and trims it (see the module's docstring).
    `n_predict`: the reply's length, -1 when unbounded (llama-server's default)."""
    prefix = mixed_tokens(model, parts.prefix, "input_prefix")
    suffix = mixed_tokens(model, parts.suffix, "input_suffix")
    prompt = model.tokenize(parts.prompt, parse_special=True)
    extra = extra_context_tokens(model, fim, parts.extra)
    quarter = n_batch // 4
    n_prefix_take = min(len(prefix), 3 * quarter)
    n_suffix_take = min(len(suffix), max(0, quarter - (2 + len(prompt))))
    n_extra_take = min(max(0, n_ctx - n_batch - 2 * n_predict), len(extra))
    head = [model.bos] if model.add_bos else []
    return (extra[len(extra) - n_extra_take:] + head + [fim.pre] + prefix[len(prefix) - n_prefix_take:] + prompt
            + [fim.suf] + suffix[:n_suffix_take] + [fim.mid])


def infill_prompt(model: LlamaModel, model_name: str, parts: InfillParts, n_predict: int | None,
                  n_ctx: int | None = None) -> list[int]:
    """The tokens of a fill-in-the-middle prompt for this model (Invalid when it has no FIM tokens): a batch of
    --batchsize, the request's context (else the model's), the reply's length (None: unbounded)."""
    fim = FimTokens.of(model)
    fim.check(model_name)
    return infill_tokens(model, fim, parts, model.n_batch, -1 if n_predict is None else n_predict,
                         min(model.n_ctx, n_ctx or model.n_ctx))
