#!/usr/bin/env python3
"""What the shared KV pool costs llama.cpp's attention: 4 sequences decoded together, raw (no server).

    python3 bench/bench_kv_layout.py [--depths 20,110,200,600] [--steps 150]

The layouts hold the same tokens, each sequence `depth` tokens deep:
- shared, interleaved: one unified cache, the 4 sequences generated together from the start (each step
  puts one cell of each sequence next to the others: what a shared pool holds after concurrent replies);
- shared, in blocks: one unified cache, each sequence read in alone first (its cells contiguous);
- split: a cache stream per sequence of contextsize/4 (`--kvsplit`; llama-server -np 4's layout);
- per slot: a cache stream per sequence of the whole context (`--kvperslot`);
and three of them again without llama.cpp's flash attention (`--noflashattention`; its auto turns it on).
The sequences hold real text (this repository's README, from four different places): attention's
cost depends on the scores, and a repeated token gives an unrealistic pattern. One timed step decodes
one token for each sequence and then removes it, so the layout stays as built.
The layouts take turns step by step, in rotating order: on a machine whose speed drifts by the minute,
only such paired timings compare. Writes bench/results/kv-layout.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from koboldlite.model_files import find_starter_model  # noqa: E402
from koboldlite.engine.llama_model import LlamaModel  # noqa: E402
from results_file import publish  # noqa: E402

N_SEQ, CTX = 4, 8192


class Layout:
    """One llama context whose cache holds the 4 sequences `depth` deep, laid out one way."""

    def __init__(self, model: LlamaModel, texts: list[list[int]], depth: int, blocks: bool):
        self.model, self.depth, self.texts = model, depth, texts
        self.lib = model.lib
        self.batch = self.lib.llama_batch_init(512, 0, N_SEQ)
        self.lib.llama_memory_clear(model.memory, True)
        if blocks:
            for seq in range(N_SEQ):
                for start in range(0, depth, 512):
                    self.decode([(texts[seq][p], p, seq) for p in range(start, min(depth, start + 512))])
        else:
            for p in range(depth):
                self.decode([(texts[seq][p], p, seq) for seq in range(N_SEQ)])

    def decode(self, items):
        b = self.batch
        for n, (token, pos, seq) in enumerate(items):
            b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = token, pos, 1, True
            b.seq_id[n][0] = seq
        b.n_tokens = len(items)
        assert self.lib.llama_decode(self.model.ctx, b) == 0

    def timed_step(self) -> float:
        t0 = time.perf_counter()
        self.decode([(self.texts[seq][self.depth], self.depth, seq) for seq in range(N_SEQ)])
        elapsed = time.perf_counter() - t0
        for seq in range(N_SEQ):
            self.lib.llama_memory_seq_rm(self.model.memory, seq, self.depth, -1)
        return elapsed

    def close(self):
        self.lib.llama_batch_free(self.batch)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=find_starter_model())
    ap.add_argument("--depths", default="20,110,200,600", help="tokens per sequence, comma-separated")
    ap.add_argument("--steps", type=int, default=150, help="timed steps per layout and depth")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    depths = [int(d) for d in args.depths.split(",")]

    def model(**layout):
        return LlamaModel(args.model, n_ctx=CTX, n_seq=N_SEQ, n_threads=args.threads, n_gpu_layers=0,
                                     **layout)
    # A context each: one unified cache can hold only one layout at a time.
    contexts = {"shared pool, interleaved": (model(shared_kv=True), False),
                "shared pool, in blocks": (model(shared_kv=True), True),
                "split (--kvsplit)": (model(split_kv=True), False),
                "a cache per slot (--kvperslot)": (model(), False),
                # without llama.cpp's flash attention (--noflashattention; its auto turns it on), the same tokens
                "no flash attention: shared, interleaved": (model(shared_kv=True, flash_attention=False), False),
                "no flash attention: shared, in blocks": (model(shared_kv=True, flash_attention=False), True),
                "no flash attention: per slot": (model(flash_attention=False), False)}
    names = list(contexts)
    with open(os.path.join(os.path.dirname(HERE), "README.md"), encoding="utf-8") as f:
        readme = contexts[names[0]][0].tokenize(f.read(), add_bos=False)
    need = max(depths) + 1
    if len(readme) < N_SEQ * need:
        sys.exit(f"README.md has {len(readme)} tokens: too few for 4 sequences {need} deep")
    texts = [readme[k * need:(k + 1) * need] for k in range(N_SEQ)]
    lines = ["# KV layout and batched decode speed", "",
             f"{N_SEQ} sequences, one token each per step, {args.steps} steps per layout and depth, paired step "
             f"by step; {args.threads} threads. Tokens/s, and the speed relative to a cache per slot (with flash "
             "attention, llama.cpp's auto).", "",
             "| depth | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for depth in depths:
        layouts = {name: Layout(m, texts, depth, blocks) for name, (m, blocks) in contexts.items()}
        spent = dict.fromkeys(names, 0.0)
        for step in range(args.steps):
            for name in names[step % len(names):] + names[:step % len(names)]:
                spent[name] += layouts[name].timed_step()
        for layout in layouts.values():
            layout.close()
        base = spent["a cache per slot (--kvperslot)"]
        lines.append(f"| {depth} | " + " | ".join(
            f"{N_SEQ * args.steps / spent[n]:.1f} ({base / spent[n]:.2f})" for n in names) + " |")
        print(lines[-1], flush=True)
    lines += ["", f"Reproduce: `python3 bench/bench_kv_layout.py --depths {args.depths} --steps {args.steps}`"]
    publish("kv-layout.md", lines)


if __name__ == "__main__":
    main()
