#!/usr/bin/env python3
"""A long chat in a small context: what each turn costs before and after the client starts trimming.

    python3 bench/bench_longchat.py [--turns 30] [--ctx 1024] [--llama-server PATH]

A 30-turn chat, streamed through /v1/completions, in a 1024-token context, trimmed client-side as
SillyTavern trims it: the system text stays, the oldest turns go until the prompt and the reply fit.
Per turn it prints the time to first token and the prompt tokens evaluated (prompt less cached), for
KoboldLite and for KoboldLite --noshift, and, when a llama-server binary is given (or found by
bench/build_llama_server.sh at bench/.llama-server/bin/llama-server), for llama-server with and
without --cache-reuse 64. The systems take turns at every chat turn (interleaved), each with its own
chat history (its own replies), so that this machine's drift hits them all alike.
Target (issue 12): median time to first token after the first trim at most 1.3x the median before it.
Writes the table to bench/results/longchat.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from koboldlite.model_files import find_starter_model  # noqa: E402
from results_file import publish  # noqa: E402
from tests.harness import HTTPClient, ServerProcess, WatchedProcess  # noqa: E402

SYSTEM = ("You are Ava, a friendly guide who knows every corner of the old harbour town of Westmere. "
          "Answer in two or three sentences.\n")
QUESTIONS = ["Tell me about the {} of Westmere.", "Who looks after the {}?", "When is the {} busiest?",
             "What story do people tell about the {}?", "How do I get from the harbour to the {}?"]
PLACES = ["bakery", "lighthouse", "market", "chapel", "library", "smithy", "tavern", "bridge", "mill", "garden"]
REPLY_TOKENS = 40


class Peer(HTTPClient):
    """A server we did not start through ServerProcess (llama-server)."""

    def __init__(self, command: list[str], port: int):
        self.port = port
        self.process = WatchedProcess(command)
        self.process.wait_for_line(r"listening on|server is listening|HTTP server listening", 300)

    def stop(self):
        self.process.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Chat:
    """One client's chat: its history, trimmed to fit, and what each turn cost."""

    def __init__(self, name: str, server, tokenize):
        self.name, self.server, self.tokenize = name, server, tokenize
        self.turns: list[str] = []
        self.first_kept = 0
        self.rows: list[tuple[int, bool, float, int]] = []   # turn, trimmed, ttft, evaluated

    def prompt(self, ctx: int) -> tuple[str, bool]:
        """SillyTavern's trim: keep the system text, drop the oldest turns until prompt + reply fit."""
        trimmed = False
        while True:
            text = SYSTEM + "".join(self.turns[self.first_kept:])
            if len(self.tokenize(text)) + REPLY_TOKENS <= ctx or self.first_kept >= len(self.turns) - 1:
                return text, trimmed
            self.first_kept += 1
            trimmed = True

    def turn(self, i: int, ctx: int):
        question = QUESTIONS[i % len(QUESTIONS)].format(PLACES[i % len(PLACES)])
        self.turns.append(f"User: {question}\nAva:")
        text, trimmed = self.prompt(ctx)
        conn = self.server.connection(timeout=600)
        body = {"prompt": text, "max_tokens": REPLY_TOKENS, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "cache_prompt": True, "stop": ["\nUser:"]}
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        ttft, reply, usage = None, [], {}
        for line in resp:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                ttft = ttft or time.perf_counter() - t0
                reply.append(chunk["choices"][0]["text"])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("timings"):
                usage["timings"] = chunk["timings"]
        conn.close()
        self.turns[-1] += "".join(reply).rstrip() + "\n"
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        if cached is None and "timings" in usage:            # llama-server reports prompt_n: tokens evaluated
            evaluated = usage["timings"]["prompt_n"]
        else:
            evaluated = usage.get("prompt_tokens", 0) - (cached or 0)
        self.rows.append((i, self.first_kept > 0, ttft or float("nan"), evaluated))


def summarize(chat: Chat) -> tuple[float, float, float, float]:
    before = [r for r in chat.rows if not r[1]]
    after = [r for r in chat.rows if r[1]]
    med = lambda rows, k: statistics.median(r[k] for r in rows) if rows else float("nan")  # noqa: E731
    return med(before, 2), med(after, 2), med(before, 3), med(after, 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=find_starter_model())
    ap.add_argument("--turns", type=int, default=30)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--llama-server", default=os.path.join(HERE, ".llama-server", "bin", "llama-server"))
    args = ap.parse_args()

    servers = {
        "KoboldLite": ServerProcess(["--model", args.model, "--contextsize", str(args.ctx), "--quiet",
                                     "--threads", str(args.threads)]),
        "KoboldLite --noshift": ServerProcess(["--model", args.model, "--contextsize", str(args.ctx), "--quiet",
                                               "--noshift", "--threads", str(args.threads)]),
    }
    if os.access(args.llama_server, os.X_OK):
        for name, extra in (("llama-server --cache-reuse 64", ["--cache-reuse", "64"]), ("llama-server", [])):
            port = free_port()
            servers[name] = Peer([args.llama_server, "-m", args.model, "-c", str(args.ctx), "-np", "1",
                                  "-t", str(args.threads), "--port", str(port), "--host", "127.0.0.1", *extra],
                                 port)
    else:
        print(f"(no llama-server at {args.llama_server}: run bench/build_llama_server.sh to compare)")
    probe = servers["KoboldLite"]
    tokenize = lambda text: probe.json("POST", "/tokenize", {"content": text})["tokens"]  # noqa: E731
    chats = [Chat(name, server, tokenize) for name, server in servers.items()]
    try:
        for i in range(args.turns):
            for chat in chats:                 # interleaved: every system takes this turn, in turn
                chat.turn(i, args.ctx)
    finally:
        for server in servers.values():
            server.stop()

    lines = [f"{args.turns}-turn chat, context {args.ctx}, replies up to {REPLY_TOKENS} tokens, "
             f"model {os.path.basename(args.model)}, {args.threads} threads", "",
             "Per turn: time to first token in ms / prompt tokens evaluated (T: after the first trim)", "",
             "| turn | " + " | ".join(c.name for c in chats) + " |", "|---:|" + "---:|" * len(chats)]
    for k in range(args.turns):
        cells = [f"{c.rows[k][2] * 1000:.0f} / {c.rows[k][3]}{' T' if c.rows[k][1] else ''}" for c in chats]
        lines.append(f"| {k + 1} | " + " | ".join(cells) + " |")
    lines += ["", "| system | median TTFT before trim, ms | after, ms | after / before | "
                  "median evaluated before | after |", "|---|---:|---:|---:|---:|---:|"]
    for c in chats:
        b, a, eb, ea = summarize(c)
        lines.append(f"| {c.name} | {b * 1000:.0f} | {a * 1000:.0f} | {a / b:.2f} | {eb:.0f} | {ea:.0f} |")
    publish("longchat.md", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
