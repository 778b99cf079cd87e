"""GPUs (issue 23), on a real Vulkan driver: Mesa's lavapipe, which runs on the CPU. tests/install.sh builds
llama.cpp's Vulkan backend from the source llama-cpp-python vendors (tools/build_llama_lib.sh vulkan) into
.llama-vulkan/lib, beside pip's CPU build. lavapipe is slow: replies here are a few tokens long.

On a machine with a real GPU the same tests run against another build: KOBOLDLITE_TEST_GPU_LIB names its folder
(bench/gpu_check.sh does this with a CUDA build); the lavapipe-only ones are then skipped. A CUDA build on 2 cores
takes far too long for every CI run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from koboldlite.engine.gguf_layout import GGUFLayout
from koboldlite.engine.gpu import FIT_FREE_CAP_ENV
from tests.harness import (PIP_LLAMA_LIB, ROOT, SCRIPT, ServerProcess, WatchedProcess, copy_of_program, in_thread,
                           result_of)

VULKAN_LIB = os.path.join(ROOT, ".llama-vulkan", "lib")
GPU_LIB = os.environ.get("KOBOLDLITE_TEST_GPU_LIB") or VULKAN_LIB
ON_LAVAPIPE = GPU_LIB == VULKAN_LIB
DEVICE = "CUDA0" if "cuda" in GPU_LIB.lower() else "Vulkan0"
# ggml's Vulkan backend skips CPU-type devices unless they are named: lavapipe is device 0 here.
LAVAPIPE = {"LLAMA_CPP_LIB_PATH": GPU_LIB, **({"GGML_VK_VISIBLE_DEVICES": "0"} if ON_LAVAPIPE else {})}
GPU_SLOW = 600            # seconds a request may take on lavapipe
N_LAYERS = 31             # the starter model: 30 blocks and the output layer

pytestmark = pytest.mark.skipif(not os.path.isdir(GPU_LIB), reason="no GPU build: run tests/install.sh")
lavapipe_only = pytest.mark.skipif(not ON_LAVAPIPE, reason="about lavapipe and the Vulkan build")


def vulkan_server(starter_model, *args, env=None):
    return ServerProcess(["--model", starter_model, "--contextsize", "512", "--threads", "1", *args],
                         env={**LAVAPIPE, **(env or {})})


def gpu_of(server) -> dict:
    return server.json("GET", "/props")["gpu"]


def generate(server, prompt: str, n: int, **extra) -> dict:
    status, _, body = server.request("POST", "/api/v1/generate", {"prompt": prompt, "max_length": n,
                                                                  "top_k": 1, **extra}, timeout=GPU_SLOW)
    assert status == 200, body
    return json.loads(body)["results"][0]


def greedy_tokens(server, prompt: str, n: int) -> list[str]:
    out = server.json("POST", "/v1/completions", {"prompt": prompt, "max_tokens": n, "temperature": 0,
                                                  "logprobs": 1})
    return out["choices"][0]["logprobs"]["tokens"]


@pytest.fixture(scope="module")
def full(starter_model):
    s = vulkan_server(starter_model, "--gpulayers", "-1")
    yield s
    s.stop()


def test_every_layer_on_lavapipe(full):
    line = next(l for l in full.lines if l.startswith(f"GPU: {DEVICE}"))
    assert "MiB free" in line and ("llvmpipe" in line or not ON_LAVAPIPE)
    m = full.wait_for_line(r"^GPU: offloaded (\d+)/(\d+) layers; (.*)")
    assert int(m.group(1)) == int(m.group(2)) == 31          # llama.cpp's own count: 30 blocks and the output
    gpu = gpu_of(full)
    assert DEVICE.rstrip("0") in gpu["backends"]
    assert gpu["layers_offloaded"] == gpu["layers_total"] == 31
    vk = gpu["buffers_mib"][DEVICE]
    assert vk["model"] > 50 and vk["kv"] > 0 and vk["compute"] > 0, gpu["buffers_mib"]
    assert gpu["vram_mib"] == pytest.approx(vk["model"] + vk["kv"] + vk["compute"], abs=0.1)
    assert full.json("GET", "/api/extra/perf")["gpu"]["layers_offloaded"] == 31
    ps = full.json("GET", "/api/ps")["models"][0]
    assert ps["size_vram"] == int(gpu["vram_mib"] * 2**20) > 0
    assert generate(full, "Hello", 3)["text"]


def test_a_reply_on_vulkan_against_the_cpu(full, starter_model):
    """The same greedy reply on the Vulkan device and on the CPU build: how far they agree is printed, and the
    first tokens must match (both compute the same model; only rounding differs)."""
    cpu = ServerProcess(["--model", starter_model, "--contextsize", "512", "--threads", "1"])
    try:
        prompt = "The capital of France is"
        gpu_text = greedy_tokens(full, prompt, 8)
        cpu_text = greedy_tokens(cpu, prompt, 8)
    finally:
        cpu.stop()
    agree = next((i for i, (a, b) in enumerate(zip(gpu_text, cpu_text)) if a != b), min(len(gpu_text), len(cpu_text)))
    print(f"greedy reply, Vulkan (lavapipe) against CPU: {agree} of {len(cpu_text)} tokens agree: "
          f"{''.join(gpu_text)!r} / {''.join(cpu_text)!r}")
    assert agree >= 2, (gpu_text, cpu_text)


def test_automatic_offload_fits_the_free_memory(starter_model):
    s = vulkan_server(starter_model)
    try:
        gpu = gpu_of(s)
        fit, device = gpu["fit"], gpu["devices"][0]
        assert gpu["auto"] and fit["free_mib"] == device["free_mib"]
        assert fit["planned_mib"] <= fit["budget_mib"] <= fit["free_mib"]
        assert fit["layers"] == gpu["layers_offloaded"] == 31       # plenty of room: all of it
    finally:
        s.stop()
    # The fit sees less free memory: fewer layers, as many as that much holds, and llama.cpp puts them there.
    layout = GGUFLayout(starter_model)
    capped = vulkan_server(starter_model, env={FIT_FREE_CAP_ENV: "680"})
    try:
        gpu = gpu_of(capped)
        fit = gpu["fit"]
        assert 0 < fit["layers"] < 31 and gpu["layers_offloaded"] == fit["layers"]
        weights = sum(layout.layer_bytes[i] for i in range(30 - fit["layers"], 30))
        assert fit["planned_bytes"] == weights + fit["layers"] * fit["kv_bytes_per_layer"] <= fit["budget_bytes"]
        one_more = layout.layer_bytes[30 - fit["layers"] - 1] + fit["kv_bytes_per_layer"]
        assert fit["planned_bytes"] + one_more > fit["budget_bytes"]                   # the next would not fit
        assert any(re.match(rf"GPU: {fit['layers']} of 31 layers .* fit in 680 MiB free", l) for l in capped.lines)
        assert generate(capped, "Hello", 2)["text"] is not None
    finally:
        capped.stop()


@lavapipe_only
def test_no_usable_vulkan_device_runs_on_the_cpu(starter_model):
    s = vulkan_server(starter_model, env={"VK_ICD_FILENAMES": "/nonexistent/icd.json",
                                          "VK_DRIVER_FILES": "/nonexistent/icd.json"})
    try:
        # The Vulkan module loads but no driver answers: one line says so, with the reason.
        assert sum(l == "GPU: the vulkan backend is not in use (no driver answered): running on the CPU"
                   for l in s.lines) == 1, s.lines
        assert not any("found no usable device" in l for l in s.lines)     # said once, not twice
        assert gpu_of(s)["layers_offloaded"] == 0
        assert generate(s, "Hello", 3)["text"]
    finally:
        s.stop()
    # Asking for the device then is a clear start-up error, not a crash.
    p = WatchedProcess([sys.executable, SCRIPT, "--model", starter_model, "--port", "0", "--usevulkan"],
                       env={**LAVAPIPE, "VK_ICD_FILENAMES": "/nonexistent/icd.json",
                            "VK_DRIVER_FILES": "/nonexistent/icd.json"})
    p.wait_for_line(r"koboldlite: error: the Vulkan backend found no usable device")
    assert p.proc.wait(60) == 2


def test_device_options(starter_model):
    choose = "--usevulkan" if DEVICE.startswith("Vulkan") else "--usecuda"
    s = vulkan_server(starter_model, choose, "0", "--maingpu", "0", "--gpulayers", "10")
    try:
        gpu = gpu_of(s)
        assert [d["name"] for d in gpu["devices"]] == [DEVICE] and gpu["layers_offloaded"] == 10
    finally:
        s.stop()
    other = "--usecuda" if choose == "--usevulkan" else "--usevulkan"
    for args, error in (([choose, "3"], rf"no {DEVICE[:-1]} device 3: the devices are 0 {DEVICE}"),
                        ([other], rf"this llama.cpp build has no {'CUDA' if other == '--usecuda' else 'Vulkan'} backend")):
        p = WatchedProcess([sys.executable, SCRIPT, "--model", starter_model, "--port", "0", *args], env=LAVAPIPE)
        p.wait_for_line(error)
        assert p.proc.wait(60) == 2
    # On pip's CPU build, a device option names the GPU build command.
    p = WatchedProcess([sys.executable, SCRIPT, "--model", starter_model, "--port", "0", "--usevulkan"],
                       env={"LLAMA_CPP_LIB_PATH": PIP_LLAMA_LIB})
    p.wait_for_line(r"--usevulkan: this llama.cpp build runs on the CPU only; .*tools/build_llama_lib\.sh vulkan")
    assert p.proc.wait(60) == 2


@lavapipe_only
def test_the_gpu_build_beside_the_script_is_found(starter_model, tmp_path):
    """What the GPU install command leaves (.llama-vulkan/lib beside koboldlite.py) is used with no variable set,
    whatever pip's cache gave back as llama-cpp-python: the GPU command never goes through pip's wheel cache.
    The program under test is placed in a folder of its own, the GPU build beside it, as a user's would be."""
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    env["GGML_VK_VISIBLE_DEVICES"] = "0"
    script = copy_of_program(str(tmp_path / "program"))
    os.symlink(os.path.join(ROOT, ".llama-vulkan"), tmp_path / "program" / ".llama-vulkan")
    p = WatchedProcess([sys.executable, script, "--model", starter_model, "--port", "0", "--contextsize", "256",
                        "--gpulayers", "-1"], env=env)
    try:
        p.wait_for_line(r"^GPU: offloaded 31/31 layers", timeout=120)
    finally:
        p.stop()


def test_parallel_slots_and_context_shift_on_the_device(starter_model):
    s = vulkan_server(starter_model, "--gpulayers", "-1", "--parallel", "4", "--contextsize", "192")
    try:
        replies = [in_thread(generate, s, f"Story {i}: once upon a time", 3) for i in range(4)]
        assert all(result_of(q, GPU_SLOW)["text"] is not None for q in replies)
        # A reply that fills the context shifts it and goes on, on the device.
        long_prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 16)
        status, _, body = s.request("POST", "/v1/completions", {"prompt": long_prompt, "max_tokens": 40,
                                                                "temperature": 0, "ban_eos_token": True},
                                    timeout=GPU_SLOW)
        assert status == 200, body
        usage = json.loads(body)["usage"]
        assert usage["prompt_tokens"] + 40 > 192 and usage["completion_tokens"] == 40 and usage["truncated"]
        assert s.json("GET", "/api/extra/perf")["last_shifted_count"] > 0
    finally:
        s.stop()


def test_gguf_layout_matches_what_llama_cpp_loads(starter_model, full):
    layout = GGUFLayout(starter_model)
    assert layout.n_layer == 30 and sorted(layout.layer_bytes) == list(range(30)) and layout.n_vocab == 49152
    vk = gpu_of(full)["buffers_mib"][DEVICE]["model"]
    on_file = (sum(layout.layer_bytes.values()) + layout.other_bytes) / 2**20
    assert abs(vk - on_file) / on_file < 0.05, (vk, on_file)


@lavapipe_only
def test_the_executable_offloads_everything_to_a_vulkan_device(executable):
    """The one executable (every CPU variant and the Vulkan backend) on lavapipe."""
    exe = executable
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    smoke = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "smoke_exe.py"), str(exe), "--full-offload"],
                           env={**env, "GGML_VK_VISIBLE_DEVICES": "0", "KOBOLDLITE_NO_BROWSER": "1"},
                           capture_output=True, text=True, timeout=1800)
    assert smoke.returncode == 0, smoke.stdout[-3000:] + smoke.stderr[-2000:]
    assert "31/31 layers on the GPU" in smoke.stdout


@lavapipe_only
def test_the_cuda_build_command_names_what_is_missing(tmp_path):
    bare = {**os.environ, "PATH": "/usr/bin:/bin"}
    r = subprocess.run(["bash", os.path.join(ROOT, "tools", "build_llama_lib.sh"), "cuda", str(tmp_path / "out")],
                       env=bare, capture_output=True, text=True, timeout=600)
    if r.returncode == 0:
        pytest.fail("built CUDA without nvcc on PATH?")
    assert r.returncode == 2 and "nvcc is missing" in r.stderr


def test_the_cuda_build_command_names_a_missing_cublas(tmp_path):
    """nvcc alone is not enough (this machine's CUDA 13 has no cuBLAS): the command says so before any download."""
    import glob
    if glob.glob("/usr/local/cuda*/include/cublas_v2.h") + glob.glob("/usr/local/cuda*/targets/*/include/cublas_v2.h") \
            + glob.glob("/usr/include/cublas_v2.h"):
        pytest.skip("a CUDA toolkit with cuBLAS is installed here")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvcc").write_text("#!/bin/sh\nexit 0\n")
    (fake / "nvcc").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_HOME"}
    env["PATH"] = f"{fake}:{env['PATH']}"
    r = subprocess.run(["bash", os.path.join(ROOT, "tools", "build_llama_lib.sh"), "cuda", str(tmp_path / "out")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "cuBLAS is missing" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


@pytest.mark.skipif(not os.environ.get("KOBOLDLITE_TEST_CUDA_LIB"), reason="set KOBOLDLITE_TEST_CUDA_LIB to a CUDA build")
def test_cuda_build_runs_on_the_cpu_without_a_driver(starter_model):
    s = ServerProcess(["--model", starter_model, "--contextsize", "256"],
                      env={"LLAMA_CPP_LIB_PATH": os.environ["KOBOLDLITE_TEST_CUDA_LIB"]})
    try:
        gpu = gpu_of(s)
        if not gpu["devices"]:          # no NVIDIA driver here: the CPU module runs it
            assert "CUDA" not in gpu["backends"] or gpu["layers_offloaded"] == 0
        assert generate(s, "Hello", 3)["text"] is not None
    finally:
        s.stop()
