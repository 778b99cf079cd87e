#!/usr/bin/env python3
"""Several choices (`n`) against separate requests: one /v1/completions request with n=4 against four requests
sent at once (seeds 1..4), on the starter model, --parallel 1 and --parallel 4, rounds interleaved.

    python3 bench/bench_choices.py [--rounds 3] [--prompt-tokens 1500] [--tokens 64]

Reports, per server and form: wall time to the last token (median of the rounds), the prompt tokens the engine
actually read (from the server's log: prompt tokens less cached ones, summed over the four jobs), and the KV cells
the four replies held at their end (their prompts' cells counted once where they were shared: the read tokens plus
the generated ones). Every reply is --tokens long (end of sequence banned). Writes bench/results/choices.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from koboldlite.model_files import find_starter_model  # noqa: E402
import results_file  # noqa: E402
from tests.harness import ServerProcess  # noqa: E402

ENDED = r"job (\d+) ended: (\w+), (\d+) prompt tokens \((\d+) cached\)"


def prompt_of(tokens: int, salt: int) -> str:
    words = "the quick brown fox jumps over a lazy dog while seven sailors sing of distant harbours".split()
    return f"Round {salt}. " + " ".join(words[(i * 7 + salt) % len(words)] for i in range(int(tokens * 0.8)))


def post(server: ServerProcess, body: dict) -> dict:
    status, _, data = server.request("POST", "/v1/completions", body, timeout=900)   # a busy machine is slow
    assert status == 200, (status, data)
    return json.loads(data)


def run(server: ServerProcess, form: str, prompt: str, tokens: int) -> tuple[float, int]:
    """(seconds, prompt tokens read) of one round."""
    base = {"prompt": prompt, "max_tokens": tokens, "ban_eos_token": True, "temperature": 1.0}
    mark = server.mark()
    started = time.perf_counter()
    if form == "n=4":
        post(server, {**base, "n": 4, "seed": 1})
    else:
        threads = [threading.Thread(target=post, args=(server, {**base, "seed": 1 + i})) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    seconds = time.perf_counter() - started
    read, start = 0, mark
    for _ in range(4):
        m = server.wait_for_line(ENDED, start=start)
        read += int(m.group(3)) - int(m.group(4))
        start = server.lines.index(m.string, start) + 1
    return seconds, read


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=1500)
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    model = find_starter_model()
    servers = {f"--parallel {k}": ServerProcess(["--model", model, "--contextsize", "8192", "--parallel", str(k),
                                                 "--cacheram", "0"]) for k in (1, 4)}
    results: dict[tuple[str, str], list[tuple[float, int]]] = {}
    salts = iter(range(1_000_000))
    try:
        for r in range(args.rounds):
            for name, server in servers.items():
                for form in ("n=4", "4 requests"):
                    prompt = prompt_of(args.prompt_tokens, next(salts))   # a new prompt each time: nothing cached
                    results.setdefault((name, form), []).append(run(server, form, prompt, args.tokens))
    finally:
        for server in servers.values():
            server.stop()
    lines = [f"# Several choices: n=4 against 4 requests at once ({args.prompt_tokens}-token prompt, "
             f"{args.tokens} tokens each, starter model, {args.rounds} rounds interleaved)", "",
             "| server | form | seconds (median) | prompt tokens read | KV cells held at the end |", "|---|---|---|---|---|"]
    for (name, form), runs in results.items():
        seconds = statistics.median(s for s, _ in runs)
        read = statistics.median(n for _, n in runs)
        lines.append(f"| {name} | {form} | {seconds:.2f} | {read:.0f} | {read + 4 * args.tokens:.0f} |")
    for name in servers:
        ratio = statistics.median(s for s, _ in results[(name, "n=4")]) / \
            statistics.median(s for s, _ in results[(name, "4 requests")])
        lines.append(f"\n{name}: n=4 takes {ratio:.2f} of the time of 4 requests")
    results_file.publish("choices.md", lines)


if __name__ == "__main__":
    main()
