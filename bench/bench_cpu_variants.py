#!/usr/bin/env python3
"""Every-CPU benchmark (issue 34): llama.cpp with all CPU variants against pip's native build, side by side.

    bash tools/build_llama_lib.sh vulkan          # (tests/install.sh does it) the all-variants build
    python3 bench/bench_cpu_variants.py [--lib .llama-vulkan/lib] [--rounds 5] [--native LABEL=DIR ...] [--exe]

Servers on the starter model, one on pip's llama-cpp-python (compiled for this CPU, GGML_NATIVE) and one on
the all-variants build (the best variant for this CPU loaded at start; no Vulkan driver offered, so both run on
the CPU), driven in interleaved rounds by the same OpenAI clients: one stream, 4 at once (--parallel 4), and a
fresh prompt of about 2,000 tokens read (1 token asked); each round reverses the order of the one before.
`--native LABEL=DIR` (repeatable) replaces pip's library with other native builds of the same llama.cpp, each
measured in the same rounds (a folder holding a copy of pip's lib/ built another way). Ratios are per round,
variants over each native build; the median is reported. With --exe it also builds
the executable both ways (tools/build_exe.py --kind native and --kind vulkan) and reports their sizes and their
start-up time to "Serving at", interleaved. Writes bench/results/cpu-variants.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
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
from bench_neighbours import prompt_of  # noqa: E402
from tests.harness import PIP_LLAMA_LIB, ServerProcess, program_command  # noqa: E402

NO_VULKAN_DRIVER = {"VK_ICD_FILENAMES": "/nonexistent.json", "VK_DRIVER_FILES": "/nonexistent.json"}


def server_on(lib: str, args: list[str]) -> ServerProcess:
    return ServerProcess(args, command=[*program_command(), "--port", "0"],
                         env={"LLAMA_CPP_LIB_PATH": lib, **NO_VULKAN_DRIVER})


def cpu_line(server: ServerProcess) -> str:
    return next(line for line in server.lines if line.startswith("CPU backend:")).split(" [")[0]


def read_prompt(server: ServerProcess) -> float:
    """Prompt tokens a second over a fresh ~2,000-token prompt, one token asked."""
    started = time.perf_counter()
    status, _, body = server.request("POST", "/v1/completions",
                                     {"prompt": prompt_of(2000), "max_tokens": 1, "temperature": 0})
    took = time.perf_counter() - started
    assert status == 200, body[:300]
    return json.loads(body)["usage"]["prompt_tokens"] / took


ROWS = ("1 stream", "4 clients", "prompt 2000")


def speeds(args, eos_bias: dict) -> list[str]:
    base = ["--model", args.model, "--contextsize", "4096", "--threads", str(args.threads), "--quiet"]
    libs = {**dict(args.native or [("native", PIP_LLAMA_LIB)]), "variants": args.lib}
    natives = [label for label in libs if label != "variants"]
    servers = {}
    try:
        for label, lib in libs.items():
            servers[(label, 1)] = server_on(lib, base)
            servers[(label, 4)] = server_on(lib, base + ["--parallel", "4"])
        for (label, clients), s in servers.items():
            drive(s, 1, 16, eos_bias)           # warm-up
        rounds = {(label, row): [] for label in libs for row in ROWS}
        order = list(libs)
        for k in range(args.rounds):        # one order in one round, reversed in the next
            for label in (order if k % 2 == 0 else order[::-1]):
                rounds[(label, ROWS[0])].append(drive(servers[(label, 1)], 1, args.tokens, eos_bias)["aggregate"])
                rounds[(label, ROWS[1])].append(drive(servers[(label, 4)], 4, args.tokens, eos_bias)["aggregate"])
                rounds[(label, ROWS[2])].append(read_prompt(servers[(label, 1)]))
        lines = [f"{label}: {cpu_line(servers[(label, 1)])}." for label in libs] + [""]
        lines += ["| row | round | " + " | ".join(f"{label} tok/s" for label in libs) + " | "
                  + " | ".join(f"variants / {label}" for label in natives) + " |",
                  "|---|---:|" + "---:|" * (len(libs) + len(natives))]
        for row in ROWS:
            ratios = {label: [] for label in natives}
            for k in range(args.rounds):
                v = rounds[("variants", row)][k]
                for label in natives:
                    ratios[label].append(v / rounds[(label, row)][k])
                lines.append(f"| {row} | {k + 1} | " + " | ".join(f"{rounds[(label, row)][k]:.1f}" for label in libs)
                             + " | " + " | ".join(f"{ratios[label][-1]:.3f}" for label in natives) + " |")
            lines.append(f"| {row} | median | " + " | ".join("" for _ in libs) + " | "
                         + " | ".join(f"**{statistics.median(ratios[label]):.3f}**" for label in natives) + " |")
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
    ap.add_argument("--native", action="append", type=lambda v: tuple(v.split("=", 1)), metavar="LABEL=DIR",
                    help="a native build's library folder (repeatable; default: pip's, labelled native)")
    ap.add_argument("--exe", action="store_true", help="also build both executables: sizes and start-up times")
    args = ap.parse_args()
    probe = LlamaModel(args.model, n_ctx=64, n_seq=1, n_threads=1, n_gpu_layers=0)
    eos_bias = {str(t): -100 for t in probe.eog_tokens}
    probe.close()
    lines = [f"{time.strftime('%Y-%m-%d %H:%M')}. Model {os.path.basename(args.model)}, {args.tokens} tokens a client, {args.threads} threads, "
             f"{os.cpu_count()} cores, {args.rounds} interleaved rounds; OpenAI completion streams.", ""]
    lines += speeds(args, eos_bias)
    if args.exe:
        lines += executables(args)
    results_file.publish("cpu-variants.md", ["# Every CPU: all variants against pip's native build (issue 34)", ""]
                         + lines + ["", f"Reproduce: `python3 bench/bench_cpu_variants.py {shlex.join(sys.argv[1:])}`"])


if __name__ == "__main__":
    main()
