"""Several models by name (issue 25): a models folder with SmolLM2 and Gemma 3 270M, load on demand, swaps that
never touch a running stream, keep_alive and idle unload, KoboldCpp's admin switch, and downloads that resume
and are checked, from a real HTTP server on loopback, through the official `ollama` client."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import sys
import threading

import pytest

from koboldlite.errors import ConfigError, RequestError
from koboldlite.model_files import scan_model_folder
from koboldlite.config import Config, PRESETS_FILE, load_config, read_presets
from koboldlite.fields import FieldReader
from koboldlite.service.catalog import ModelCatalog
from koboldlite.service.roster import ModelRoster
from koboldlite.api.ollama import keep_alive_of
from tests.harness import SSEStream, ServerProcess, in_thread, openai_client_for, result_of

GREEDY = {"seed": 3, "top_k": 1}
HI = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, starter_model, gemma_model) -> str:
    """smollm.gguf and gemma.gguf (links to the real files), a projector and a half-done download that are not
    models, and a presets file."""
    d = tmp_path_factory.mktemp("models")
    os.symlink(starter_model, d / "smollm.gguf")
    os.symlink(gemma_model, d / "gemma.gguf")
    (d / "mmproj-smollm-f16.gguf").write_bytes(b"GGUF" + bytes(60))
    (d / "other.gguf.part").write_bytes(b"GGUF")
    (d / PRESETS_FILE).write_text(json.dumps({
        "gemma": {"contextsize": 1024, "aliases": ["small-gemma"], "chat_template": "gemma"},
        "smollm": {"contextsize": 1024, "parallel": 2}}))
    return str(d)


def start(folder: str, *args: str) -> ServerProcess:
    return ServerProcess(["--model", os.path.join(folder, "smollm.gguf"), "--modeldir", folder, *args])


def rss_bytes(server: ServerProcess) -> int:
    with open(f"/proc/{server.proc.pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024


def states(server) -> dict[str, str]:
    return {m["id"]: m["status"]["value"] for m in server.json("GET", "/v1/models")["data"]}


# -- the catalog, without a server ----------------------------------------------------------------------------

def test_folder_names_split_models_and_what_is_not_a_model(tmp_path):
    for name in ["big-00001-of-00002.gguf", "big-00002-of-00002.gguf", "orphan-00002-of-00002.gguf",
                 "mmproj-big.gguf", "Tiny.Q4_K_M.gguf", "half.gguf.part", "notes.txt"]:
        (tmp_path / name).write_bytes(b"GGUF")
    (tmp_path / "sub.gguf").mkdir()
    found = scan_model_folder(str(tmp_path))
    assert sorted(found) == ["Tiny.Q4_K_M", "big"]
    assert [os.path.basename(p) for p in found["big"]] == ["big-00001-of-00002.gguf", "big-00002-of-00002.gguf"]
    config = load_config(["--modeldir", str(tmp_path), "--model", str(tmp_path / "Tiny.Q4_K_M.gguf")])
    catalog = ModelCatalog(config)
    assert [e.name for e in catalog.entries()] == ["Tiny.Q4_K_M", "big"]      # the default first
    assert catalog.find("big").path.endswith("big-00001-of-00002.gguf") and catalog.find("big").size_bytes == 8
    for same in ["big", "BIG", "big.gguf", "big:latest", "koboldcpp/big"]:
        assert catalog.find(same).name == "big", same
    for bad in ["../big", "x/big", "/big", "..", "nothing"]:
        assert catalog.find(bad) is None, bad
    assert catalog.find(None).name == catalog.find("").name == "Tiny.Q4_K_M"
    (tmp_path / "late.gguf").write_bytes(b"GGUF")         # copied in after start: found when named
    assert catalog.find("late").name == "late"


def test_presets_are_checked_as_options_are(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    presets = tmp_path / PRESETS_FILE
    for bad, words in [({"m": {"contextsize": 3}}, "contextsize must be between"),
                       ({"m": {"gpulayer": 1}}, "unknown option 'gpulayer'"),
                       ({"m": {"aliases": "x"}}, "aliases must be a list"),
                       ({"m": {"chat_template": "nope.jinja"}}, "neither"),
                       (["m"], "must map model names")]:
        presets.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=words):
            read_presets(str(tmp_path))
    presets.write_text(json.dumps({"m": {"contextsize": 512, "aliases": ["fast"], "quantkv": 1}}))
    config = load_config(["--modeldir", str(tmp_path)])
    entry = ModelCatalog(config).find("fast")
    assert entry.name == "m" and entry.config(config).contextsize == 512 and entry.config(config).flashattention
    assert config.model == str(tmp_path / "m.gguf")      # a folder alone: its first model is the default


def test_keep_alive_durations():
    read = lambda v: keep_alive_of(FieldReader({"keep_alive": v}))  # noqa: E731
    assert [read(v) for v in (0, "0", 30, "5m", "1h30m", "-1", "-1m", "1.5s", "250ms")] == \
        [0, 0, 30, 300, 5400, -1, -60, 1.5, 0.25]
    assert keep_alive_of(FieldReader({})) is None
    for bad in ("soon", "5 m", [], True):
        with pytest.raises(RequestError):
            read(bad)


def test_room_is_made_from_idle_models_only(monkeypatch):
    """Which loaded models go for a new one: the least recently used idle ones, for a seat or for memory."""
    from types import SimpleNamespace as NS
    config = Config(maxmodels=2)
    roster = ModelRoster(None, config, lambda line: None, lambda job: None)
    gib = 1 << 30

    def loaded(name, used, busy=False):
        return NS(name=name, last_used=used, leases=int(busy), jobs=0, unloading=False, entry=NS(size_bytes=gib))
    new = NS(estimated_bytes=lambda config: gib)
    monkeypatch.setattr(sys.modules[ModelRoster.__module__], "available_memory", lambda: 8 * gib)
    roster.loaded = {"a": loaded("a", 2.0), "b": loaded("b", 1.0)}
    assert [v.name for v in roster._make_room(new)] == ["b"]          # the seat of the least recently used
    roster.loaded["b"].leases = 1
    assert [v.name for v in roster._make_room(new)] == ["a"]
    roster.loaded["a"].jobs = 1                                        # a job running without its request
    assert roster._make_room(new) is None                              # every seat in use: wait
    config.maxmodels = 3
    assert roster._make_room(new) == []                                # a free seat, memory enough
    roster.loaded["a"].jobs = 0
    monkeypatch.setattr(sys.modules[ModelRoster.__module__], "available_memory", lambda: gib // 2)
    assert [v.name for v in roster._make_room(new)] == ["a"]          # short of memory: idle ones go
    roster.loaded["a"].leases = 1
    assert roster._make_room(new) == []                                # never one in use: try anyway
    roster.loaded = {}
    roster.stop()


# -- two models loaded at once ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two(folder):
    s = start(folder, "--maxmodels", "2")
    yield s
    s.stop()


def test_every_listing_shows_every_model_with_its_state(two):
    data = two.json("GET", "/v1/models")["data"]
    assert [m["id"] for m in data][0] == "smollm" and {m["id"] for m in data} == {"smollm", "gemma"}
    gemma = next(m for m in data if m["id"] == "gemma")
    assert gemma["aliases"] == ["small-gemma"] and gemma["context_length"] == 1024 and gemma["size"] > 10**8
    assert {m["name"] for m in two.json("GET", "/api/tags")["models"]} == {"smollm", "gemma"}
    assert next(m for m in two.json("GET", "/api/tags")["models"] if m["name"] == "gemma")["details"]["family"] \
        == "gemma3"
    props = {m["name"]: m for m in two.json("GET", "/props")["models"]}
    assert props["smollm"]["state"] == "loaded" and props["smollm"]["default"] and props["smollm"]["context"] == 1024
    version = two.json("GET", "/api/extra/version")
    assert version["router"] is True and version["admin"] == 0


def test_requests_by_name_reach_their_model_on_every_api(two):
    import anthropic
    client = openai_client_for(two)
    chat = client.chat.completions.create(model="gemma", messages=HI, max_tokens=6, extra_body=GREEDY)
    assert chat.model == "gemma"
    mark = two.mark()
    assert client.chat.completions.create(model="smollm", messages=HI, max_tokens=4).model == "smollm"
    two.wait_for_line(r"job \d+ ended: .*model smollm$", start=mark)
    # The template of each: Gemma's turns, SmolLM2's ChatML.
    assert "<start_of_turn>user" in two.json("POST", "/apply-template", {"model": "gemma", "messages": HI})["prompt"]
    assert "<|im_start|>user" in two.json("POST", "/apply-template", {"model": "smollm", "messages": HI})["prompt"]
    ollama = two.json("POST", "/api/chat", {"model": "small-gemma:latest", "messages": HI, "stream": False,
                                            "options": {"num_predict": 4}})
    assert ollama["model"] == "gemma"
    message = anthropic.Anthropic(base_url=two.base, api_key="k", max_retries=0).messages.create(
        model="gemma", max_tokens=4, messages=HI)
    assert message.model == "gemma"
    assert client.responses.create(model="smollm", input="Hi", max_output_tokens=4).model == "smollm"
    assert two.json("POST", "/tokenize", {"model": "gemma", "content": "hello"})["tokens"] != \
        two.json("POST", "/tokenize", {"model": "smollm", "content": "hello"})["tokens"]     # two vocabularies
    assert sorted(m["name"] for m in two.json("GET", "/api/ps")["models"]) == ["gemma", "smollm"]   # both stay


def test_unknown_names_are_404_in_each_apis_shape(two):
    for name in ["nope", "../smollm", "/etc/passwd"]:
        status, _, body = two.request("POST", "/v1/chat/completions", {"model": name, "messages": HI})
        assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found", body
        status, _, body = two.request("POST", "/api/chat", {"model": name, "messages": HI})
        assert status == 404 and json.loads(body) == {"error": f'model "{name}" not found, try pulling it first'}
        status, _, body = two.request("POST", "/v1/messages", {"model": name, "max_tokens": 2, "messages": HI})
        assert status == 404 and json.loads(body)["error"]["type"] == "not_found_error"
        status, _, body = two.request("POST", "/v1/responses", {"model": name, "input": "x"})
        assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found"
        status, _, _ = two.request("POST", "/api/show", {"model": name})
        assert status == 404
    # No name means the default model.
    assert two.json("POST", "/v1/chat/completions", {"messages": HI, "max_tokens": 2})["model"] == "smollm"


def test_keep_alive_zero_unloads_and_gives_the_memory_back(two):
    two.json("POST", "/api/generate", {"model": "gemma", "prompt": "Hi", "stream": False,
                                       "options": {"num_predict": 8}})
    assert "gemma" in {m["name"] for m in two.json("GET", "/api/ps")["models"]}
    before = rss_bytes(two)
    mark = two.mark()
    answer = two.json("POST", "/api/generate", {"model": "gemma", "prompt": "", "keep_alive": 0})
    assert answer["done_reason"] == "unload"
    two.wait_for_line(r"model gemma unloaded \(keep_alive 0\) in [\d.]+ s: \d+ MiB freed", start=mark)
    assert [m["name"] for m in two.json("GET", "/api/ps")["models"]] == ["smollm"]
    assert states(two)["gemma"] == "unloaded"
    assert before - rss_bytes(two) > 100 * 2**20         # its weights (mapped, read by the reply) and caches
    # A request with keep_alive 0 unloads when it ends; the next one that names it loads it again.
    mark = two.mark()
    two.json("POST", "/api/chat", {"model": "gemma", "messages": HI, "stream": False, "keep_alive": "0s",
                                   "options": {"num_predict": 2}})
    two.wait_for_line(r"model gemma loaded in", start=mark)
    two.wait_for_line(r"model gemma unloaded \(keep_alive 0\)", start=mark)
    # A duration: /api/ps says when it expires.
    two.json("POST", "/api/generate", {"model": "gemma", "prompt": "", "keep_alive": "1h"})
    expires = next(m for m in two.json("GET", "/api/ps")["models"] if m["name"] == "gemma")["expires_at"]
    assert not expires.startswith("9999")
    perf = two.json("GET", "/api/extra/perf")
    assert {"load", "unload"} <= {e["event"] for e in perf["model_events"] if e["model"] == "gemma"}
    assert all(e["seconds"] >= 0 and e["mib"] > 0 for e in perf["model_events"])


# -- one seat: swaps ----------------------------------------------------------------------------------------

def test_a_swap_waits_for_the_running_stream_and_leaves_it_unchanged(folder):
    s = start(folder)
    try:
        ask = {"model": "smollm", "prompt": "Once upon a time", "max_tokens": 40, **GREEDY}
        reference = s.json("POST", "/v1/completions", ask)["choices"][0]["text"]
        mark = s.mark()
        stream = SSEStream(s, "/v1/completions", {**ask, "stream": True})
        first = stream.next_event()
        other = in_thread(s.json, "POST", "/v1/chat/completions", {"model": "gemma", "messages": HI, "max_tokens": 4})
        text = json.loads(first[6:])["choices"][0]["text"]
        for event in stream.events():
            if event.startswith(b"data: {"):
                text += json.loads(event[6:])["choices"][0]["text"]
        assert text == reference
        assert result_of(other)["model"] == "gemma"
        ended = s.wait_for_line(r"job \d+ ended: .*model smollm$", start=mark)
        unloaded = s.wait_for_line(r"model smollm unloaded \(to make room for gemma\)", start=mark)
        lines = s.lines[mark:]
        assert lines.index(ended.string) < lines.index(unloaded.string)
        assert [m["name"] for m in s.json("GET", "/api/ps")["models"]] == ["gemma"]
        # The Kobold API's model is the default: it swaps back.
        mark = s.mark()
        result = s.json("POST", "/api/v1/generate", {"prompt": "Hello", "max_length": 4})
        assert result["results"][0]["text"]
        s.wait_for_line(r"model smollm loaded in", start=mark)
        assert states(s) == {"smollm": "loaded", "gemma": "unloaded"}
    finally:
        s.stop()


def test_idle_unload_and_the_next_request_loads_again(folder):
    s = start(folder, "--idleunload", "1")
    try:
        s.wait_for_line(r"model smollm unloaded \(idle 1 s\)", timeout=60)
        assert states(s)["smollm"] == "unloaded"
        assert s.json("GET", "/api/v1/model")["result"] == "koboldcpp/smollm"      # no load for that
        assert s.json("GET", "/api/extra/generate/check")["results"] == [{"text": ""}]
        mark = s.mark()
        assert s.json("POST", "/api/v1/generate", {"prompt": "Hi", "max_length": 3})["results"][0]["text"]
        s.wait_for_line(r"model smollm loaded in", start=mark)
        s.wait_for_line(r"model smollm unloaded \(idle 1 s\)", start=mark, timeout=60)
    finally:
        s.stop()


# -- KoboldCpp's admin API -------------------------------------------------------------------------------------

def test_admin_switches_the_kobold_apis_model_and_stays_in_its_folder(folder, starter_model):
    s = start(folder, "--admin", "--password", "user", "--adminpassword", "boss")
    admin = {"Authorization": "Bearer boss"}
    try:
        assert s.json("GET", "/api/extra/version")["admin"] == 1
        assert s.request("GET", "/api/admin/list_options", headers={"Authorization": "Bearer user"})[0] == 401
        options = s.json("GET", "/api/admin/list_options", headers=admin)
        assert options == ["gemma.gguf", "smollm.gguf", "unload_model", "initial_model"]
        for bad in ["../gemma.gguf", os.path.join(folder, "gemma.gguf"), "/etc/passwd", "sub/../../x.gguf"]:
            status, _, body = s.request("POST", "/api/admin/reload_config", {"filename": bad}, headers=admin)
            assert status == 403, (bad, body)
        assert s.request("POST", "/api/admin/reload_config", {"filename": "none.gguf"}, headers=admin)[0] == 404
        mark = s.mark()
        assert s.json("POST", "/api/admin/reload_config", {"filename": "gemma.gguf"}, headers=admin) == \
            {"success": True}
        assert s.json("GET", "/api/v1/model", headers={"Authorization": "Bearer user"})["result"] == "koboldcpp/gemma"
        assert s.json("POST", "/api/extra/generate/check", {}, headers={"Authorization": "Bearer user"})
        result = s.json("POST", "/api/v1/generate", {"prompt": "Hi", "max_length": 3},
                        headers={"Authorization": "Bearer user"})
        assert result["results"][0]["text"] is not None
        s.wait_for_line(r"job \d+ ended: .*model gemma$", start=mark)
        s.json("POST", "/api/admin/reload_config", {"filename": "initial_model"}, headers=admin)
        assert s.json("GET", "/api/v1/model", headers={"Authorization": "Bearer user"})["result"] == "koboldcpp/smollm"
    finally:
        s.stop()


# -- downloads --------------------------------------------------------------------------------------------------

class GGUFHost:
    """A loopback HTTP server shaped like Hugging Face: /resolve/main/NAME redirects to /cdn/NAME with the size and
    SHA-256 in X-Linked-Size and X-Linked-ETag; /cdn/ serves the bytes with Range. `drop_once` closes the first
    transfer halfway; `wrong_hash` states another hash."""

    def __init__(self, data: bytes):
        self.data, self.drop_once, self.wrong_hash, self.ranges = data, False, False, []
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path.startswith("/resolve/main/"):
                    digest = hashlib.sha256(host.data + (b"x" if host.wrong_hash else b"")).hexdigest()
                    self.send_response(302)
                    self.send_header("Location", "/cdn/" + self.path.rsplit("/", 1)[1])
                    self.send_header("X-Linked-Size", str(len(host.data)))
                    self.send_header("X-Linked-ETag", f'"{digest}"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                m = re.match(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if m:
                    start = int(m.group(1))
                    host.ranges.append(start)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(host.data) - 1}/{len(host.data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(host.data) - start))
                self.end_headers()
                body = host.data[start:]
                if host.drop_once:
                    host.drop_once = False
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def url(self, name: str) -> str:
        return f"{self.base}/resolve/main/{name}"


@pytest.fixture(scope="module")
def gguf_host(starter_model):
    with open(starter_model, "rb") as f:
        host = GGUFHost(f.read())
    yield host
    host.server.shutdown()


def test_pull_resumes_checks_and_serves_the_model(tmp_path, starter_model, gguf_host):
    import ollama
    s = ServerProcess(["--model", starter_model, "--modeldir", str(tmp_path), "--contextsize", "512"])
    try:
        client = ollama.Client(host=s.base)
        gguf_host.drop_once, gguf_host.ranges = True, []
        progress = list(client.pull(gguf_host.url("pulled.gguf"), stream=True))
        statuses = [p.status for p in progress]
        assert statuses[0] == "pulling manifest" and statuses[-3:] == ["verifying sha256 digest", "writing manifest",
                                                                       "success"]
        size = len(gguf_host.data)
        counted = [p for p in progress if p.status == "pulling pulled"]
        assert counted[-1].total == counted[-1].completed == size
        assert [p.completed for p in counted] == sorted(p.completed for p in counted)
        assert gguf_host.ranges and 0 < gguf_host.ranges[0] < size        # it went on from where it was cut
        with open(tmp_path / "pulled.gguf", "rb") as f:
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(gguf_host.data).digest()
        assert sorted(os.listdir(tmp_path)) == ["pulled.gguf"]
        assert "pulled" in {m["name"] for m in s.json("GET", "/api/tags")["models"]}
        assert s.json("POST", "/api/chat", {"model": "pulled", "messages": HI, "stream": False,
                                            "options": {"num_predict": 2}})["model"] == "pulled"
        # A wrong stated hash: refused, nothing left behind.
        gguf_host.wrong_hash = True
        try:
            with pytest.raises(ollama.ResponseError, match="SHA-256"):
                list(client.pull(gguf_host.url("bad.gguf"), stream=True))
        finally:
            gguf_host.wrong_hash = False
        assert sorted(os.listdir(tmp_path)) == ["pulled.gguf"]
        status, _, body = s.request("POST", "/api/pull", {"model": "llama3"})
        assert status == 404 and b"http(s) URLs of GGUF files" in body
        # Delete: only from the folder.
        assert s.request("DELETE", "/api/delete", {"model": "pulled"})[0] == 200
        assert sorted(os.listdir(tmp_path)) == []
        assert s.request("DELETE", "/api/delete", {"model": "SmolLM2-135M-Instruct.Q4_1"})[0] in (404, 409)
        assert os.path.isfile(starter_model)
    finally:
        s.stop()


def test_model_url_downloads_at_start(tmp_path, gguf_host):
    s = ServerProcess(["--model", gguf_host.url("starter.gguf"), "--modeldir", str(tmp_path), "--contextsize", "512"])
    try:
        assert any("Downloading starter [" in line for line in s.lines)
        assert s.json("GET", "/v1/models")["data"][0]["id"] == "starter"
        assert sorted(os.listdir(tmp_path)) == ["starter.gguf"]
    finally:
        s.stop()
    # The second start finds the file and downloads nothing.
    s = ServerProcess(["--model", gguf_host.url("starter.gguf"), "--modeldir", str(tmp_path), "--contextsize", "512"])
    try:
        assert not any("Downloading" in line for line in s.lines)
    finally:
        s.stop()
