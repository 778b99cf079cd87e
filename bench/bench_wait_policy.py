#!/usr/bin/env python3
"""OpenMP's waiting, measured (issue 36): pip's llama.cpp build runs its threads under libgomp, which spins 300,000
times at every barrier before it sleeps, and reads its wait policy once, when it is loaded. Three servers on the
starter model, all cores always (--threads, so that only the waiting differs), each with one --cpuwait: spin
(libgomp's default), short (GOMP_SPINCOUNT=10000), passive (OMP_WAIT_POLICY=PASSIVE); single stream, 100 tokens,
quiet, beside one busy loop, one at nice 10 and two, rounds interleaved; the median of the rounds. Writes
bench/results/wait-policy.md.

    python3 bench/bench_wait_policy.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from koboldlite.model_files import find_starter_model  # noqa: E402
import results_file  # noqa: E402
from bench_neighbours import Neighbours  # noqa: E402
from tests.harness import ServerProcess  # noqa: E402

POLICIES = ("spin", "short", "passive")
CONDITIONS = ("quiet", "1 busy loop", "1 busy loop at nice 10", "2 busy loops")


def tokens_per_second(server) -> float:
    started = time.perf_counter()
    status, _, body = server.request("POST", "/v1/completions", {
        "prompt": "Once upon a time", "max_tokens": 100, "temperature": 0, "ban_eos_token": True, "nodraft": True},
        timeout=900)                    # a contended spinning server can take minutes
    assert status == 200, body
    return json.loads(body)["usage"]["completion_tokens"] / (time.perf_counter() - started)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    model = find_starter_model()
    cores = str(len(os.sched_getaffinity(0)))
    servers = {name: ServerProcess(["--model", model, "--contextsize", "1024", "--nodraft", "--threads", cores,
                                    "--cpuwait", name]) for name in POLICIES}
    rates = {(name, c): [] for name in POLICIES for c in CONDITIONS}
    try:
        for _ in range(args.rounds):
            for condition in CONDITIONS:
                neighbours = Neighbours(condition)
                try:
                    for name, server in servers.items():
                        rates[(name, condition)].append(tokens_per_second(server))
                finally:
                    neighbours.end()
    finally:
        for server in servers.values():
            server.stop()
    lines = [f"# OpenMP's waiting, all {cores} cores always (issue 36): tokens/s, single stream, median of "
             f"{args.rounds} rounds, `python3 bench/bench_wait_policy.py`", "",
             f"| --cpuwait | {' | '.join(CONDITIONS)} |", "|---|" + "---:|" * len(CONDITIONS)]
    for name in POLICIES:
        quiet = statistics.median(rates[(name, "quiet")])
        lines.append(f"| {name} | {quiet:.1f} | " + " | ".join(
            f"{statistics.median(rates[(name, c)]):.1f} ({statistics.median(rates[(name, c)]) / quiet:.2f})"
            for c in CONDITIONS[1:]) + " |")
    results_file.publish("wait-policy.md", lines)


if __name__ == "__main__":
    main()
