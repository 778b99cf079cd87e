"""OpenAI and Ollama APIs and the llama.cpp-style operational endpoints (wire-contract sections 3, 4)."""

from __future__ import annotations

import json
import re

import pytest

from tests.harness import ServerProcess, SSEStream, kobold_event_json, openai_client_for

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def client(server):
    return openai_client_for(server)


# -- OpenAI through the official client ----------------------------------------------

def test_openai_models(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct.Q4_1"]
    status, headers, _ = server.request("GET", "/models")
    assert status == 200 and headers["content-type"] == "application/json"


def test_openai_chat_completion(client, server):
    r = client.chat.completions.create(model="anything", messages=CHAT, max_tokens=20, seed=3, logprobs=True)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.object == "chat.completion" and isinstance(r.created, int)
    assert r.usage.completion_tokens == len(choice.logprobs.content)     # one entry per token of this reply
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_openai_chat_stream_matches_non_streamed(client):
    kw = dict(model="x", messages=CHAT, max_tokens=24, seed=8, temperature=0.9)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert len({c.id for c in chunks}) == 1
    finals = [c for c in chunks if c.choices[0].finish_reason is not None]
    assert len(finals) == 1 and finals[0] is chunks[-1]


def test_openai_include_usage(client):
    chunks = list(client.chat.completions.create(model="x", messages=CHAT, max_tokens=6, stream=True,
                                                  stream_options={"include_usage": True}, seed=1))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.choices for c in chunks[:-1])


def test_openai_completion_and_stream(client):
    kw = dict(model="x", prompt="The three primary colours are", max_tokens=12, seed=5)
    whole = client.completions.create(**kw)
    assert whole.object == "text_completion" and whole.choices[0].text
    assert whole.usage.completion_tokens == 12 and whole.choices[0].finish_reason == "length"
    streamed = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"


def test_openai_stop_and_kobold_fields_pass_through(client):
    r = client.completions.create(model="x", prompt="1, 2, 3, 4,", max_tokens=30, temperature=0,
                                  stop=[" 7"], extra_body={"top_k": 1, "rep_pen": 1.0, "min_p": 0.0})
    assert r.choices[0].text.strip().startswith("5") and " 7" not in r.choices[0].text
    assert r.choices[0].finish_reason == "stop"


def test_openai_json_modes(client):
    r = client.chat.completions.create(
        model="x", max_tokens=60, seed=2,
        messages=[{"role": "user", "content": "Describe a cat as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": {
            "type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                             "age": {"type": "integer"}},
            "required": ["name", "age"]}}})
    if r.choices[0].finish_reason == "stop":
        cat = json.loads(r.choices[0].message.content)
        assert isinstance(cat["name"], str) and isinstance(cat["age"], int)
    else:
        assert r.choices[0].message.content.lstrip().startswith('{"name"')


def test_openai_errors(client, server):
    import openai
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=CHAT, n=9)      # above MAX_CHOICES
    assert "'n'" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=[{"role": "wizard", "content": "hi"}])
    assert "messages[0].role" in e.value.body["message"]
    for bad, words in (({"messages": "hi"}, "'messages'"),
                       ({"messages": [CHAT[0], {"role": "user", "content": 42}]}, "messages[1].content"),
                       ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
                       ({"messages": CHAT, "response_format": {"type": "json_schema",
                                                               "json_schema": {"schema": {"type": "frob"}}}},
                        "schema"),
                       ({"messages": CHAT, "response_format": {"type": "xml"}}, "response_format")):
        status, _, body = server.request("POST", "/v1/chat/completions", bad)
        err = json.loads(body)["error"]
        assert status == 400 and words in err["message"] and err["type"] and err["code"] == 400, (bad, err)
    status, _, body = server.request("POST", "/v1/completions", b"{oops")
    assert status == 400 and "error" in json.loads(body)


def test_sillytavern_style_completion_body(server):
    """SillyTavern's KoboldCpp source posts its whole settings object: dozens of keys, stop: [], no model."""
    body = {"prompt": "Hello there,", "max_tokens": 8, "stop": [], "logit_bias": {}, "temperature": 0.7,
            "top_k": 40, "top_a": 0, "tfs": 1, "typical": 1, "rep_pen": 1.1, "rep_pen_range": 256,
            "sampler_order": [6, 0, 1, 3, 4, 2, 5], "mirostat": 0, "dry_multiplier": 0,
            "dry_sequence_breakers": "[\"\\n\", \":\"]", "xtc_threshold": 0.1, "banned_tokens": [],
            "grammar": "", "trim_stop": True, "use_default_badwordsids": False, "stream": False}
    r = server.json("POST", "/v1/completions", body)
    assert r["choices"][0]["text"] and r["usage"]["completion_tokens"] >= 1


# -- OpenAI streams, byte for byte ---------------------------------------------------------

@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 10, "stream": True, "seed": 4}),
    ("/chat/completions", {"messages": CHAT, "max_tokens": 10, "stream": True, "seed": 4,
                           "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"prompt": "Once upon", "max_tokens": 10, "stream": True, "seed": 4}),
])
def test_openai_stream_bytes(server, path, body):
    s = SSEStream(server, path, body)
    assert s.status == 200 and s.headers["content-type"] == "text/event-stream"
    assert "content-length" not in s.headers
    events = list(s.events())
    assert events[-1] == b"data: [DONE]\n\n"
    assert s.raw.count(b"[DONE]") == 1
    assert not any(line.startswith(b"event:") for line in s.raw.split(b"\n"))
    chunks = [json.loads(e[len(b"data: "):-2]) for e in events[:-1]]
    for e in events[:-1]:
        assert re.fullmatch(rb"data: [^\n]+\n\n", e), e
    with_choices = [c for c in chunks if c["choices"]]
    finals = [c for c in with_choices if c["choices"][0]["finish_reason"] is not None]
    assert len(finals) == 1 and finals[0] is with_choices[-1]
    assert all(c["choices"][0]["index"] == 0 for c in with_choices)
    assert b'"finish_reason": null' in events[0]
    expect_usage = bool(body.get("stream_options"))
    assert (chunks[-1]["choices"] == [] and "usage" in chunks[-1]) == expect_usage
    assert sum(1 for c in chunks if "usage" in c) == (1 if expect_usage else 0)
    kind = "chat.completion.chunk" if "chat" in path else "text_completion"
    assert {c["object"] for c in chunks} == {kind} and len({c["id"] for c in chunks}) == 1


# -- chat templates ------------------------------------------------------------------------

def test_chat_prompt_is_the_models_own_template(server, starter_model):
    """The prompt the server builds equals what the model's template renders (by llama-cpp-python's formatter)."""
    from koboldlite.engine.llama_model import LlamaModel
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    model = LlamaModel(starter_model, n_ctx=256, n_seq=1, n_threads=1, n_gpu_layers=0)
    source = model.metadata("tokenizer.chat_template")
    assert "<|im_start|>" in source
    reference = Jinja2ChatFormatter(source, eos_token="<|im_end|>", bos_token="<|im_start|>")(messages=CHAT).prompt
    assert reference.startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    assert reference.endswith("<|im_start|>assistant\n")
    expected = server.json("POST", "/tokenize", {"content": reference})["tokens"]
    r = server.json("POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 1})
    assert r["usage"]["prompt_tokens"] == len(expected)
    assert server.json("GET", "/props")["chat_template"] == source


def test_end_of_turn_stops_a_chat_reply(server):
    r = server.json("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Say OK."}],
                                                     "max_tokens": 200, "temperature": 0})
    assert r["choices"][0]["finish_reason"] == "stop"
    assert "<|im_end|>" not in r["choices"][0]["message"]["content"]
    assert server.json("GET", "/api/extra/perf")["stop_reason"] == 1


def test_chat_template_override(make_server, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]")
    s = make_server("--chat-template", str(template), tls=False)
    s.json("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    expected = s.json("POST", "/tokenize", {"content": "[user] hi\n[assistant]"})["tokens"]
    assert s.json("GET", "/api/extra/perf")["last_input_count"] == len(expected)
    assert any("chat template: " in line and "t.jinja" in line for line in s.lines)


# -- Ollama -----------------------------------------------------------------------------------

def ndjson(server, path, body):
    s = SSEStream(server, path, body)
    assert s.status == 200 and s.headers["content-type"] == "application/x-ndjson"
    lines = []
    while line := s.resp.readline():
        assert line.endswith(b"\n")
        lines.append(json.loads(line))
    return lines


def test_ollama_generate_stream_and_not(server):
    body = {"model": "whatever", "prompt": "Why is the sky blue?", "options": {"num_predict": 12, "seed": 6}}
    lines = ndjson(server, "/api/generate", body)
    assert all(not x["done"] and "response" in x for x in lines[:-1])
    last = lines[-1]
    assert last["done"] is True and last["done_reason"] == "length" and last["eval_count"] == 12
    for k in ("total_duration", "eval_duration", "prompt_eval_duration", "prompt_eval_count"):
        assert isinstance(last[k], int) and last[k] > 0, k
    assert last["eval_duration"] > 1_000_000     # nanoseconds: 12 tokens take milliseconds
    whole = server.json("POST", "/api/generate", {**body, "stream": False})
    assert whole["done"] is True and whole["response"] == "".join(x["response"] for x in lines)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", whole["created_at"])


def test_ollama_chat(server):
    body = {"model": "m", "messages": CHAT, "options": {"num_predict": 10, "seed": 2, "temperature": 0.5}}
    lines = ndjson(server, "/api/chat", body)
    assert all(x["message"]["role"] == "assistant" for x in lines)
    text = "".join(x["message"]["content"] for x in lines)
    whole = server.json("POST", "/api/chat", {**body, "stream": False})
    assert whole["message"]["content"] == text and whole["done"]
    status, _, err = server.request("POST", "/api/chat", {"messages": [{"role": "x"}]})
    assert status == 400 and "messages[0].role" in json.loads(err)["error"]


def test_ollama_json_format(server):
    """"format": "json" holds the reply to one JSON object, a JSON schema as the format to that schema: the whole
    reply parses. Each reply ends by itself, which the grammar allows only once the value is closed."""
    r = server.json("POST", "/api/generate", {"prompt": "A JSON list of two numbers:", "format": "json",
                                              "stream": False, "options": {"num_predict": 200, "seed": 1}})
    assert r["done_reason"] == "stop", r
    assert isinstance(json.loads(r["response"]), dict), r["response"]
    pair = {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}
    r = server.json("POST", "/api/generate", {"prompt": "A JSON list of two numbers:", "format": pair,
                                              "stream": False, "options": {"num_predict": 200, "seed": 1}})
    assert r["done_reason"] == "stop", r
    value = json.loads(r["response"])
    assert isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value), value


def test_ollama_metadata_endpoints(server):
    tags = server.json("GET", "/api/tags")["models"]
    assert tags[0]["name"] and tags[0]["size"] > 50_000_000 and tags[0]["details"]["format"] == "gguf"
    assert server.json("GET", "/api/version")["version"]
    assert server.json("GET", "/api/ps")["models"][0]["name"] == tags[0]["name"]
    show = server.json("POST", "/api/show", {"model": tags[0]["name"]})
    assert "<|im_start|>" in show["template"]
    assert server.json("POST", "/api/generate", {"model": "x"})["done_reason"] == "load"


# -- operational endpoints -------------------------------------------------------------------

def test_health_props_tokenize_metrics(server):
    assert server.json("GET", "/health") == {"status": "ok"}
    props = server.json("GET", "/props")
    assert props["default_generation_settings"]["n_ctx"] == 2048 and props["total_slots"] == 1
    ids = server.json("POST", "/tokenize", {"content": "Hello world"})["tokens"]
    assert server.json("POST", "/detokenize", {"tokens": ids}) == {"content": "Hello world"}
    pieces = server.json("POST", "/tokenize", {"content": "Hello world", "with_pieces": True})["tokens"]
    assert "".join(p["piece"] for p in pieces) == "Hello world"
    status, _, body = server.request("POST", "/detokenize", {"tokens": [10**9]})
    assert status == 400
    status, headers, body = server.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    values = dict(re.findall(r"^(koboldlite_\w+) ([\d.e+-]+)$", body.decode(), re.M))
    for name in ("requests_total", "prompt_tokens_total", "tokens_predicted_total", "queue_depth", "slots_busy"):
        assert f"koboldlite_{name}" in values
    assert float(values["koboldlite_tokens_predicted_total"]) > 0


def test_health_is_503_while_saturated(make_server):
    s = make_server("--multiuser", "0", tls=False)
    assert s.json("GET", "/health") == {"status": "ok"}
    stream = SSEStream(s, "/api/extra/generate/stream", {"prompt": "x", "max_length": 1500, "ban_eos_token": True})
    kobold_event_json(stream.next_event())
    status, _, body = s.request("GET", "/health")
    assert status == 503 and json.loads(body)["status"] == "busy"
    stream.close()


# -- same guarantees everywhere ------------------------------------------------------------------

LONG_OPENAI = {"max_tokens": 1500, "ban_eos_token": True}
DROPS = [
    ("/v1/chat/completions", {"messages": CHAT, "stream": True, **LONG_OPENAI}, b"data: "),
    ("/v1/completions", {"prompt": "Count:", "stream": True, **LONG_OPENAI}, b"data: "),
    ("/api/generate", {"prompt": "Count:", "options": {"num_predict": 1500, "ban_eos_token": True}}, b"{"),
    ("/api/chat", {"messages": CHAT, "options": {"num_predict": 1500, "ban_eos_token": True}}, b"{"),
]


@pytest.mark.parametrize("path, body, prefix", DROPS)
def test_dropped_stream_of_every_kind_stops_its_generation(server, path, body, prefix):
    key = "drop" + path.replace("/", "-")
    mark = server.mark()
    s = SSEStream(server, path, body, headers={"genkey": key})
    for _ in range(3):
        line = s.resp.readline()
        while line == b"\n":
            line = s.resp.readline()
        assert line.startswith(prefix), line
    s.close()
    server.wait_for_line(r"ended: abort", start=mark)
    text = server.json("POST", "/api/extra/generate/check", {"genkey": key})["results"][0]["text"]
    n = server.json("POST", "/api/extra/tokencount", {"prompt": text, "special": False})["value"]
    assert 2 <= n < 200, n


def test_kobold_abort_and_check_see_openai_generations(server):
    s = SSEStream(server, "/v1/chat/completions", {"messages": CHAT, "stream": True, **LONG_OPENAI,
                                                   "genkey": "oai-abort"})
    first = s.next_event()
    assert first.startswith(b"data: ")
    s.next_event()
    assert server.json("POST", "/api/extra/generate/check", {"genkey": "oai-abort"})["results"][0]["text"]
    assert server.json("POST", "/api/extra/abort", {"genkey": "oai-abort"})["success"] == "true"
    events = list(s.events())
    assert events[-1] == b"data: [DONE]\n\n"
    final = json.loads(events[-2][6:])
    assert final["choices"][0]["finish_reason"] == "stop"


def test_password_on_openai_and_ollama(make_server):
    s = make_server("--password", "pw", tls=False)
    for path, body in (("/v1/chat/completions", {"messages": CHAT, "max_tokens": 1}),
                       ("/v1/completions", {"prompt": "x", "max_tokens": 1}),
                       ("/completions", {"prompt": "x", "max_tokens": 1}),
                       ("/api/generate", {"prompt": "x", "options": {"num_predict": 1}}),
                       ("/api/chat", {"messages": CHAT, "options": {"num_predict": 1}}),
                       ("/tokenize", {"content": "x"}), ("/detokenize", {"tokens": [1]})):
        status, _, data = s.request("POST", path, body)
        assert status == 401, path
        assert s.request("POST", path, body, headers={"X-Api-Key": "pw"})[0] == 200, path
        assert s.request("POST", path, body, headers={"Authorization": "Bearer pw"})[0] == 200, path
    status, _, data = s.request("POST", "/v1/completions", {"prompt": "x"})
    assert status == 401 and json.loads(data)["error"]["code"] == "invalid_api_key"
    assert s.request("GET", "/health")[0] == 200
    assert s.request("GET", "/v1/models")[0] == 200


# -- a second real model: Gemma 3 270M, whose GGUF carries no chat template ------------------------

def test_model_without_template_falls_back_to_chatml(gemma_model):
    s = ServerProcess(["--model", gemma_model, "--contextsize", "512"])
    try:
        assert any("has none; using ChatML" in line for line in s.lines)
        assert "<|im_start|>" in s.json("GET", "/props")["chat_template"]
        r = s.json("POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 3})
        assert r["usage"]["completion_tokens"] >= 1
    finally:
        s.stop()


def test_gemma_template_with_its_own_bos_and_end_of_turn(gemma_model):
    s = ServerProcess(["--model", gemma_model, "--contextsize", "512", "--chat-template", "gemma"])
    try:
        expected = ("<bos><start_of_turn>user\nYou are terse.\n\nName three colours.<end_of_turn>\n"
                    "<start_of_turn>model\n")
        ids = s.json("POST", "/tokenize", {"content": expected})["tokens"]
        assert ids.count(ids[0]) == 1                       # one BOS: the template's, none added on top
        r = s.json("POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 1})
        assert r["usage"]["prompt_tokens"] == len(ids)
        end_of_turn = s.json("POST", "/tokenize", {"content": "<end_of_turn>"})["tokens"]
        assert len(end_of_turn) == 1
        # Forced to say end-of-turn first, the reply ends there: the template's end of turn stops it.
        r = s.json("POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 20,
                                                    "logit_bias": {str(end_of_turn[0]): 100}})
        assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 0
    finally:
        s.stop()
