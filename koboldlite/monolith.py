"""The rest of koboldlite.py, being split into the modules below it."""

from __future__ import annotations

import collections
import dataclasses
import errno
import gzip
import hashlib
import hmac
import http.server
import ipaddress
import json
import math
import os
import queue
import re
import secrets
import select
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.parse
import webbrowser
from typing import Any, Callable, Iterator

from .paths import program_folder
from .version import KOBOLDCPP_COMPAT_VERSION, KOBOLD_API_VERSION, __version__
from .errors import ConfigError, ModelLoadError, RequestError
from .model_files import is_model_url, model_name_of, scan_model_folder
from .config import BUILTIN_CHAT_TEMPLATES, Config, load_config, make_tls_context, normalized_origin
from .desktop import double_click_arguments, is_double_click_start, keep_window_open
from .text import ReasoningSplitter
from .fields import FieldReader, _asks, _more_than_one, ignored_fields
from .generation import GenerationRequest, SamplerSettings, parse_sampler_settings
from .jobs import Job, JobStats, TokenLogprob
from .engine.llama_model import LlamaModel
from .engine.embeddings import Embedder
from .engine.prompt_cache import StateFileError, read_state_file
from .engine.engine import Engine
from .chat.template import INSTRUCT_PLACEHOLDER
from .chat.messages import parse_chat_messages, tool_call_of, tool_result_names
from .chat.tools import CallWatch, ToolUse, json_grammar
from .service.downloads import ConsoleProgress, DownloadError, ModelDownload
from .service.catalog import ModelEntry
from .service.served_model import ServedModel
from .service.app import App, ResponseStore
from .service.exchange import JSONResponse, Request, Response, StreamResponse, wait_for_text


# Fields each API defines that this server does not act on, each with the test of a value that asks for
# something: such a field is named in the log and in X-KoboldLite-Ignored, never dropped in silence.
KOBOLD_IGNORED_FIELDS: dict[str, Callable[[Any], bool]] = {
    "images": _asks, "audio": _asks,                       # no vision or audio model is served
    "n": _more_than_one,                                   # one text per request
    "use_story": _asks, "use_memory": _asks, "use_authors_note": _asks, "use_world_info": _asks,
    "negative_prompt": _asks, "guidance_scale": lambda v: v not in (None, 0, 1),
    "grammar_retain_state": _asks,
    "adaptive_target": lambda v: isinstance(v, (int, float)) and v > 0,
}


OPENAI_IGNORED_FIELDS: dict[str, Callable[[Any], bool]] = {
    **{k: v for k, v in KOBOLD_IGNORED_FIELDS.items() if k != "n"},   # SillyTavern sends these to /v1 too
    "functions": _asks, "function_call": _asks, "suffix": _asks, "echo": _asks, "best_of": _more_than_one,
    "reasoning_effort": _asks, "modalities": lambda v: v not in (None, ["text"]), "audio": _asks,
    "prediction": _asks, "web_search_options": _asks,
}


OLLAMA_IGNORED_FIELDS: dict[str, Callable[[Any], bool]] = {
    "images": _asks, "context": _asks, "template": _asks, "suffix": _asks,
}


OLLAMA_IGNORED_OPTIONS = ("num_gpu", "main_gpu", "num_thread", "num_batch", "num_keep", "numa", "low_vram",
                          "use_mmap", "use_mlock", "penalize_newline", "vocab_only")


# Each route is a small function (app, request) -> Response that turns JSON into
# one GenerationRequest and the job's token buffer back into its API's shape.
def error_body(style: str, error: RequestError) -> dict:
    """The error shape each family of clients understands."""
    if style == "openai":
        return {"error": {"message": str(error), "type": error.kind, "code": error.code or error.status,
                          **error.extra}}
    if style == "ollama":
        return {"error": str(error)}
    if style == "anthropic":
        kind = ANTHROPIC_ERROR_TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": str(error)}}
    return {"detail": {"msg": str(error), "type": error.kind}}


def error_response(style: str, error: RequestError) -> Response:
    """An error in its API's shape; Anthropic's clients know a full queue as 529 (overloaded)."""
    status = 529 if style == "anthropic" and error.status == 503 else error.status
    return JSONResponse(error_body(style, error), status, error.headers)


def unauthorized(style: str) -> RequestError:
    """401, in the words OpenAI-style clients look for (they show 'invalid API key' and stop retrying)."""
    message = "a valid password is required (Authorization: Bearer <password>, or X-Api-Key)"
    if style == "openai":
        return RequestError(message, status=401, kind="authentication_error", code="invalid_api_key")
    return RequestError(message, status=401, kind="unauthorized")


KOBOLD_TOP_LOGPROBS = 5     # KoboldCpp reports the 5 most likely alternatives


def parse_kobold_request(req, app: App) -> GenerationRequest:
    f = FieldReader(req.json())
    if "prompt" not in f.body:
        raise RequestError("'prompt' is required")
    stops = f.string_list("stop_sequence")
    if f.boolean("singleline"):
        stops.append("\n")
    served = req.use(f.body.get("model"))      # KoboldAI Lite sends none: the default model
    return instruct_request(served, f, prompt=f.string("prompt"), memory=f.string("memory"), stop_strings=stops,
        max_length=f.integer("max_length", default=served.config.max_length, lo=1, hi=1 << 20),
        max_context_length=f.integer("max_context_length", "truncation_length", default=served.model.n_ctx,
                                     lo=1, hi=1 << 24),
        trim_stop=f.boolean("trim_stop", default=True),
        sampler=parse_sampler_settings(f),
        genkey=genkey_of(req),
        render_special=f.boolean("render_special", default=False),
        checkable_without_genkey=True,
        cut_overlong_prompt=True,
        ignored_fields=ignored_fields(f.body, KOBOLD_IGNORED_FIELDS),
        logprobs=f.boolean("logprobs"), top_logprobs=KOBOLD_TOP_LOGPROBS, logprobs_after_samplers=True,
    )


def instruct_request(served: ServedModel, f: FieldReader, prompt: str, memory: str = "", stop_strings: list[str] = (),
                     **fields) -> GenerationRequest:
    """A text-completion request, its instruct placeholders rendered with the model's chat template
    (KoboldCpp replaces them unless "replace_instruct_placeholders" is false)."""
    if not f.boolean("replace_instruct_placeholders", default=True):
        return GenerationRequest(prompt=prompt, memory=memory, stop_strings=list(stop_strings), **fields)
    template = served.chat_template
    stops = template.instruct_stops(stop_strings) if any(INSTRUCT_PLACEHOLDER.search(s) for s in stop_strings) \
        else list(stop_strings)
    rendered = template.render_instruct(memory, prompt)
    if rendered is None:
        return GenerationRequest(prompt=prompt, memory=memory, stop_strings=stops, **fields)
    memory, prompt = rendered
    return template.prompt_request(prompt, memory=memory, stop_strings=stops, **fields)


def genkey_of(req) -> str:
    """A genkey from the JSON body, the query string, or a `genkey` header: every API takes all
    three, so check and abort (and a balancer hashing on it) reach any generation."""
    body = req.json(optional=True)
    if body is not None and not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    key = (body or {}).get("genkey") or req.query.get("genkey") or req.headers.get("genkey") or ""
    if not isinstance(key, str):
        raise RequestError("'genkey' must be a string")
    return key


def kobold_sse_event(token: str, finish_reason: str | None) -> bytes:
    """One KoboldCpp SSE event; ASCII-only JSON on one line (a raw U+2028 breaks KoboldAI Lite)."""
    data = json.dumps({"token": token, "finish_reason": finish_reason}, ensure_ascii=True)
    return f"event: message\ndata: {data}\n\n".encode("ascii")


def wire_finish_reason(reason: str | None) -> str:
    """Clients know 'stop' and 'length'; an aborted or failed generation stopped."""
    return "length" if reason == "length" else "stop"


class LogprobShapes:
    """A job's token log-probabilities in each API's shape. `legacy` keeps the text offset across
    the chunks of one stream."""

    def __init__(self, model: LlamaModel):
        self.model = model
        self.offset = 0

    def _token(self, token: int) -> dict:
        data = self.model.piece(token)
        return {"token": data.decode("utf-8", errors="replace"), "bytes": list(data)}

    def chat(self, entries: list[TokenLogprob]) -> list[dict]:
        """OpenAI chat's `content` list (also Ollama's `logprobs`)."""
        return [{**self._token(e.token), "logprob": e.logprob,
                 "top_logprobs": [{**self._token(t), "logprob": lp} for t, lp in e.top]} for e in entries]

    def legacy(self, entries: list[TokenLogprob]) -> dict:
        """OpenAI completions' shape: tokens, token_logprobs, top_logprobs, text_offset."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            text = self._token(e.token)["token"]
            out["tokens"].append(text)
            out["token_logprobs"].append(e.logprob)
            out["top_logprobs"].append({self._token(t)["token"]: lp for t, lp in e.top})
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out

    def kobold(self, entries: list[TokenLogprob]) -> dict:
        """KoboldCpp's: the chat `content` list and the legacy lists side by side."""
        return {"content": self.chat(entries), **self.legacy(entries)}


def batches_with_logprobs(job: Job) -> Iterator[tuple[list[str], list[TokenLogprob]]]:
    """The job's text as it arrives, each batch with the log-probabilities of the tokens shown since the
    last (they are recorded before their text); a last ([], rest) for tokens whose text never showed."""
    sent = 0
    for batch in job.buffer.batches():
        n = len(job.logprobs)
        yield batch, job.logprobs[sent:n]
        sent = n
    if len(job.logprobs) > sent:
        yield [], job.logprobs[sent:]


# Routes get (app, request) and return a Response; see the HTTP layer below.
def kobold_model(app, req):
    if app.config.password and not req.authorized:
        return JSONResponse({"result": "koboldcpp/protected-model"})   # KoboldCpp's words
    return JSONResponse({"result": f"koboldcpp/{app.catalog.default_name}"})   # even while it (re)loads


def kobold_info_version(app, req):
    return JSONResponse({"result": KOBOLD_API_VERSION})


def kobold_max_length(app, req):
    return JSONResponse({"value": app.config.max_length})


def default_context_size(app) -> int:
    """The default model's context: as loaded, or (unloaded, loading) as it will be. Never waits for a load."""
    served = app.roster.current()
    if served is not None:
        return served.model.n_ctx
    entry = app.catalog.find(None)
    return entry.config(app.config).contextsize if entry else app.config.contextsize


def kobold_max_context_length(app, req):
    return JSONResponse({"value": default_context_size(app)})


def kobold_generate(app, req):
    job = req.start_generation(parse_kobold_request(req, app))
    result = {"text": wait_for_text(job), "finish_reason": wire_finish_reason(job.buffer.finish_reason)}
    if job.request.logprobs:
        result["logprobs"] = LogprobShapes(req.use().model).kobold(job.logprobs)
    return JSONResponse({"results": [result]})


def kobold_last_logprobs(app, req):
    """The log-probabilities of this genkey's latest generation; never another's, and none without a key."""
    genkey = genkey_of(req)
    found = app.find_job(genkey) if genkey else None
    served = req.use_loaded(found[1]) if found else None      # its model, unless unloaded since
    if served is None or not found[0].request.logprobs:
        return JSONResponse({"logprobs": None})
    return JSONResponse({"logprobs": LogprobShapes(served.model).kobold(list(found[0].logprobs))})


def kobold_generate_stream(app, req):
    job = req.start_generation(parse_kobold_request(req, app))

    def events():
        for batch in job.buffer.batches():    # one write for all the tokens already waiting
            yield b"".join(kobold_sse_event(piece, None) for piece in batch)
        yield kobold_sse_event("", wire_finish_reason(job.buffer.finish_reason))
    return StreamResponse("text/event-stream", events(), job)


def kobold_extra_version(app, req):
    return JSONResponse({
        "result": "KoboldCpp", "version": KOBOLDCPP_COMPAT_VERSION, "protected": bool(app.config.password),
        "server": "KoboldLite", "koboldlite_version": __version__,
        "txt2img": False, "vision": False, "audio": False, "transcribe": False, "multiplayer": False,
        "websearch": False, "tts": False, "embeddings": True, "savedata": False,
        "admin": 1 if app.config.admin else 0, "router": app.catalog.several,
    })


def kobold_check(app, req):
    job, served = app.find_job(genkey_of(req)) or (None, None)
    text = job.buffer.text() if job is not None else ""
    result = {"text": text}
    if job is not None and job.state == "queued":
        result["queue_position"] = served.scheduler.queue_position(job)
    return JSONResponse({"results": [result]})


def kobold_abort(app, req):
    job = app.abort(genkey_of(req))
    if job is None:
        return JSONResponse({"success": "false", "done": "false"})
    done = job.buffer.wait_done(timeout=2.0)   # the loop stops within one token
    return JSONResponse({"success": "true", "done": "true" if done else "false"})


def kobold_tokencount(app, req):
    f = FieldReader(req.json())
    text = f.string("prompt")
    special = f.boolean("special", default=True)
    ids = req.use().model.tokenize(text, add_bos=special, parse_special=special)
    return JSONResponse({"value": len(ids), "ids": ids})


def kobold_detokenize(app, req):
    f = FieldReader(req.json())
    ids = f.token_ids("ids", "tokens")
    model = req.use().model
    bad = [t for t in ids if not model.valid_token(t)]
    if bad:
        raise RequestError(f"'ids' holds ids outside the vocabulary (0..{model.n_vocab - 1}): {bad[0]}")
    return JSONResponse({"result": model.detokenize(ids), "success": True})


def kobold_json_to_grammar(app, req):
    """A JSON schema (the body, or its 'schema' field) as GBNF, for clients that then send it as 'grammar'."""
    f = FieldReader(req.json())
    schema = f.body.get("schema", f.body)
    return JSONResponse({"result": json_grammar(schema, "schema"), "success": True})


def sd_models(app, req):
    """No image model is served: KoboldCpp answers an empty list, and KoboldAI Lite asks on every connect."""
    return JSONResponse([])


def kobold_true_max_context_length(app, req):
    return JSONResponse({"value": default_context_size(app)})


def kobold_perf(app, req):
    """Counts and timings, no text; of the default model's loop when it is loaded (it never loads one)."""
    last = app.last_job
    s = last.stats if last else JobStats()
    loaded = app.roster.any_loaded()
    served = app.roster.current() or (loaded[0] if loaded else None)
    return JSONResponse({
        "last_process": round(s.prompt_seconds, 4),
        "last_eval": round(s.generation_seconds, 4),
        "last_token_count": s.generated_tokens,
        "last_input_count": s.prompt_tokens,
        "last_cached_count": s.cached_tokens,
        "last_truncated_count": s.truncated_tokens,    # oldest prompt tokens cut to fit the context
        "last_shifted_count": s.shifted_tokens,        # tokens a context shift dropped while generating
        "truncated": s.truncated,
        "last_seed": s.seed,
        "last_model": s.model,                         # the model that served the last job
        "last_cache_source": s.cache_source,           # slot, ram, disk or none: where its cached tokens came from
        "prompt_cache": prompt_cache_report(served) if served else None,
        "last_draft_count": s.drafted_tokens,          # speculative draft tokens checked, and kept
        "last_draft_accepted": s.draft_accepted,
        "total_draft_count": app.totals["drafted_tokens"], "total_draft_accepted": app.totals["draft_accepted"],
        "total_gens": app.totals["requests"],
        "stop_reason": s.stop_reason,
        "queue": sum(m.scheduler.waiting for m in loaded),
        "idle": 0 if any(not m.scheduler.idle for m in loaded) else 1,
        "active_slots": sum(m.scheduler.active for m in loaded),
        "slots": len(served.engine.slots) if served else 0,
        "kv_compactions": served.engine.compactions if served else 0,   # a shared pool laid out anew (README)
        "read_ahead_tokens": served.engine.next_turns.tokens_read if served else 0,   # chats' next turns (README)
        "gpu": gpu_report(served) if served else None,
        "models": model_states(app),
        "model_events": list(app.roster.events),       # loads and unloads: when, why, seconds, MiB
        "uptime": round(time.monotonic() - app.started, 3),
        "instance": app.instance_id,
        "hordeexitcounter": -1,
        "quiet": app.config.quiet,
    })


def prompt_cache_report(served: ServedModel) -> dict | None:
    cache = served.prompt_cache
    if cache is None:
        return None
    with cache._lock:
        entries = list(cache.entries)
    return {"conversations": len(entries), "in_ram": sum(e.data is not None for e in entries),
            "on_disk": sum(e.path is not None for e in entries), "ram_mib": round(cache.ram_used / 2**20, 1),
            "disk_mib": round(cache.disk_used / 2**20, 1), "ram_limit_mib": cache.ram_bytes >> 20,
            "disk_limit_mib": cache.disk_bytes >> 20 if cache.folder else 0,
            "saved_ahead": cache.saved["ahead"], "saved_when_displaced": cache.saved["when_displaced"]}


def gpu_report(served: ServedModel) -> dict:
    """Fixed once the model is loaded; read then, not from llama.cpp's log (which scrolls) on every request."""
    return served.gpu_info


def model_states(app) -> list[dict]:
    """Every model a request may name, with its state, size and context (as loaded, or as it would be)."""
    out = []
    for entry in app.catalog.entries():
        served = app.roster.current(entry.name)
        out.append({"name": entry.name, "aliases": entry.aliases, "state": app.roster.state_of(entry.name),
                    "default": entry.name == app.catalog.default_name, "size": entry.size_bytes,
                    "context": served.model.n_ctx if served else entry.config(app.config).contextsize,
                    **({"error": app.roster.failures[entry.name]} if entry.name in app.roster.failures else {})})
    return out


def kobold_preloadstory(app, req):
    return JSONResponse({})


def tool_use_of(served: ServedModel, f: FieldReader, choice: Any = None) -> ToolUse | None:
    tools = f.body.get("tools")
    if not tools:
        return None
    return ToolUse(served.chat_template, tools, choice if choice is not None else f.body.get("tool_choice"),
                   f.body.get("parallel_tool_calls") is not False)


OPENAI_DEFAULTS = SamplerSettings(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, rep_pen_range=64)


def openai_max_tokens(f: FieldReader, default: int | None) -> int | None:
    """`max_tokens` (or its newer name): at least 1; -1, as llama.cpp clients send it, means no limit."""
    names = ("max_tokens", "max_completion_tokens", "max_length")
    value = f.integer(*names, default=-1 if default is None else default)
    if value == -1:
        return None
    if value < 1:
        raise RequestError(f"'max_tokens' must be at least 1 (or -1 for no limit), not {value}",
                           code="invalid_value")
    return value


def openai_generation_fields(req, f: FieldReader, default_max: int | None) -> dict:
    if f.integer("n", default=1) != 1:
        raise RequestError("'n' must be 1: this server returns one choice per request")
    sampler = parse_sampler_settings(f, OPENAI_DEFAULTS)
    fmt = f.body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            sampler.grammar = json_grammar(True, "response_format")
        elif kind == "json_schema":
            schema = fmt.get("json_schema")
            schema = schema.get("schema") if isinstance(schema, dict) else None
            sampler.grammar = json_grammar(schema, "response_format.json_schema.schema")
        elif kind != "text":
            raise RequestError("'response_format.type' must be 'text', 'json_object' or 'json_schema'")
    return dict(max_length=openai_max_tokens(f, default_max),
                stop_strings=f.string_list("stop"), sampler=sampler, genkey=genkey_of(req),
                ignored_fields=ignored_fields(f.body, OPENAI_IGNORED_FIELDS))


MAX_TOP_LOGPROBS = 20


def openai_logprob_fields(f: FieldReader, legacy: bool) -> dict:
    """Completions: `logprobs` is the number of alternatives; chat: `logprobs` true, `top_logprobs` N.
    Both from the model's own distribution, as OpenAI and llama-server report them."""
    if legacy:
        value = f.body.get("logprobs")
        if value is None or value is False:
            return {}
        top = 1 if value is True else f.integer("logprobs", default=0, lo=0, hi=MAX_TOP_LOGPROBS)
        return {"logprobs": True, "top_logprobs": top}
    if not f.boolean("logprobs"):
        return {}
    return {"logprobs": True, "top_logprobs": f.integer("top_logprobs", default=0, lo=0, hi=MAX_TOP_LOGPROBS)}


def openai_usage(job: Job) -> dict:
    p, c = job.stats.prompt_tokens, job.stats.generated_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": job.stats.cached_tokens},
            "truncated": job.stats.truncated}     # llama-server's flag: a context shift dropped text


def sse_data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def openai_stream(job: Job, head: dict, choice: Callable[[str], dict | None], first: dict | None,
                  final: dict, include_usage: bool,
                  logprobs: Callable[[list[TokenLogprob]], Any] | None = None,
                  tail: Callable[[], dict | None] | None = None,
                  finish_reason: Callable[[], str] | None = None) -> Iterator[bytes]:
    """`data:` lines only (no `event:`), exactly one final chunk, optional usage chunk, then [DONE].
    With `logprobs`, each write's last chunk carries the log-probabilities of its tokens; `tail` gives
    what a held-back choice still has at the end."""
    def chunk(choice_fields: dict, finish_reason=None, entries=()) -> bytes:
        return sse_data({**head, "choices": [{"index": 0, **choice_fields,
                                              "logprobs": logprobs(entries) if logprobs and entries else None,
                                              "finish_reason": finish_reason}]})
    if first is not None:
        yield chunk(first)
    rest: list[TokenLogprob] = []       # log-probabilities of tokens not yet shown in a chunk
    for batch, entries in batches_with_logprobs(job):
        rest += entries
        shown = [c for c in map(choice, batch) if c is not None]     # None: held back (a tag forming)
        if shown:
            yield b"".join(chunk(c, entries=rest if k == len(shown) - 1 else ()) for k, c in enumerate(shown))
            rest = []
    last = tail() if tail is not None else None
    if last is not None:
        yield chunk(last, entries=rest)
        rest = []
    if job.buffer.finish_reason == "error":
        yield sse_data({"error": {"message": job.buffer.error or "generation failed", "type": "server_error"}})
    else:
        yield chunk(final, finish_reason() if finish_reason else wire_finish_reason(job.buffer.finish_reason), rest)
        if include_usage:
            yield sse_data({**head, "choices": [], "usage": openai_usage(job)})
    yield SSE_DONE


def openai_head(served: ServedModel, kind: str, prefix: str) -> dict:
    return {"id": f"{prefix}-{secrets.token_hex(12)}", "object": kind, "created": int(time.time()),
            "model": served.name}


def include_usage_of(f: FieldReader) -> bool:
    options = f.body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def openai_models(app, req):
    """Every model, the default first; `status` as llama-server's router mode says it."""
    return JSONResponse({"object": "list", "data": [{
        "id": m["name"], "object": "model", "created": int(os.path.getmtime(app.catalog.find(m["name"]).path)),
        "owned_by": "koboldlite", "aliases": m["aliases"], "status": {"value": m["state"]},
        "size": m["size"], "context_length": m["context"]} for m in model_states(app)]})


def openai_completions(app, req):
    f = FieldReader(req.json())
    served = req.use(f.body.get("model"))
    prompt = f.body.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError("'prompt' must be a string (or a list of one string)")
    fields = openai_generation_fields(req, f, default_max=16)
    request = instruct_request(served, f, prompt=prompt, stop_strings=fields.pop("stop_strings"), **fields,
                               **openai_logprob_fields(f, legacy=True))
    job = req.start_generation(request)
    head = openai_head(served, "text_completion", "cmpl")
    shapes = LogprobShapes(served.model)
    if f.boolean("stream"):
        return StreamResponse("text/event-stream", openai_stream(
            job, head, lambda piece: {"text": piece}, None, {"text": ""}, include_usage_of(f), shapes.legacy), job)
    text = wait_for_text(job)
    return JSONResponse({**head, "choices": [{"text": text, "index": 0,
                                              "logprobs": shapes.legacy(job.logprobs) if request.logprobs else None,
                                              "finish_reason": wire_finish_reason(job.buffer.finish_reason)}],
                         "usage": openai_usage(job)})


def reasoning_fields(splitter: ReasoningSplitter | None, reasoning: str, answer: str,
                     names: tuple[str, str] = ("reasoning_content", "content")) -> dict:
    """The text as an API shows it: a thinking block apart (llama-server's `reasoning_content`,
    Ollama's `thinking`), or all inline."""
    if splitter is None:
        return {names[1]: reasoning + answer}
    return {**({names[0]: reasoning} if reasoning else {}), **({names[1]: answer} if answer else {})}


def openai_chat_completions(app, req):
    f = FieldReader(req.json())
    served = req.use(f.body.get("model"))
    messages = parse_chat_messages(f.body.get("messages"))
    fields = openai_generation_fields(req, f, default_max=None)
    tools = tool_use_of(served, f)
    template_vars = {}
    if tools is not None:
        messages, template_vars = tools.apply(messages, fields["sampler"])
    request = served.chat_template.generation_request(messages, template_vars=template_vars, **fields,
                                                      **openai_logprob_fields(f, legacy=False))
    job = req.start_generation(request)
    head = openai_head(served, "chat.completion.chunk", "chatcmpl")
    content = lambda entries: {"content": LogprobShapes(served.model).chat(entries)}    # noqa: E731
    # A thinking block goes to `reasoning_content` unless the client asks for it inline.
    inline = f.string("reasoning_format", default="auto") == "none"
    splitter = None if inline else ReasoningSplitter.for_prompt(request.prompt)
    watch = CallWatch(tools)

    def finish_reason() -> str:
        return "tool_calls" if watch.calls else wire_finish_reason(job.buffer.finish_reason)
    if f.boolean("stream"):
        def delta(piece: str) -> dict | None:
            reasoning, answer = splitter.feed(piece) if splitter else ("", piece)
            d = reasoning_fields(splitter, reasoning, watch.feed(answer))
            return {"delta": d} if any(d.values()) else None

        def tail() -> dict | None:
            reasoning, answer = splitter.flush() if splitter else ("", "")
            d = reasoning_fields(splitter, reasoning, watch.finish(answer))
            if watch.calls:
                d["tool_calls"] = [{"index": i, **call} for i, call in enumerate(watch.openai_calls())]
            return {"delta": d} if any(d.values()) else None
        return StreamResponse("text/event-stream", openai_stream(
            job, head, delta, {"delta": {"role": "assistant", "content": ""}}, {"delta": {}}, include_usage_of(f),
            content, tail, finish_reason), job)
    text = wait_for_text(job)
    reasoning, answer = splitter.split(text) if splitter else ("", text)
    message = {"role": "assistant", "content": "", **reasoning_fields(splitter, reasoning, watch.finish(answer))}
    if watch.calls:
        message["tool_calls"] = watch.openai_calls()
        message["content"] = message["content"] or None
    return JSONResponse({**head, "object": "chat.completion",
                         "choices": [{"index": 0, "message": message,
                                      "logprobs": content(job.logprobs) if request.logprobs else None,
                                      "finish_reason": finish_reason()}],
                         "usage": openai_usage(job)})


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


def ollama_generation_fields(req, f: FieldReader, app) -> dict:
    options = FieldReader(f.body.get("options") or {}, "options")
    sampler = parse_sampler_settings(options, OLLAMA_DEFAULTS)
    fmt = f.body.get("format")
    if fmt == "json":
        sampler.grammar = json_grammar(True, "format")
    elif fmt not in (None, ""):
        sampler.grammar = json_grammar(fmt, "format")
    num_predict = options.integer("num_predict", default=-1, lo=-2, hi=1 << 20)
    fields = {}
    if f.boolean("logprobs"):
        fields["logprobs"] = True
        fields["top_logprobs"] = f.integer("top_logprobs", default=0, lo=0, hi=MAX_TOP_LOGPROBS)
    return dict(**fields, max_length=None if num_predict < 0 else max(1, num_predict),
                max_context_length=options.integer("num_ctx", default=req.use().model.n_ctx, lo=16, hi=1 << 24),
                stop_strings=options.string_list("stop"), sampler=sampler, genkey=genkey_of(req),
                ignored_fields=ignored_fields(f.body, OLLAMA_IGNORED_FIELDS) + ignored_fields(
                    options.body, dict.fromkeys(OLLAMA_IGNORED_OPTIONS, lambda v: v is not None), "options."))


def ollama_final(job: Job, head: dict) -> dict:
    s = job.stats
    return {**head, "done": True, "done_reason": "length" if job.buffer.finish_reason == "length" else "stop",
            "total_duration": int((time.monotonic() - job.created) * 1e9), "load_duration": 0,
            "prompt_eval_count": s.prompt_tokens, "prompt_eval_duration": int(s.prompt_seconds * 1e9),
            "eval_count": s.generated_tokens, "eval_duration": int(s.generation_seconds * 1e9)}


def ollama_answer(job: Job, served: ServedModel, f: FieldReader, text_fields: Callable[[dict], dict],
                  tools: ToolUse | None = None) -> Response:
    """NDJSON, one object per token and a final one with counts; or one object with "stream": false.
    With "logprobs": true, objects carry their tokens' `logprobs` (Ollama's shape, OpenAI chat's list).
    A thinking block goes to `thinking`, unless "think": false asks for none (then it stays inline)."""
    model = served.name
    shapes = LogprobShapes(served.model)
    splitter = None if f.body.get("think") is False else ReasoningSplitter.for_prompt(job.request.prompt)
    watch = CallWatch(tools)

    def fields_of(reasoning: str, answer: str, last: bool = False) -> dict:
        answer = watch.finish(answer) if last else watch.feed(answer)
        out = text_fields(reasoning_fields(splitter, reasoning, answer, ("thinking", "content")))
        if watch.calls:   # Ollama's shape: arguments as an object
            out["message"]["tool_calls"] = [{"function": {"name": c["name"], "arguments": c["arguments"]}}
                                            for c in watch.calls]
        return out

    def obj(fields: dict, entries=()) -> dict:
        return {"model": model, "created_at": ollama_timestamp(), **fields,
                **({"logprobs": shapes.chat(entries)} if job.request.logprobs and entries else {})}
    if f.boolean("stream", default=True):
        def lines():
            rest = []
            for batch, entries in batches_with_logprobs(job):
                rest += entries
                parts = [splitter.feed(piece) if splitter else ("", piece) for piece in batch]
                parts = [(r, watch.feed(a)) for r, a in parts]
                parts = [p for p in parts if any(p)]
                if parts:
                    yield b"".join(json.dumps({**obj(text_fields(reasoning_fields(splitter, *p, ("thinking", "content"))),
                                                     rest if k == len(parts) - 1 else ()),
                                               "done": False}).encode() + b"\n" for k, p in enumerate(parts))
                    rest = []
            if job.buffer.finish_reason == "error":
                yield json.dumps({"error": job.buffer.error or "generation failed"}).encode() + b"\n"
            else:
                last = splitter.flush() if splitter else ("", "")
                yield json.dumps(ollama_final(job, obj(fields_of(*last, last=True), rest))).encode() + b"\n"
        return StreamResponse("application/x-ndjson", lines(), job)
    text = wait_for_text(job)
    return JSONResponse(ollama_final(job, obj(fields_of(*(splitter.split(text) if splitter else ("", text)), last=True),
                                              job.logprobs)))


def ollama_template_vars(f: FieldReader) -> dict:
    """`think`, for templates that read `enable_thinking` (Qwen3 and others) to think or not."""
    think = f.body.get("think")
    return {"enable_thinking": think} if isinstance(think, bool) else {}


def ollama_generate(app, req):
    f = FieldReader(req.json())
    prompt = f.string("prompt")
    if not prompt and not f.has("suffix"):
        # Ollama's way to load a model (an empty prompt), or with keep_alive 0 to unload it.
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
    served = ollama_use(req, f)
    fields = ollama_generation_fields(req, f, app)
    if f.boolean("raw"):
        request = GenerationRequest(prompt=prompt, **fields)
    else:
        messages = ([{"role": "system", "content": f.string("system")}] if f.string("system") else []) + \
                   [{"role": "user", "content": prompt}]
        request = served.chat_template.generation_request(messages, template_vars=ollama_template_vars(f), **fields)
    job = req.start_generation(request)
    return ollama_answer(job, served, f, lambda t: {"response": t.get("content", ""),
                                                 **({"thinking": t["thinking"]} if "thinking" in t else {})})


def ollama_chat(app, req):
    f = FieldReader(req.json())
    served = ollama_use(req, f)
    messages = parse_chat_messages(f.body.get("messages"))
    fields = ollama_generation_fields(req, f, app)
    # Ollama has no tool_choice; we take one beside the tools or in `options` (which its clients pass on).
    options = f.body.get("options") if isinstance(f.body.get("options"), dict) else {}
    tools = tool_use_of(served, f, f.body.get("tool_choice", options.get("tool_choice")))
    template_vars = ollama_template_vars(f)
    if tools is not None:
        messages, more = tools.apply(messages, fields["sampler"])
        template_vars.update(more)
    job = req.start_generation(served.chat_template.generation_request(messages, template_vars=template_vars,
                                                                       **fields))
    return ollama_answer(job, served, f, lambda t: {"message": {"role": "assistant", "content": t.get("content", ""),
                                                             **({"thinking": t["thinking"]} if "thinking" in t
                                                                else {})}}, tools)


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
                         "capabilities": ["completion"], "modified_at": listing["modified_at"]})


def download_folder(app) -> str:
    """Where downloads go: the models folder, or without one the folder the server was started in."""
    return app.config.modeldir or os.getcwd()


def add_downloaded(app, path: str) -> ModelEntry:
    if app.config.modeldir and os.path.dirname(os.path.abspath(path)) == os.path.abspath(app.config.modeldir):
        app.catalog.rescan()
        return app.catalog.find(model_name_of(path))
    return app.catalog.add_file(path)


def load_in_background(app, entry: ModelEntry):
    """Load a model for requests to come (the admin switch): the caller is answered at once."""
    def run():
        try:
            app.roster.release(app.roster.acquire(entry))
        except RequestError:
            pass                         # logged by the roster; listings show the error
    threading.Thread(target=run, name=f"load-{entry.name}", daemon=True).start()


ADMIN_WORDS = ("unload_model", "initial_model")     # KoboldCpp's list_options entries that are not files


def admin_folder(app) -> str | None:
    return app.config.admindir or app.config.modeldir


def admin_list_options(app, req):
    """The model files the admin API may switch to, and KoboldCpp's two words; [] with admin mode off."""
    folder = admin_folder(app)
    if not app.config.admin or not folder:
        return JSONResponse([])
    files = sorted(os.path.basename(files[0]) for files in scan_model_folder(folder).values())
    return JSONResponse(files + list(ADMIN_WORDS))


def admin_reload_config(app, req):
    """Switch the Kobold API's model to a file of the admin folder (loaded in the background: the polling
    endpoints and /api/v1/model answer meanwhile); `unload_model` unloads it, `initial_model` goes back."""
    if not app.config.admin:
        raise RequestError("the admin API is off: start with --admin (and --admindir or --modeldir)", status=403,
                           kind="forbidden")
    f = FieldReader(req.json())
    req.ignore_fields_but(f.body, "filename")
    filename = f.string("filename")
    if filename == "unload_model":
        name = app.catalog.default_name
        if app.roster.current(name) is not None and not app.roster.unload(name, "admin unload_model"):
            raise RequestError(f"model {name} is busy: try again when its replies end", status=409, kind="conflict")
        return JSONResponse({"success": True})
    if filename == "initial_model":
        entry = app.catalog.find(app.catalog.initial_name)
    else:
        folder = admin_folder(app)
        if not folder:
            raise RequestError("no admin folder: start with --admindir or --modeldir", status=403, kind="forbidden")
        # By name, not by where links lead: a link the user put in the folder is his to choose.
        root = os.path.abspath(folder)
        path = os.path.normpath(os.path.join(root, filename))
        outside = os.path.isabs(filename) or os.path.commonpath([root, path]) != root or path == root
        if outside or "\0" in filename:
            raise RequestError("filename must name a file inside the admin folder", status=403, kind="forbidden")
        if not filename.lower().endswith(".gguf") or not os.path.isfile(path):
            raise RequestError(f"no model file {filename!r} in the admin folder (GET /api/admin/list_options)",
                               status=404, kind="not_found")
        try:
            entry = app.catalog.find(model_name_of(path))
            if entry is None or os.path.realpath(entry.path) != os.path.realpath(path):
                entry = app.catalog.add_file(path)
        except ConfigError as e:
            raise RequestError(str(e), status=409, kind="conflict") from None
    app.catalog.default_name = entry.name
    app.log(f"admin: the Kobold API's model is now {entry.name}")
    load_in_background(app, entry)
    return JSONResponse({"success": True})


def router_load(app, req):
    """llama-server's POST /models/load: load it now (the answer waits for the load)."""
    f = FieldReader(req.json())
    entry = req.entry(f.string("model"))
    app.roster.release(app.roster.acquire(entry))
    return JSONResponse({"success": True})


def router_unload(app, req):
    f = FieldReader(req.json())
    entry = req.entry(f.string("model"))
    if app.roster.current(entry.name) is None:
        raise RequestError(f"model {entry.name} is not loaded")
    if not app.roster.unload(entry.name, "asked by /models/unload"):
        raise RequestError(f"model {entry.name} is busy: try again when its replies end", status=409, kind="conflict")
    return JSONResponse({"success": True})


def ollama_pull(app, req):
    """Ollama's pull, for an http(s) URL of a GGUF file (there is no model registry here), with its NDJSON
    progress objects. A pull of a model already here is a success; a hang-up stops the download and a
    later pull resumes it."""
    f = FieldReader(req.json())
    req.ignore_fields_but(f.body, "model", "name", "stream")
    source = f.string("model", "name")
    if not is_model_url(source):
        if app.catalog.find(source) is not None:
            return JSONResponse({"status": "success"})
        raise RequestError(f'model "{source}" not found: this server pulls http(s) URLs of GGUF files (a Hugging '
                           f'Face .../resolve/main/FILE.gguf), it reaches no model registry', status=404,
                           kind="not_found")
    updates: "queue.Queue[dict | None]" = queue.Queue()
    stop = threading.Event()
    last = [-1]

    def progress(done: int, total: int):
        if stop.is_set():
            raise DownloadError("the client hung up")
        step = done * 100 // total if total else done >> 24
        if step != last[0] or done == total:
            last[0] = step
            updates.put({"status": f"pulling {download.name}", "digest": f"sha256:{download.sha256 or ''}",
                         "total": total, "completed": done})
    try:
        download = ModelDownload(source, download_folder(app), progress, lambda what: updates.put({"status": what}))
    except DownloadError as e:
        raise RequestError(str(e)) from None

    def run() -> dict:
        try:
            path = download.run()
        except DownloadError as e:
            return {"error": str(e)}
        entry = add_downloaded(app, path)
        app.log(f"pulled {source} into {path} ({entry.size_bytes >> 20} MiB)")
        return {"status": "success"}
    if not f.boolean("stream", default=True):
        result = run()
        if "error" in result:
            raise RequestError(result["error"], status=500, kind="server_error")
        return JSONResponse(result)

    def worker():
        updates.put(run())
        updates.put(None)
    threading.Thread(target=worker, name="pull", daemon=True).start()

    def lines():
        try:
            yield json.dumps({"status": "pulling manifest"}).encode() + b"\n"
            while (update := updates.get()) is not None:
                if update.get("status") == "success":
                    yield b"".join(json.dumps({"status": s}).encode() + b"\n" for s in ("writing manifest", "success"))
                else:
                    yield json.dumps(update).encode() + b"\n"
        finally:
            stop.set()
    return StreamResponse("application/x-ndjson", lines())


def ollama_delete(app, req):
    """Remove a model's files from the models folder (never a file outside it, never the default model)."""
    f = FieldReader(req.json())
    name = f.string("model", "name")
    entry = app.catalog.find(name) if app.catalog.several else None
    folder = os.path.realpath(app.config.modeldir) if app.config.modeldir else None
    if entry is None or folder is None or os.path.dirname(os.path.realpath(entry.path)) != folder:
        raise RequestError(f'model "{name}" not found in the models folder', status=404, kind="not_found")
    if entry.name == app.catalog.default_name:
        raise RequestError(f"model {entry.name} is the default model: it cannot be deleted", status=409,
                           kind="conflict")
    if app.roster.current(entry.name) is not None and not app.roster.unload(entry.name, "deleted"):
        raise RequestError(f"model {entry.name} is busy: try again when its replies end", status=409, kind="conflict")
    for file in entry.files:
        os.remove(file)
    app.catalog.forget(entry.name)
    app.log(f"deleted model {entry.name}: {', '.join(entry.files)}")
    return Response(200, b"", "application/json")


SLOT_FILE_NAME = re.compile(r"[\w][\w.-]{0,199}")


def slots_list(app, req):
    """llama-server's GET /slots: each slot, whether it generates, how much it holds (no text)."""
    served = req.use(req.query.get("model"))
    return JSONResponse([{"id": s.seq_id, "n_ctx": served.model.n_ctx, "is_processing": s.busy,
                          "n_cached": len(s.cached)} for s in served.engine.slots])


def slot_file(app, f: FieldReader) -> tuple[str, str]:
    folder = app.config.slot_save_path
    if not folder:
        raise RequestError("saving slots is off: start with --slot-save-path DIR", status=501,
                           kind="not_supported_error")
    name = f.string("filename")
    if not SLOT_FILE_NAME.fullmatch(name) or ".." in name:
        raise RequestError("Invalid filename: a file name only, no path")
    return name, os.path.join(folder, name)


def slots_action(app, req):
    """llama-server's POST /slots/{id}?action=save|restore|erase, run on the generation loop between steps."""
    try:
        i = int(req.path.rsplit("/", 1)[1])
    except ValueError:
        raise RequestError("the slot id must be a number") from None
    action = req.query.get("action")
    served = req.use(req.query.get("model"))
    f = FieldReader(req.json(optional=True) or {})
    req.ignore_fields_but(f.body, "filename")
    started = time.monotonic()
    ms = lambda: round((time.monotonic() - started) * 1000, 3)    # noqa: E731
    if action == "erase":
        return JSONResponse({"id_slot": i, "n_erased": served.scheduler.call(lambda e: e.erase_slot(i))})
    if action == "save":
        name, path = slot_file(app, f)
        n, size = served.scheduler.call(lambda e: e.save_slot(i, path))
        app.log(f"slot {i}: {n} tokens saved to {name}")
        return JSONResponse({"id_slot": i, "filename": name, "n_saved": n, "n_written": size,
                             "timings": {"save_ms": ms()}})
    if action == "restore":
        name, path = slot_file(app, f)
        if not os.path.isfile(path):
            raise RequestError(f"no saved slot file {name!r}", status=404, kind="not_found")
        try:
            header, data = read_state_file(path, served.engine.identity)
        except StateFileError as e:
            raise RequestError(f"{name} cannot be restored here: {e}") from None
        n = served.scheduler.call(lambda e: e.restore_slot(i, header["tokens"], data))
        app.log(f"slot {i}: {n} tokens restored from {name}")
        return JSONResponse({"id_slot": i, "filename": name, "n_restored": n, "n_read": len(data),
                             "timings": {"restore_ms": ms()}})
    raise RequestError("action must be save, restore or erase")


KOBOLD_STATE_SLOTS = 3       # KoboldCpp's admin API keeps this many saved states


def admin_state_slot(app, req) -> tuple[FieldReader, int, ServedModel]:
    if not app.config.admin:
        raise RequestError("the admin API is off: start with --admin", status=403, kind="forbidden")
    f = FieldReader(req.json(optional=True) or {})
    k = f.integer("slot", default=0)
    if not 0 <= k < KOBOLD_STATE_SLOTS:
        raise RequestError(f"'slot' must be 0 to {KOBOLD_STATE_SLOTS - 1}, not {k}")
    return f, k, req.use()


def admin_save_state(app, req):
    """The conversation used last (KoboldCpp has one context) into saved state N, in RAM."""
    f, k, served = admin_state_slot(app, req)

    def save(engine: Engine):
        slot = engine.latest_slot()
        data = engine.pool.state_of(slot) if slot else None
        return (list(slot.cached), data) if data else None
    saved = served.scheduler.call(save)
    if saved is None:
        return JSONResponse({"success": False, "error": "no conversation to save"})
    served.saved_states[k] = saved
    return JSONResponse({"success": True, "new_state_size": len(saved[1]), "new_tokens": len(saved[0])})


def admin_load_state(app, req):
    """Saved state N back into the least recently used idle slot: the next prompt that continues it reads
    only what is new."""
    f, k, served = admin_state_slot(app, req)
    saved = served.saved_states.get(k)
    if saved is None:
        return JSONResponse({"success": False, "error": f"no saved state {k}"})

    def load(engine: Engine):
        idle = [s for s in engine.slots if not s.busy]
        if not idle:
            raise RequestError("every slot is generating: try again when one is done", status=409, kind="conflict")
        return engine.restore_slot(min(idle, key=lambda s: s.last_used).seq_id, *saved)
    n = served.scheduler.call(load)
    return JSONResponse({"success": True, "new_state_size": len(saved[1]), "new_tokens": n})


def admin_check_state(app, req):
    f, k, served = admin_state_slot(app, req)
    return JSONResponse({"success": True, "old_states": [len(served.saved_states[i][0]) if i in served.saved_states
                                                         else 0 for i in range(KOBOLD_STATE_SLOTS)],
                         "new_state_size": len(served.saved_states[k][1]) if k in served.saved_states else 0,
                         "new_tokens": len(served.saved_states[k][0]) if k in served.saved_states else 0})


def admin_clear_state(app, req):
    f, k, served = admin_state_slot(app, req)
    served.saved_states.pop(k, None)
    return JSONResponse({"success": True})


# Coding agents (Claude Code, Codex CLI) speak these. Both are adapters onto the same chat request, template,
# tools and reasoning split as the chat completions above; what differs is how a reply is cut into
# blocks (Anthropic) or output items (Responses) and how those stream.
class ReplyParts:
    """A chat reply read as the block APIs show it: ("reasoning", text) and ("text", text) parts as they
    stream, then the tool calls at the end (a reply that begins like a call is held until it is one)."""

    def __init__(self, job: Job, tools: ToolUse | None):
        self.splitter = ReasoningSplitter.for_prompt(job.request.prompt)
        self.watch = CallWatch(tools)

    def feed(self, piece: str) -> list[tuple[str, str]]:
        reasoning, answer = self.splitter.feed(piece)
        return self._parts(reasoning, self.watch.feed(answer))

    def finish(self) -> list[tuple[str, str]]:
        reasoning, answer = self.splitter.flush()
        return self._parts(reasoning, self.watch.finish(answer))

    @staticmethod
    def _parts(reasoning: str, answer: str) -> list[tuple[str, str]]:
        return [(kind, text) for kind, text in (("reasoning", reasoning), ("text", answer)) if text]

    @property
    def calls(self) -> list[dict]:
        return self.watch.calls


def sse_event(kind: str, data: dict) -> bytes:
    """`event:` and `data:` with the same type, as both APIs (and their SDKs, which drop events without it) want."""
    return (f"event: {kind}\ndata: ".encode() + json.dumps({"type": kind, **data}, ensure_ascii=False).encode()
            + b"\n\n")


def api_key_owner(req) -> str:
    """Whose stored responses a request may see: a digest of the key it offered (none is a key too)."""
    auth = req.headers.get("Authorization", "")
    key = auth[7:].strip() if auth[:7].lower() == "bearer " else req.headers.get("X-Api-Key", "").strip()
    return hashlib.sha256(key.encode()).hexdigest()


def text_only(kind: str, where: str) -> RequestError:
    return RequestError(f"{where} is a{'n' if kind[0] in 'aeiou' else ''} {kind} block: this server's model reads "
                        "text only")


def block_request_fields(req, f: FieldReader, max_length: int | None, ignored: list[str]) -> dict:
    return dict(max_length=max_length, sampler=parse_sampler_settings(f, OPENAI_DEFAULTS), genkey=genkey_of(req),
                ignored_fields=ignored)


ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 405: "invalid_request_error", 411: "invalid_request_error",
                         413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                         503: "overloaded_error", 529: "overloaded_error"}


ANTHROPIC_IGNORED_FIELDS: dict[str, Callable[[Any], bool]] = {
    "metadata": _asks, "service_tier": _asks, "container": _asks, "mcp_servers": _asks,
    "context_management": _asks,
}


ANTHROPIC_PING_SECONDS = 5.0      # a ping while nothing else is sent (a long prompt being read)


def anthropic_text(value: Any, where: str) -> str:
    """A string, or text blocks (others refused); `cache_control` on them needs nothing: prompts are cached anyway."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise RequestError(f"'{where}' must be a string or a list of text blocks")
    texts = []
    for j, block in enumerate(value):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind in ("image", "document", "search_result"):
            raise text_only(kind, f"{where}[{j}]")
        if kind != "text" or not isinstance(block.get("text"), str):
            raise RequestError(f"{where}[{j}] must be a text block ({{\"type\": \"text\", \"text\": ...}})")
        texts.append(block["text"])
    return "\n".join(texts)


def anthropic_messages(body: dict) -> list[dict]:
    """Anthropic's system and messages as the chat template reads them: tool_use blocks become the assistant's
    tool_calls, tool_result blocks tool messages, thinking blocks its reasoning_content."""
    out = [{"role": "system", "content": anthropic_text(body["system"], "system")}] if body.get("system") else []
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant", "system"):     # Claude Code sometimes sends a system turn here
            raise RequestError(f"{where}.role must be 'user' or 'assistant', not {role!r}")
        content = m.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise RequestError(f"{where}.content must be a string or a list of content blocks")
        texts, calls, results, thinking = [], [], [], []
        for j, block in enumerate(blocks):
            at = f"{where}.content[{j}]"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind in ("image", "document", "search_result"):
                raise text_only(kind, at)
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(block.get("name"), str) or not isinstance(block.get("input", {}), dict):
                    raise RequestError(f"{at} must be a tool_use block with a 'name' and an 'input' object")
                calls.append({"id": str(block.get("id") or f"toolu_{secrets.token_hex(12)}"), "type": "function",
                              "function": {"name": block["name"], "arguments": block.get("input") or {}}})
            elif kind == "tool_result" and role == "user":
                if not isinstance(block.get("tool_use_id"), str):
                    raise RequestError(f"{at}.tool_use_id must be a string")
                result = anthropic_text(block.get("content") or "", f"{at}.content")
                results.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                                "content": ("Error: " + result) if block.get("is_error") is True else result})
            elif kind == "thinking" and role == "assistant":
                thinking.append(str(block.get("thinking") or ""))
            elif kind == "redacted_thinking" and role == "assistant":
                continue                       # encrypted by another server: nothing a template could show
            else:
                raise RequestError(f"{at} must be a text, tool_use (assistant), tool_result (user) or thinking "
                                   f"block, not {kind!r}")
        names = tool_result_names(out)
        out += [{**r, "name": names[r["tool_call_id"]]} if r["tool_call_id"] in names else r for r in results]
        if role == "assistant":
            message = {"role": "assistant", "content": "".join(texts)}
            if calls:
                message["tool_calls"] = calls
            if thinking:
                message["reasoning_content"] = "".join(thinking)
            out.append(message)
        elif texts or not results:
            out.append({"role": role, "content": "\n".join(texts)})
    return out


def anthropic_tools(served: ServedModel, f: FieldReader, ignored: list[str]) -> ToolUse | None:
    """Client tools as function tools; server tools (a `type` such as web_search_20250305) are skipped, named."""
    tools = f.body.get("tools") or []
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list of tools")
    functions = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise RequestError(f"tools[{i}] must be a tool with a 'name'")
        if t.get("type") not in (None, "custom"):
            ignored.append(f"tools[{t['type']}]")
            continue
        functions.append({"type": "function", "function": {
            "name": t["name"], "description": t.get("description", ""),
            "parameters": t.get("input_schema") or {"type": "object"}}})
    choice = f.body.get("tool_choice")
    if choice is not None and not (isinstance(choice, dict) and choice.get("type") in ("auto", "any", "tool", "none")):
        raise RequestError("'tool_choice' must be {\"type\": \"auto\"}, {\"type\": \"any\"}, {\"type\": \"none\"} "
                           "or {\"type\": \"tool\", \"name\": ...}")
    if not functions:
        return None
    kind = (choice or {}).get("type", "auto")
    wanted = {"auto": "auto", "any": "required", "none": "none",
              "tool": {"type": "function", "function": {"name": (choice or {}).get("name")}}}[kind]
    return ToolUse(served.chat_template, functions, wanted, not (choice or {}).get("disable_parallel_tool_use"))


def anthropic_thinking_vars(f: FieldReader, ignored: list[str]) -> dict:
    """`thinking` turns a template's thinking on or off (`enable_thinking`); its token budget is not enforced."""
    thinking = f.body.get("thinking")
    if thinking is None:
        return {}
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind not in ("enabled", "disabled", "adaptive"):
        raise RequestError("'thinking' must be {\"type\": \"enabled\", \"budget_tokens\": N} or {\"type\": \"disabled\"}")
    if kind == "enabled" and thinking.get("budget_tokens") is not None:
        ignored.append("thinking.budget_tokens")
    return {"enable_thinking": kind != "disabled"}


def anthropic_request(app, req, count_only: bool = False) -> tuple[GenerationRequest, ToolUse | None, list[str]]:
    """(the generation request, its tools, the client's own stop sequences)."""
    f = FieldReader(req.json())
    served = req.use(f.body.get("model"))
    ignored = ignored_fields(f.body, ANTHROPIC_IGNORED_FIELDS)
    messages = anthropic_messages(f.body)
    if count_only:
        max_tokens = None
    elif not f.has("max_tokens"):
        raise RequestError("'max_tokens' is required")
    else:
        max_tokens = f.integer("max_tokens", default=1, lo=-(1 << 62), hi=1 << 20)
        if max_tokens < 1:
            raise RequestError(f"'max_tokens' must be at least 1, not {max_tokens}")
    fields = block_request_fields(req, f, max_tokens, ignored)
    config = f.body.get("output_config") if isinstance(f.body.get("output_config"), dict) else {}
    fmt = config.get("format") or f.body.get("output_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        fields["sampler"].grammar = json_grammar(fmt.get("schema"), "output_config.format.schema")
    if config.get("effort") is not None:
        ignored.append("output_config.effort")
    template_vars = anthropic_thinking_vars(f, ignored)
    tools = anthropic_tools(served, f, ignored)
    if tools is not None:
        messages, more = tools.apply(messages, fields["sampler"])
        template_vars.update(more)
    stops = f.string_list("stop_sequences")
    request = served.chat_template.generation_request(messages, stop_strings=stops, template_vars=template_vars,
                                                      **fields)
    return request, tools, stops


class AnthropicBlocks:
    """A reply's content blocks, built as its parts arrive, with the stream events that announce them
    (thrown away when the reply is not streamed: both answers are the same blocks)."""

    def __init__(self):
        self.content: list[dict] = []
        self._open: str | None = None

    def part(self, kind: str, text: str) -> bytes:
        block_type = "thinking" if kind == "reasoning" else "text"
        out = b""
        if self._open != block_type:
            out += self.close()
            self._open = block_type
            self.content.append({"type": "thinking", "thinking": "", "signature": ""} if block_type == "thinking"
                                else {"type": "text", "text": ""})
            out += sse_event("content_block_start", {"index": len(self.content) - 1, "content_block": dict(
                self.content[-1])})
        self.content[-1][block_type] += text
        delta = {"type": "thinking_delta", "thinking": text} if block_type == "thinking" else \
            {"type": "text_delta", "text": text}
        return out + sse_event("content_block_delta", {"index": len(self.content) - 1, "delta": delta})

    def close(self) -> bytes:
        if self._open is None:
            return b""
        index = len(self.content) - 1
        out = sse_event("content_block_delta", {"index": index, "delta": {"type": "signature_delta", "signature": ""}}) \
            if self._open == "thinking" else b""
        self._open = None
        return out + sse_event("content_block_stop", {"index": index})

    def tool_use(self, call: dict) -> bytes:
        out = self.close()
        block = {"type": "tool_use", "id": f"toolu_{secrets.token_hex(12)}", "name": call["name"], "input": {}}
        self.content.append({**block, "input": call["arguments"]})
        index = len(self.content) - 1
        return out + sse_event("content_block_start", {"index": index, "content_block": block}) + sse_event(
            "content_block_delta", {"index": index, "delta": {
                "type": "input_json_delta", "partial_json": json.dumps(call["arguments"], ensure_ascii=False)}}) + \
            sse_event("content_block_stop", {"index": index})

    def finish(self, parts: ReplyParts) -> bytes:
        out = b"".join(self.part(kind, text) for kind, text in parts.finish()) + self.close()
        return out + b"".join(self.tool_use(call) for call in parts.calls)


def anthropic_stop(job: Job, parts: ReplyParts, stops: list[str]) -> dict:
    if parts.calls:
        return {"stop_reason": "tool_use", "stop_sequence": None}
    if job.buffer.finish_reason == "length":
        return {"stop_reason": "max_tokens", "stop_sequence": None}
    if job.stats.stop_string is not None and job.stats.stop_string in stops:
        return {"stop_reason": "stop_sequence", "stop_sequence": job.stats.stop_string}
    return {"stop_reason": "end_turn", "stop_sequence": None}


def anthropic_usage(job: Job) -> dict:
    """Anthropic counts prompt tokens the cache held apart: input_tokens + cache_read_input_tokens is the prompt."""
    s = job.stats
    return {"input_tokens": s.prompt_tokens - s.cached_tokens, "output_tokens": s.generated_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": s.cached_tokens}


def anthropic_start(req, request: GenerationRequest) -> Job:
    try:
        return req.start_generation(request)
    except RequestError as e:
        if e.kind == "exceed_context_size_error":   # Claude Code reads these words to compact its conversation
            raise RequestError(f"prompt is too long: {e.extra['n_prompt_tokens']} tokens > {e.extra['n_ctx']} "
                               f"maximum") from None
        raise


def anthropic_messages_route(app, req):
    request, tools, stops = anthropic_request(app, req)
    job = anthropic_start(req, request)
    head = {"id": f"msg_{secrets.token_hex(12)}", "type": "message", "role": "assistant", "model": req.use().name}
    parts, blocks = ReplyParts(job, tools), AnthropicBlocks()
    if FieldReader(req.json()).boolean("stream"):
        def events() -> Iterator[bytes]:
            yield sse_event("message_start", {"message": {
                **head, "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": len(job.prompt_tokens), "output_tokens": 0,
                          "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}}) + sse_event("ping", {})
            index = 0
            while True:
                new, done = job.buffer.read(index, timeout=ANTHROPIC_PING_SECONDS)
                index += len(new)
                if not new and not done:
                    yield sse_event("ping", {})
                    continue
                out = b"".join(blocks.part(kind, text) for piece in new for kind, text in parts.feed(piece))
                if out:
                    yield out
                if done and not new:
                    break
            if job.buffer.finish_reason == "error":
                yield blocks.close() + sse_event("error", {"error": {
                    "type": "api_error", "message": job.buffer.error or "generation failed"}})
                return
            yield blocks.finish(parts) + sse_event("message_delta", {
                "delta": anthropic_stop(job, parts, stops), "usage": anthropic_usage(job)}) + sse_event("message_stop", {})
        return StreamResponse("text/event-stream", events(), job)
    text = wait_for_text(job)
    for kind, part in parts.feed(text):
        blocks.part(kind, part)
    blocks.finish(parts)
    return JSONResponse({**head, "content": blocks.content, **anthropic_stop(job, parts, stops),
                         "usage": anthropic_usage(job)})


def anthropic_count_tokens(app, req):
    request, _, _ = anthropic_request(app, req, count_only=True)
    req.ignored = request.ignored_fields
    return JSONResponse({"input_tokens": req.use().engine.count_prompt_tokens(request)})


RESPONSES_IGNORED_FIELDS: dict[str, Callable[[Any], bool]] = {
    "include": _asks, "prompt_cache_key": _asks, "client_metadata": _asks, "service_tier": _asks,
    "safety_identifier": _asks, "user": _asks, "truncation": lambda v: v == "auto", "background": _asks,
    "top_logprobs": _asks, "prompt": _asks, "max_tool_calls": _asks, "conversation": _asks, "stream_options": _asks,
}


def response_not_found(response_id: str) -> RequestError:
    return RequestError(f"no response with id {response_id!r} is stored here (it was never stored, was deleted, was "
                        f"made with another key, or was evicted: at most {ResponseStore.MAX_ITEMS} are kept)",
                        status=404, kind="invalid_request_error", code="not_found")


def responses_text(value: Any, where: str) -> str:
    """Message content: a string, or parts (input_text, output_text...); images and files refused."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise RequestError(f"'{where}' must be a string or a list of content parts")
    texts = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "summary_text", "reasoning_text") \
                and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        elif kind in ("input_image", "input_file", "input_audio"):
            raise text_only(kind.replace("input_", ""), f"{where}[{j}]")
        else:
            raise RequestError(f"{where}[{j}] must be an input_text or output_text part, not {kind!r}")
    return "".join(texts)


def responses_messages(value: Any, ignored: list[str], earlier: list[dict] = ()) -> list[dict]:
    """`input` (a string or items) as chat messages: function_call items become the assistant's tool_calls,
    function_call_output items tool messages, reasoning items the next assistant turn's reasoning_content."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise RequestError("'input' must be a string or a list of input items")
    out: list[dict] = []
    reasoning: list[str] = []
    names = tool_result_names(list(earlier))
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise RequestError(f"{where} must be an object")
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise RequestError(f"{where}.role must be user, assistant, system or developer, not {role!r}")
            message = {"role": "system" if role == "developer" else role,
                       "content": responses_text(item.get("content"), f"{where}.content")}
            if role == "assistant" and reasoning:
                message["reasoning_content"], reasoning = "".join(reasoning), []
            out.append(message)
        elif kind == "function_call":
            if not isinstance(item.get("name"), str) or not isinstance(item.get("call_id"), str):
                raise RequestError(f"{where} must be a function_call with a 'name' and a 'call_id'")
            call = tool_call_of({"id": item["call_id"], "function": {"name": item["name"],
                                                                       "arguments": item.get("arguments") or "{}"}},
                                where)
            names[item["call_id"]] = item["name"]
            if out and out[-1]["role"] == "assistant":     # the calls of one turn follow its text
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
            if reasoning:
                out[-1]["reasoning_content"], reasoning = "".join(reasoning), []
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise RequestError(f"{where}.call_id must be a string")
            message = {"role": "tool", "tool_call_id": item["call_id"],
                       "content": responses_text(item.get("output") if item.get("output") is not None else "",
                                                 f"{where}.output")}
            if item["call_id"] in names:
                message["name"] = names[item["call_id"]]
            out.append(message)
        elif kind == "reasoning":
            reasoning.append(responses_text(item.get("content") or item.get("summary") or [], f"{where}.content"))
        elif kind == "item_reference":
            raise RequestError(f"{where}: item references are not served; send the items, or previous_response_id")
        else:
            ignored.append(f"input[{kind}]")      # another tool's call or output (local_shell_call...): not run here
    return out


def responses_tools(served: ServedModel, f: FieldReader, ignored: list[str]) -> ToolUse | None:
    """Flat function tools; the kinds this server cannot run (web_search, file_search, local_shell, custom, mcp,
    a namespace group...) are skipped and named, since Codex sends them on every request."""
    tools = f.body.get("tools") or []
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list of tools")
    functions = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise RequestError(f"tools[{i}] must be an object")
        if t.get("type") != "function":
            ignored.append(f"tools[{t.get('type')}]")
            continue
        if not isinstance(t.get("name"), str):
            raise RequestError(f"tools[{i}].name must be a string")
        functions.append({"type": "function", "function": {
            "name": t["name"], "description": t.get("description") or "",
            "parameters": t.get("parameters") or {"type": "object"}}})
    choice = f.body.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") == "function" and isinstance(choice.get("name"), str):
            choice = {"type": "function", "function": {"name": choice["name"]}}
        else:
            ignored.append("tool_choice")        # allowed_tools, or a tool kind not served: the model chooses
            choice = "auto"
    if not functions:
        return None
    return ToolUse(served.chat_template, functions, choice, f.body.get("parallel_tool_calls") is not False)


class ResponseItems:
    """A reply's output items (reasoning, message, function calls), built as its parts arrive, with the
    stream events that announce them, each numbered (thrown away when the reply is not streamed)."""

    def __init__(self):
        self.output: list[dict] = []
        self.sequence = 0
        self._open: str | None = None

    def event(self, kind: str, **data) -> bytes:
        out = sse_event(kind, {"sequence_number": self.sequence, **data})
        self.sequence += 1
        return out

    def _add(self, item: dict, part: dict | None) -> bytes:
        self.output.append(item)
        index = len(self.output) - 1
        out = self.event("response.output_item.added", output_index=index,
                         item={**item, "status": "in_progress", "content": []} if part else dict(item))
        if part is not None:
            item["content"] = [part]
            out += self.event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                              part=dict(part))
        return out

    def part(self, kind: str, text: str) -> bytes:
        item_type = "reasoning" if kind == "reasoning" else "message"
        out = b""
        if self._open != item_type:
            out += self.close()
            self._open = item_type
            if item_type == "reasoning":
                out += self._add({"type": "reasoning", "id": f"rs_{secrets.token_hex(12)}", "summary": [],
                                  "status": "in_progress"}, {"type": "reasoning_text", "text": ""})
            else:
                out += self._add({"type": "message", "id": f"msg_{secrets.token_hex(12)}", "role": "assistant",
                                  "status": "in_progress"}, {"type": "output_text", "text": "", "annotations": [],
                                                             "logprobs": []})
        item = self.output[-1]
        item["content"][0]["text"] += text
        where = dict(item_id=item["id"], output_index=len(self.output) - 1, content_index=0)
        if item_type == "reasoning":
            return out + self.event("response.reasoning_text.delta", **where, delta=text)
        return out + self.event("response.output_text.delta", **where, delta=text, logprobs=[])

    def close(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        item = self.output[-1]
        item["status"] = "completed"
        part = item["content"][0]
        where = dict(item_id=item["id"], output_index=len(self.output) - 1, content_index=0)
        done = "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
        return (self.event(done, **where, text=part["text"], **({} if item["type"] == "reasoning" else {"logprobs": []}))
                + self.event("response.content_part.done", **where, part=dict(part))
                + self.event("response.output_item.done", output_index=len(self.output) - 1, item=dict(item)))

    def function_call(self, call: dict) -> bytes:
        out = self.close()
        arguments = json.dumps(call["arguments"], ensure_ascii=False)
        item = {"type": "function_call", "id": f"fc_{secrets.token_hex(12)}", "call_id": f"call_{secrets.token_hex(12)}",
                "name": call["name"], "arguments": "", "status": "in_progress"}
        out += self._add(item, None)
        index = len(self.output) - 1
        out += self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                          delta=arguments)
        item.update(arguments=arguments, status="completed")
        return out + self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                name=item["name"], arguments=arguments) + \
            self.event("response.output_item.done", output_index=index, item=dict(item))

    def finish(self, parts: ReplyParts) -> bytes:
        out = b"".join(self.part(kind, text) for kind, text in parts.finish()) + self.close()
        return out + b"".join(self.function_call(call) for call in parts.calls)

    def as_message(self) -> dict:
        """The reply as the assistant turn of a stored conversation."""
        message = {"role": "assistant", "content": "".join(
            i["content"][0]["text"] for i in self.output if i["type"] == "message")}
        reasoning = "".join(i["content"][0]["text"] for i in self.output if i["type"] == "reasoning")
        if reasoning:
            message["reasoning_content"] = reasoning
        calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"],
                                                                       "arguments": json.loads(i["arguments"])}}
                 for i in self.output if i["type"] == "function_call"]
        if calls:
            message["tool_calls"] = calls
        return message


class ResponsesCall:
    """One /v1/responses request: its conversation (the stored one it continues, then its input), the
    generation request made of it, and the response object it answers with."""

    def __init__(self, app, req, count_only: bool = False):
        self.app = app
        f = self.f = FieldReader(req.json())
        self.ignored = ignored_fields(f.body, RESPONSES_IGNORED_FIELDS)
        self.owner = api_key_owner(req)
        self.previous_id = f.string("previous_response_id") or None
        earlier: list[dict] = []
        if self.previous_id is not None:
            stored = app.responses.get(self.owner, self.previous_id)
            if stored is None:
                raise response_not_found(self.previous_id)
            earlier = stored[1]
        if f.body.get("input") is None and not earlier:
            raise RequestError("'input' is required")
        self.conversation = earlier + responses_messages(f.body.get("input") or [], self.ignored, earlier)
        instructions = f.string("instructions")
        messages = ([{"role": "system", "content": instructions}] if instructions else []) + self.conversation
        if not messages:
            raise RequestError("'input' must hold at least one item")
        max_output = None if count_only else f.body.get("max_output_tokens")
        if max_output is not None:
            max_output = f.integer("max_output_tokens", default=1, lo=-(1 << 62), hi=1 << 20)
            if max_output < 1:
                raise RequestError(f"'max_output_tokens' must be at least 1, not {max_output}")
        fields = block_request_fields(req, f, max_output, self.ignored)
        self.sampler = fields["sampler"]
        self.format = self._text_format(f)
        template_vars = self._reasoning_vars(f)
        self.served = served = req.use(f.body.get("model"))
        self.tools = responses_tools(served, f, self.ignored)
        if self.tools is not None:
            messages, more = self.tools.apply(messages, self.sampler)
            template_vars.update(more)
        self.request = served.chat_template.generation_request(messages, template_vars=template_vars, **fields)
        self.id = f"resp_{secrets.token_hex(16)}"
        self.created = int(time.time())
        self.store = f.body.get("store") is not False

    def _text_format(self, f: FieldReader) -> dict:
        text = f.body.get("text")
        if text is None:
            return {"type": "text"}
        fmt = text.get("format") if isinstance(text, dict) else None
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if isinstance(text, dict) and text.get("verbosity") is not None:
            self.ignored.append("text.verbosity")
        if fmt is None:
            return {"type": "text"}
        if kind == "json_object":
            self.sampler.grammar = json_grammar(True, "text.format")
        elif kind == "json_schema":
            self.sampler.grammar = json_grammar(fmt.get("schema"), "text.format.schema")
        elif kind != "text":
            raise RequestError("'text.format.type' must be 'text', 'json_object' or 'json_schema'")
        return fmt

    def _reasoning_vars(self, f: FieldReader) -> dict:
        """`reasoning.effort` "none" turns a template's thinking off (`enable_thinking`), any other on."""
        reasoning = f.body.get("reasoning")
        if not isinstance(reasoning, dict):
            return {}
        if reasoning.get("summary") is not None:
            self.ignored.append("reasoning.summary")     # the reasoning itself is given, not a summary
        effort = reasoning.get("effort")
        return {} if effort is None else {"enable_thinking": effort != "none"}

    def response(self, status: str, items: ResponseItems, job: Job | None = None, error: dict | None = None) -> dict:
        usage = None
        if job is not None and status != "in_progress":
            s = job.stats
            reasoning = "".join(i["content"][0]["text"] for i in items.output if i["type"] == "reasoning")
            usage = {"input_tokens": s.prompt_tokens, "input_tokens_details": {"cached_tokens": s.cached_tokens},
                     "output_tokens": s.generated_tokens, "output_tokens_details": {
                         "reasoning_tokens": len(self.served.model.tokenize(reasoning)) if reasoning else 0},
                     "total_tokens": s.prompt_tokens + s.generated_tokens}
        f = self.f
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "background": False, "error": error,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": f.body.get("instructions"), "max_output_tokens": f.body.get("max_output_tokens"),
                "model": self.served.name, "output": [dict(i) for i in items.output] if status != "in_progress"
                else [], "parallel_tool_calls": f.body.get("parallel_tool_calls") is not False,
                "previous_response_id": self.previous_id,
                "reasoning": {"effort": (f.body.get("reasoning") or {}).get("effort"), "summary": None},
                "store": self.store, "temperature": self.sampler.temperature, "top_p": self.sampler.top_p,
                "text": {"format": self.format}, "tool_choice": f.body.get("tool_choice") or "auto",
                "tools": [{"type": "function", **t["function"]} for t in self.tools.tools] if self.tools else [],
                "truncation": "disabled", "usage": usage, "metadata": f.body.get("metadata") or {}}

    def status_of(self, job: Job) -> str:
        if job.buffer.finish_reason == "error":
            return "failed"
        return "incomplete" if job.buffer.finish_reason == "length" else "completed"

    def keep(self, response: dict, items: ResponseItems):
        if self.store and response["status"] != "failed":
            self.app.responses.put(self.owner, response, self.conversation + [items.as_message()])


def responses_create(app, req):
    call = ResponsesCall(app, req)
    job = req.start_generation(call.request)
    parts, items = ReplyParts(job, call.tools), ResponseItems()
    if call.f.boolean("stream"):
        def events() -> Iterator[bytes]:
            yield items.event("response.created", response=call.response("in_progress", items)) + \
                items.event("response.in_progress", response=call.response("in_progress", items))
            for batch in job.buffer.batches():
                out = b"".join(items.part(kind, text) for piece in batch for kind, text in parts.feed(piece))
                if out:
                    yield out
            status = call.status_of(job)
            if status == "failed":
                response = call.response("failed", items, job, {"code": "server_error",
                                                                "message": job.buffer.error or "generation failed"})
                yield items.close() + items.event("response.failed", response=response)
                return
            out = items.finish(parts)
            response = call.response(status, items, job)
            call.keep(response, items)
            yield out + items.event(f"response.{status}", response=response)
        return StreamResponse("text/event-stream", events(), job)
    text = wait_for_text(job)
    for kind, part in parts.feed(text):
        items.part(kind, part)
    items.finish(parts)
    response = call.response(call.status_of(job), items, job)
    call.keep(response, items)
    return JSONResponse(response)


def responses_input_tokens(app, req):
    call = ResponsesCall(app, req, count_only=True)
    req.ignored = call.ignored
    return JSONResponse({"object": "response.input_tokens", "input_tokens": call.served.engine.count_prompt_tokens(call.request)})


def responses_by_id(app, req):
    """GET or DELETE /v1/responses/{id}: only the key that stored it reaches it."""
    response_id = req.path.rsplit("/", 1)[1]
    owner = api_key_owner(req)
    if req.method == "DELETE":
        if not app.responses.delete(owner, response_id):
            raise response_not_found(response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})
    stored = app.responses.get(owner, response_id)
    if stored is None:
        raise response_not_found(response_id)
    return JSONResponse(stored[0])


def embedding_inputs(f: FieldReader, *names: str) -> list[str]:
    value = f.value(*names)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value) and len(value) <= 2048:
        return value
    raise RequestError(f"'{names[0]}' must be a string or a non-empty list of strings")


# Embedding fields we know and do not act on: the vector's size is the model's, input longer than the
# embedding context is always cut.
OPENAI_EMBEDDING_IGNORED = {"dimensions": _asks}


OLLAMA_EMBEDDING_IGNORED = {"dimensions": _asks, "truncate": lambda v: v is False, "options": _asks}


def embedder_for(req, f: FieldReader) -> tuple[Embedder, str]:
    """The embedding context a request uses, and the name its answer gives: --embeddings-model's whatever
    the request names, else the named model's own."""
    app = req.app
    if app.embeddings_source is not None:
        return app.embedder(None), app.embeddings_source.name
    served = req.use(f.body.get("model"))
    return app.embedder(served), served.name


def openai_embeddings(app, req):
    """OpenAI's shape; base64 when asked, as the official client asks by default."""
    import base64
    import numpy
    f = FieldReader(req.json())
    req.ignored = ignored_fields(f.body, OPENAI_EMBEDDING_IGNORED)
    embedder, name = embedder_for(req, f)
    vectors, n_tokens = embedder.embed(embedding_inputs(f, "input", "content"))
    as_base64 = f.string("encoding_format", default="float") == "base64"
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(numpy.asarray(v, dtype="<f4").tobytes()).decode() if as_base64 else v}
            for i, v in enumerate(vectors)]
    return JSONResponse({"object": "list", "data": data, "model": name,
                         "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})


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


def health(app, req):
    """Ready for new work: 503 while loading or when the queue is full (a balancer sends work elsewhere)."""
    if not app.ready.is_set():
        return JSONResponse({"status": "loading model"}, 503)
    served = app.roster.current()
    if served is not None and served.scheduler.saturated:
        return JSONResponse({"status": "busy"}, 503)
    return JSONResponse({"status": "ok"})


def health_live(app, req):
    """Alive and loaded, busy or not: a balancer's genkey routing must still reach running generations."""
    if not app.ready.is_set():
        return JSONResponse({"status": "loading model"}, 503)
    return JSONResponse({"status": "ok"})


def props(app, req):
    """llama-server's: of the default model, or of ?model=NAME as its router mode takes it."""
    served = req.use(req.query.get("model"))
    d = OPENAI_DEFAULTS
    return JSONResponse({
        "default_generation_settings": {
            "n_ctx": served.model.n_ctx, "temperature": d.temperature, "top_k": d.top_k, "top_p": d.top_p,
            "min_p": d.min_p, "repeat_penalty": d.rep_pen, "repeat_last_n": d.rep_pen_range,
            "n_predict": -1, "seed": -1},
        "total_slots": len(served.engine.slots),
        "memory": served.model.memory_report(),
        "gpu": gpu_report(served),
        "chat_template": served.chat_template.source,
        "bos_token": served.chat_template.bos_text, "eos_token": served.chat_template.eos_text,
        "model_alias": served.name,
        "model_path": os.path.basename(served.entry.path),
        "models": model_states(app),
        "build_info": f"koboldlite-{__version__}",
    })


def tokenize(app, req):
    f = FieldReader(req.json())
    content = f.string("content", "prompt")
    model = req.use(f.body.get("model")).model
    ids = model.tokenize(content, add_bos=f.boolean("add_special", default=False),
                         parse_special=f.boolean("parse_special", default=True))
    if f.boolean("with_pieces"):
        return JSONResponse({"tokens": [{"id": t, "piece": text_or_bytes(model.piece(t, special=True))}
                                        for t in ids]})
    return JSONResponse({"tokens": ids})


def text_or_bytes(data: bytes) -> str | list[int]:
    """A token's piece as text when it is whole UTF-8, else its bytes (part of a character)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return list(data)


def detokenize(app, req):
    f = FieldReader(req.json())
    ids = f.token_ids("tokens")
    model = req.use(f.body.get("model")).model
    bad = [t for t in ids if not model.valid_token(t)]
    if bad:
        raise RequestError(f"'tokens' holds ids outside the vocabulary (0..{model.n_vocab - 1}): {bad[0]}")
    # Special tokens are shown as their text, so that /tokenize (which parses them) and this round-trip.
    return JSONResponse({"content": model.detokenize(ids, special=True)})


def apply_template(app, req):
    """The prompt a chat request's messages become (llama-server's /apply-template)."""
    f = FieldReader(req.json())
    template = req.use(f.body.get("model")).chat_template
    return JSONResponse({"prompt": template.render(parse_chat_messages(f.body.get("messages")))})


def metrics(app, req):
    totals = app.totals
    loaded = app.roster.any_loaded()
    rows = [
        ("requests_total", "counter", "Generations finished.", totals["requests"]),
        ("prompt_tokens_total", "counter", "Prompt tokens evaluated (cached ones excluded).",
         totals["prompt_tokens"]),
        ("prompt_seconds_total", "counter", "Seconds spent evaluating prompts.", totals["prompt_seconds"]),
        ("tokens_predicted_total", "counter", "Tokens generated.", totals["generated_tokens"]),
        ("tokens_predicted_seconds_total", "counter", "Seconds spent generating.", totals["generation_seconds"]),
        ("requests_aborted_total", "counter", "Generations aborted or dropped by their client.",
         totals["finished_abort"]),
        ("requests_failed_total", "counter", "Generations that failed.", totals["finished_error"]),
        ("queue_depth", "gauge", "Requests waiting for a slot.", sum(m.scheduler.waiting for m in loaded)),
        ("slots_busy", "gauge", "Slots generating now.", sum(m.scheduler.active for m in loaded)),
        ("slots_total", "gauge", "Slots (--parallel) of the loaded models.", sum(len(m.engine.slots) for m in loaded)),
        ("busy", "gauge", "1 while any generation runs or waits.", int(any(not m.scheduler.idle for m in loaded))),
        ("models_loaded", "gauge", "Models loaded now.", len(loaded)),
        ("uptime_seconds", "gauge", "Seconds since start.", time.monotonic() - app.started),
    ]
    out = []
    for name, kind, help_text, value in rows:
        out += [f"# HELP koboldlite_{name} {help_text}", f"# TYPE koboldlite_{name} {kind}",
                f"koboldlite_{name} {value:g}" if isinstance(value, float) else f"koboldlite_{name} {value}"]
    return Response(200, ("\n".join(out) + "\n").encode(), "text/plain; version=0.0.4")


@dataclasses.dataclass
class Route:
    handler: Callable[[App, "Request"], Response]
    protected: bool = False     # needs the password when one is set
    style: str = "kobold"       # error body shape
    needs_model: bool = True
    admin: bool = False         # KoboldCpp's admin API: --adminpassword, when set, instead of --password


class StaticFiles:
    """The files of embedded_ui/, read once at start. Only these exact paths are ever served,
    so no request path (`..`, encoded dots, absolute paths) can reach any other file."""

    TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
             ".js": "text/javascript; charset=utf-8", ".json": "application/json", ".svg": "image/svg+xml",
             ".png": "image/png", ".ico": "image/x-icon", ".webmanifest": "application/manifest+json"}
    COMPRESSIBLE = (".html", ".css", ".js", ".json", ".svg", ".webmanifest")
    HEADERS = {"Cache-Control": "no-cache", "Vary": "Accept-Encoding", "X-Content-Type-Options": "nosniff",
               "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                                          "base-uri 'none'; frame-ancestors 'none'"}

    def __init__(self, directory: str):
        self.files: dict[str, tuple[bytes, bytes | None, str, str]] = {}
        for root, _, names in os.walk(directory):
            for name in sorted(names):
                full = os.path.join(root, name)
                url = "/" + os.path.relpath(full, directory).replace(os.sep, "/")
                with open(full, "rb") as f:
                    data = f.read()
                ext = os.path.splitext(name)[1].lower()
                packed = gzip.compress(data, 9, mtime=0) if ext in self.COMPRESSIBLE else None
                etag = '"' + hashlib.sha256(data).hexdigest()[:20] + '"'
                self.files[url] = (data, packed, self.TYPES.get(ext, "application/octet-stream"), etag)
        if "/index.html" in self.files:
            self.files["/"] = self.files["/index.html"]
        if "/favicon.svg" in self.files:
            self.files["/favicon.ico"] = self.files["/favicon.svg"]   # asked for by browsers and clients anyway

    def route(self, path: str) -> "Route | None":
        return Route(self.serve, needs_model=False) if path in self.files else None

    def serve(self, app, req) -> Response:
        data, packed, content_type, etag = self.files[req.path]
        headers = {**self.HEADERS, "ETag": etag}
        if req.headers.get("If-None-Match") == etag:
            return Response(304, b"", content_type, headers)
        if packed is not None and "gzip" in req.headers.get("Accept-Encoding", ""):
            return Response(200, packed, content_type, {**headers, "Content-Encoding": "gzip"})
        return Response(200, data, content_type, headers)


UI_DIR = os.path.join(program_folder(), "embedded_ui")


class Router:
    """Exact paths to routes, per method; /api/latest/... is /api/v1/...; then, for GET, the fallback (the built-in
    page's files)."""

    def __init__(self, fallback: Callable[[str], "Route | None"] | None = None):
        self._routes: dict[tuple[str, str], Route] = {}
        self._prefixes: list[tuple[str, str, Route]] = []     # (method, prefix, route): /v1/responses/{id}
        self.fallback = fallback

    def add(self, methods: str, paths: str, handler, **kw):
        route = Route(handler, **kw)
        for path in paths.split():
            for method in methods.split():
                self._routes[(method, path)] = route

    def add_prefix(self, methods: str, prefixes: str, handler, **kw):
        """Paths that are the prefix and one more segment (an id), after the exact paths."""
        route = Route(handler, **kw)
        self._prefixes += [(method, prefix, route) for prefix in prefixes.split() for method in methods.split()]

    def match(self, method: str, path: str) -> Route:
        if path.startswith("/api/latest/"):
            path = "/api/v1/" + path[len("/api/latest/"):]
        route = self._routes.get((method, path))
        if route is None:
            route = next((r for m, prefix, r in self._prefixes if m == method and path.startswith(prefix)
                          and "/" not in path[len(prefix):] and path[len(prefix):]), None)
        if route is None and method == "GET" and self.fallback is not None:
            route = self.fallback(path)
        if route is None:
            if any(p == path for _, p in self._routes) or any(
                    path.startswith(prefix) and "/" not in path[len(prefix):] for _, prefix, _ in self._prefixes):
                raise RequestError(f"{method} is not allowed on {path}", status=405, kind="method_not_allowed")
            raise RequestError(f"no such endpoint: {path}", status=404, kind="not_found")
        return route


def build_router(static: StaticFiles | None = None) -> Router:
    r = Router(static.route if static is not None else None)
    r.add("GET", "/api/v1/model", kobold_model)
    r.add("GET", "/api/v1/info/version", kobold_info_version)
    r.add("GET", "/api/v1/config/max_length", kobold_max_length)
    r.add("GET", "/api/v1/config/max_context_length", kobold_max_context_length)
    r.add("POST", "/api/v1/generate", kobold_generate, protected=True)
    r.add("GET", "/api/extra/version", kobold_extra_version, needs_model=False)
    r.add("GET", "/api/extra/true_max_context_length", kobold_true_max_context_length)
    r.add("POST", "/api/extra/generate/stream", kobold_generate_stream, protected=True)
    r.add("GET POST", "/api/extra/generate/check", kobold_check, protected=True)
    r.add("POST", "/api/extra/abort", kobold_abort, protected=True)
    r.add("POST", "/api/extra/last_logprobs", kobold_last_logprobs, protected=True)
    r.add("POST", "/api/extra/embeddings", openai_embeddings, protected=True)       # KoboldCpp: OpenAI's shape
    r.add("POST", "/api/extra/tokencount /api/extra/tokenize", kobold_tokencount, protected=True)
    r.add("POST", "/api/extra/detokenize", kobold_detokenize, protected=True)
    r.add("POST", "/api/extra/json_to_grammar", kobold_json_to_grammar, protected=True)
    r.add("GET", "/sdapi/v1/sd-models", sd_models)
    r.add("GET", "/api/extra/perf", kobold_perf)
    r.add("GET", "/api/admin/list_options", admin_list_options, protected=True, admin=True)
    r.add("POST", "/api/admin/reload_config", admin_reload_config, protected=True, admin=True, needs_model=False)
    r.add("POST", "/api/admin/save_state", admin_save_state, protected=True, admin=True)
    r.add("POST", "/api/admin/load_state", admin_load_state, protected=True, admin=True)
    r.add("GET POST", "/api/admin/check_state", admin_check_state, protected=True, admin=True)
    r.add("POST", "/api/admin/clear_state", admin_clear_state, protected=True, admin=True)          # open, as KoboldCpp's: counts and timings, no text
    # Open, as KoboldCpp's: KoboldAI Lite reads it before it asks for the password.
    r.add("GET", "/api/extra/preloadstory", kobold_preloadstory)

    r.add("GET", "/v1/models /models", openai_models, style="openai")
    r.add("POST", "/v1/completions /completions", openai_completions, protected=True, style="openai")
    r.add("POST", "/v1/chat/completions /chat/completions", openai_chat_completions, protected=True,
          style="openai")
    r.add("POST", "/v1/embeddings /embeddings", openai_embeddings, protected=True, style="openai")
    r.add("POST", "/v1/responses /responses", responses_create, protected=True, style="openai")
    r.add("POST", "/v1/responses/input_tokens /responses/input_tokens", responses_input_tokens, protected=True,
          style="openai")
    r.add_prefix("GET DELETE", "/v1/responses/ /responses/", responses_by_id, protected=True, style="openai")

    r.add("POST", "/v1/messages /messages", anthropic_messages_route, protected=True, style="anthropic")
    r.add("POST", "/v1/messages/count_tokens /messages/count_tokens", anthropic_count_tokens, protected=True,
          style="anthropic")

    r.add("GET", "/api/tags", ollama_tags, style="ollama")     # open, as llama-server's: clients list models first
    r.add("GET", "/api/ps", ollama_ps, protected=True, style="ollama")
    r.add("GET", "/api/version", ollama_version, style="ollama", needs_model=False)
    r.add("POST", "/api/show", ollama_show, protected=True, style="ollama")
    r.add("POST", "/api/generate", ollama_generate, protected=True, style="ollama")
    r.add("POST", "/api/chat", ollama_chat, protected=True, style="ollama")
    r.add("POST", "/api/embed", ollama_embed, protected=True, style="ollama")
    r.add("POST", "/api/embeddings", ollama_embeddings_legacy, protected=True, style="ollama")
    r.add("POST", "/api/pull", ollama_pull, protected=True, style="ollama", needs_model=False)
    r.add("DELETE", "/api/delete", ollama_delete, protected=True, style="ollama")

    r.add("GET", "/health", health, needs_model=False, style="openai")
    r.add("GET", "/health/live", health_live, needs_model=False, style="openai")
    r.add("GET", "/props", props, protected=True, style="openai")
    r.add("POST", "/tokenize", tokenize, protected=True, style="openai")
    r.add("POST", "/detokenize", detokenize, protected=True, style="openai")
    r.add("POST", "/apply-template", apply_template, protected=True, style="openai")
    r.add("GET", "/metrics", metrics, protected=True, style="openai")
    r.add("POST", "/models/load", router_load, protected=True, style="openai")
    r.add("GET", "/slots", slots_list, protected=True, style="openai")
    r.add_prefix("POST", "/slots/", slots_action, protected=True, style="openai")
    r.add("POST", "/models/unload", router_unload, protected=True, style="openai")
    return r


class HangupWatcher:
    """One thread that notices when the client of a running generation hangs up.

    It waits in epoll for peer hang-ups (EPOLLRDHUP) on the sockets of
    in-flight generations and cancels their jobs at once, so a client that
    leaves never keeps the model busy. Where epoll is missing it watches for
    readability and peeks for end-of-file instead.
    """

    def __init__(self, use_epoll: bool | None = None):
        self._lock = threading.Lock()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._use_epoll = hasattr(select, "epoll") if use_epoll is None else use_epoll
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        if self._use_epoll:
            self._epoll = select.epoll()
            self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        self._socks: dict[int, socket.socket] = {}
        threading.Thread(target=self._run, name="hangup-watcher", daemon=True).start()

    def watch(self, sock: socket.socket, on_hangup: Callable[[], None]):
        fd = sock.fileno()
        with self._lock:
            self._callbacks[fd] = on_hangup
            self._socks[fd] = sock
            if self._use_epoll:
                self._epoll.register(fd, select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR)
        if not self._use_epoll:
            self._wake_w.send(b"x")

    def unwatch(self, sock: socket.socket):
        fd = sock.fileno()
        with self._lock:
            if self._callbacks.pop(fd, None) is not None:
                self._socks.pop(fd, None)
                if self._use_epoll:
                    try:
                        self._epoll.unregister(fd)
                    except OSError:
                        pass

    def _fire(self, fd: int):
        with self._lock:
            callback = self._callbacks.pop(fd, None)
            self._socks.pop(fd, None)
            if callback is not None and self._use_epoll:
                try:
                    self._epoll.unregister(fd)
                except OSError:
                    pass
        if callback is not None:
            callback()

    def _run(self):
        while True:
            if self._use_epoll:
                events = self._epoll.poll()
                for fd, _ in events:
                    if fd == self._wake_r.fileno():
                        continue
                    self._fire(fd)
            else:
                with self._lock:
                    socks = list(self._socks.items())
                readable, _, _ = select.select([self._wake_r] + [s for _, s in socks], [], [])
                for s in readable:
                    if s is self._wake_r:
                        try:
                            self._wake_r.recv(4096)
                        except OSError:
                            pass
                        continue
                    if _peer_closed(s):
                        self._fire(s.fileno())
                    else:
                        # Data, not a hang-up: stop watching, or select() would report it forever.
                        with self._lock:
                            self._socks.pop(s.fileno(), None)


def _peer_closed(sock: socket.socket) -> bool:
    """Peek under any TLS layer: end-of-file means the client has gone."""
    raw = socket.socket(sock.family, sock.type, fileno=sock.fileno())
    try:
        return raw.recv(1, socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)) == b""
    except (BlockingIOError, InterruptedError, socket.timeout):
        return False
    except OSError:
        return True
    finally:
        raw.detach()     # the handle belongs to the connection


class DeadlineReaper:
    """Shuts connections that overstay a deadline.

    Socket timeouts apply to each read, so a client that trickles one byte a
    second (slowloris) never trips them; a handshake, or a request's line,
    headers and body, must instead finish by a deadline, or the socket is
    shut and its thread's blocked read ends at once.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._deadlines: dict[int, tuple[float, socket.socket]] = {}
        self._tokens = iter(range(1, 1 << 62))
        threading.Thread(target=self._run, name="deadline-reaper", daemon=True).start()

    def arm(self, sock: socket.socket, seconds: float) -> int:
        with self._cond:
            token = next(self._tokens)
            self._deadlines[token] = (time.monotonic() + seconds, sock)
            self._cond.notify()
            return token

    def disarm(self, token: int | None):
        if token is not None:
            with self._cond:
                self._deadlines.pop(token, None)

    def _run(self):
        with self._cond:
            while True:
                if not self._deadlines:
                    self._cond.wait()
                    continue
                token, (deadline, sock) = min(self._deadlines.items(), key=lambda item: item[1][0])
                left = deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)      # woken early when a nearer deadline is armed
                    continue
                del self._deadlines[token]
                try:
                    # The plain socket's shutdown: SSLSocket.shutdown would drop its TLS state
                    # under the feet of the thread still using it.
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass


class AccessPolicy:
    """Which web pages may use the server behind their user's back: none but those the user runs.

    Two checks, as Ollama makes them. The Host check defeats DNS rebinding (a name that first resolves
    to an attacker's server, then to this machine, makes a page "same-origin" with us): a request naming
    this server by a DNS name that is not local, nor this machine's, nor given with --hostname, is refused;
    IP literals always pass, because no rebinding is possible with them. The origin check refuses a
    request whose `Origin` is not allowed before any work is done, simple requests (which browsers send
    without a preflight) included. Requests from programs carry no Origin and are not affected. With a
    password, the password is the gate: a page that has it may call from anywhere.
    """

    HOSTED_LITE = "https://lite.koboldai.net"       # KoboldCpp's hosted KoboldAI Lite calls local servers
    LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
    METHODS = "GET, POST, PUT, DELETE, OPTIONS"
    ALLOW_HEADERS = ("Authorization, Content-Type, genkey, X-Api-Key, Accept, anthropic-version, "
                     "anthropic-beta, anthropic-dangerous-direct-browser-access")
    HEADER_NAME = re.compile(r"[A-Za-z0-9-]{1,64}")
    EXPOSE = "X-KoboldLite-Instance, X-KoboldLite-Ignored, Retry-After"
    ANY_ORIGIN = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Methods": METHODS,
                  "Access-Control-Allow-Headers": ALLOW_HEADERS, "Access-Control-Max-Age": "86400",
                  "Access-Control-Expose-Headers": EXPOSE}

    def __init__(self, hostnames: list[str], cors_origins: list[str], password_set: bool):
        own = {socket.gethostname().lower().rstrip(".")}
        try:
            own.add(socket.getfqdn().lower().rstrip("."))
        except OSError:
            pass
        own |= {f"{name}.local" for name in list(own) if "." not in name}    # its mDNS name on a LAN
        self.any_host = "*" in hostnames
        self.names = own | {h.lower().rstrip(".") for h in hostnames if h != "*"}
        self.any_origin = "*" in cors_origins
        self.origins = {self.HOSTED_LITE} | {normalized_origin(o) for o in cors_origins if o != "*"}
        self.password_set = password_set

    @staticmethod
    def host_of(value: str) -> str | None:
        """The host of a Host header in lower case (brackets kept around IPv6), or None if malformed."""
        value = value.strip().lower()
        if value.startswith("["):
            end = value.find("]")
            host, rest = value[:end + 1], value[end + 1:]
            return host if end > 0 and (not rest or (rest[0] == ":" and rest[1:].isdigit())) else None
        host, colon, port = value.partition(":")
        return host if host and (not colon or port.isdigit()) else None

    @staticmethod
    def is_ip_literal(host: str) -> bool:
        try:
            ipaddress.ip_address(urllib.parse.unquote(host.strip("[]")))
            return True
        except ValueError:
            return False

    def check_host(self, header: str | None):
        """A 403 for a Host that names this server by a name it does not know (DNS rebinding). No Host at all
        (HTTP/1.0, health checkers) is not a browser's request and passes."""
        if header is None or self.any_host:
            return
        host = self.host_of(header)
        if host is not None and (self.is_ip_literal(host) or host.rstrip(".") in self.names
                                 or host.rstrip(".") == "localhost" or host.rstrip(".").endswith(".localhost")):
            return
        raise RequestError(f"this server is not reached by the name {header!r} (a web page may be trying DNS "
                           f"rebinding); to serve it under that name, start it with --hostname "
                           f"{(host or header).rstrip('.')}", status=403, kind="forbidden")

    def origin_allowed(self, origin: str, host_header: str | None) -> bool:
        normal = normalized_origin(origin)
        if normal is None:
            return False
        if normal in self.origins:
            return True
        scheme, _, netloc = normal.partition("://")
        if host_header is not None and netloc == normalized_origin(f"{scheme}://{host_header}").partition("://")[2]:
            return True          # the server's own page (scheme aside: a TLS-terminating balancer changes it)
        return scheme in ("http", "https") and self.host_of(netloc) in self.LOOPBACK_NAMES

    def cors_headers(self, origin: str | None, host_header: str | None, key_ok: bool, protected: bool,
                     preflight: bool = False, private_network: bool = False,
                     requested_headers: str = "") -> dict[str, str]:
        """The CORS headers of an answer to this request; a 403 for a page that may not make it."""
        if self.any_origin:
            return dict(self.ANY_ORIGIN)
        if origin is None:
            return {"Vary": "Origin"}
        # A preflight carries no password: with one set, the request that follows is gated by it.
        if self.origin_allowed(origin, host_header) or (self.password_set and (key_ok or preflight)):
            headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                       "Access-Control-Expose-Headers": self.EXPOSE}
            if preflight:
                # The SDKs add headers of their own (x-stainless-...): a page that may call may send them.
                extra = [h.strip() for h in requested_headers.split(",") if self.HEADER_NAME.fullmatch(h.strip())]
                headers.update({"Access-Control-Allow-Methods": self.METHODS,
                                "Access-Control-Allow-Headers": ", ".join([self.ALLOW_HEADERS, *extra[:32]]),
                                "Access-Control-Max-Age": "600"})
                if private_network:      # Chrome's Private Network Access preflight
                    headers["Access-Control-Allow-Private-Network"] = "true"
            return headers
        if self.password_set and protected:
            return {"Vary": "Origin"}    # the password check answers: 401, as without an Origin
        raise RequestError(f"web pages from {origin} may not use this server; to allow them, start it with "
                           f"--cors-origin {normalized_origin(origin) or origin}", status=403, kind="forbidden",
                           headers={"Vary": "Origin"})


class AuthThrottle:
    """Wrong passwords per client address: after LIMIT within WINDOW seconds, that address is answered 429
    until the oldest of them is WINDOW old, whatever it offers; other addresses are never slowed."""

    LIMIT = 10
    WINDOW = 60.0
    MAX_ADDRESSES = 4096         # bounded memory against a client that cycles addresses

    def __init__(self, log: Callable[[str], None]):
        self._log = log
        self._lock = threading.Lock()
        self._failures: dict[str, collections.deque] = {}

    def _recent(self, address: str, now: float) -> collections.deque | None:
        times = self._failures.get(address)
        while times and times[0] <= now - self.WINDOW:
            times.popleft()
        if times is not None and not times:
            del self._failures[address]
            return None
        return times

    def retry_after(self, address: str) -> int:
        """Seconds until this address may try again; 0 if it may now."""
        now = time.monotonic()
        with self._lock:
            times = self._recent(address, now)
            if times is None or len(times) < self.LIMIT:
                return 0
            return max(1, math.ceil(times[0] + self.WINDOW - now))

    def failed(self, address: str):
        now = time.monotonic()
        with self._lock:
            times = self._recent(address, now)
            if times is None:
                if len(self._failures) >= self.MAX_ADDRESSES:
                    del self._failures[next(iter(self._failures))]      # the longest-tracked address
                times = self._failures[address] = collections.deque()
            times.append(now)
            count = len(times)
        if count >= self.LIMIT:
            self._log(f"password: {count} wrong passwords from {address} within {self.WINDOW:.0f}s: refusing "
                      f"its requests for {math.ceil(self.WINDOW)}s at most (429)")
        else:
            self._log(f"password: wrong password from {address} ({count} of {self.LIMIT} allowed a minute)")


class RequestHandler(http.server.BaseHTTPRequestHandler):
    """One instance per connection: TLS handshake, then keep-alive requests."""

    protocol_version = "HTTP/1.1"
    server_version = f"KoboldLite/{__version__}"
    sys_version = ""
    server: "KoboldLiteServer"

    def setup(self):
        """Handshake here, in the connection's own thread, with a deadline: never on the accepting thread."""
        # Small writes (headers, then body; one SSE event per token) must leave at once, not wait
        # for Nagle's algorithm to meet the client's delayed ACK (40 ms a request).
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        config = self.server.app.config
        self.request.settimeout(config.handshake_timeout)
        if isinstance(self.request, ssl.SSLSocket):
            deadline = self.server.reaper.arm(self.request, config.handshake_timeout)
            try:
                self.request.do_handshake()
            finally:
                self.server.reaper.disarm(deadline)
        self.timeout = config.idle_timeout
        super().setup()
        self._watched_job: Job | None = None
        self._request_deadline: int | None = None
        self._cors: dict[str, str] = {}

    def handle_one_request(self):
        """Wait idly for a request's first byte; from there the whole request has a deadline."""
        try:
            if not self.rfile.peek(1):
                self.close_connection = True
                return
        except (OSError, ValueError):      # idle timeout, reset, or shut by the reaper
            self.close_connection = True
            return
        self._request_deadline = self.server.reaper.arm(self.connection, self.server.app.config.request_timeout)
        self._cors = {}      # each answer's own: never the last request's on a kept-alive connection
        try:
            super().handle_one_request()
        finally:
            self._request_read()

    def _request_read(self):
        self.server.reaper.disarm(self._request_deadline)
        self._request_deadline = None

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a bad request line, oversize headers...) as JSON, like ours."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"   # errors found before the version is read still get a status line
        if code == 505:
            code = 400    # a bogus HTTP version is the client's error, like any other bad input
        text = message or self.responses.get(code, ("error",))[0]
        error = RequestError(text, code, "invalid_request" if code < 500 else "server_error")
        self._send(JSONResponse(error_body("kobold", error),
                                code))

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format, *args):
        self.server.app.log(f"{self.address_string()} {format % args}")

    def log_request(self, code="-", size="-"):
        if self.server.app.config.debug:
            super().log_request(code, size)

    def do_OPTIONS(self):
        """A CORS preflight: answered for pages that may make the request, refused (403) for the others."""
        self._request_read()
        self._body_unread = self._declared_length()
        try:
            access = self.server.access
            access.check_host(self.headers.get("Host"))
            self._cors = access.cors_headers(
                self.headers.get("Origin"), self.headers.get("Host"), key_ok=False, protected=True,
                preflight=True, private_network=self.headers.get("Access-Control-Request-Private-Network") == "true",
                requested_headers=self.headers.get("Access-Control-Request-Headers", ""))
            response = Response(204, b"", "text/plain")
        except RequestError as e:
            self._cors = e.headers
            response = JSONResponse(error_body("kobold", e), e.status)
        self._send(response)
        if self._body_unread:
            self._linger()

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_HEAD(self):
        self._dispatch("HEAD")

    # -- dispatch ------------------------------------------------------------

    def _dispatch(self, method: str):
        app = self.server.app
        url = urllib.parse.urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        style = "anthropic" if path.startswith(("/v1/messages", "/messages")) else \
            "openai" if path.startswith(("/v1/", "/responses")) or path in ("/models", "/completions",
                                                                           "/chat/completions") else "kobold"
        request = None
        self._body_unread = self._declared_length()
        try:
            self.server.access.check_host(self.headers.get("Host"))
            try:
                route = self.server.router.match("GET" if method == "HEAD" else method, path)
            except RequestError:          # a 404 or 405, readable by the pages that may call
                self._cors = self.server.access.cors_headers(self.headers.get("Origin"), self.headers.get("Host"),
                                                             False, False)
                raise
            style = route.style
            authorized, key_ok = self._authorized(route)
            self._cors = self.server.access.cors_headers(self.headers.get("Origin"), self.headers.get("Host"),
                                                         key_ok, route.protected)
            body = self._read_body()
            self._request_read()
            if route.protected and not authorized:
                raise unauthorized(style)
            if route.needs_model and not app.ready.is_set():
                raise RequestError("the model is still loading", status=503, kind="service_unavailable")
            query = dict(urllib.parse.parse_qsl(url.query))
            request = Request(app, method, path, query, self.headers, body, authorized,
                              client=self.client_address[0], watch_hangup=self.watch_hangup, style=style)
            response = route.handler(app, request)
            if request.ignored:
                response.headers["X-KoboldLite-Ignored"] = ",".join(request.ignored)
        except RequestError as e:
            if request is not None and request.job is not None:
                request.job.cancel()
            response = error_response(style, e)
        except Exception as e:  # a bug must cost one request, never the server
            if request is not None and request.job is not None:
                request.job.cancel()
            app.log(f"internal error on {method} {path}: {type(e).__name__}: {e}")
            response = error_response(style, RequestError("internal server error", 500, "server_error"))
        try:
            if isinstance(response, StreamResponse):
                self._send_stream(response)
            else:
                self._send(response, head_only=method == "HEAD")
                if self._body_unread:
                    self._linger()
        finally:
            self._unwatch_hangup()
            if request is not None:
                request.release()

    LINGER_BYTES = 64 * 1024 * 1024     # at most this much of an unread body is read and thrown away...
    LINGER_SECONDS = 10.0               # ...within this long

    def _linger(self):
        """An answer sent before the body was read (413, 411, 404...): read and discard the rest of the
        body, up to a bound and a deadline, then close. Closing at once would reset the connection under a
        client still writing its body, and clients that write first (Python's http.client, curl) would
        never see the answer (nginx calls this a lingering close)."""
        self.close_connection = True
        try:
            self.wfile.flush()
            # The answer is complete: end our side now, so a client that reads to the end sees it at once.
            socket.socket.shutdown(self.connection, socket.SHUT_WR)
        except OSError:
            return
        deadline = self.server.reaper.arm(self.connection, self.LINGER_SECONDS)
        try:
            left = min(self._body_unread, self.LINGER_BYTES)
            while left > 0:
                data = self.rfile.read1(min(left, 1 << 16))
                if not data:
                    break
                left -= len(data)
        except (OSError, ValueError):
            pass
        finally:
            self.server.reaper.disarm(deadline)

    def _declared_length(self) -> int:
        """The Content-Length the client announced, as far as it can be believed; 0 if none."""
        try:
            return max(0, int(self.headers.get("Content-Length") or 0))
        except ValueError:
            return 0

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise RequestError("chunked request bodies are not supported; send Content-Length", status=411,
                               kind="length_required")
        length = self.headers.get("Content-Length")
        if not length:
            return b""
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise RequestError("bad Content-Length header") from None
        if n > self.server.app.config.max_body_bytes:
            self.close_connection = True
            raise RequestError(f"the request body is larger than {self.server.app.config.max_body_bytes} bytes",
                               status=413, kind="request_too_large")
        data = self.rfile.read(n)
        self._body_unread = 0
        if len(data) < n:
            self.close_connection = True
            raise RequestError("the request body ended early")
        return data

    def _authorized(self, route: Route) -> tuple[bool, bool]:
        """(authorized, key_ok): whether the request may use what the password guards, and whether it
        carried the right password. A wrong one counts against its address (AuthThrottle); an address over
        the limit is answered 429 for anything that needs or offers a password, whatever it offers."""
        config = self.server.app.config
        password = config.adminpassword if route.admin and config.adminpassword else config.password
        if not password:
            return True, False
        offered = ""
        auth = self.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            offered = auth[7:].strip()
        elif self.headers.get("X-Api-Key"):
            offered = self.headers.get("X-Api-Key", "").strip()
        if not offered and not route.protected:
            return False, False
        address = self.client_address[0]
        wait = self.server.auth_throttle.retry_after(address)
        if wait:      # the page learns the same whatever it offered: its key is not looked at
            self._cors = self.server.access.cors_headers(self.headers.get("Origin"), self.headers.get("Host"),
                                                         False, route.protected)
            raise RequestError(f"too many wrong passwords from this address: try again in {wait} s", status=429,
                               kind="rate_limit_error", headers={"Retry-After": str(wait)})
        if not offered:
            return False, False
        ok = hmac.compare_digest(offered.encode(), password.encode())
        if not ok:
            self.server.auth_throttle.failed(address)
        return ok, ok

    # -- hang-ups ------------------------------------------------------------

    def watch_hangup(self, job: Job):
        self._watched_job = job
        self.server.generation_started()
        self.server.hangups.watch(self.connection, job.cancel)

    def _unwatch_hangup(self):
        if self._watched_job is not None:
            self.server.hangups.unwatch(self.connection)
            self._watched_job = None
            self.server.generation_answered()

    # -- writing -------------------------------------------------------------

    def _start_response(self, response: Response):
        self.send_response(response.status)
        for k, v in self._cors.items():
            self.send_header(k, v)
        self.send_header("X-KoboldLite-Instance", self.server.app.instance_id)
        self.send_header("Content-Type", response.content_type)
        for k, v in response.headers.items():
            self.send_header(k, v)

    def _send(self, response: Response, head_only: bool = False):
        self._start_response(response)
        self.send_header("Content-Length", str(len(response.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head_only and response.body:
            self.wfile.write(response.body)

    def _send_stream(self, response: StreamResponse):
        self.close_connection = True
        self._start_response(response)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for chunk in response.chunks:
                self.wfile.write(chunk)
        except (OSError, ValueError):
            pass                         # the client went away: its generation is cancelled below
        finally:
            if response.job is not None and not response.job.buffer.done:
                response.job.cancel()


class KoboldLiteServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with TLS around the listening socket and a cap on connections.

    The listening socket is wrapped with do_handshake_on_connect=False, so
    accept() never handshakes; each connection's thread does (RequestHandler.setup).
    """

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler_class: type, app: App, router: Router,
                 tls: ssl.SSLContext | None = None):
        """`handler_class` is instantiated per connection, as socketserver does (RequestHandler)."""
        self.app = app
        self.router = router
        self.tls = tls
        self.hangups = HangupWatcher()
        self.reaper = DeadlineReaper()
        self.access = AccessPolicy(app.config.hostname, app.config.cors_origin, bool(app.config.password))
        self.auth_throttle = AuthThrottle(app.log)
        self._connections = threading.BoundedSemaphore(app.config.max_connections)
        self._per_client: collections.Counter[str] = collections.Counter()   # open connections per address
        self._per_client_lock = threading.Lock()
        self._answering = 0                  # generation responses still being written
        self._answering_cond = threading.Condition()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler_class)

    def server_bind(self):
        super().server_bind()
        if self.tls is not None:
            self.socket = self.tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def process_request(self, request, client_address):
        with self._per_client_lock:
            mine = self._per_client[client_address[0]] < self.app.config.max_connections_per_client
            if mine:
                self._per_client[client_address[0]] += 1
        if not mine or not self._connections.acquire(blocking=False):
            if mine:
                self._client_left(client_address[0])
            self.shutdown_request(request)     # over a cap: refuse rather than queue threads
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        # ThreadingMixIn's steps, but the client's place is given back before its socket closes: a
        # client that has seen its connection end may connect again at once.
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self._connections.release()
            self._client_left(client_address[0])
            self.shutdown_request(request)

    def _client_left(self, address: str):
        with self._per_client_lock:
            self._per_client[address] -= 1
            if self._per_client[address] <= 0:
                del self._per_client[address]

    def generation_started(self):
        with self._answering_cond:
            self._answering += 1

    def generation_answered(self):
        with self._answering_cond:
            self._answering -= 1
            self._answering_cond.notify_all()

    def wait_answers_written(self, timeout: float) -> bool:
        """At shutdown: let aborted streams write their last event before the process ends."""
        with self._answering_cond:
            return self._answering_cond.wait_for(lambda: self._answering == 0, timeout)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ssl.SSLError, ConnectionError, TimeoutError, socket.timeout)):
            return   # failed handshakes, resets and idle clients are routine
        self.app.log(f"error on connection from {client_address[0]}: {type(exc).__name__}: {exc}")

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def served_urls(server: KoboldLiteServer, host: str) -> list[str]:
    port = server.server_address[1]
    scheme = server.scheme
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        unspecified = False
    if not unspecified:
        shown = f"[{host}]" if ":" in host else host
        return [f"{scheme}://{shown}:{port}"]
    urls = [f"{scheme}://{'[::1]' if host == '::' else '127.0.0.1'}:{port}"]
    addresses = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            addr = info[4][0]
            if not ipaddress.ip_address(addr.split("%")[0]).is_loopback:
                addresses.add(addr)
    except OSError:
        pass
    for addr in sorted(addresses):
        if ":" in addr:
            if host == "::":
                urls.append(f"{scheme}://[{addr}]:{port}")
        else:
            urls.append(f"{scheme}://{addr}:{port}")
    return urls


def fetch_model_urls(config: Config):
    """--model URL: download each (with a bar on the console) before anything loads; the file stays."""
    folder = config.modeldir or os.getcwd()
    fetched = []
    for source in [config.model, *config.models]:
        if is_model_url(source):
            download = ModelDownload(source, folder)
            download.progress = ConsoleProgress(download.name)
            if not os.path.isfile(download.path):
                print(f"Downloading {source} into {folder}", file=sys.stderr, flush=True)
            source = download.run()
        fetched.append(source)
    config.model, config.models = fetched[0], fetched[1:]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    double_click = is_double_click_start(argv)
    status = serve(double_click_arguments if double_click else lambda: argv, double_click)
    if status != 0 and double_click:
        keep_window_open()
    return status


def serve(arguments: Callable[[], list[str]], double_click: bool = False) -> int:
    try:
        config = load_config(arguments())
        tls = make_tls_context(*config.ssl) if config.ssl else None
    except ConfigError as e:
        print(f"koboldlite: error: {e}", file=sys.stderr)
        return 2

    try:
        fetch_model_urls(config)
        app = App(config)
    except (ConfigError, DownloadError) as e:
        print(f"koboldlite: error: {e}", file=sys.stderr)
        return 2
    router = build_router(StaticFiles(UI_DIR) if os.path.isdir(UI_DIR) else None)
    try:
        server = KoboldLiteServer((config.host, config.port), RequestHandler, app, router, tls)
    except OSError as e:
        if not (double_click and e.errno == errno.EADDRINUSE):
            reason = "the port is already in use" if e.errno == errno.EADDRINUSE else str(e)
            print(f"koboldlite: error: cannot listen on {config.host}:{config.port}: {reason}", file=sys.stderr)
            return 2
        # A double-click user cannot pick another port: take a free one and say so.
        print(f"Port {config.port} is in use; serving on a free port instead.", file=sys.stderr)
        server = KoboldLiteServer((config.host, 0), RequestHandler, app, router, tls)
    if not app.instance_id:
        app.instance_id = f"{socket.gethostname()}:{server.server_address[1]}"
    # Serve from now on: /api/extra/version answers while the model loads, the rest says 503.
    threading.Thread(target=server.serve_forever, name="http-accept", daemon=True).start()

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    entries = app.catalog.entries()
    if app.catalog.several:
        print(f"Models: {', '.join(e.name for e in entries)} ({len(entries)}; up to {config.maxmodels} loaded at "
              f"once{f', unloaded after {config.idleunload:g} s idle' if config.idleunload else ''})",
              file=sys.stderr, flush=True)
    print(f"KoboldLite {__version__}: loading {config.model}", file=sys.stderr, flush=True)
    try:
        served = app.roster.acquire(app.catalog.find(None))
    except RequestError as e:
        app.flush_log()                   # its lines first: the error is the last line a user sees
        print(f"koboldlite: error: {getattr(e, 'cause', None) or e}", file=sys.stderr)
        server.server_close()
        return 2
    if config.embeddings_model:
        try:
            app.embeddings_source = LlamaModel(config.embeddings_model, n_ctx=64, n_seq=1, n_threads=1,
                                               n_gpu_layers=served.gpu.n_gpu_layers, show_llama_log=config.debug,
                                               devices=served.gpu.devices if served.gpu.chosen else None)
        except ModelLoadError as e:
            print(f"koboldlite: error: embeddings model: {e}", file=sys.stderr)
            server.server_close()
            return 2
    print(served.template_origin, file=sys.stderr, flush=True)
    if not served.engine.context_shift:
        print("context shift: off (--noshift)" if config.noshift else
              "context shift: off, this model's cache cannot be shifted: a trimmed chat is read again in "
              "full, and a reply ends when the context is full", file=sys.stderr, flush=True)
    model, cfg = served.model, served.config
    urls = served_urls(server, config.host)
    if not is_loopback_host(config.host) and not config.password:
        print("WARNING: serving the network without --password: anyone who can reach this machine "
              "can use the model.", file=sys.stderr)
    if not is_loopback_host(config.host) and config.password and not tls:
        print("WARNING: the password crosses the network in clear text over plain HTTP: anyone on the network "
              "can read it; add --ssl cert.pem key.pem (README: Using it on your LAN, with TLS).", file=sys.stderr)
    print(f"Model {model.name} ready: context {model.n_ctx}, {cfg.parallel} slot(s), "
          f"{cfg.threads} threads", flush=True)
    mem = served.memory
    pool = (f"{mem['kv_cells']} tokens shared by {cfg.parallel} slot(s)" if model.shared_kv
            else f"{model.n_ctx} tokens for each of {cfg.parallel} slot(s)")
    print(f"Memory: model {mem['model_mib']:.0f} MiB, KV cache {mem['kv_cache_mib']:.0f} MiB ({pool}, "
          f"{'/'.join(mem['kv_types']) or model.kv_type}), compute buffers {mem['compute_mib']:.0f} MiB; "
          f"flash attention {mem['flash_attn'] or 'auto'}, model {mem['load_mode'] or 'loaded'}", flush=True)
    if served.gpu.devices:
        parts = "; ".join(f"{name}: model {row['model']:.0f} MiB, KV {row['kv']:.0f} MiB, compute {row['compute']:.0f} MiB"
                          for name, row in mem["devices"].items())
        print(f"GPU: offloaded {mem['layers_offloaded']}/{mem['layers_total']} layers; {parts}", flush=True)
    app.ready.set()
    app.roster.release(served)
    for url in urls:
        print(f"Serving at {url}", flush=True)
    print(f"KoboldAI API at {urls[0]}/api", flush=True)
    if config.launch:
        webbrowser.open(urls[0])

    stop.wait()
    print("Stopping: ending running generations.", file=sys.stderr, flush=True)
    app.roster.stop()
    server.wait_answers_written(timeout=5.0)
    server.shutdown()
    server.server_close()
    app.flush_log()
    return 0
