#!/usr/bin/env python3
"""What the shared KV pool costs llama.cpp's attention: 4 sequences decoded together, raw (no server).

    python3 bench/bench_kv_layout.py [--depth 600] [--rounds 4]

Three layouts of the same tokens, each sequence `--depth` tokens deep before 60 batched steps are timed:
- shared, interleaved: one unified cache, the 4 sequences generated together from the start (each step
  puts one cell of each sequence next to the others: what a shared pool holds after concurrent replies);
- shared, in blocks: one unified cache, each sequence read in alone first (its cells contiguous);
- per slot: a cache stream per sequence (`--kvperslot`; llama-server's default layout for -np N).
Writes bench/results/kv-layout.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import koboldlite  # noqa: E402
from results_file import publish  # noqa: E402

N_SEQ, STEPS = 4, 60


def batched_rate(model, layout: str, depth: int) -> float:
    lib = model.lib
    batch = lib.llama_batch_init(512, 0, N_SEQ)

    def decode(items):
        for n, (token, pos, seq, logits) in enumerate(items):
            batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = token, pos, 1, logits
            batch.seq_id[n][0] = seq
        batch.n_tokens = len(items)
        assert lib.llama_decode(model.ctx, batch) == 0

    lib.llama_memory_clear(model.memory, True)
    if layout == "blocks":
        for seq in range(N_SEQ):
            for start in range(0, depth, 512):
                decode([(100, p, seq, p == depth - 1) for p in range(start, min(depth, start + 512))])
    else:
        for p in range(depth):
            decode([(100 + seq, p, seq, True) for seq in range(N_SEQ)])
    t0 = time.perf_counter()
    for p in range(depth, depth + STEPS):
        decode([(100 + seq, p, seq, True) for seq in range(N_SEQ)])
    elapsed = time.perf_counter() - t0
    lib.llama_batch_free(batch)
    return N_SEQ * STEPS / elapsed


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=koboldlite.find_starter_model())
    ap.add_argument("--depth", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    ctx = 8192
    shared = koboldlite.LlamaModel(args.model, n_ctx=ctx, n_seq=N_SEQ, n_threads=args.threads, n_gpu_layers=0,
                                   shared_kv=True)
    per_slot = koboldlite.LlamaModel(args.model, n_ctx=ctx, n_seq=N_SEQ, n_threads=args.threads, n_gpu_layers=0)
    cases = {"shared pool, interleaved": (shared, "interleaved"), "shared pool, in blocks": (shared, "blocks"),
             "a cache per slot": (per_slot, "interleaved")}
    rates = {name: [] for name in cases}
    for _ in range(args.rounds):              # interleaved rounds: the machine's drift hits every case alike
        for name, (model, layout) in cases.items():
            rates[name].append(batched_rate(model, layout, args.depth))
    base = statistics.median(rates["a cache per slot"])
    lines = ["# KV layout and batched decode speed", "",
             f"{N_SEQ} sequences {args.depth} tokens deep, {STEPS} batched steps timed, {args.threads} threads, "
             f"median of {args.rounds} interleaved rounds.", "",
             "| layout | tokens/s | ratio to a cache per slot |", "|---|---:|---:|"]
    for name, values in rates.items():
        lines.append(f"| {name} | {statistics.median(values):.1f} | {statistics.median(values) / base:.2f} |")
    lines += ["", f"Reproduce: `python3 bench/bench_kv_layout.py --depth {args.depth}`"]
    publish("kv-layout.md", lines)


if __name__ == "__main__":
    main()
