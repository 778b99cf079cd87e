#!/usr/bin/env python3
"""Core benchmark: the server's single-stream speed against the raw llama.cpp loop,
and check/abort latency while a TLS stream runs.

    python3 bench/bench_core.py [--model FILE] [--tokens 400] [--runs 3]

Prints a table and writes it to bench/results/core.md. Targets (issue 2):
server >= 95% of raw tokens/s; check and abort p99 <= 20 ms.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from koboldlite.model_files import find_starter_model  # noqa: E402
from koboldlite.generation import SamplerSettings  # noqa: E402
from koboldlite.engine.llama_model import LlamaModel  # noqa: E402
from koboldlite.engine.samplers import SamplerChain  # noqa: E402
from tests.harness import (PIP_LLAMA_LIB, ServerProcess, SSEStream, kobold_event_json,  # noqa: E402
                           make_self_signed_cert)

PROMPT = "Write a long story about a lighthouse keeper and the sea."
SAMPLING = {"temperature": 0.75, "top_k": 100, "top_p": 0.92}


def raw_loop_tokens_per_second(model_path: str, n_tokens: int, threads: int) -> float:
    """llama.cpp's own decode loop, in-process: decode one token, sample, repeat. The limit."""
    model = LlamaModel(model_path, n_ctx=2048, n_seq=1, n_threads=threads, n_gpu_layers=0)
    lib = model.lib
    settings = SamplerSettings(ban_eos=True, **SAMPLING)
    sampler = SamplerChain(model, settings, seed=1)
    tokens = model.tokenize(PROMPT, add_bos=True)
    batch = lib.llama_batch_init(512, 0, 1)

    def decode(toks, pos0):
        batch.n_tokens = len(toks)
        for i, t in enumerate(toks):
            batch.token[i] = t
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(toks) - 1
        assert lib.llama_decode(model.ctx, batch) == 0

    decode(tokens, 0)
    pos = len(tokens)
    piece = ctypes.create_string_buffer(256)
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        t = lib.llama_sampler_sample(sampler.chain, model.ctx, -1)   # llama.cpp's own draw
        lib.llama_token_to_piece(model.vocab, t, piece, 256, 0, False)
        decode([t], pos)
        pos += 1
    elapsed = time.perf_counter() - t0
    sampler.free()
    lib.llama_batch_free(batch)
    lib.llama_free(model.ctx)
    lib.llama_model_free(model.model)
    return n_tokens / elapsed


def server_stream_tokens_per_second(server: ServerProcess, n_tokens: int) -> float:
    """Tokens/s a streaming client receives, first token to last (prompt time excluded, as in the raw loop)."""
    stream = SSEStream(server, "/api/extra/generate/stream",
                       {"prompt": PROMPT, "max_length": n_tokens, "ban_eos_token": True,
                        "sampler_seed": 1, **SAMPLING})
    first = last = None
    count = 0
    for event in stream.events():
        if kobold_event_json(event)["finish_reason"] is None:
            last = time.perf_counter()
            first = first or last
            count += 1
    return (count - 1) / (last - first)


def server_stream_minimal_reader(server: ServerProcess, n_tokens: int) -> float:
    """The same stream read by a client that only counts events: the server's own cost, without a
    parsing client's CPU taken from llama.cpp's threads on the same two cores."""
    body = json.dumps({"prompt": PROMPT, "max_length": n_tokens, "ban_eos_token": True, "sampler_seed": 1,
                       **SAMPLING}).encode()
    sock = server.raw_socket()
    sock.sendall(b"POST /api/extra/generate/stream HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: %d\r\n\r\n"
                 % (server.port, len(body)) + body)
    count, first, last = 0, None, None
    data = sock.recv(65536)
    if not data.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"the stream was refused: {data[:300]!r}")
    while data:
        events = data.count(b"\n\n")
        if events:
            last = time.perf_counter()
            first = first or last
            count += events
        data = sock.recv(65536)
    sock.close()
    return (count - 1) / (last - first)     # minus the final event


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def check_and_abort_latency(server: ServerProcess, n_checks: int, n_aborts: int) -> dict[str, list[float]]:
    long = {"prompt": PROMPT, "max_length": 1900, "ban_eos_token": True, **SAMPLING}
    out = {"check (new TLS connection)": [], "check (keep-alive)": [], "abort": []}
    stream = SSEStream(server, "/api/extra/generate/stream", {**long, "genkey": "BENCH-check"})
    kobold_event_json(stream.next_event())
    body = json.dumps({"genkey": "BENCH-check"}).encode()
    for _ in range(n_checks):
        t0 = time.perf_counter()
        server.request("POST", "/api/extra/generate/check", body)
        out["check (new TLS connection)"].append(time.perf_counter() - t0)
    conn = server.connection()
    for _ in range(n_checks):
        t0 = time.perf_counter()
        conn.request("POST", "/api/extra/generate/check", body=body, headers={"Content-Type": "application/json"})
        conn.getresponse().read()
        out["check (keep-alive)"].append(time.perf_counter() - t0)
    conn.close()
    server.request("POST", "/api/extra/abort", {"genkey": "BENCH-check"})
    list(stream.events())
    for i in range(n_aborts):
        key = f"BENCH-abort-{i}"
        stream = SSEStream(server, "/api/extra/generate/stream", {**long, "genkey": key})
        kobold_event_json(stream.next_event())
        t0 = time.perf_counter()
        status, _, reply = server.request("POST", "/api/extra/abort", {"genkey": key})
        out["abort"].append(time.perf_counter() - t0)   # answered once the generation has stopped
        assert json.loads(reply)["done"] == "true", reply
        list(stream.events())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=find_starter_model())
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--checks", type=int, default=200)
    ap.add_argument("--aborts", type=int, default=30)
    ap.add_argument("--versus", metavar="SCRIPT", help="also stream from this program (an earlier koboldlite.py, say)")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp()
    cert, key = make_self_signed_cert(tmp)
    common = ["--model", args.model, "--contextsize", "2048", "--threads", str(args.threads), "--quiet"]
    servers = {"HTTP": ServerProcess(common), "TLS": ServerProcess(common + ["--ssl", cert, key], cert=cert)}
    if args.versus:       # the same streams from another version of the program, interleaved with this one's
        servers[f"HTTP, {args.versus} (--versus)"] = ServerProcess(
            common + ["--port", "0"], command=[sys.executable, args.versus], env={"LLAMA_CPP_LIB_PATH": PIP_LLAMA_LIB})
    raw = []
    through = {f"{reader} over {name}": [] for name in servers
               for reader in ("event-counting client", "parsing Python client")}
    try:
        for _ in range(args.runs):      # interleaved, so drift in machine speed hits all alike
            raw.append(raw_loop_tokens_per_second(args.model, args.tokens, args.threads))
            for name, server in servers.items():
                through[f"event-counting client over {name}"].append(
                    server_stream_minimal_reader(server, args.tokens))
                through[f"parsing Python client over {name}"].append(
                    server_stream_tokens_per_second(server, args.tokens))
        latency = check_and_abort_latency(servers["TLS"], args.checks, args.aborts)
    finally:
        for s in servers.values():
            s.stop()

    raw_tps = statistics.median(raw)
    lines = [
        f"Model: {os.path.basename(args.model)}, {args.tokens} tokens a run, median of {args.runs} runs, "
        f"{args.threads} threads, {os.cpu_count()} cores.",
        "",
        "| loop | tokens/s | vs raw |",
        "|---|---:|---:|",
        f"| raw llama.cpp decode loop (in-process) | {raw_tps:.1f} | 100.0% |",
    ]
    for name, values in through.items():
        tps = statistics.median(values)
        lines.append(f"| koboldlite SSE stream, {name} | {tps:.1f} | {100 * tps / raw_tps:.1f}% |")
    lines += ["", "While a TLS stream runs:", "",
              "| request | n | p50 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|"]
    for name, values in latency.items():
        ms = [v * 1000 for v in values]
        lines.append(f"| {name} | {len(ms)} | {percentile(ms, 50):.2f} | {percentile(ms, 99):.2f} | {max(ms):.2f} |")
    report = "\n".join(lines)
    print(report)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "core.md"), "w") as f:
        f.write("# Core benchmark\n\n" + report + "\n\nReproduce: `python3 bench/bench_core.py`\n")


if __name__ == "__main__":
    main()
