"""The one-file executable built from build_exe.spec, tested as a user runs it (issue 5)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess

from tests.harness import ServerProcess, SSEStream, kobold_event_json
from tests.test_cpu_variants import STARTUP_LINE, VARIANT_NEEDS, best_variants_for, cpu_flags

NO_BROWSER = {"KOBOLDLITE_NO_BROWSER": "1"}


def beside(executable: str, folder, **files) -> str:
    """A folder holding the executable (a hard link: it is large) and the given files."""
    folder.mkdir(exist_ok=True)
    exe = folder / os.path.basename(executable)
    os.link(executable, exe)
    for name, source in files.items():
        os.symlink(source, folder / name.replace("_", "."))
    return str(exe)


def stop_cleanly(s: ServerProcess):
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(60) == 0


def test_smoke_tls_generate_stream_and_sigterm(executable, tls_files):
    s = ServerProcess(["--port", "0", "--ssl", *tls_files], cert=tls_files[0], command=[executable])
    try:
        v = s.json("GET", "/api/extra/version")
        assert v["result"] == "KoboldCpp" and s.scheme == "https"
        assert "SmolLM2" in s.json("GET", "/api/v1/model")["result"]      # the bundled starter model
        r = s.json("POST", "/api/v1/generate", {"prompt": "Hello", "max_length": 8, "sampler_seed": 1})
        assert r["results"][0]["text"]
        stream = SSEStream(s, "/api/extra/generate/stream", {"prompt": "Hello", "max_length": 8})
        events = [kobold_event_json(e) for e in stream.events()]
        assert len(events) > 2 and events[-1]["finish_reason"] in ("stop", "length")
        assert s.request("GET", "/")[0] == 200                             # the page is inside too
    finally:
        stop_cleanly(s)


def test_sigterm_during_a_stream(executable):
    s = ServerProcess(["--port", "0"], command=[executable])
    stream = SSEStream(s, "/api/extra/generate/stream", {"prompt": "x", "max_length": 1500, "ban_eos_token": True})
    kobold_event_json(stream.next_event())
    s.proc.send_signal(signal.SIGTERM)
    assert [kobold_event_json(e) for e in stream.events()][-1]["finish_reason"] == "stop"
    assert s.proc.wait(60) == 0


def test_double_click_uses_the_model_beside_it(executable, starter_model, tmp_path):
    exe = beside(executable, tmp_path / "app", beside_gguf=starter_model)
    s = ServerProcess([], command=[exe], env=NO_BROWSER, cwd=str(tmp_path))
    try:
        assert s.json("GET", "/api/v1/model") == {"result": "koboldcpp/beside"}
        assert s.json("POST", "/api/v1/generate", {"prompt": "Hi", "max_length": 4})["results"]
    finally:
        stop_cleanly(s)


def test_double_click_falls_back_to_the_starter_model(executable, tmp_path):
    exe = beside(executable, tmp_path / "empty")
    s = ServerProcess([], command=[exe], env=NO_BROWSER)
    try:
        assert "SmolLM2" in s.json("GET", "/api/v1/model")["result"]
    finally:
        stop_cleanly(s)


def test_double_click_reads_koboldlite_json(executable, starter_model, tmp_path):
    folder = tmp_path / "configured"
    exe = beside(executable, folder, one_gguf=starter_model, two_gguf=starter_model)
    (folder / "koboldlite.json").write_text(json.dumps({"model": str(folder / "two.gguf"), "port": 0,
                                                       "contextsize": 512}))
    s = ServerProcess([], command=[exe], env=NO_BROWSER)
    try:
        assert s.json("GET", "/api/v1/model") == {"result": "koboldcpp/two"}
        assert s.json("GET", "/api/extra/true_max_context_length") == {"value": 512}
        assert any("koboldlite.json" in line for line in s.lines)
    finally:
        stop_cleanly(s)


def test_double_click_fatal_error_is_shown(executable, tmp_path):
    folder = tmp_path / "broken"
    exe = beside(executable, folder)
    (folder / "koboldlite.json").write_text(json.dumps({"model": "/nowhere/model.gguf"}))
    p = subprocess.run([exe], capture_output=True, text=True, timeout=120, env={**os.environ, **NO_BROWSER},
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 2
    assert "model file not found: /nowhere/model.gguf" in p.stderr


def test_command_line_errors_match_the_script(executable):
    p = subprocess.run([executable, "--port", "99999"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip() == "koboldlite: error: port must be between 0 and 65535, not 99999"


def bundled_files(executable: str) -> list[str]:
    """The names inside the one-file archive, as it unpacks them."""
    from PyInstaller.archive.readers import CArchiveReader
    return list(CArchiveReader(executable).toc)


def test_the_executable_carries_every_cpu_variant_and_loads_the_best(executable):
    inside = bundled_files(executable)
    variants = {re.sub(r"^llama_cpp/lib/libggml-cpu-|\.so$", "", n) for n in inside
                if n.startswith("llama_cpp/lib/libggml-cpu-")}
    assert variants == set(VARIANT_NEEDS)
    assert "llama_cpp/lib/libggml-vulkan.so" in inside and "llama_cpp/lib/libmtmd.so" in inside
    s = ServerProcess(["--port", "0", "--contextsize", "256"], command=[executable])
    try:
        line = s.wait_for_line(STARTUP_LINE)
        assert line.group(1) in best_variants_for(cpu_flags(), variants), line.string
        assert "/llama_cpp/lib/libggml-cpu-" in line.string      # from inside the bundle, not pip's
    finally:
        stop_cleanly(s)
