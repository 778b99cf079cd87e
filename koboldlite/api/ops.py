"""Operational endpoints, as llama.cpp's server has them."""

from __future__ import annotations

import os
import time

from ..version import __version__
from ..errors import RequestError
from ..fields import FieldReader
from ..service.exchange import JSONResponse, Response
from ..engine.adapters import parse_scale_list
from .common import OPENAI_DEFAULTS, gpu_report, model_states, threads_report
from .openai import OpenAICall


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
    gpu = gpu_report(served)
    return JSONResponse({
        "default_generation_settings": {
            "n_ctx": served.model.n_ctx, "temperature": d.temperature, "top_k": d.top_k, "top_p": d.top_p,
            "min_p": d.min_p, "repeat_penalty": d.rep_pen, "repeat_last_n": d.rep_pen_range,
            "n_predict": -1, "seed": -1},
        "context": {"size": served.model.n_ctx, "trained": served.model.n_ctx_train, "why": served.context_reason},
        "total_slots": len(served.engine.slots),
        "memory": served.model.memory_report(),
        "gpu": gpu,
        "cpu_backend": gpu["cpu"],     # the CPU variant llama.cpp loaded (haswell...), its features
        "threads": threads_report(app, served),   # the wait policy, priority and thread counts now
        "modalities": {"vision": bool(served.projector and served.projector.vision), "video": False,
                       "audio": bool(served.projector and served.projector.audio)},
        "chat_template": served.chat_template.source,
        "bos_token": served.chat_template.bos_text, "eos_token": served.chat_template.eos_text,
        "model_alias": served.name,
        "model_path": os.path.basename(served.entry.path),
        "models": model_states(app),
        "lora_adapters": served.adapters.listing(),      # --lora's adapters: id, file, global scale
        # How often a decode ran under other LoRA scales than the one before (each costs llama.cpp a new graph).
        "lora_scale_switches": served.adapters.switches,
        "build_info": f"koboldlite-{__version__}",
    })


def lora_adapters_list(app, req):
    """llama-server's GET /lora-adapters: [{id, path, scale}] of the default model (or ?model=NAME)."""
    return JSONResponse(req.use(req.query.get("model")).adapters.listing())


def lora_adapters_set(app, req):
    """llama-server's POST /lora-adapters: [{id, scale}] become the global scales (adapters not listed: 0), which
    requests without a `lora` field of their own run under from now on."""
    served = req.use(req.query.get("model"))
    served.adapters.set_global(parse_scale_list(req.json(), "body"))
    app.log("LoRA scales: " + (", ".join(f"{a['id']}={a['scale']:g}" for a in served.adapters.listing()) or "none"))
    return JSONResponse({"success": True})


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
    """The prompt a chat completions request becomes (llama-server's /apply-template): its messages, tools and
    template variables, read as /v1/chat/completions reads them."""
    request = OpenAICall.chat(req).request
    return JSONResponse({"prompt": request.memory + request.prompt})


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
