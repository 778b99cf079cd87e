"""The Anthropic Messages API (Claude Code and the anthropic SDK speak it)."""

from __future__ import annotations

import dataclasses
import json
import secrets
from typing import Any, Callable

from ..errors import ContextOverflow, RequestError
from ..fields import FieldReader, _asks, ignored_fields
from ..generation import GenerationRequest
from ..jobs import Job, StopReason
from ..chat.messages import tool_result_names
from ..media import MediaKind
from ..media_urls import MediaList
from ..chat.tools import ToolUse
from ..service.served_model import ServedModel
from ..service.exchange import JSONResponse
from .common import (
    apply_output_format, block_request_fields, chat_request, max_reply_tokens, media_list, text_only
)
from .reply import (
    DoneEvent, ErrorEvent, PingEvent, ReasoningEvent, ReplyEncoder, ReplyEvent, ReplyReader, TextEvent,
    ToolCallsEvent, sse_event, stream_reply
)


ANTHROPIC_IGNORED_FIELDS: dict[str, Callable[[Any], bool]] = {
    "metadata": _asks, "service_tier": _asks, "container": _asks, "mcp_servers": _asks,
    "context_management": _asks,
}


def anthropic_text(value: Any, where: str, media: list | None = None) -> str:
    """A string, or text blocks (and, where `media` is given, image blocks, read into it and standing as
    MEDIA_MARKER); `cache_control` on them needs nothing: prompts are cached anyway."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise RequestError(f"'{where}' must be a string or a list of text blocks")
    texts = []
    for j, block in enumerate(value):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "image" and media is not None:
            texts.append(anthropic_image(block, f"{where}[{j}]", media))
            continue
        if kind in ("image", "document", "search_result"):
            raise text_only(kind, f"{where}[{j}]")
        if kind != "text" or not isinstance(block.get("text"), str):
            raise RequestError(f"{where}[{j}] must be a text block ({{\"type\": \"text\", \"text\": ...}})")
        texts.append(block["text"])
    return "\n".join(texts)


def anthropic_image(block: dict, where: str, media: MediaList) -> str:
    """An image block's file (a base64 source, or a URL source as --mediaurls allows) into `media`; MEDIA_MARKER
    where it stands."""
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    data = source.get("data") if source.get("type") == "base64" else source.get("url")
    if source.get("type") not in ("base64", "url"):
        raise RequestError(f"{where}.source must be {{\"type\": \"base64\", \"media_type\": ..., \"data\": ...}}")
    return media.add(data, f"{where}.source", (MediaKind.IMAGE,))


def anthropic_messages(body: dict, media: list | None = None) -> list[dict]:
    """Anthropic's system and messages as the chat template reads them: tool_use blocks become the assistant's
    tool_calls, tool_result blocks tool messages, thinking blocks its reasoning_content."""
    out = [{"role": "system", "content": anthropic_text(body["system"], "system")}] if body.get("system") else []
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant", "system"):     # Claude Code sometimes sends a system turn here
            raise RequestError(f"{where}.role must be 'user' or 'assistant', not {role!r}")
        content = m.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise RequestError(f"{where}.content must be a string or a list of content blocks")
        texts, calls, results, thinking = [], [], [], []
        for j, block in enumerate(blocks):
            at = f"{where}.content[{j}]"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind == "image" and media is not None:
                texts.append(anthropic_image(block, at, media))
            elif kind in ("image", "document", "search_result"):
                raise text_only(kind, at)
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(block.get("name"), str) or not isinstance(block.get("input", {}), dict):
                    raise RequestError(f"{at} must be a tool_use block with a 'name' and an 'input' object")
                calls.append({"id": str(block.get("id") or f"toolu_{secrets.token_hex(12)}"), "type": "function",
                              "function": {"name": block["name"], "arguments": block.get("input") or {}}})
            elif kind == "tool_result" and role == "user":
                if not isinstance(block.get("tool_use_id"), str):
                    raise RequestError(f"{at}.tool_use_id must be a string")
                result = anthropic_text(block.get("content") or "", f"{at}.content", media)
                results.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                                "content": ("Error: " + result) if block.get("is_error") is True else result})
            elif kind == "thinking" and role == "assistant":
                thinking.append(str(block.get("thinking") or ""))
            elif kind == "redacted_thinking" and role == "assistant":
                continue                       # encrypted by another server: nothing a template could show
            else:
                raise RequestError(f"{at} must be a text, tool_use (assistant), tool_result (user) or thinking "
                                   f"block, not {kind!r}")
        names = tool_result_names(out)
        out += [{**r, "name": names[r["tool_call_id"]]} if r["tool_call_id"] in names else r for r in results]
        if role == "assistant":
            message = {"role": "assistant", "content": "".join(texts)}
            if calls:
                message["tool_calls"] = calls
            if thinking:
                message["reasoning_content"] = "".join(thinking)
            out.append(message)
        elif texts or not results:
            out.append({"role": role, "content": "\n".join(texts)})
    return out


def anthropic_tools(served: ServedModel, f: FieldReader, ignored: list[str]) -> ToolUse | None:
    """Client tools as function tools; server tools (a `type` such as web_search_20250305) are skipped, named."""
    tools = f.body.get("tools") or []
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list of tools")
    functions = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise RequestError(f"tools[{i}] must be a tool with a 'name'")
        if t.get("type") not in (None, "custom"):
            ignored.append(f"tools[{t['type']}]")
            continue
        functions.append({"type": "function", "function": {
            "name": t["name"], "description": t.get("description", ""),
            "parameters": t.get("input_schema") or {"type": "object"}}})
    choice = f.body.get("tool_choice")
    if choice is not None and not (isinstance(choice, dict) and choice.get("type") in ("auto", "any", "tool", "none")):
        raise RequestError("'tool_choice' must be {\"type\": \"auto\"}, {\"type\": \"any\"}, {\"type\": \"none\"} "
                           "or {\"type\": \"tool\", \"name\": ...}")
    if not functions:
        return None
    kind = (choice or {}).get("type", "auto")
    wanted = {"auto": "auto", "any": "required", "none": "none",
              "tool": {"type": "function", "function": {"name": (choice or {}).get("name")}}}[kind]
    disable = (choice or {}).get("disable_parallel_tool_use")
    return ToolUse(served.chat_template, functions, wanted, None if disable is None else not disable if isinstance(disable, bool) else disable)


def anthropic_thinking_vars(f: FieldReader, ignored: list[str]) -> dict:
    """`thinking` turns a template's thinking on or off (`enable_thinking`); its token budget is not enforced."""
    thinking = f.body.get("thinking")
    if thinking is None:
        return {}
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind not in ("enabled", "disabled", "adaptive"):
        raise RequestError("'thinking' must be {\"type\": \"enabled\", \"budget_tokens\": N} or {\"type\": \"disabled\"}")
    if kind == "enabled" and thinking.get("budget_tokens") is not None:
        ignored.append("thinking.budget_tokens")
    return {"enable_thinking": kind != "disabled"}


@dataclasses.dataclass
class MessagesCall:
    """One /v1/messages (or count_tokens) request, read once: the generation it asks for and how to answer."""
    served: ServedModel
    request: GenerationRequest
    tools: ToolUse | None
    stop_sequences: list[str]       # the client's own: a reply they end says which
    stream: bool

    @classmethod
    def parse(cls, req, count_only: bool = False) -> "MessagesCall":
        f = FieldReader(req.json())
        served = req.use(f.body.get("model"))
        ignored = ignored_fields(f.body, ANTHROPIC_IGNORED_FIELDS)
        media = media_list(req, served)
        messages = anthropic_messages(f.body, media)
        max_tokens = None if count_only else max_reply_tokens(f, "max_tokens", required=True)
        fields = block_request_fields(req, f, max_tokens, ignored)
        config = f.body.get("output_config") if isinstance(f.body.get("output_config"), dict) else {}
        fmt = config.get("format") or f.body.get("output_format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            apply_output_format(fields["sampler"], "json_schema", fmt.get("schema"), "output_config.format",
                                "output_config.format.schema")
        if config.get("effort") is not None:
            ignored.append("output_config.effort")
        template_vars = anthropic_thinking_vars(f, ignored)
        tools = anthropic_tools(served, f, ignored)
        stops = f.string_list("stop_sequences")
        request = chat_request(served, messages, {**fields, "stop_strings": stops, "media": media}, tools,
                               template_vars)
        return cls(served, request, tools, stops, f.boolean("stream"))


class AnthropicBlocks:
    """A reply's content blocks, built as its parts arrive, with the stream events that announce them
    (thrown away when the reply is not streamed: both answers are the same blocks)."""

    def __init__(self):
        self.content: list[dict] = []
        self._open: str | None = None

    def part(self, kind: str, text: str) -> bytes:
        block_type = "thinking" if kind == "reasoning" else "text"
        out = b""
        if self._open != block_type:
            out += self.close()
            self._open = block_type
            self.content.append({"type": "thinking", "thinking": "", "signature": ""} if block_type == "thinking"
                                else {"type": "text", "text": ""})
            out += sse_event("content_block_start", {"index": len(self.content) - 1, "content_block": dict(
                self.content[-1])})
        self.content[-1][block_type] += text
        delta = {"type": "thinking_delta", "thinking": text} if block_type == "thinking" else \
            {"type": "text_delta", "text": text}
        return out + sse_event("content_block_delta", {"index": len(self.content) - 1, "delta": delta})

    def close(self) -> bytes:
        if self._open is None:
            return b""
        index = len(self.content) - 1
        out = sse_event("content_block_delta", {"index": index, "delta": {"type": "signature_delta", "signature": ""}}) \
            if self._open == "thinking" else b""
        self._open = None
        return out + sse_event("content_block_stop", {"index": index})

    def tool_use(self, call: dict) -> bytes:
        out = self.close()
        block = {"type": "tool_use", "id": f"toolu_{secrets.token_hex(12)}", "name": call["name"], "input": {}}
        self.content.append({**block, "input": call["arguments"]})
        index = len(self.content) - 1
        return out + sse_event("content_block_start", {"index": index, "content_block": block}) + sse_event(
            "content_block_delta", {"index": index, "delta": {
                "type": "input_json_delta", "partial_json": json.dumps(call["arguments"], ensure_ascii=False)}}) + \
            sse_event("content_block_stop", {"index": index})


def anthropic_stop(job: Job, called: bool, stops: list[str]) -> dict:
    if job.buffer.stop_reason is StopReason.LENGTH:      # calls included: their input may be incomplete
        return {"stop_reason": "max_tokens", "stop_sequence": None}
    if called:
        return {"stop_reason": "tool_use", "stop_sequence": None}
    if job.stats.stop_string is not None and job.stats.stop_string in stops:
        return {"stop_reason": "stop_sequence", "stop_sequence": job.stats.stop_string}
    return {"stop_reason": "end_turn", "stop_sequence": None}


def anthropic_usage(job: Job) -> dict:
    """Anthropic counts prompt tokens the cache held apart: input_tokens + cache_read_input_tokens is the prompt."""
    s = job.stats
    return {"input_tokens": s.prompt_tokens - s.cached_tokens, "output_tokens": s.generated_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": s.cached_tokens}


class AnthropicEncoder(ReplyEncoder):
    """Anthropic's stream: message_start (and a ping), content blocks as they open, grow and close, message_delta
    with the stop reason and usage, message_stop; a `ping` event as its keep-alive, an `error` event if the
    generation fails. Whole, the message with the same blocks."""

    def __init__(self, job: Job, call: MessagesCall):
        self.job = job
        self.call = call
        self.blocks = AnthropicBlocks()
        self.head = {"id": f"msg_{secrets.token_hex(12)}", "type": "message", "role": "assistant",
                     "model": call.served.name}

    def start(self) -> bytes:
        return sse_event("message_start", {"message": {
            **self.head, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": len(self.job.prompt_tokens), "output_tokens": 0,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}}) + sse_event("ping", {})

    def reasoning(self, event: ReasoningEvent) -> bytes:
        return self.blocks.part("reasoning", event.text)

    def text(self, event: TextEvent) -> bytes:
        return self.blocks.part("text", event.text)

    def tool_calls(self, event: ToolCallsEvent) -> bytes:
        return self.blocks.close() + b"".join(self.blocks.tool_use(call) for call in event.calls)

    def ping(self, event: PingEvent) -> bytes:
        return sse_event("ping", {})

    def stop(self) -> dict:
        called = any(block["type"] == "tool_use" for block in self.blocks.content)
        return anthropic_stop(self.job, called, self.call.stop_sequences)

    def done(self, event: DoneEvent) -> bytes:
        return self.blocks.close() + sse_event("message_delta", {
            "delta": self.stop(), "usage": anthropic_usage(self.job)}) + sse_event("message_stop", {})

    def error(self, event: ErrorEvent) -> bytes:
        return self.blocks.close() + sse_event("error", {"error": {"type": "api_error", "message": event.message}})

    def whole(self, events: list[ReplyEvent]) -> dict:
        self.encode(events)            # the same blocks; the stream's bytes are not sent
        return {**self.head, "content": self.blocks.content, **self.stop(), "usage": anthropic_usage(self.job)}


def anthropic_messages_route(app, req):
    call = MessagesCall.parse(req)
    try:
        job = req.start_generation(call.request)
    except ContextOverflow as e:   # Claude Code reads these words to compact its conversation
        raise RequestError(f"prompt is too long: {e.n_prompt} tokens > {e.n_ctx} maximum") from None
    reply = ReplyReader(job, reasoning=True, tools=call.tools)
    encoder = AnthropicEncoder(job, call)
    if call.stream:
        return stream_reply("text/event-stream", reply, encoder)
    return JSONResponse(encoder.whole(reply.whole()))


def anthropic_count_tokens(app, req):
    call = MessagesCall.parse(req, count_only=True)
    req.ignored = call.request.ignored_fields
    return JSONResponse({"input_tokens": call.served.engine.count_prompt_tokens(call.request)})
