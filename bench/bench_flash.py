#!/usr/bin/env python3
"""What flash attention costs on the CPU: one decode of n tokens after `depth` tokens of context, with llama.cpp's
flash attention on and off (raw, no server).

    python3 bench/bench_flash.py [--depths 300,1000,2000,3300] [--widths 1,2,4,8,16,20] [--reps 5]

A decode of a few tokens over a long context is what a new turn of a cached conversation, a draft being checked
and several slots' tokens in a shared pool all are. The model is the starter model; each depth is read once per
setting, then every width is decoded `reps` times, its cells removed after each, so the context stays as built.
The two settings take turns depth by depth; the figure is the median, in milliseconds. The last row is the time
to read the deepest prompt itself. Writes bench/results/flash.md.
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

from koboldlite.model_files import find_starter_model  # noqa: E402
from koboldlite.engine.llama_model import LlamaModel  # noqa: E402
from results_file import publish  # noqa: E402


def decode(model: LlamaModel, batch, tokens: list[int], pos: int) -> float:
    lib = model.lib
    for at in range(0, len(tokens), model.n_batch):
        chunk = tokens[at:at + model.n_batch]
        for i, t in enumerate(chunk):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos + at + i, 1
            batch.seq_id[i][0], batch.logits[i] = 0, i == len(chunk) - 1
        batch.n_tokens = len(chunk)
        started = time.perf_counter()
        assert lib.llama_decode(model.ctx, batch) == 0
    return time.perf_counter() - started


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", default="300,1000,2000,3300")
    ap.add_argument("--widths", default="1,2,4,8,16,20")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    widths = [int(w) for w in args.widths.split(",")]
    path = find_starter_model()
    rng = random.Random(1)
    tokens = [rng.randrange(1000, 40000) for _ in range(max(depths) + max(widths))]   # real ids, varied scores
    models = {flash: LlamaModel(path, n_ctx=4096, n_seq=1, n_threads=args.threads, n_gpu_layers=0,
                                           flash_attention=flash) for flash in (True, False)}
    batches = {flash: m.lib.llama_batch_init(m.n_batch, 0, 1) for flash, m in models.items()}
    ms = {}
    read = {}
    for depth in depths:
        for flash, model in models.items():
            lib = model.lib
            lib.llama_memory_clear(model.memory, True)
            started = time.perf_counter()
            decode(model, batches[flash], tokens[:depth], 0)
            read[(flash, depth)] = time.perf_counter() - started
            for w in widths:
                runs = []
                for _ in range(args.reps):
                    runs.append(decode(model, batches[flash], tokens[depth:depth + w], depth))
                    lib.llama_memory_seq_rm(model.memory, 0, depth, -1)
                ms[(flash, depth, w)] = statistics.median(runs) * 1000
            print(f"depth {depth} flash {'on' if flash else 'off'}: "
                  + ", ".join(f"{w}: {ms[(flash, depth, w)]:.1f} ms" for w in widths), flush=True)
    for model in models.values():
        model.close()
    lines = ["# Flash attention on the CPU: one decode of n tokens after a context of `depth` tokens", "",
             f"`python3 bench/bench_flash.py --depths {args.depths} --widths {args.widths} --reps {args.reps}`, "
             f"{args.threads} threads, SmolLM2-135M, f16 KV. Milliseconds, median; on / off, and off over on.", "",
             "| depth | " + " | ".join(f"{w} token{'s' if w > 1 else ''}" for w in widths) + " |",
             "|---:|" + "---:|" * len(widths)]
    for depth in depths:
        lines.append(f"| {depth} | " + " | ".join(
            f"{ms[(True, depth, w)]:.1f} / {ms[(False, depth, w)]:.1f} ({ms[(False, depth, w)] / ms[(True, depth, w)]:.2f})"
            for w in widths) + " |")
    deepest = max(depths)
    lines += ["", f"Reading the {deepest}-token prompt itself: {read[(True, deepest)]:.2f} s with flash attention, "
              f"{read[(False, deepest)]:.2f} s without."]
    publish("flash.md", lines)


if __name__ == "__main__":
    main()
