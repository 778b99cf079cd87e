#!/usr/bin/env python3
"""What idle conversations in a shared KV pool cost a new prompt (issue 36), straight through llama.cpp.

    python3 bench/bench_pool_attention.py [--rounds 4] [--tokens 2000]

Two contexts of the starter model, 4 sequences and 10,240 cells each, as bench_neighbours.py's --parallel 4 has
them: one unified (KoboldLite's shared pool) and one split into 4 streams (llama-server's -np 4, KoboldLite's
--kvsplit). In each, a fresh prompt of --tokens random tokens is read into sequence 0 (batches of 512, logits of
the last token only) with the cache empty, and with sequences 1-3 holding --tokens each (idle conversations).
Rounds interleaved, median. KVPool.set_aside_idle exists because of the unified pool's second row.

A second table is its threshold (KVPool.SET_ASIDE_MIN_TOKENS): in the unified context, the milliseconds a token
of a short reply (--reply single-token steps after a 4-token prompt) takes alone and beside one idle conversation of
--tokens, and what setting that conversation aside costs (its state copied out, llama_state_seq_get_data into a
new buffer, and back, llama_state_seq_set_data): the reply tokens after which the copies have paid for themselves.
Writes bench/results/pool-attention.md.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from koboldlite.engine.llama_model import LlamaModel  # noqa: E402
from koboldlite.model_files import find_starter_model  # noqa: E402
import results_file  # noqa: E402

CELLS, SEQS, BATCH = 10240, 4, 512


class Context:
    """One llama context of the starter model and a batch to feed it."""

    def __init__(self, shared: bool, threads: int):
        self.model = LlamaModel(find_starter_model(), CELLS, SEQS, threads, 0, n_batch=BATCH,
                                shared_kv=shared, split_kv=not shared)
        self.lib = self.model.lib
        self.batch = self.lib.llama_batch_init(BATCH, 0, 1)

    def decode(self, seq: int, tokens: list[int], start: int):
        """One llama_decode of these tokens into the sequence from position `start`, logits of the last only."""
        b = self.batch
        b.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i] = t, start + i, 1
            b.seq_id[i][0], b.logits[i] = seq, i == len(tokens) - 1
        if self.lib.llama_decode(self.model.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def read(self, seq: int, n: int) -> float:
        """Read n random tokens into the sequence; the seconds it took."""
        tokens = [random.randrange(1000, 40000) for _ in range(n)]
        started = time.perf_counter()
        for off in range(0, n, BATCH):
            self.decode(seq, tokens[off:off + BATCH], off)
        return time.perf_counter() - started

    def reply_ms(self, idle: int, reply: int) -> float:
        """Milliseconds a reply token takes in sequence 0 (a 4-token prompt, then single-token steps), with
        sequence 1 holding `idle` tokens (0: none)."""
        self.lib.llama_memory_clear(self.model.memory, True)
        if idle:
            self.read(1, idle)
        self.read(0, 4)
        started = time.perf_counter()
        for i in range(reply):
            self.decode(0, [random.randrange(1000, 40000)], 4 + i)
        return (time.perf_counter() - started) * 1000 / reply

    def copy_ms(self, n: int) -> tuple[float, float]:
        """Milliseconds to copy a conversation of n tokens out of the pool and back, as KVPool.stash and
        KVPool.restore do."""
        lib, ctx = self.lib, self.model.ctx
        self.lib.llama_memory_clear(self.model.memory, True)
        self.read(1, n)
        started = time.perf_counter()
        size = lib.llama_state_seq_get_size(ctx, 1)
        buf = (ctypes.c_uint8 * size)()
        lib.llama_state_seq_get_data(ctx, buf, size, 1)
        out = time.perf_counter()
        lib.llama_memory_seq_rm(self.model.memory, 1, -1, -1)
        lib.llama_state_seq_set_data(ctx, buf, size, 1)
        back = time.perf_counter()
        return (out - started) * 1000, (back - out) * 1000

    def measure(self, others: bool, n: int) -> float:
        """Tokens/s reading n tokens into sequence 0, with the other sequences empty or holding n each."""
        self.lib.llama_memory_clear(self.model.memory, True)
        if others:
            for seq in range(1, SEQS):
                self.read(seq, n)
        return n / self.read(0, n)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--reply", type=int, default=100, help="reply tokens in the threshold's table")
    args = p.parse_args()
    contexts = {"unified (shared pool)": Context(True, args.threads), "split (--kvsplit, llama-server -np)":
                Context(False, args.threads)}
    speed = {(name, others): [] for name in contexts for others in (False, True)}
    reply = {0: [], args.tokens: []}
    copies = {"out": [], "back": []}
    for n in range(args.rounds):
        for name, ctx in contexts.items():
            for others in (False, True):
                speed[(name, others)].append(ctx.measure(others, args.tokens))
        unified = contexts["unified (shared pool)"]
        for idle in (0, args.tokens):
            reply[idle].append(unified.reply_ms(idle, args.reply))
        out, back = unified.copy_ms(args.tokens)
        copies["out"].append(out)
        copies["back"].append(back)
        print(f"round {n + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    lines = [f"# A new prompt beside idle conversations (issue 36): {os.cpu_count()} cores, "
             f"{time.strftime('%Y-%m-%d %H:%M')}, {args.rounds} rounds (median), "
             f"`python3 bench/bench_pool_attention.py --rounds {args.rounds} --tokens {args.tokens}`", "",
             f"Prompt reading tok/s of {args.tokens} tokens, {args.threads} threads, llama.cpp directly:", "",
             "| KV cache | cache empty | 3 idle conversations of the same length | ratio |", "|---|---:|---:|---:|"]
    for name in contexts:
        empty, full = (statistics.median(speed[(name, o)]) for o in (False, True))
        lines.append(f"| {name} | {empty:.1f} | {full:.1f} | {full / empty:.2f} |")
    alone, beside = statistics.median(reply[0]), statistics.median(reply[args.tokens])
    out, back = statistics.median(copies["out"]), statistics.median(copies["back"])
    extra = beside - alone
    lines += ["", f"A reply of {args.reply} tokens in the unified pool, alone and beside one idle conversation of "
              f"{args.tokens} tokens; what setting that conversation aside costs:", "",
              "| ms a reply token, alone | beside the idle conversation | extra per token | copy out, ms "
              "| copy back, ms | reply tokens that pay for both copies |", "|---:|---:|---:|---:|---:|---:|",
              f"| {alone:.2f} | {beside:.2f} | {extra:.2f} | {out:.1f} | {back:.1f} | "
              + (f"{(out + back) / extra:.0f} |" if extra > 0 else "never (no extra cost measured) |")]
    results_file.publish("pool-attention.md", lines)


if __name__ == "__main__":
    main()
