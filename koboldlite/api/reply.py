"""A reply as events: the one reader of a job's token buffer that every generation route uses, and the encoder
each API family writes its wire bytes with.

A route starts a job, makes a ReplyReader over it and either streams it (`stream_reply`: the reader's events, as
they arrive, through the family's ReplyEncoder) or answers once it has ended (`ReplyReader.whole`, the same events
read at once, which the encoder's `whole` turns into the answer). The thinking block (text.ReasoningSplitter) and
a reply that may be a tool call (chat.tools.CallWatch) are read here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterator, Union

from ..text import ReasoningSplitter
from ..jobs import Job, PromptProgress, StopReason, TokenLogprob
from ..chat.tools import CallWatch, ToolUse
from ..service.exchange import StreamResponse, wait_for_text


@dataclasses.dataclass
class TextEvent:
    """Answer text now safe to show, with the log-probabilities of the tokens shown since the last event that
    carried some (a token's text may show later than the token, or never)."""
    text: str
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    kind = "text"


@dataclasses.dataclass
class ReasoningEvent:
    """Text of the thinking block the reply opened with; logprobs as TextEvent's."""
    text: str
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    kind = "reasoning"


@dataclasses.dataclass
class ToolCallsEvent:
    """The reply read as tool calls, each {"name", "arguments": dict}, at its end."""
    calls: list[dict]
    kind = "tool_calls"


@dataclasses.dataclass
class ProgressEvent:
    """The prompt's reading came further (llama-server's `prompt_progress`); only readers that follow it get these."""
    progress: PromptProgress
    kind = "progress"


@dataclasses.dataclass
class PingEvent:
    """Nothing arrived for a while (the prompt is being read, or the job waits its turn): keep the connection."""
    kind = "ping"


@dataclasses.dataclass
class DoneEvent:
    """The reply ended (not failed): why, and the log-probabilities of tokens no text event carried."""
    reason: StopReason
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    kind = "done"


@dataclasses.dataclass
class ErrorEvent:
    """The generation failed after the answer began: the last event of a stream."""
    message: str
    kind = "error"


ReplyEvent = Union[TextEvent, ReasoningEvent, ToolCallsEvent, ProgressEvent, PingEvent, DoneEvent, ErrorEvent]


# Every SSE API keeps its connection alive the same way: an event when nothing has been sent for this long (a long
# prompt being read, a turn in the queue), so that proxies and clients with read timeouts do not give up on it.
REPLY_PING_SECONDS = 5.0


class ReplyReader:
    """One job's reply as events. `reasoning`: a thinking block at its start comes apart from the answer (else it
    stays in the text); `tools`: an answer that begins like a call is held until it is known to be one or not;
    `progress`: a stream also tells how far the reading of the prompt has come (ProgressEvent)."""

    def __init__(self, job: Job, reasoning: bool = False, tools: ToolUse | None = None, progress: bool = False):
        self.job = job
        self.follows_progress = progress
        self.splitter = ReasoningSplitter.for_prompt(job.request.prompt) if reasoning else None
        self.watch = CallWatch(tools)
        self._logprobs_read = 0       # how many of job.logprobs an event has carried (or will)

    def stream(self, ping_seconds: float | None = None) -> Iterator[list[ReplyEvent]]:
        """The events as the text arrives: one list per read of the buffer (all the tokens already waiting, which
        the encoder writes at once), a [PingEvent] after `ping_seconds` without any, and at the end one list of
        what was held back, the calls, and DoneEvent (or ErrorEvent)."""
        index, unshown, seen = 0, [], 0 if self.follows_progress else None
        while True:
            pieces, done = self.job.buffer.read(index, timeout=ping_seconds, progress_seen=seen)
            progressed: list[ReplyEvent] = []
            if seen is not None:
                reports, progress = self.job.buffer.progress()
                if reports != seen:
                    seen, progressed = reports, [ProgressEvent(progress)]
            if not pieces:
                if done:
                    break
                yield progressed or [PingEvent()]
                continue
            index += len(pieces)
            events = [event for piece in pieces for event in self._feed(piece)]
            unshown += self._new_logprobs()
            if events:
                _carry_logprobs(events, unshown)
                unshown = []
            if progressed or events:
                yield progressed + events
        yield self._end(unshown)

    def whole(self) -> list[ReplyEvent]:
        """The reply once it has ended, as one list of events (a failed generation fails the request: errors.Failed).
        Unlike a stream, which must decide early, the whole answer is read for calls (a call may follow some text)."""
        text = wait_for_text(self.job)
        reasoning, answer = self.splitter.split(text) if self.splitter else ("", text)
        events = self._content(reasoning, self.watch.finish(answer, self._cut()))
        return self._closing(events, self._new_logprobs())

    def _cut(self) -> bool:
        """Whether the reply was stopped by its length limit (a call it was writing is still a call)."""
        return self.job.buffer.stop_reason is StopReason.LENGTH

    def _feed(self, piece: str) -> list[ReplyEvent]:
        reasoning, answer = self.splitter.feed(piece) if self.splitter else ("", piece)
        return self._content(reasoning, self.watch.feed(answer))

    @staticmethod
    def _content(reasoning: str, answer: str) -> list[ReplyEvent]:
        return ([ReasoningEvent(reasoning)] if reasoning else []) + ([TextEvent(answer)] if answer else [])

    def _new_logprobs(self) -> list[TokenLogprob]:
        """Log-probabilities recorded since the last call (a token's are recorded before its text)."""
        n = len(self.job.logprobs)
        new, self._logprobs_read = self.job.logprobs[self._logprobs_read:n], n
        return new

    def _end(self, unshown: list[TokenLogprob]) -> list[ReplyEvent]:
        """A failed reply ends at once (its held-back text was never finished); another shows what it held back."""
        buffer = self.job.buffer
        if buffer.stop_reason is StopReason.FAILED:
            return [ErrorEvent(buffer.error or "generation failed")]
        reasoning, answer = self.splitter.flush() if self.splitter else ("", "")
        events = self._content(reasoning, self.watch.finish(answer, self._cut()))
        return self._closing(events, unshown + self._new_logprobs())

    def _closing(self, events: list[ReplyEvent], unshown: list[TokenLogprob]) -> list[ReplyEvent]:
        if events:
            _carry_logprobs(events, unshown)
            unshown = []
        if self.watch.calls:
            events.append(ToolCallsEvent(self.watch.calls))
        return events + [DoneEvent(self.job.buffer.stop_reason, unshown)]


def _carry_logprobs(events: list[ReplyEvent], entries: list[TokenLogprob]):
    """The last text event of a read carries the log-probabilities of all its tokens, as OpenAI's chunks do."""
    last = next(e for e in reversed(events) if isinstance(e, (TextEvent, ReasoningEvent)))
    last.logprobs = entries


@dataclasses.dataclass
class WholeReply:
    """A reply's events summed up: what a non-streamed answer shows."""
    reasoning: str
    text: str
    calls: list[dict]
    logprobs: list[TokenLogprob]
    reason: StopReason

    @classmethod
    def of(cls, events: list[ReplyEvent]) -> "WholeReply":
        done = events[-1]
        return cls(reasoning="".join(e.text for e in events if isinstance(e, ReasoningEvent)),
                   text="".join(e.text for e in events if isinstance(e, TextEvent)),
                   calls=[c for e in events if isinstance(e, ToolCallsEvent) for c in e.calls],
                   logprobs=[lp for e in events if isinstance(e, (TextEvent, ReasoningEvent, DoneEvent))
                             for lp in e.logprobs],
                   reason=done.reason)


class ReplyEncoder:
    """One API's wire form of a reply. `start` is written before the first event; each list of events the reader
    yields is written at once, each event through the method of its kind (`text`, `reasoning`, `tool_calls`,
    `progress`, `ping`, `done`, `error`). What an API does not show encodes to nothing. `whole` is the non-streamed answer."""

    def start(self) -> bytes:
        return b""

    def encode(self, events: list[ReplyEvent]) -> bytes:
        return b"".join(getattr(self, event.kind)(event) for event in events)

    def text(self, event: TextEvent) -> bytes:
        return b""

    def reasoning(self, event: ReasoningEvent) -> bytes:
        return b""

    def tool_calls(self, event: ToolCallsEvent) -> bytes:
        return b""

    def progress(self, event: ProgressEvent) -> bytes:
        return b""

    def ping(self, event: PingEvent) -> bytes:
        return b""

    def done(self, event: DoneEvent) -> bytes:
        return b""

    def error(self, event: ErrorEvent) -> bytes:
        return b""

    def whole(self, events: list[ReplyEvent]) -> Any:
        raise NotImplementedError


def stream_reply(content_type: str, reply: ReplyReader, encoder: ReplyEncoder,
                 ping_seconds: float | None = REPLY_PING_SECONDS) -> StreamResponse:
    """The reply streamed in its API's form; the connection closes at its end (and a hang-up cancels the job)."""
    def chunks() -> Iterator[bytes]:
        head = encoder.start()
        if head:
            yield head
        for events in reply.stream(ping_seconds):
            out = encoder.encode(events)
            if out:
                yield out
    return StreamResponse(content_type, chunks(), reply.job)


# The SSE forms the encoders share.

def sse_data(obj: Any) -> bytes:
    """A `data:` line only (OpenAI's streams: older clients mangle chunks that have an `event:` line)."""
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


# An SSE comment: every SSE parser skips it (the spec's keep-alive), and no client sees an event.
SSE_PING = b": ping\n\n"


def sse_event(kind: str, data: dict) -> bytes:
    """`event:` and `data:` with the same type, as both APIs (and their SDKs, which drop events without it) want."""
    return (f"event: {kind}\ndata: ".encode() + json.dumps({"type": kind, **data}, ensure_ascii=False).encode()
            + b"\n\n")
