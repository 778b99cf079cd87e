#!/usr/bin/env python3
"""What idle conversations in a shared KV pool cost a new prompt (issue 36), straight through llama.cpp.

    python3 bench/bench_pool_attention.py [--rounds 4] [--tokens 2000]

Two contexts of the starter model, 4 sequences and 10,240 cells each, as bench_neighbours.py's --parallel 4 has
them: one unified (KoboldLite's shared pool) and one split into 4 streams (llama-server's -np 4, KoboldLite's
--kvsplit). In each, a fresh prompt of --tokens random tokens is read into sequence 0 (batches of 512, logits of
the last token only) with the cache empty, and with sequences 1-3 holding --tokens each (idle conversations).
Rounds interleaved, median. KVPool.set_aside_idle exists because of the unified pool's second row.
Writes bench/results/pool-attention.md.
"""

from __future__ import annotations

import argparse
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

    def read(self, seq: int, n: int) -> float:
        """Read n random tokens into the sequence; the seconds it took."""
        tokens = [random.randrange(1000, 40000) for _ in range(n)]
        started = time.perf_counter()
        for off in range(0, n, BATCH):
            chunk = tokens[off:off + BATCH]
            b = self.batch
            b.n_tokens = len(chunk)
            for i, t in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i] = t, off + i, 1
                b.seq_id[i][0], b.logits[i] = seq, i == len(chunk) - 1
            if self.lib.llama_decode(self.model.ctx, b) != 0:
                raise RuntimeError("llama_decode failed")
        return time.perf_counter() - started

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
    args = p.parse_args()
    contexts = {"unified (shared pool)": Context(True, args.threads), "split (--kvsplit, llama-server -np)":
                Context(False, args.threads)}
    speed = {(name, others): [] for name in contexts for others in (False, True)}
    for n in range(args.rounds):
        for name, ctx in contexts.items():
            for others in (False, True):
                speed[(name, others)].append(ctx.measure(others, args.tokens))
        print(f"round {n + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    lines = [f"# A new prompt beside idle conversations (issue 36): {os.cpu_count()} cores, "
             f"{time.strftime('%Y-%m-%d %H:%M')}, {args.rounds} rounds (median), "
             f"`python3 bench/bench_pool_attention.py --rounds {args.rounds} --tokens {args.tokens}`", "",
             f"Prompt reading tok/s of {args.tokens} tokens, {args.threads} threads, llama.cpp directly:", "",
             "| KV cache | cache empty | 3 idle conversations of the same length | ratio |", "|---|---:|---:|---:|"]
    for name in contexts:
        empty, full = (statistics.median(speed[(name, o)]) for o in (False, True))
        lines.append(f"| {name} | {empty:.1f} | {full:.1f} | {full / empty:.2f} |")
    results_file.publish("pool-attention.md", lines)


if __name__ == "__main__":
    main()
