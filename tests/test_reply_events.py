"""A reply read as events (api/reply.py): what every API's stream and whole answer are made of, over a job's
token buffer filled by hand (no model, no server)."""

from __future__ import annotations

from types import SimpleNamespace

from koboldlite.generation import GenerationRequest
from koboldlite.jobs import Job, StopReason, TokenLogprob
from koboldlite.chat.tools import ToolUse
from koboldlite.errors import Failed
from koboldlite.api.reply import (
    DoneEvent, ErrorEvent, PingEvent, ReasoningEvent, ReplyReader, TextEvent, ToolCallsEvent, WholeReply
)

import pytest

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def new_job(prompt: str = "Hi") -> Job:
    return Job(GenerationRequest(prompt=prompt), [1, 2], 50)


def arrive(job: Job, *pieces: str):
    """Tokens as the engine delivers them: each token's log-probability recorded before its text."""
    for piece in pieces:
        job.logprobs.append(TokenLogprob(token=len(job.logprobs), logprob=-1.0, top=[]))
        job.buffer.append(piece)


def hermes_tools(choice="auto") -> ToolUse:
    return ToolUse(SimpleNamespace(source="{{ tools }} <tool_call>"), [WEATHER], choice, True)


def test_the_pieces_that_came_together_are_one_list_and_its_last_text_carries_their_logprobs():
    job = new_job()
    arrive(job, "Once", " upon")
    reader = ReplyReader(job)
    stream = reader.stream()
    first = next(stream)
    assert [e.text for e in first] == ["Once", " upon"]
    assert first[0].logprobs == [] and [lp.token for lp in first[1].logprobs] == [0, 1]
    arrive(job, " a")
    job.end(StopReason.LENGTH)
    rest = list(stream)
    assert [type(e) for e in rest[0]] == [TextEvent] and rest[-1] == [DoneEvent(StopReason.LENGTH, [])]


def test_a_thinking_block_comes_apart_and_held_back_text_shows_at_the_end():
    job = new_job()
    arrive(job, "<thi", "nk>Two", " plus two.</think>", "\nIt is ", "four")
    job.end(StopReason.END)
    events = [e for batch in ReplyReader(job, reasoning=True).stream() for e in batch]
    assert [(e.kind, getattr(e, "text", None)) for e in events] == [
        ("reasoning", "Two"), ("reasoning", " plus two."), ("text", "It is "), ("text", "four"), ("done", None)]
    # Not split: the block stays in the text, as the Kobold API and "reasoning_format": "none" show it.
    plain = WholeReply.of(ReplyReader(job).whole())
    assert plain.text.startswith("<think>") and plain.reasoning == ""
    whole = WholeReply.of(ReplyReader(job, reasoning=True).whole())
    assert (whole.reasoning, whole.text, whole.reason) == ("Two plus two.", "It is four", StopReason.END)
    assert len(whole.logprobs) == 5


def test_a_reply_that_begins_like_a_call_is_held_and_read_as_calls():
    job = new_job()
    arrive(job, "<tool_call>\n", '{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}', "\n</tool_call>")
    job.end(StopReason.END)
    batches = list(ReplyReader(job, tools=hermes_tools()).stream())
    events = [e for batch in batches for e in batch]
    assert not any(isinstance(e, TextEvent) for e in events)         # nothing of the call shown as text
    calls = next(e for e in events if isinstance(e, ToolCallsEvent)).calls
    assert calls == [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    assert isinstance(events[-1], DoneEvent) and len(events[-1].logprobs) == 4    # no text carried them
    assert WholeReply.of(ReplyReader(job, tools=hermes_tools()).whole()).calls == calls


def test_prose_is_shown_at_once_in_a_stream_and_a_call_after_it_is_read_whole():
    job = new_job()
    arrive(job, "Let me look.", ' <tool_call>{"name": "get_weather", "arguments": {}}</tool_call>')
    job.end(StopReason.END)
    events = [e for batch in ReplyReader(job, tools=hermes_tools()).stream() for e in batch]
    assert events[0] == TextEvent("Let me look.", []) and not any(isinstance(e, ToolCallsEvent) for e in events)
    whole = WholeReply.of(ReplyReader(job, tools=hermes_tools()).whole())
    assert whole.text == "Let me look." and whole.calls == [{"name": "get_weather", "arguments": {}}]


def test_a_failed_reply_ends_with_an_error_event_and_fails_a_whole_read():
    job = new_job()
    arrive(job, "<tool_call>{")
    job.end(StopReason.FAILED, "decode failed")
    batches = list(ReplyReader(job, tools=hermes_tools()).stream())
    assert batches == [[ErrorEvent("decode failed")]]          # the held-back start of a call is dropped
    with pytest.raises(Failed):
        ReplyReader(job).whole()


def test_a_ping_when_nothing_arrives_in_time_and_none_without_a_ping_time():
    job = new_job()
    stream = ReplyReader(job).stream(ping_seconds=0.01)
    assert next(stream) == [PingEvent()]
    arrive(job, "Hi")
    assert next(stream) == [TextEvent("Hi", job.logprobs[:1])]
    job.end(StopReason.ABORTED)
    assert next(stream) == [DoneEvent(StopReason.ABORTED, [])]
    quiet = new_job()
    arrive(quiet, "Hi")
    quiet.end(StopReason.END)
    assert [e.kind for batch in ReplyReader(quiet).stream() for e in batch] == ["text", "done"]


def test_reasoning_events_carry_logprobs_too():
    job = new_job()
    arrive(job, "<think>", "hmm")
    job.end(StopReason.LENGTH)
    events = [e for batch in ReplyReader(job, reasoning=True).stream() for e in batch]
    assert isinstance(events[0], ReasoningEvent) and len(events[0].logprobs) == 2
