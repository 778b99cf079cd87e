#!/usr/bin/env python3
"""A server started on a busy machine, measured once the machine is quiet (issue 36): drafts weighed against step
costs measured beside busy programs.
    git worktree add --detach /tmp/before <a commit before the costs were measured again>  (e.g. c289b59)
    python3 bench/bench_busy_start.py [--before /tmp/before] [--rounds 4] [--each 2]
KoboldLite measures what a decode of n tokens costs at start-up, and drafts (from the context, on by default) only
as far as a wider batch pays (engine/drafting.py). Servers on the starter model, --each of them started while 0, 1
or 2 busy loops ran (ended once it is ready; the starts alternate), then one short reply each and, where the server
says its table was measured beside busy programs, the idle loop's measurement again (nothing else running
meanwhile: a user's one server on a machine that has become quiet), then on the quiet machine: bench_speculative.py's
three chat workloads (a passage copied with one edit, a function given back with a variable renamed, an open
question; greedy, 300 tokens, one client), servers rotated each round. Figures: tokens/s after the first token and
drafted tokens per reply, medians over a start's servers and the rounds; ratios: over the same code's servers
started quiet, round by round (median, in brackets the lowest and highest); each server's table at the end. With
--before, the same starts of that checkout. Writes bench/results/busy-start.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from koboldlite.model_files import find_starter_model  # noqa: E402
import results_file  # noqa: E402
from bench_neighbours import Neighbours  # noqa: E402
from bench_speculative import WORKLOADS, stream_chat  # noqa: E402
from tests.harness import PIP_LLAMA_LIB, ServerProcess  # noqa: E402

STARTS = ("quiet", "1 busy loop", "2 busy loops")


def start(script: str, condition: str) -> ServerProcess:
    """A server of that checkout, started while the condition's busy loops run; they end once it is ready."""
    neighbours = Neighbours(condition)
    try:
        return ServerProcess(["--model", find_starter_model(), "--contextsize", "4096"],
                             command=[sys.executable, script, "--port", "0"],
                             env={"LLAMA_CPP_LIB_PATH": PIP_LLAMA_LIB})
    finally:
        neighbours.end()


def step_cost(server: ServerProcess) -> dict | None:
    """The table the drafts are weighed against (None from a server too old to say)."""
    return json.loads(server.request("GET", "/api/extra/perf")[2]).get("draft_step_cost")


def drafted(server: ServerProcess) -> int:
    return json.loads(server.request("GET", "/api/extra/perf")[2])["last_draft_count"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", help="a checkout of KoboldLite to start the same way, side by side")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--each", type=int, default=2, help="servers started in each condition, of each code")
    args = p.parse_args()
    codes = {"KoboldLite": os.path.join(ROOT, "koboldlite.py")}
    if args.before:
        commit = subprocess.run(["git", "-C", args.before, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or args.before
        codes[f"before ({commit})"] = os.path.join(args.before, "koboldlite.py")
    servers = {}
    try:
        for i in range(args.each):                  # the starts alternate: the host's own noise falls on each
            for code, script in codes.items():
                for condition in STARTS:
                    servers[(code, condition, i)] = start(script, condition)
        for server in servers.values():
            # A first reply, then the idle loop's moment after it with nothing else running (a user's one server
            # on a machine that has become quiet): the bench's other servers would otherwise hold the cores.
            stream_chat(server, "Say hello.", {})
            table = step_cost(server)
            if table and table["beside_busy_programs"]:
                server.wait_for_line(r"drafts: step costs measured again", 60)
        speed = {(key, w): [] for key in servers for w in WORKLOADS}
        drafts = {(key, w): [] for key in servers for w in WORKLOADS}
        keys = list(servers)
        for rnd in range(args.rounds):
            for key in keys[rnd % len(keys):] + keys[:rnd % len(keys)]:
                for w, prompt in WORKLOADS.items():
                    speed[(key, w)].append(stream_chat(servers[key], prompt, {}))
                    drafts[(key, w)].append(drafted(servers[key]))
            print(f"round {rnd + 1}/{args.rounds}:", {f"{k[0]}, {k[1]}, {k[2]}, {w}": round(v[-1], 1)
                                                      for (k, w), v in speed.items()}, flush=True)
        tables = {key: step_cost(server) for key, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()

    def pooled(values: dict, code: str, condition: str, w: str, rnd: int | None = None) -> float:
        """The median over that start's servers (and over the rounds, or of one round)."""
        return statistics.median(v for i in range(args.each) for r, v in enumerate(values[((code, condition, i), w)])
                                 if rnd is None or r == rnd)

    lines = [f"# Started on a busy machine, measured on a quiet one: {time.strftime('%Y-%m-%d %H:%M')}, "
             f"{len(os.sched_getaffinity(0))} cores, {args.each} servers a start, {args.rounds} rounds, "
             f"`python3 bench/bench_busy_start.py{' --before <checkout>' if args.before else ''} --rounds "
             f"{args.rounds} --each {args.each}`", "",
             "Tokens/s after the first token and drafted tokens per reply (medians over the servers of that start and "
             "the rounds), and the ratio to the same code's servers started quiet, paired by round (median, "
             "lowest-highest):", "",
             "| code | started | " + " | ".join(f"{w} tok/s | drafted | / started quiet" for w in WORKLOADS) + " |",
             "|---|---|" + "---:|---:|---:|" * len(WORKLOADS)]
    for code in codes:
        for condition in STARTS:
            cells = []
            for w in WORKLOADS:
                ratios = [pooled(speed, code, condition, w, r) / pooled(speed, code, "quiet", w, r)
                          for r in range(args.rounds)]
                cells += [f"{pooled(speed, code, condition, w):.1f}", f"{pooled(drafts, code, condition, w):.0f}",
                          f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"]
            lines.append(f"| {code} | {condition} | " + " | ".join(cells) + " |")
    lines += ["", "The step costs each server weighed its drafts against at the end (ms by tokens in the batch; "
                  "/api/extra/perf's draft_step_cost), and its drafted tokens per reply (median of the rounds):", "",
              "| code | started | table | " + " | ".join(f"{w} drafted" for w in WORKLOADS) + " |",
              "|---|---|---|" + "---:|" * len(WORKLOADS)]
    for (code, condition, i), table in tables.items():
        told = "not reported" if table is None else (
            ", ".join(f"{w}: {ms}" for w, ms in table["ms"].items())
            + f"; beside busy programs: {table['beside_busy_programs']}; measurements: {table['measurements']}")
        counts = " | ".join(f"{statistics.median(drafts[((code, condition, i), w)]):.0f}" for w in WORKLOADS)
        lines.append(f"| {code} | {condition} | {told} | {counts} |")
    results_file.publish("busy-start.md", lines)


if __name__ == "__main__":
    main()
