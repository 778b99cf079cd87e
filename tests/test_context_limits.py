"""How much of a prompt is kept, how long a reply may be, and the errors around them (issue 17)."""

from __future__ import annotations

import json

import pytest

from tests.harness import ServerProcess, openai_client_for

CTX = 512
CHAT = [{"role": "system", "content": "You are a helpful assistant who answers in one short sentence."},
        {"role": "user", "content": "What is the capital of France, and why is it famous?"}]


@pytest.fixture(scope="module")
def small(starter_model, tls_files):
    s = ServerProcess(["--model", starter_model, "--ssl", *tls_files, "--contextsize", str(CTX)], cert=tls_files[0])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def openai_client(small):
    return openai_client_for(small)


def rendered_tokens(server, messages) -> list[int]:
    prompt = server.json("POST", "/apply-template", {"messages": messages})["prompt"]
    return server.json("POST", "/tokenize", {"content": prompt})["tokens"]


def test_chat_without_max_tokens_keeps_every_prompt_token(small, openai_client):
    expected = len(rendered_tokens(small, CHAT))
    assert expected > 30
    r = openai_client.chat.completions.create(model="x", messages=CHAT, temperature=0)
    assert r.usage.prompt_tokens == expected
    assert small.json("GET", "/api/extra/perf")["last_input_count"] == expected
    # Streamed, with usage: the same.
    chunks = list(openai_client.chat.completions.create(model="x", messages=CHAT, temperature=0, stream=True,
                                                         stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens == expected


def test_ollama_without_num_predict_keeps_every_prompt_token(small):
    expected = len(rendered_tokens(small, CHAT))
    r = small.json("POST", "/api/chat", {"messages": CHAT, "stream": False, "options": {"temperature": 0}})
    assert r["prompt_eval_count"] == expected
    generate = small.json("POST", "/api/generate", {"prompt": CHAT[1]["content"], "system": CHAT[0]["content"],
                                                    "stream": False, "options": {"temperature": 0}})
    assert generate["prompt_eval_count"] == expected


def test_over_large_max_tokens_never_cuts_the_prompt(small, openai_client):
    prompt = "Here is a list of fruit: " + ", ".join(["apple", "pear", "plum", "fig"] * 40)
    n_prompt = len(small.json("POST", "/tokenize", {"content": prompt})["tokens"])
    assert 100 < n_prompt < CTX - 50
    # -1 is llama.cpp's "no limit": until the context is full.
    r = openai_client.completions.create(model="x", prompt=prompt, max_tokens=-1,
                                         extra_body={"ban_eos_token": True})
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens == CTX - n_prompt
    assert r.choices[0].finish_reason == "length"
    # A length past the context: the whole prompt is read, and the reply goes on by context shift
    # (without it, it would stop at the full context: see test_context_shift).
    r = openai_client.completions.create(model="x", prompt=prompt, max_tokens=490,
                                         extra_body={"ban_eos_token": True})
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens == 490


@pytest.mark.parametrize("value", [0, -2, -100])
def test_max_tokens_below_one_is_a_400(small, openai_client, value):
    import openai
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(model="x", messages=CHAT, max_tokens=value)
    assert "max_tokens" in e.value.body["message"]
    status, _, body = small.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": value})
    assert status == 400 and "max_tokens" in json.loads(body)["error"]["message"]


def test_prompt_longer_than_the_context_is_a_400_with_both_numbers(small, openai_client):
    import openai
    long_text = "word " * 700
    n = len(rendered_tokens(small, [{"role": "user", "content": long_text}]))
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(model="x", messages=[{"role": "user", "content": long_text}])
    err = e.value.body
    assert err["type"] == "exceed_context_size_error" and err["code"] == "context_length_exceeded"
    assert err["n_prompt_tokens"] == n and err["n_ctx"] == CTX
    assert str(n) in err["message"] and str(CTX) in err["message"]
    assert "exceeds the available context size" in err["message"]
    status, _, body = small.request("POST", "/v1/completions", {"prompt": long_text, "stream": True})
    assert status == 400 and json.loads(body)["error"]["n_ctx"] == CTX
    status, _, body = small.request("POST", "/api/chat", {"messages": [{"role": "user", "content": long_text}]})
    assert status == 400 and str(CTX) in json.loads(body)["error"] and str(n) in json.loads(body)["error"]
    # The server goes on serving.
    assert openai_client.completions.create(model="x", prompt="Hi", max_tokens=2).usage.completion_tokens >= 1


def test_kobold_keeps_koboldcpps_front_cut_and_says_so(small):
    mark = small.mark()
    prompt = "word " * 700 + "THE END"
    small.json("POST", "/api/v1/generate", {"prompt": prompt, "max_length": 40})
    perf = small.json("GET", "/api/extra/perf")
    assert perf["last_input_count"] == CTX - 40 and perf["truncated"] is True
    assert perf["last_truncated_count"] == len(small.json("POST", "/tokenize", {"content": prompt})["tokens"]) - (CTX - 40)
    small.wait_for_line(r"oldest prompt tokens cut to fit the context", start=mark)
    # An over-large max_length takes at most half the context from a story.
    story = "Once upon a time " * 40
    n_story = len(small.json("POST", "/tokenize", {"content": story})["tokens"])
    assert n_story < CTX // 2
    small.json("POST", "/api/v1/generate", {"prompt": story, "max_length": 490, "genkey": "big",
                                            "ban_eos_token": True})
    perf = small.json("GET", "/api/extra/perf")
    assert perf["last_input_count"] == n_story and perf["last_truncated_count"] == 0
    assert perf["last_token_count"] == 490


def test_unauthorized_in_openai_words_and_the_open_endpoints(make_server):
    import openai
    s = make_server("--password", "pw")
    client = openai_client_for(s, api_key="wrong")
    with pytest.raises(openai.AuthenticationError) as e:
        client.chat.completions.create(model="x", messages=CHAT, max_tokens=1)
    assert e.value.body["type"] == "authentication_error" and e.value.body["code"] == "invalid_api_key"
    assert [m.id for m in client.models.list().data]     # /v1/models stays open, as llama-server's
    opened = [("GET", "/health"), ("GET", "/health/live"), ("GET", "/v1/models"), ("GET", "/models"),
              ("GET", "/api/tags"), ("GET", "/api/version"), ("GET", "/api/extra/version"),
              ("GET", "/api/v1/model"), ("GET", "/api/v1/info/version"), ("GET", "/api/v1/config/max_length"),
              ("GET", "/api/v1/config/max_context_length"), ("GET", "/api/extra/true_max_context_length"),
              ("GET", "/api/extra/perf"), ("GET", "/")]
    for method, path in opened:
        assert s.request(method, path)[0] == 200, path
    closed = [("GET", "/props", None), ("GET", "/metrics", None), ("GET", "/api/ps", None),
              ("POST", "/api/show", {}), ("POST", "/tokenize", {"content": "x"}),
              ("POST", "/detokenize", {"tokens": [1]}), ("POST", "/apply-template", {"messages": CHAT}),
              ("POST", "/api/extra/tokencount", {"prompt": "x"}), ("POST", "/api/extra/generate/check", {}),
              ("POST", "/api/extra/abort", {}), ("POST", "/api/v1/generate", {"prompt": "x", "max_length": 2}),
              ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2}),
              ("POST", "/api/generate", {"prompt": "x", "options": {"num_predict": 2}})]
    for method, path, body in closed:
        assert s.request(method, path, body)[0] == 401, path
        assert s.request(method, path, body, headers={"Authorization": "Bearer pw"})[0] == 200, path


def test_tokenize_pieces_carry_bytes_and_round_trip_special_tokens(small):
    text = "llama 🦙 ok"
    pieces = small.json("POST", "/tokenize", {"content": text, "with_pieces": True})["tokens"]
    as_bytes = [p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces]
    assert any(isinstance(p["piece"], list) for p in pieces), pieces     # the emoji is split over byte tokens
    assert b"".join(as_bytes) == text.encode()
    special = "<|im_start|>user\nhello<|im_end|>\n"
    ids = small.json("POST", "/tokenize", {"content": special})["tokens"]
    assert len(ids) < len(small.json("POST", "/tokenize", {"content": special, "parse_special": False})["tokens"])
    assert small.json("POST", "/detokenize", {"tokens": ids})["content"] == special
