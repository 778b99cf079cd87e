#!/usr/bin/env python3
"""Idle cost (issue 36, item 2): the CPU a server burns while nobody asks it anything.

    python3 bench/bench_idle.py [--seconds 60] [--llama-server PATH]

For each server: CPU seconds (user + system, from /proc/PID/stat) over `--seconds` of idleness right after
start-up, and again after one reply (once the reply's follow-up work, the prompt cache's copy and the next-turn
read-ahead, had its chance), as a share of one core; and the threads alive then. KoboldLite runs as the tests run
it (KOBOLDLITE_SCRIPT, else koboldlite.py); llama-server, when given, from the same starter model. Target: under
0.5% of one core.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from koboldlite.model_files import find_starter_model  # noqa: E402
from tests.harness import ServerProcess, WatchedProcess  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS        # utime, stime


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def idle_share(pid: int, seconds: float) -> tuple[float, int]:
    """CPU used over `seconds` of doing nothing, as a share of one core; the threads alive at the end."""
    before, started = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)                 # the measurement is the waiting: nothing is waited for
    return (cpu_seconds(pid) - before) / (time.monotonic() - started), threads(pid)


def ask(server) -> None:
    server.json("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hello."}],
                                                 "max_tokens": 16, "temperature": 0})


def measure(name: str, server, pid: int, seconds: float) -> list[str]:
    start_share, start_threads = idle_share(pid, seconds)
    ask(server)
    reply_share, reply_threads = idle_share(pid, seconds)
    return [f"| {name} | {100 * start_share:.2f}% ({start_threads} threads) | "
            f"{100 * reply_share:.2f}% ({reply_threads} threads) |"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--llama-server", help="llama-server to measure beside KoboldLite")
    args = p.parse_args()
    model = find_starter_model()
    rows = ["| server | idle after start-up | idle after one reply |", "|---|---:|---:|"]
    kobold = ServerProcess(["--model", model, "--contextsize", "2048"])
    try:
        rows += measure("koboldlite", kobold, kobold.proc.pid, args.seconds)
    finally:
        kobold.stop()
    if args.llama_server:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        peer = WatchedProcess([args.llama_server, "-m", model, "--port", str(port), "-c", "2048"])
        try:
            peer.wait_for_line(r"server is listening|HTTP server listening|listening on http", 120)

            class Peer:
                def json(self, method, path, body):
                    import json
                    import urllib.request
                    data = json.dumps(body).encode()
                    with urllib.request.urlopen(urllib.request.Request(
                            f"http://127.0.0.1:{port}{path}", data, {"Content-Type": "application/json"})) as r:
                        return json.load(r)
            rows += measure("llama-server", Peer(), peer.proc.pid, args.seconds)
        finally:
            peer.proc.terminate()
            peer.proc.wait(30)
    print(f"CPU used while idle over {args.seconds:g} s, as a share of one core "
          f"({os.cpu_count()} cores here; {subprocess.run(['uname', '-m'], capture_output=True, text=True).stdout.strip()})")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
