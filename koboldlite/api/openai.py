"""The OpenAI API: models, completions, chat completions, embeddings."""

from __future__ import annotations

import os
import secrets
import time
from typing import Any, Callable, Iterator

from ..errors import RequestError
from ..text import ReasoningSplitter
from ..fields import FieldReader, _asks, _more_than_one, ignored_fields
from ..generation import parse_sampler_settings
from ..jobs import Job, StopReason, TokenLogprob
from ..chat.messages import parse_chat_messages
from ..chat.tools import CallWatch
from ..service.served_model import ServedModel
from ..service.exchange import JSONResponse, StreamResponse, wait_for_text
from .common import (
    KOBOLD_CLIENT_FIELDS, MAX_TOP_LOGPROBS, MEDIA_FIELDS, OPENAI_DEFAULTS, SSE_DONE, LogprobShapes,
    apply_output_format, batches_with_logprobs, chat_request, embedder_for, embedding_inputs, genkey_of,
    instruct_request, max_reply_tokens, model_states, reasoning_fields, sse_data, tool_use_of, wire_finish_reason
)


OPENAI_IGNORED_FIELDS: dict[str, Callable[[Any], bool]] = {
    **MEDIA_FIELDS, **KOBOLD_CLIENT_FIELDS,          # SillyTavern sends KoboldCpp's fields to /v1 too
    "functions": _asks, "function_call": _asks, "suffix": _asks, "echo": _asks, "best_of": _more_than_one,
    "reasoning_effort": _asks, "modalities": lambda v: v not in (None, ["text"]), "audio": _asks,
    "prediction": _asks, "web_search_options": _asks,
}


def openai_generation_fields(req, f: FieldReader, default_max: int | None) -> dict:
    """The fields completions and chat completions share: length, stops, sampler, response_format, genkey."""
    if f.integer("n", default=1) != 1:
        raise RequestError("'n' must be 1: this server returns one choice per request")
    sampler = parse_sampler_settings(f, OPENAI_DEFAULTS)
    fmt = f.body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        schema = fmt.get("json_schema") if kind == "json_schema" else None
        apply_output_format(sampler, kind, schema.get("schema") if isinstance(schema, dict) else None,
                            "response_format", "response_format.json_schema.schema")
    return dict(max_length=max_reply_tokens(f, "max_tokens", "max_completion_tokens", "max_length",
                                            default=default_max, minus_one_is_none=True),
                stop_strings=f.string_list("stop"), sampler=sampler, genkey=genkey_of(req, f.body),
                ignored_fields=ignored_fields(f.body, OPENAI_IGNORED_FIELDS))


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
    if job.buffer.stop_reason is StopReason.FAILED:
        yield sse_data({"error": {"message": job.buffer.error or "generation failed", "type": "server_error"}})
    else:
        yield chunk(final, finish_reason() if finish_reason else wire_finish_reason(job.buffer.stop_reason), rest)
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
                                              "finish_reason": wire_finish_reason(job.buffer.stop_reason)}],
                         "usage": openai_usage(job)})


def openai_chat_completions(app, req):
    f = FieldReader(req.json())
    served = req.use(f.body.get("model"))
    messages = parse_chat_messages(f.body.get("messages"))
    fields = openai_generation_fields(req, f, default_max=None)
    tools = tool_use_of(served, f)
    request = chat_request(served, messages, {**fields, **openai_logprob_fields(f, legacy=False)}, tools)
    job = req.start_generation(request)
    head = openai_head(served, "chat.completion.chunk", "chatcmpl")
    content = lambda entries: {"content": LogprobShapes(served.model).chat(entries)}    # noqa: E731
    # A thinking block goes to `reasoning_content` unless the client asks for it inline.
    inline = f.string("reasoning_format", default="auto") == "none"
    splitter = None if inline else ReasoningSplitter.for_prompt(request.prompt)
    watch = CallWatch(tools)

    def finish_reason() -> str:
        return "tool_calls" if watch.calls else wire_finish_reason(job.buffer.stop_reason)
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


# Embedding fields we know and do not act on: the vector's size is the model's, input longer than the
# embedding context is always cut.
OPENAI_EMBEDDING_IGNORED = {"dimensions": _asks}


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
