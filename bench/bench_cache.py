#!/usr/bin/env python3
"""Conversations that survive (issue 27): time to first token of a returning 3000-token conversation, after it
was displaced from the only slot by five others and after a restart of the server, against reading it cold;
KoboldLite (--cachedir) beside llama-server (--cache-ram for displacement, /slots save and restore around the
restart, the client's own work there, counted in its time).

    python3 bench/bench_cache.py --llama-server bench/.llama-server/bin/llama-server [--rounds 3]

Every round uses a conversation of its own (its notes differ), so nothing is found from an earlier round.
One slot, a 4096-token context, CPU, greedy, 4 tokens asked; KoboldLite also with
--noflashattention. As a chat client does, the next turn sends the reply back as it came, and the user takes
--pause seconds (reading, typing) after every reply. Writes bench/results/cache.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from koboldlite.model_files import find_starter_model  # noqa: E402
import results_file  # noqa: E402
from bench_parallel import PeerServer  # noqa: E402
from tests.harness import ServerProcess  # noqa: E402

WORDS = ("lantern harbour meadow cipher ember willow falcon copper orchard beacon thistle glacier saddle quarry "
         "river stone").split()


def notes(n: int, tag: str) -> str:
    rng = random.Random(tag)
    return f"Notes {tag}: " + " ".join(rng.choice(WORDS) for _ in range(n))


def conversation(tag: str, reply: str | None = None) -> list[dict]:
    """The first turn, or with the first turn's reply the second."""
    messages = [{"role": "system", "content": "You answer briefly.\n" + notes(2900, tag)},
                {"role": "user", "content": "Which word comes first in the notes?"}]
    if reply is not None:
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And the last one?"}]
    return messages


PAUSE = 1.0      # seconds the user takes after a reply (main sets it)


def first_token(server, messages) -> tuple[float, str]:
    """Seconds from sending a streamed chat request to its first text chunk (or to its end, should the model stop
    at once), and the reply's text; then the user's pause."""
    conn = server.connection()
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps({"messages": messages, "max_tokens": 4,
                                                              "temperature": 0, "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    elapsed, text = None, ""
    for line in resp:
        if line.startswith(b"data: {"):
            choice = (json.loads(line[6:]).get("choices") or [{}])[0]
            piece = (choice.get("delta") or {}).get("content") or ""
            text += piece
            if elapsed is None and (piece or choice.get("finish_reason")):
                elapsed = time.perf_counter() - t0
    conn.close()
    assert elapsed is not None, "no text came"
    time.sleep(PAUSE)               # the user reading and typing: a workload's think time, not a wait on the server
    return elapsed, text


def post(server, path, body) -> dict:
    conn = server.connection()
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    data = json.loads(conn.getresponse().read())
    conn.close()
    return data


def displace(server, tag):
    for i in range(5):
        first_token(server, [{"role": "user", "content": notes(400, f"{tag} other {i}")}])


class KoboldLite:
    def __init__(self, folder: str, threads: int, extra: tuple[str, ...] = ()):
        self.name = " ".join(("KoboldLite",) + extra)
        self.args = ["--contextsize", "4096", "--threads", str(threads), "--cachedir", folder, "--quiet", *extra]
        self.server = ServerProcess(self.args)

    def restart(self):
        self.server.stop()
        self.server = ServerProcess(self.args)

    def after_restart(self, tag, reply) -> float:
        self.restart()
        return first_token(self.server, conversation(tag, reply))[0]

    def stop(self):
        self.server.stop()


class LlamaServer:
    name = "llama-server"

    def __init__(self, binary: str, folder: str, threads: int):
        model = find_starter_model()
        os.environ["GGML_VK_VISIBLE_DEVICES"] = ""
        self.command = lambda port: [binary, "-m", model, "-c", "4096", "-np", "1", "-ngl", "0", "-t", str(threads),
                                     "-tb", str(threads), "--cache-ram", "1024", "--slot-save-path", folder,
                                     "--host", "127.0.0.1", "--port", str(port)]
        self.server = self._start()

    def _start(self):
        return PeerServer(self.command, ("listening on", "server is listening", "main: model loaded"), "llama-server")

    def after_restart(self, tag, reply) -> float:
        """The client saves the slot before the restart and restores it after: that restore is in the time."""
        post(self.server, "/slots/0?action=save", {"filename": f"{tag}.bin"})
        self.server.stop()
        self.server = self._start()
        t0 = time.perf_counter()
        post(self.server, "/slots/0?action=restore", {"filename": f"{tag}.bin"})
        return time.perf_counter() - t0 + first_token(self.server, conversation(tag, reply))[0]

    def stop(self):
        self.server.stop()


def main():
    global PAUSE
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--llama-server", default=os.path.join(HERE, ".llama-server", "bin", "llama-server"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--pause", type=float, default=PAUSE, help="the user's seconds between a reply and the next turn")
    args = ap.parse_args()
    PAUSE = args.pause
    work = tempfile.mkdtemp(prefix="bench-cache-")
    # Also without flash attention, which on this CPU reads a few tokens over a long context faster (bench_flash.py)
    systems = [KoboldLite(os.path.join(work, "kl"), args.threads),
               KoboldLite(os.path.join(work, "kl-nofa"), args.threads, ("--noflashattention",))]
    if os.path.exists(args.llama_server):
        os.makedirs(os.path.join(work, "ls"))
        systems.append(LlamaServer(args.llama_server, os.path.join(work, "ls"), args.threads))
    times = {(s.name, kind): [] for s in systems for kind in ("cold", "after displacement", "after restart")}
    try:
        for r in range(args.rounds):
            for system in (systems if r % 2 == 0 else list(reversed(systems))):
                server = system.server
                tag = f"{system.name} round {r}"
                seconds, reply = first_token(server, conversation(tag))
                times[(system.name, "cold")].append(seconds)
                displace(server, tag)
                times[(system.name, "after displacement")].append(first_token(server, conversation(tag, reply))[0])
                times[(system.name, "after restart")].append(system.after_restart(tag, reply))
                print(f"round {r + 1} {system.name}: " + ", ".join(
                    f"{k} {times[(system.name, k)][-1]:.3f}s" for k in ("cold", "after displacement", "after restart")),
                      flush=True)
    finally:
        for system in systems:
            system.stop()
        shutil.rmtree(work, ignore_errors=True)

    names = [s.name for s in systems]
    lines = ["# A returning 3000-token conversation: time to first token", "",
             f"`python3 bench/bench_cache.py --rounds {args.rounds} --pause {args.pause}`, {args.threads} threads, "
             "SmolLM2-135M, one slot, 4096-token context; the next turn sends the reply back. Medians of the "
             "rounds; the share is of the same system's cold read.", "",
             "| case | " + " | ".join(f"{n} | share" for n in names) + " |",
             "|---|" + "---|---|" * len(names)]
    for kind in ("cold", "after displacement", "after restart"):
        cells = []
        for n in names:
            med = statistics.median(times[(n, kind)])
            share = statistics.median(a / b for a, b in zip(times[(n, kind)], times[(n, "cold")]))
            cells += [f"{med:.3f} s", f"{share:.0%}"]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    results_file.publish("cache.md", lines)


if __name__ == "__main__":
    main()
