#!/usr/bin/env python3
"""OpenMP's waiting, measured (issue 36 groundwork): pip's llama.cpp build runs its threads under libgomp, which
spins 300,000 times at every barrier before it sleeps, and reads its wait policy once, when it is loaded. Three
servers on the starter model, the policy set in each one's environment: libgomp's default, OMP_WAIT_POLICY=PASSIVE,
GOMP_SPINCOUNT=10000; single stream, 100 tokens, quiet and beside two busy loops, rounds interleaved; the median
of the rounds.

    python3 bench/bench_wait_policy.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from koboldlite.model_files import find_starter_model  # noqa: E402
from tests.harness import ServerProcess  # noqa: E402

POLICIES = {"libgomp default": {}, "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
            "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"}}


def busy_loop(stop):
    """A neighbour that wants a whole core."""
    count = 0
    while not stop.is_set():
        for _ in range(100_000):
            count += 1


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
    servers = {name: ServerProcess(["--model", model, "--contextsize", "1024", "--nodraft"], env=env)
               for name, env in POLICIES.items()}
    rates: dict[str, dict[int, list[float]]] = {name: {0: [], 2: []} for name in POLICIES}
    try:
        for _ in range(args.rounds):
            for neighbours in (0, 2):
                stop = multiprocessing.Event()
                loops = [multiprocessing.Process(target=busy_loop, args=(stop,)) for _ in range(neighbours)]
                for loop in loops:
                    loop.start()
                for name, server in servers.items():
                    rates[name][neighbours].append(tokens_per_second(server))
                stop.set()
                for loop in loops:
                    loop.join()
    finally:
        for server in servers.values():
            server.stop()
    print(f"| wait policy | quiet tok/s | 2 busy loops tok/s | busy / quiet |   ({os.cpu_count()} cores)")
    print("|---|---:|---:|---:|")
    for name in POLICIES:
        quiet, busy = statistics.median(rates[name][0]), statistics.median(rates[name][2])
        print(f"| {name} | {quiet:.1f} | {busy:.1f} | {busy / quiet:.2f} |")


if __name__ == "__main__":
    main()
