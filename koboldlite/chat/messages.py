"""Chat messages as clients send them, checked, as templates read them."""

from __future__ import annotations

import json
import secrets
from typing import Any

from ..errors import RequestError
from ..media import MediaKind
from ..media_urls import MediaList


CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


def parse_chat_messages(value: Any, media: MediaList | None = None) -> list[dict]:
    """OpenAI- or Ollama-style messages; a 400 names the message that is wrong. Tool calls and tool
    results are kept as Hugging Face templates read them (arguments as objects), an assistant turn's thinking as
    its `reasoning_content` (templates that show earlier thinking read it there). Where `media` is given, an
    image or audio part (and an Ollama message's `images`) is read into it and stands in the content as
    MEDIA_MARKER, where the part was."""
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
            content = parts_text(content, f"messages[{i}].content", media)
        elif not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string or a list of text parts")
        if m.get("images") and media is not None:        # Ollama's: before the message's words, as Ollama puts them
            images = m["images"] if isinstance(m["images"], list) else [m["images"]]
            content = "".join(media.add(image, f"messages[{i}].images[{j}]", (MediaKind.IMAGE,))
                              for j, image in enumerate(images)) + content
        message = {"role": "system" if role == "developer" else role, "content": content}
        if m.get("tool_calls"):
            message["tool_calls"] = [tool_call_of(call, f"messages[{i}].tool_calls[{j}]")
                                     for j, call in enumerate(m["tool_calls"] if isinstance(m["tool_calls"], list)
                                                              else [None])]
        for key in ("tool_call_id", "name", "tool_name"):
            if isinstance(m.get(key), str):
                message[key] = m[key]
        reasoning = earlier_reasoning(m, f"messages[{i}]")
        if reasoning and message["role"] == "assistant":
            message["reasoning_content"] = reasoning
        out.append(message)
    return out


def earlier_reasoning(m: dict, where: str) -> str:
    """An earlier assistant turn's thinking, for templates that show it: OpenAI chat's `reasoning_content` (as
    llama-server takes it back), `reasoning` (OpenRouter's and vLLM's name), Ollama's `thinking`."""
    for key in ("reasoning_content", "reasoning", "thinking"):
        value = m.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise RequestError(f"{where}.{key} must be a string")
        return value
    return ""


def parts_text(parts: list, where: str, media: MediaList | None) -> str:
    """Content parts as text, each image or audio part read into `media` and standing as MEDIA_MARKER."""
    return "".join(_part_text(part, f"{where}[{j}]", media) for j, part in enumerate(parts))


def _part_text(part: Any, where: str, media: MediaList | None) -> str:
    """A content part's text: its words, or MEDIA_MARKER for an image or audio part read into `media`."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return part["text"]
    if kind in ("image_url", "input_audio", "file"):
        if media is None:
            raise RequestError(f"{where}: {'audio' if kind == 'input_audio' else 'image'} input is not supported here")
        if kind == "image_url":
            url = part.get("image_url")
            data = url.get("url") if isinstance(url, dict) else url          # some clients send the URL bare
            if isinstance(url, dict) and url.get("detail") not in (None, "auto") and "detail" not in media.ignored:
                media.ignored.append("detail")     # the projector reads every image at its one resolution
            allowed = (MediaKind.IMAGE,)
        elif kind == "input_audio":
            audio = part.get("input_audio")
            data = audio.get("data") if isinstance(audio, dict) else None
            allowed = (MediaKind.AUDIO,)
        else:                           # OpenAI's file part: here, an image or an audio file by its data
            file = part.get("file") if isinstance(part.get("file"), dict) else {}
            if file.get("file_id") is not None and file.get("file_data") is None:
                raise RequestError(f"{where}.file.file_id: there is no files API here; send file_data")
            data = file.get("file_data")
            allowed = (MediaKind.IMAGE, MediaKind.AUDIO)
        return media.add(data, where, allowed)
    raise RequestError(f"{where} must be a text part ({{\"type\": \"text\", \"text\": ...}}), an image_url, "
                       f"an input_audio or a file part")


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
