#!/usr/bin/env python3
"""What samplers, phrase bans and logprobs cost: single-stream tokens/s on one server, next to plain.

    python3 bench/bench_samplers.py [--model FILE] [--tokens 200] [--rounds 5]

Every round runs each configuration once, in turn, on the same server (interleaved, so that this
machine's drift hits all alike); the figure per configuration is the median over rounds of the
generation speed the server measured (first token to last, prompt excluded), and the ratio is to
plain sampling in the same run. Target (issue 11): DRY + XTC + dynamic temperature + n-sigma together
cost at most 10%. Issue 13 asks for 20 banned phrases and for 5 logprobs next to plain.
Writes the table to bench/results/samplers.md.
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

PROMPT = "Write a long story about a lighthouse keeper and the sea."
PLAIN = {"temperature": 0.75, "top_k": 100, "top_p": 0.92, "rep_pen": 1.07, "rep_pen_range": 360}
BANNED = [f"{a} {b}" for a, b in zip(["shivers", "barely", "a testament", "ministrations", "maybe, just",
                                       "a mix of", "eyes sparkling", "couldn't help", "the weight of",
                                       "in the grand", "dance of", "tapestry of", "whispering", "palpable",
                                       "sends shivers", "intricate", "a stark", "unbeknownst", "the air",
                                       "with newfound"],
                                      ["down", "above", "to", "of", "maybe", "of", "with", "but", "it",
                                       "scheme", "shadows", "life", "winds", "tension", "through", "web",
                                       "reminder", "to", "thick", "resolve"])]
CONFIGS = {
    "plain (KoboldCpp defaults)": {},
    "20 banned phrases": {"banned_tokens": BANNED},
    "logprobs, 5 after samplers (Kobold API)": {"logprobs": True},
    "logprobs, top 5 of the model's (/v1/completions)": {"logprobs": 5, "_path": "/v1/completions"},
    "DRY + XTC + dynatemp + nsigma (native)": {"dry_multiplier": 0.8, "dry_base": 1.75, "dry_allowed_length": 2,
                                               "xtc_probability": 0.5, "xtc_threshold": 0.1,
                                               "dynatemp_range": 0.5, "dynatemp_exponent": 1.0, "nsigma": 1.0},
    "rep_pen_slope 0.7 (numpy sampler)": {"rep_pen_slope": 0.7},
    "top_a + tfs + smoothing (numpy samplers)": {"top_a": 0.1, "tfs": 0.95, "smoothing_factor": 0.3},
}


def tokens_per_second(server: ServerProcess, tokens: int, extra: dict) -> float:
    extra = dict(extra)
    path = extra.pop("_path", "/api/v1/generate")
    server.json("POST", path, {"prompt": PROMPT, "max_length": tokens, "max_tokens": tokens, "ban_eos_token": True,
                               "sampler_seed": 1, **PLAIN, **extra})
    perf = server.json("GET", "/api/extra/perf")
    return perf["last_token_count"] / perf["last_eval"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=find_starter_model())
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    server = ServerProcess(["--model", args.model, "--contextsize", "2048", "--quiet"])
    try:
        tokens_per_second(server, 20, {})          # warm-up
        runs: dict[str, list[float]] = {name: [] for name in CONFIGS}
        for _ in range(args.rounds):
            for name, extra in CONFIGS.items():
                runs[name].append(tokens_per_second(server, args.tokens, extra))
    finally:
        server.stop()
    plain = statistics.median(runs[next(iter(CONFIGS))])
    lines = [f"Single stream, {args.tokens} tokens, {args.rounds} interleaved rounds, "
             f"model {os.path.basename(args.model)}", "",
             "| sampling | tokens/s (median) | ratio to plain |", "|---|---:|---:|"]
    for name, values in runs.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.1f} | {median / plain:.3f} |")
    publish("samplers.md", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
