#!/usr/bin/env python3
"""LoRA scales and batching: two concurrent requests under --parallel 2, under equal LoRA scales (one batch a step)
and under different ones (llama.cpp applies one scale set to a whole batch, so the two take turns, a step each),
beside one request alone; the starter model with the random test adapter (tests/make_lora.py), rounds interleaved.

    python3 bench/bench_lora.py [--rounds 3] [--tokens 128]

Reports, per form: wall time to the last token (median of the rounds), generated tokens per second over both
replies, and the times llama.cpp had to switch scale sets (each makes it reserve its graph again). Every reply is
--tokens long (end of sequence banned). Writes bench/results/lora.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from koboldlite.model_files import find_starter_model  # noqa: E402
import results_file  # noqa: E402
from tests.harness import ServerProcess  # noqa: E402
from tests.make_lora import make_lora  # noqa: E402

FORMS = {"1 request, scale 1": [1.0], "2 requests, equal scales (1, 1)": [1.0, 1.0],
         "2 requests, different scales (0, 1)": [0.0, 1.0], "2 requests, no adapter (0, 0)": [0.0, 0.0]}


def run(server: ServerProcess, scales: list[float], tokens: int) -> tuple[float, int]:
    """(seconds to the last token, scale switches) of one round: a request per scale, sent at once."""
    before = server.json("GET", "/props")["lora_scale_switches"]
    bodies = [{"prompt": f"Story {i}: once upon a time", "max_tokens": tokens, "ban_eos_token": True,
               "temperature": 0, "lora": [{"id": 0, "scale": s}]} for i, s in enumerate(scales)]
    threads = [threading.Thread(target=server.json, args=("POST", "/v1/completions", b)) for b in bodies]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    return seconds, server.json("GET", "/props")["lora_scale_switches"] - before


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=128)
    args = p.parse_args()
    model = find_starter_model()
    with tempfile.TemporaryDirectory() as folder:
        adapter = make_lora(os.path.join(folder, "bench-lora.gguf"), model)
        server = ServerProcess(["--model", model, "--contextsize", "2048", "--parallel", "2", "--cacheram", "0",
                                "--nodraft", "--lora", f"{adapter}:0"])
        results: dict[str, list[tuple[float, int]]] = {form: [] for form in FORMS}
        try:
            run(server, [1.0, 0.0], 16)                # warm up: both graphs made once
            for _ in range(args.rounds):
                for form, scales in FORMS.items():
                    results[form].append(run(server, scales, args.tokens))
        finally:
            server.stop()
    lines = [f"# LoRA scales and batching ({args.rounds} rounds, {args.tokens} tokens a reply, starter model, "
             f"--parallel 2, shared KV pool, random rank-8 adapter on attn_q/v/output and ffn_up of 30 layers)", "",
             "| form | wall s (median) | tokens/s | scale switches (median) |", "|---|---:|---:|---:|"]
    for form, rows in results.items():
        wall = statistics.median(r[0] for r in rows)
        n = len(FORMS[form]) * args.tokens
        lines.append(f"| {form} | {wall:.2f} | {n / wall:.1f} | {statistics.median(r[1] for r in rows):.0f} |")
    results_file.publish("lora.md", lines)


if __name__ == "__main__":
    main()
