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


# -- a reply its length limit stopped (issue 37) ---------------------------------------------------------

GENERIC_CUT = ('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
               '{"name": "get_weather", "argumen')
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def cut_stream(w: CallWatch, text: str) -> tuple[list[str], str]:
    return [w.feed(p) for p in pieces_of(text)], w.finish(cut=True)


def test_a_cut_forced_call_is_the_calls_written_whole_never_text():
    # The defect seen with the anthropic SDK: the grammar let the model add calls until max_tokens, and the whole
    # reply went out as one text block.
    w = watch(PLAIN, choice="required", parallel=True)
    shown, end = cut_stream(w, GENERIC_CUT)
    assert set(shown) == {""} and end == "" and w.calls == [PARIS]


@pytest.mark.parametrize("template, text, arguments", [
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', {"city": "Par"}),
    (MISTRAL, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo", "un', {"city": "Oslo"}),
    (LLAMA3, '{"name": "get_weather", "parameters": {"city": "Ro', {"city": "Ro"}),
    (PLAIN, '{"tool_calls": [{"name": "get_weather", "arguments": {', {}),
    (PLAIN, '{"tool_calls": [{"name": "get_wea', {}),
    (HERMES, '<tool_call>\n{"na', {}),
])
def test_a_call_cut_while_written_keeps_its_name_and_the_arguments_so_far(template, text, arguments):
    for choice in (NAMED, "required"):
        w = watch(template, choice=choice, parallel=False)
        shown, end = cut_stream(w, text)
        assert set(shown) == {""} and end == ""
        if choice == "required" and '"get_weather"' not in text:
            assert w.calls == []           # a required call whose name was cut names no tool: no call, no text
        else:
            assert w.calls == [{"name": "get_weather", "arguments": arguments}]


def test_hermes_calls_written_whole_come_back_and_the_cut_one_is_no_text():
    w = watch(choice="required", parallel=True)
    shown, end = cut_stream(w, HERMES_CALL + '\n<tool_call>\n{"name": "get_time", "argu')
    assert set(shown) == {""} and end == "" and w.calls == [PARIS]


def test_an_unforced_reply_cut_inside_a_call_is_a_call_and_other_json_stays_text():
    w = watch(choice="auto")
    shown, end = cut_stream(w, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Li')
    assert set(shown) == {""} and end == "" and w.calls == [{"name": "get_weather", "arguments": {"city": "Li"}}]
    w = watch(PLAIN, choice="auto")
    text = '{"answer": "forty-two", "confid'
    shown, end = cut_stream(w, text)
    assert "".join(shown) + end == text and w.calls == []


def test_a_reply_that_was_not_cut_is_read_as_before():
    w = watch(PLAIN, choice="auto")
    shown, end = stream(w, pieces_of(GENERIC_CUT))
    assert "".join(shown) + end == GENERIC_CUT and w.calls == []


def test_a_call_forced_by_name_is_one_call_unless_the_request_says_parallel():
    two = HERMES_CALL + "\n" + HERMES_CALL.replace("Paris", "Oslo")
    for parallel, n in ((None, 1), (False, 1), (True, 2)):
        tools = ToolUse(HERMES, [WEATHER, TIME], NAMED, parallel)
        repeats = tools.grammar().count('"\\n<tool_call>\\n" call')
        assert tools.parallel is (n == 2) and repeats == (ToolUse.MAX_CALLS - 1 if n == 2 else 0)
        w = CallWatch(tools)
        stream(w, [two])
        assert len(w.calls) == n
    for parallel, allowed in ((None, True), (True, True), (False, False)):
        assert ToolUse(HERMES, [WEATHER], "required", parallel).parallel is allowed
    with pytest.raises(RequestError, match="true or false"):
        ToolUse(HERMES, [WEATHER], "auto", "yes")


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
