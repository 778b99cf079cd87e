"""The KoboldAI API and KoboldCpp's extras."""

from __future__ import annotations

import json
import re
import time
from typing import Any, Callable

from ..version import KOBOLDCPP_COMPAT_VERSION, KOBOLD_API_VERSION, __version__
from ..errors import RequestError
from ..fields import FieldReader, _more_than_one, ignored_fields
from ..generation import GenerationRequest, parse_sampler_settings
from ..jobs import Job, JobState, JobStats, StopReason
from ..chat.tools import json_grammar
from ..media import MEDIA_MARKER, MediaKind, decode_base64, read_media
from ..service.app import App
from ..service.exchange import JSONResponse
from .common import (
    KOBOLD_CLIENT_FIELDS, LogprobShapes, genkey_of, gpu_report, instruct_request, model_states,
    prompt_cache_report, threads_report, wire_finish_reason
)
from .reply import (
    SSE_PING, DoneEvent, ErrorEvent, PingEvent, ProgressEvent, ReplyEncoder, ReplyEvent, ReplyReader, TextEvent,
    WholeReply, stream_reply
)


# Fields of the Kobold API this server does not act on (api/common.py says how they are named).
KOBOLD_IGNORED_FIELDS: dict[str, Callable[[Any], bool]] = {
    "n": _more_than_one, **KOBOLD_CLIENT_FIELDS}   # "n": one text per request


# KoboldCpp's stop_reason codes in /api/extra/perf; an aborted or failed reply has none (-1).
KOBOLD_STOP_CODES = {StopReason.LENGTH: 0, StopReason.END: 1, StopReason.STOP_STRING: 2}
KOBOLD_TOP_LOGPROBS = 5     # KoboldCpp reports the 5 most likely alternatives


def parse_kobold_request(req, app: App) -> GenerationRequest:
    f = FieldReader(req.json())
    if "prompt" not in f.body:
        raise RequestError("'prompt' is required")
    stops = f.string_list("stop_sequence")
    if f.boolean("singleline"):
        stops.append("\n")
    served = req.use(f.body.get("model"))      # KoboldAI Lite sends none: the default model
    ignored = ignored_fields(f.body, KOBOLD_IGNORED_FIELDS)
    prompt, memory, media = kobold_media(f, f.string("prompt"), f.string("memory"), served, ignored)
    order = {key: i for i, key in enumerate(f.body)}
    ignored.sort(key=lambda key: order.get(key, len(order)))          # as the client sent them
    return instruct_request(served, f, prompt=prompt, memory=memory, stop_strings=stops, media=media,
        max_length=f.integer("max_length", default=served.config.max_length, lo=1, hi=1 << 20),
        max_context_length=f.integer("max_context_length", "truncation_length", default=served.model.n_ctx,
                                     lo=1, hi=1 << 24),
        trim_stop=f.boolean("trim_stop", default=True),
        sampler=parse_sampler_settings(f),
        genkey=genkey_of(req, f.body),
        render_special=f.boolean("render_special", default=False),
        checkable_without_genkey=True,
        cut_overlong_prompt=True,
        ignored_fields=ignored,
        logprobs=f.boolean("logprobs"), top_logprobs=KOBOLD_TOP_LOGPROBS, logprobs_after_samplers=True,
    )


ATTACHED = re.compile(r"\(Attached (Image|Audio) (\d+)\)")


def kobold_media(f: FieldReader, prompt: str, memory: str, served, ignored: list[str]) -> tuple[str, str, list]:
    """KoboldAI Lite's and SillyTavern's `images` and `audio` (base64), placed as KoboldCpp places them: where the
    text says "(Attached Image N)" or "(Attached Audio N)", else at the front of the memory after "Attached
    Media:", each followed by a blank line. (prompt, memory, the media in the order they stand.) A kind the model
    does not read is left out and named in `ignored`, as a text-only KoboldCpp leaves it (SillyTavern sends them
    whatever the model)."""
    items = []
    readable = served.projector.kinds if served.projector else ()
    for field, kind in (("images", MediaKind.IMAGE), ("audio", MediaKind.AUDIO)):
        values = f.body.get(field) or []
        if not isinstance(values, list):
            raise RequestError(f"'{field}' must be a list of base64 strings")
        if kind not in readable:
            if values:
                ignored.append(field)
            continue
        items += [(kind, read_media(decode_base64(v, f"{field}[{i}]"), f"{field}[{i}]", (kind,)))
                  for i, v in enumerate(values)]
    if not items:
        return prompt, memory, []
    n_images = sum(1 for kind, _ in items if kind is MediaKind.IMAGE)
    placed: list = []

    def inline(m: re.Match) -> str:
        index = int(m.group(2)) - 1 + (n_images if m.group(1) == "Audio" else 0)
        if not 0 <= index < len(items) or items[index][0].value != m.group(1).lower():
            return m.group(0)                     # no such attachment: the words stay
        placed.append(items[index][1])
        return MEDIA_MARKER
    memory, prompt = ATTACHED.sub(inline, memory), ATTACHED.sub(inline, prompt)
    front = [item for _, item in items if all(item is not p for p in placed)]
    if front:
        memory = "\nAttached Media:\n" + (MEDIA_MARKER + "\n\n") * len(front) + memory
    return prompt, memory, front + placed      # the order the markers stand in: memory's, then the prompt's


def kobold_sse_event(token: str, finish_reason: str | None) -> bytes:
    """One KoboldCpp SSE event; ASCII-only JSON on one line (a raw U+2028 breaks KoboldAI Lite)."""
    data = json.dumps({"token": token, "finish_reason": finish_reason}, ensure_ascii=True)
    return f"event: message\ndata: {data}\n\n".encode("ascii")


class KoboldEncoder(ReplyEncoder):
    """KoboldCpp's answer: a `message` event per token, then one with the finish reason; whole, {"results": [...]}.
    A failed reply just stops, as KoboldCpp's does (its clients know no error event)."""

    def __init__(self, job: Job, served):
        self.job = job
        self.served = served

    def text(self, event: TextEvent) -> bytes:
        return kobold_sse_event(event.text, None)

    def progress(self, event: ProgressEvent) -> bytes:
        """KoboldCpp's stream has no progress event: an SSE comment carries it (every reader passes over one; see
        ping), in llama-server's words."""
        return b": prompt_progress " + json.dumps(event.progress.to_json()).encode() + b"\n\n"

    def ping(self, event: PingEvent) -> bytes:
        # KoboldAI Lite reads its stream with /^event: (.*)\ndata: (.*)(\r?\n){2}/m and cuts the buffer after each
        # match, so a comment line between events is passed over (and SillyTavern's reader follows the SSE spec).
        return SSE_PING

    def done(self, event: DoneEvent) -> bytes:
        return kobold_sse_event("", wire_finish_reason(event.reason))

    def error(self, event: ErrorEvent) -> bytes:
        return kobold_sse_event("", wire_finish_reason(StopReason.FAILED))

    def whole(self, events: list[ReplyEvent]) -> dict:
        reply = WholeReply.of(events)
        result = {"text": reply.text, "finish_reason": wire_finish_reason(reply.reason)}
        if self.job.request.logprobs:
            result["logprobs"] = LogprobShapes(self.served.model).kobold(reply.logprobs)
        return {"results": [result]}


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
    """/api/v1/config/max_context_length and /api/extra/true_max_context_length: the same number."""
    return JSONResponse({"value": default_context_size(app)})


def kobold_generate(app, req):
    job = req.start_generation(parse_kobold_request(req, app))
    return JSONResponse(KoboldEncoder(job, req.use()).whole(ReplyReader(job).whole()))


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
    return stream_reply("text/event-stream", ReplyReader(job, progress=True), KoboldEncoder(job, req.use()))


def kobold_extra_version(app, req):
    projector = getattr(app.roster.current(), "projector", None)     # the default model's, as loaded now
    return JSONResponse({
        "result": "KoboldCpp", "version": KOBOLDCPP_COMPAT_VERSION, "protected": bool(app.config.password),
        "server": "KoboldLite", "koboldlite_version": __version__, "txt2img": False,
        "vision": bool(projector and projector.vision), "audio": bool(projector and projector.audio),
        "transcribe": bool(projector and projector.audio), "multiplayer": False,
        "websearch": False, "tts": False, "embeddings": True, "savedata": False,
        "admin": 1 if app.config.admin else 0, "router": app.catalog.several,
    })


def kobold_check(app, req):
    job, served = app.find_job(genkey_of(req)) or (None, None)
    text = job.buffer.text() if job is not None else ""
    result = {"text": text}
    if job is not None and job.state is JobState.QUEUED:
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
        # What drafts are weighed against: a decode's ms by its tokens, as measured (README: Sharing the CPU)
        "draft_step_cost": served.engine.speculation.report() if served else None,
        "total_gens": app.totals["requests"],
        "stop_reason": KOBOLD_STOP_CODES.get(last.buffer.stop_reason, -1) if last else -1,
        "queue": sum(m.scheduler.waiting for m in loaded),
        "idle": 0 if any(not m.scheduler.idle for m in loaded) else 1,
        "active_slots": sum(m.scheduler.active for m in loaded),
        "slots": len(served.engine.slots) if served else 0,
        "kv_compactions": served.engine.compactions if served else 0,   # a shared pool laid out anew (README)
        "kv_set_aside": served.engine.set_aside if served else 0,   # idle conversations moved to the prompt cache
        "read_ahead_tokens": served.engine.next_turns.tokens_read if served else 0,   # chats' next turns (README)
        "gpu": gpu_report(served) if served else None,
        "threads": threads_report(app, served) if served else None,   # wait policy, counts now (README)
        "models": model_states(app),
        "model_events": list(app.roster.events),       # loads and unloads: when, why, seconds, MiB
        "uptime": round(time.monotonic() - app.started, 3),
        "instance": app.instance_id,
        "hordeexitcounter": -1,
        "quiet": app.config.quiet,
    })


def kobold_preloadstory(app, req):
    return JSONResponse({})
