"""The KV pool: which tokens each sequence's cells hold, and every change to them."""

from __future__ import annotations

import ctypes
import threading

from .llama_model import LlamaModel, common_prefix_length
from .slots import Slot, SlotState
from .prompt_cache import PromptCache

CACHE_REUSE_MIN_CHUNK = 64           # cached runs at least this long are moved into place, not read again


def plan_reuse(cached: list[int], prompt: list[int], context_shift: bool) -> tuple[int, list[tuple[int, int, int]]]:
    """How much of `prompt` a cache holding `cached` can supply without reading it again.

    First their common prefix; then, with context shift, every later run of at least CACHE_REUSE_MIN_CHUNK tokens
    that the prompt goes on with and the cache still holds further on (the turns a client kept after dropping
    older ones), in order. Returns the tokens reused and the moves that bring those runs into place: (start in the
    cache, length, shift).
    """
    head_p = head_c = common_prefix_length(cached, prompt)
    moves = []
    if not context_shift:
        return head_p, moves
    n_cached, n_prompt = len(cached), len(prompt)
    while head_c < n_cached and head_p < n_prompt:
        try:
            head_c = cached.index(prompt[head_p], head_c)
        except ValueError:
            break
        n = 1
        while head_c + n < n_cached and head_p + n < n_prompt and cached[head_c + n] == prompt[head_p + n]:
            n += 1
        if n >= CACHE_REUSE_MIN_CHUNK:
            moves.append((head_c, n, head_p - head_c))
            head_p += n
            head_c += n
        else:
            head_c += 1
    return head_p, moves


def media_run_end(tokens: list[int], i: int) -> int:
    """`i`, or past the end of the media run (placeholder ids, negative) that a cut at `i` would split."""
    while 0 < i < len(tokens) and tokens[i] < 0 and tokens[i - 1] < 0:
        i += 1
    return i


class KVPool:
    """The llama context's KV cache as the slots use it: which tokens each sequence's cells hold, reusing a
    cached start for a new prompt (moving the runs a client kept), lending a start to another sequence in a
    shared pool, making room by dropping idle caches, compacting interleaved cells, shifting a full context
    and cutting a sequence back. It runs on the generation thread; every call into llama.cpp is made under
    the engine's `llama_lock`."""

    # A shared pool is compacted once concurrent replies have interleaved this many cells, or an eighth
    # of what the slots hold if that is more (the copy costs in proportion to what it moves), and only
    # while the copy held in memory stays under the byte limit.
    COMPACT_AFTER_CELLS = 64
    COMPACT_MAX_BYTES = 128 << 20
    # A job that puts at least this many tokens through attention (prompt to read and reply to write) first sets
    # the idle conversations aside (set_aside_idle). Each of its tokens reads an idle cell's keys once a layer, as
    # copying the cell out and back does twice: measured on a 2,000-token conversation (bench/README.md, issue 36),
    # setting it aside paid for itself after 10 to 50 tokens of one reply, so 64 leaves only the shortest jobs.
    SET_ASIDE_MIN_TOKENS = 64
    # ... and of those only conversations this long: the cost per cell is the same at any length, but a copy has
    # a fixed cost too (measured down to 100 cells only, where the copies paid for themselves after 2-4 tokens).
    SET_ASIDE_MIN_CELLS = 64

    def __init__(self, model: LlamaModel, slots: list[Slot], llama_lock: threading.Lock, context_shift: bool,
                 cache: PromptCache | None = None):
        self.model = model
        self.cache = cache               # where displaced conversations go, and come back from
        self.lib = model.lib
        self.slots = slots
        self.llama_lock = llama_lock
        self.context_shift = context_shift
        self.interleaved = 0             # cells concurrent replies have put side by side since the last compaction
        # llama.cpp re-rotates moved keys (seq_add) only at the next decode, and a saved state does not
        # carry that pending work: no compaction until it is done.
        self._moved_since_decode = False
        self.compactions = 0
        self.set_aside = 0               # idle conversations set aside for a job's attention (set_aside_idle)

    def decoded(self):
        """A decode ran: moved keys are rotated now."""
        self._moved_since_decode = False

    def state_of(self, slot: Slot) -> bytes | None:
        """The slot's sequence as llama.cpp saves it (its cells' keys and values, and positions)."""
        lib, ctx = self.lib, self.model.ctx
        with self.llama_lock:
            size = lib.llama_state_seq_get_size(ctx, slot.seq_id)
            buf = (ctypes.c_uint8 * size)()
            if not size or lib.llama_state_seq_get_data(ctx, buf, size, slot.seq_id) != size:
                return None
        return buf                       # kept as it is: a state is tens of MiB, and copies cost time

    def restore(self, slot: Slot, tokens: list[int], data: bytes) -> bool:
        """Put a saved sequence into this (idle) slot in place of what it held."""
        lib, ctx, memory = self.lib, self.model.ctx, self.model.memory
        slot.cached = []
        self.trimmed(slot)
        slot.lender, slot.borrowed, slot.shared_upto = None, 0, 0
        with self.llama_lock:
            lib.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
            src = (ctypes.cast(data, ctypes.POINTER(ctypes.c_uint8)) if isinstance(data, ctypes.Array)
                   else ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8)))   # no copy either way
            if lib.llama_state_seq_set_data(ctx, src, len(data), slot.seq_id) != len(data):
                lib.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
                return False
        slot.cached = list(tokens)
        return True

    def stash(self, slot: Slot, keep: int = 0, ahead: bool = False, least: int = PromptCache.MIN_TOKENS):
        """The slot's conversation is about to be dropped (all but its first `keep` tokens): keep its state in
        the prompt cache first, when it is worth keeping (`least` tokens to drop) and not kept already."""
        if self.cache is None or len(slot.cached) - keep < least \
                or self.cache.holds(slot.cached, slot.adapter_key):
            return
        data = self.state_of(slot)
        if data is not None:
            self.cache.keep(slot.cached, data, ahead, slot.adapter_key)

    def keep_ahead(self):
        """While nothing runs: keep the idle slots' conversations in the prompt cache now, so that a prompt that
        displaces one later does not wait while it is saved. Only into the RAM bound's free room: a copy of what
        a slot still holds never pushes out a conversation that has no other copy."""
        if self.cache is None:
            return
        for slot in self.slots:
            if slot.busy or len(slot.cached) < PromptCache.MIN_TOKENS or self.cache.holds(slot.cached,
                                                                                          slot.adapter_key):
                continue
            with self.llama_lock:
                size = self.lib.llama_state_seq_get_size(self.model.ctx, slot.seq_id)
            if self.cache.ram_used + size <= self.cache.ram_bytes:
                self.stash(slot, ahead=True)
                self.cache.log(f"prompt cache: kept slot {slot.seq_id}'s conversation ({len(slot.cached)} tokens) "
                               "ahead of its displacement")

    def truncate(self, slot: Slot, n: int):
        """Cut the slot's sequence back to its first n positions (a rewind, rejected draft tokens)."""
        with self.llama_lock:
            self.lib.llama_memory_seq_rm(self.model.memory, slot.seq_id, n, -1)
        del slot.cached[n:]
        self.trimmed(slot)

    def drop(self, slot: Slot):
        """Free all of the slot's cells (a slot that failed mid-decode too: llama.cpp may hold cells of it that
        slot.cached does not name, and cells nothing counts would make the pool's room a lie)."""
        with self.llama_lock:
            self.lib.llama_memory_seq_rm(self.model.memory, slot.seq_id, -1, -1)
        slot.cached = []
        self.trimmed(slot)

    def plan_reuse(self, cached: list[int], prompt: list[int]) -> tuple[int, list[tuple[int, int, int]]]:
        """plan_reuse with this pool's context shift."""
        return plan_reuse(cached, prompt, self.context_shift)

    def reuse(self, slot: Slot, prompt: list[int]) -> int:
        """Make the slot's sequence hold the longest reusable start of `prompt`; return its length."""
        lib, memory, seq = self.lib, self.model.memory, slot.seq_id
        keep, moves = self.plan_reuse(slot.cached, prompt)
        if keep == len(prompt):
            keep -= 1                      # one token must be decoded to get logits
        with self.llama_lock:
            for start, length, shift in moves:
                if start + shift >= keep or start < slot.shared_upto:
                    keep = min(keep, start + shift)
                    break
                lib.llama_memory_seq_rm(memory, seq, start + shift, start)     # what the client dropped
                lib.llama_memory_seq_add(memory, seq, start, start + length, shift)
                self._moved_since_decode = True
            if not lib.llama_memory_seq_rm(memory, seq, keep, -1):
                lib.llama_memory_seq_rm(memory, seq, -1, -1)
                keep = 0
        slot.cached = list(prompt[:keep])
        self.trimmed(slot)
        return keep

    def trimmed(self, slot: Slot):
        """The slot's cache was cut to len(slot.cached): what it shared beyond that is no longer shared,
        and a slot that borrowed those cells now holds them alone."""
        n = len(slot.cached)
        slot.shared_upto = min(slot.shared_upto, n)
        slot.borrowed = min(slot.borrowed, n)
        for other in self.slots:
            if other.lender is slot:
                other.borrowed = min(other.borrowed, n)

    def borrow_prefix(self, slot: Slot, prompt: list[int], keep: int) -> int:
        """In a shared pool, take a longer start of the prompt from another slot's cache than the slot's
        own holds (a system prompt or character card that several users send): llama.cpp lets the two
        sequences share those cells, so they are neither read again nor stored twice. Only cells computed under
        the slot's LoRA scales are taken."""
        if not self.model.shared_kv:
            return keep
        lender, n = None, keep
        for other in self.slots:
            common = min(common_prefix_length(other.cached, prompt), len(prompt) - 1)
            if other is not slot and common > n and other.adapter_key == slot.adapter_key:
                lender, n = other, common
        if lender is None:
            return keep
        lib, memory = self.lib, self.model.memory
        with self.llama_lock:
            lib.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
            lib.llama_memory_seq_cp(memory, lender.seq_id, slot.seq_id, 0, n)
        slot.cached = []
        self.trimmed(slot)
        slot.cached = list(prompt[:n])
        slot.lender, slot.borrowed, slot.shared_upto = lender, n, n
        lender.shared_upto = max(lender.shared_upto, n)
        return n

    def cells_used(self) -> int:
        """KV cells the slots hold, or have been promised (prompt still to read); borrowed cells count once."""
        return sum(len(s.cached) - s.borrowed + len(s.to_prefill) for s in self.slots)

    def make_room(self, n: int, keep: Slot | None = None) -> bool:
        """Make n cells free in a shared pool: idle slots' caches go, least recently used first (they only
        save time; a running reply's context is never taken). False if running replies hold too much."""
        if not self.model.shared_kv:
            return True                    # every slot has a context of its own
        idle = sorted((s for s in self.slots if not s.busy and s.cached and s is not keep), key=lambda s: s.last_used)
        while self.model.pool_tokens - self.cells_used() < n and idle:
            dropped = idle.pop(0)
            self.stash(dropped)
            self.drop(dropped)
        return self.model.pool_tokens - self.cells_used() >= n

    def set_aside_idle(self, reader: Slot, tokens: int) -> int:
        """Before `reader` puts `tokens` through attention (its prompt to read and reply to write), the idle
        slots' conversations that the prompt cache holds (keep_ahead copied them while the loop was idle), or takes
        into its free RAM, leave the pool; they come back from there (Engine.admit's bring_back) when their chat
        does. Why: llama.cpp's unified cache gives every step's attention all cells up to the highest in use, other
        sequences' too, masked, and on the CPU each mask entry is read once per head and layer: three idle
        2,000-token conversations cost a new 2,000-token prompt a quarter of its speed, one made each token of a
        100-token reply a fifth slower, and llama-server's split cache nothing (bench/README.md, issue 36).
        Returning costs one copy back instead of nothing, so it is done only for jobs of SET_ASIDE_MIN_TOKENS or
        more, only in a shared pool whose attention runs on the CPU. Returns how many left."""
        if (self.cache is None or not self.model.shared_kv or getattr(self.model, "layers_offloaded", 0)
                or tokens < self.SET_ASIDE_MIN_TOKENS):
            return 0
        left = 0
        for slot in self.slots:
            if slot is reader or slot.busy or len(slot.cached) < self.SET_ASIDE_MIN_CELLS:
                continue
            if not self.cache.holds(slot.cached, slot.adapter_key):
                with self.llama_lock:
                    size = self.lib.llama_state_seq_get_size(self.model.ctx, slot.seq_id)
                if self.cache.ram_used + size > self.cache.ram_bytes:
                    continue               # a copy would push out a conversation that has no other
                self.stash(slot, least=self.SET_ASIDE_MIN_CELLS)
                if not self.cache.holds(slot.cached, slot.adapter_key):
                    continue
            self.drop(slot)
            left += 1
        if left:
            self.set_aside += left
            self.cache.log(f"kv pool: set {left} idle conversation(s) aside in the prompt cache before slot "
                           f"{reader.seq_id}'s {tokens} tokens of attention")
        return left

    def compaction_due(self) -> bool:
        return (self.model.shared_kv and self.model.attention_only and self.model.flash_attention is not False
                and not self._moved_since_decode
                and sum(1 for s in self.slots if s.state is SlotState.GENERATING) > 1
                and self.interleaved >= max(self.COMPACT_AFTER_CELLS, self.cells_used() // 8))

    def compact(self):
        """Lay each running reply's cells out as one block again. Replies generating together put their
        cells side by side in a shared pool, one of each per step, and llama.cpp's flash attention on the
        CPU then reads every sequence's keys strided through memory: at 4 replies 600 tokens deep, a
        quarter of the speed goes (bench/bench_kv_layout.py). Without flash attention the scores are one
        matrix product over all the cells, whatever their order, so it is not done there. llama.cpp
        cannot move cells, so each sequence's state is copied out, its cells freed, and the copy restored:
        it lands in the lowest free cells, each sequence in one piece and its cells in the same order, so
        its arithmetic does not change (a start shared with another slot is shared again, which may leave
        a hole that later cells fill)."""
        self.interleaved = 0
        lib, ctx, memory = self.lib, self.model.ctx, self.model.memory
        moving = [s for s in self.slots if s.busy and s.cached]
        # A start shared with a slot that moves, either way round, comes back as a copy before it is shared again
        # (an idle borrower of a running lender too): the pool needs room for the copies.
        resharing = [s for s in self.slots
                     if s.lender is not None and s.borrowed and (s in moving or s.lender in moving)]
        if sum(s.borrowed for s in resharing) > self.model.pool_tokens - self.cells_used():
            return
        with self.llama_lock:
            sizes = [lib.llama_state_seq_get_size(ctx, s.seq_id) for s in moving]
            if sum(sizes) > self.COMPACT_MAX_BYTES:
                return
            saved = []
            for slot, size in zip(moving, sizes):
                copy = (ctypes.c_uint8 * size)()
                if lib.llama_state_seq_get_data(ctx, copy, size, slot.seq_id) != size:
                    return                 # nothing has moved yet
                saved.append((slot, copy, size))
            for slot in moving:
                lib.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
            lost = [slot for slot, copy, size in saved
                    if lib.llama_state_seq_set_data(ctx, copy, size, slot.seq_id) != size]
            del saved
            for slot in lost:
                lib.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
                self.read_again(slot)
            # Share the borrowed starts again; a lender that is itself a borrower goes first.
            pending = list(resharing)
            while pending:
                for slot in [s for s in pending if s.lender not in pending] or pending[:1]:
                    pending.remove(slot)
                    n = slot.borrowed
                    if common_prefix_length(slot.lender.cached, slot.cached) >= n:
                        lib.llama_memory_seq_rm(memory, slot.seq_id, 0, n)
                        lib.llama_memory_seq_cp(memory, slot.lender.seq_id, slot.seq_id, 0, n)
                    else:
                        slot.lender, slot.borrowed = None, 0    # it keeps its own copy
        self.compactions += 1

    def read_again(self, slot: Slot):
        """The slot's cells are gone: all it held, and the token it drew last, are read again as prompt, after
        which it goes on as before."""
        slot.read_again()
        self.trimmed(slot)

    def shift(self, slot: Slot) -> int:
        """A full context: drop the older half of what follows the kept front, and move the rest down.
        The front kept includes cells shared with another slot (they cannot move). The tokens dropped (0: none
        could go)."""
        job, lib, memory, seq = slot.job, self.lib, self.model.memory, slot.seq_id
        cached = slot.cached
        n_past = len(cached)
        n_keep = media_run_end(cached, max(job.n_keep, slot.shared_upto))
        end = media_run_end(cached, n_keep + (n_past - n_keep) // 2)
        n_discard = end - n_keep
        if n_discard <= 0 or end >= n_past:       # an image or clip is dropped whole or kept whole, never cut
            return 0
        with self.llama_lock:
            lib.llama_memory_seq_rm(memory, seq, n_keep, n_keep + n_discard)
            lib.llama_memory_seq_add(memory, seq, n_keep + n_discard, n_past, -n_discard)
            self._moved_since_decode = True
        del slot.cached[n_keep:n_keep + n_discard]
        return n_discard
