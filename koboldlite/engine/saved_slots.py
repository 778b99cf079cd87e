"""Saved conversations: a slot's sequence to a file and back (llama-server's /slots), and the conversation used last
kept in RAM and put back (KoboldCpp's admin states). Each function runs on the generation thread between two steps
(Scheduler.call), since only that thread may use the llama context."""

from __future__ import annotations

import time

from ..errors import Conflict, Invalid, NotFound, Unavailable
from .slots import Slot
from .prompt_cache import write_state_file
from .engine import Engine


def idle_slot(engine: Engine, i: int) -> Slot:
    if not 0 <= i < len(engine.slots):
        raise NotFound(f"no slot {i}: this server has slots 0 to {len(engine.slots) - 1}")
    if engine.slots[i].busy:
        raise Conflict(f"slot {i} is generating: try again when it is done")
    return engine.slots[i]


def save_slot(engine: Engine, i: int, path: str) -> tuple[int, int]:
    """The slot's conversation to a file; (tokens, bytes)."""
    slot = idle_slot(engine, i)
    data = engine.pool.state_of(slot) if slot.cached else None
    if data is None:
        raise Invalid(f"slot {i} holds nothing to save")
    write_state_file(path, engine.identity, slot.cached, data, slot.adapter_key)
    return len(slot.cached), len(data)


def restore_slot(engine: Engine, i: int, tokens: list[int], data: bytes, adapter_key: tuple = ()) -> int:
    """A saved conversation, computed under these LoRA scales, into an idle slot, where the next prompt that
    continues it under the same scales finds it."""
    slot = idle_slot(engine, i)
    engine.pool.stash(slot)
    if not engine.pool.make_room(len(tokens) - len(slot.cached), keep=slot) \
            or not engine.pool.restore(slot, tokens, data):
        raise Unavailable(f"slot {i}: the saved state does not fit in the KV cache now")
    slot.adapter_key = adapter_key
    slot.last_used = time.monotonic()
    return len(tokens)


def erase_slot(engine: Engine, i: int) -> int:
    slot = idle_slot(engine, i)
    n = len(slot.cached)
    engine.pool.truncate(slot, 0)
    return n


def save_latest(engine: Engine) -> tuple[list[int], bytes, tuple] | None:
    """The idle conversation used last (KoboldCpp's one context, as far as a state goes): its tokens, state and LoRA
    scales."""
    held = [s for s in engine.slots if s.cached and not s.busy]
    if not held:
        return None
    slot = max(held, key=lambda s: s.last_used)
    data = engine.pool.state_of(slot)
    return (list(slot.cached), data, slot.adapter_key) if data else None


def restore_latest(engine: Engine, tokens: list[int], data: bytes, adapter_key: tuple = ()) -> int:
    """A state saved by save_latest into the least recently used idle slot."""
    idle = [s for s in engine.slots if not s.busy]
    if not idle:
        raise Conflict("every slot is generating: try again when one is done")
    return restore_slot(engine, min(idle, key=lambda s: s.last_used).seq_id, tokens, data, adapter_key)
