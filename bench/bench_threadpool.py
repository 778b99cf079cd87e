#!/usr/bin/env python3
"""KoboldLite's own threadpools in a build without OpenMP (engine/threadpool.py), against ggml's pool per decode.
    bash tools/build_llama_lib.sh noopenmp                    (into .llama-noopenmp/lib)
    git worktree add /tmp/before <a commit before the pools>  (e.g. ac06d11)
    python3 bench/bench_threadpool.py --before /tmp/before [--rounds 4] [--draft]
Three servers on the starter model, all on that build: KoboldLite with its pools at --cpuwait spin and at short
(each with its poll level: engine/threadpool.py's POLL), and the checkout --before (no pools: ggml starts and
joins the workers of every decode). Rows and conditions as bench_neighbours.py's (single stream, 4 clients, a
2,000-token prompt; quiet, 1 and 2 busy loops), rounds alternated, each server's speed over the --before one's in
the same round (median, and the lowest and highest). First the CPU each used over 20 s idle right after a short
reply; last, the CPU a pool polling at each level (ggml's default 50 too) costs after a reply, llama.cpp alone.
Writes bench/results/threadpool.md. --draft: every server drafts with a draft model (the starter model drafting for
itself, 4 tokens every step: `draft_min`, since whether drafting pays is decided on the step costs each process
measures at start-up, and this draft does not), the single stream only, to bench/results/threadpool-draft.md:
with a --before from before the draft model shared the pools (57bbbf2), its decodes on them against ggml's pool
per decode.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from koboldlite.engine.cpu_policy import WaitPolicy  # noqa: E402
from koboldlite.engine.threadpool import POLL  # noqa: E402
from koboldlite.model_files import find_starter_model  # noqa: E402
import results_file  # noqa: E402
from bench_idle import cpu_seconds  # noqa: E402
from bench_neighbours import CTX, ROWS, Neighbours, Server, measure  # noqa: E402
from tests.harness import ServerProcess  # noqa: E402

NO_OPENMP_BUILD = os.path.join(ROOT, ".llama-noopenmp", "lib")
CONDITIONS = ("quiet", "1 busy loop", "2 busy loops")
IDLE_SECONDS = 20


def start(name: str, program: str, extra: list[str], draft: bool) -> Server:
    drafting = ["--draftmodel", find_starter_model(), "--draftamount", "4"] if draft else ["--nodraft"]
    common = ["--model", find_starter_model(), "--contextsize", str(CTX), "--parallel", "4", *drafting]
    proc = ServerProcess([*common, *extra], env={"LLAMA_CPP_LIB_PATH": NO_OPENMP_BUILD},
                         command=[sys.executable, program, "--port", "0"])
    return Server(name, proc, proc.port, False)


def idle_shares(servers: list[Server]) -> dict[str, float]:
    """The share of one core each server used over the same IDLE_SECONDS, right after a short reply of its own (the
    measurement is the waiting itself: the workers poll a while after the reply's last decode). Taken before the
    rounds, so that no earlier reply's work after it (the prompt cache's copy) falls in the window."""
    for server in servers:
        server.post({"prompt": "Hello there", "max_tokens": 8, "temperature": 0})
    a, t = [cpu_seconds(s.proc.proc.pid) for s in servers], time.monotonic()
    time.sleep(IDLE_SECONDS)
    b, took = [cpu_seconds(s.proc.proc.pid) for s in servers], time.monotonic() - t
    return {s.name: (after - before) / took for s, before, after in zip(servers, a, b)}


POLL_COST_CHILD = r"""
import os, sys, time
from koboldlite.engine.engine import Engine
from koboldlite.engine.llama_model import LlamaModel
from koboldlite.generation import GenerationRequest, SamplerSettings
from koboldlite.model_files import find_starter_model
model = LlamaModel(find_starter_model(), n_ctx=512, n_seq=1, n_threads=2, n_gpu_layers=0,
                   threadpool_poll=int(sys.argv[1]), threadpool_size=2)
engine = Engine(model)
for _ in range(3):
    job = engine.prepare(GenerationRequest("Once upon a time", max_length=8,
                                           sampler=SamplerSettings(temperature=0, ban_eos=True)))
    assert engine.admit(job)
    while not engine.step():
        pass
    a = sum(os.times()[:2])
    time.sleep(3)
    print(sum(os.times()[:2]) - a)
"""


def poll_cost(level: int) -> list[float]:
    """The CPU seconds a process whose context has a pool of 2 threads at this poll level uses in the 3 s after
    a reply's last decode (8 tokens), three times: the polling alone (llama.cpp directly, no server)."""
    out = subprocess.run([sys.executable, "-c", POLL_COST_CHILD, str(level)], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={**os.environ, "LLAMA_CPP_LIB_PATH": NO_OPENMP_BUILD})
    return [float(x) for x in out.stdout.split()]


def ratio_table(ours: list[Server], rows: tuple[str, ...], ratios: dict) -> list[str]:
    lines = ["| server | row | " + " | ".join(CONDITIONS) + " |", "|---|---|" + "---:|" * len(CONDITIONS)]
    for s in ours:
        for r in rows:
            cells = [ratios[(s.name, c, r)] for c in CONDITIONS]
            lines.append(f"| {s.name} | {r} | " + " | ".join(
                f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" for v in cells) + " |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="a checkout of KoboldLite before its threadpools")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--draft", action="store_true", help="servers with a draft model, the single stream only")
    args = p.parse_args()
    rows = ROWS[:1] if args.draft else ROWS
    before_commit = subprocess.run(["git", "-C", args.before, "rev-parse", "--short", "HEAD"], capture_output=True,
                                   text=True).stdout.strip() or args.before
    ours = [start(f"pools, --cpuwait {policy.value} (poll {POLL[policy]})", os.path.join(ROOT, "koboldlite.py"),
                  ["--cpuwait", policy.value], args.draft) for policy in (WaitPolicy.SPIN, WaitPolicy.SHORT)]
    before = start(f"before ({before_commit}): ggml's pool per decode", os.path.join(args.before, "koboldlite.py"),
                   [], args.draft)
    servers = [*ours, before]
    ratios = {(s.name, c, r): [] for s in ours for c in CONDITIONS for r in rows}
    cpu_ratios = {key: [] for key in ratios}
    try:
        idle = idle_shares(servers)
        for rnd in range(args.rounds):
            for condition in CONDITIONS:
                neighbours = Neighbours(condition)
                got, cpu = {}, {}
                for s in (servers if rnd % 2 == 0 else servers[::-1]):
                    for r in rows:
                        used, started = cpu_seconds(s.proc.proc.pid), time.perf_counter()
                        got[(s.name, r)] = measure(s, r, {}, [], {"draft_min": 4} if args.draft else None)
                        # the process's CPU seconds per token (per prompt token in the prompt row)
                        cpu[(s.name, r)] = (cpu_seconds(s.proc.proc.pid) - used) / (
                            got[(s.name, r)] * (time.perf_counter() - started))
                neighbours.end()
                for s in ours:
                    for r in rows:
                        ratios[(s.name, condition, r)].append(got[(s.name, r)] / got[(before.name, r)])
                        cpu_ratios[(s.name, condition, r)].append(cpu[(s.name, r)] / cpu[(before.name, r)])
                print(rnd, condition, {k: round(v, 1) for k, v in got.items()}, flush=True)
    finally:
        for s in servers:
            s.proc.stop()
    drafted = " --draft" if args.draft else ""
    lines = [f"# KoboldLite's threadpools in a build without OpenMP{', a draft model' if args.draft else ''}: "
             f"{time.strftime('%Y-%m-%d %H:%M')}, {len(os.sched_getaffinity(0))} cores, {args.rounds} rounds, "
             f"`python3 bench/bench_threadpool.py --before <checkout> --rounds {args.rounds}{drafted}`", "",
             f"Speed over that of KoboldLite before ({before_commit}) in the same round, on the same build without "
             f"OpenMP: the median of the rounds, in brackets the lowest and highest.", "",
             *ratio_table(ours, rows, ratios), "",
             "The server process's CPU seconds per token over the --before one's, in the same round (a token of the "
             "prompt in the prompt row):", "", *ratio_table(ours, rows, cpu_ratios)]
    lines += ["", f"| server | CPU over {IDLE_SECONDS} s idle right after a short reply, all in the same window "
                  f"(share of one core) |", "|---|---:|"]
    lines += [f"| {name} | {100 * share:.2f}% |" for name, share in idle.items()]
    if args.draft:
        results_file.publish("threadpool-draft.md", lines)
        return
    levels = sorted({50, *POLL.values()}, reverse=True)
    lines += ["", "| poll level | CPU seconds in the 3 s after a reply's last decode, pool of 2 threads, 3 replies |",
              "|---|---|"]
    lines += [f"| {level}{' (ggml default)' if level == 50 else ''} | "
              f"{', '.join(f'{x:.2f}' for x in poll_cost(level))} |" for level in levels]
    results_file.publish("threadpool.md", lines)


if __name__ == "__main__":
    main()
