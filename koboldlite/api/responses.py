"""The OpenAI Responses API (Codex CLI and client.responses speak it)."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, Callable

from ..errors import RequestError
from ..fields import FieldReader, _asks, ignored_fields
from ..jobs import Job, StopReason
from ..chat.messages import parts_text, tool_call_of, tool_result_names
from ..chat.tools import ToolUse
from ..service.served_model import ServedModel
from ..service.app import ResponseStore
from ..service.exchange import JSONResponse
from .common import (
    api_key_owner, apply_output_format, block_request_fields, chat_request, llama_timings, max_reply_tokens, media_list,
    text_only
)
from .reply import (
    SSE_PING, DoneEvent, ErrorEvent, PingEvent, ProgressEvent, ReasoningEvent, ReplyEncoder, ReplyEvent, ReplyReader,
    TextEvent, ToolCallsEvent, sse_event, stream_reply
)


RESPONSES_IGNORED_FIELDS: dict[str, Callable[[Any], bool]] = {
    "include": _asks, "prompt_cache_key": _asks, "client_metadata": _asks, "service_tier": _asks,
    "safety_identifier": _asks, "user": _asks, "truncation": lambda v: v == "auto", "background": _asks,
    "top_logprobs": _asks, "prompt": _asks, "max_tool_calls": _asks, "conversation": _asks, "stream_options": _asks,
}


def response_not_found(response_id: str) -> RequestError:
    return RequestError(f"no response with id {response_id!r} is stored here (it was never stored, was deleted, was "
                        f"made with another key, or was evicted: at most {ResponseStore.MAX_ITEMS} are kept)",
                        status=404, kind="invalid_request_error", code="not_found")


def responses_text(value: Any, where: str, media: bool = False) -> str | list[dict]:
    """Message content: a string, or parts (input_text, output_text...). Where `media` may stand (user input, tool
    output), input_image, input_file and input_audio parts make it a list of chat content parts (text, image_url,
    file, input_audio), as the stored conversation keeps it; elsewhere they are refused."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise RequestError(f"'{where}' must be a string or a list of content parts")
    parts: list[dict] = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "summary_text", "reasoning_text") \
                and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append({"type": "text", "text": part["refusal"]})
        elif kind in ("input_image", "input_file", "input_audio") and media:
            parts.append(responses_media_part(part, f"{where}[{j}]"))
        elif kind in ("input_image", "input_file", "input_audio"):
            raise text_only(kind.replace("input_", ""), f"{where}[{j}]")
        else:
            raise RequestError(f"{where}[{j}] must be an input_text or output_text part, not {kind!r}")
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def responses_media_part(part: dict, where: str) -> dict:
    """A Responses media part as the chat content part it is read as."""
    kind = part["type"]
    if part.get("file_id") is not None and not (part.get("image_url") or part.get("file_data")):
        raise RequestError(f"{where}.file_id: there is no files API here; send the file's data")
    if kind == "input_image":
        url = part.get("image_url")
        return {"type": "image_url", "image_url": {"url": url.get("url") if isinstance(url, dict) else url,
                                                   "detail": part.get("detail")}}
    if kind == "input_file":
        return {"type": "file", "file": {"file_data": part.get("file_data") or part.get("file_url")}}
    return {"type": "input_audio", "input_audio": part.get("input_audio")}


def responses_messages(value: Any, ignored: list[str], earlier: list[dict] = ()) -> list[dict]:
    """`input` (a string or items) as chat messages: function_call items become the assistant's tool_calls,
    function_call_output items tool messages, reasoning items the next assistant turn's reasoning_content."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise RequestError("'input' must be a string or a list of input items")
    out: list[dict] = []
    reasoning: list[str] = []
    names = tool_result_names(list(earlier))
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise RequestError(f"{where} must be an object")
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise RequestError(f"{where}.role must be user, assistant, system or developer, not {role!r}")
            message = {"role": "system" if role == "developer" else role,
                       "content": responses_text(item.get("content"), f"{where}.content", media=role == "user")}
            if role == "assistant" and reasoning:
                message["reasoning_content"], reasoning = "".join(reasoning), []
            out.append(message)
        elif kind == "function_call":
            if not isinstance(item.get("name"), str) or not isinstance(item.get("call_id"), str):
                raise RequestError(f"{where} must be a function_call with a 'name' and a 'call_id'")
            call = tool_call_of({"id": item["call_id"], "function": {"name": item["name"],
                                                                       "arguments": item.get("arguments") or "{}"}},
                                where)
            names[item["call_id"]] = item["name"]
            if out and out[-1]["role"] == "assistant":     # the calls of one turn follow its text
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
            if reasoning:
                out[-1]["reasoning_content"], reasoning = "".join(reasoning), []
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise RequestError(f"{where}.call_id must be a string")
            message = {"role": "tool", "tool_call_id": item["call_id"],
                       "content": responses_text(item.get("output") if item.get("output") is not None else "",
                                                 f"{where}.output", media=True)}
            if item["call_id"] in names:
                message["name"] = names[item["call_id"]]
            out.append(message)
        elif kind == "reasoning":
            reasoning.append(responses_text(item.get("content") or item.get("summary") or [], f"{where}.content"))
        elif kind == "item_reference":
            raise RequestError(f"{where}: item references are not served; send the items, or previous_response_id")
        else:
            ignored.append(f"input[{kind}]")      # another tool's call or output (local_shell_call...): not run here
    return out


def responses_tools(served: ServedModel, f: FieldReader, ignored: list[str]) -> ToolUse | None:
    """Flat function tools; the kinds this server cannot run (web_search, file_search, local_shell, custom, mcp,
    a namespace group...) are skipped and named, since Codex sends them on every request."""
    tools = f.body.get("tools") or []
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list of tools")
    functions = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise RequestError(f"tools[{i}] must be an object")
        if t.get("type") != "function":
            ignored.append(f"tools[{t.get('type')}]")
            continue
        if not isinstance(t.get("name"), str):
            raise RequestError(f"tools[{i}].name must be a string")
        functions.append({"type": "function", "function": {
            "name": t["name"], "description": t.get("description") or "",
            "parameters": t.get("parameters") or {"type": "object"}}})
    choice = f.body.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") == "function" and isinstance(choice.get("name"), str):
            choice = {"type": "function", "function": {"name": choice["name"]}}
        else:
            ignored.append("tool_choice")        # allowed_tools, or a tool kind not served: the model chooses
            choice = "auto"
    if not functions:
        return None
    return ToolUse(served.chat_template, functions, choice, f.body.get("parallel_tool_calls"))


class ResponseItems:
    """A reply's output items (reasoning, message, function calls), built as its parts arrive, with the
    stream events that announce them, each numbered (thrown away when the reply is not streamed)."""

    def __init__(self):
        self.output: list[dict] = []
        self.sequence = 0
        self._open: str | None = None

    def event(self, kind: str, **data) -> bytes:
        out = sse_event(kind, {"sequence_number": self.sequence, **data})
        self.sequence += 1
        return out

    def _add(self, item: dict, part: dict | None) -> bytes:
        self.output.append(item)
        index = len(self.output) - 1
        out = self.event("response.output_item.added", output_index=index,
                         item={**item, "status": "in_progress", "content": []} if part else dict(item))
        if part is not None:
            item["content"] = [part]
            out += self.event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                              part=dict(part))
        return out

    def part(self, kind: str, text: str, **extra) -> bytes:
        """Text of the reasoning or the message, opening its item first; `extra` fields go on the delta event."""
        item_type = "reasoning" if kind == "reasoning" else "message"
        out = b""
        if self._open != item_type:
            out += self.close()
            self._open = item_type
            if item_type == "reasoning":
                out += self._add({"type": "reasoning", "id": f"rs_{secrets.token_hex(12)}", "summary": [],
                                  "status": "in_progress"}, {"type": "reasoning_text", "text": ""})
            else:
                out += self._add({"type": "message", "id": f"msg_{secrets.token_hex(12)}", "role": "assistant",
                                  "status": "in_progress"}, {"type": "output_text", "text": "", "annotations": [],
                                                             "logprobs": []})
        item = self.output[-1]
        item["content"][0]["text"] += text
        where = dict(item_id=item["id"], output_index=len(self.output) - 1, content_index=0)
        if item_type == "reasoning":
            return out + self.event("response.reasoning_text.delta", **where, delta=text, **extra)
        return out + self.event("response.output_text.delta", **where, delta=text, logprobs=[], **extra)

    def close(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        item = self.output[-1]
        item["status"] = "completed"
        part = item["content"][0]
        where = dict(item_id=item["id"], output_index=len(self.output) - 1, content_index=0)
        done = "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
        return (self.event(done, **where, text=part["text"], **({} if item["type"] == "reasoning" else {"logprobs": []}))
                + self.event("response.content_part.done", **where, part=dict(part))
                + self.event("response.output_item.done", output_index=len(self.output) - 1, item=dict(item)))

    def function_call(self, call: dict) -> bytes:
        out = self.close()
        arguments = json.dumps(call["arguments"], ensure_ascii=False)
        item = {"type": "function_call", "id": f"fc_{secrets.token_hex(12)}", "call_id": f"call_{secrets.token_hex(12)}",
                "name": call["name"], "arguments": "", "status": "in_progress"}
        out += self._add(item, None)
        index = len(self.output) - 1
        out += self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                          delta=arguments)
        item.update(arguments=arguments, status="completed")
        return out + self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                name=item["name"], arguments=arguments) + \
            self.event("response.output_item.done", output_index=index, item=dict(item))

    def as_message(self) -> dict:
        """The reply as the assistant turn of a stored conversation."""
        message = {"role": "assistant", "content": "".join(
            i["content"][0]["text"] for i in self.output if i["type"] == "message")}
        reasoning = "".join(i["content"][0]["text"] for i in self.output if i["type"] == "reasoning")
        if reasoning:
            message["reasoning_content"] = reasoning
        calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"],
                                                                       "arguments": json.loads(i["arguments"])}}
                 for i in self.output if i["type"] == "function_call"]
        if calls:
            message["tool_calls"] = calls
        return message


class ResponsesCall:
    """One /v1/responses request, read once: its conversation (the stored one it continues, then its input), the
    generation request made of it, and the response object it answers with."""

    def __init__(self, app, req, count_only: bool = False):
        self.app = app
        f = self.f = FieldReader(req.json())
        self.ignored = ignored_fields(f.body, RESPONSES_IGNORED_FIELDS)
        self.owner = api_key_owner(req)
        self.previous_id = f.string("previous_response_id") or None
        earlier = self._earlier()
        if f.body.get("input") is None and not earlier:
            raise RequestError("'input' is required")
        self.conversation = earlier + responses_messages(f.body.get("input") or [], self.ignored, earlier)
        instructions = f.string("instructions")
        messages = ([{"role": "system", "content": instructions}] if instructions else []) + self.conversation
        if not messages:
            raise RequestError("'input' must hold at least one item")
        max_output = None if count_only else max_reply_tokens(f, "max_output_tokens")
        fields = block_request_fields(req, f, max_output, self.ignored)
        self.sampler = fields["sampler"]
        self.format = self._text_format(f)
        template_vars = self._reasoning_vars(f)
        self.served = served = req.use(f.body.get("model"))
        self.tools = responses_tools(served, f, self.ignored)
        media = media_list(req, served)           # the stored turns' media too: they are read again with their words
        messages = [{**m, "content": parts_text(m["content"], f"conversation[{i}].content", media)}
                    if isinstance(m["content"], list) else m for i, m in enumerate(messages)]
        self.request = chat_request(served, messages, {**fields, "media": media}, self.tools, template_vars)
        self.stream = f.boolean("stream")
        self.return_progress = f.boolean("return_progress")          # llama-server's
        self.timings_per_token = f.boolean("timings_per_token")
        self.id = f"resp_{secrets.token_hex(16)}"
        self.created = int(time.time())
        self.store = f.body.get("store") is not False

    def _earlier(self) -> list[dict]:
        """The conversation of the stored response this one continues (previous_response_id), if any."""
        if self.previous_id is None:
            return []
        stored = self.app.responses.get(self.owner, self.previous_id)
        if stored is None:
            raise response_not_found(self.previous_id)
        return stored[1]

    def _text_format(self, f: FieldReader) -> dict:
        text = f.body.get("text")
        if text is None:
            return {"type": "text"}
        fmt = text.get("format") if isinstance(text, dict) else None
        if isinstance(text, dict) and text.get("verbosity") is not None:
            self.ignored.append("text.verbosity")
        if fmt is None:
            return {"type": "text"}
        apply_output_format(self.sampler, fmt.get("type") if isinstance(fmt, dict) else None,
                            fmt.get("schema") if isinstance(fmt, dict) else None, "text.format", "text.format.schema")
        return fmt

    def _reasoning_vars(self, f: FieldReader) -> dict:
        """`reasoning.effort` "none" turns a template's thinking off (`enable_thinking`), any other on."""
        reasoning = f.body.get("reasoning")
        if not isinstance(reasoning, dict):
            return {}
        if reasoning.get("summary") is not None:
            self.ignored.append("reasoning.summary")     # the reasoning itself is given, not a summary
        effort = reasoning.get("effort")
        return {} if effort is None else {"enable_thinking": effort != "none"}

    def usage(self, items: ResponseItems, job: Job) -> dict:
        s = job.stats
        reasoning = "".join(i["content"][0]["text"] for i in items.output if i["type"] == "reasoning")
        return {"input_tokens": s.prompt_tokens, "input_tokens_details": {"cached_tokens": s.cached_tokens},
                "output_tokens": s.generated_tokens, "output_tokens_details": {
                    "reasoning_tokens": len(self.served.model.tokenize(reasoning)) if reasoning else 0},
                "total_tokens": s.prompt_tokens + s.generated_tokens}

    def response(self, status: str, items: ResponseItems, job: Job | None = None, error: dict | None = None) -> dict:
        f = self.f
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "background": False, "error": error,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": f.body.get("instructions"), "max_output_tokens": f.body.get("max_output_tokens"),
                "model": self.served.name, "output": [dict(i) for i in items.output] if status != "in_progress"
                else [], "parallel_tool_calls": f.body.get("parallel_tool_calls") is not False,
                "previous_response_id": self.previous_id,
                "reasoning": {"effort": (f.body.get("reasoning") or {}).get("effort"), "summary": None},
                "store": self.store, "temperature": self.sampler.temperature, "top_p": self.sampler.top_p,
                "text": {"format": self.format}, "tool_choice": f.body.get("tool_choice") or "auto",
                "tools": [{"type": "function", **t["function"]} for t in self.tools.tools] if self.tools else [],
                "truncation": "disabled",
                "usage": self.usage(items, job) if job is not None and status != "in_progress" else None,
                "metadata": f.body.get("metadata") or {}}

    def keep(self, response: dict, items: ResponseItems):
        if self.store and response["status"] != "failed":
            self.app.responses.put(self.owner, response, self.conversation + [items.as_message()])


class ResponsesEncoder(ReplyEncoder):
    """The Responses API's stream: response.created and .in_progress, output items (reasoning, the message, function
    calls) as they open, grow and close, each event numbered, then response.completed or .incomplete (or .failed); a
    comment line as its keep-alive (it has no number). Whole, the response with the same items."""

    def __init__(self, job: Job, call: ResponsesCall):
        self.job = job
        self.call = call
        self.items = ResponseItems()

    def start(self) -> bytes:
        in_progress = self.call.response("in_progress", self.items)
        return self.items.event("response.created", response=in_progress) + \
            self.items.event("response.in_progress", response=in_progress)

    def timings(self) -> dict:
        """With timings_per_token, llama-server's timings so far on each delta."""
        return {"timings": llama_timings(self.job)} if self.call.timings_per_token else {}

    def reasoning(self, event: ReasoningEvent) -> bytes:
        return self.items.part("reasoning", event.text, **self.timings())

    def text(self, event: TextEvent) -> bytes:
        return self.items.part("text", event.text, **self.timings())

    def progress(self, event: ProgressEvent) -> bytes:
        """llama-server's form: response.in_progress again, with prompt_progress."""
        if not self.call.return_progress:
            return b""
        return self.items.event("response.in_progress", response=self.call.response("in_progress", self.items),
                                prompt_progress=event.progress.to_json())

    def tool_calls(self, event: ToolCallsEvent) -> bytes:
        return self.items.close() + b"".join(self.items.function_call(call) for call in event.calls)

    def ping(self, event: PingEvent) -> bytes:
        return SSE_PING

    def finished(self, event: DoneEvent) -> dict:
        """The response as its reply ended, stored unless the client said "store": false."""
        status = "incomplete" if event.reason is StopReason.LENGTH else "completed"
        response = self.call.response(status, self.items, self.job)
        self.call.keep(response, self.items)
        return response

    def done(self, event: DoneEvent) -> bytes:
        out = self.items.close()
        response = self.finished(event)
        return out + self.items.event(f"response.{response['status']}", response=response,
                                      timings=llama_timings(self.job))      # llama-server's, beside the response

    def error(self, event: ErrorEvent) -> bytes:
        out = self.items.close()
        response = self.call.response("failed", self.items, self.job, {"code": "server_error",
                                                                       "message": event.message})
        return out + self.items.event("response.failed", response=response)

    def whole(self, events: list[ReplyEvent]) -> dict:
        self.encode(events[:-1])       # the same items; the stream's bytes are not sent
        self.items.close()
        return self.finished(events[-1])


def responses_create(app, req):
    call = ResponsesCall(app, req)
    job = req.start_generation(call.request)
    reply = ReplyReader(job, reasoning=True, tools=call.tools, progress=call.return_progress)
    encoder = ResponsesEncoder(job, call)
    if call.stream:
        return stream_reply("text/event-stream", reply, encoder)
    return JSONResponse(encoder.whole(reply.whole()))


def responses_input_tokens(app, req):
    call = ResponsesCall(app, req, count_only=True)
    req.ignored = call.ignored
    return JSONResponse({"object": "response.input_tokens",
                         "input_tokens": call.served.engine.count_prompt_tokens(call.request)})


def responses_by_id(app, req):
    """GET or DELETE /v1/responses/{id}: only the key that stored it reaches it."""
    response_id = req.path.rsplit("/", 1)[1]
    owner = api_key_owner(req)
    if req.method == "DELETE":
        if not app.responses.delete(owner, response_id):
            raise response_not_found(response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})
    stored = app.responses.get(owner, response_id)
    if stored is None:
        raise response_not_found(response_id)
    return JSONResponse(stored[0])
