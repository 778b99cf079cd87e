"""Tool calls: how tools reach the prompt, the grammar that forces a call, a reply read back as calls;
JSON schemas as grammars.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..errors import RequestError
from ..generation import SamplerSettings
from .partial_json import PartialJSON
from .template import ChatTemplate


def json_grammar(spec: Any, where: str) -> str:
    """GBNF for 'any JSON object' (spec True) or for a JSON schema (spec a dict)."""
    from llama_cpp import llama_grammar
    if spec is True:
        return llama_grammar.JSON_GBNF
    if not isinstance(spec, dict):
        raise RequestError(f"'{where}' must be a JSON schema object")
    try:
        return llama_grammar.json_schema_to_gbnf(json.dumps(spec))
    except Exception as e:   # the converter asserts or fails on what it cannot express
        raise RequestError(f"'{where}' is not a JSON schema this server can enforce: {e}") from None


class ToolUse:
    """The tools a chat request offers: how they reach the prompt, the grammar that enforces a call
    when one is required, and how the reply is read back as calls.

    The call format is the template's own, recognised from its source: Hermes and Qwen
    (`<tool_call>{...}</tool_call>`), Mistral (`[TOOL_CALLS][{...}]`), Llama 3 (`{"name", "parameters"}`,
    after `<|python_tag|>` or alone). A template that does not read `tools` gets them described in a
    system message, with the answer asked for as one JSON object `{"tool_calls": [...]}`.
    """

    def __init__(self, template: "ChatTemplate", tools: Any, choice: Any, parallel: bool | None):
        """`parallel`: whether the request allows several calls in one reply (None: it did not say). A call forced
        by name gives one call unless the request said yes; "auto" and "required" may give several unless it said
        no."""
        if not isinstance(tools, list) or not all(
                isinstance(t, dict) and isinstance(t.get("function"), dict)
                and isinstance(t["function"].get("name"), str) for t in tools):
            raise RequestError("'tools' must be a list of {'type': 'function', 'function': {'name': ...}}")
        self.tools = tools
        self.names = [t["function"]["name"] for t in tools]
        if parallel not in (None, True, False):
            raise RequestError("the parallel tool calls setting must be true or false")
        if choice in (None, "auto", "none", "required"):
            self.choice = choice or "auto"
        elif isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str):
            self.choice = choice["function"]["name"]
            if self.choice not in self.names:
                raise RequestError(f"'tool_choice' names {self.choice!r}, which is not in 'tools'")
        else:
            raise RequestError("'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', "
                               "'function': {'name': ...}}")
        self.parallel = parallel is True if self.forced_name else parallel is not False
        source = template.source
        self.format = ("hermes" if "<tool_call>" in source else "mistral" if "[TOOL_CALLS]" in source
                       else "llama3" if "<|python_tag|>" in source or ("tools" in source and '"parameters"' in source)
                       else "generic" if "tools" not in source else "hermes")
        self.template_reads_tools = "tools" in source

    @property
    def forced_name(self) -> str | None:
        """The one tool the request forces, if it names one."""
        return None if self.choice in ("auto", "none", "required") else self.choice

    @property
    def forced(self) -> bool:
        """Whether the reply must be a call (the grammar holds the model to the call's form)."""
        return self.choice not in ("auto", "none")

    @property
    def may_call(self) -> bool:
        """With tool_choice "none" the model sees the tools (and earlier calls) but its reply is text."""
        return self.choice != "none"

    def prompt(self, messages: list[dict]) -> tuple[list[dict], dict]:
        """Messages and template variables with the tools in them."""
        if self.template_reads_tools:
            return messages, {"tools": self.tools}
        specs = json.dumps([t["function"] for t in self.tools], ensure_ascii=False)
        guide = (f"You can call these tools: {specs}\nTo call tools, reply with only this JSON object: "
                 '{"tool_calls": [{"name": "<tool name>", "arguments": {<its arguments>}}]}. '
                 "Otherwise, answer normally.")
        out = []
        for m in messages:              # earlier calls and their results, as this format writes them
            if m.get("tool_calls"):
                calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                         for c in m["tool_calls"]]
                m = {"role": "assistant", "content": json.dumps({"tool_calls": calls}, ensure_ascii=False)}
            elif m["role"] == "tool":
                m = {"role": "user", "content": f"Tool result ({m.get('name') or m.get('tool_call_id') or 'call'}): "
                                                f"{m['content']}"}
            out.append(m)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + guide}
        else:
            out.insert(0, {"role": "system", "content": guide})
        return out, {}

    def apply(self, messages: list[dict], sampler: SamplerSettings) -> tuple[list[dict], dict]:
        """The tools into a chat request: its messages and template variables, and the grammar that
        forces a call (when one is required) onto its sampler."""
        messages, template_vars = self.prompt(messages)
        sampler.grammar = self.grammar() or sampler.grammar
        return messages, template_vars

    def grammar(self) -> str | None:
        """GBNF forcing a call, from the tools' JSON schemas, when one is required or named."""
        if self.choice in ("auto", "none"):
            return None
        from llama_cpp import llama_grammar
        wanted = [t for t in self.tools if self.choice == "required" or t["function"]["name"] == self.choice]
        args_key = "parameters" if self.format == "llama3" else "arguments"
        call = {"anyOf": [{"type": "object", "required": ["name", args_key], "properties": {
            "name": {"const": t["function"]["name"]},
            args_key: bounded_strings(t["function"].get("parameters") or {"type": "object"})}} for t in wanted]}
        most = self.MAX_CALLS if self.parallel else 1      # a forced reply must close within its length
        if self.format == "generic":
            schema = {"type": "object", "required": ["tool_calls"], "properties": {"tool_calls": {
                "type": "array", "items": call, "minItems": 1, "maxItems": most}}}
        elif self.format == "mistral":
            schema = {"type": "array", "items": call, "minItems": 1, "maxItems": most}
        else:
            schema = call
        try:
            gbnf = llama_grammar.json_schema_to_gbnf(json.dumps(schema))
        except Exception as e:
            raise RequestError(f"a tool's 'parameters' is not a JSON schema this server can enforce: {e}") from None
        body = gbnf.replace("root ::=", "call ::=", 1)
        if self.format == "hermes":
            repeat = ' ("\\n<tool_call>\\n" call "\\n</tool_call>")?' * (most - 1)
            return f'root ::= "<tool_call>\\n" call "\\n</tool_call>"{repeat}\n' + body
        if self.format == "mistral":
            return 'root ::= "[TOOL_CALLS]" call\n' + body
        return "root ::= call\n" + body

    CALL_STARTS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "{")
    MAX_CALLS = 4                  # calls in one reply when a call is forced and parallel calls are allowed

    def may_be_call(self, text: str) -> bool:
        """Whether a reply beginning so may still turn out to be a call (a stream holds it back)."""
        head = text.lstrip()
        return any(head.startswith(s) or s.startswith(head) for s in self.CALL_STARTS)

    def parse(self, text: str, cut: bool = False) -> tuple[str, list[dict]]:
        """(content, calls): each call {'name', 'arguments'} naming an offered tool. `cut`: the reply was stopped by
        its length limit; a call it was writing still comes back as a call (see _cut_calls), never as text."""
        found, content = [], text
        for block in re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.S):
            found += self._calls_in(block)
        if found:
            content = re.sub(r"<tool_call>.*?(</tool_call>|$)", "", text, flags=re.S)   # a cut last one too
        else:
            found = self._calls_in(self._call_body(text))
            if found:
                content = ""
        calls = [c for c in found if c["name"] in self.names]
        if cut and not calls and (self.forced or self.may_be_call(text)):
            calls = self._cut_calls(text)
            if self.forced:             # the grammar held it to a call's form: none of it is text
                return "", calls
            content = ""
        if not self.parallel:
            calls = calls[:1]
        return (content.strip() if calls else text), calls

    @staticmethod
    def _call_body(text: str) -> str:
        """The reply without the marker that opens a call in Mistral's and Llama 3's forms."""
        head = text.strip()
        for prefix in ("[TOOL_CALLS]", "<|python_tag|>", "<tool_call>"):
            if head.startswith(prefix):
                head = head[len(prefix):].strip()
        return head

    def _cut_calls(self, text: str) -> list[dict]:
        """The calls of a reply its length limit stopped: those written whole, else the one it was writing, with
        its name and the arguments written so far, closed into an object (a forced call whose name was cut is the
        forced tool's; otherwise a call whose name was not written whole is no call)."""
        last = text.rfind("<tool_call>")
        reader = PartialJSON(self._call_body(text[last:] if last >= 0 else text))
        items = self._call_items(reader.value())
        whole = [item for item in items if not reader.was_cut(item)]
        calls = []
        for item in whole or items[:1]:
            args = item.get("arguments", item.get("parameters", {}))
            name = item.get("name")
            if name not in self.names:
                name = self.forced_name
            if name is not None:
                calls.append({"name": name, "arguments": args if isinstance(args, dict) else {}})
        if not calls and self.forced_name is not None:
            calls = [{"name": self.forced_name, "arguments": {}}]
        return calls

    @staticmethod
    def _call_items(value: Any) -> list:
        if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
            value = value["tool_calls"]
        return [item for item in (value if isinstance(value, list) else [value]) if isinstance(item, dict)]

    @classmethod
    def _calls_in(cls, text: str) -> list[dict]:
        try:
            value = json.loads(text)
        except ValueError:
            return []
        calls = []
        for item in cls._call_items(value):
            if isinstance(item.get("name"), str):
                args = item.get("arguments", item.get("parameters", {}))
                if isinstance(args, str):
                    try:
                        args = json.loads(args)
                    except ValueError:
                        return []
                if isinstance(args, dict):
                    calls.append({"name": item["name"], "arguments": args})
        return calls


class CallWatch:
    """A streamed answer that may be a tool call: shown as it comes unless it begins like one, then
    held; at the end, read as calls (or shown after all)."""

    def __init__(self, tools: ToolUse | None):
        self.tools = tools if tools is not None and tools.may_call else None
        self.deciding = self.tools is not None
        self.held = ""
        self.calls: list[dict] = []

    def feed(self, answer: str) -> str:
        if not self.deciding:
            return answer
        self.held += answer
        if self.tools.may_be_call(self.held):
            return ""
        self.deciding = False
        out, self.held = self.held, ""
        return out

    def finish(self, answer: str = "", cut: bool = False) -> str:
        """What was held back (and `answer`, the rest) read as calls; what is text after all is returned. `cut`:
        the reply was stopped by its length limit."""
        text, self.held = self.held + answer, ""
        if self.tools is None or not text.strip():
            return text
        content, self.calls = self.tools.parse(text, cut)
        return content


TOOL_STRING_LIMIT = 100


def bounded_strings(schema: Any) -> Any:
    """The schema with a maxLength on every string that sets none, so that a forced call always
    closes within a reply's length, even from a small model that would ramble inside a string."""
    if isinstance(schema, list):
        return [bounded_strings(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: bounded_strings(v) for k, v in schema.items()}
    if out.get("type") == "string" and not {"maxLength", "enum", "const", "pattern", "format"} & out.keys():
        out["maxLength"] = TOOL_STRING_LIMIT
    return out
