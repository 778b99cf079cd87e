#!/usr/bin/env python3
"""Parallel benchmark: koboldlite --parallel 1 and 4 against the raw batched llama.cpp loop,
llama.cpp's own llama-server (-np 1 and -np 4, when bench/build_llama_server.sh has built it) and
llama-cpp-python's bundled server, each with 1, 4 and 8 concurrent streaming clients.

    python3 -m pip install -r bench/requirements.txt
    bash bench/build_llama_server.sh        # optional, about 15 minutes: the llama-server peer
    python3 bench/bench_parallel.py [--tokens 200] [--ctx 8192]

Besides tokens/s and time to first token it reports each server's resident memory, and what a long
prompt (1500 tokens) arriving while 3 clients stream costs: their longest stall, its first token.

Every server is driven by the same client code through the same OpenAI streaming
endpoint (/v1/completions), with the same prompts and lengths (end of sequence
banned, so every client gets exactly --tokens tokens). Servers run one at a time.
Writes bench/results/parallel.md and bench/results/parallel.png and prints the ratios.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import socket
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
from koboldlite.generation import SamplerSettings  # noqa: E402
from koboldlite.engine.llama_model import LlamaModel  # noqa: E402
from koboldlite.engine.samplers import SamplerChain  # noqa: E402
import results_file  # noqa: E402
from bench_core import SAMPLING, percentile  # noqa: E402
from tests.harness import PIP_LLAMA_LIB, ServerProcess  # noqa: E402

TOPICS = ["a lighthouse keeper", "a lost robot", "the last dragon", "a city under the sea",
          "a clockmaker's secret", "two rival chefs", "a haunted library", "a journey to the moon"]
CLIENT_COUNTS = (1, 4, 8)


def prompt_for(i: int) -> str:
    return f"Write a long story about {TOPICS[i % len(TOPICS)]}."


# -- the limit: llama.cpp's batched decode loop, in-process ---------------------------------

def raw_batched_tokens_per_second(model_path: str, batch_size: int, n_tokens: int, threads: int) -> float:
    model = LlamaModel(model_path, n_ctx=512, n_seq=batch_size, n_threads=threads, n_gpu_layers=0)
    lib = model.lib
    settings = SamplerSettings(ban_eos=True, **SAMPLING)
    samplers = [SamplerChain(model, settings, seed=i + 1) for i in range(batch_size)]
    prompts = [model.tokenize(prompt_for(i), add_bos=True) for i in range(batch_size)]
    batch = lib.llama_batch_init(512, 0, batch_size)

    def put(n, token, pos, seq, logits):
        batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos, 1
        batch.seq_id[n][0] = seq
        batch.logits[n] = logits

    n = 0
    out_index = []
    for seq, p in enumerate(prompts):
        for i, t in enumerate(p):
            put(n, t, i, seq, i == len(p) - 1)
            n += 1
        out_index.append(n - 1)
    batch.n_tokens = n
    assert lib.llama_decode(model.ctx, batch) == 0
    positions = [len(p) for p in prompts]
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        tokens = [lib.llama_sampler_sample(samplers[s].chain, model.ctx, out_index[s]) for s in range(batch_size)]
        for s, t in enumerate(tokens):
            model.piece(t)
            put(s, t, positions[s], s, True)
            positions[s] += 1
        out_index = list(range(batch_size))
        batch.n_tokens = batch_size
        assert lib.llama_decode(model.ctx, batch) == 0
    elapsed = time.perf_counter() - t0
    for s in samplers:
        s.free()
    lib.llama_batch_free(batch)
    lib.llama_free(model.ctx)
    lib.llama_model_free(model.model)
    return batch_size * n_tokens / elapsed


# -- servers -----------------------------------------------------------------------------

class PeerServer:
    """A peer server on a free port: started with `command(port)`, ready once its log shows one of `ready`."""

    def __init__(self, command, ready: tuple[str, ...], name: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(command(self.port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log: collections.deque[str] = collections.deque(maxlen=40)    # its last lines, for a post-mortem
        for line in self.proc.stderr:
            self.log.append(line.rstrip())
            if any(marker in line for marker in ready):
                break
        else:
            raise RuntimeError(f"{name} did not start:\n" + "\n".join(self.log))
        threading.Thread(target=lambda: self.log.extend(line.rstrip() for line in self.proc.stderr), daemon=True).start()

    def connection(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


def LlamaCppPythonServer(model: str, threads: int) -> PeerServer:
    """`python -m llama_cpp.server`; uvicorn logs "Uvicorn running on ..." once it listens."""
    return PeerServer(lambda port: [
        sys.executable, "-m", "llama_cpp.server", "--model", model, "--n_ctx", "2048",
        "--n_threads", str(threads), "--n_threads_batch", str(threads), "--host", "127.0.0.1",
        "--port", str(port), "--verbose", "False",
        # Its default (True) makes each new request cut off the running stream: three of four
        # concurrent clients then get one token. Queue them instead, for a fair comparison.
        "--interrupt_requests", "False"], ("Uvicorn running",), "llama_cpp.server")


def LlamaServer(binary: str, model: str, threads: int, ctx: int, slots: int, unified: bool = False,
                extra: tuple[str, ...] = ()) -> PeerServer:
    """llama.cpp's own llama-server binary. With -np N it splits -c into N caches of c/N (each request
    limited to that); unified, its slots share one pool of -c cells as KoboldLite's do by default."""
    return PeerServer(lambda port: [
        binary, "-m", model, "-c", str(ctx), "-np", str(slots), "-t", str(threads), "-tb", str(threads),
        "--host", "127.0.0.1", "--port", str(port)] + (["--kv-unified"] if unified else []) + list(extra),
        ("listening on", "server is listening", "main: model loaded"), "llama-server")


def chat_first_chunk_seconds(server, body: dict, or_end: bool = False) -> float:
    """Seconds from sending a streamed chat request to its first chunk with text (or, with `or_end`, to its end
    if the model stopped at once); a server may send the role alone first."""
    conn = server.connection()
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    elapsed = None
    for line in resp:
        if elapsed is None and line.startswith(b"data: {"):
            choice = (json.loads(line[6:]).get("choices") or [{}])[0]
            if (choice.get("delta") or {}).get("content") or (or_end and choice.get("finish_reason")):
                elapsed = time.perf_counter() - t0
    conn.close()
    assert elapsed is not None, "no text came"
    return elapsed


def resident_mib(server) -> float:
    with open(f"/proc/{server.proc.pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def long_prompt_arrival(server, n_tokens: int, eos_bias: dict, long_prompt: str) -> tuple[float, float]:
    """Three clients stream; a 1500-token prompt arrives. Returns the streams' longest gap between two
    tokens while it is read, and the newcomer's time to first token."""
    streaming = threading.Barrier(4)
    stamps: list[list[float]] = [[], [], []]

    def run(i):
        conn = server.connection()
        body = {"prompt": prompt_for(i), "max_tokens": n_tokens, "stream": True, "logit_bias": eos_bias, **SAMPLING}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        waited = False
        for line in resp:
            if line.startswith(b"data: {"):
                stamps[i].append(time.perf_counter())
                if not waited and len(stamps[i]) >= 3:
                    waited = True
                    streaming.wait()
        conn.close()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    streaming.wait()
    conn = server.connection()
    body = {"prompt": long_prompt, "max_tokens": 8, "stream": True, "logit_bias": eos_bias, **SAMPLING}
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    first = None
    for line in conn.getresponse():
        if line.startswith(b"data: {") and first is None:
            first = time.perf_counter()
    conn.close()
    for t in threads:
        t.join()
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:]) if b >= t0 and a <= first]
    return max(gaps, default=0.0), first - t0


def stream_completion(server, i: int, n_tokens: int, eos_bias: dict, genkey: str | None = None) -> dict:
    """One client: time to first token, token arrival times, via an OpenAI completion stream."""
    conn = server.connection()
    body = {"prompt": prompt_for(i), "max_tokens": n_tokens, "stream": True, "logit_bias": eos_bias,
            "seed": i + 1, **SAMPLING}
    headers = {"Content-Type": "application/json", **({"genkey": genkey} if genkey else {})}
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), headers)
    resp = conn.getresponse()
    stamps = []
    for line in resp:
        if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
    conn.close()
    return {"start": t0, "ttft": stamps[0] - t0, "stamps": stamps, "tokens": n_tokens}


def versus_server(script: str, args: list[str]) -> ServerProcess:
    """Another program that takes koboldlite's options, on pip's llama.cpp as the program under test is."""
    return ServerProcess(args + ["--port", "0"], command=[sys.executable, script],
                         env={"LLAMA_CPP_LIB_PATH": PIP_LLAMA_LIB})


def drive(server, clients: int, n_tokens: int, eos_bias: dict, check_genkeys: bool = False,
          min_share: float = 0.95) -> dict:
    """`min_share`: of the tokens asked for, how many must arrive as chunks of their own (a character split
    over two tokens arrives as one chunk)."""
    results: list[dict] = [None] * clients
    checks: list[float] = []
    done = threading.Event()

    def client(i):
        results[i] = stream_completion(server, i, n_tokens, eos_bias, genkey=f"bench-{i}")

    def poll_check():   # KoboldAI Lite's polling, against the busy server
        conn = server.connection()
        while not done.is_set():
            t0 = time.perf_counter()
            conn.request("POST", "/api/extra/generate/check", json.dumps({"genkey": "bench-0"}),
                         {"Content-Type": "application/json"})
            conn.getresponse().read()
            checks.append(time.perf_counter() - t0)
            done.wait(0.05)   # pacing between polls (Lite polls every 500 ms), not a wait for anything
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    poller = threading.Thread(target=poll_check) if check_genkeys else None
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    if poller:
        poller.start()
    for t in threads:
        t.join()
    done.set()
    if poller:
        poller.join()
    wall = max(r["stamps"][-1] for r in results) - t0
    received = sum(len(r["stamps"]) for r in results)
    assert received >= min_share * clients * n_tokens, \
        f"clients received only {received} of {clients * n_tokens} tokens"
    per_client = [(len(r["stamps"]) - 1) / (r["stamps"][-1] - r["stamps"][0]) for r in results]
    ttfts = [r["ttft"] for r in results]
    return {"aggregate": received / wall, "per_client": statistics.median(per_client),
            "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
            "check_p50": percentile(checks, 50) if checks else None,
            "check_p99": percentile(checks, 99) if checks else None}


def median_run(runs: list[dict]) -> dict:
    """The run whose aggregate is the median: machine noise on 2 shared cores is several percent."""
    return sorted(runs, key=lambda r: r["aggregate"])[len(runs) // 2]


def arrival_ttft(server, n_tokens: int, eos_bias: dict, runs: int = 5) -> tuple[float, float]:
    """Time to first token on an idle server, and for a client arriving while three others stream."""
    idle = [stream_completion(server, 7, 8, eos_bias)["ttft"] for _ in range(runs)]
    busy = []
    for _ in range(runs):
        first_tokens = threading.Barrier(4)
        background = []
        for i in range(3):
            def run(i=i):
                conn = server.connection()
                body = {"prompt": prompt_for(i), "max_tokens": n_tokens, "stream": True, "logit_bias": eos_bias,
                        **SAMPLING}
                conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.readline()
                first_tokens.wait()          # all three are streaming
                resp.read()
                conn.close()
            t = threading.Thread(target=run)
            t.start()
            background.append(t)
        first_tokens.wait()
        busy.append(stream_completion(server, 7, 8, eos_bias)["ttft"])
        for t in background:
            t.join()
    return statistics.median(idle), statistics.median(busy)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=find_starter_model())
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip-peer", action="store_true", help="leave out llama_cpp.server")
    ap.add_argument("--ctx", type=int, default=8192, help="context size for every server")
    ap.add_argument("--llama-server", default=os.path.join(HERE, ".llama-server", "bin", "llama-server"))
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is reported")
    ap.add_argument("--versus", metavar="SCRIPT",
                    help="with --quick: another version of koboldlite.py (an earlier one, say) in place of llama-server, "
                         "the baseline of the ratios")
    ap.add_argument("--quick", action="store_true",
                    help="only issue 15's comparison: 4 clients, --parallel 4 (shared pool, --kvsplit, "
                         "--kvperslot) against llama-server -np 4 (split and unified), every round reported "
                         "(about 7 minutes)")
    args = ap.parse_args()

    probe = LlamaModel(args.model, n_ctx=64, n_seq=1, n_threads=1, n_gpu_layers=0)
    eos_bias = {str(t): -100 for t in probe.eog_tokens}
    if args.quick:
        return quick(args, eos_bias)

    servers = {}
    try:
        for parallel in (1, 4):
            servers[f"koboldlite --parallel {parallel}"] = ServerProcess(
                ["--model", args.model, "--contextsize", str(args.ctx), "--threads", str(args.threads),
                 "--parallel", str(parallel), "--multiuser", "16", "--quiet"])
        if os.access(args.llama_server, os.X_OK):
            for slots in (1, 4):
                servers[f"llama-server -np {slots}"] = LlamaServer(args.llama_server, args.model, args.threads,
                                                                   args.ctx, slots)
        else:
            print(f"(no llama-server at {args.llama_server}: run bench/build_llama_server.sh to compare)")
        if not args.skip_peer:
            servers["llama-cpp-python server"] = LlamaCppPythonServer(args.model, args.threads)
        for server in servers.values():
            drive(server, 1, 16, eos_bias)   # warm-up
        # Rounds, each measuring everything once: the machine's speed drifts over minutes,
        # and interleaving makes the drift hit every system alike.
        raw_runs = {c: [] for c in CLIENT_COUNTS}
        runs = {name: {c: [] for c in CLIENT_COUNTS} for name in servers}
        for _ in range(args.repeat):
            for c in CLIENT_COUNTS:
                raw_runs[c].append(raw_batched_tokens_per_second(args.model, c, args.tokens, args.threads))
                for name, server in servers.items():
                    runs[name][c].append(drive(server, c, args.tokens, eos_bias,
                                               check_genkeys=name.startswith("koboldlite")))
        raw = {c: statistics.median(v) for c, v in raw_runs.items()}
        rows: dict[str, dict[int, dict]] = {
            "raw llama.cpp batched loop": {c: {"aggregate": v, "per_client": v / c} for c, v in raw.items()}}
        rows.update({name: {c: median_run(r) for c, r in by_c.items()} for name, by_c in runs.items()})
        ttft = {name: arrival_ttft(server, args.tokens, eos_bias) for name, server in servers.items()}
        long_prompt = " ".join(f"Line {k}: the harbour town keeps its lamps lit through the night." for k in range(110))
        arrival = {name: long_prompt_arrival(server, args.tokens, eos_bias, long_prompt)
                   for name, server in servers.items() if "llama-cpp-python" not in name}
        memory = {name: resident_mib(server) for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()

    def fmt(v, scale=1.0, digits=1):
        return "n/a" if v is None else f"{v * scale:.{digits}f}"

    lines = [f"Model {os.path.basename(args.model)}, {args.tokens} tokens per client, {args.threads} threads, "
             f"{os.cpu_count()} cores; OpenAI completion streams; median of {args.repeat} runs.", "",
             "| system | clients | aggregate tok/s | per-client tok/s | TTFT p50 ms | TTFT p99 ms | "
             "check p50 ms | check p99 ms |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, by_clients in rows.items():
        for c, r in by_clients.items():
            lines.append(f"| {name} | {c} | {fmt(r['aggregate'])} | {fmt(r['per_client'])} | "
                         f"{fmt(r.get('ttft_p50'), 1000)} | {fmt(r.get('ttft_p99'), 1000)} | "
                         f"{fmt(r.get('check_p50'), 1000, 2)} | {fmt(r.get('check_p99'), 1000, 2)} |")
    lines += ["", "| system | TTFT idle ms | TTFT while 3 others stream ms | ratio |", "|---|---:|---:|---:|"]
    for name, (idle, busy) in ttft.items():
        lines.append(f"| {name} | {idle * 1000:.1f} | {busy * 1000:.1f} | {busy / idle:.2f} |")
    lines += ["", "| system | resident memory MiB | a 1500-token prompt arrives while 3 stream: their longest "
              "stall ms | its first token ms |", "|---|---:|---:|---:|"]
    for name in servers:
        stall, first = arrival.get(name, (None, None))
        lines.append(f"| {name} | {memory[name]:.0f} | {fmt(stall, 1000)} | {fmt(first, 1000)} |")

    p1, p4 = rows["koboldlite --parallel 1"], rows["koboldlite --parallel 4"]
    ratios = [
        ("--parallel 4 / --parallel 1, aggregate at 4 clients (target >= 1.4)",
         p4[4]["aggregate"] / p1[4]["aggregate"]),
        ("--parallel 4 at 4 clients / raw batched loop at batch 4 (target >= 0.90)",
         p4[4]["aggregate"] / raw[4]),
        ("--parallel 4 / --parallel 1, single client (target >= 0.95)", p4[1]["aggregate"] / p1[1]["aggregate"]),
        ("--parallel 4: TTFT while 3 stream / idle TTFT (target < 2)",
         ttft["koboldlite --parallel 4"][1] / ttft["koboldlite --parallel 4"][0]),
        ("raw batched loop: batch 4 / batch 1", raw[4] / raw[1]),
        ("raw batched loop: batch 8 / batch 1", raw[8] / raw[1]),
    ]
    if "llama-server -np 4" in rows:
        peer = rows["llama-server -np 4"]
        ratios.append(("--parallel 4 / llama-server -np 4, aggregate at 4 clients (target >= 1)",
                       p4[4]["aggregate"] / peer[4]["aggregate"]))
        ratios.append(("--parallel 4 / llama-server -np 4, worst TTFT of 4 clients (target <= 1)",
                       p4[4]["ttft_p99"] / peer[4]["ttft_p99"]))
        ratios.append(("--parallel 4 / llama-server -np 4, resident memory", memory["koboldlite --parallel 4"]
                       / memory["llama-server -np 4"]))
    if "llama-cpp-python server" in rows:
        peer = rows["llama-cpp-python server"]
        ratios.append(("--parallel 4 / llama-cpp-python server, aggregate at 4 clients",
                       p4[4]["aggregate"] / peer[4]["aggregate"]))
    lines += ["", "| ratio | value |", "|---|---:|"] + [f"| {n} | {v:.2f} |" for n, v in ratios]
    report = "\n".join(lines)
    print(report)

    out = os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "parallel.md"), "w") as f:
        f.write("# Parallel benchmark\n\n" + report + "\n\nReproduce: `python3 -m pip install -r bench/requirements.txt"
                " && python3 bench/bench_parallel.py`\n\n![aggregate tokens/s](parallel.png)\n")
    chart(rows, os.path.join(out, "parallel.png"))


def quick(args, eos_bias: dict):
    """4 clients against KoboldLite --parallel 4 (shared pool, split pool, a context per slot) and
    llama-server -np 4 (its default split, and its unified pool: the like-for-like peer of the shared
    pool), interleaved round by round; each round's ratios to llama-server -np 4, since "every run" counts."""
    peer_name = "llama-server -np 4"
    if args.versus:
        peer_name = f"{os.path.basename(args.versus)} (--versus) --parallel 4"
    elif not os.access(args.llama_server, os.X_OK):
        sys.exit("--quick compares with llama-server: run bench/build_llama_server.sh first (or name another "
                 "program with --versus)")
    base = ["--model", args.model, "--contextsize", str(args.ctx), "--threads", str(args.threads),
            "--parallel", "4", "--multiuser", "16", "--quiet"]
    servers = {}
    try:
        servers["koboldlite --parallel 4"] = ServerProcess(base)
        servers["koboldlite --parallel 4 --kvsplit"] = ServerProcess(base + ["--kvsplit"])
        servers["koboldlite --parallel 4 --kvperslot"] = ServerProcess(base + ["--kvperslot"])
        if args.versus:
            for layout in ("", " --kvsplit", " --kvperslot"):
                servers[peer_name + layout] = versus_server(args.versus, base + layout.split())
        else:
            servers["llama-server -np 4"] = LlamaServer(args.llama_server, args.model, args.threads, args.ctx, 4)
            servers["llama-server -np 4 --kv-unified"] = LlamaServer(args.llama_server, args.model, args.threads,
                                                                     args.ctx, 4, unified=True)
        for server in servers.values():
            drive(server, 1, 16, eos_bias)   # warm-up
        runs = {name: [] for name in servers}
        for _ in range(args.repeat):
            for name, server in servers.items():
                runs[name].append(drive(server, 4, args.tokens, eos_bias))
        memory = {name: resident_mib(server) for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
    peer = runs[peer_name]
    lines = [f"Model {os.path.basename(args.model)}, 4 clients x {args.tokens} tokens, {args.threads} threads, "
             f"context {args.ctx}; OpenAI completion streams; {args.repeat} interleaved rounds.", "",
             "| system | round | aggregate tok/s | ratio | worst TTFT ms | ratio | resident MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, by_round in runs.items():
        for k, (r, p) in enumerate(zip(by_round, peer), 1):
            lines.append(f"| {name} | {k} | {r['aggregate']:.1f} | {r['aggregate'] / p['aggregate']:.3f} | "
                         f"{r['ttft_p99'] * 1000:.0f} | {r['ttft_p99'] / p['ttft_p99']:.2f} | {memory[name]:.0f} |")
    lines += ["", "| system | median aggregate ratio | worst TTFT ratio, worst round |", "|---|---:|---:|"]
    for name, by_round in runs.items():
        agg = statistics.median(r["aggregate"] / p["aggregate"] for r, p in zip(by_round, peer))
        ttft = max(r["ttft_p99"] / p["ttft_p99"] for r, p in zip(by_round, peer))
        lines.append(f"| {name} | {agg:.3f} | {ttft:.2f} |")
    results_file.publish("parallel-quick.md", ["# Parallel benchmark, quick (issue 15)", ""] + lines
                         + ["", "Reproduce: `bash bench/build_llama_server.sh && python3 bench/bench_parallel.py --quick`"])


def chart(rows: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    width = 0.8 / len(rows)
    for k, (name, by_clients) in enumerate(rows.items()):
        xs = [i + k * width for i in range(len(CLIENT_COUNTS))]
        bars = ax.bar(xs, [by_clients[c]["aggregate"] for c in CLIENT_COUNTS], width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(CLIENT_COUNTS))],
                  [f"{c} client{'s' if c > 1 else ''}" for c in CLIENT_COUNTS])
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title("Streaming throughput, SmolLM2-135M on 2 CPU cores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
