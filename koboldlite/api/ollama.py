"""The Ollama API."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from typing import Any, Callable

from ..errors import RequestError
from ..config import BUILTIN_CHAT_TEMPLATES
from ..fields import FieldReader, _asks, ignored_fields
from ..generation import GenerationRequest, SamplerSettings, parse_sampler_settings
from ..jobs import Job, StopReason, TokenLogprob
from ..engine.infill import InfillParts
from ..chat.messages import parse_chat_messages
from ..media import MediaKind
from ..chat.tools import ToolUse
from ..service.catalog import ModelEntry
from ..service.served_model import ServedModel
from ..service.exchange import JSONResponse
from .common import (
    MAX_TOP_LOGPROBS, LogprobShapes, apply_output_format, chat_request, embedder_for, embedding_inputs, genkey_of,
    gpu_report, infill_request, media_list, modalities_of, tool_use_of
)
from .reply import (
    DoneEvent, ErrorEvent, ReasoningEvent, ReplyEncoder, ReplyEvent, ReplyReader, TextEvent, WholeReply, stream_reply
)


OLLAMA_IGNORED_FIELDS: dict[str, Callable[[Any], bool]] = {
    "context": _asks, "template": _asks,
}


OLLAMA_IGNORED_OPTIONS = ("num_gpu", "main_gpu", "num_thread", "num_batch", "num_keep", "numa", "low_vram",
                          "use_mmap", "use_mlock", "penalize_newline", "vocab_only")


OLLAMA_DEFAULTS = SamplerSettings(temperature=0.8, top_k=40, top_p=0.9, min_p=0.0, rep_pen=1.1, rep_pen_range=64)


OLLAMA_VERSION = "0.12.0"


def ollama_timestamp() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e9):09d}Z"


def ollama_model_entry(app, entry: ModelEntry) -> dict:
    """Ollama's listing of a model, from its file's header: it need not be loaded."""
    mtime = os.path.getmtime(entry.path)
    meta = entry.layout.metadata if entry.layout else {}
    family = str(meta.get("general.architecture") or "")
    return {
        "name": entry.name, "model": entry.name,
        "modified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime)),
        "size": entry.size_bytes,
        "digest": hashlib.sha256(f"{entry.name}:{entry.size_bytes}:{mtime}".encode()).hexdigest(),
        "details": {"parent_model": "", "format": "gguf", "family": family, "families": [family],
                    "parameter_size": str(meta.get("general.size_label") or ""),
                    "quantization_level": str(meta.get("general.file_type") or "")},
    }


DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def keep_alive_of(f: FieldReader) -> float | None:
    """Ollama's keep_alive: seconds as a number, or a Go duration ("5m", "1h30m", "-1m"); negative: for ever.
    None when the request does not say."""
    value = f.body.get("keep_alive")
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        sign = -1 if text.startswith("-") else 1
        body = text.lstrip("+-")
        parts = DURATION_PART.findall(body)
        if parts and "".join(n + u for n, u in parts) == body:
            return sign * sum(float(n) * DURATION_UNITS[u] for n, u in parts)
    raise RequestError("'keep_alive' must be seconds or a duration such as \"5m\" (negative: keep loaded)")


def ollama_use(req, f: FieldReader) -> ServedModel:
    """The model an Ollama request names (`model`, or the old `name`), and how long it stays loaded after."""
    req.keep_alive = keep_alive_of(f)
    return req.use(f.body.get("model", f.body.get("name")))


def ollama_generation_fields(req, f: FieldReader, served: ServedModel) -> dict:
    """Generate's and chat's fields: most in `options`, as Ollama has them."""
    options = FieldReader(f.body.get("options") or {}, "options")
    sampler = parse_sampler_settings(options, OLLAMA_DEFAULTS)
    fmt = f.body.get("format")
    if fmt not in (None, ""):         # "json", or a JSON schema
        apply_output_format(sampler, "json_object" if fmt == "json" else "json_schema", fmt, "format", "format")
    num_predict = options.integer("num_predict", default=-1, lo=-2, hi=1 << 20)
    fields = {}
    if f.boolean("logprobs"):
        fields["logprobs"] = True
        fields["top_logprobs"] = f.integer("top_logprobs", default=0, lo=0, hi=MAX_TOP_LOGPROBS)
    return dict(**fields, max_length=None if num_predict < 0 else max(1, num_predict),
                max_context_length=options.integer("num_ctx", default=served.model.n_ctx, lo=16, hi=1 << 24),
                stop_strings=options.string_list("stop"), sampler=sampler, genkey=genkey_of(req, f.body),
                ignored_fields=ignored_fields(f.body, OLLAMA_IGNORED_FIELDS) + ignored_fields(
                    options.body, dict.fromkeys(OLLAMA_IGNORED_OPTIONS, lambda v: v is not None), "options."))


def ollama_template_vars(f: FieldReader) -> dict:
    """`think`, for templates that read `enable_thinking` (Qwen3 and others) to think or not."""
    think = f.body.get("think")
    return {"enable_thinking": think} if isinstance(think, bool) else {}


@dataclasses.dataclass
class OllamaCall:
    """One /api/generate or /api/chat request, read once: the generation it asks for and how to answer."""
    served: ServedModel
    request: GenerationRequest
    stream: bool
    think: bool                   # a thinking block goes to `thinking`; "think": false leaves it inline
    chat: bool = False            # answer with `message` objects (chat), else `response` strings
    tools: ToolUse | None = None

    @classmethod
    def generate(cls, req, f: FieldReader) -> "OllamaCall":
        served = ollama_use(req, f)
        fields = ollama_generation_fields(req, f, served)
        if f.string("suffix"):
            return cls.fill_in_the_middle(f, served, fields)
        # Images go before the prompt's words, as Ollama places them.
        images = f.body.get("images") or []
        if not isinstance(images, list):
            raise RequestError("'images' must be a list of base64 strings")
        media = fields["media"] = media_list(req, served)
        prompt = "".join(media.add(image, f"images[{i}]", (MediaKind.IMAGE,)) for i, image in enumerate(images)) \
            + f.string("prompt")
        if f.boolean("raw"):
            request = GenerationRequest(prompt=prompt, **fields)
        else:
            system = [{"role": "system", "content": f.string("system")}] if f.string("system") else []
            request = chat_request(served, system + [{"role": "user", "content": prompt}], fields,
                                   template_vars=ollama_template_vars(f))
        return cls(served, request, f.boolean("stream", default=True), f.body.get("think") is not False)

    @classmethod
    def fill_in_the_middle(cls, f: FieldReader, served: ServedModel, fields: dict) -> "OllamaCall":
        """Generate with a `suffix`: the prompt is the text before the gap, laid out with the model's FIM tokens as
        llama-server's /infill lays out its input_prefix and input_suffix (no template: `system` and `raw` have
        nothing to act on)."""
        if f.body.get("images"):
            raise RequestError("'images' cannot go with 'suffix': a fill-in-the-middle prompt is text only")
        fields["ignored_fields"] += [name for name in ("system", "raw") if f.body.get(name)]
        request = infill_request(served, InfillParts(f.string("prompt"), f.string("suffix")), **fields)
        return cls(served, request, f.boolean("stream", default=True), f.body.get("think") is not False)

    @classmethod
    def chat_of(cls, req, f: FieldReader) -> "OllamaCall":
        served = ollama_use(req, f)
        media = media_list(req, served)
        messages = parse_chat_messages(f.body.get("messages"), media)
        fields = {**ollama_generation_fields(req, f, served), "media": media}
        # Ollama has no tool_choice; we take one beside the tools or in `options` (which its clients pass on).
        options = f.body.get("options") if isinstance(f.body.get("options"), dict) else {}
        tools = tool_use_of(served, f, f.body.get("tool_choice", options.get("tool_choice")))
        request = chat_request(served, messages, fields, tools, ollama_template_vars(f))
        return cls(served, request, f.boolean("stream", default=True), f.body.get("think") is not False,
                   chat=True, tools=tools)


def ollama_final(job: Job, head: dict) -> dict:
    s = job.stats
    return {**head, "done": True, "done_reason": "length" if job.buffer.stop_reason is StopReason.LENGTH else "stop",
            "total_duration": int((time.monotonic() - job.created) * 1e9), "load_duration": 0,
            "prompt_eval_count": s.prompt_tokens, "prompt_eval_duration": int(s.prompt_seconds * 1e9),
            "eval_count": s.generated_tokens, "eval_duration": int(s.generation_seconds * 1e9)}


class OllamaEncoder(ReplyEncoder):
    """NDJSON: an object per piece of text, then a final one with the counts, which carries what the reply held
    back to its end and its tool calls; whole, that final object alone with all the text. With "logprobs": true,
    objects carry their tokens' `logprobs` (OpenAI chat's list). No keep-alive: NDJSON has no comment."""

    def __init__(self, job: Job, call: OllamaCall):
        self.job = job
        self.call = call
        self.shapes = LogprobShapes(call.served.model)

    def fields(self, reasoning: str, text: str, calls: list[dict] = ()) -> dict:
        thinking = {"thinking": reasoning} if reasoning else {}
        if not self.call.chat:
            return {"response": text, **thinking}
        message = {"role": "assistant", "content": text, **thinking}
        if calls:     # Ollama's shape: arguments as an object
            message["tool_calls"] = [{"function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]
        return {"message": message}

    def object(self, fields: dict, entries: list[TokenLogprob] = ()) -> dict:
        return {"model": self.call.served.name, "created_at": ollama_timestamp(), **fields,
                **({"logprobs": self.shapes.chat(entries)} if self.job.request.logprobs and entries else {})}

    @staticmethod
    def line(obj: dict) -> bytes:
        return json.dumps(obj).encode() + b"\n"

    def encode(self, events: list[ReplyEvent]) -> bytes:
        if isinstance(events[-1], DoneEvent):       # the end: one final object
            return self.line(self.whole(events))
        return super().encode(events)

    def reasoning(self, event: ReasoningEvent) -> bytes:
        return self.line({**self.object(self.fields(event.text, ""), event.logprobs), "done": False})

    def text(self, event: TextEvent) -> bytes:
        return self.line({**self.object(self.fields("", event.text), event.logprobs), "done": False})

    def error(self, event: ErrorEvent) -> bytes:
        return self.line({"error": event.message})

    def whole(self, events: list[ReplyEvent]) -> dict:
        reply = WholeReply.of(events)
        return ollama_final(self.job, self.object(self.fields(reply.reasoning, reply.text, reply.calls),
                                                  reply.logprobs))


def ollama_answer(req, call: OllamaCall):
    """Start the call's generation and answer it: NDJSON unless "stream": false."""
    job = req.start_generation(call.request)
    reply = ReplyReader(job, reasoning=call.think, tools=call.tools)
    encoder = OllamaEncoder(job, call)
    if call.stream:
        return stream_reply("application/x-ndjson", reply, encoder, ping_seconds=None)
    return JSONResponse(encoder.whole(reply.whole()))


def ollama_load_or_unload(app, req, f: FieldReader):
    """Ollama's way to load a model (a generate with an empty prompt), or with keep_alive 0 to unload it."""
    if keep_alive_of(f) == 0:
        entry = req.entry(f.body.get("model"))
        served = app.roster.current(entry.name)
        if served is not None and not app.roster.unload(entry.name, "keep_alive 0"):
            served.keep_alive = 0.0          # in use: unloaded as soon as its work ends
            app.roster.touch()
        return JSONResponse({"model": entry.name, "created_at": ollama_timestamp(), "response": "",
                             "done": True, "done_reason": "unload"})
    served = ollama_use(req, f)
    return JSONResponse({"model": served.name, "created_at": ollama_timestamp(), "response": "",
                         "done": True, "done_reason": "load"})


def ollama_generate(app, req):
    f = FieldReader(req.json())
    if not f.string("prompt") and not f.has("suffix"):
        return ollama_load_or_unload(app, req, f)
    return ollama_answer(req, OllamaCall.generate(req, f))


def ollama_chat(app, req):
    return ollama_answer(req, OllamaCall.chat_of(req, FieldReader(req.json())))


def ollama_tags(app, req):
    return JSONResponse({"models": [ollama_model_entry(app, entry) for entry in app.catalog.entries()]})


def iso_time(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def ollama_ps(app, req):
    """The loaded models, with when each will be unloaded (Ollama's far future: never)."""
    out = []
    for served in app.roster.any_loaded():
        expires = app.roster.expires_at(served)
        out.append({**ollama_model_entry(app, served.entry), "size_vram": int(gpu_report(served)["vram_mib"] * 2**20),
                    "expires_at": iso_time(expires) if expires is not None else "9999-12-31T23:59:59Z",
                    "context_length": served.model.n_ctx})
    return JSONResponse({"models": out})


def ollama_version(app, req):
    return JSONResponse({"version": OLLAMA_VERSION})


def ollama_show(app, req):
    """What a model is, from its file's header (it need not be loaded)."""
    f = FieldReader(req.json())
    entry = req.entry(f.body.get("model", f.body.get("name")))
    listing = ollama_model_entry(app, entry)
    meta = entry.layout.metadata if entry.layout else {}
    family = listing["details"]["family"]
    template = entry.config(app.config).chat_template
    if template in BUILTIN_CHAT_TEMPLATES:
        template = BUILTIN_CHAT_TEMPLATES[template]
    elif template:
        with open(template, encoding="utf-8") as file:
            template = file.read()
    return JSONResponse({"modelfile": "", "parameters": "",
                         "template": template or str(meta.get("tokenizer.chat_template") or ""),
                         "details": listing["details"], "model_info": {
                             "general.architecture": family,
                             f"{family}.context_length": meta.get(f"{family}.context_length", 0)},
                         "capabilities": ["completion"] + (["vision"] if modalities_of(app, entry)["vision"] else []),
                         "modified_at": listing["modified_at"]})


OLLAMA_EMBEDDING_IGNORED = {"dimensions": _asks, "truncate": lambda v: v is False, "options": _asks}


def ollama_embed(app, req):
    f = FieldReader(req.json())
    req.ignored = ignored_fields(f.body, OLLAMA_EMBEDDING_IGNORED)
    req.keep_alive = keep_alive_of(f)
    start = time.monotonic()
    embedder, name = embedder_for(req, f)
    vectors, n_tokens = embedder.embed(embedding_inputs(f, "input"))
    return JSONResponse({"model": name, "embeddings": vectors,
                         "total_duration": int((time.monotonic() - start) * 1e9), "load_duration": 0,
                         "prompt_eval_count": n_tokens})


def ollama_embeddings_legacy(app, req):
    """Ollama's older endpoint: one prompt, one vector."""
    f = FieldReader(req.json())
    req.ignored = ignored_fields(f.body, OLLAMA_EMBEDDING_IGNORED)
    vectors, _ = embedder_for(req, f)[0].embed([f.string("prompt")])
    return JSONResponse({"embedding": vectors[0]})
