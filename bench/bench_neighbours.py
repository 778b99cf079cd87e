#!/usr/bin/env python3
"""A good neighbour on a busy PC (issue 36): each server's speed quiet and beside busy programs, side by side.

    BUILD_SERVER=1 KOBOLDLITE_CPU_VARIANTS=haswell bash tools/build_llama_lib.sh cpu bench/.llama-server/cpu
    python3 bench/bench_neighbours.py [--rounds 3] [--llama-server PATH] [--idle 30]

(On a CPU with AVX-512, a build of every variant is the fair peer: BUILD_SERVER=1 bash tools/build_llama_lib.sh
vulkan bench/.llama-server/vulkan, then --llama-server bench/.llama-server/vulkan/llama-server.)

Servers, all on the starter model, started once and measured in turn (the other way round every other round),
rounds interleaved:
- KoboldLite as shipped (adaptive thread count) on pip's llama.cpp build, and on the Vulkan build that
  tests/install.sh leaves beside the script (its CPU backend: no --gpulayers), where that build exists;
- KoboldLite as it was before (`--cpuwait spin --threads <cores>`: every core always), on pip's build, quiet
  only (beside busy loops it takes minutes a row): the quiet speed the new one must keep;
- llama.cpp's llama-server (its defaults, -np 4), built from the same llama.cpp source, when found.
With --before CHECKOUT, that checkout's KoboldLite too, on pip's build in every condition, and a table of the
ratios between the two (an A/B of a change; writes bench/results/neighbours-ab.md instead).
Conditions: quiet; one busy loop (a Python process spinning, one per core it wants); two; one at nice 10.
Rows, each condition: single stream (100 tokens streamed as server-sent events, greedy, end of text banned: tokens
/ request time); 4 clients at once (64 tokens each, streamed too: all tokens / the time the last ends); prompt
reading (a fresh 2,000-token prompt, no cache: prompt tokens / request time with one token asked). For KoboldLite's
two streamed rows, the share of their time outside llama.cpp (its /api/extra/perf's decode_seconds); for its
prompt row, the chunks it read one thread past the cores (/api/extra/perf's threads.batch). The busy
loops' own rate during each row, as a share of their rate beside idle servers: what the neighbour keeps while that
server generates or reads. At the end, each server's CPU use over --idle seconds of idleness after all that.
Writes bench/results/neighbours.md (neighbours-some.md for --conditions or --rows: a few rows, more rounds).
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from koboldlite.model_files import find_starter_model  # noqa: E402
import results_file  # noqa: E402
from bench_idle import cpu_seconds  # noqa: E402
from bench_media import DEFAULT_SERVER, LlamaServer  # noqa: E402
from tests.harness import PIP_LLAMA_LIB, ServerProcess  # noqa: E402

VULKAN_BUILD = os.path.join(ROOT, ".llama-vulkan", "lib")
CONDITIONS = ("quiet", "1 busy loop", "2 busy loops", "1 busy loop at nice 10")
ROWS = ("single stream tok/s", "4 clients tok/s", "prompt reading tok/s")
STREAMED = ROWS[:2]                 # the rows whose tokens come as server-sent events
PAST_CORES = "prompt reading: chunks read past the cores"     # a 2,000-token prompt is 4 chunks of 512
CTX = 10240                         # 4 slots of 2,560: a 2,000-token prompt fits one


def busy_loop(counter, stop, nice: int):
    """A neighbour that wants a whole core; counts its rounds."""
    if nice:
        os.nice(nice)
    while not stop.is_set():
        for _ in range(20_000):
            pass
        with counter.get_lock():
            counter.value += 1


class Neighbours:
    """The busy loops of one condition, and their rate."""

    def __init__(self, condition: str):
        count = 0 if condition == "quiet" else 2 if condition.startswith("2") else 1
        nice = 10 if "nice" in condition else 0
        self.counter, self.stop = multiprocessing.Value("q", 0), multiprocessing.Event()
        self.loops = [multiprocessing.Process(target=busy_loop, args=(self.counter, self.stop, nice))
                      for _ in range(count)]
        for loop in self.loops:
            loop.start()

    def reading(self) -> tuple[float, int]:
        return time.monotonic(), self.counter.value

    @staticmethod
    def rate(a: tuple[float, int], b: tuple[float, int]) -> float:
        return (b[1] - a[1]) / (b[0] - a[0])

    def end(self):
        self.stop.set()
        for loop in self.loops:
            loop.join()


class Server:
    """One system under test: how to ask it, and its process."""

    def __init__(self, name: str, proc, port: int, llama: bool, quiet_only: bool = False):
        self.name, self.proc, self.port, self.llama, self.quiet_only = name, proc, port, llama, quiet_only

    def _send(self, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """POST /v1/completions, in llama-server's words where it needs its own (no prompt cache, end of text
        ignored rather than banned): the connection, for the caller to close once it has read the reply."""
        if self.llama:
            body = {**{k: v for k, v in body.items() if k != "ban_eos_token"}, "cache_prompt": False,
                    "ignore_eos": body.get("ban_eos_token", False)}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1800)
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        return conn, conn.getresponse()

    def post(self, body: dict) -> dict:
        conn, resp = self._send(body)
        data = resp.read()
        conn.close()
        assert resp.status == 200, data[:300]
        return json.loads(data)

    def stream(self, body: dict) -> int:
        """A streamed completion (server-sent events, as chat clients ask), read to its end: the tokens it made,
        from the usage its last chunk carries (llama-server's always, KoboldLite's when asked for)."""
        conn, resp = self._send({**body, "stream": True, "stream_options": {"include_usage": True}})
        assert resp.status == 200, resp.read()[:300]
        tokens = None
        for line in iter(resp.readline, b""):
            if line.startswith(b"data: {"):
                usage = json.loads(line[6:]).get("usage")
                tokens = usage["completion_tokens"] if usage else tokens
        conn.close()
        assert tokens is not None, "the stream ended without its usage"
        return tokens


def start_servers(args) -> list[Server]:
    model = find_starter_model()
    common = ["--model", model, "--contextsize", str(CTX), "--parallel", "4", "--nodraft"]
    servers = []

    def kobold(name, lib, extra, quiet_only=False, script=None):
        command = None if script is None else [sys.executable, script, "--port", "0"]
        s = ServerProcess([*common, *extra], env={"LLAMA_CPP_LIB_PATH": lib}, command=command)
        servers.append(Server(name, s, s.port, False, quiet_only))
        return s

    kobold("KoboldLite", PIP_LLAMA_LIB, [])
    if args.before:
        commit = subprocess.run(["git", "-C", args.before, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or args.before
        kobold(f"KoboldLite at {commit}", PIP_LLAMA_LIB, [], script=os.path.join(args.before, "koboldlite.py"))
    if os.path.isdir(VULKAN_BUILD) and not args.no_vulkan:
        kobold("KoboldLite, Vulkan build's CPU path", VULKAN_BUILD, ["--gpulayers", "0"])
    kobold("KoboldLite before (all cores always)", PIP_LLAMA_LIB,
           ["--cpuwait", "spin", "--threads", str(len(os.sched_getaffinity(0)))], quiet_only=True)
    if args.llama_server and os.access(args.llama_server, os.X_OK):
        # llama.cpp's extra weight buffers as KoboldLite runs them: off where its AMX kernels would crash
        # (README, Every CPU), and the comparison is of the same matrix code.
        cpu = json.loads(servers[0].proc.request("GET", "/props")[2])["cpu_backend"]
        same = [] if cpu.get("extra_buffers", "on") == "on" else ["--no-repack"]
        peer = LlamaServer(args.llama_server, ["-m", model, "-c", str(CTX), "-np", "4", "--no-warmup", *same])
        servers.append(Server("llama-server", peer, peer.port, True))
    return servers


def prompt_of(tokens: int) -> str:
    """About `tokens` tokens of text that no cache has seen (a random start)."""
    words = " ".join(f"item{random.randrange(10**6)} is on the list," for _ in range(tokens // 12))
    return f"Inventory {random.randrange(10**9)}: {words} and that is all."


def thread_report(server: Server) -> dict:
    """KoboldLite's thread governor as /api/extra/perf reports it: time inside llama_decode so far, and the
    generation count's state (now, sheds, returns, probes)."""
    return json.loads(server.proc.request("GET", "/api/extra/perf")[2])["threads"]


def measure(server: Server, row: str, outside: dict[str, list[float]], counts: list[str],
            extra: dict | None = None) -> float:
    """The row's speed. For KoboldLite's streamed rows, the share of the row's time spent outside llama.cpp too
    (`outside[row]`: the HTTP threads, the token buffer, the stream writers, all the Python), and after a single
    stream its generation thread count with the sheds, returns and probes during it (`counts`); for its prompt
    row, the chunks it read one thread past the cores (`outside[PAST_CORES]`, where it reports them). `extra`:
    fields added to the streamed rows' requests."""
    if row not in STREAMED:
        before = None if server.llama else thread_report(server)["batch"].get("chunks_past_cores")
        started = time.perf_counter()
        out = server.post({"prompt": prompt_of(2000), "max_tokens": 1, "temperature": 0})
        took = time.perf_counter() - started
        if before is not None:
            outside.setdefault(PAST_CORES, []).append(thread_report(server)["batch"]["chunks_past_cores"] - before)
        return out["usage"]["prompt_tokens"] / took
    before = None if server.llama else thread_report(server)
    started = time.perf_counter()
    if row.startswith("single"):
        tokens = server.stream({"prompt": "Once upon a time", "max_tokens": 100, "temperature": 0,
                                "ban_eos_token": True, **(extra or {})})
    else:
        totals = []

        def one(i):
            totals.append(server.stream({"prompt": f"Story {i}: once upon a time", "max_tokens": 64,
                                         "temperature": 0, "ban_eos_token": True, **(extra or {})}))
        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        tokens = sum(totals)
    took = time.perf_counter() - started
    if before is not None:
        after = thread_report(server)
        outside.setdefault(row, []).append(1 - (after["decode_seconds"] - before["decode_seconds"]) / took)
        if row.startswith("single"):
            a, b = after["generation"], before["generation"]
            counts.append(f"{a['now']} threads (+{a['sheds'] - b['sheds']} sheds, +{a['returns'] - b['returns']} "
                          f"returns, +{a['probes'] - b['probes']} probes)")
    return tokens / took


def steal_seconds() -> float:
    """CPU time the hypervisor gave other guests while this machine's were ready to run (/proc/stat's steal
    column; 0 where there is none): a shared host's noise, printed with each condition."""
    try:
        with open("/proc/stat") as f:
            return int(f.readline().split()[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def run_rounds(servers: list[Server], rounds: int):
    speed = {(s.name, c, r): [] for s in servers for c in CONDITIONS for r in ROWS}
    kept = {(s.name, c, r): [] for s in servers for c in CONDITIONS[1:] for r in ROWS}
    outside = {(s.name, c): {} for s in servers for c in CONDITIONS}
    counts: dict[str, list[str]] = {}     # KoboldLite's generation thread count after each single stream
    for n in range(rounds):
        for condition in CONDITIONS:
            stolen = steal_seconds()
            neighbours = Neighbours(condition)
            try:
                if neighbours.loops:
                    a = neighbours.reading()
                    time.sleep(1.5)             # the loops' rate beside idle servers: the measurement is the wait
                    alone = Neighbours.rate(a, neighbours.reading())
                # Each round the other way round: no server always meets the loops first (or their 1.5 s' head start).
                for server in servers if n % 2 == 0 else servers[::-1]:
                    if server.quiet_only and neighbours.loops:
                        continue
                    for row in ROWS:
                        a = neighbours.reading()
                        speed[(server.name, condition, row)].append(
                            measure(server, row, outside[(server.name, condition)], counts.setdefault(server.name, [])))
                        if neighbours.loops:
                            kept[(server.name, condition, row)].append(Neighbours.rate(a, neighbours.reading()) / alone)
            finally:
                neighbours.end()
            figures = "; ".join(f"{s.name} " + " / ".join(f"{speed[(s.name, condition, row)][-1]:.1f}" for row in ROWS)
                                + (f" [single stream at {counts[s.name][-1]}]" if counts.get(s.name) else "")
                                for s in servers if speed[(s.name, condition, ROWS[0])][n:])
            names = " / ".join(row.removesuffix(" tok/s") for row in ROWS)
            print(f"round {n + 1}/{rounds}: {condition} done ({names} tok/s: {figures}; "
                  f"steal {steal_seconds() - stolen:.2f} s)", file=sys.stderr, flush=True)
    return speed, kept, outside


def paired(a: list[float], b: list[float]) -> float:
    """The median of a round's figure over the same round's other figure: measured minutes apart, not a run apart,
    so the machine's drift between rounds (15% and more on a shared machine) stays out of the ratio."""
    return statistics.median(x / y for x, y in zip(a, b))


def paired_spread(a: list[float], b: list[float]) -> str:
    """paired(), with the lowest and highest round's ratio: whether one server is ahead of the other, or the two
    are even within the rounds' spread, shows in the table itself."""
    ratios = [x / y for x, y in zip(a, b)]
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def table(servers, speed, kept, outside, idle) -> list[str]:
    med = {k: statistics.median(v) for k, v in speed.items() if v}
    lines = [f"| server | row | {' | '.join(CONDITIONS)} |", "|---|---|" + "---:|" * len(CONDITIONS)]
    for s in servers:
        for row in ROWS:
            quiet = speed[(s.name, "quiet", row)]
            cells = [f"{med[(s.name, 'quiet', row)]:.1f}"] + [
                f"{med[(s.name, c, row)]:.1f} ({paired(speed[(s.name, c, row)], quiet):.2f})"
                if (s.name, c, row) in med else "-" for c in CONDITIONS[1:]]
            lines.append(f"| {s.name} | {row} | {' | '.join(cells)} |")
        if s.quiet_only:
            continue
        if len(CONDITIONS) > 1:
            for row in ROWS:
                lines.append(f"| {s.name} | busy loops' rate kept, {row.removesuffix(' tok/s')} | - | " + " | ".join(
                    f"{statistics.median(kept[(s.name, c, row)]):.2f}" for c in CONDITIONS[1:]) + " |")
        for row in () if s.llama else [r for r in STREAMED if r in ROWS]:
            lines.append(f"| {s.name} | {row.removesuffix(' tok/s')}: share of time outside llama.cpp | " + " | ".join(
                f"{statistics.median(outside[(s.name, c)][row]):.3f}" for c in CONDITIONS) + " |")
        if all(PAST_CORES in outside[(s.name, c)] for c in CONDITIONS):
            chunks = [outside[(s.name, c)][PAST_CORES] for c in CONDITIONS]
            lines.append(f"| {s.name} | {PAST_CORES}, per prompt (most) | " + " | ".join(
                f"{statistics.median(n):g} ({max(n)})" for n in chunks) + " |")
    lines += ["", "Ratios to llama-server (KoboldLite / llama-server, same row and condition; the median of the "
              "rounds' ratios, in brackets the lowest and highest):", ""]
    peer = next((s for s in servers if s.llama), None)
    if peer:
        lines += [f"| server | row | {' | '.join(CONDITIONS)} |", "|---|---|" + "---:|" * len(CONDITIONS)]
        for s in servers:
            if s is peer or s.quiet_only:
                continue
            for row in ROWS:
                lines.append(f"| {s.name} | {row} | " + " | ".join(
                    paired_spread(speed[(s.name, c, row)], speed[(peer.name, c, row)]) for c in CONDITIONS) + " |")
    ab = next((s for s in servers if s.name.startswith("KoboldLite at ")), None)
    if ab:
        lines += ["", f"A/B: KoboldLite / {ab.name} (the same rows and conditions, paired by round):", "",
                  f"| row | {' | '.join(CONDITIONS)} |", "|---|" + "---:|" * len(CONDITIONS)]
        for row in ROWS:
            lines.append(f"| {row} | " + " | ".join(
                paired_spread(speed[(servers[0].name, c, row)], speed[(ab.name, c, row)]) for c in CONDITIONS) + " |")
    new, old = servers[0].name, next(s.name for s in servers if s.quiet_only)
    lines += ["", f"Quiet, {new} / {old}: " + ", ".join(
        f"{row} {paired_spread(speed[(new, 'quiet', row)], speed[(old, 'quiet', row)])}" for row in ROWS)]
    lines += ["", "| server | CPU while idle (share of one core) |", "|---|---:|"]
    lines += [f"| {name} | {100 * share:.2f}% |" for name, share in idle.items()]
    return lines


def idle_shares(servers: list[Server], seconds: float) -> dict[str, float]:
    before = {s.name: cpu_seconds(s.proc.proc.pid) for s in servers}
    started = time.monotonic()
    time.sleep(seconds)                 # the measurement is the waiting: nothing is waited for
    took = time.monotonic() - started
    return {s.name: (cpu_seconds(s.proc.proc.pid) - before[s.name]) / took for s in servers}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--llama-server", default=DEFAULT_SERVER, metavar="PATH")
    p.add_argument("--idle", type=float, default=30.0, help="seconds of idleness measured at the end")
    p.add_argument("--no-vulkan", action="store_true", help="leave out the Vulkan build's CPU path")
    p.add_argument("--before", metavar="CHECKOUT", help="another checkout of KoboldLite (git worktree add --detach "
                   "/tmp/before <commit>), on pip's build, in every condition: an A/B of a change")
    p.add_argument("--quiet-only", action="store_true",
                   help="the quiet condition alone (more rounds in the time: the quiet target's check); "
                        "writes results/neighbours-quiet.md")
    p.add_argument("--conditions", metavar="A,B", help="only these loaded conditions, by name (quiet is always "
                   "measured: the shares are of it); with --rows, writes results/neighbours-some.md")
    p.add_argument("--rows", metavar="A,B", help="only these rows, by the start of their name (e.g. '4 clients,"
                   "prompt reading'): more rounds of the rows in question in the time")
    args = p.parse_args()
    global CONDITIONS, ROWS
    if args.quiet_only:
        CONDITIONS = CONDITIONS[:1]
    if args.conditions:
        wanted = [c.strip() for c in args.conditions.split(",")]
        unknown = [c for c in wanted if c not in CONDITIONS]
        if unknown:
            p.error(f"unknown condition {unknown[0]!r}: {', '.join(CONDITIONS)}")
        CONDITIONS = tuple(c for c in CONDITIONS if c == "quiet" or c in wanted)
    if args.rows:
        wanted = [r.strip() for r in args.rows.split(",")]
        unknown = [w for w in wanted if not any(r.startswith(w) for r in ROWS)]
        if unknown:
            p.error(f"unknown row {unknown[0]!r}: {', '.join(ROWS)}")
        ROWS = tuple(r for r in ROWS if any(r.startswith(w) for w in wanted))
    some = bool(args.conditions or args.rows)
    # No GPU driver answers, as on a PC without one: the Vulkan build runs on its CPU backend (lavapipe, where
    # installed for the tests, would otherwise take llama-server's layers).
    os.environ.update({"VK_ICD_FILENAMES": "/nonexistent.json", "VK_DRIVER_FILES": "/nonexistent.json"})
    servers = start_servers(args)
    try:
        speed, kept, outside = run_rounds(servers, args.rounds)
        idle = idle_shares(servers, args.idle)
    finally:
        for s in servers:
            s.proc.stop()
    flags = f"--rounds {args.rounds}" + (" --quiet-only" if args.quiet_only else "") + \
        (" --no-vulkan" if args.no_vulkan else "") + (" --before <checkout>" if args.before else "") + \
        (f" --conditions '{args.conditions}'" if args.conditions else "") + \
        (f" --rows '{args.rows}'" if args.rows else "")
    header = [f"# Beside busy programs (issue 36): {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}, "
              f"{args.rounds} rounds (median), `python3 bench/bench_neighbours.py {flags}`", "",
              "Speed (median of the rounds), and in brackets its share of the same server's quiet speed (the median of "
              "each round's share; ratios below are paired by round too):", ""]
    results_file.publish("neighbours-quiet.md" if args.quiet_only else "neighbours-ab.md" if args.before else
                         "neighbours-some.md" if some else "neighbours.md",
                         header + table(servers, speed, kept, outside, idle))


if __name__ == "__main__":
    main()
