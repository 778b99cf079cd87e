"""PhraseGuard on its own (banned phrases, KoboldCpp's anti-slop): generated tokens whose text may still become a
banned phrase are held back; a completed phrase is answered with how many of the newest tokens to take back; the
match ignores case; what is held at the end is let go by flush. (The engine's use of it on the real model is in
tests/test_phrase_bans_logprobs.py.)"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from koboldlite.text import PhraseGuard


def push_all(guard: PhraseGuard, pieces: list[str]) -> list[tuple[list[str], int]]:
    """Each push's (released texts, tokens to take back); token ids count from 1, payloads are the texts."""
    out = []
    for i, piece in enumerate(pieces, 1):
        released, n = guard.push(i, piece.encode(), piece)
        out.append(([p for _, _, p in released], n))
    return out


def test_without_phrases_every_token_passes_at_once():
    for phrases in ([], ["", "   "]):                       # blank phrases are no phrases
        guard = PhraseGuard(phrases)
        assert not guard.active
        assert guard.push(7, b"the fox", "x") == ([(7, b"the fox", "x")], 0)
        assert guard.flush() == []


def test_a_token_that_cannot_begin_a_phrase_passes_at_once():
    guard = PhraseGuard(["fox"])
    assert guard.active
    assert push_all(guard, ["The", " quick", " brown"]) == [(["The"], 0), ([" quick"], 0), ([" brown"], 0)]
    assert guard.pending == []


def test_a_possible_start_is_held_and_a_completed_phrase_is_taken_back():
    guard = PhraseGuard(["fox jumps"])
    assert push_all(guard, ["The", " f", "ox", " j"]) == [(["The"], 0), ([], 0), ([], 0), ([], 0)]
    assert [t for t, _, _ in guard.pending] == [2, 3, 4]          # " f", "ox", " j": the phrase so far
    released, n = guard.push(5, b"umps", "umps")
    assert (released, n) == ([], 4)                               # " f" "ox" " j" "umps": the fewest that hold it
    assert guard.pending == [] and guard.flush() == []


def test_a_held_start_that_does_not_become_the_phrase_is_released_in_order():
    guard = PhraseGuard(["fox jumps"])
    assert push_all(guard, ["a f", "ox", " ran"]) == [([], 0), ([], 0), (["a f", "ox", " ran"], 0)]
    assert guard.pending == []


def test_only_the_tokens_that_could_still_be_the_phrase_are_held():
    guard = PhraseGuard(["brown fox"])
    # "The quick" can begin nothing; " br" can: only it is held.
    assert push_all(guard, ["The quick", " br"]) == [(["The quick"], 0), ([], 0)]
    # A token whose end begins the phrase anew: the tokens before it go, it stays.
    assert push_all(guard, ["own dog and a b"]) == [([" br"], 0)]
    assert [p for _, _, p in guard.pending] == ["own dog and a b"]


def test_the_fewest_newest_tokens_that_contain_the_phrase_are_taken_back():
    # "a" is held as the start of "abz"; "bc" then completes the other phrase inside the newest two tokens only.
    guard = PhraseGuard(["abz", "bc"])
    assert push_all(guard, ["a", "b", "c"]) == [([], 0), ([], 0), ([], 2)]
    assert [p for _, _, p in guard.pending] == ["a"]              # not part of the phrase: still held, not dropped
    assert [p for _, _, p in guard.flush()] == ["a"]


def test_a_phrase_inside_one_token_is_taken_back_alone():
    guard = PhraseGuard(["slop"])
    assert push_all(guard, ["Here", " is sloppy"]) == [(["Here"], 0), ([], 1)]


def test_matching_ignores_case_both_ways():
    for phrase, pieces in (("Shivers down", [" SHIV", "ers DOWN"]), ("shivers down", [" Shiv", "ers Down"])):
        guard = PhraseGuard([phrase])
        assert push_all(guard, pieces) == [([], 0), ([], 2)]


def test_a_leading_space_is_part_of_the_phrase():
    guard = PhraseGuard([" cat"])
    assert push_all(guard, ["concat", "enate"]) == [(["concat"], 0), (["enate"], 0)]
    assert push_all(guard, [" the", " cat"]) == [([" the"], 0), ([], 1)]


def test_flush_lets_go_of_what_is_held_with_its_payloads():
    guard = PhraseGuard(["the end"])
    guard.push(1, b" the", {"logprob": -1.5})
    guard.push(2, b" en", {"logprob": -0.2})
    assert guard.flush() == [(1, b" the", {"logprob": -1.5}), (2, b" en", {"logprob": -0.2})]
    assert guard.pending == [] and guard.flush() == []


def test_a_character_split_across_tokens_is_matched_once_whole():
    guard = PhraseGuard(["café noir"])
    data = "café noir".encode()
    cut = data.index("é".encode()) + 1                           # inside the two bytes of é
    assert guard.push(1, data[:cut], None) == ([], 0)
    assert guard.push(2, data[cut:], None) == ([], 2)


# -- properties ------------------------------------------------------------------------------------------

PHRASES = ["ab a", "bab", "Ba"]
pieces = st.lists(st.text(alphabet="abAB ", min_size=1, max_size=3), max_size=12)


def contains_phrase(text: str) -> bool:
    return any(p.lower() in text.lower() for p in PHRASES)


@settings(max_examples=400, deadline=None, database=None)
@given(pieces=pieces)
def test_nothing_released_could_still_begin_a_phrase_and_nothing_is_lost(pieces):
    guard = PhraseGuard(PHRASES)
    released: list[str] = []          # what a client has been shown
    held: list[str] = []              # what the guard holds, as this test follows it
    taken_back = False
    for i, piece in enumerate(pieces, 1):
        out, n = guard.push(i, piece.encode(), piece)
        held.append(piece)
        if n:
            assert out == [] and 1 <= n <= len(held)
            # The newest n tokens contain a phrase (with what was shown before them, when they are all that is
            # held: a phrase may begin in text shown before a take-back), the newest n - 1 do not (the fewest).
            before = "".join(released) if n == len(held) else ""
            assert contains_phrase(before + "".join(held[-n:]))
            assert n == 1 or not contains_phrase("".join(held[-n + 1:]))
            del held[-n:]
            taken_back = True
        else:
            assert [p for _, _, p in out] == held[:len(out)]      # released in order, each once
            released += held[:len(out)]
            del held[:len(out)]
        assert [p for _, _, p in guard.pending] == held
        shown, everything = "".join(released).lower(), "".join(released + held).lower()
        assert not contains_phrase(shown)
        if not taken_back:            # a take-back may leave the end of the shown text as a phrase's start
            # No phrase can begin in what was shown and end in what is still to come.
            for p in PHRASES:
                p = p.lower()
                for start in range(len(shown)):
                    tail = everything[start:]
                    assert not (len(tail) < len(p) and p.startswith(tail)), (p, shown, held)
    assert [p for _, _, p in guard.flush()] == held


def test_a_phrase_that_begins_in_text_released_before_a_take_back_is_still_caught():
    guard = PhraseGuard(["so so!"])
    # "so" is released once " so so" makes it unnecessary; "!" completes the phrase in the newest three tokens,
    # which are taken back (the engine bans " so" there and samples anew). The shown "so" now ends in the
    # phrase's start, and nothing holds it.
    assert push_all(guard, ["so", " so", " so", "!"]) == [([], 0), ([], 0), (["so"], 0), ([], 3)]
    shown = "so" + "".join("".join(p) for p, _ in push_all(guard, [" s", "o!"]))
    shown += "".join(p for _, _, p in guard.flush())
    assert "so so!" not in shown, shown


@settings(max_examples=200, deadline=None, database=None)
@given(pieces=pieces)
def test_text_without_a_phrase_comes_out_whole_and_in_order(pieces):
    if contains_phrase("".join(pieces)):
        pieces = [p.replace("a", "c").replace("A", "C") for p in pieces]   # no "a": no phrase
    guard = PhraseGuard(PHRASES)
    out = []
    for i, piece in enumerate(pieces, 1):
        released, n = guard.push(i, piece.encode(), piece)
        assert n == 0
        out += released
    out += guard.flush()
    assert [t for t, _, _ in out] == list(range(1, len(pieces) + 1))
    assert [p for _, _, p in out] == pieces
