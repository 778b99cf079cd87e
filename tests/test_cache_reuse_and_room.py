"""Unit tests of three decisions the engine makes on every admission, on their own: how much of a prompt a slot's
cache supplies (plan_reuse), which free slot a prompt goes to (choose_slot), and which idle caches go when a shared
KV pool needs room (KVPool.make_room). The server tests check the same decisions end to end on the real model."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from hypothesis import given, strategies as st

from koboldlite.engine.slots import Slot
from koboldlite.engine.kv_pool import CACHE_REUSE_MIN_CHUNK, KVPool, plan_reuse
from koboldlite.engine.admission import choose_slot

RUN = CACHE_REUSE_MIN_CHUNK


def tokens(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


# -- plan_reuse ------------------------------------------------------------------------------------------------

def test_the_common_prefix_is_reused_and_nothing_moves():
    cached = tokens(0, 100)
    assert plan_reuse(cached, tokens(0, 60) + [999], context_shift=True) == (60, [])
    assert plan_reuse(cached, tokens(0, 100) + tokens(500, 5), context_shift=False) == (100, [])


def test_turns_a_client_kept_after_dropping_older_ones_are_moved_into_place():
    system, old, kept = tokens(0, 10), tokens(100, 80), tokens(300, RUN + 20)
    cached = system + old + kept
    prompt = system + kept + tokens(900, 7)                 # the old turn dropped, a new one added
    n, moves = plan_reuse(cached, prompt, context_shift=True)
    assert n == len(system) + len(kept)
    assert moves == [(len(system) + len(old), len(kept), -len(old))]   # (start in the cache, length, shift)
    assert plan_reuse(cached, prompt, context_shift=False) == (len(system), [])


def test_a_run_shorter_than_the_minimum_is_read_again():
    cached = tokens(0, 10) + tokens(100, 50) + tokens(300, RUN - 1)
    assert plan_reuse(cached, tokens(0, 10) + tokens(300, RUN - 1), context_shift=True) == (10, [])


@given(st.lists(st.integers(0, 5), max_size=300), st.lists(st.integers(0, 5), max_size=300))
def test_what_is_reused_is_exactly_what_the_moves_bring_into_place(cached, prompt):
    n, moves = plan_reuse(cached, prompt, context_shift=True)
    head = n - sum(length for _, length, _ in moves)
    assert cached[:head] == prompt[:head]                  # the common prefix...
    at = head
    for start, length, shift in moves:                     # ...then each moved run, in order, where it lands
        assert start + shift == at and cached[start:start + length] == prompt[at:at + length]
        assert length >= RUN
        at += length
    assert at == n <= len(prompt)


# -- choose_slot ---------------------------------------------------------------------------------------------------

def slot(i: int, cached: list[int], last_used: float) -> Slot:
    s = Slot(i)
    s.cached, s.last_used = cached, last_used
    return s


def prefix(cached: list[int], prompt: list[int]) -> int:
    return plan_reuse(cached, prompt, context_shift=True)[0]


def test_a_chat_going_on_returns_to_its_own_slot():
    story, chat = tokens(0, 400), tokens(1000, 300)
    slots = [slot(0, story, 1.0), slot(1, chat, 2.0), slot(2, [], 0.5)]
    assert choose_slot(slots, chat + tokens(2000, 20), prefix).seq_id == 1


def test_a_common_opening_does_not_evict_another_users_story():
    """A prompt whose opening is a long story's (more than half of the prompt, so that slot is a candidate) goes to
    the cheap slot: counting the story it would throw away, the story's slot costs far more."""
    story = tokens(0, 1000)
    slots = [slot(0, story, 2.0), slot(1, tokens(5000, 30), 1.0)]
    new = story[:60] + tokens(7000, 50)                    # a shared system prompt, then something else
    assert choose_slot(slots, new, prefix).seq_id == 1
    slots[1].cached = tokens(5000, 2000)                   # unless the other would throw away even more
    assert choose_slot(slots, new, prefix).seq_id == 0


def test_the_same_prompt_sent_again_finds_the_slot_that_holds_it():
    """A regenerated reply: the slot whose cache supplies the whole prompt (though it holds the old reply too) is a
    candidate, and cheaper than the least recently used slot's other conversation."""
    prompt = tokens(0, 100)
    slots = [slot(0, prompt + tokens(500, 150), 5.0), slot(1, tokens(3000, 400), 1.0)]
    assert choose_slot(slots, prompt, prefix).seq_id == 0


def test_without_a_continuation_the_least_recently_used_slot_is_taken():
    slots = [slot(0, tokens(0, 50), 3.0), slot(1, tokens(100, 50), 1.0), slot(2, tokens(200, 50), 2.0)]
    assert choose_slot(slots, tokens(900, 40), prefix).seq_id == 1


# -- KVPool.make_room ------------------------------------------------------------------------------------------------

class CountingLib:
    """The one llama.cpp call make_room makes: a sequence's cells removed (recorded)."""

    def __init__(self):
        self.removed: list[int] = []

    def llama_memory_seq_rm(self, memory, seq, start, end):
        self.removed.append(seq)
        return True


def pool_of(slots: list[Slot], pool_tokens: int, shared: bool = True) -> tuple[KVPool, CountingLib]:
    lib = CountingLib()
    model = SimpleNamespace(lib=lib, memory=None, shared_kv=shared, pool_tokens=pool_tokens)
    return KVPool(model, slots, threading.Lock(), context_shift=True), lib


def busy(s: Slot) -> Slot:
    s.reply = SimpleNamespace(job=None)         # a reply runs in it
    return s


def test_idle_caches_go_least_recently_used_first_and_only_as_many_as_needed():
    a, b, c = slot(0, tokens(0, 300), 3.0), slot(1, tokens(0, 300), 1.0), slot(2, tokens(0, 300), 2.0)
    pool, lib = pool_of([a, b, c], pool_tokens=1000)
    assert pool.make_room(400)                              # 100 free: one cache must go, the oldest
    assert lib.removed == [1] and a.cached and not b.cached and c.cached
    assert pool.make_room(700)                              # then the next oldest
    assert lib.removed == [1, 2] and a.cached and not c.cached


def test_a_running_reply_and_the_slot_being_admitted_are_never_taken():
    running, keep, idle = busy(slot(0, tokens(0, 500), 0.0)), slot(1, tokens(0, 300), 0.0), slot(2, tokens(0, 100), 5)
    pool, lib = pool_of([running, keep, idle], pool_tokens=1000)
    assert not pool.make_room(300, keep=keep)               # only the idle 100 could go: not enough
    assert lib.removed == [2] and running.cached and keep.cached


def test_prompt_still_to_read_counts_as_taken_and_a_borrowed_start_counts_once():
    lender, borrower = busy(slot(0, tokens(0, 400), 0.0)), busy(slot(1, tokens(0, 400), 0.0))
    borrower.borrowed = 300                                 # its first 300 cells are the lender's
    borrower.to_prefill = tokens(0, 50)
    pool, _ = pool_of([lender, borrower], pool_tokens=1000)
    assert pool.cells_used() == 400 + 100 + 50
    assert pool.make_room(450) and not pool.make_room(451)


def test_slots_with_contexts_of_their_own_always_have_room():
    s = slot(0, tokens(0, 900), 0.0)
    pool, lib = pool_of([s], pool_tokens=1000, shared=False)
    assert pool.make_room(5000) and not lib.removed
