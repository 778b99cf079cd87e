"""The Anthropic Messages API (Claude Code and the anthropic SDK speak it)."""

from __future__ import annotations

import json
import secrets
from typing import Any, Callable, Iterator

from ..errors import ContextOverflow, RequestError
from ..fields import FieldReader, _asks, ignored_fields
from ..generation import GenerationRequest
from ..jobs import Job, StopReason
from ..chat.messages import tool_result_names
from ..chat.tools import ToolUse
from ..service.served_model import ServedModel
from ..service.exchange import JSONResponse, StreamResponse, wait_for_text
from .common import (
    ReplyParts, apply_output_format, block_request_fields, chat_request, max_reply_tokens, sse_event, text_only
)


ANTHROPIC_IGNORED_FIELDS: dict[str, Callable[[Any], bool]] = {
    "metadata": _asks, "service_tier": _asks, "container": _asks, "mcp_servers": _asks,
    "context_management": _asks,
}


ANTHROPIC_PING_SECONDS = 5.0      # a ping while nothing else is sent (a long prompt being read)


def anthropic_text(value: Any, where: str) -> str:
    """A string, or text blocks (others refused); `cache_control` on them needs nothing: prompts are cached anyway."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise RequestError(f"'{where}' must be a string or a list of text blocks")
    texts = []
    for j, block in enumerate(value):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind in ("image", "document", "search_result"):
            raise text_only(kind, f"{where}[{j}]")
        if kind != "text" or not isinstance(block.get("text"), str):
            raise RequestError(f"{where}[{j}] must be a text block ({{\"type\": \"text\", \"text\": ...}})")
        texts.append(block["text"])
    return "\n".join(texts)


def anthropic_messages(body: dict) -> list[dict]:
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
                result = anthropic_text(block.get("content") or "", f"{at}.content")
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
    return ToolUse(served.chat_template, functions, wanted, not (choice or {}).get("disable_parallel_tool_use"))


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


def anthropic_request(app, req, count_only: bool = False) -> tuple[GenerationRequest, ToolUse | None, list[str]]:
    """(the generation request, its tools, the client's own stop sequences)."""
    f = FieldReader(req.json())
    served = req.use(f.body.get("model"))
    ignored = ignored_fields(f.body, ANTHROPIC_IGNORED_FIELDS)
    messages = anthropic_messages(f.body)
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
    request = chat_request(served, messages, {**fields, "stop_strings": stops}, tools, template_vars)
    return request, tools, stops


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

    def finish(self, parts: ReplyParts) -> bytes:
        out = b"".join(self.part(kind, text) for kind, text in parts.finish()) + self.close()
        return out + b"".join(self.tool_use(call) for call in parts.calls)


def anthropic_stop(job: Job, parts: ReplyParts, stops: list[str]) -> dict:
    if parts.calls:
        return {"stop_reason": "tool_use", "stop_sequence": None}
    if job.buffer.stop_reason is StopReason.LENGTH:
        return {"stop_reason": "max_tokens", "stop_sequence": None}
    if job.stats.stop_string is not None and job.stats.stop_string in stops:
        return {"stop_reason": "stop_sequence", "stop_sequence": job.stats.stop_string}
    return {"stop_reason": "end_turn", "stop_sequence": None}


def anthropic_usage(job: Job) -> dict:
    """Anthropic counts prompt tokens the cache held apart: input_tokens + cache_read_input_tokens is the prompt."""
    s = job.stats
    return {"input_tokens": s.prompt_tokens - s.cached_tokens, "output_tokens": s.generated_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": s.cached_tokens}


def anthropic_start(req, request: GenerationRequest) -> Job:
    try:
        return req.start_generation(request)
    except ContextOverflow as e:   # Claude Code reads these words to compact its conversation
        raise RequestError(f"prompt is too long: {e.n_prompt} tokens > {e.n_ctx} maximum") from None


def anthropic_messages_route(app, req):
    request, tools, stops = anthropic_request(app, req)
    job = anthropic_start(req, request)
    head = {"id": f"msg_{secrets.token_hex(12)}", "type": "message", "role": "assistant", "model": req.use().name}
    parts, blocks = ReplyParts(job, tools), AnthropicBlocks()
    if FieldReader(req.json()).boolean("stream"):
        def events() -> Iterator[bytes]:
            yield sse_event("message_start", {"message": {
                **head, "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": len(job.prompt_tokens), "output_tokens": 0,
                          "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}}) + sse_event("ping", {})
            index = 0
            while True:
                new, done = job.buffer.read(index, timeout=ANTHROPIC_PING_SECONDS)
                index += len(new)
                if not new and not done:
                    yield sse_event("ping", {})
                    continue
                out = b"".join(blocks.part(kind, text) for piece in new for kind, text in parts.feed(piece))
                if out:
                    yield out
                if done and not new:
                    break
            if job.buffer.stop_reason is StopReason.FAILED:
                yield blocks.close() + sse_event("error", {"error": {
                    "type": "api_error", "message": job.buffer.error or "generation failed"}})
                return
            yield blocks.finish(parts) + sse_event("message_delta", {
                "delta": anthropic_stop(job, parts, stops), "usage": anthropic_usage(job)}) + sse_event("message_stop", {})
        return StreamResponse("text/event-stream", events(), job)
    text = wait_for_text(job)
    for kind, part in parts.feed(text):
        blocks.part(kind, part)
    blocks.finish(parts)
    return JSONResponse({**head, "content": blocks.content, **anthropic_stop(job, parts, stops),
                         "usage": anthropic_usage(job)})


def anthropic_count_tokens(app, req):
    request, _, _ = anthropic_request(app, req, count_only=True)
    req.ignored = request.ignored_fields
    return JSONResponse({"input_tokens": req.use().engine.count_prompt_tokens(request)})
