"""llama-server's POST /infill: fill in the middle of a file (input_prefix, input_suffix, files of input_extra, and
`prompt` after the prefix), answered in the shape of llama-server's /completion, streamed or whole. The prompt's
layout is engine/infill.py's."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from ..errors import RequestError
from ..fields import FieldReader, _asks, _more_than_one, ignored_fields
from ..generation import GenerationRequest, parse_sampler_settings
from ..jobs import Job, StopReason
from ..engine.adapters import parse_scale_list
from ..engine.infill import InfillParts
from ..service.served_model import ServedModel
from ..service.exchange import JSONResponse
from .common import (
    OPENAI_DEFAULTS, apply_output_format, genkey_of, infill_request, llama_timings, max_reply_tokens
)
from .reply import SSE_PING, DoneEvent, ErrorEvent, PingEvent, ReplyEncoder, ReplyEvent, ReplyReader, TextEvent, \
    WholeReply, sse_data, stream_reply


# llama-server's /completion fields that this server knows and does not act on, each with the test of a value that
# asks for something. (Its samplers, `stop`, `n_predict`, `ignore_eos`, `grammar` and `json_schema` are read.)
LLAMA_IGNORED_FIELDS: dict[str, Callable[[Any], bool]] = {
    "n_probs": _asks, "post_sampling_probs": _asks, "return_tokens": _asks, "n_indent": _asks,
    "t_max_predict_ms": _asks, "t_max_prompt_ms": _asks, "id_slot": lambda v: v not in (None, -1),
    "cache_prompt": lambda v: v is False,        # the prompt cache is always on
    "n_keep": _asks, "n_discard": _asks, "samplers": _asks, "response_fields": _asks,
    "return_progress": _asks, "timings_per_token": _asks, "n_cmpl": _more_than_one, "min_keep": _asks,
}


# llama-server's stop_type for each way a reply ends.
STOP_TYPES = {StopReason.END: "eos", StopReason.STOP_STRING: "word", StopReason.LENGTH: "limit"}


def infill_parts_of(f: FieldReader) -> InfillParts:
    """The request's prefix, suffix, extra files and prompt, with llama-server's 400s for each wrong shape."""
    for name in ("input_prefix", "input_suffix"):
        if f.body.get(name) is None:
            raise RequestError(f'"{name}" is required')
    prompt = f.body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise RequestError('"prompt" must be a string')
    extra = f.body.get("input_extra")
    if extra is not None and not isinstance(extra, list):
        raise RequestError('"input_extra" must be an array of {"filename": string, "text": string}')
    chunks = []
    for i, chunk in enumerate(extra or []):
        if not isinstance(chunk, dict) or not isinstance(chunk.get("text"), str):
            raise RequestError(f'extra_context chunk must contain a "text" field with a string value '
                               f'(input_extra[{i}])')
        if "filename" in chunk and not isinstance(chunk["filename"], str):
            raise RequestError(f'extra_context chunk\'s "filename" field must be a string (input_extra[{i}])')
        chunks.append((chunk.get("filename", "tmp"), chunk["text"]))
    return InfillParts(f.body["input_prefix"], f.body["input_suffix"], chunks, prompt or "")


@dataclasses.dataclass
class InfillCall:
    """One /infill request, read once: the generation it asks for and how to answer."""
    served: ServedModel
    request: GenerationRequest
    stream: bool

    @classmethod
    def of(cls, req) -> "InfillCall":
        f = FieldReader(req.json())
        served = req.use(f.body.get("model"))
        parts = infill_parts_of(f)
        sampler = parse_sampler_settings(f, OPENAI_DEFAULTS)      # llama-server's defaults
        sampler.ban_eos = sampler.ban_eos or f.boolean("ignore_eos")
        if f.body.get("json_schema") is not None:
            apply_output_format(sampler, "json_schema", f.body["json_schema"], "json_schema", "json_schema")
        request = infill_request(
            served, parts, sampler=sampler, stop_strings=f.string_list("stop"), genkey=genkey_of(req, f.body),
            max_length=max_reply_tokens(f, "n_predict", "max_tokens", default=None, minus_one_is_none=True),
            lora=None if f.body.get("lora") is None else parse_scale_list(f.body["lora"], "lora"),
            ignored_fields=ignored_fields(f.body, LLAMA_IGNORED_FIELDS))
        return cls(served, request, f.boolean("stream"))


class LlamaCompletionEncoder(ReplyEncoder):
    """llama-server's /completion shape. Streamed: a `data:` chunk per piece of text ({content, stop: false, ...}),
    then a last one with stop true, empty content and the whole answer's fields (no [DONE]: that is the OpenAI
    stream's); whole: that last object with all the text."""

    def __init__(self, job: Job, call: InfillCall):
        self.job = job
        self.call = call
        self.text_so_far = ""

    def counts(self) -> dict:
        s = self.job.stats
        return {"index": 0, "tokens": [], "id_slot": -1, "tokens_predicted": s.generated_tokens,
                "tokens_evaluated": s.prompt_tokens}

    def text(self, event: TextEvent) -> bytes:
        self.text_so_far += event.text
        return sse_data({"content": event.text, "stop": False, **self.counts()})

    def ping(self, event: PingEvent) -> bytes:
        return SSE_PING

    def error(self, event: ErrorEvent) -> bytes:
        return sse_data({"error": {"code": 500, "message": event.message, "type": "server_error"}})

    def done(self, event: DoneEvent) -> bytes:
        return sse_data(self.final("", self.text_so_far, event.reason))

    def whole(self, events: list[ReplyEvent]) -> dict:
        reply = WholeReply.of(events)
        return self.final(reply.text, reply.text, reply.reason)

    def final(self, content: str, text: str, reason: StopReason) -> dict:
        """The last object: `prompt` is the prompt as laid out, its special tokens written as their text."""
        s, request, model = self.job.stats, self.job.request, self.call.served.model
        return {"content": content, "stop": True, **self.counts(), "model": self.call.served.name,
                "generation_settings": {"n_predict": request.max_length or -1, "seed": s.seed,
                                        "temperature": request.sampler.temperature, "top_k": request.sampler.top_k,
                                        "top_p": request.sampler.top_p, "min_p": request.sampler.min_p,
                                        "stop": request.stop_strings, "ignore_eos": request.sampler.ban_eos},
                "prompt": model.detokenize(self.job.prompt_tokens, special=True), "has_new_line": "\n" in text,
                "truncated": s.truncated, "stop_type": STOP_TYPES.get(reason, "none"),
                "stopping_word": s.stop_string or "", "tokens_cached": s.prompt_tokens + s.generated_tokens,
                "timings": llama_timings(self.job)}


def llama_infill(app, req):
    call = InfillCall.of(req)
    job = req.start_generation(call.request)
    encoder = LlamaCompletionEncoder(job, call)
    if call.stream:
        return stream_reply("text/event-stream", ReplyReader(job), encoder)
    return JSONResponse(encoder.whole(ReplyReader(job).whole()))
