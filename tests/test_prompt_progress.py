"""Prompt progress (issue 37, item 3): llama-server's `return_progress` on the OpenAI completions and chat streams
and the Responses stream (`prompt_progress` {total, cache, processed, time_ms}, as the prompt is read chunk by
chunk), `timings_per_token` (each chunk carries `timings`; the last chunks always do), and the same progress on the
Kobold stream as an SSE comment. A server reading prompts 16 tokens a batch gives several reports per prompt.
llama.cpp's test_return_progress (tests/unit/test_chat_completion.py) is ported as the first test."""

from __future__ import annotations

import json

import pytest

from tests.harness import KOBOLD_EVENT, ServerProcess, SSEStream, openai_client_for
from tests.test_agent_apis import sse_events

PROMPT = "This is a test " * 12


@pytest.fixture(scope="module")
def small_batches(starter_model):
    s = ServerProcess(["--model", starter_model, "--contextsize", "512", "--batchsize", "16"])
    yield s
    s.stop()


def data_lines(raw: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in raw.decode().splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def chat_stream(server, **extra) -> list[dict]:
    stream = SSEStream(server, "/v1/chat/completions", {"max_tokens": 4, "stream": True, "temperature": 0,
                                                          "messages": [{"role": "user", "content": PROMPT}], **extra})
    assert stream.status == 200
    list(stream.events())
    return data_lines(stream.raw)


def check_progress(reports: list[dict], cached: bool) -> None:
    first, last = reports[0], reports[-1]
    assert first["total"] > 0 and first["cache"] == first["processed"]     # before the first batch
    assert (first["cache"] > 0) is cached
    for before, after in zip(reports, reports[1:]):
        assert after["total"] == before["total"] and after["cache"] == before["cache"]
        assert after["processed"] > before["processed"] and after["time_ms"] >= before["time_ms"]
    assert last["processed"] == last["total"]


@pytest.mark.parametrize("reuse_cache", [False, True])
def test_return_progress_reports_each_batch_of_the_prompt(small_batches, reuse_cache):
    if reuse_cache:
        chat_stream(small_batches, return_progress=True)
    else:
        small_batches.json("POST", "/slots/0?action=erase", {})      # nothing of the prompt cached
    chunks = chat_stream(small_batches, return_progress=True)
    reports = [c["prompt_progress"] for c in chunks if "prompt_progress" in c]
    check_progress(reports, cached=reuse_cache)
    if not reuse_cache:
        assert len(reports) >= 1 + reports[-1]["total"] // 16          # one at the start, one a batch
    first_text = next(i for i, c in enumerate(chunks) if c["choices"] and c["choices"][0]["delta"].get("content"))
    assert all("prompt_progress" not in c for c in chunks[first_text:])    # reading is over once text comes
    for c in chunks:
        if "prompt_progress" in c:
            assert c["choices"][0]["delta"] == {"role": "assistant", "content": None}


def test_without_return_progress_no_chunk_carries_it(small_batches):
    assert not any("prompt_progress" in c for c in chat_stream(small_batches))


def test_completions_progress_and_the_official_client_reads_it(small_batches):
    client = openai_client_for(small_batches)
    chunks = list(client.completions.create(model="m", prompt=PROMPT * 2, max_tokens=3, stream=True,
                                            extra_body={"return_progress": True}))
    reports = [c.model_extra["prompt_progress"] for c in chunks if c.model_extra.get("prompt_progress")]
    assert len(reports) >= 3 and reports[-1]["processed"] == reports[-1]["total"]
    assert "".join(c.choices[0].text for c in chunks if c.choices)          # the reply still comes whole


def test_timings_per_token_and_on_the_last_chunks(small_batches):
    chunks = chat_stream(small_batches, timings_per_token=True, stream_options={"include_usage": True})
    texts = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert texts and all("timings" in c for c in texts)
    usage = chunks[-1]
    assert usage["choices"] == [] and "usage" in usage
    for key in ("prompt_per_second", "predicted_per_second", "predicted_n", "cache_n", "prompt_n"):
        assert key in usage["timings"]
    assert 1 <= usage["timings"]["predicted_n"] <= 4
    plain = chat_stream(small_batches)
    assert not any("timings" in c for c in plain if c["choices"] and c["choices"][0]["delta"].get("content"))
    assert "timings" in [c for c in plain if c["choices"] and c["choices"][0]["finish_reason"]][0]
    whole = small_batches.json("POST", "/v1/chat/completions", {"max_tokens": 3, "messages": [
        {"role": "user", "content": "Hi"}]})
    assert whole["timings"]["predicted_n"] == whole["usage"]["completion_tokens"]


def test_responses_stream_progress_and_timings(small_batches):
    stream = SSEStream(small_batches, "/v1/responses", {"input": PROMPT, "max_output_tokens": 8, "stream": True,
                                                        "timings_per_token": True, "return_progress": True})
    list(stream.events())
    events = sse_events(stream.raw)
    progress = [data for kind, data in events if "prompt_progress" in data]
    assert progress and all(data["type"] == "response.in_progress" for data in progress)
    assert progress[-1]["prompt_progress"]["processed"] == progress[-1]["prompt_progress"]["total"]
    assert [d for k, d in events if k == "response.output_text.delta" and "timings" in d]
    end = events[-1][1]
    assert end["type"] in ("response.completed", "response.incomplete") and "timings" in end
    assert "usage" in end["response"]
    numbers = [data["sequence_number"] for _, data in events]
    assert numbers == list(range(len(numbers)))                         # the extra events are numbered too


def test_kobold_stream_carries_progress_as_a_comment(small_batches):
    stream = SSEStream(small_batches, "/api/extra/generate/stream", {"prompt": PROMPT, "max_length": 4})
    events = list(stream.events())
    assert events and all(KOBOLD_EVENT.match(e) for e in events)         # what KoboldAI Lite parses is unchanged
    reports = [json.loads(line[len(": prompt_progress "):]) for line in stream.raw.decode().splitlines()
               if line.startswith(": prompt_progress ")]
    assert len(reports) >= 2 and reports[-1]["processed"] == reports[-1]["total"]
