"""Phrase bans that take the phrase back, and logprobs on every API (issue 13), on the real starter model."""

from __future__ import annotations

import json
import math

import pytest

from tests.harness import SSEStream, in_thread, kobold_event_json, openai_client_for, result_of

SEA = "{{[INPUT]}}Write one sentence about the sea.{{[OUTPUT]}}"
GREEDY = {"prompt": SEA, "max_length": 40, "temperature": 0}
PHRASE = "vast and mysterious"       # the greedy reply says "The sea is a vast and mysterious realm..."


def generate(server, **body) -> str:
    return server.json("POST", "/api/v1/generate", body)["results"][0]["text"]


def stream_text(server, path, body) -> tuple[str, list[str]]:
    s = SSEStream(server, path, body)
    pieces = [kobold_event_json(e)["token"] for e in s.events()]
    return "".join(pieces), pieces


# -- phrase bans -----------------------------------------------------------------------------

def test_a_banned_phrase_is_taken_back_and_never_shown(server):
    plain = generate(server, **GREEDY)
    assert PHRASE in plain
    start = plain.index(PHRASE)
    banned = generate(server, **GREEDY, banned_tokens=["Vast And Mysterious"])    # any case
    assert PHRASE not in banned.lower()
    assert banned[:start] == plain[:start]               # the same up to where the phrase began
    assert len(banned) > start + 20                      # and the reply goes on
    streamed, pieces = stream_text(server, "/api/extra/generate/stream",
                                   {**GREEDY, "banned_tokens": [PHRASE]})
    # Streams only append: had any part of the phrase been shown, it would still be in the text.
    assert streamed == banned and PHRASE not in streamed.lower()
    # SillyTavern's name, on the OpenAI API too.
    r = server.json("POST", "/v1/completions", {"prompt": SEA, "max_tokens": 40, "temperature": 0,
                                                "banned_strings": [PHRASE]})
    assert r["choices"][0]["text"] == banned


def test_phrases_as_given_and_many_of_them(server):
    plain = generate(server, **GREEDY)
    # A leading space is part of the phrase: " vast and" is there, "xvast and" is not.
    assert generate(server, **GREEDY, banned_tokens=["xvast and"]) == plain
    assert " vast and" not in generate(server, **GREEDY, banned_tokens=[" vast and"])
    many = [f"phrase number {i} that never comes" for i in range(300)] + [PHRASE]
    assert PHRASE not in generate(server, **GREEDY, banned_tokens=many).lower()


def test_a_ban_with_no_way_out_ends_cleanly(server):
    r = server.json("POST", "/api/v1/generate", {"prompt": "Answer:", "max_length": 10,
                                                 "grammar": 'root ::= "yes"', "banned_tokens": ["yes"]})
    assert r["results"][0] == {"text": "", "finish_reason": "stop"}
    # Nor can a grammar whose every token is banned bring the server down.
    yes = server.json("POST", "/api/extra/tokencount", {"prompt": "yes", "special": False})["ids"]
    r = server.json("POST", "/api/v1/generate", {"prompt": "Answer:", "max_length": 10, "grammar": 'root ::= "yes"',
                                                 "logit_bias": {str(t): -1e9 for t in yes}})
    assert r["results"][0]["finish_reason"] == "stop"
    # And the next request is served. (End of text banned: unbanned, this prompt ends at once about one
    # time in seven, with an empty text.)
    assert generate(server, prompt="Still here?", max_length=3, ban_eos_token=True)


def test_a_ban_with_grammar_and_repetition_penalty(server):
    grammar = 'root ::= "The sea is a " word " and " word " realm."\nword ::= [a-z]+'
    body = {**GREEDY, "grammar": grammar, "rep_pen": 1.1, "dry_multiplier": 0.5}
    plain = generate(server, **body)
    assert plain.startswith("The sea is a ") and plain.endswith(" realm.")
    banned = generate(server, **body, banned_tokens=[plain.split(" and ")[0][len("The sea is a "):] + " and"])
    assert banned != plain and banned.startswith("The sea is a ") and banned.endswith(" realm.")


def test_a_ban_in_one_slot_leaves_the_others_alone(make_server):
    # --kvperslot: a fixed seed gives the same text beside others there (in the shared pool it may not,
    # see the README), which is what tells the other slots' output is unchanged.
    s = make_server("--parallel", "3", "--kvperslot")
    body = {"prompt": "Once upon a time", "max_length": 30, "sampler_seed": 9, "temperature": 0.8}
    alone = generate(s, **body)
    pending = [in_thread(generate, s, **body, banned_tokens=[alone.split()[2]]),
               in_thread(generate, s, **body), in_thread(generate, s, **body)]
    results = [result_of(q) for q in pending]
    assert results[1] == alone and results[2] == alone
    assert alone.split()[2].lower() not in results[0].lower()


# -- logprobs ------------------------------------------------------------------------------------

def check_entry(token, logprob, tops):
    """Greedy: the chosen token is the most likely one; alternatives' probabilities sum to at most 1."""
    assert tops[0][0] == token and math.isclose(tops[0][1], logprob, abs_tol=1e-6)
    assert sum(math.exp(lp) for _, lp in tops) <= 1 + 1e-6
    assert [lp for _, lp in tops] == sorted((lp for _, lp in tops), reverse=True)


def test_kobold_logprobs_and_last_logprobs_by_genkey(server):
    r = server.json("POST", "/api/v1/generate", {**GREEDY, "max_length": 6, "logprobs": True, "genkey": "LP-a",
                                                 "temperature": 0.7, "top_k": 3, "sampler_seed": 2})
    lp = r["results"][0]["logprobs"]
    assert len(lp["content"]) == 6 == len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"])
    assert "".join(lp["tokens"]) == r["results"][0]["text"]
    for item in lp["content"]:
        # After the samplers (top-k 3): at most 3 alternatives whose probabilities sum to 1.
        assert 1 <= len(item["top_logprobs"]) <= 3
        assert math.isclose(sum(math.exp(t["logprob"]) for t in item["top_logprobs"]), 1.0, abs_tol=1e-4)
        assert item["token"] in [t["token"] for t in item["top_logprobs"]]
    assert server.json("POST", "/api/extra/last_logprobs", {"genkey": "LP-a"}) == {"logprobs": lp}
    server.json("POST", "/api/v1/generate", {"prompt": "Other", "max_length": 2, "genkey": "LP-b"})
    assert server.json("POST", "/api/extra/last_logprobs", {"genkey": "LP-b"}) == {"logprobs": None}
    assert server.json("POST", "/api/extra/last_logprobs", {"genkey": "LP-a"}) == {"logprobs": lp}
    assert server.json("POST", "/api/extra/last_logprobs", {}) == {"logprobs": None}
    assert "logprobs" not in server.json("POST", "/api/v1/generate", {**GREEDY, "max_length": 2})["results"][0]


@pytest.fixture(scope="module")
def client(server):
    return openai_client_for(server)


def test_openai_completion_logprobs_legacy_shape(client):
    kw = dict(model="x", prompt="The sky is", max_tokens=8, temperature=0, logprobs=3)
    r = client.completions.create(**kw)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.tokens) == 8
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    for token, logprob, tops in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(tops) == 3
        check_entry(token, logprob, list(tops.items()))
    chunks = list(client.completions.create(stream=True, **kw))
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset


def test_openai_chat_logprobs_streamed_and_not(client):
    kw = dict(model="x", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, temperature=0,
              logprobs=True, top_logprobs=4)
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert bytes(c.bytes) == c.token.encode() and len(c.top_logprobs) == 4
        check_entry(c.token, c.logprob, [(t.token, t.logprob) for t in c.top_logprobs])
    chunks = list(client.chat.completions.create(stream=True, **kw))
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
    plain = client.chat.completions.create(**{**kw, "logprobs": False})
    assert plain.choices[0].logprobs is None


def test_ollama_logprobs(server):
    # Greedy with Ollama's default repeat penalty off: the model's top token is then the one chosen.
    body = {"messages": [{"role": "user", "content": "Name a colour."}],
            "options": {"num_predict": 5, "temperature": 0, "repeat_penalty": 1.0},
            "logprobs": True, "top_logprobs": 2, "stream": False}
    r = server.json("POST", "/api/chat", body)
    assert len(r["logprobs"]) == 5
    assert "".join(x["token"] for x in r["logprobs"]) == r["message"]["content"]
    for x in r["logprobs"]:
        check_entry(x["token"], x["logprob"], [(t["token"], t["logprob"]) for t in x["top_logprobs"]])
    s = SSEStream(server, "/api/chat", {**body, "stream": True})
    lines = [json.loads(line) for line in s.resp]
    assert [x["token"] for line in lines for x in line.get("logprobs", [])] == [x["token"] for x in r["logprobs"]]
