"""KoboldCpp 1.102's samplers, its small endpoints, and no field dropped in silence: what each sampler field does
to a sampled text, tokenize and detokenize, what KoboldAI Lite reads before the password, ignored fields named.
All on the real starter model."""

from __future__ import annotations

import json

import pytest

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]
REPETITIVE = "The list: red, green, blue, red, green, blue, red, green, blue, red,"


def kobold_text(server, **body) -> str:
    return server.json("POST", "/api/v1/generate", body)["results"][0]["text"]


# -- samplers -------------------------------------------------------------------------------------

BASE = {"prompt": "Once upon a time, in a land far away,", "max_length": 24, "sampler_seed": 11,
        "temperature": 1.2, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "rep_pen": 1.0}
NEUTRAL = {"dry_multiplier": 0, "xtc_probability": 0, "xtc_threshold": 0.1, "dynatemp_range": 0,
           "dynatemp_exponent": 1, "nsigma": 0, "smoothing_factor": 0, "smoothing_curve": 1, "top_a": 0, "tfs": 1,
           "rep_pen_slope": 1, "min_tokens": 0, "sampler_order": [6, 0, 1, 3, 4, 2, 5],
           "dry_sequence_breakers": ["\n"]}


def test_neutral_values_change_nothing(server):
    plain = kobold_text(server, **BASE)
    assert kobold_text(server, **BASE, **NEUTRAL) == plain
    chat = {"messages": CHAT, "max_tokens": 16, "seed": 5, "temperature": 1.0}
    r1 = server.json("POST", "/v1/chat/completions", chat)
    r2 = server.json("POST", "/v1/chat/completions", {**chat, **NEUTRAL})
    assert r1["choices"][0]["message"]["content"] == r2["choices"][0]["message"]["content"]


@pytest.mark.parametrize("field, value", [
    ("dynatemp_range", 1.0), ("top_a", 0.5), ("tfs", 0.5), ("smoothing_factor", 2.0), ("nsigma", 1.0),
    ("xtc_probability", 1.0),
])
def test_each_sampler_changes_a_sampled_text(server, field, value):
    assert kobold_text(server, **BASE, **{field: value}) != kobold_text(server, **BASE)


def test_nsigma_near_zero_keeps_only_the_top_token(server):
    greedy = kobold_text(server, **{**BASE, "temperature": 0})
    assert kobold_text(server, **BASE, nsigma=0.0001) == greedy
    assert kobold_text(server, **BASE) != greedy


def test_xtc_at_probability_one_never_takes_the_top_candidate(server):
    one = {**BASE, "max_length": 1, "top_k": 2}
    top = kobold_text(server, **{**one, "temperature": 0})
    top_id = server.json("POST", "/api/extra/tokencount", {"prompt": top, "special": False})["ids"]
    assert len(top_id) == 1
    second = kobold_text(server, **{**one, "temperature": 0, "logit_bias": {str(top_id[0]): -100}})
    for seed in (1, 2, 3):
        # Both of the top-2 pass a threshold of 0: XTC removes all but the least likely, every time.
        assert kobold_text(server, **{**one, "sampler_seed": seed}, xtc_probability=1.0, xtc_threshold=0.0) == second
    assert second != top


def test_dry_cuts_verbatim_repetition(server):
    greedy = {"prompt": REPETITIVE, "max_length": 30, "temperature": 0}
    plain = kobold_text(server, **greedy)
    dry = kobold_text(server, **greedy, dry_multiplier=2.0, dry_base=1.75, dry_allowed_length=2)
    assert plain.count("red, green, blue") >= 3
    assert dry.count("red, green, blue") < plain.count("red, green, blue")
    # SillyTavern's breakers as a JSON-encoded string: the same as the array.
    as_string = kobold_text(server, **greedy, dry_multiplier=2.0, dry_sequence_breakers='["\\n", ":"]')
    as_array = kobold_text(server, **greedy, dry_multiplier=2.0, dry_sequence_breakers=["\n", ":"])
    assert as_string == as_array
    status, _, body = server.request("POST", "/api/v1/generate", {**greedy, "dry_sequence_breakers": {"a": 1}})
    assert status == 400 and "dry_sequence_breakers" in json.loads(body)["detail"]["msg"]


def test_rep_pen_slope_and_sampler_order(server):
    greedy = {"prompt": REPETITIVE, "max_length": 20, "temperature": 0, "rep_pen": 1.5, "rep_pen_range": 64}
    full = kobold_text(server, **greedy)
    assert kobold_text(server, **greedy, rep_pen_slope=0.0) != full
    assert kobold_text(server, **greedy, rep_pen_slope=1.0) == full
    # An order without 6 runs no repetition penalty at all, as in KoboldCpp.
    no_pen = kobold_text(server, **{**greedy, "rep_pen": 1.0})
    assert kobold_text(server, **greedy, sampler_order=[0, 1, 3, 4, 2, 5]) == no_pen != full
    status, _, _ = server.request("POST", "/api/v1/generate", {**greedy, "sampler_order": [9]})
    assert status == 400


def test_min_tokens_and_sillytavern_names(server):
    ask = {"messages": [{"role": "user", "content": "Say OK."}], "temperature": 0, "max_tokens": 60}
    short = server.json("POST", "/v1/chat/completions", ask)
    assert short["choices"][0]["finish_reason"] == "stop" and short["usage"]["completion_tokens"] < 20
    longer = server.json("POST", "/v1/chat/completions", {**ask, "min_tokens": 20})
    assert longer["usage"]["completion_tokens"] >= 20
    # grammar_string is SillyTavern's name for grammar; truncation_length for max_context_length.
    r = server.json("POST", "/v1/completions", {"prompt": "Answer:", "max_tokens": 5, "grammar_string": 'root ::= "yes"'})
    assert r["choices"][0]["text"] == "yes"
    server.json("POST", "/api/v1/generate", {"prompt": "word " * 300, "max_length": 10, "truncation_length": 128})
    assert server.json("GET", "/api/extra/perf")["last_input_count"] == 118


# -- small endpoints --------------------------------------------------------------------------------

def test_tokenize_detokenize_and_json_to_grammar(server):
    counted = server.json("POST", "/api/extra/tokencount", {"prompt": "Hello there, world"})
    assert server.json("POST", "/api/extra/tokenize", {"prompt": "Hello there, world"}) == counted
    back = server.json("POST", "/api/extra/detokenize", {"ids": counted["ids"]})
    assert back == {"result": "Hello there, world", "success": True}
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    grammar = server.json("POST", "/api/extra/json_to_grammar", {"schema": schema})
    assert grammar["success"] is True and "root" in grammar["result"]
    text = kobold_text(server, prompt="JSON:", max_length=30, temperature=0, grammar=grammar["result"])
    assert isinstance(json.loads(text)["ok"], bool)
    assert server.json("GET", "/sdapi/v1/sd-models") == []


def test_what_lite_reads_before_the_password(make_server):
    s = make_server("--password", "pw")
    assert s.json("GET", "/api/extra/preloadstory") == {}
    assert s.json("GET", "/api/v1/model")["result"] == "koboldcpp/protected-model"
    assert s.json("GET", "/sdapi/v1/sd-models") == []
    assert s.request("POST", "/api/extra/detokenize", {"ids": [1]})[0] == 401


# -- nothing dropped in silence -----------------------------------------------------------------------

def test_ignored_fields_are_named_in_a_header_and_the_log(server):
    mark = server.mark()
    status, headers, _ = server.request("POST", "/api/v1/generate", {
        "prompt": "Hi", "max_length": 2, "images": ["aGk="], "n": 2, "use_story": True, "use_memory": False,
        "dry_multiplier": 0.5, "banned_tokens": ["shivers down her spine"], "unknown_thing": 1})
    assert status == 200 and headers["x-koboldlite-ignored"] == "images,n,use_story"
    server.wait_for_line(r"ignored fields: images, n, use_story(,|$)", start=mark)
    status, headers, _ = server.request("POST", "/api/v1/generate", {"prompt": "Hi", "max_length": 2, "n": 1,
                                                                     "images": [], "xtc_probability": 0.5})
    assert status == 200 and "x-koboldlite-ignored" not in headers
    _, headers, _ = server.request("POST", "/v1/chat/completions", {
        "messages": CHAT, "max_tokens": 2, "tools": [{"type": "function", "function": {"name": "f"}}],
        "logprobs": True, "tool_choice": "auto", "echo": True})
    assert headers["x-koboldlite-ignored"] == "echo"            # tools are honoured (test_tools_...)
    # keep_alive is honoured (tests/test_models.py); -1 keeps this shared server's model loaded as before.
    _, headers, _ = server.request("POST", "/api/chat", {"messages": CHAT, "stream": False, "keep_alive": "-1",
                                                         "options": {"num_predict": 2, "num_thread": 4}})
    assert headers["x-koboldlite-ignored"] == "options.num_thread"
    assert "X-KoboldLite-Ignored" in server.request("OPTIONS", "/api/v1/generate", headers={
        "Origin": "https://lite.koboldai.net", "Access-Control-Request-Method": "POST"})[1][
        "access-control-expose-headers"]
