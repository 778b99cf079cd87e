"""A default context that fits today's clients (issue 37, item 6): without --contextsize a model gets the context it
was trained for where memory allows (the KV cache of every slot in half the RAM left beside the weights), else
the longest that fits, never below 4096; start-up and /props say which and why; --contextsize still fixes it.
Open WebUI's default chat request (its 36 built-in tools: about 6,500 tokens on the starter model) fits it."""

from __future__ import annotations

import json

import pytest

from koboldlite.engine.context_fit import (
    DEFAULT_CONTEXT_FLOOR, RAM_CAP_ENV, choose_context, kv_bytes_per_token, longest_context_on_gpu, trained_context
)
from koboldlite.engine.gguf_layout import GGUFLayout
from tests.harness import ServerProcess, openai_client_for

GiB = 1 << 30


def test_the_choice_follows_training_and_memory(starter_model, gemma_model):
    for path, trained in ((starter_model, 8192), (gemma_model, 32768)):
        layout = GGUFLayout(path)
        assert trained_context(layout) == trained
        per_token = kv_bytes_per_token(layout, 0, 1)
        assert choose_context(layout, 0, 0, 1, 64 * GiB).size == trained       # plenty of RAM
        room = 10_000 * per_token * 2                                           # half of it holds 10,000 tokens
        tight = choose_context(layout, 0, 0, 1, room)
        assert tight.size == min(trained, 9216) and "half" in tight.reason or tight.size == trained
        assert choose_context(layout, 0, 0, 1, 1 << 20).size == DEFAULT_CONTEXT_FLOOR   # never below the floor
        # Weights come first; every slot's cache counts with --kvperslot; a quantized cache holds more.
        assert choose_context(layout, room, 0, 1, room).size == DEFAULT_CONTEXT_FLOOR
        assert choose_context(layout, 0, 0, 4, room).size <= max(DEFAULT_CONTEXT_FLOOR, 10_000 // 4)
        assert choose_context(layout, 0, 2, 1, room).size >= tight.size


def test_on_a_gpu_the_context_shortens_so_that_every_layer_fits(gemma_model):
    layout = GGUFLayout(gemma_model)
    weights = sum(layout.layer_bytes.values()) + layout.other_bytes
    kv_4k = 4096 * kv_bytes_per_token(layout, 0, 1)
    margin = (512 << 20) + 512 * layout.n_vocab * 4          # fit_gpu_layers' margin for compute buffers
    roomy = weights + margin + 64 * kv_4k
    assert longest_context_on_gpu(layout, roomy, 0, 1, 512, 32768) == 32768
    some = weights + margin + 3 * kv_4k                      # room for about 12k tokens
    fits = longest_context_on_gpu(layout, some, 0, 1, 512, 32768)
    assert DEFAULT_CONTEXT_FLOOR <= fits < 32768 and fits % 1024 == 0
    assert longest_context_on_gpu(layout, weights, 0, 1, 512, 32768) == 0      # not even the floor: none


def started(model: str, *args: str, env: dict | None = None) -> ServerProcess:
    return ServerProcess(["--model", model, *args], env=env)


def test_a_server_without_contextsize_gets_the_trained_context_and_says_why(starter_model):
    s = started(starter_model)
    try:
        line = s.wait_for_line(r"^Context: (\d+) tokens(.*)")
        assert line.group(1) == "8192" and "trained" in line.group(2)
        props = s.json("GET", "/props")
        assert props["default_generation_settings"]["n_ctx"] == 8192
        assert props["context"]["size"] == 8192 and props["context"]["trained"] == 8192
        assert s.json("GET", "/api/extra/true_max_context_length")["value"] == 8192
        # Open WebUI 0.12's default chat request: its built-in tools, some 26 KB, with every message.
        tools = [{"type": "function", "function": {
            "name": f"builtin_tool_{i}", "description": "Search the knowledge base, the web, notes, memories and "
                                                         "chats for what the user asks about; return the results "
                                                         "with their sources and dates. " * 2,
            "parameters": {"type": "object", "properties": {
                "query": {"type": "string", "description": "what to look for, in the user's words"},
                "count": {"type": "integer", "description": "how many results to return, at most 20"},
                "since": {"type": "string", "description": "only results after this date (YYYY-MM-DD)"}},
                "required": ["query"]}}} for i in range(36)]
        assert len(json.dumps(tools)) > 24_000
        client = openai_client_for(s)
        reply = client.chat.completions.create(model="m", max_tokens=2, tools=tools,
                                               messages=[{"role": "user", "content": "Hello!"}])
        assert 4096 < reply.usage.prompt_tokens < 8192          # too long for the old default, read whole now
    finally:
        s.stop()


def test_less_free_ram_means_a_shorter_context_and_contextsize_still_fixes_it(gemma_model):
    layout = GGUFLayout(gemma_model)
    model_mib = sum(layout.layer_bytes.values()) + layout.other_bytes >> 20
    per_token = kv_bytes_per_token(layout, 0, 1)
    cap_mib = model_mib + (2 * 12_000 * per_token >> 20)       # half the rest holds about 12,000 tokens
    s = started(gemma_model, env={RAM_CAP_ENV: str(cap_mib)})
    try:
        line = s.wait_for_line(r"^Context: (\d+) tokens(.*)")
        size = int(line.group(1))
        assert DEFAULT_CONTEXT_FLOOR < size < 32768 and size % 1024 == 0 and "RAM" in line.group(2)
        assert s.json("GET", "/props")["default_generation_settings"]["n_ctx"] == size
    finally:
        s.stop()
    s = started(gemma_model, "--contextsize", "3000", env={RAM_CAP_ENV: str(cap_mib)})
    try:
        props = s.json("GET", "/props")
        assert props["default_generation_settings"]["n_ctx"] == 3000 and "--contextsize" in props["context"]["why"]
        assert not any(line.startswith("Context:") for line in s.lines)
    finally:
        s.stop()


def test_contextsize_zero_is_the_default_and_a_bad_one_is_refused(starter_model, tmp_path):
    from koboldlite.config import Config, load_config
    from koboldlite.errors import ConfigError
    assert Config().contextsize == 0
    with pytest.raises(ConfigError, match="contextsize"):
        load_config(["--model", starter_model, "--contextsize", "10"])
