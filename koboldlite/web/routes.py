"""The route table: every endpoint, its handler, whether the password guards it, its API's style (the one place
that says it: the handler answers errors in that style, and the router works out from the table the style of a
path no route has)."""

from __future__ import annotations

from ..api.kobold import (
    kobold_abort, kobold_check, kobold_detokenize, kobold_extra_version, kobold_generate, kobold_generate_stream,
    kobold_info_version, kobold_json_to_grammar, kobold_last_logprobs, kobold_max_context_length, kobold_max_length,
    kobold_model, kobold_perf, kobold_preloadstory, kobold_tokencount, sd_models
)
from ..api.audio import kobold_transcribe, openai_transcriptions
from ..api.openai import openai_chat_completions, openai_completions, openai_embeddings, openai_models
from ..api.ollama import (
    ollama_chat, ollama_embed, ollama_embeddings_legacy, ollama_generate, ollama_ps, ollama_show, ollama_tags,
    ollama_version
)
from ..api.infill import llama_infill
from ..api.anthropic import anthropic_count_tokens, anthropic_messages_route
from ..api.responses import responses_by_id, responses_create, responses_input_tokens
from ..api.admin import admin_list_options, admin_reload_config, ollama_delete, ollama_pull, router_load, router_unload
from ..api.slots import (
    admin_check_state, admin_clear_state, admin_load_state, admin_save_state, slots_action, slots_list
)
from ..api.ops import (
    apply_template, detokenize, health, health_live, lora_adapters_list, lora_adapters_set, metrics, props, tokenize
)
from .router import Router
from .static import StaticFiles


def build_router(static: StaticFiles | None = None) -> Router:
    r = Router(static.route if static is not None else None)
    r.add("GET", "/api/v1/model", kobold_model)
    r.add("GET", "/api/v1/info/version", kobold_info_version)
    r.add("GET", "/api/v1/config/max_length", kobold_max_length)
    r.add("GET", "/api/v1/config/max_context_length", kobold_max_context_length)
    r.add("POST", "/api/v1/generate", kobold_generate, protected=True)
    r.add("GET", "/api/extra/version", kobold_extra_version, needs_model=False)
    r.add("GET", "/api/extra/true_max_context_length", kobold_max_context_length)
    r.add("POST", "/api/extra/generate/stream", kobold_generate_stream, protected=True)
    r.add("GET POST", "/api/extra/generate/check", kobold_check, protected=True)
    r.add("POST", "/api/extra/abort", kobold_abort, protected=True)
    r.add("POST", "/api/extra/last_logprobs", kobold_last_logprobs, protected=True)
    r.add("POST", "/api/extra/embeddings", openai_embeddings, protected=True)       # KoboldCpp: OpenAI's shape
    r.add("POST", "/api/extra/tokencount /api/extra/tokenize", kobold_tokencount, protected=True)
    r.add("POST", "/api/extra/detokenize", kobold_detokenize, protected=True)
    r.add("POST", "/api/extra/transcribe", kobold_transcribe, protected=True)
    r.add("POST", "/api/extra/json_to_grammar", kobold_json_to_grammar, protected=True)
    r.add("GET", "/sdapi/v1/sd-models", sd_models)
    r.add("GET", "/api/extra/perf", kobold_perf)         # open, as KoboldCpp's: counts and timings, no text
    r.add("GET", "/api/admin/list_options", admin_list_options, protected=True, admin=True)
    r.add("POST", "/api/admin/reload_config", admin_reload_config, protected=True, admin=True, needs_model=False)
    r.add("POST", "/api/admin/save_state", admin_save_state, protected=True, admin=True)
    r.add("POST", "/api/admin/load_state", admin_load_state, protected=True, admin=True)
    r.add("GET POST", "/api/admin/check_state", admin_check_state, protected=True, admin=True)
    r.add("POST", "/api/admin/clear_state", admin_clear_state, protected=True, admin=True)
    # Open, as KoboldCpp's: KoboldAI Lite reads it before it asks for the password.
    r.add("GET", "/api/extra/preloadstory", kobold_preloadstory)

    r.add("GET", "/v1/models /models", openai_models, style="openai")
    r.add("POST", "/v1/completions /completions", openai_completions, protected=True, style="openai")
    r.add("POST", "/v1/chat/completions /chat/completions", openai_chat_completions, protected=True,
          style="openai")
    r.add("POST", "/v1/embeddings /embeddings", openai_embeddings, protected=True, style="openai")
    r.add("POST", "/v1/audio/transcriptions /audio/transcriptions", openai_transcriptions, protected=True,
          style="openai")
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
    r.add("POST", "/infill", llama_infill, protected=True, style="openai")
    r.add("GET", "/lora-adapters", lora_adapters_list, protected=True, style="openai")
    r.add("POST", "/lora-adapters", lora_adapters_set, protected=True, style="openai")
    r.add("GET", "/metrics", metrics, protected=True, style="openai")
    r.add("POST", "/models/load", router_load, protected=True, style="openai")
    r.add("GET", "/slots", slots_list, protected=True, style="openai")
    r.add_prefix("POST", "/slots/", slots_action, protected=True, style="openai")
    r.add("POST", "/models/unload", router_unload, protected=True, style="openai")
    return r
