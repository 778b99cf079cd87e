#!/usr/bin/env python3
"""Every-CPU benchmark (issue 34): llama.cpp with all CPU variants against pip's native build, side by side.

    bash tools/build_llama_lib.sh vulkan          # (tests/install.sh does it) the all-variants build
    python3 bench/bench_cpu_variants.py [--lib .llama-vulkan/lib] [--rounds 5] [--exe]

Two servers on the starter model, one on pip's llama-cpp-python (compiled for this CPU, GGML_NATIVE) and one on
the all-variants build (the best variant for this CPU loaded at start; no Vulkan driver offered, so both run on
the CPU), driven in interleaved rounds by the same OpenAI streaming clients: one stream, then 4 at once
(--parallel 4); each round reverses the order of the one before. Ratios are per round, variants over native;
the median is reported. With --exe it also builds
the executable both ways (tools/build_exe.py --kind native and --kind vulkan) and reports their sizes and their
start-up time to "Serving at", interleaved. Writes bench/results/cpu-variants.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from koboldlite.model_files import find_starter_model  # noqa: E402
from koboldlite.engine.llama_model import LlamaModel  # noqa: E402
import results_file  # noqa: E402
from bench_parallel import drive  # noqa: E402
from tests.harness import PIP_LLAMA_LIB, ServerProcess, program_command  # noqa: E402

NO_VULKAN_DRIVER = {"VK_ICD_FILENAMES": "/nonexistent.json", "VK_DRIVER_FILES": "/nonexistent.json"}


def server_on(lib: str, args: list[str]) -> ServerProcess:
    return ServerProcess(args, command=[*program_command(), "--port", "0"],
                         env={"LLAMA_CPP_LIB_PATH": lib, **NO_VULKAN_DRIVER})


def cpu_line(server: ServerProcess) -> str:
    return next(line for line in server.lines if line.startswith("CPU backend:")).split(" [")[0]


def speeds(args, eos_bias: dict) -> list[str]:
    base = ["--model", args.model, "--contextsize", "4096", "--threads", str(args.threads), "--quiet"]
    servers = {}
    try:
        for clients in (1, 4):
            extra = ["--parallel", "4"] if clients == 4 else []
            servers[("native", clients)] = server_on(PIP_LLAMA_LIB, base + extra)
            servers[("variants", clients)] = server_on(args.lib, base + extra)
        for (kind, clients), s in servers.items():
            drive(s, 1, 16, eos_bias)           # warm-up
        rounds = {key: [] for key in servers}
        for k in range(args.rounds):        # native first in one round, the variants first in the next
            for key, s in (servers.items() if k % 2 == 0 else reversed(servers.items())):
                rounds[key].append(drive(s, key[1], args.tokens, eos_bias)["aggregate"])
        lines = [f"Native: {cpu_line(servers[('native', 1)])}; variants: {cpu_line(servers[('variants', 1)])}.", "",
                 "| clients | round | native tok/s | variants tok/s | ratio |", "|---:|---:|---:|---:|---:|"]
        for clients in (1, 4):
            ratios = []
            for k, (n, v) in enumerate(zip(rounds[("native", clients)], rounds[("variants", clients)]), 1):
                ratios.append(v / n)
                lines.append(f"| {clients} | {k} | {n:.1f} | {v:.1f} | {v / n:.3f} |")
            lines.append(f"| {clients} | median | | | **{statistics.median(ratios):.3f}** |")
        return lines
    finally:
        for s in servers.values():
            s.stop()


def executables(args) -> list[str]:
    work = tempfile.mkdtemp()
    built = {}
    for kind in ("native", "vulkan"):
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "build_exe.py"), "--kind", kind,
                        "--dist", os.path.join(work, "dist"), "--work", os.path.join(work, "build")], check=True)
        built[kind] = os.path.join(work, "dist", "koboldlite-native" if kind == "native" else "koboldlite")
    times = {kind: [] for kind in built}
    for _ in range(args.rounds):
        for kind, exe in built.items():
            t0 = time.monotonic()
            s = ServerProcess(["--port", "0", "--contextsize", "512", "--quiet"], command=[exe],
                              env=NO_VULKAN_DRIVER)
            times[kind].append(time.monotonic() - t0)
            s.stop()
    lines = ["", "| executable | size MiB | start-up to 'Serving at', median s |", "|---|---:|---:|"]
    for kind, exe in built.items():
        lines.append(f"| {os.path.basename(exe)} ({'pip native' if kind == 'native' else 'every CPU variant + Vulkan'}) "
                     f"| {os.path.getsize(exe) / 2**20:.1f} | {statistics.median(times[kind]):.2f} |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=find_starter_model())
    ap.add_argument("--lib", default=os.path.join(ROOT, ".llama-vulkan", "lib"))
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--exe", action="store_true", help="also build both executables: sizes and start-up times")
    args = ap.parse_args()
    probe = LlamaModel(args.model, n_ctx=64, n_seq=1, n_threads=1, n_gpu_layers=0)
    eos_bias = {str(t): -100 for t in probe.eog_tokens}
    probe.close()
    lines = [f"Model {os.path.basename(args.model)}, {args.tokens} tokens a client, {args.threads} threads, "
             f"{os.cpu_count()} cores, {args.rounds} interleaved rounds; OpenAI completion streams.", ""]
    lines += speeds(args, eos_bias)
    if args.exe:
        lines += executables(args)
    results_file.publish("cpu-variants.md", ["# Every CPU: all variants against pip's native build (issue 34)", ""]
                         + lines + ["", "Reproduce: `python3 bench/bench_cpu_variants.py --exe`"])


if __name__ == "__main__":
    main()
