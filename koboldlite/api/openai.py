"""The OpenAI API: models, completions, chat completions, embeddings."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import time
from typing import Any, Callable, Iterator

from ..errors import RequestError
from ..fields import FieldReader, _asks, _more_than_one, ignored_fields
from ..generation import GenerationRequest, parse_sampler_settings
from ..jobs import Job, TokenLogprob
from ..engine.infill import InfillParts
from ..chat.messages import parse_chat_messages
from ..media import MediaKind
from ..media_urls import MediaList
from ..chat.tools import ToolUse
from ..service.served_model import ServedModel
from ..service.exchange import JSONResponse, StreamResponse
from ..engine.adapters import parse_scale_list
from .common import (
    KOBOLD_CLIENT_FIELDS, MAX_TOP_LOGPROBS, MEDIA_FIELDS, OPENAI_DEFAULTS, LogprobShapes, apply_output_format,
    chat_request, embedder_for, embedding_inputs, genkey_of, infill_request, instruct_request, llama_timings,
    max_reply_tokens, media_list, model_states, tool_use_of, wire_finish_reason
)
from .kobold import kobold_media
from .choices import MAX_CHOICES, Choices
from .reply import (
    REPLY_PING_SECONDS, SSE_DONE, SSE_PING, DoneEvent, ErrorEvent, PingEvent, ReasoningEvent, ReplyEncoder, ReplyEvent, ReplyReader,
    ProgressEvent, TextEvent, ToolCallsEvent, WholeReply, sse_data, stream_reply
)


LLAMA_MEDIA_MARKER = "<__media__>"      # where llama-server's multimodal prompt puts each of its files


def multimodal_prompt(prompt: dict, media: MediaList) -> str:
    """llama-server's multimodal prompt, {"prompt_string": "... <__media__> ...", "multimodal_data": [base64...]}:
    its text, each marker standing for the next file, read into `media`."""
    text, data = prompt.get("prompt_string"), prompt.get("multimodal_data") or []
    if not isinstance(text, str) or not isinstance(data, list):
        raise RequestError("a prompt object must have a string 'prompt_string' and a list 'multimodal_data'")
    pieces = text.split(LLAMA_MEDIA_MARKER)
    if len(pieces) - 1 != len(data):
        raise RequestError(f"prompt_string has {len(pieces) - 1} {LLAMA_MEDIA_MARKER} markers and multimodal_data "
                           f"{len(data)} files: each file needs one marker where it goes")
    markers = [media.add(value, f"prompt.multimodal_data[{i}]", (MediaKind.IMAGE, MediaKind.AUDIO))
               for i, value in enumerate(data)]
    return "".join(piece + marker for piece, marker in zip(pieces, markers + [""]))


OPENAI_IGNORED_FIELDS: dict[str, Callable[[Any], bool]] = {
    **MEDIA_FIELDS, **KOBOLD_CLIENT_FIELDS,          # SillyTavern sends KoboldCpp's fields to /v1 too
    "functions": _asks, "function_call": _asks, "echo": _asks, "best_of": _more_than_one,
    "reasoning_effort": _asks, "modalities": lambda v: v not in (None, ["text"]), "audio": _asks,
    "prediction": _asks, "web_search_options": _asks,
}


def openai_generation_fields(req, f: FieldReader, default_max: int | None, honoured: tuple[str, ...] = ()) -> dict:
    """The fields completions and chat completions share: length, stops, sampler, response_format, genkey,
    llama-server's per-request LoRA scales; the fields named as ignored, but for those the caller `honoured`."""
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
                lora=None if f.body.get("lora") is None else parse_scale_list(f.body["lora"], "lora"),
                ignored_fields=ignored_fields(f.body, {k: v for k, v in OPENAI_IGNORED_FIELDS.items()
                                                       if k not in honoured}))


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


def llama_stream_options(f: FieldReader) -> dict:
    """`n`, and llama-server's `return_progress` and `timings_per_token`."""
    n = f.integer("n", default=1)
    if not 1 <= n <= MAX_CHOICES:      # fewer choices than asked would be a silent surprise: a 400 says why
        raise RequestError(f"'n' must be between 1 and {MAX_CHOICES}: choices are read in parallel slots or turns")
    return {"return_progress": f.boolean("return_progress"), "timings_per_token": f.boolean("timings_per_token"),
            "n": n}


def include_usage_of(f: FieldReader) -> bool:
    options = f.body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


@dataclasses.dataclass
class OpenAICall:
    """One completions or chat completions request, read once (as llama-cpp-python's server reads each route's
    body into its own type): the generation it asks for and how to answer."""
    served: ServedModel
    request: GenerationRequest
    stream: bool
    include_usage: bool
    tools: ToolUse | None = None
    split_reasoning: bool = False    # a thinking block goes to `reasoning_content` (chat, unless asked inline)
    return_progress: bool = False    # llama-server's: a stream tells how far the prompt's reading has come
    timings_per_token: bool = False  # llama-server's: every chunk carries `timings` (else the last alone)
    n: int = 1                       # choices (api/choices.py)

    @classmethod
    def completion(cls, req) -> "OpenAICall":
        f = FieldReader(req.json())
        served = req.use(f.body.get("model"))
        prompt = f.body.get("prompt", "")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, dict)):
            prompt = prompt[0]
        suffix = f.body.get("suffix")
        if suffix is not None and not isinstance(suffix, str):
            raise RequestError("'suffix' must be a string: the text after the gap to fill")
        if suffix:
            return cls.fill_in_the_middle(req, f, served, prompt, suffix)
        media_ignored: list[str] = []            # KoboldCpp's fields the model cannot read
        if isinstance(prompt, dict):
            if f.body.get("images") or f.body.get("audio"):
                raise RequestError("send media either in the prompt's multimodal_data or in 'images' and 'audio', "
                                   "not both")
            media = media_list(req, served)
            prompt, memory = multimodal_prompt(prompt, media), ""
        elif isinstance(prompt, str):           # KoboldCpp's images and audio: SillyTavern sends them here too
            prompt, memory, media = kobold_media(f, prompt, "", served, media_ignored)
        else:
            raise RequestError("'prompt' must be a string, a list of one string, or {\"prompt_string\": ..., "
                               "\"multimodal_data\": [...]}")
        fields = openai_generation_fields(req, f, default_max=16,
                                          honoured=tuple(k for k in ("images", "audio") if k not in media_ignored))
        request = instruct_request(served, f, prompt=prompt, memory=memory, stop_strings=fields.pop("stop_strings"),
                                   media=media, **fields, **openai_logprob_fields(f, legacy=True))
        return cls(served, request, f.boolean("stream"), include_usage_of(f), **llama_stream_options(f))

    @classmethod
    def fill_in_the_middle(cls, req, f: FieldReader, served: ServedModel, prompt, suffix: str) -> "OpenAICall":
        """A completion with a `suffix`: the prompt is the text before the gap, laid out with the model's FIM
        tokens as llama-server's /infill lays out its input_prefix and input_suffix."""
        if not isinstance(prompt, str):
            raise RequestError("with a 'suffix', 'prompt' must be a string: the text before the gap to fill")
        fields = openai_generation_fields(req, f, default_max=16)
        request = infill_request(served, InfillParts(prompt, suffix), **fields,
                                 **openai_logprob_fields(f, legacy=True))
        return cls(served, request, f.boolean("stream"), include_usage_of(f), **llama_stream_options(f))

    @classmethod
    def chat(cls, req) -> "OpenAICall":
        f = FieldReader(req.json())
        served = req.use(f.body.get("model"))
        media = media_list(req, served)
        messages = parse_chat_messages(f.body.get("messages"), media)
        fields = openai_generation_fields(req, f, default_max=None)
        tools = tool_use_of(served, f)
        request = chat_request(served, messages, {**fields, **openai_logprob_fields(f, legacy=False), "media": media},
                               tools)
        return cls(served, request, f.boolean("stream"), include_usage_of(f), tools,
                   split_reasoning=f.string("reasoning_format", default="auto") != "none", **llama_stream_options(f))


def openai_usage(*jobs: Job) -> dict:
    """Several choices read their prompt once: it counts once, their tokens all."""
    first = jobs[0].stats
    p, c = first.prompt_tokens, sum(job.stats.generated_tokens for job in jobs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": first.cached_tokens},
            "truncated": any(job.stats.truncated for job in jobs)}   # llama-server's: a context shift dropped text


def openai_head(served: ServedModel, kind: str, prefix: str) -> dict:
    return {"id": f"{prefix}-{secrets.token_hex(12)}", "object": kind, "created": int(time.time()),
            "model": served.name}


def openai_tool_calls(calls: list[dict]) -> list[dict]:
    """Calls in OpenAI's shape: each with an id, its arguments as a JSON string."""
    return [{"id": f"call_{secrets.token_hex(12)}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]


class OpenAIEncoder(ReplyEncoder):
    """OpenAI's stream: `data:` lines only (no `event:`), one chunk per piece of text (the last of a write with its
    tokens' log-probabilities), exactly one final chunk with the finish reason, the usage chunk when asked for, then
    [DONE]; a comment line as its keep-alive. The subclasses say what a chunk's choice holds."""

    chunk_object = ""           # the chunks' `object`
    id_prefix = ""
    final_choice: dict = {}             # the choice of the chunk with the finish reason

    def __init__(self, job: Job, call: OpenAICall, index: int = 0, head: dict | None = None):
        """`index`: the choice this encoder writes (of `n`, which share one `head`: id, created, model)."""
        self.job = job
        self.call = call
        self.index = index
        self.head = head or openai_head(call.served, self.chunk_object, self.id_prefix)
        self.shapes = LogprobShapes(call.served.model)
        self.called = False

    def logprobs(self, entries: list[TokenLogprob]) -> Any:
        raise NotImplementedError

    progress_choice: dict = {}          # the choice of a chunk that carries prompt_progress

    def chunk(self, choice: dict, finish_reason: str | None = None, entries: list[TokenLogprob] = (),
              **extra) -> bytes:
        return sse_data({**self.head, "choices": [{"index": self.index, **choice,
                                                   "logprobs": self.logprobs(entries) if entries else None,
                                                   "finish_reason": finish_reason}], **extra})

    def text_chunk(self, choice: dict, entries: list[TokenLogprob]) -> bytes:
        """A chunk of reply text; with timings_per_token, the timings so far on it."""
        extra = {"timings": llama_timings(self.job)} if self.call.timings_per_token else {}
        return self.chunk(choice, entries=entries, **extra)

    def progress(self, event: ProgressEvent) -> bytes:
        if not self.call.return_progress:
            return b""
        return self.chunk(self.progress_choice, prompt_progress=event.progress.to_json())

    def finish_reason(self, event: DoneEvent) -> str:
        return wire_finish_reason(event.reason, self.called)

    def ping(self, event: PingEvent) -> bytes:
        return SSE_PING

    def error(self, event: ErrorEvent) -> bytes:
        return self.error_chunk(event) + SSE_DONE

    def error_chunk(self, event: ErrorEvent) -> bytes:
        return sse_data({"error": {"message": event.message, "type": "server_error", "index": self.index}})

    def done(self, event: DoneEvent) -> bytes:
        return self.finish_chunk(event) + self.tail([self.job])

    def finish_chunk(self, event: DoneEvent) -> bytes:
        """The choice's last chunk: its finish reason and llama-server's timings."""
        return self.chunk(self.final_choice, self.finish_reason(event), event.logprobs, timings=llama_timings(self.job))

    def tail(self, jobs: list[Job]) -> bytes:
        """The stream's end, after every choice's last chunk: the usage chunk when asked for, and [DONE]."""
        if not self.call.include_usage:
            return SSE_DONE
        return sse_data({**self.head, "choices": [], "usage": openai_usage(*jobs),
                         "timings": llama_timings(jobs[0])}) + SSE_DONE


class CompletionEncoder(OpenAIEncoder):
    """/v1/completions: `text` in each choice; log-probabilities in the legacy shape."""

    chunk_object, id_prefix = "text_completion", "cmpl"
    final_choice = progress_choice = {"text": ""}

    def logprobs(self, entries: list[TokenLogprob]) -> dict:
        return self.shapes.legacy(entries)

    def text(self, event: TextEvent) -> bytes:
        return self.text_chunk({"text": event.text}, event.logprobs)

    def whole(self, events: list[ReplyEvent]) -> dict:
        reply = WholeReply.of(events)
        return {**self.head, "choices": [{
            "text": reply.text, "index": self.index,
            "logprobs": self.shapes.legacy(reply.logprobs) if self.call.request.logprobs else None,
            "finish_reason": wire_finish_reason(reply.reason)}], "usage": openai_usage(self.job),
            "timings": llama_timings(self.job)}


class ChatEncoder(OpenAIEncoder):
    """/v1/chat/completions: a `delta` in each chunk (the role first), the thinking block as `reasoning_content`
    (llama-server's name), tool calls at the end with `finish_reason` "tool_calls"."""

    chunk_object, id_prefix = "chat.completion.chunk", "chatcmpl"
    final_choice = {"delta": {}}
    progress_choice = {"delta": {"role": "assistant", "content": None}}     # as llama-server sends it

    def logprobs(self, entries: list[TokenLogprob]) -> dict:
        return {"content": self.shapes.chat(entries)}

    def start(self) -> bytes:
        return self.chunk({"delta": {"role": "assistant", "content": ""}})

    def reasoning(self, event: ReasoningEvent) -> bytes:
        return self.text_chunk({"delta": {"reasoning_content": event.text}}, event.logprobs)

    def text(self, event: TextEvent) -> bytes:
        return self.text_chunk({"delta": {"content": event.text}}, event.logprobs)

    def tool_calls(self, event: ToolCallsEvent) -> bytes:
        self.called = True
        calls = [{"index": i, **call} for i, call in enumerate(openai_tool_calls(event.calls))]
        return self.chunk({"delta": {"tool_calls": calls}})

    def whole(self, events: list[ReplyEvent]) -> dict:
        reply = WholeReply.of(events)
        message = {"role": "assistant", "content": reply.text}
        if reply.reasoning:
            message["reasoning_content"] = reply.reasoning
        if reply.calls:
            message["tool_calls"] = openai_tool_calls(reply.calls)
            message["content"] = message["content"] or None
        return {**self.head, "object": "chat.completion", "choices": [{
            "index": self.index, "message": message,
            "logprobs": self.logprobs(reply.logprobs) if self.call.request.logprobs else None,
            "finish_reason": wire_finish_reason(reply.reason, bool(reply.calls))}],
            "usage": openai_usage(self.job), "timings": llama_timings(self.job)}


def openai_answer(req, call: OpenAICall, encoder_class: type[OpenAIEncoder]):
    """Start the call's generation and answer it, streamed or whole; several choices through Choices."""
    def reader(job: Job) -> ReplyReader:
        return ReplyReader(job, reasoning=call.split_reasoning, tools=call.tools, progress=call.return_progress)
    if call.n > 1:
        return openai_choices(Choices(req, call.request, call.n, reader), call, encoder_class)
    job = req.start_generation(call.request)
    encoder = encoder_class(job, call)
    if call.stream:
        return stream_reply("text/event-stream", reader(job), encoder)
    return JSONResponse(encoder.whole(reader(job).whole()))


def openai_choices(choices: Choices, call: OpenAICall, encoder_class: type[OpenAIEncoder]):
    """`n` choices: each choice's chunks carry its index, interleaved as they come; one usage (the prompt once)."""
    head = openai_head(call.served, encoder_class.chunk_object, encoder_class.id_prefix)
    encoders: dict[int, OpenAIEncoder] = {}

    def encoder_of(index: int) -> OpenAIEncoder:
        """Choice `index`'s encoder, made when its job has started (one that could not start writes its error)."""
        if index not in encoders:
            encoders[index] = encoder_class(choices.by_index.get(index, choices.first), call, index, head)
        return encoders[index]
    if not call.stream:
        wholes = [encoder_of(i).whole(events) for i, events in enumerate(choices.whole())]
        return JSONResponse({**wholes[0], "choices": [w["choices"][0] for w in wholes],
                             "usage": openai_usage(*choices.jobs)})

    def chunks() -> Iterator[bytes]:
        for index, events in choices.stream(REPLY_PING_SECONDS):
            new = index not in encoders
            encoder = encoder_of(index)
            out = (encoder.start() if new else b"") + b"".join(
                encoder.finish_chunk(e) if e.kind == "done" else encoder.error_chunk(e) if e.kind == "error"
                else getattr(encoder, e.kind)(e) for e in events)
            if out:
                yield out
        yield encoder_of(0).tail(choices.jobs)
    return StreamResponse("text/event-stream", chunks(), choices.first)


def openai_models(app, req):
    """Every model, the default first; `status` as llama-server's router mode says it."""
    return JSONResponse({"object": "list", "data": [{
        "id": m["name"], "object": "model", "created": int(os.path.getmtime(app.catalog.find(m["name"]).path)),
        "owned_by": "koboldlite", "aliases": m["aliases"], "status": {"value": m["state"]},
        "size": m["size"], "context_length": m["context"],
        "architecture": {"input_modalities": ["text"] + [kind for kind, key in (("image", "vision"), ("audio", "audio"))
                                                        if m["modalities"][key]], "output_modalities": ["text"]}}
        for m in model_states(app)]})


def openai_completions(app, req):
    return openai_answer(req, OpenAICall.completion(req), CompletionEncoder)


def openai_chat_completions(app, req):
    return openai_answer(req, OpenAICall.chat(req), ChatEncoder)


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
