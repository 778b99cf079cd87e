"""Chat messages as clients send them, checked, as templates read them."""

from __future__ import annotations

import json
import secrets
from typing import Any

from ..errors import RequestError


CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


def parse_chat_messages(value: Any) -> list[dict]:
    """OpenAI- or Ollama-style messages; a 400 names the message that is wrong. Tool calls and tool
    results are kept as Hugging Face templates read them (arguments as objects)."""
    if not isinstance(value, list) or not value:
        raise RequestError("'messages' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, not {role!r}")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(f"messages[{i}].content[{j}] must be a text part "
                                       "({{\"type\": \"text\", \"text\": ...}}); images are not supported")
                texts.append(part["text"])
            content = "".join(texts)
        elif not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string or a list of text parts")
        message = {"role": "system" if role == "developer" else role, "content": content}
        if m.get("tool_calls"):
            message["tool_calls"] = [tool_call_of(call, f"messages[{i}].tool_calls[{j}]")
                                     for j, call in enumerate(m["tool_calls"] if isinstance(m["tool_calls"], list)
                                                              else [None])]
        for key in ("tool_call_id", "name", "tool_name"):
            if isinstance(m.get(key), str):
                message[key] = m[key]
        out.append(message)
    return out


def tool_call_of(call: Any, where: str) -> dict:
    """An assistant's earlier tool call, arguments as an object (OpenAI sends them as a JSON string)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise RequestError(f"{where} must be {{'function': {{'name': ..., 'arguments': ...}}}}")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise RequestError(f"{where}.function.arguments is not valid JSON") from None
    return {"id": call.get("id") or f"call_{secrets.token_hex(8)}", "type": "function",
            "function": {"name": function["name"], "arguments": arguments}}


def tool_result_names(messages: list[dict]) -> dict[str, str]:
    """call id -> tool name, for templates that show a tool result's name."""
    return {c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls", ())}
