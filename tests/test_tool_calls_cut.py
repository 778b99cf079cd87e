"""Tool calls that stay tool calls (issue 37, item 1), with the official SDKs against the real server: a forced call
that its length limit stops still arrives as a call (its name, the arguments written so far) with the API's length
stop reason, never as text; a call forced by name is one call; streamed and whole agree. Sampled as the SDKs send
it (no temperature: the server's default sampling), over many seeds, at lengths that cut the call and that do not.

What this can show: the server never hands a forced call's JSON to a client as text, whatever the model writes.
What it cannot: whether a call's arguments are sensible (the 135M starter model's are often not)."""

from __future__ import annotations

import json

import pytest

from tests.harness import openai_client_for
from tests.test_agent_apis import WEATHER, anthropic_client_for

SEEDS = range(1, 9)
ASK = "What is the weather in Paris and in Oslo?"
OPENAI_WEATHER = {"type": "function", "function": {"name": WEATHER["name"], "description": WEATHER["description"],
                                                   "parameters": WEATHER["input_schema"]}}


def no_call_as_text(text: str | None):
    assert not text or ("get_weather" not in text and "tool_call" not in text and "{" not in text), text


def anthropic_reply_shape(message):
    """One tool_use block, get_weather's, and no text that carries a call."""
    for block in message.content:
        if block.type == "text":
            no_call_as_text(block.text)
    calls = [b for b in message.content if b.type == "tool_use"]
    assert len(calls) == 1, [b.type for b in message.content]   # forced by name, parallel not asked for
    assert calls[0].name == "get_weather" and isinstance(calls[0].input, dict)


@pytest.mark.parametrize("max_tokens", [6, 14, 160])
def test_anthropic_forced_call_cut_or_whole_is_one_call_streamed_and_not(server, max_tokens):
    client = anthropic_client_for(server)
    reasons = set()
    for seed in SEEDS:
        ask = dict(model="m", max_tokens=max_tokens, tools=[WEATHER], messages=[{"role": "user", "content": ASK}],
                   tool_choice={"type": "tool", "name": "get_weather"}, extra_body={"seed": seed})
        made = client.messages.create(**ask)
        with client.messages.stream(**ask) as stream:
            streamed = stream.get_final_message()
        for message in (made, streamed):
            assert message.stop_reason in ("tool_use", "max_tokens")
            if message.stop_reason == "max_tokens":
                assert message.usage.output_tokens == max_tokens
            else:
                assert message.usage.output_tokens < max_tokens
            anthropic_reply_shape(message)
            reasons.add(message.stop_reason)
        assert [b.type for b in made.content] == [b.type for b in streamed.content]
    if max_tokens == 6:
        assert reasons == {"max_tokens"}            # 6 tokens never hold a whole call: every one was cut


@pytest.mark.parametrize("max_tokens", [6, 160])
def test_openai_named_function_cut_or_whole_is_one_call_streamed_and_not(server, max_tokens):
    client = openai_client_for(server)
    for seed in SEEDS:
        ask = dict(model="m", max_tokens=max_tokens, tools=[OPENAI_WEATHER], seed=seed,
                   messages=[{"role": "user", "content": ASK}],
                   tool_choice={"type": "function", "function": {"name": "get_weather"}})
        made = client.chat.completions.create(**ask).choices[0]
        chunks = list(client.chat.completions.create(**ask, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        streamed_calls = [tc for d in deltas for tc in (d.tool_calls or [])]
        no_call_as_text("".join(d.content or "" for d in deltas))
        no_call_as_text(made.message.content)
        assert len(made.message.tool_calls) == 1 and len(streamed_calls) == 1
        for call in (made.message.tool_calls[0], streamed_calls[0]):
            assert call.function.name == "get_weather"
            assert isinstance(json.loads(call.function.arguments), dict)   # cut or not, arguments parse
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish == [made.finish_reason] and made.finish_reason in ("tool_calls", "length")
        if max_tokens == 6:
            assert made.finish_reason == "length"


def test_responses_forced_call_cut_is_an_incomplete_function_call(server):
    client = openai_client_for(server)
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER["input_schema"]}
    for seed in SEEDS[:4]:
        ask = dict(model="m", input=ASK, tools=[tool], max_output_tokens=16,
                   tool_choice={"type": "function", "name": "get_weather"}, extra_body={"seed": seed})
        made = client.responses.create(**ask)
        # The SDK's stream helper wants response.completed; a cut response ends with response.incomplete.
        ends = [e for e in client.responses.create(**ask, stream=True)
                if e.type in ("response.completed", "response.incomplete")]
        assert len(ends) == 1 and ends[0].type == f"response.{made.status}"
        streamed = ends[0].response
        for response in (made, streamed):
            kinds = [o.type for o in response.output]
            assert kinds.count("function_call") == 1 and "message" not in kinds, kinds
            call = next(o for o in response.output if o.type == "function_call")
            assert call.name == "get_weather" and isinstance(json.loads(call.arguments), dict)
            assert response.status in ("completed", "incomplete")


def test_required_call_may_be_several_and_a_cut_one_is_never_text(server):
    client = anthropic_client_for(server)
    for seed in SEEDS[:4]:
        message = client.messages.create(model="m", max_tokens=40, tools=[WEATHER], tool_choice={"type": "any"},
                                         messages=[{"role": "user", "content": ASK}], extra_body={"seed": seed})
        for block in message.content:
            if block.type == "text":
                no_call_as_text(block.text)
        calls = [b for b in message.content if b.type == "tool_use"]
        assert message.stop_reason in ("tool_use", "max_tokens")
        assert 1 <= len(calls) <= 4 or message.stop_reason == "max_tokens"
