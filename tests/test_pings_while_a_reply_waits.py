"""Every SSE API keeps its connection alive the same way while a reply waits (a long prompt being read, a turn
in the queue): a keep-alive when nothing has been sent for a few seconds. OpenAI's streams (chat, completions,
Responses) and KoboldCpp's send an SSE comment line, Anthropic's its `ping` event; Ollama's NDJSON has no comment
form and sends none. The replies wait here behind a long generation on a one-slot server."""

from __future__ import annotations

import json

import pytest

from tests.harness import ServerProcess, SSEStream, kobold_event_json

COMMENT_PING = b": ping\n\n"
ASK = {"max_tokens": 3, "max_output_tokens": 3, "max_length": 3, "stream": True, "seed": 1, "top_k": 1}


@pytest.fixture(scope="module")
def one_slot(starter_model):
    s = ServerProcess(["--model", starter_model, "--contextsize", "1024", "--parallel", "1", "--multiuser", "8"])
    yield s
    s.stop()


def next_block(stream: SSEStream) -> bytes | None:
    """The next event or comment of the stream, as sent, with its blank line (read here, comments included,
    whatever the harness's reader passes over)."""
    block = b""
    while line := stream.resp.readline():
        block += line
        if line == b"\n":
            return block
    return block or None


def next_keepalive(stream: SSEStream, keepalive: bytes, after: int = 0) -> list[bytes]:
    """The events before the first keep-alive, after skipping `after` of them (Anthropic's first ping is part of
    its stream's start); a stream that ends first fails the test."""
    seen = []
    while (event := next_block(stream)) is not None:
        if event == keepalive and after == 0:
            return seen
        if event == keepalive:
            after -= 1
        seen.append(event)
    raise AssertionError(f"the stream ended without a keep-alive: {seen}")


def test_each_sse_api_pings_while_its_reply_waits_and_then_answers(one_slot):
    blocker = SSEStream(one_slot, "/api/extra/generate/stream", {
        "prompt": "A very long story:", "max_length": 4000, "ban_eos_token": True, "genkey": "BLOCKER"})
    kobold_event_json(blocker.next_event())                 # it has the only slot now
    waiting = {
        "chat": SSEStream(one_slot, "/v1/chat/completions", {**ASK, "messages": [{"role": "user", "content": "Hi"}]}),
        "completions": SSEStream(one_slot, "/v1/completions", {**ASK, "prompt": "Once upon"}),
        "responses": SSEStream(one_slot, "/v1/responses", {**ASK, "input": "Hi"}),
        "anthropic": SSEStream(one_slot, "/v1/messages", {**ASK, "messages": [{"role": "user", "content": "Hi"}]},
                               headers={"x-api-key": "k", "anthropic-version": "2023-06-01"}),
        "kobold": SSEStream(one_slot, "/api/extra/generate/stream", {**ASK, "prompt": "Once upon"}),
    }
    ollama = one_slot.connection()
    ollama.request("POST", "/api/generate", body=json.dumps({"prompt": "Once upon", "options": {"num_predict": 3}}),
                   headers={"Content-Type": "application/json"})
    ollama_reply = ollama.getresponse()
    assert all(s.status == 200 for s in waiting.values()) and ollama_reply.status == 200

    ping_event = b'event: ping\ndata: {"type": "ping"}\n\n'
    before = {name: next_keepalive(s, ping_event if name == "anthropic" else COMMENT_PING,
                                   after=1 if name == "anthropic" else 0) for name, s in waiting.items()}
    # Only the streams' own beginnings came before the keep-alive: no text yet.
    assert [json.loads(e[6:])["choices"][0]["delta"] for e in before["chat"]] == [{"role": "assistant", "content": ""}]
    assert before["completions"] == [] and before["kobold"] == []
    assert [e.split(b"\n")[0] for e in before["responses"]] == [b"event: response.created",
                                                               b"event: response.in_progress"]
    assert [e.split(b"\n")[0] for e in before["anthropic"]] == [b"event: message_start", b"event: ping"]

    assert one_slot.json("POST", "/api/extra/abort", {"genkey": "BLOCKER"})["success"] == "true"
    ends = {name: [e for e in iter(lambda: next_block(s), None) if not e.startswith(b":")]
            for name, s in waiting.items()}
    assert ends["chat"][-1] == ends["completions"][-1] == b"data: [DONE]\n\n"
    assert ends["responses"][-1].startswith((b"event: response.incomplete", b"event: response.completed"))
    assert ends["anthropic"][-1].startswith(b"event: message_stop")
    assert kobold_event_json(ends["kobold"][-1])["finish_reason"] in ("length", "stop")
    lines = [json.loads(line) for line in ollama_reply.read().splitlines()]    # every line JSON: no ping in it
    assert lines[-1]["done"] is True and "".join(x["response"] for x in lines)
    ollama.close()
    blocker.close()
