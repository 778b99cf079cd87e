#!/usr/bin/env python3
"""Speculative decoding (issue 26): generation speed with and without drafts, beside llama-server's n-gram types.

    python3 bench/bench_speculative.py --llama-server bench/.llama-server/bin/llama-server [--rounds 3]

Workloads (greedy, 300 tokens at most, chat API):
- passage: reproduce a ~400-token passage with one small edit (repeats what it read);
- code: a code edit, the whole function given back (repeats what it read);
- free: an open question (repeats little).
Each single stream (one client) and 4 clients at once. Systems: KoboldLite without drafts ("nodraft": true on
each request) and with (its default: n-gram drafts from the context), on one server, and the same on a
second server with --noflashattention ("no-FA"; its ratio column is over the default server without drafts); llama-server without
drafts and with each --spec-type ngram-* (their defaults otherwise), one server each; all with 4 slots
sharing a 4096-token pool. Rounds interleave every system on every workload, the order rotating. The figure is
generated tokens per second after the first token (per client, median of clients), then the median of the
rounds; ratios are per round then the median. Writes bench/results/speculative.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import results_file  # noqa: E402
from bench_parallel import PeerServer  # noqa: E402
from tests.harness import ServerProcess  # noqa: E402

PASSAGE = (
    "The harbour town woke slowly on winter mornings. Fishermen carried their nets down the stone steps to the "
    "boats, and the baker on the corner opened his shutters as the church bell rang seven. Children ran along "
    "the sea wall on their way to school, their scarves flying in the wind, while the gulls circled above the "
    "market where the first crates of fish were being unloaded. By nine the square was full: farmers from the "
    "valley sold cheese and apples, an old woman sold knitted hats, and the ferry from the island brought "
    "travellers with heavy bags. The lighthouse keeper came down from the cliff once a week to buy oil and "
    "bread, and he always stopped at the harbour office to read the weather reports pinned to the door. In the "
    "afternoon the wind turned and the fog rolled in from the open sea, so thick that the boats stayed in and "
    "the town grew quiet again. In the evening the lamps were lit one by one along the quay, the tavern filled "
    "with sailors telling the same old stories, and the sound of the waves against the harbour wall carried "
    "through every open window until the last light went out.")
CODE = '''def summarize(records):
    total = 0
    count = 0
    largest = None
    smallest = None
    for record in records:
        value = record["value"]
        total += value
        count += 1
        if largest is None or value > largest:
            largest = value
        if smallest is None or value < smallest:
            smallest = value
    if count == 0:
        return {"count": 0, "mean": None, "largest": None, "smallest": None}
    return {"count": count, "mean": total / count, "largest": largest, "smallest": smallest}
'''
WORKLOADS = {
    "passage": "Here is a passage:\n\n" + PASSAGE + "\n\nWrite the passage out again exactly as it is, word for "
               "word, but with 'harbour' replaced by 'port'.",
    "code": "Here is a Python function:\n\n" + CODE + "\nRename the variable `count` to `n` and give back the "
            "whole function, changing nothing else.",
    "free": "What are the main causes of the seasons on Earth? Explain in a few paragraphs.",
}
MAX_TOKENS = 300
NGRAM_TYPES = ("ngram-simple", "ngram-map-k", "ngram-mod", "ngram-cache")


def stream_chat(server, prompt: str, extra: dict) -> float:
    """Generated tokens per second after the first token, for one streamed greedy chat."""
    conn = server.connection()
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **extra}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    first = last = None
    tokens = 0
    for line in resp:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        choices = chunk.get("choices") or []
        if choices and (choices[0].get("delta") or {}).get("content"):
            last = time.perf_counter()
            first = first or last
    conn.close()
    assert tokens > 10 and last > first, "too short a reply to time"
    return (tokens - 1) / (last - first)


def clients(server, prompt: str, extra: dict, n: int) -> float:
    rates = [0.0] * n

    def run(i):
        rates[i] = stream_chat(server, prompt, extra)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statistics.median(rates)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--llama-server", default=os.path.join(HERE, ".llama-server", "bin", "llama-server"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    kl = ServerProcess(["--contextsize", "4096", "--parallel", "4", "--threads", str(args.threads), "--quiet"])
    kl_nofa = ServerProcess(["--contextsize", "4096", "--parallel", "4", "--threads", str(args.threads), "--quiet",
                             "--noflashattention"])
    systems = {"KoboldLite": (kl, {"nodraft": True}), "KoboldLite drafts": (kl, {}),
               "KoboldLite no-FA": (kl_nofa, {"nodraft": True}), "KoboldLite no-FA drafts": (kl_nofa, {})}
    peers = []
    if os.path.exists(args.llama_server):
        os.environ["GGML_VK_VISIBLE_DEVICES"] = ""         # a Vulkan build stays on the CPU
        from koboldlite.model_files import find_starter_model
        model = find_starter_model()
        for kind in ("none",) + NGRAM_TYPES:
            peer = PeerServer(lambda port, kind=kind: [
                args.llama_server, "-m", model, "-c", "4096", "-np", "4", "--kv-unified", "-ngl", "0",
                "-t", str(args.threads), "-tb", str(args.threads), "--host", "127.0.0.1", "--port", str(port),
                *(["--spec-type", kind] if kind != "none" else [])],
                ("listening on", "server is listening", "main: model loaded"), "llama-server")
            peers.append(peer)
            systems["llama-server" if kind == "none" else f"llama-server {kind}"] = (peer, {})
    results = {(w, c, name): [] for w in WORKLOADS for c in (1, 4) for name in systems}
    try:
        for r in range(args.rounds):
            for w, prompt in WORKLOADS.items():
                for c in (1, 4):
                    names = list(systems)
                    shift = (r + c) % len(names)
                    for name in names[shift:] + names[:shift]:
                        server, extra = systems[name]
                        rate = stream_chat(server, prompt, extra) if c == 1 else clients(server, prompt, extra, c)
                        results[(w, c, name)].append(rate)
                    print(f"round {r + 1} {w} x{c}: " + ", ".join(
                        f"{n} {results[(w, c, n)][-1]:.1f}" for n in systems), flush=True)
    finally:
        kl.stop()
        kl_nofa.stop()
        for peer in peers:
            peer.stop()

    names = list(systems)
    lines = ["# Speculative decoding: tokens/s after the first token", "",
             f"`python3 bench/bench_speculative.py --rounds {args.rounds}`, {args.threads} threads, SmolLM2-135M, "
             "greedy, up to 300 tokens; per client, medians of the rounds. Ratio columns: KoboldLite with drafts "
             "over KoboldLite without; KoboldLite --noflashattention with drafts over KoboldLite without; and "
             "KoboldLite with drafts over the best llama-server row of the same workload (per round, then "
             "the median).", "",
             "| workload | clients | " + " | ".join(names) + " | drafts / none | no-FA drafts / none | "
             "drafts / best llama-server |",
             "|---|---|" + "---|" * (len(names) + 3)]
    for w in WORKLOADS:
        for c in (1, 4):
            med = {n: statistics.median(results[(w, c, n)]) for n in names}
            own = statistics.median(a / b for a, b in zip(results[(w, c, "KoboldLite drafts")],
                                                          results[(w, c, "KoboldLite")]))
            nofa = statistics.median(a / b for a, b in zip(results[(w, c, "KoboldLite no-FA drafts")],
                                                           results[(w, c, "KoboldLite")]))
            peers_here = [n for n in names if n.startswith("llama-server")]
            if peers_here:
                best = max(peers_here, key=lambda n: med[n])
                vs = statistics.median(a / b for a, b in zip(results[(w, c, "KoboldLite drafts")],
                                                             results[(w, c, best)]))
                versus = f"{vs:.2f} ({best})"
            else:
                versus = "-"
            lines.append(f"| {w} | {c} | " + " | ".join(f"{med[n]:.1f}" for n in names)
                         + f" | {own:.2f} | {nofa:.2f} | {versus} |")
    results_file.publish("speculative.md", lines)


if __name__ == "__main__":
    main()
