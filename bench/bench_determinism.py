#!/usr/bin/env python3
"""What a fixed seed promises: the same prompt, cold and then from the prompt cache.

    python3 bench/bench_determinism.py [--prompts 30] [--tokens 60]

For each of N different prompts, one request reads the prompt cold (nothing of it cached) and the
same request again finds all but its last token cached. With the same seed the two texts would agree
if cached and uncached evaluation gave bit-identical logits; they need not (a batch of 200 tokens and
a batch of one round differently), and this counts how often and how far they part: the share of
pairs that differ, and the first differing token of those. Sampled (temperature 0.8) and greedy.

Then the thread count: the same long prompts (about 700 tokens, past the 512-cell view where llama.cpp's
CPU flash attention splits a one-token step among its threads) on a server at `--threads 1` and one at
`--threads 2`, counted the same way. Writes bench/results/determinism.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from koboldlite.model_files import find_starter_model  # noqa: E402
from results_file import publish  # noqa: E402
from tests.harness import ServerProcess  # noqa: E402

TOPICS = ["a lighthouse", "a clockmaker", "a dragon", "a baker", "a lost cat", "a mountain village", "a river",
          "a space station", "a library", "a storm", "a gardener", "a violin", "a train", "a fox", "a castle"]


def first_difference(server, a: str, b: str) -> int | None:
    ta = server.json("POST", "/tokenize", {"content": a})["tokens"]
    tb = server.json("POST", "/tokenize", {"content": b})["tokens"]
    if ta == tb:
        return None
    return next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))


SAMPLINGS = (("sampled, temperature 0.8, seed 7", {"temperature": 0.8, "sampler_seed": 7}),
             ("greedy", {"temperature": 0}))


def story(i: int, n: int, repeats: int) -> str:
    return (f"Story {i} of {n}. This is a long, quiet tale about {TOPICS[i % len(TOPICS)]}, "
            f"told by the fire on a winter night, in many small chapters. " * repeats)


def row(label: str, differing: list[int], n: int) -> str:
    where = f"{min(differing)} / {statistics.median(differing):.0f} / {max(differing)}" if differing else "-"
    return f"| {label} | {len(differing)} of {n} ({len(differing) / n:.0%}) | {where} |"


def thread_counts(model: str, prompts: int, tokens: int) -> list[str]:
    """The same long requests on a server at one thread and one at two: do their texts part?"""
    servers = [ServerProcess(["--model", model, "--contextsize", "2048", "--quiet", "--threads", str(n)])
               for n in (1, 2)]
    rows = []
    try:
        for label, sampling in SAMPLINGS:
            differing = []
            for i in range(prompts):
                body = {"prompt": story(i, prompts, 16), "max_length": tokens, "ban_eos_token": True, **sampling}
                one, two = (s.json("POST", "/api/v1/generate", body)["results"][0]["text"] for s in servers)
                d = first_difference(servers[0], one, two)
                if d is not None:
                    differing.append(d)
            rows.append(row(label, differing, prompts))
        prompt_tokens = servers[0].json("GET", "/api/extra/perf")["last_input_count"]
    finally:
        for s in servers:
            s.stop()
    return [f"The same request at `--threads 1` and at `--threads 2`, prompts of {prompt_tokens} tokens, "
            f"{tokens} tokens each", "",
            "| sampling | pairs whose texts differ | first differing token: min / median / max |",
            "|---|---:|---:|", *rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=find_starter_model())
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=60)
    ap.add_argument("--long-prompts", type=int, default=10, help="prompts of the thread-count comparison")
    args = ap.parse_args()
    server = ServerProcess(["--model", args.model, "--contextsize", "2048", "--quiet"])
    rows = []
    try:
        for label, sampling in SAMPLINGS:
            differing = []
            for i in range(args.prompts):
                body = {"prompt": story(i, args.prompts, 4), "max_length": args.tokens, "ban_eos_token": True, **sampling}
                cold = server.json("POST", "/api/v1/generate", body)["results"][0]["text"]
                assert server.json("GET", "/api/extra/perf")["last_cached_count"] < 8    # at most "Story N"
                warm = server.json("POST", "/api/v1/generate", body)["results"][0]["text"]
                perf = server.json("GET", "/api/extra/perf")
                assert perf["last_cached_count"] == perf["last_input_count"] - 1
                d = first_difference(server, cold, warm)
                if d is not None:
                    differing.append(d)
            rows.append(row(label, differing, args.prompts))
    finally:
        server.stop()
    lines = [f"Cold prompt, then the same request with all but its last token cached; {args.tokens} tokens each, "
             f"model {os.path.basename(args.model)}", "",
             "| sampling | pairs whose texts differ | first differing token: min / median / max |",
             "|---|---:|---:|", *rows, "", *thread_counts(args.model, args.long_prompts, args.tokens)]
    publish("determinism.md", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
