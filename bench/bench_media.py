#!/usr/bin/env python3
"""Images (issue 35): time to first token of a chat turn with one image, its first turn and the next turn of the
same conversation (the same image, a new question: the encoded image stays in the KV cache, so only the new words
are read), KoboldLite beside llama.cpp's llama-server on the same model and projector, rounds interleaved; and
the resident memory of each server with the projector loaded and without it.

    BUILD_SERVER=1 KOBOLDLITE_CPU_VARIANTS=haswell bash tools/build_llama_lib.sh cpu bench/.llama-server/cpu
    python3 bench/bench_media.py --llama-server bench/.llama-server/cpu/llama-server [--rounds 5] [--threads 1]
    python3 bench/bench_media.py --alone            # KoboldLite only: no llama-server, no ratios

No small real multimodal model exists here: the model is the starter model (SmolLM2-135M) and the projector the
random-weight LLaVA-style one of tests/media_models.py (64 tokens an image, 112 px: every image is resized to
that, so the --image-size pixels cost only the decoding and the resize). Every round sends an image of its own
(a fresh one to both servers: nothing is found from an earlier round), greedy, end of text banned,
--tokens tokens asked. Turn 2 sends turn 1's question, image and reply back with a new question.
KoboldLite loads the libraries built beside llama-server (--lib; the same build, the same CPU variant), unless
--lib says otherwise. One slot on both (KoboldLite's default, llama-server -np 1). TTFT is measured on the
streamed OpenAI chat (`stream: true`): from sending the request to the first chunk with text.
Memory: VmRSS (and its peak, VmHWM) of the server process, at start and after the turns, for each server with
its projector and then started again without one (KoboldLite --nommproj, llama-server without --mmproj; the
same chats without the image). Writes bench/results/media.md.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from koboldlite.model_files import find_starter_model  # noqa: E402
from koboldlite.engine.llama_model import LlamaModel  # noqa: E402
import results_file  # noqa: E402
from tests import media_files, media_models  # noqa: E402
from tests.harness import PIP_LLAMA_LIB, SCRIPT, ServerProcess  # noqa: E402

DEFAULT_SERVER = os.path.join(HERE, ".llama-server", "cpu", "llama-server")
BUILD = "BUILD_SERVER=1 KOBOLDLITE_CPU_VARIANTS=haswell bash tools/build_llama_lib.sh cpu bench/.llama-server/cpu"
QUESTION_1 = "What is in this picture? Answer in a few words."
QUESTION_2 = "And which colour is most of it?"


class LlamaServer:
    """llama.cpp's llama-server on a free port; every line of its log kept."""

    def __init__(self, binary: str, args: list[str]):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.command = [binary, *args, "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     errors="replace")
        self.lines: list[str] = []
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())
            if "server is listening" in line or "listening on" in line:
                break
        else:
            self.proc.wait()
            raise RuntimeError(f"llama-server did not start (exit {self.proc.returncode}); `{' '.join(self.command)}`"
                               " said:\n" + "\n".join(self.lines[-25:]))
        threading.Thread(target=lambda: self.lines.extend(line.rstrip() for line in self.proc.stderr),
                         daemon=True).start()

    def connection(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


def koboldlite(args, lib: str, extra: list[str]) -> ServerProcess:
    return ServerProcess(["--model", args.model, "--contextsize", str(args.ctx), "--threads", str(args.threads),
                          "--nodraft", *extra], env={"LLAMA_CPP_LIB_PATH": lib})


def llama_server(args, extra: list[str]) -> LlamaServer:
    return LlamaServer(args.llama_server, ["-m", args.model, "-c", str(args.ctx), "-np", "1", "-t", str(args.threads),
                                           "-tb", str(args.threads), "--no-warmup", *extra])


def memory_mib(server) -> dict[str, float]:
    """VmRSS and VmHWM (its peak) of the server's process, MiB."""
    with open(f"/proc/{server.proc.pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


def data_uri(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def conversation(image: bytes | None, reply: str | None = None) -> list[dict]:
    """Turn 1 (a question and the image), or with turn 1's reply turn 2. Without an image: the same words only."""
    content = [{"type": "text", "text": QUESTION_1}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_uri(image)}})
    messages = [{"role": "user", "content": content}]
    if reply is not None:
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": QUESTION_2}]
    return messages


def turn(server, messages: list[dict], tokens: int, eos_bias: dict) -> dict:
    """One streamed chat turn: seconds to the first chunk with text (or to the end, should none come), the reply,
    and what the server says it read (prompt tokens, of which cached) from its usage or timings."""
    body = {"messages": messages, "max_tokens": tokens, "temperature": 0, "seed": 1, "stream": True,
            "stream_options": {"include_usage": True}, "logit_bias": eos_bias}
    conn = server.connection()
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:2000]!r}")
    ttft, text, usage, timings = None, "", {}, {}
    for line in resp:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        usage = chunk.get("usage") or usage
        timings = chunk.get("timings") or timings
        for choice in chunk.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content") or ""
            text += piece
            if ttft is None and (piece or choice.get("finish_reason")):
                ttft = time.perf_counter() - t0
    total = time.perf_counter() - t0
    conn.close()
    if ttft is None:
        raise RuntimeError("no text came")
    prompt = usage.get("prompt_tokens")
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if timings.get("prompt_n") is not None:          # llama-server's own account: read now, found in the cache
        cached = timings.get("cache_n", cached)
        prompt = timings["prompt_n"] + (cached or 0)
    return {"ttft": ttft, "total": total, "text": text, "prompt": prompt, "cached": cached}


def chat(server, image: bytes | None, tokens: int, eos_bias: dict) -> tuple[dict, dict]:
    first = turn(server, conversation(image), tokens, eos_bias)
    second = turn(server, conversation(image, first["text"]), tokens, eos_bias)
    return first, second


def read_now(t: dict) -> str:
    if t["prompt"] is None or t["cached"] is None:
        return "?"
    return str(t["prompt"] - t["cached"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-server", default=DEFAULT_SERVER, metavar="PATH",
                    help="llama.cpp's llama-server built from the same source "
                         f"(default {os.path.relpath(DEFAULT_SERVER, ROOT)})")
    ap.add_argument("--alone", action="store_true", help="KoboldLite only: no llama-server, no ratios")
    ap.add_argument("--lib", help="the llama.cpp build KoboldLite loads (LLAMA_CPP_LIB_PATH); default: the folder of "
                                  "--llama-server where it holds libllama, else pip's llama-cpp-python")
    ap.add_argument("--model", default=find_starter_model())
    ap.add_argument("--mmproj", help="the projector (default: the random-weight one of tests/media_models.py, "
                                     "written to a temporary folder)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--image-size", type=int, default=448, help="pixels a side of every round's PNG")
    ap.add_argument("--no-memory", action="store_true", help="skip the servers without a projector")
    args = ap.parse_args()

    if not args.alone:
        args.llama_server = os.path.abspath(args.llama_server)
        if not (os.path.isfile(args.llama_server) and os.access(args.llama_server, os.X_OK)):
            print(f"bench_media: no llama-server at {args.llama_server}.\nBuild it from the same llama.cpp source "
                  f"as llama-cpp-python (many minutes on 2 cores):\n    {BUILD}\nthen pass --llama-server PATH, "
                  f"or run KoboldLite alone with --alone.", file=sys.stderr)
            return 2
    lib = args.lib
    if lib is None:
        beside = None if args.alone else os.path.dirname(args.llama_server)
        lib = beside if beside and os.path.exists(os.path.join(beside, "libllama.so")) else PIP_LLAMA_LIB
    lib = os.path.abspath(lib)
    tmp = tempfile.mkdtemp(prefix="bench-media-")
    if args.mmproj is None:
        args.mmproj = os.path.join(tmp, "vision-mmproj.gguf")
        media_models.vision(args.mmproj)
    probe = LlamaModel(args.model, n_ctx=64, n_seq=1, n_threads=1, n_gpu_layers=0)
    eos_bias = {str(t): -100 for t in probe.eog_tokens}     # every reply exactly --tokens tokens, the same on both
    probe.close()
    images = [media_files.png(args.image_size, args.image_size, seed=r) for r in range(args.rounds + 1)]
    print(f"KoboldLite: {SCRIPT} on {lib}; threads {args.threads}; model {os.path.basename(args.model)}; "
          f"projector {args.mmproj}; {args.rounds} rounds + 1 warm-up; images {args.image_size}x{args.image_size} "
          f"PNG, {len(images[0]) // 1024} KiB", flush=True)

    systems: dict = {}
    try:
        systems["koboldlite"] = koboldlite(args, lib, ["--mmproj", args.mmproj])
        if not args.alone:
            systems["llama-server"] = llama_server(args, ["--mmproj", args.mmproj])
        mem_start = {n: memory_mib(s) for n, s in systems.items()}
        names = list(systems)
        rows = {n: {"t1": [], "t2": [], "read1": [], "read2": []} for n in names}
        for r in range(args.rounds + 1):        # round 0: warm-up, not counted (first requests pay lazy set-up)
            order = names if r % 2 == 0 else list(reversed(names))
            for n in order:
                s = systems[n]
                try:
                    first = turn(s, conversation(images[r]), args.tokens, eos_bias)
                    second = turn(s, conversation(images[r], first["text"]), args.tokens, eos_bias)
                except (OSError, RuntimeError, ValueError) as e:
                    tail = "\n".join(list(s.lines)[-20:])
                    print(f"{n} failed in round {r}: {type(e).__name__}: {e}\n{tail}", file=sys.stderr)
                    raise
                if r == 0:
                    continue
                rows[n]["t1"].append(first["ttft"])
                rows[n]["t2"].append(second["ttft"])
                rows[n]["read1"].append(read_now(first))
                rows[n]["read2"].append(read_now(second))
            if r:
                print(f"round {r}: " + "; ".join(
                    f"{n} turn 1 {rows[n]['t1'][-1] * 1000:.0f} ms (read {rows[n]['read1'][-1]}), "
                    f"turn 2 {rows[n]['t2'][-1] * 1000:.0f} ms (read {rows[n]['read2'][-1]})" for n in names),
                    flush=True)
            else:
                print("warm-up round done", flush=True)
        mem_after = {n: memory_mib(s) for n, s in systems.items()}
    finally:
        for s in systems.values():
            s.stop()

    plain_start, plain_after = {}, {}
    if not args.no_memory:      # the same servers without a projector: the same chats, words only
        plain = {}
        try:
            plain["koboldlite"] = koboldlite(args, lib, ["--nommproj"])
            if not args.alone:
                plain["llama-server"] = llama_server(args, [])
            plain_start = {n: memory_mib(s) for n, s in plain.items()}
            for r in range(2):
                for n, s in plain.items():
                    chat(s, None, args.tokens, eos_bias)
            plain_after = {n: memory_mib(s) for n, s in plain.items()}
        finally:
            for s in plain.values():
                s.stop()

    med = {n: {k: statistics.median(rows[n][k]) for k in ("t1", "t2")} for n in names}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    lines = ["# Images: time to first token and memory (issue 35)", "",
             f"Machine: {os.cpu_count()} cores ({cpu}), shared with other work: compare only the ratios, measured "
             f"side by side in interleaved rounds. Threads: {args.threads} (KoboldLite --threads {args.threads}, "
             f"llama-server -t {args.threads} -tb {args.threads}).",
             f"Model {os.path.basename(args.model)} with the random-weight LLaVA-style projector of "
             f"tests/media_models.py (64 tokens an image); context {args.ctx}, one slot, greedy, {args.tokens} tokens "
             f"a reply (end of text banned); every round a fresh {args.image_size}x{args.image_size} PNG "
             f"({len(images[1]) // 1024} KiB); {args.rounds} rounds after a warm-up round, interleaved (the order "
             f"reversed every round). KoboldLite: {os.path.relpath(SCRIPT, ROOT)} on "
             f"{os.path.relpath(lib, ROOT) if lib.startswith(ROOT) else lib}."
             + ("" if args.alone else f" llama-server: {os.path.relpath(args.llama_server, ROOT)} -np 1 --no-warmup."),
             "", "TTFT of the streamed OpenAI chat (`/v1/chat/completions`, `stream: true`), milliseconds; "
                 "'read' is prompt tokens minus cached tokens as each server reports them.", "",
             "| round | " + " | ".join(f"{n} turn 1 | {n} turn 2 | {n} read 1 / 2" for n in names) + " |",
             "|---:|" + "---:|---:|---|" * len(names)]
    for i in range(args.rounds):
        lines.append(f"| {i + 1} | " + " | ".join(
            f"{rows[n]['t1'][i] * 1000:.0f} | {rows[n]['t2'][i] * 1000:.0f} | "
            f"{rows[n]['read1'][i]} / {rows[n]['read2'][i]}"
            for n in names) + " |")
    lines.append("| median | " + " | ".join(f"**{med[n]['t1'] * 1000:.0f}** | **{med[n]['t2'] * 1000:.0f}** | "
                                         for n in names) + " |")
    lines += ["", "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names),
              "| turn 2 / turn 1, median of rounds | " + " | ".join(
                  f"{statistics.median([b / a for a, b in zip(rows[n]['t1'], rows[n]['t2'])]):.3f}"
                  for n in names) + " |"]
    if "llama-server" in names:
        k, l_ = rows["koboldlite"], rows["llama-server"]
        r1 = [a / b for a, b in zip(k["t1"], l_["t1"])]
        r2 = [a / b for a, b in zip(k["t2"], l_["t2"])]
        lines += ["", "KoboldLite / llama-server, TTFT per round (under 1: KoboldLite first):", "",
                  "- turn 1 (image encoded and read): " + ", ".join(f"{x:.3f}" for x in r1)
                  + f" (median **{statistics.median(r1):.3f}**)",
                  "- turn 2 (the image from the cache): " + ", ".join(f"{x:.3f}" for x in r2)
                  + f" (median **{statistics.median(r2):.3f}**)"]
    for n in names:         # the image is 64 positions: a turn 2 that read fewer took it from the cache
        read2 = [int(x) for x in rows[n]["read2"] if x != "?"]
        if read2:
            lines.append(f"\n{n}, turn 2: read {min(read2)}-{max(read2)} new tokens, "
                         + ("under the image's 64: the image was not encoded again." if max(read2) < 64
                            else "64 or more: the image may have been read again."))
    lines += ["", "Resident memory of the server process, MiB (VmRSS; peak VmHWM in brackets), at start and after "
                  "the turns:", "", "| server | with the projector, start | after the image turns | "
                                     "without (--nommproj / no --mmproj), start | after the same words |",
              "|---|---:|---:|---:|---:|"]
    show = lambda m: f"{m['VmRSS']:.0f} ({m['VmHWM']:.0f})" if m else "-"
    for n in names:
        lines.append(f"| {n} | {show(mem_start[n])} | {show(mem_after[n])} | {show(plain_start.get(n))} | "
                     f"{show(plain_after.get(n))} |")
    if "llama-server" in names:
        lines.append("\nllama-server runs with --no-warmup: its projector's buffers are taken at the first image, so "
                     "compare the memory after the turns. Both keep displaced conversations in RAM by default "
                     "(KoboldLite --cacheram, llama-server --cache-ram): every round's new conversation displaces "
                     "the last, so the figure after the turns may grow with --rounds.")
    for n in names:
        if n in plain_after:
            lines.append(f"\n{n}: the projector costs {mem_after[n]['VmRSS'] - plain_after[n]['VmRSS']:+.0f} MiB "
                         f"resident after the turns ({mem_start[n]['VmRSS'] - plain_start[n]['VmRSS']:+.0f} at start).")
    command = "python3 bench/bench_media.py " + ("--alone" if args.alone else
                                                 f"--llama-server {os.path.relpath(args.llama_server, ROOT)}")
    command += f" --rounds {args.rounds} --threads {args.threads}"
    lines += ["", f"Reproduce (llama-server built first with `{BUILD}`):", "", f"    {command}"]
    results_file.publish("media.md", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
