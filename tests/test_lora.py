"""LoRA adapters (issue 37, item 5): --lora FILE[:SCALE], llama-server's /lora-adapters and per-request `lora`, on the
real server with a small random adapter for the starter model (tests/make_lora.py): scale 0 is no adapter to the
byte, scale 1 changes greedy replies, concurrent requests under other scales keep their own, and no cache (a slot's,
or the prompt cache's) serves a prefix computed under other scales."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from koboldlite.config import load_config, lora_adapters
from koboldlite.errors import ConfigError
from tests.harness import SCRIPT, ServerProcess, in_thread, openai_client_for, result_of
from tests.make_lora import make_lora

def run_program(*args, timeout=120):
    p = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


PROMPT = "Once upon a time, there was a"
STORY = "Look in thy glass and tell the face thou viewest. " * 24        # above the prompt cache's 256 tokens
OTHER = "The quick brown fox jumps over the lazy dog, and then it runs away. " * 24
PASSWORD = "lora password"
AUTH = {"Authorization": f"Bearer {PASSWORD}"}


@pytest.fixture(scope="module")
def lora_file(starter_model, tmp_path_factory) -> str:
    return make_lora(str(tmp_path_factory.mktemp("lora") / "test-lora.gguf"), starter_model)


SLOT_OPTIONS = ["--contextsize", "1024", "--parallel", "2", "--kvperslot"]   # each slot a context: same bytes alone


@pytest.fixture(scope="module")
def plain(starter_model):
    s = ServerProcess(["--model", starter_model, *SLOT_OPTIONS])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def adapted(starter_model, lora_file):
    """The same server with the adapter loaded at scale 0, behind a password."""
    s = ServerProcess(["--model", starter_model, *SLOT_OPTIONS, "--lora", f"{lora_file}:0", "--password", PASSWORD])
    yield s
    s.stop()


def complete(server, lora=None, prompt=PROMPT, max_tokens=24, api_key=PASSWORD, **extra):
    """Greedy text and the response's llama-server timings, through the openai client."""
    body = dict(extra, **({"lora": lora} if lora is not None else {}))
    r = openai_client_for(server, api_key).completions.create(model="x", prompt=prompt, max_tokens=max_tokens,
                                                             temperature=0, extra_body=body)
    return r.choices[0].text, r.model_extra.get("timings", {})


def scale(s: float) -> list[dict]:
    return [{"id": 0, "scale": s}]


def test_scale_zero_is_no_adapter_to_the_byte_and_scale_one_changes_greedy_output(plain, adapted):
    without, _ = complete(plain)
    assert complete(adapted)[0] == without                    # --lora FILE:0
    assert complete(adapted, scale(0))[0] == without          # per request
    with_adapter, _ = complete(adapted, scale(1))
    assert with_adapter != without
    assert complete(adapted, scale(1))[0] == with_adapter     # greedy: the same again (from the slot's cache now)


def test_global_scales_get_and_post(plain, adapted, lora_file):
    assert adapted.json("GET", "/lora-adapters", headers=AUTH) == [{"id": 0, "path": lora_file, "scale": 0.0}]
    with_adapter, _ = complete(adapted, scale(1))
    try:
        assert adapted.json("POST", "/lora-adapters", [{"id": 0, "scale": 1}], headers=AUTH) == {"success": True}
        assert adapted.json("GET", "/lora-adapters", headers=AUTH)[0]["scale"] == 1.0
        assert complete(adapted)[0] == with_adapter          # a request without `lora` runs under the global scale
        assert complete(adapted, [])[0] == complete(plain)[0]   # its own list: adapters left out are at 0
    finally:
        adapted.json("POST", "/lora-adapters", [], headers=AUTH)     # none listed: every adapter at 0
    assert adapted.json("GET", "/lora-adapters", headers=AUTH)[0]["scale"] == 0.0
    props = adapted.json("GET", "/props", headers=AUTH)
    assert props["lora_adapters"] == [{"id": 0, "path": lora_file, "scale": 0.0}]


def test_the_password_guards_the_adapters(adapted):
    for method, body in (("GET", None), ("POST", [{"id": 0, "scale": 1}])):
        status, _, _ = adapted.request(method, "/lora-adapters", body)
        assert status == 401
    assert adapted.json("GET", "/lora-adapters", headers=AUTH)[0]["scale"] == 0.0


@pytest.mark.parametrize("body, words", [
    ([{"id": 3, "scale": 1}], "no LoRA adapter with id 3"),
    ([{"id": 0, "scale": "high"}], "'body[0].scale' must be a number"),
    ([{"id": "0", "scale": 1}], "'body[0].id' must be an adapter id"),
    ({"id": 0, "scale": 1}, "must be a list"),
])
def test_bad_global_scales_are_a_clear_400(adapted, body, words):
    status, _, data = adapted.request("POST", "/lora-adapters", body, headers=AUTH)
    assert status == 400 and words in data.decode(), data
    assert adapted.json("GET", "/lora-adapters", headers=AUTH)[0]["scale"] == 0.0     # nothing changed


@pytest.mark.parametrize("lora, words", [
    ([{"id": 1, "scale": 1}], "no LoRA adapter with id 1; the adapters loaded: id 0"),
    ([{"id": 0, "scale": None}], "'lora[0].scale' must be a number"),
    ({"0": 1}, "'lora' must be a list"),
])
def test_bad_request_scales_are_a_clear_400(adapted, lora, words):
    status, _, data = adapted.request("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "lora": lora},
                                      headers=AUTH)
    assert status == 400 and words in data.decode(), data
    assert complete(adapted, max_tokens=2)[0]         # and it keeps serving


def test_a_server_without_adapters_refuses_their_ids(plain):
    status, _, data = plain.request("POST", "/v1/completions", {"prompt": PROMPT, "lora": [{"id": 0, "scale": 1}]})
    assert status == 400 and b"the adapters loaded: none (start with --lora FILE)" in data
    assert plain.json("GET", "/lora-adapters") == []


def stream_text(server, lora, max_tokens, first_token=None) -> str:
    """A streamed greedy completion; `first_token` (an Event) is set once its first text arrives."""
    chunks = openai_client_for(server, PASSWORD).completions.create(
        model="x", prompt=PROMPT, max_tokens=max_tokens, temperature=0, stream=True,
        extra_body={"lora": lora, "ban_eos_token": True})
    text = ""
    for chunk in chunks:
        text += chunk.choices[0].text if chunk.choices else ""
        if text and first_token is not None:
            first_token.set()
    return text


def test_concurrent_requests_under_other_scales_keep_their_own_output(adapted):
    long_alone = stream_text(adapted, scale(1), 200)
    short_alone = stream_text(adapted, scale(0), 40)
    switches = adapted.json("GET", "/props", headers=AUTH)["lora_scale_switches"]
    started = threading.Event()
    long_run = in_thread(stream_text, adapted, scale(1), 200, started)
    assert started.wait(120)
    short_run = in_thread(stream_text, adapted, scale(0), 40)   # admitted while the long one generates
    assert result_of(short_run) == short_alone
    assert result_of(long_run) == long_alone
    # They took turns (one scale set per batch, turns of 8 steps): the scales changed at every turn, not once or twice.
    assert adapted.json("GET", "/props", headers=AUTH)["lora_scale_switches"] - switches >= 6


@pytest.fixture(scope="module")
def one_slot(starter_model, lora_file):
    """One slot and a RAM prompt cache: a displaced conversation comes back only under its own scales."""
    s = ServerProcess(["--model", starter_model, "--contextsize", "2048", "--lora", f"{lora_file}:0",
                       "--cacheram", "64"])
    yield s
    s.stop()


def test_the_prompt_cache_serves_no_prefix_computed_under_other_scales(one_slot):
    story, other = STORY, OTHER

    def run(prompt, s):
        text, timings = complete(one_slot, scale(s), prompt=prompt, max_tokens=16, api_key="x")
        return text, timings["cache_n"]

    under_zero, _ = run(story, 0)
    run(other, 1)                                      # displaces the story (scale 0) into the RAM cache
    under_one, cached = run(story, 1)
    assert cached <= 1                                 # only the BOS it shares with `other`: nothing of the story
    assert under_one != under_zero
    run(other, 0)                                      # displaces the story (scale 1)
    again, cached = run(story, 1)
    assert again == under_one and cached > 256         # restored: its own scales
    run(other, 1)
    again, cached = run(story, 0)
    assert again == under_zero and cached > 256
    assert one_slot.json("GET", "/api/extra/perf")["prompt_cache"]["conversations"] >= 2


@pytest.fixture(scope="module")
def shared_pool(starter_model, lora_file):
    """Two slots in one shared KV pool, where a prompt borrows another slot's cells; no prompt cache."""
    s = ServerProcess(["--model", starter_model, "--contextsize", "2048", "--parallel", "2", "--cacheram", "0",
                       "--lora", f"{lora_file}:0"])
    yield s
    s.stop()


def test_a_slot_lends_its_prompt_only_under_its_own_scales(shared_pool):
    def run(s):
        text, timings = complete(shared_pool, scale(s), prompt=STORY, max_tokens=16, api_key="x")
        return text, timings["cache_n"]

    under_zero, _ = run(0)
    under_one, cached = run(1)                # in the other slot: the first one's cells are not borrowed
    assert cached <= 1 and under_one != under_zero
    again, cached = run(0)                    # each slot serves its own again
    assert again == under_zero and cached > 256
    again, cached = run(1)
    assert again == under_one and cached > 256


@pytest.fixture(scope="module")
def saving(starter_model, lora_file, tmp_path_factory):
    """One slot, no prompt cache, a folder for llama-server's saved slots."""
    s = ServerProcess(["--model", starter_model, "--contextsize", "2048", "--cacheram", "0", "--slot-save-path",
                       str(tmp_path_factory.mktemp("lora-slots")), "--lora", f"{lora_file}:0"])
    yield s
    s.stop()


def test_a_saved_slot_comes_back_under_its_own_scales(saving):
    def run(prompt, s):
        text, timings = complete(saving, scale(s), prompt=prompt, max_tokens=16, api_key="x")
        return text, timings["cache_n"]

    under_one, _ = run(STORY, 1)
    saving.json("POST", "/slots/0?action=save", {"filename": "story-scale-1.bin"})
    run(OTHER, 0)                             # the slot now runs under scale 0
    saving.json("POST", "/slots/0?action=restore", {"filename": "story-scale-1.bin"})
    text, cached = run(STORY, 0)
    assert cached <= 1                        # computed under scale 1: not reused under 0
    saving.json("POST", "/slots/0?action=restore", {"filename": "story-scale-1.bin"})
    text, cached = run(STORY, 1)
    assert text == under_one and cached > 256


def test_lora_options(lora_file, starter_model):
    cfg = load_config(["--model", starter_model, "--lora", f"{lora_file}:0.5", "--lora", lora_file, lora_file,
                       "--loramult", "0.25"])
    assert lora_adapters(cfg) == [(lora_file, 0.5), (lora_file, 0.25), (lora_file, 0.25)]
    for args, words in ((["--lora", lora_file + ":much"], "the scale after ':' must be a number"),
                        (["--lora", "/no/such.gguf"], "no such file: /no/such.gguf"),
                        (["--lora", lora_file + ":0.5:1"], "no such file")):
        with pytest.raises(ConfigError, match=words):
            load_config(["--model", starter_model, *args])


def test_a_file_that_is_no_adapter_fails_the_start(starter_model):
    code, _, err = run_program("--port", "0", "--model", starter_model, "--lora", starter_model)   # a model, not a LoRA
    assert code != 0 and "could not load the LoRA adapter" in err
