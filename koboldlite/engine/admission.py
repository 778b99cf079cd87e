"""Where an admitted prompt goes: the free slot where it costs least, and a conversation brought back from the prompt
cache when one starts it for longer than any slot does."""

from __future__ import annotations

import math
from typing import Callable

from .llama_model import common_prefix_length
from .slots import Slot
from .kv_pool import KVPool

# A kept state is restored only if it saves this many more tokens than the slots' caches do. From RAM a restore
# copies the whole conversation back, about as long as reading one or two of its tokens takes (a 2,000-token one in
# 10 ms on a 2-core Xeon, which read a prompt at 8 ms a token: bench/results/pool-attention.md), so a small margin;
# from disk the file is read first.
RESTORE_MIN_GAIN = {"ram": 16, "disk": 64}


def choose_slot(free: list[Slot], prompt: list[int], reused: Callable[[list[int], list[int]], int],
                usable: Callable[[Slot], bool] = lambda slot: True) -> Slot:
    """The free slot where this prompt costs least: prompt tokens still to read plus cached tokens thrown away
    (`reused(cached, prompt)` says how much of it a cache supplies, a shift's savings counted). Only the least
    recently used slot and the slots this prompt continues are candidates: those whose cache it reuses at least
    half of (a chat going on), or that supply at least half of it (the same prompt sent again, to regenerate a
    reply).

    Counting what is thrown away keeps a common opening ("Chapter", a system prompt) from evicting another user's
    long story while a cheaper slot is free. A slot whose cache is not `usable` (computed under other LoRA scales)
    supplies nothing.
    """
    lru = min(free, key=lambda s: s.last_used)
    costs = {}
    for s in free:
        n = reused(s.cached, prompt) if s.cached and usable(s) else 0
        if s is lru or (n and (2 * n >= len(s.cached) or 2 * n >= len(prompt))):
            costs[s.seq_id] = (len(prompt) - n) + (len(s.cached) - n)
    return min(free, key=lambda s: (costs.get(s.seq_id, math.inf), s is lru))


def bring_back(pool: KVPool, slots: list[Slot], slot: Slot, prompt: list[int]) -> str:
    """Where this prompt's cache comes from: "slot" (a slot's, as ever), or "ram" / "disk" when a displaced
    conversation kept in the prompt cache supplies more of it than any slot's cache: it is restored into the
    chosen slot (whose own conversation, if worth it, goes to the cache first). The slot holds the request's LoRA
    scales already (Engine.admit): only states and slots computed under them count."""
    cache = pool.cache
    own = pool.plan_reuse(slot.cached, prompt)[0] if slot.cached else 0
    if cache is None:
        return "slot"
    # What a kept state supplies is counted as a slot's is: its start and the turns a client kept after
    # dropping older ones (the slot's reuse moves them into place once the state is restored).
    entry, common = cache.best(prompt, slot.adapter_key, lambda tokens, p: pool.plan_reuse(tokens, p)[0])
    others = max((common_prefix_length(s.cached, prompt) for s in slots
                  if s is not slot and s.adapter_key == slot.adapter_key), default=0)
    where = None if entry is None else "ram" if entry.data is not None else "disk"
    if where is None or common < max(own, others if pool.model.shared_kv else 0) + RESTORE_MIN_GAIN[where]:
        pool.stash(slot, own)             # what of it this prompt will not reuse is about to go
        return "slot"
    # Its state is taken before the slot's own goes to the cache: that may push the cache over its RAM bound,
    # and the entry chosen here may be the least recently used one it drops.
    data = cache.data_of(entry)
    if data is None:
        pool.stash(slot, own)
        return "slot"
    pool.stash(slot)
    if not pool.make_room(len(entry.tokens) - len(slot.cached) + len(prompt) - common + 1, keep=slot):
        return "slot"
    if not pool.restore(slot, entry.tokens, data):
        return "slot"
    if common == len(entry.tokens):
        cache.taken(entry)                # the slot holds it all now
    return where
