"""The Anthropic Messages API and the OpenAI Responses API (issue 24), with the official `anthropic` and
`openai` SDKs against the real server, and their streams read byte by byte."""

from __future__ import annotations

import json
import re

import pytest

from koboldlite.generation import GenerationRequest
from koboldlite.jobs import Job, StopReason
from koboldlite.api.reply import ReplyReader
from koboldlite.api.anthropic import AnthropicEncoder, anthropic_messages
from koboldlite.api.responses import ResponsesEncoder
from tests.harness import SSEStream, openai_client_for

SEEDED = {"seed": 11, "top_k": 1}          # greedy: the same text cold or cached (README: Determinism)
WEATHER = {"name": "get_weather", "description": "The weather in a city now.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"},
                                                             "unit": {"enum": ["celsius", "fahrenheit"]}},
                            "required": ["city", "unit"]}}


def anthropic_client_for(server, api_key: str = "sk-ant-dummy", **kw):
    import anthropic
    try:
        import httpx2 as httpx       # the newest SDKs' HTTP library
    except ImportError:
        import httpx
    return anthropic.Anthropic(base_url=f"{server.scheme}://127.0.0.1:{server.port}", api_key=api_key,
                               http_client=httpx.Client(verify=server.ssl_context() or True), max_retries=0, **kw)


def sse_events(raw: bytes) -> list[tuple[str, dict]]:
    """(event name, data) of each event; every event must have both lines, with the same type. Comment lines
    (keep-alives) are passed over, as SSE parsers do."""
    out = []
    for block in raw.decode().split("\n\n"):
        if not block.strip() or block.startswith(":"):
            continue
        m = re.fullmatch(r"event: (\S+)\ndata: (.*)", block)
        assert m, f"not an `event:` + `data:` SSE event: {block!r}"
        data = json.loads(m.group(2))
        assert data["type"] == m.group(1), block
        out.append((m.group(1), data))
    return out


def last_job_ended(server, mark: int) -> re.Match:
    return server.wait_for_line(r"job (\d+) ended: (\w+), (\d+) prompt tokens \((\d+) cached\).*?(\d+) generated",
                                start=mark)


# -- Anthropic Messages --------------------------------------------------------------------------------

def test_anthropic_create_and_stream_agree(server):
    client = anthropic_client_for(server)
    ask = dict(model="any", max_tokens=24, system="You are terse.", extra_body=SEEDED,
               messages=[{"role": "user", "content": "Name three colours."}])
    made = client.messages.create(**ask)
    assert made.type == "message" and made.role == "assistant" and made.id.startswith("msg_")
    assert made.model == server.json("GET", "/v1/models")["data"][0]["id"]
    text = "".join(b.text for b in made.content if b.type == "text")
    assert text and made.stop_reason in ("end_turn", "max_tokens")
    with client.messages.stream(**ask) as stream:
        streamed_text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed_text == text == "".join(b.text for b in final.content if b.type == "text")
    assert final.stop_reason == made.stop_reason
    assert final.usage.output_tokens == made.usage.output_tokens > 0
    total = lambda u: u.input_tokens + u.cache_read_input_tokens    # noqa: E731
    assert total(final.usage) == total(made.usage) > 0
    assert final.usage.cache_read_input_tokens > 0          # the second read found the first one's cache


def test_anthropic_stream_event_sequence(server):
    s = SSEStream(server, "/v1/messages?beta=true", {"model": "m", "max_tokens": 12, "stream": True, **SEEDED,
                                                     "messages": [{"role": "user", "content": "Hello!"}]},
                  headers={"x-api-key": "k", "anthropic-version": "2023-06-01", "anthropic-beta": "tools-2024"})
    assert s.status == 200 and s.headers["content-type"] == "text/event-stream"
    events = sse_events(b"".join(s.events()))
    names = [n for n, _ in events if n != "ping"]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert "ping" in [n for n, _ in events]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] > 0
    body = names[1:-2]
    assert body[0] == "content_block_start" and body[-1] == "content_block_stop"
    assert set(body[1:-1]) == {"content_block_delta"}
    deltas = [d["delta"] for n, d in events if n == "content_block_delta"]
    assert all(d["type"] == "text_delta" for d in deltas) and "".join(d["text"] for d in deltas)
    delta = next(d for n, d in events if n == "message_delta")
    assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens") and delta["usage"]["output_tokens"] > 0


def test_anthropic_stop_sequence(server):
    client = anthropic_client_for(server)
    ask = dict(model="m", max_tokens=40, extra_body=SEEDED,
               messages=[{"role": "user", "content": "Write a sentence about the sea."}])
    text = client.messages.create(**ask).content[0].text
    word = re.findall(r"[A-Za-z]{3,}", text)[2]          # a word in the middle of the reply
    stopped = client.messages.create(**ask, stop_sequences=["@@never@@", word])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == word
    assert word not in stopped.content[0].text and text.startswith(stopped.content[0].text)


def test_anthropic_count_tokens_is_the_prompt_read(server):
    client = anthropic_client_for(server)
    ask = dict(model="m", system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
               tools=[WEATHER], messages=[{"role": "user", "content": "Weather in Oslo?"}])
    counted = client.messages.count_tokens(**ask).input_tokens
    made = client.messages.create(max_tokens=4, **ask)
    assert counted == made.usage.input_tokens + made.usage.cache_read_input_tokens
    bare = client.messages.count_tokens(model="m", messages=[{"role": "user", "content": "Weather in Oslo?"}])
    assert bare.input_tokens < counted             # the tools and the system prompt are in it


def test_anthropic_forced_tool_call_and_its_result(server):
    client = anthropic_client_for(server)
    # Greedy: sampled freely, the 135M model may spin the city's string out to max_tokens (CI saw it once).
    ask = dict(model="m", max_tokens=120, tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"},
               extra_body=SEEDED, messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    made = client.messages.create(**ask)
    assert made.stop_reason == "tool_use"
    call = next(b for b in made.content if b.type == "tool_use")
    assert call.name == "get_weather" and call.id.startswith("toolu_")
    assert isinstance(call.input, dict) and isinstance(call.input["city"], str)
    assert call.input["unit"] in ("celsius", "fahrenheit")
    with client.messages.stream(**ask) as stream:
        final = stream.get_final_message()
    streamed = next(b for b in final.content if b.type == "tool_use")
    assert final.stop_reason == "tool_use" and streamed.name == call.name and streamed.input == call.input

    def with_result(content: str) -> list:
        return ask["messages"] + [
            {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name,
                                               "input": call.input}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": content}]}]
    short = client.messages.count_tokens(model="m", tools=[WEATHER], messages=with_result("Sunny."))
    longer = client.messages.count_tokens(model="m", tools=[WEATHER],
                                          messages=with_result("Sunny. Zanzibar quokka marmalade."))
    assert longer.input_tokens - short.input_tokens >= 5       # the result's text is in the prompt
    answer = client.messages.create(model="m", max_tokens=16, tools=[WEATHER], messages=with_result("Sunny, 21 C."))
    assert answer.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_anthropic_messages_as_the_template_reads_them():
    body = {"system": [{"type": "text", "text": "S1"}, {"type": "text", "text": "S2"}], "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "x"},
                                          {"type": "text", "text": "Let me look."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                                      "content": [{"type": "text", "text": "boom"}]},
                                     {"type": "text", "text": "Try again."}]}]}
    assert anthropic_messages(body) == [
        {"role": "system", "content": "S1\nS2"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Let me look.", "reasoning_content": "hmm",
         "tool_calls": [{"id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Error: boom", "name": "f"},
        {"role": "user", "content": "Try again."}]


def test_anthropic_errors_are_the_sdks_typed_exceptions(server, make_server):
    import anthropic
    client = anthropic_client_for(server)
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="m", max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
    assert "text only" in str(e.value) and e.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError) as e:
        client.post("/v1/messages", cast_to=object, body={"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert "max_tokens" in str(e.value)
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="m", max_tokens=8, messages=[{"role": "user", "content": "word " * 2100}])
    assert re.match(r"prompt is too long: \d+ tokens > 2048 maximum", e.value.body["error"]["message"])
    with pytest.raises(anthropic.NotFoundError) as e:
        client.post("/v1/messages/batches", cast_to=object, body={})
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "not_found_error"
    locked = make_server("--password", "pw", "--multiuser", "0")
    with pytest.raises(anthropic.AuthenticationError):
        anthropic_client_for(locked, api_key="wrong").messages.create(
            model="m", max_tokens=2, messages=[{"role": "user", "content": "x"}])
    # Both ways of sending the key: x-api-key (the SDK's) and Authorization: Bearer (Claude Code's auth token).
    for client in (anthropic_client_for(locked, api_key="pw"),
                   anthropic_client_for(locked, api_key=None, auth_token="pw")):
        assert client.messages.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "x"}]).content
    # A full queue is Anthropic's 529, overloaded.
    stream = SSEStream(locked, "/v1/messages", {"model": "m", "max_tokens": 400, "stream": True, "ban_eos_token": True,
                                                "messages": [{"role": "user", "content": "Tell a long story."}]},
                       headers={"x-api-key": "pw"})
    stream.next_event()
    with pytest.raises(anthropic.OverloadedError):
        anthropic_client_for(locked, api_key="pw").messages.create(
            model="m", max_tokens=2, messages=[{"role": "user", "content": "x"}])
    stream.close()


def test_anthropic_disconnect_stops_the_generation(make_server):
    s = make_server()
    mark = s.mark()
    stream = SSEStream(s, "/v1/messages", {"model": "m", "max_tokens": 1500, "stream": True, "ban_eos_token": True,
                                           "messages": [{"role": "user", "content": "Tell a very long story."}]})
    while b"content_block_delta" not in (stream.next_event() or b"content_block_delta"):
        pass
    stream.close()
    ended = last_job_ended(s, mark)
    assert ended.group(2) == "abort" and int(ended.group(5)) < 1500
    fresh = anthropic_client_for(s).messages.create(model="m", max_tokens=3, messages=[
        {"role": "user", "content": "Hi"}])
    assert fresh.usage.output_tokens >= 1     # the next request runs at once, on its own


def test_anthropic_ignored_fields_are_named(server):
    status, headers, body = server.request("POST", "/v1/messages", {
        "model": "m", "max_tokens": 2, "metadata": {"user_id": "u"}, "thinking": {"type": "enabled",
                                                                                    "budget_tokens": 100},
        "output_config": {"effort": "low"}, "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "web_search_20250305", "name": "web_search"}]})
    assert status == 200, body
    assert headers["x-koboldlite-ignored"].split(",") == [
        "metadata", "output_config.effort", "thinking.budget_tokens", "tools[web_search_20250305]"]


# -- OpenAI Responses ------------------------------------------------------------------------------------

def test_responses_create_and_stream_agree(server):
    client = openai_client_for(server)
    ask = dict(model="m", instructions="You are terse.", input="Name three colours.", max_output_tokens=200,
               extra_body=SEEDED)
    made = client.responses.create(**ask)
    assert made.object == "response" and made.status == "completed" and made.id.startswith("resp_")
    assert made.output_text and made.output[0].type == "message" and made.output[0].content[0].type == "output_text"
    with client.responses.stream(**ask) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert deltas == final.output_text == made.output_text
    assert final.usage.input_tokens == made.usage.input_tokens and final.usage.output_tokens == made.usage.output_tokens
    assert final.usage.input_tokens_details.cached_tokens > 0
    short = client.responses.create(**{**ask, "max_output_tokens": 3})
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"


def test_responses_stream_event_sequence(server):
    s = SSEStream(server, "/v1/responses", {"model": "m", "input": "Hello!", "max_output_tokens": 10,
                                            "stream": True, **SEEDED})
    events = sse_events(b"".join(s.events()))
    names = [n for n, _ in events]
    assert names[:2] == ["response.created", "response.in_progress"]
    assert names[2:5] == ["response.output_item.added", "response.content_part.added", "response.output_text.delta"]
    assert names[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    item_id = events[2][1]["item"]["id"]
    for name, data in events[2:-1]:
        assert data["output_index"] == 0, name
        assert data.get("item_id", data.get("item", {}).get("id")) == item_id, name
    assert events[-1][1]["response"]["usage"]["output_tokens"] == 10
    assert b"[DONE]" not in s.raw


def test_responses_function_call_and_its_output(server):
    client = openai_client_for(server)
    tool = {"type": "function", "name": "get_weather", "description": WEATHER["description"],
            "parameters": WEATHER["input_schema"]}
    ask = dict(model="m", input="What is the weather in Paris?", tools=[tool], max_output_tokens=120,
               tool_choice={"type": "function", "name": "get_weather"}, extra_body=SEEDED)   # greedy: see above
    made = client.responses.create(**ask)
    call = next(o for o in made.output if o.type == "function_call")
    args = json.loads(call.arguments)
    assert call.name == "get_weather" and call.call_id.startswith("call_") and isinstance(args["city"], str)
    with client.responses.stream(**ask) as stream:
        final = stream.get_final_response()
    streamed = next(o for o in final.output if o.type == "function_call")
    assert streamed.name == call.name and json.loads(streamed.arguments) == args and set(args) >= {"city", "unit"}

    def after(output: str) -> list:
        return [{"role": "user", "content": "What is the weather in Paris?"},
                {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
                {"type": "function_call_output", "call_id": call.call_id, "output": output}]
    count = lambda items: client.post("/responses/input_tokens", cast_to=object,   # noqa: E731
                                      body={"model": "m", "tools": [tool], "input": items})["input_tokens"]
    assert count(after("Sunny. Zanzibar quokka marmalade.")) - count(after("Sunny.")) >= 5
    answer = client.responses.create(model="m", tools=[tool], input=after("Sunny, 21 C."), max_output_tokens=16)
    assert answer.status in ("completed", "incomplete")


def test_responses_input_tokens_is_the_prompt_read(server):
    client = openai_client_for(server)
    body = {"model": "m", "instructions": "Be brief.", "input": [
        {"role": "developer", "content": "Answer in English."},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Oslo?"}]}]}
    counted = client.post("/responses/input_tokens", cast_to=object, body=body)
    assert counted["object"] == "response.input_tokens"
    made = client.responses.create(**body, max_output_tokens=3)
    assert counted["input_tokens"] == made.usage.input_tokens


def test_responses_chain_reads_only_the_new_turn(server):
    client = openai_client_for(server)
    first = client.responses.create(model="m", input="My name is Ada. Say hi.", max_output_tokens=24, extra_body=SEEDED)
    perf = server.json("GET", "/api/extra/perf")
    assert perf["last_input_count"] == first.usage.input_tokens
    second = client.responses.create(model="m", previous_response_id=first.id, input="What is my name?",
                                     max_output_tokens=8, extra_body=SEEDED)
    perf = server.json("GET", "/api/extra/perf")
    new_tokens = perf["last_input_count"] - perf["last_cached_count"]
    assert second.usage.input_tokens_details.cached_tokens == perf["last_cached_count"]
    # The stored turn is the prompt's start: only the new message and the turn markers around it are read.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert new_tokens <= 24, (new_tokens, second.usage)
    assert second.previous_response_id == first.id
    assert client.responses.retrieve(first.id).output_text == first.output_text
    # Another key sees none of it; a deleted or unknown id is a 404 naming it.
    import openai
    stranger = openai_client_for(server, api_key="sk-someone-else")
    with pytest.raises(openai.NotFoundError):
        stranger.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as e:
        stranger.responses.create(model="m", previous_response_id=first.id, input="x", max_output_tokens=2)
    assert first.id in str(e.value)
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="m", previous_response_id=first.id, input="x", max_output_tokens=2)
    unstored = client.responses.create(model="m", input="x", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_responses_codex_request_is_served(server):
    """What Codex CLI sends: developer-role items, store false, reasoning summary, includes, a web_search tool and
    a namespace group beside its function tools, no max_output_tokens."""
    status, headers, body = server.request("POST", "/v1/responses", {
        "model": "gpt-5-codex", "store": False, "stream": False, "include": ["reasoning.encrypted_content"],
        "reasoning": {"effort": "medium", "summary": "auto"}, "prompt_cache_key": "abc", "parallel_tool_calls": False,
        "tools": [{"type": "function", "name": "shell", "parameters": {"type": "object", "properties": {
            "command": {"type": "array", "items": {"type": "string"}}}}}, {"type": "web_search"},
                  {"type": "namespace", "name": "mcp", "tools": []}],
        "tool_choice": "auto", "max_output_tokens": 6,
        "input": [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Be a coder."}]},
                  {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "List files."}]}]})
    assert status == 200, body
    assert json.loads(body)["status"] in ("completed", "incomplete")
    assert headers["x-koboldlite-ignored"].split(",") == [
        "include", "prompt_cache_key", "reasoning.summary", "tools[web_search]", "tools[namespace]"]


def test_responses_errors_are_the_sdks_typed_exceptions(server, make_server):
    import openai
    client = openai_client_for(server)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="m", max_output_tokens=4, input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}])
    assert "text only" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="m", previous_response_id="resp_nothing", input="x")
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="m", input="x", max_output_tokens=0)
    locked = make_server("--password", "pw")
    with pytest.raises(openai.AuthenticationError):
        openai_client_for(locked, api_key="wrong").responses.create(model="m", input="x", max_output_tokens=2)
    assert openai_client_for(locked, api_key="pw").responses.create(model="m", input="x", max_output_tokens=2).id


def test_responses_disconnect_stops_the_generation(make_server):
    s = make_server()
    mark = s.mark()
    stream = SSEStream(s, "/v1/responses", {"model": "m", "max_output_tokens": 1500, "stream": True,
                                            "ban_eos_token": True, "input": "Tell a very long story."})
    while b"output_text.delta" not in (stream.next_event() or b"output_text.delta"):
        pass
    stream.close()
    ended = last_job_ended(s, mark)
    assert ended.group(2) == "abort" and int(ended.group(5)) < 1500
    again = openai_client_for(s).responses.create(model="m", input="Hi", max_output_tokens=3)
    assert again.usage.output_tokens >= 1


def finished_job(prompt: str, pieces: list[str]) -> Job:
    """A job whose reply has already arrived, piece by piece, and ended."""
    job = Job(GenerationRequest(prompt=prompt), [1, 2, 3], 100)
    for piece in pieces:
        job.buffer.append(piece)
    job.end(StopReason.END)
    return job


def test_thinking_becomes_its_own_block_and_item():
    """A model that thinks first (<think>...</think>): a thinking block (Anthropic) and a reasoning item
    (Responses) before the answer, in the stream and in the whole reply alike."""
    from types import SimpleNamespace
    pieces = ["<thi", "nk>Two", " plus two.</think>", "\nIt is ", "four."]
    job = finished_job("<|im_start|>assistant\n", pieces)
    call = SimpleNamespace(served=SimpleNamespace(name="m"), stop_sequences=[])
    encoder = AnthropicEncoder(job, call)
    raw = b"".join(encoder.encode(events) for events in ReplyReader(job, reasoning=True).stream())
    assert encoder.blocks.content == [{"type": "thinking", "thinking": "Two plus two.", "signature": ""},
                                      {"type": "text", "text": "It is four."}]
    names = [n for n, _ in sse_events(raw)]
    assert names == ["content_block_start", "content_block_delta", "content_block_delta", "content_block_delta",
                     "content_block_stop", "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_stop", "message_delta", "message_stop"]
    assert sse_events(raw)[3][1]["delta"] == {"type": "signature_delta", "signature": ""}
    whole = AnthropicEncoder(job, call).whole(ReplyReader(job, reasoning=True).whole())
    assert whole["content"] == encoder.blocks.content and whole["stop_reason"] == "end_turn"
    # Its items only: the response objects need a real call.
    encoder = ResponsesEncoder(job, SimpleNamespace(timings_per_token=False))
    raw = b"".join(encoder.encode([e for e in events if e.kind in ("reasoning", "text")])
                   for events in ReplyReader(job, reasoning=True).stream()) + encoder.items.close()
    items = encoder.items
    assert [i["type"] for i in items.output] == ["reasoning", "message"]
    assert items.output[0]["content"] == [{"type": "reasoning_text", "text": "Two plus two."}]
    assert items.as_message() == {"role": "assistant", "content": "It is four.", "reasoning_content": "Two plus two."}
    names = [n for n, _ in sse_events(raw)]
    assert "response.reasoning_text.delta" in names and "response.reasoning_text.done" in names
    assert [d["sequence_number"] for _, d in sse_events(raw)] == list(range(len(names)))


def test_a_failure_mid_stream_is_each_apis_error_event(starter_model):
    """A generation that fails after its stream began ends with `event: error` (Anthropic) or
    `response.failed` (Responses), and the server serves the next request."""
    from tests.harness import ServerProcess
    s = ServerProcess(["--model", starter_model, "--contextsize", "512"],
                      env={"KOBOLDLITE_FAULT_INJECTION": "<<explode>>"})
    try:
        stream = SSEStream(s, "/v1/messages", {"model": "m", "max_tokens": 8, "stream": True,
                                               "messages": [{"role": "user", "content": "<<explode>> now"}]})
        events = sse_events(b"".join(stream.events()))
        assert events[0][0] == "message_start" and events[-1][0] == "error"
        assert events[-1][1]["error"]["type"] == "api_error" and "message_stop" not in [n for n, _ in events]
        stream = SSEStream(s, "/v1/responses", {"model": "m", "max_output_tokens": 8, "stream": True,
                                                "input": "<<explode>> now"})
        events = sse_events(b"".join(stream.events()))
        assert events[-1][0] == "response.failed"
        assert events[-1][1]["response"]["status"] == "failed" and events[-1][1]["response"]["error"]["message"]
        ok = anthropic_client_for(s).messages.create(model="m", max_tokens=2, messages=[
            {"role": "user", "content": "Hi"}])
        assert ok.usage.output_tokens >= 1
    finally:
        s.stop()
