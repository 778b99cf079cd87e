"""The package form: `python3 koboldlite.py`, the launcher over the koboldlite package, as a developer runs it. The
suite runs against the joined file that ships; this is the short subset that runs against the package too."""

from __future__ import annotations

import json
import sys

import pytest

from tests.harness import LAUNCHER, PIP_LLAMA_LIB, ServerProcess, SSEStream, kobold_event_json, openai_client_for


@pytest.fixture(scope="module")
def package_server(starter_model, tls_files):
    s = ServerProcess(["--port", "0", "--model", starter_model, "--ssl", *tls_files, "--contextsize", "1024",
                       "--parallel", "2"], cert=tls_files[0], command=[sys.executable, LAUNCHER],
                      env={"LLAMA_CPP_LIB_PATH": PIP_LLAMA_LIB})
    yield s
    s.stop()


def test_the_launcher_serves_the_page_and_the_kobold_api(package_server):
    s = package_server
    status, headers, body = s.request("GET", "/")
    assert status == 200 and b"<html" in body and headers["content-security-policy"]
    assert s.json("GET", "/api/extra/version")["result"] == "KoboldCpp"
    r = s.json("POST", "/api/v1/generate", {"prompt": "Once upon a time", "max_length": 6, "sampler_seed": 2})
    assert r["results"][0]["finish_reason"] in ("stop", "length") and r["results"][0]["text"]


def test_a_stream_is_checked_and_aborted_over_tls(package_server):
    s = package_server
    stream = SSEStream(s, "/api/extra/generate/stream", {"prompt": "A long story:", "max_length": 400,
                                                         "ban_eos_token": True, "genkey": "KCPP-pkg"})
    first = kobold_event_json(stream.next_event())["token"]
    seen = s.json("POST", "/api/extra/generate/check", {"genkey": "KCPP-pkg"})["results"][0]["text"]
    assert seen.startswith(first)
    assert s.json("POST", "/api/extra/abort", {"genkey": "KCPP-pkg"})["success"] == "true"
    events = [kobold_event_json(e) for e in stream.events()]
    assert events[-1]["finish_reason"] == "stop" and len(events) < 400


def test_openai_and_ollama_clients_chat(package_server):
    client = openai_client_for(package_server)
    chunks = list(client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=5, stream=True, seed=1))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    status, _, body = package_server.request("POST", "/api/chat", {
        "model": "any", "messages": [{"role": "user", "content": "Hi"}], "options": {"num_predict": 4}})
    lines = [json.loads(line) for line in body.splitlines()]
    assert status == 200 and lines[-1]["done"] is True
