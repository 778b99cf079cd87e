"""The shared KV pool and the memory and speed options (issue 15), each read back from llama.cpp."""

from __future__ import annotations

import json
import re

import pytest

from conftest import in_thread, result_of


def memory(server) -> dict:
    return server.json("GET", "/props")["memory"]


def vm_locked_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmLck:"))


def test_parallel_slots_share_one_pool_by_default(make_server):
    shared = make_server("--contextsize", "8192", "--parallel", "4", tls=False)
    m = memory(shared)
    assert m["kv_cells"] == 8192 and m["kv_shared"] is True
    assert any(line.startswith("Memory: model ") and "8192 tokens shared by 4 slot(s)" in line
               and "compute buffers" in line for line in shared.lines)
    each = make_server("--contextsize", "8192", "--parallel", "4", "--kvperslot", tls=False)
    e = memory(each)
    assert e["kv_cells"] == 4 * 8192 and e["kv_shared"] is False
    assert e["kv_cache_mib"] == pytest.approx(4 * m["kv_cache_mib"], rel=0.02)
    # Each request may still use the whole context.
    assert shared.json("GET", "/api/extra/true_max_context_length")["value"] == 8192


def test_a_full_shared_pool_keeps_every_reply_going(make_server):
    s = make_server("--contextsize", "512", "--parallel", "4", tls=False)
    bodies = [{"prompt": f"Story {i}: " + "once upon a time " * 30, "max_tokens": 200, "ban_eos_token": True,
               "seed": i} for i in range(4)]
    results = [result_of(q, 300) for q in [in_thread(s.json, "POST", "/v1/completions", b) for b in bodies]]
    # 4 x 325 tokens lived in a 512-cell pool: each reply shifted its share and went on to its length.
    assert [r["usage"]["completion_tokens"] for r in results] == [200] * 4
    assert all(r["usage"]["truncated"] for r in results)
    # With shifting off, a reply that finds the pool full ends there instead.
    t = make_server("--contextsize", "512", "--parallel", "4", "--noshift", tls=False)
    results = [result_of(q, 300) for q in [in_thread(t.json, "POST", "/v1/completions", b) for b in bodies]]
    assert all(r["choices"][0]["finish_reason"] == "length" for r in results)
    assert min(r["usage"]["completion_tokens"] for r in results) < 200      # the full pool ended one early


def test_shared_pool_replies_keep_to_their_own_prompts(make_server):
    """In a shared pool a seed's text may differ beside others (see README), but no reply ever takes
    another's text: each of these greedy replies goes on with its own prompt's word."""
    s = make_server("--contextsize", "1024", "--parallel", "3", tls=False)
    themes = [("red, green, blue", {"red", "green", "blue", "yellow", "orange", "purple", "black", "white"}),
              ("north, south, east", {"north", "south", "east", "west"}),
              ("alpha, beta, gamma", {"alpha", "beta", "gamma", "delta", "epsilon"})]
    bodies = [{"prompt": f"The list: {(items + ', ') * 4}", "max_length": 40, "temperature": 0,
               "ban_eos_token": True} for items, _ in themes]
    texts = [result_of(q, 300)["results"][0]["text"]
             for q in [in_thread(s.json, "POST", "/api/v1/generate", b) for b in bodies]]
    following = 0
    for (_, own), text in zip(themes, texts):
        words = set(re.findall(r"[a-z]+", text.lower()))
        others = set().union(*(t for _, t in themes if t is not own))
        assert not words & others, (own, text)          # nothing of another reply's prompt
        following += bool(words & own)
    assert following >= 2, texts                         # and the replies do go on with their own lists


def test_flash_attention_and_quantized_kv(make_server):
    f16 = memory(make_server(tls=False))
    assert f16["kv_types"] == ["f16"] and f16["flash_attn"] == "auto"
    assert memory(make_server("--flashattention", tls=False))["flash_attn"] == "enabled"
    q8 = memory(make_server("--quantkv", "1", tls=False))
    assert q8["kv_types"] == ["q8_0"] and q8["flash_attn"] == "enabled"     # quantkv turns flash attention on
    assert q8["kv_cache_mib"] == pytest.approx(f16["kv_cache_mib"] * 8.5 / 16, rel=0.05)
    s = make_server("--quantkv", "2", tls=False)
    assert memory(s)["kv_types"] == ["q4_0"]
    assert s.json("POST", "/api/v1/generate", {"prompt": "Once upon a time", "max_length": 8})["results"][0]["text"]


def test_batch_size_mmap_mlock_and_gpu_layers(make_server, tmp_path):
    default = memory(make_server(tls=False))
    small = memory(make_server("--batchsize", "64", tls=False))
    assert default["n_batch"] == 512 and small["n_batch"] == 64 == small["n_ubatch"]
    assert small["compute_mib"] < default["compute_mib"]
    assert default["load_mode"] == "mmap"
    assert memory(make_server("--nommap", tls=False))["load_mode"] == "none"
    locked = make_server("--usemlock", tls=False)
    assert memory(locked)["load_mode"] == "mmap+mlock"
    assert vm_locked_kib(locked.proc.pid) * 1024 >= 0.9 * memory(locked)["model_mib"] * 2**20
    # -1 is every layer: accepted, and this CPU build has no GPU to put them on, so it still serves.
    gpu = make_server("--gpulayers", "-1", tls=False)
    assert gpu.json("POST", "/api/v1/generate", {"prompt": "Hi", "max_length": 2})["results"]
    # The same options from --config.
    cfg = tmp_path / "k.json"
    cfg.write_text(json.dumps({"flashattention": True, "quantkv": 1, "batchsize": 64, "nommap": True,
                               "kvperslot": True, "parallel": 2}))
    m = memory(make_server("--config", str(cfg), tls=False))
    assert (m["flash_attn"], m["kv_types"], m["n_batch"], m["load_mode"], m["kv_shared"]) == \
        ("enabled", ["q8_0"], 64, "none", False)
