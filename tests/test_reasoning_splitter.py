"""ReasoningSplitter on its own: a reply that begins with a thinking block is split into its reasoning and its
answer as it streams, whatever pieces it comes in. (The APIs' use of it on the real model is in
tests/test_tools_reasoning_embeddings.py.)"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from koboldlite.text import ReasoningSplitter


def feed_all(splitter: ReasoningSplitter, pieces: list[str]) -> tuple[list[tuple[str, str]], tuple[str, str]]:
    """What each piece lets through, then what flush gives."""
    return [splitter.feed(p) for p in pieces], splitter.flush()


def joined(outs: list[tuple[str, str]], tail: tuple[str, str]) -> tuple[str, str]:
    return "".join(r for r, _ in outs) + tail[0], "".join(a for _, a in outs) + tail[1]


@pytest.mark.parametrize("open_, close", ReasoningSplitter.TAGS)
def test_each_tag_pair_splits_a_whole_reply(open_, close):
    assert ReasoningSplitter().split(f"{open_}Two and two make four.{close}The answer is 4.") == \
        ("Two and two make four.", "The answer is 4.")


def test_the_tag_pairs_are_the_three_the_models_write():
    assert set(ReasoningSplitter.TAGS) == {("<think>", "</think>"), ("[THINK]", "[/THINK]"),
                                           ("<thinking>", "</thinking>")}


def test_a_reply_without_a_block_is_all_answer_and_passes_at_once():
    s = ReasoningSplitter()
    assert s.feed("Hello") == ("", "Hello")
    assert s.feed(" there") == ("", " there")
    assert s.flush() == ("", "")


def test_whitespace_before_the_block_is_dropped():
    assert ReasoningSplitter().split("\n  <think>r</think>a") == ("r", "a")


def test_a_reply_that_may_still_open_a_block_is_held():
    s = ReasoningSplitter()
    assert s.feed("  <thi") == ("", "")               # may be <think> or <thinking>
    assert s.feed("nking>plan") == ("plan", "")
    assert s.feed(" more") == (" more", "")
    s = ReasoningSplitter()
    assert s.feed("[TH") == ("", "")
    assert s.feed("E END]") == ("", "[THE END]")      # not a tag after all: released whole


def test_an_open_tag_split_in_every_place_gives_the_same_split():
    text = "<thinking>a plan</thinking>\n\nthe answer"
    for cut in range(len(text) + 1):
        outs, tail = feed_all(ReasoningSplitter(), [text[:cut], text[cut:]])
        assert joined(outs, tail) == ("a plan", "the answer"), cut


def test_a_closing_tag_split_across_pieces_is_held_then_dropped():
    s = ReasoningSplitter()
    assert s.feed("<think>first</th") == ("first", "")          # "</th" may be the close: held
    assert s.feed("ink>") == ("", "")
    assert s.feed("Answer") == ("", "Answer")
    s = ReasoningSplitter()
    assert s.feed("<think>a </") == ("a ", "")
    assert s.feed("b> c") == ("</b> c", "")                     # not the close after all: reasoning


def test_a_block_opened_by_the_prompt():
    s = ReasoningSplitter.for_prompt("<|im_start|>assistant\n<think>\n")
    assert s.feed("Let me see.") == ("Let me see.", "")
    assert s.feed("</think>\n\nYes.") == ("", "Yes.")
    assert ReasoningSplitter.for_prompt("User: hi\nAssistant: [THINK]").split("hmm[/THINK]ok") == ("hmm", "ok")
    # Only the tag the prompt opened closes it.
    assert ReasoningSplitter.for_prompt("<think>").split("a</thinking>b</think>c") == ("a</thinking>b", "c")


def test_a_prompt_that_opens_no_block_leaves_the_reply_to_decide():
    for prompt in ("Assistant:", "<think>a</think>\nAssistant:", "Say <think> aloud."):
        assert ReasoningSplitter.for_prompt(prompt).split("<think>r</think>a") == ("r", "a")
        assert ReasoningSplitter.for_prompt(prompt).split("plain") == ("", "plain")


def test_only_a_block_at_the_start_counts():
    assert ReasoningSplitter().split("Sure. <think>not reasoning</think> done") == \
        ("", "Sure. <think>not reasoning</think> done")
    # After the first block, later tags are part of the answer.
    assert ReasoningSplitter().split("<think>a</think>B<think>c</think>D") == ("a", "B<think>c</think>D")
    s = ReasoningSplitter()
    assert s.feed("<think>a</think>B") == ("a", "B")
    assert s.feed("<think>") == ("", "<think>")


def test_the_blank_lines_after_a_block_are_dropped_in_whatever_pieces():
    s = ReasoningSplitter()
    assert s.feed("<think>r</think>\n") == ("r", "")
    assert s.feed("\n") == ("", "")
    assert s.feed("\nAnswer\n\nmore") == ("", "Answer\n\nmore")     # new lines inside the answer stay
    assert s.flush() == ("", "")


def test_flush_gives_what_was_held_to_the_part_it_was_in():
    s = ReasoningSplitter()
    s.feed("<think>cut short </thi")                 # the reply ended inside its block
    assert s.flush() == ("</thi", "")
    s = ReasoningSplitter()
    assert s.feed("<thin") == ("", "")
    assert s.flush() == ("", "<thin")                # ended before it was a tag: answer
    s = ReasoningSplitter()
    s.feed("<think>r</think>\n\n")
    assert s.flush() == ("", "")                     # only blank lines after the block: no answer
    assert ReasoningSplitter().split("") == ("", "")


def test_split_is_feed_then_flush():
    text = "<think>r</think>\n\nanswer"
    assert ReasoningSplitter().split(text) == joined(*feed_all(ReasoningSplitter(), [text]))


# -- properties ------------------------------------------------------------------------------------------

fragments = st.sampled_from(["<think>", "</think>", "[THINK]", "[/THINK]", "<thinking>", "</thinking>", "<", ">",
                             "</", "[", "]", "\n", "\n\n", " ", "think", "a", "b c"])
replies = st.lists(fragments, max_size=12).map("".join)
prompts = st.sampled_from(["", "Assistant:", "Assistant: <think>", "Assistant: [THINK]\n",
                           "Assistant: <thinking>"])


@settings(max_examples=500, deadline=None, database=None)
@given(prompt=prompts, text=replies, data=st.data())
def test_any_split_of_a_reply_gives_the_split_of_the_whole(prompt, text, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=6)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert "".join(pieces) == text
    whole = ReasoningSplitter.for_prompt(prompt).split(text)
    assert joined(*feed_all(ReasoningSplitter.for_prompt(prompt), pieces)) == whole


@settings(max_examples=300, deadline=None, database=None)
@given(text=replies)
def test_a_reply_that_does_not_begin_with_a_block_is_its_own_answer(text):
    reasoning, answer = ReasoningSplitter().split(text)
    if not any(text.lstrip().startswith(o) for o, _ in ReasoningSplitter.TAGS):
        assert (reasoning, answer) == ("", text)
    else:                       # nothing but the tags, the blank lines after the block and leading space goes
        assert len(reasoning) + len(answer) < len(text)
        assert answer == "" or text.endswith(answer)
