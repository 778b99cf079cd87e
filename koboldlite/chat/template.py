"""Chat templates, rendered in a sandboxed Jinja as transformers renders them; KoboldCpp's instruct
placeholders.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import re
import time
from typing import Callable

from ..errors import RequestError
from ..config import BUILTIN_CHAT_TEMPLATES
from ..generation import GenerationRequest
from ..engine.llama_model import LlamaModel


class ChatTemplate:
    """A Jinja chat template rendered in a sandbox, as Hugging Face tokenizers render it."""

    END_OF_TURN_MARKERS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>")

    def __init__(self, source: str, name: str, model: LlamaModel):
        import jinja2.ext
        import jinja2.sandbox
        # As transformers renders templates: loop controls, a tojson that does not escape HTML, and
        # the {% generation %} tag (which marks the assistant's text for training; here it just renders).
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, generation_tag()])
        env.filters["tojson"] = lambda value, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
            json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals["raise_exception"] = self._raise
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
        self.source = source
        self.name = name
        self.template = env.from_string(source)
        self.bos_text = model.piece(model.bos, special=True).decode("utf-8", "replace") if model.bos >= 0 else ""
        self.eos_text = model.piece(model.eos, special=True).decode("utf-8", "replace") if model.eos >= 0 else ""
        # The template's end-of-turn marker ends a reply, whether the model emits it as a token or as text.
        self.stop_strings = [m for m in self.END_OF_TURN_MARKERS if m in source]
        self.stop_token_ids = []
        for marker in self.stop_strings:
            ids = model.tokenize(marker, parse_special=True)
            if len(ids) == 1:
                self.stop_token_ids.append(ids[0])

    @staticmethod
    def _raise(message: str):
        raise RequestError(f"the chat template rejected these messages: {message}")

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
        import jinja2
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_text, eos_token=self.eos_text, **variables)
        except jinja2.TemplateError as e:
            raise RequestError(f"the chat template could not render these messages: {e}") from None

    def generation_request(self, messages: list[dict], stop_strings: list[str] = (), template_vars: dict | None = None,
                           **fields) -> GenerationRequest:
        """The request for a chat; its leading system turns are what a context shift keeps.
        `template_vars`: more variables real templates read (`tools`, `enable_thinking`)."""
        system = list(itertools.takewhile(lambda m: m["role"] == "system", messages))
        try:
            keep = self.render(system, add_generation_prompt=False) if system else ""
        except RequestError:       # a template that wants a user turn after the system one
            keep = ""
        return self.prompt_request(self.render(messages, **(template_vars or {})), stop_strings=list(stop_strings),
                                   keep_prefix=keep, next_turn=self._next_turn(messages, template_vars or {}),
                                   **fields)

    def _next_turn(self, messages: list[dict], variables: dict) -> Callable[[str], str | None]:
        def next_turn(reply: str) -> str | None:
            """The next prompt's text up to where its user's words go, should the client send the reply back."""
            marker = "\x00next-turn\x00"
            try:
                text = self.render(messages + [{"role": "assistant", "content": reply},
                                               {"role": "user", "content": marker}],
                                   add_generation_prompt=False, **variables)
            except RequestError:
                return None
            cut = text.find(marker)
            return text[:cut] if cut > 0 else None
        return next_turn

    def prompt_request(self, prompt: str, memory: str = "", stop_strings: list[str] = (),
                       **fields) -> GenerationRequest:
        """A request for text this template rendered: its own BOS (none added on top), and its end of
        turn ends the reply."""
        head = memory or prompt
        return GenerationRequest(prompt=prompt, memory=memory,
                                 add_bos=not (self.bos_text and head.startswith(self.bos_text)),
                                 stop_strings=list(stop_strings) + self.stop_strings,
                                 stop_token_ids=list(self.stop_token_ids), **fields)

    # -- KoboldCpp's instruct placeholders --------------------------------------------

    def render_instruct(self, memory: str, prompt: str) -> tuple[str, str] | None:
        """Memory and prompt written with {{[INPUT]}}-style placeholders, rendered as this template
        renders the same conversation; None when neither holds one. Text before the first placeholder
        stays in front as it is, and text after an unclosed last turn starts that turn's text (after
        {{[OUTPUT]}}: the start of the reply). The memory's whole turns stay in the memory part, so a
        story cut from the front still keeps them."""
        if not (INSTRUCT_PLACEHOLDER.search(memory) or INSTRUCT_PLACEHOLDER.search(prompt)):
            return None
        convo = InstructConversation.parse(memory + prompt)
        rendered = self._render_conversation(convo)
        if not INSTRUCT_PLACEHOLDER.search(memory):
            kept = memory                               # plain memory: in front, as it is
        else:
            in_memory = InstructConversation.parse(memory)
            whole = in_memory.messages + ([in_memory.open_message()] if in_memory.open_role else [])
            if INSTRUCT_PLACEHOLDER.match(prompt.lstrip()) is None and in_memory.open_role:
                whole = in_memory.messages             # the memory's last turn goes on in the prompt
            kept = in_memory.prefix + self._strip_bos(self.render(whole, add_generation_prompt=False)) \
                if whole else in_memory.prefix
        bos = self.bos_text if self.bos_text and rendered.startswith(self.bos_text) else ""
        body = rendered[len(bos):]
        if body.startswith(kept):
            return bos + kept, body[len(kept):]
        return "", rendered

    def _strip_bos(self, text: str) -> str:
        return text[len(self.bos_text):] if self.bos_text and text.startswith(self.bos_text) else text

    def _render_conversation(self, convo: "InstructConversation") -> str:
        messages = convo.messages
        if convo.open_role == "assistant":
            text = self.render(messages, add_generation_prompt=True) + convo.tail.lstrip()
        elif convo.open_role is not None:
            # An unclosed user or system turn: render up to where its text goes, then the text itself.
            marker = "\x00open-turn\x00"
            full = self.render(messages + [{"role": convo.open_role, "content": marker}], add_generation_prompt=False)
            cut = full.find(marker)
            text = full[:cut] + convo.tail.lstrip() if cut >= 0 else \
                self.render(messages + [convo.open_message()], add_generation_prompt=False)
        else:
            text = self.render(messages, add_generation_prompt=False)
        if convo.prefix:
            bos = self.bos_text if self.bos_text and text.startswith(self.bos_text) else ""
            text = bos + convo.prefix + text[len(bos):]
        return text

    def instruct_stops(self, stops: list[str]) -> list[str]:
        """Placeholders in stop strings become where this template starts (or, for the _END forms,
        ends) that role's turn; one that maps to nothing is dropped."""
        markers = self.turn_markers
        out = []
        for stop in stops:
            replaced = INSTRUCT_PLACEHOLDER.sub(
                lambda m: markers.get((PLACEHOLDER_ROLES[m.group(1)], bool(m.group(2))), ""), stop)
            if replaced.strip():
                out.append(replaced.strip() if INSTRUCT_PLACEHOLDER.fullmatch(stop) else replaced)
        return out

    @functools.cached_property
    def turn_markers(self) -> dict[tuple[str, bool], str]:
        """(role, is_end) -> the text this template puts at the start or end of that role's turn,
        found by rendering a probe conversation and reading what stands between its messages."""
        words = {k: f"KLPROBE{k}X" for k in ("S", "U1", "A1", "U2", "A2")}
        probe = [("user", "U1"), ("assistant", "A1"), ("user", "U2"), ("assistant", "A2")]
        rendered = None
        for with_system in (True, False):
            msgs = ([("system", "S")] if with_system else []) + probe
            try:
                text = self.render([{"role": r, "content": words[k]} for r, k in msgs], add_generation_prompt=False)
            except RequestError:
                continue
            if all(words[k] in text for _, k in msgs):
                rendered = text
                break
        markers: dict[tuple[str, bool], str] = {}
        if rendered is None:
            return markers

        def between(a: str, b: str) -> str:
            start = rendered.index(words[a]) + len(words[a])
            return rendered[start:rendered.index(words[b], start)]

        for role, before, after in (("user", "A1", "U2"), ("assistant", "U2", "A2")):
            gap = between(before, after).strip()
            previous = "assistant" if role == "user" else "user"
            for end in self.END_OF_TURN_MARKERS:
                if gap.startswith(end):
                    markers[(previous, True)] = end
                    gap = gap[len(end):].strip()
                    break
            markers[(role, False)] = gap
        if words["S"] in rendered:
            head = self._strip_bos(rendered[:rendered.index(words["S"])]).strip()
            if head and not head.startswith(markers.get(("user", False), "\x00")):
                markers[("system", False)] = head
            after_system = between("S", "U1").strip()
            for end in self.END_OF_TURN_MARKERS:
                if after_system.startswith(end):
                    markers[("system", True)] = end
        return markers


@functools.cache
def generation_tag() -> type:
    """The Jinja extension for transformers' {% generation %}...{% endgeneration %}: renders its body."""
    import jinja2.ext

    class GenerationTag(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return GenerationTag


INSTRUCT_PLACEHOLDER = re.compile(r"\{\{\[(SYSTEM|INPUT|OUTPUT)(_END)?\]\}\}")


PLACEHOLDER_ROLES = {"SYSTEM": "system", "INPUT": "user", "OUTPUT": "assistant"}


@dataclasses.dataclass
class InstructConversation:
    """Text with KoboldCpp's instruct placeholders, read as a conversation."""
    prefix: str                   # text before the first placeholder
    messages: list[dict]          # closed turns
    open_role: str | None         # the role of a last turn left open (no _END, nothing after)
    tail: str                     # that open turn's text so far

    @classmethod
    def parse(cls, text: str) -> "InstructConversation":
        parts = INSTRUCT_PLACEHOLDER.split(text)   # text, (kind, end, text)*
        convo = cls(prefix=parts[0], messages=[], open_role=None, tail="")
        current: dict | None = None
        for i in range(1, len(parts), 3):
            kind, is_end, body = parts[i], parts[i + 1], parts[i + 2]
            if is_end:
                if current is not None:
                    convo.messages.append(current)
                    current = None
                if body.strip():          # stray text between turns belongs to the one before it
                    if convo.messages:
                        convo.messages[-1]["content"] += "\n" + body.strip()
                    else:
                        convo.prefix += body
                continue
            if current is not None:
                convo.messages.append(current)
            current = {"role": PLACEHOLDER_ROLES[kind], "content": body}
        if current is not None:
            convo.open_role, convo.tail = current["role"], current["content"]
        for m in convo.messages:
            m["content"] = m["content"].strip()
        convo.messages = [m for m in convo.messages if m["content"]]
        return convo

    def open_message(self) -> dict:
        return {"role": self.open_role, "content": self.tail.strip()}


def load_chat_template(model: LlamaModel, choice: str | None) -> tuple[ChatTemplate, str]:
    """The template to use, and a line saying where it came from."""
    if choice in BUILTIN_CHAT_TEMPLATES:
        return ChatTemplate(BUILTIN_CHAT_TEMPLATES[choice], choice, model), f"chat template: built-in {choice}"
    if choice:
        with open(choice, encoding="utf-8") as f:
            return ChatTemplate(f.read(), os.path.basename(choice), model), f"chat template: {choice}"
    own = model.metadata("tokenizer.chat_template")
    if own:
        return ChatTemplate(own, "model", model), "chat template: the model's own"
    return (ChatTemplate(BUILTIN_CHAT_TEMPLATES["chatml"], "chatml", model),
            "chat template: the model has none; using ChatML (choose another with --chat-template)")
