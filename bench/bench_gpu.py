#!/usr/bin/env python3
"""GPU benchmark: KoboldLite on a GPU build of llama.cpp against llama-server built from the same vendored
source with the same backend, side by side, rounds interleaved, ratios per round (issue 23).

    BUILD_SERVER=1 bash tools/build_llama_lib.sh cuda      # the libraries and llama-server, in .llama-cuda/lib
    python3 bench/bench_gpu.py --lib .llama-cuda/lib --llama-server .llama-cuda/lib/llama-server
    python3 bench/bench_gpu.py --lib .llama-vulkan/lib --smoke       # lavapipe: does it run at all

Three workloads, every layer on the GPU, 8192-token context, 4 slots on both servers (llama-server with
--kv-unified, KoboldLite's default layout):
- single stream: one client, --tokens tokens (end of text banned), tokens/s after the first token;
- 4 clients: aggregate tokens/s of four concurrent streams;
- prompt reading: a fresh 4000-token prompt (never cached: its first words change every round), max 1 token;
  prompt tokens / time to first token.
Targets on a real GPU: single stream >= 0.97 of llama-server, 4 clients >= 1.0, prompt reading >= 0.97.
On lavapipe (a Vulkan driver running on the CPU) the speeds mean nothing: --smoke says so and runs one short
round, to show that the whole path works.
Writes bench/results/gpu.md (or gpu-smoke.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from koboldlite.model_files import find_starter_model  # noqa: E402
from koboldlite.engine.llama_model import LlamaModel  # noqa: E402
import results_file  # noqa: E402
from bench_parallel import LlamaServer, drive  # noqa: E402
from tests.harness import ServerProcess  # noqa: E402

WORDS = ("river stone lantern harbour meadow cipher ember willow falcon copper orchard beacon thistle glacier "
         "saddle quarry").split()


def long_prompt(n_words: int, round_: int) -> str:
    rng = random.Random(round_)
    head = f"Round {round_} {rng.random():.9f}: summarise the following notes.\n"
    return head + " ".join(rng.choice(WORDS) for _ in range(n_words))


def prompt_reading(server, prompt: str) -> tuple[float, int]:
    """(prompt tokens per second, prompt tokens) for one fresh prompt and a 1-token reply."""
    conn = server.connection()
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "cache_prompt": False}
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    data = json.loads(conn.getresponse().read())
    elapsed = time.perf_counter() - t0
    conn.close()
    n = data["usage"]["prompt_tokens"]
    return n / elapsed, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", required=True, help="the GPU build of libllama KoboldLite loads (LLAMA_CPP_LIB_PATH)")
    ap.add_argument("--llama-server", help="llama-server built from the same source with the same backend")
    ap.add_argument("--model", default=find_starter_model())
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--prompt-words", type=int, default=3000, help="about 4000 tokens with the starter model")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--smoke", action="store_true", help="lavapipe: one short round, speeds meaningless")
    args = ap.parse_args()
    env = {"LLAMA_CPP_LIB_PATH": os.path.abspath(args.lib)}
    if args.smoke:
        env["GGML_VK_VISIBLE_DEVICES"] = os.environ.get("GGML_VK_VISIBLE_DEVICES", "0")
        args.rounds, args.tokens, args.prompt_words, args.ctx = 1, 8, 300, 2048
        print("SMOKE RUN on a software GPU (lavapipe): it shows the path works; its speeds mean nothing.")
    systems = {"koboldlite": ServerProcess(["--model", args.model, "--gpulayers", "-1", "--parallel", "4",
                                            "--contextsize", str(args.ctx)], env=env)}
    offloaded = systems["koboldlite"].wait_for_line(r"^GPU: offloaded (\d+)/(\d+) layers", 60)
    print(f"koboldlite: {offloaded.group(0)}")
    probe = LlamaModel(args.model, n_ctx=64, n_seq=1, n_threads=1, n_gpu_layers=0)
    eos_bias = {str(t): -100 for t in probe.eog_tokens}      # every client gets exactly --tokens tokens
    if args.llama_server:
        systems["llama-server"] = LlamaServer(args.llama_server, args.model, os.cpu_count() or 1, args.ctx, 4,
                                              unified=True, extra=("-ngl", "999"))
    rows: dict[str, dict[str, list[float]]] = {name: {"single": [], "four": [], "prompt": []} for name in systems}
    for r in range(args.rounds):
        order = list(systems) if r % 2 == 0 else list(reversed(systems))
        for name in order:
            s = systems[name]
            print(f"round {r + 1}: {name}...", flush=True)
            share = 0.5 if args.smoke else 0.95      # lavapipe's few tokens: one split character weighs much
            try:
                rows[name]["single"].append(drive(s, 1, args.tokens, eos_bias, min_share=share)["per_client"])
                rows[name]["four"].append(drive(s, 4, args.tokens, eos_bias, min_share=share)["aggregate"])
                rate, n = prompt_reading(s, long_prompt(args.prompt_words, r * 10 + order.index(name)))
                rows[name]["prompt"].append(rate)
            except (OSError, AssertionError, ValueError) as e:
                tail = "\n".join(list(getattr(s, "log", None) or s.lines)[-15:])
                print(f"{name} failed in round {r + 1}: {type(e).__name__}: {e}\n{tail}")
                raise
        print(f"round {r + 1}: " + "; ".join(
            f"{n} single {rows[n]['single'][-1]:.1f} t/s, 4 clients {rows[n]['four'][-1]:.1f} t/s, "
            f"prompt {rows[n]['prompt'][-1]:.0f} t/s" for n in systems))
    for s in systems.values():
        s.stop()
    lines = [f"# GPU benchmark{' (SMOKE: lavapipe, speeds meaningless)' if args.smoke else ''}", "",
             f"model {os.path.basename(args.model)}, {args.tokens} tokens a reply, context {args.ctx}, "
             f"{args.rounds} interleaved rounds, prompt of {n} tokens; medians of rounds", "",
             "| system | single stream t/s | 4 clients t/s | prompt t/s |", "|---|---:|---:|---:|"]
    med = {n: {k: statistics.median(v) for k, v in rows[n].items()} for n in systems}
    for n in systems:
        lines.append(f"| {n} | {med[n]['single']:.1f} | {med[n]['four']:.1f} | {med[n]['prompt']:.0f} |")
    if "llama-server" in systems:
        ratios = {k: [a / b for a, b in zip(rows["koboldlite"][k], rows["llama-server"][k])] for k in rows["koboldlite"]}
        lines += ["", "Ratio KoboldLite / llama-server, per round (targets: single >= 0.97, 4 clients >= 1.0, "
                      "prompt >= 0.97):", ""]
        for k, label in (("single", "single stream"), ("four", "4 clients"), ("prompt", "prompt reading")):
            lines.append(f"- {label}: " + ", ".join(f"{x:.3f}" for x in ratios[k])
                         + f" (median {statistics.median(ratios[k]):.3f})")
    results_file.publish("gpu-smoke.md" if args.smoke else "gpu.md", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
