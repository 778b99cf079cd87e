"""The one-file executable built from build_exe.spec, tested as a user runs it (issue 5)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.harness import ROOT, ServerProcess, SSEStream, kobold_event_json

NO_BROWSER = {"KOBOLDLITE_NO_BROWSER": "1"}


@pytest.fixture(scope="session")
def executable(tmp_path_factory) -> str:
    """Built once per run by the same script a user runs."""
    out = tmp_path_factory.mktemp("exe")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "build_exe.py"),
                    "--dist", str(out / "dist"), "--work", str(out / "work")], check=True, timeout=900)
    path = out / "dist" / ("koboldlite.exe" if os.name == "nt" else "koboldlite")
    assert path.is_file() and os.access(path, os.X_OK)
    return str(path)


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
