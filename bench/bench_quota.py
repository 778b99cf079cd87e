#!/usr/bin/env python3
"""A container's CPU quota (issue 36): KoboldLite inside a cgroup that may use fewer CPUs than the machine has.

    sudo python3 bench/bench_quota.py [--cpus 1] [--rounds 6] [--before CHECKOUT]

Makes a cgroup (v1's cpu hierarchy at /sys/fs/cgroup/cpu, or v2's at /sys/fs/cgroup with its cpu controller)
with a quota of --cpus CPUs, starts each server inside it (as `docker run --cpus` would), and measures them in
turn, the other way round every other round: a single stream (100 tokens) and 4 clients (64 tokens each), as
bench_neighbours.py does. Servers: KoboldLite as it is (its thread count reads the quota), and either that
checkout's KoboldLite (--before: a worktree of an older commit) or this one at `--threads` of every core (what a
count that ignores the quota runs). The servers take turns, so each has the quota to itself while measured.
Writes bench/results/quota.md. Needs root (or a delegated cgroup) to make the cgroup; removes it after.
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
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import results_file  # noqa: E402
from bench_neighbours import Server, measure  # noqa: E402
from koboldlite.model_files import find_starter_model  # noqa: E402
from tests.harness import PIP_LLAMA_LIB, ServerProcess, program_command  # noqa: E402

ROWS = ("single stream tok/s", "4 clients tok/s")
V1 = "/sys/fs/cgroup/cpu"
V2 = "/sys/fs/cgroup"


def make_cgroup(cpus: float) -> str:
    """A cgroup of `cpus` CPUs' quota: its folder."""
    if os.path.exists(f"{V1}/cpu.cfs_quota_us"):
        folder = f"{V1}/koboldlite-bench-{os.getpid()}"
        os.mkdir(folder)
        with open(f"{folder}/cpu.cfs_period_us") as f:
            period = int(f.read())
        with open(f"{folder}/cpu.cfs_quota_us", "w") as f:
            f.write(str(int(cpus * period)))
        return folder
    folder = f"{V2}/koboldlite-bench-{os.getpid()}"
    with open(f"{V2}/cgroup.subtree_control", "w") as f:
        f.write("+cpu")
    os.mkdir(folder)
    with open(f"{folder}/cpu.max", "w") as f:
        f.write(f"{int(cpus * 100000)} 100000")
    return folder


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpus", type=float, default=1.0, help="the cgroup's quota in CPUs (default 1)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--before", metavar="CHECKOUT", help="another checkout of KoboldLite to measure beside this one")
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0))
    folder = make_cgroup(args.cpus)
    enter = f'echo $$ > {folder}/cgroup.procs && exec "$@"'
    common = ["--model", find_starter_model(), "--contextsize", "10240", "--parallel", "4", "--nodraft"]
    if args.before:
        commit = subprocess.run(["git", "-C", args.before, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or args.before
        other = (f"KoboldLite at {commit}", [sys.executable, os.path.join(args.before, "koboldlite.py")], [])
    else:
        other = (f"KoboldLite --threads {cores}", program_command(), ["--threads", str(cores)])
    servers: list[Server] = []
    counts = {}
    try:
        for name, program, extra in (("KoboldLite", program_command(), []), other):
            proc = ServerProcess([*common, *extra], env={"LLAMA_CPP_LIB_PATH": PIP_LLAMA_LIB},
                                 command=["sh", "-c", enter, "sh", *program, "--port", "0"])
            servers.append(Server(name, proc, proc.port, False))
            counts[name] = json.loads(proc.request("GET", "/props")[2])["threads"]["generation"]["most"]
        speed = {(s.name, row): [] for s in servers for row in ROWS}
        for n in range(args.rounds):
            for s in servers if n % 2 == 0 else servers[::-1]:
                for row in ROWS:
                    speed[(s.name, row)].append(measure(s, row, {}, []))
            print(f"round {n + 1}/{args.rounds}: " + "; ".join(
                f"{s.name} " + " / ".join(f"{speed[(s.name, row)][-1]:.1f}" for row in ROWS) for s in servers),
                file=sys.stderr, flush=True)
    finally:
        for s in servers:
            s.proc.stop()
        os.rmdir(folder)
    new, old = servers[0].name, servers[1].name
    when = time.strftime("%Y-%m-%d %H:%M")
    command = f"python3 bench/bench_quota.py --cpus {args.cpus:g} --rounds {args.rounds}" + \
        (" --before <checkout>" if args.before else "")
    lines = [f"# In a cgroup of {args.cpus:g} CPUs' quota (issue 36): {cores} cores, {when}, {args.rounds} rounds "
             f"(median), `{command}`", "",
             "| server | most threads (/props) | " + " | ".join(ROWS) + " |", "|---|---:|" + "---:|" * len(ROWS)]
    for s in servers:
        lines.append(f"| {s.name} | {counts[s.name]} | " + " | ".join(
            f"{statistics.median(speed[(s.name, row)]):.1f}" for row in ROWS) + " |")
    ratios = []
    for row in ROWS:
        r = sorted(a / b for a, b in zip(speed[(new, row)], speed[(old, row)]))
        ratios.append(f"{row} {statistics.median(r):.2f} ({r[0]:.2f}-{r[-1]:.2f})")
    lines += ["", f"{new} / {old}, paired by round (median, lowest-highest): " + ", ".join(ratios)]
    results_file.publish("quota.md", lines)


if __name__ == "__main__":
    main()
