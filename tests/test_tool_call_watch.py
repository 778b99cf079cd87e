"""CallWatch on its own: a streamed answer that may be a tool call. Text that cannot begin a call is shown at once;
a reply that begins like one is held and read as calls at the end; a held start that turns out to be text is let
go. ToolUse is built over a stand-in template (it reads only the template's source). (The APIs' use of it on the
real model is in tests/test_tools_reasoning_embeddings.py and tests/test_agent_apis.py.)"""

from __future__ import annotations

import json
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from koboldlite.errors import RequestError
from koboldlite.chat.tools import CallWatch, ToolUse
from koboldlite.api.openai import openai_tool_calls

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}

# What each template family's source has in it that tells ToolUse its call format.
HERMES = types.SimpleNamespace(source="{% for tool in tools %}{{ tool }}{% endfor %}<tool_call>...</tool_call>")
MISTRAL = types.SimpleNamespace(source="{% if tools %}[AVAILABLE_TOOLS]{{ tools }}{% endif %}[TOOL_CALLS]")
LLAMA3 = types.SimpleNamespace(source='{% if tools %}{"name": ..., "parameters": ...}{% endif %}<|python_tag|>')
PLAIN = types.SimpleNamespace(source="{% for m in messages %}{{ m.content }}{% endfor %}")      # reads no tools

HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
PARIS = {"name": "get_weather", "arguments": {"city": "Paris"}}


def watch(template=HERMES, choice=None, parallel=True, tools=(WEATHER, TIME)) -> CallWatch:
    return CallWatch(ToolUse(template, list(tools), choice, parallel))


def stream(w: CallWatch, pieces: list[str]) -> tuple[list[str], str]:
    """What each piece lets through, and what the end gives."""
    return [w.feed(p) for p in pieces], w.finish()


def pieces_of(text: str, size: int = 3) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def test_the_stand_in_templates_give_the_formats_they_stand_for():
    formats = [ToolUse(t, [WEATHER], None, True).format for t in (HERMES, MISTRAL, LLAMA3, PLAIN)]
    assert formats == ["hermes", "mistral", "llama3", "generic"]


def test_text_that_does_not_begin_like_a_call_passes_at_once():
    w = watch()
    shown, end = stream(w, ["The", " weather", " is fine", " {today}"])
    assert shown == ["The", " weather", " is fine", " {today}"] and end == "" and w.calls == []


def test_a_call_is_held_to_the_end_and_read_as_calls():
    w = watch()
    shown, end = stream(w, pieces_of(HERMES_CALL))
    assert set(shown) == {""}                    # no part of the call reached the client as text
    assert end == "" and w.calls == [PARIS]
    (call,) = openai_tool_calls(w.calls)
    assert call["type"] == "function" and call["id"].startswith("call_") and len(call["id"]) > 10
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_each_calls_id_is_its_own():
    w = watch()
    stream(w, [HERMES_CALL + "\n" + HERMES_CALL.replace("Paris", "Oslo")])
    assert [c["arguments"]["city"] for c in w.calls] == ["Paris", "Oslo"]
    ids = [c["id"] for c in openai_tool_calls(w.calls)]
    assert len(set(ids)) == 2


def test_the_last_piece_may_come_with_finish():
    w = watch()
    assert w.feed(HERMES_CALL[:20]) == ""
    assert w.finish(HERMES_CALL[20:]) == "" and w.calls == [PARIS]


def test_space_before_a_call_still_holds_it():
    w = watch()
    shown, end = stream(w, ["\n", "  ", HERMES_CALL])
    assert set(shown) == {""} and w.calls == [PARIS]


@pytest.mark.parametrize("template, text", [
    (MISTRAL, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]'),
    (LLAMA3, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}'),
    (LLAMA3, '{"name": "get_weather", "parameters": {"city": "Paris"}}'),
    (PLAIN, '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}'),
    (HERMES, '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}'),     # arguments as a string
])
def test_each_formats_call_is_held_and_read(template, text):
    w = watch(template)
    shown, end = stream(w, pieces_of(text, 4))
    assert set(shown) == {""} and end == "" and w.calls == [PARIS]


@pytest.mark.parametrize("pieces, shown_at", [
    (["<tool", "box is here"], 1),                 # "<tool" may begin <tool_call>; "<toolbox" cannot
    (["[TOOL", "S] are listed"], 1),
    (["<|py", "thon|> is a tag"], 1),
    ([" <", "b>bold</b>"], 1),
])
def test_a_held_start_that_turns_out_to_be_text_is_let_go_whole(pieces, shown_at):
    w = watch()
    shown, end = stream(w, [*pieces, " and more"])
    assert shown[:shown_at] == [""] * shown_at
    assert shown[shown_at] == "".join(pieces)     # all that was held, at once, in order
    assert shown[shown_at + 1] == " and more"     # then text passes at once
    assert end == "" and w.calls == []


def test_a_reply_held_to_the_end_that_is_no_call_is_shown_then():
    w = watch()
    shown, end = stream(w, ["{", "not json at all"])
    assert shown == ["", ""] and end == "{not json at all" and w.calls == []
    # JSON, but not a call of an offered tool: text too.
    w = watch()
    text = '{"name": "launch_rockets", "arguments": {}}'
    shown, end = stream(w, pieces_of(text))
    assert set(shown) == {""} and end == text and w.calls == []


def test_text_around_a_hermes_call_is_kept_as_content():
    w = watch()
    shown, end = stream(w, [HERMES_CALL, "\nDone."])
    assert set(shown) == {""} and end == "Done." and w.calls == [PARIS]


def test_one_call_only_without_parallel_calls():
    w = watch(parallel=False)
    stream(w, [HERMES_CALL + HERMES_CALL.replace("get_weather", "get_time")])
    assert [c["name"] for c in w.calls] == ["get_weather"]


def test_tool_choice_none_shows_even_a_call_as_text():
    w = watch(choice="none")
    shown, end = stream(w, pieces_of(HERMES_CALL))
    assert "".join(shown) == HERMES_CALL and end == "" and w.calls == [] and openai_tool_calls(w.calls) == []


def test_without_tools_everything_passes():
    w = CallWatch(None)
    assert w.feed(HERMES_CALL) == HERMES_CALL and w.finish(" tail") == " tail" and w.calls == []


def test_a_named_or_required_choice_still_reads_the_call():
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        w = watch(choice=choice)
        shown, _ = stream(w, pieces_of(HERMES_CALL))
        assert set(shown) == {""} and w.calls == [PARIS]


def test_a_choice_naming_no_offered_tool_is_refused():
    with pytest.raises(RequestError, match="not in 'tools'"):
        watch(choice={"type": "function", "function": {"name": "launch_rockets"}})


# -- properties ------------------------------------------------------------------------------------------

texts = st.one_of(
    st.sampled_from([HERMES_CALL, HERMES_CALL + "\nDone.", " " + HERMES_CALL, "<tool_call>\nnot json\n</tool_call>",
                     '{"name": "get_time", "arguments": {}}', '{"name": "nope", "arguments": {}}', "{oops}",
                     "<toolbox>", "[TOOL_CALLS] no", "Plain words.", "", "  ", "<", "{"]),
    st.text(alphabet='<>{}[]"_: atolcTOL|\n', max_size=20))


@settings(max_examples=500, deadline=None, database=None)
@given(text=texts, data=st.data())
def test_streamed_in_any_pieces_a_reply_is_shown_whole_or_read_as_calls(text, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=6)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    w = watch()
    shown, end = stream(w, pieces)
    if w.calls:
        assert set(shown) <= {""}              # nothing of a call leaked as text before it was read
        whole = watch()
        assert whole.finish(text) == end and whole.calls == w.calls     # the same as read all at once
    else:
        assert "".join(shown) + end == text    # nothing lost, nothing shown twice, in order
