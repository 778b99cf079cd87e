"""What every API family shares: error shapes, the fields a request is read with (its key and genkey, its length,
its structured output, its tools), log-probabilities, what the model reports."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Callable

from ..errors import (ContextOverflow, Conflict, Failed, Invalid, ModelNotFound, NotFound, RequestError, ServiceError,
                      Unavailable)
from ..fields import FieldReader, _asks
from ..generation import GenerationRequest, SamplerSettings, parse_sampler_settings
from ..jobs import Job, StopReason, TokenLogprob
from ..media_urls import MediaList, MediaURLs
from ..engine.llama_model import LlamaModel
from ..engine.embeddings import Embedder
from ..engine.infill import InfillParts, infill_prompt
from ..chat.template import INSTRUCT_PLACEHOLDER
from ..chat.tools import ToolUse, json_grammar
from ..service.served_model import ServedModel
from ..service.exchange import JSONResponse, Response


ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 405: "invalid_request_error", 411: "invalid_request_error",
                         413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                         503: "overloaded_error", 529: "overloaded_error"}


# What the service could not do (errors.ServiceError), as HTTP statuses and error kinds.
SERVICE_ERRORS = ((Invalid, 400, "invalid_request_error"), (NotFound, 404, "not_found"), (Conflict, 409, "conflict"),
                  (Unavailable, 503, "service_unavailable"), (Failed, 500, "server_error"))


def model_not_found(style: str, name: Any) -> RequestError:
    """A model name nobody serves, in the words each family's clients know (Ollama's tells them to pull it)."""
    if style == "ollama":
        return RequestError(f'model "{name}" not found, try pulling it first', status=404, kind="not_found")
    return RequestError(f"model '{name}' not found: GET /v1/models lists the models of this server", status=404,
                        kind="not_found_error" if style == "anthropic" else "invalid_request_error",
                        code="model_not_found")


def as_request_error(style: str, error: ServiceError) -> RequestError:
    """A service error as the answer to a request: its status and kind, and the fields clients read."""
    if isinstance(error, ModelNotFound):
        return model_not_found(style, error.name)
    if isinstance(error, ContextOverflow):
        # llama-server's error type and numbers, OpenAI's code; clients read the numbers from the fields, and
        # some from the message ("exceeds the available context size").
        return RequestError(str(error), kind="exceed_context_size_error", code="context_length_exceeded",
                            extra={"n_prompt_tokens": error.n_prompt, "n_ctx": error.n_ctx})
    status, kind = next((s, k) for cls, s, k in SERVICE_ERRORS if isinstance(error, cls))
    return RequestError(str(error), status=status, kind=kind)


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


def error_response(style: str, error: RequestError | ServiceError) -> Response:
    """An error in its API's shape; Anthropic's clients know a full queue as 529 (overloaded)."""
    if isinstance(error, ServiceError):
        error = as_request_error(style, error)
    status = 529 if style == "anthropic" and error.status == 503 else error.status
    return JSONResponse(error_body(style, error), status, error.headers)


def unauthorized(style: str) -> RequestError:
    """401, in the words OpenAI-style clients look for (they show 'invalid API key' and stop retrying)."""
    message = "a valid password is required (Authorization: Bearer <password>, or X-Api-Key)"
    if style == "openai":
        return RequestError(message, status=401, kind="authentication_error", code="invalid_api_key")
    return RequestError(message, status=401, kind="unauthorized")


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


def infill_request(served: ServedModel, parts: InfillParts, **fields) -> GenerationRequest:
    """A fill-in-the-middle generation (/infill, and the `suffix` of OpenAI completions and Ollama generate): its
    prompt laid out from the model's FIM tokens (a 400 for a model without them), no chat template."""
    tokens = infill_prompt(served.model, served.name, parts, fields.get("max_length"),
                           fields.get("max_context_length"))
    return GenerationRequest(prompt=served.model.detokenize(tokens, special=True), prompt_tokens=tokens, **fields)


def genkey_of(req, body: dict | None = None) -> str:
    """A genkey from the JSON body (`body`, when the route has read it already), the query string, or a `genkey`
    header: every API takes all three, so check and abort (and a balancer hashing on it) reach any generation."""
    if body is None:
        body = req.json(optional=True)
        if body is not None and not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
    key = (body or {}).get("genkey") or req.query.get("genkey") or req.headers.get("genkey") or ""
    if not isinstance(key, str):
        raise RequestError("'genkey' must be a string")
    return key


def llama_timings(job: Job) -> dict:
    """llama-server's `timings` of a reply so far: the prompt's reading (cached tokens apart) and the generation."""
    s = job.stats
    prompt_n = s.prompt_tokens - s.cached_tokens
    prompt_ms = s.prompt_seconds * 1000
    if s.generation_seconds or job.buffer.done:
        predicted_ms = s.generation_seconds * 1000
    else:
        predicted_ms = (time.monotonic() - s.first_token_at) * 1000 if s.first_token_at else 0.0
    predicted_n = s.generated_tokens
    out = {"cache_n": s.cached_tokens, "prompt_n": prompt_n, "prompt_ms": prompt_ms,
           "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
           "prompt_per_second": prompt_n * 1000 / prompt_ms if prompt_ms else 0.0,
           "predicted_n": predicted_n, "predicted_ms": predicted_ms,
           "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
           "predicted_per_second": predicted_n * 1000 / predicted_ms if predicted_ms else 0.0}
    if s.drafted_tokens:
        out.update(draft_n=s.drafted_tokens, draft_n_accepted=s.draft_accepted)
    return out


def wire_finish_reason(reason: StopReason | None, called: bool = False) -> str:
    """Clients know 'stop' and 'length' (and OpenAI's 'tool_calls'); an aborted or failed generation stopped. Calls
    cut by the length limit say 'length': their arguments may be incomplete."""
    if reason is StopReason.LENGTH:
        return "length"
    return "tool_calls" if called else "stop"


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


def prompt_cache_report(served: ServedModel) -> dict | None:
    return served.prompt_cache.report() if served.prompt_cache is not None else None


def gpu_report(served: ServedModel) -> dict:
    """Fixed once the model is loaded; read then, not from llama.cpp's log (which scrolls) on every request."""
    return served.gpu_info


def threads_report(app, served: ServedModel) -> dict:
    """How the CPU is shared (README: Sharing the CPU): the wait policy and priority set at start, and the model's
    thread counts now, for generation steps and prompt reading (engine/cpu_threads.py). Where the model's build has
    no OpenMP, the policy reaches its threads as the poll level of KoboldLite's own threadpool (engine/threadpool.py):
    the environment set at start reaches nothing there."""
    policy = app.cpu_policy
    if "wait" in policy and ((served.gpu_info or {}).get("cpu") or {}).get("openmp") is False:
        pool = getattr(served.model, "threadpools", None)
        policy = {**policy, "wait": {"policy": app.config.cpuwait, "threadpool": pool.report() if pool else None,
                                     "in_force": pool is not None}}
    return {**policy, **served.engine.threads.report()}


def modalities_of(app, entry) -> dict[str, bool]:
    """What a model reads beside text: its loaded projector's abilities, else its projector file's header."""
    served = app.roster.current(entry.name)
    if served is not None:
        projector = served.projector
        return {"vision": bool(projector and projector.vision), "audio": bool(projector and projector.audio)}
    return entry.modalities(app.config)


def model_states(app) -> list[dict]:
    """Every model a request may name, with its state, size and context (as loaded, or as it would be)."""
    out = []
    for entry in app.catalog.entries():
        served = app.roster.current(entry.name)
        out.append({"name": entry.name, "aliases": entry.aliases, "state": app.roster.state_of(entry.name),
                    "default": entry.name == app.catalog.default_name, "size": entry.size_bytes,
                    "context": served.model.n_ctx if served else entry.config(app.config).contextsize,
                    "modalities": modalities_of(app, entry),
                    **({"error": app.roster.failures[entry.name]} if entry.name in app.roster.failures else {})})
    return out


def tool_use_of(served: ServedModel, f: FieldReader, choice: Any = None) -> ToolUse | None:
    """OpenAI's `tools` (Ollama's are the same), `tool_choice` (or `choice`) and `parallel_tool_calls`."""
    tools = f.body.get("tools")
    if not tools:
        return None
    return ToolUse(served.chat_template, tools, choice if choice is not None else f.body.get("tool_choice"),
                   f.body.get("parallel_tool_calls"))


def media_list(req, served: ServedModel) -> MediaList:
    """The list a request's media are read into, fetching addresses only as --mediaurls allows; media the served
    model cannot read are refused before they are read."""
    return MediaList(MediaURLs(req.app.config.mediaurls), served.projector.kinds if served.projector else ())


def chat_request(served: ServedModel, messages: list[dict], fields: dict, tools: ToolUse | None = None,
                 template_vars: dict | None = None) -> GenerationRequest:
    """A chat's generation request, made by the model's template: the tools go into the messages or the template's
    variables, and a call they force puts its grammar on the sampler (ToolUse.apply), beside the variables the
    API sets (`enable_thinking`...). `fields`: the GenerationRequest's other fields, its sampler among them."""
    template_vars = dict(template_vars or {})
    media = fields.get("media")
    if isinstance(media, MediaList) and media.ignored:
        fields = {**fields, "ignored_fields": list(fields.get("ignored_fields") or []) + media.ignored}
    if tools is not None:
        messages, more = tools.apply(messages, fields["sampler"])
        template_vars.update(more)
    return served.chat_template.generation_request(messages, template_vars=template_vars, **fields)


OPENAI_DEFAULTS = SamplerSettings(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, rep_pen_range=64)


MAX_TOP_LOGPROBS = 20


MAX_REPLY_TOKENS = 1 << 20


def max_reply_tokens(f: FieldReader, *names: str, default: int | None = None, required: bool = False,
                     minus_one_is_none: bool = False) -> int | None:
    """The longest reply a request asks for, from the first of `names` that is set: at least 1 (None: as long as
    the context allows). Absent, `default`, or a 400 when `required`; `minus_one_is_none`: -1 means no limit, as
    llama.cpp's clients send it to the OpenAI API."""
    if not f.has(*names):
        if required:
            raise RequestError(f"'{names[0]}' is required")
        return default
    value = f.integer(*names, default=0, hi=MAX_REPLY_TOKENS)
    if minus_one_is_none and value == -1:
        return None
    if value < 1:
        unlimited = " (or -1 for no limit)" if minus_one_is_none else ""
        raise RequestError(f"'{names[0]}' must be at least 1{unlimited}, not {value}", code="invalid_value")
    return value


def apply_output_format(sampler: SamplerSettings, kind: Any, schema: Any, where: str, schema_where: str):
    """Structured output, whatever an API calls it (OpenAI's response_format, Ollama's format, Anthropic's
    output_config.format, the Responses API's text.format): "json_object", any JSON object; "json_schema", JSON
    that `schema` allows; "text", no constraint. The grammar goes onto the sampler."""
    if kind == "json_object":
        sampler.grammar = json_grammar(True, where)
    elif kind == "json_schema":
        sampler.grammar = json_grammar(schema, schema_where)
    elif kind != "text":
        raise RequestError(f"'{where}.type' must be 'text', 'json_object' or 'json_schema'")


# Fields KoboldCpp's clients send that no API here acts on, each with the test of a value that asks for something:
# such a field is named in the log and in X-KoboldLite-Ignored, never dropped in silence. SillyTavern sends the
# Kobold ones to /v1 too, so the Kobold and OpenAI families both name them.
MEDIA_FIELDS: dict[str, Callable[[Any], bool]] = {"images": _asks, "audio": _asks}    # no vision or audio model
KOBOLD_CLIENT_FIELDS: dict[str, Callable[[Any], bool]] = {
    "use_story": _asks, "use_memory": _asks, "use_authors_note": _asks, "use_world_info": _asks,
    "negative_prompt": _asks, "guidance_scale": lambda v: v not in (None, 0, 1),
    "grammar_retain_state": _asks,
    "adaptive_target": lambda v: isinstance(v, (int, float)) and v > 0,
}


def api_key_owner(req) -> str:
    """Whose stored responses a request may see: a digest of the key it offered (none is a key too)."""
    return hashlib.sha256(req.api_key.encode()).hexdigest()


def text_only(kind: str, where: str) -> RequestError:
    return RequestError(f"{where} is a{'n' if kind[0] in 'aeiou' else ''} {kind} block: this server's model reads "
                        "text only")


def block_request_fields(req, f: FieldReader, max_length: int | None, ignored: list[str]) -> dict:
    """The generation fields of the block APIs (Anthropic's, Responses'): OpenAI's sampler defaults."""
    return dict(max_length=max_length, sampler=parse_sampler_settings(f, OPENAI_DEFAULTS),
                genkey=genkey_of(req, f.body), ignored_fields=ignored)


def embedding_inputs(f: FieldReader, *names: str) -> list[str]:
    value = f.value(*names)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value) and len(value) <= 2048:
        return value
    if isinstance(value, (dict, list)) and "image" in json.dumps(value)[:4096]:
        raise RequestError(f"'{names[0]}': embeddings of images are not served here, only of text")
    raise RequestError(f"'{names[0]}' must be a string or a non-empty list of strings")


def embedder_for(req, f: FieldReader) -> tuple[Embedder, str]:
    """The embedding context a request uses, and the name its answer gives: --embeddings-model's whatever
    the request names, else the named model's own."""
    app = req.app
    if app.embeddings_source is not None:
        return app.embedder(None), app.embeddings_source.name
    served = req.use(f.body.get("model"))
    return app.embedder(served), served.name
