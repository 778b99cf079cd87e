"""embedded_ui/ in a real headless Chromium (Debian's package, driven by Playwright) against the real server."""

from __future__ import annotations

import gzip
import json
import os
import shutil

import pytest

from tests.harness import ROOT, ServerProcess

ARTIFACTS = os.path.join(ROOT, "tests", "artifacts")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags for a closed network: without them Chromium keeps trying to reach Google's services.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def shot(page, name: str):
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, f"ui-{name}.png"))


@pytest.fixture(scope="module")
def ui_server(starter_model):
    s = ServerProcess(["--model", starter_model, "--contextsize", "2048"])
    yield s
    s.stop()


def chromium(*extra_args: str):
    """Debian's headless Chromium under Playwright, for a `with` block."""
    import contextlib
    from playwright.sync_api import sync_playwright
    assert os.path.exists(CHROMIUM), "Chromium is missing: run tests/install.sh"

    @contextlib.contextmanager
    def running():
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + list(extra_args))
            yield b
            b.close()
    return running()


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


def settings(page, **values):
    """Settings as a returning user has them stored, before the page loads."""
    page.add_init_script(f"localStorage.setItem('kl.settings', JSON.stringify({json.dumps(values)}))")


STREAMING_TEXT = ("() => { const e = document.querySelector('.msg.assistant.streaming .text');"
                  " return e && e.textContent.length > 20; }")


def wait_reply_done(page):
    page.wait_for_selector(".msg.assistant.streaming", state="detached")


def test_chat_streams_a_reply(page, ui_server):
    page.goto(ui_server.base)
    page.wait_for_selector("#model-name:has-text('SmolLM2-135M-Instruct')")
    assert page.is_visible("#chat-view") and not page.is_visible("#story-view")
    page.fill("#input", "Tell me three facts about cats.")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.user:has-text('three facts about cats')")
    page.wait_for_function(STREAMING_TEXT)           # text on screen while the reply still streams
    shot(page, "chat-streaming")
    wait_reply_done(page)
    reply = page.inner_text(".msg.assistant .text")
    assert len(reply) > 20
    assert "tokens/s" in page.inner_text("#speed")
    assert "Context" in page.inner_text("#context-used")
    shot(page, "chat-done")


def test_a_clean_browser_console(page, ui_server):
    """No console message and no failed request, from loading the page to a finished reply (the icon too)."""
    console, failed = [], []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.goto(ui_server.base)
    page.wait_for_selector("#model-name:has-text('SmolLM2-135M-Instruct')")
    page.fill("#input", "Hi!")
    page.press("#input", "Enter")
    wait_reply_done(page)
    icon = page.evaluate("fetch('/favicon.ico').then(r => [r.status, r.headers.get('content-type')])")
    assert icon == [200, "image/svg+xml"]
    assert page.evaluate("document.querySelector('link[rel=icon]').href").endswith("/favicon.svg")
    assert console == [] and failed == [], (console, failed)


def test_shift_enter_is_a_new_line(page, ui_server):
    page.goto(ui_server.base)
    page.fill("#input", "first line")
    page.press("#input", "Shift+Enter")
    page.keyboard.type("second line")
    assert page.input_value("#input") == "first line\nsecond line"
    assert page.locator(".msg.user").count() == 0


def test_stop_button_stops_the_server(page, ui_server):
    settings(page, max_length=1500, ban_eos=True)
    page.goto(ui_server.base)
    page.fill("#input", "Write a very long story about the sea.")
    page.press("#input", "Enter")
    page.wait_for_function(STREAMING_TEXT)
    mark = ui_server.mark()
    page.click("#stop")
    ui_server.wait_for_line(r"ended: abort", start=mark)      # the server itself stopped generating
    wait_reply_done(page)
    assert ui_server.json("GET", "/api/extra/perf")["idle"] == 1
    assert page.is_visible("#send") and not page.is_visible("#stop")
    assert page.inner_text(".msg.assistant .text")             # what came is kept
    shot(page, "chat-stopped")


def test_regenerate_edit_delete(page, ui_server):
    settings(page, max_length=24)
    page.goto(ui_server.base)
    page.fill("#input", "Say something nice.")
    page.press("#input", "Enter")
    wait_reply_done(page)
    assistant = page.locator(".msg.assistant")
    assistant.hover()
    mark = ui_server.mark()
    assistant.locator("button:has-text('Regenerate')").click()
    ui_server.wait_for_line(r"ended: ", start=mark)
    wait_reply_done(page)
    assert page.locator(".msg.assistant").count() == 1
    user = page.locator(".msg.user")
    user.hover()
    user.locator("button:has-text('Edit')").click()
    page.fill(".msg.user textarea", "Edited question")
    page.click(".msg.user button:has-text('Save')")
    assert page.inner_text(".msg.user .text") == "Edited question"
    page.locator(".msg.assistant").hover()
    page.locator(".msg.assistant button:has-text('Delete')").click()
    assert page.locator(".msg.assistant").count() == 0


def test_conversations_persist_export_and_import(page, ui_server, tmp_path):
    settings(page, max_length=8)
    page.goto(ui_server.base)
    page.click("#system-box summary")
    page.fill("#system-prompt", "You are a pirate.")
    page.fill("#input", "Ahoy")
    page.press("#input", "Enter")
    wait_reply_done(page)
    page.reload()
    page.wait_for_selector(".msg.user:has-text('Ahoy')")
    assert page.input_value("#system-prompt") == "You are a pirate."
    page.click("#new-chat")
    assert page.locator("#conversation-list li").count() == 2
    with page.expect_download() as download:
        page.click("#export-chats")
    exported = json.loads(open(download.value.path()).read())
    assert any(c["system"] == "You are a pirate." and c["messages"][0]["content"] == "Ahoy" for c in exported)
    other = tmp_path / "import.json"
    other.write_text(json.dumps([{"id": "imported-1", "title": "From a friend", "system": "",
                                  "messages": [{"role": "user", "content": "<b>hi</b>"}]}]))
    page.set_input_files("#import-chats", str(other))
    page.click("#conversation-list li:has-text('From a friend')")
    assert page.inner_text(".msg.user .text") == "<b>hi</b>"


def test_story_mode_continues_the_text(page, ui_server):
    settings(page, max_length=40, ban_eos=True)
    page.goto(ui_server.base)
    page.click("#mode-story")
    assert page.is_visible("#story-view") and not page.is_visible("#chat-view")
    start = "The old lighthouse keeper climbed the stairs and"
    page.fill("#story", start)
    page.click("#story-view details summary")
    page.fill("#memory", "A quiet story set on a rocky island.")
    mark = ui_server.mark()
    page.click("#continue")
    ui_server.wait_for_line(r"ended: length", start=mark)
    page.wait_for_function(f"() => document.getElementById('story').value.length > {len(start) + 20}")
    page.wait_for_selector("#continue", state="visible")
    story = page.input_value("#story")
    assert story.startswith(start) and len(story) > len(start) + 20
    shot(page, "story")
    page.reload()                                  # the story is kept in the browser
    assert page.input_value("#story") == story


def test_model_output_is_text_not_html(page, ui_server):
    """A reply full of markup must show as text: no element from it, no script run."""
    evil = "<img src=x onerror=\"window.pwned=1\"><script>window.pwned=2</script><b>bold</b>"

    def fake_reply(route):
        chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
                  {"choices": [{"index": 0, "delta": {"content": evil}, "finish_reason": None}]},
                  {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)
    page.route("**/v1/chat/completions", fake_reply)
    page.goto(ui_server.base)
    page.fill("#input", "<i>user markup</i>")
    page.press("#input", "Enter")
    wait_reply_done(page)
    assert page.inner_text(".msg.assistant .text") == evil
    assert page.inner_text(".msg.user .text") == "<i>user markup</i>"
    assert page.locator(".messages img, .messages script, .messages b, .messages i").count() == 0
    assert page.evaluate("window.pwned") is None


def test_phone_sized_screen(browser, ui_server):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                                  device_scale_factor=2)
    page = context.new_page()
    page.add_init_script("localStorage.setItem('kl.settings', JSON.stringify({max_length: 30}))")
    try:
        page.goto(ui_server.base)
        page.wait_for_selector("#model-name:has-text('SmolLM2')")
        assert page.is_visible("#chat-view") and not page.is_visible("#story-view")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        assert not page.locator("#sidebar").is_visible() or page.evaluate(
            "document.getElementById('sidebar').getBoundingClientRect().right <= 0")
        page.fill("#input", "Hi from my phone")
        page.tap("#send")
        wait_reply_done(page)
        assert page.inner_text(".msg.assistant .text")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        shot(page, "phone-chat")
        page.tap("#toggle-sidebar")
        page.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().left >= 0")
        shot(page, "phone-sidebar")
    finally:
        context.close()


def test_password_flow(browser, make_server):
    s = make_server("--password", "open-sesame", tls=False)
    context = browser.new_context(viewport={"width": 1000, "height": 700})
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        page.goto(s.base)
        page.wait_for_selector("#password-dialog[open]")
        assert "Password" in page.inner_text("#status-text")
        shot(page, "password")
        page.fill("#password", "wrong")
        page.press("#password", "Enter")
        page.wait_for_selector("#password-error", state="visible")
        page.fill("#password", "open-sesame")
        page.press("#password", "Enter")
        page.wait_for_selector("#model-name:has-text('SmolLM2')")
        assert not page.is_visible("#password-dialog")
        page.fill("#input", "Hello")
        page.press("#input", "Enter")
        wait_reply_done(page)
        assert page.inner_text(".msg.assistant .text")
        page.reload()                                  # remembered in the browser
        page.wait_for_selector("#model-name:has-text('SmolLM2')")
        assert not page.is_visible("#password-dialog")
    finally:
        context.close()


def test_page_over_tls_and_busy_message(browser, make_server):
    s = make_server("--multiuser", "0")
    context = browser.new_context(ignore_https_errors=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        page.goto(s.base)
        page.wait_for_selector("#model-name:has-text('SmolLM2')")
        from tests.harness import SSEStream, kobold_event_json
        stream = SSEStream(s, "/api/extra/generate/stream", {"prompt": "x", "max_length": 1500, "ban_eos_token": True})
        kobold_event_json(stream.next_event())
        page.fill("#input", "Anyone there?")
        page.press("#input", "Enter")
        page.wait_for_selector("#notice:has-text('busy')")
        shot(page, "busy")
        stream.close()
    finally:
        context.close()


def test_unreachable_server_message(page, ui_server):
    page.goto(ui_server.base)
    page.wait_for_selector("#model-name:has-text('SmolLM2')")
    page.route("**/v1/chat/completions", lambda route: route.abort("connectionrefused"))
    page.fill("#input", "Hello?")
    page.press("#input", "Enter")
    page.wait_for_selector("#notice:has-text('cannot be reached')")


# -- the static files themselves --------------------------------------------------------------

def test_static_files_types_compression_and_cache(ui_server):
    status, headers, body = ui_server.request("GET", "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8" and b"<html" in body
    assert "default-src 'self'" in headers["content-security-policy"]
    status, headers, packed = ui_server.request("GET", "/app.js", headers={"Accept-Encoding": "gzip"})
    assert headers["content-type"].startswith("text/javascript") and headers["content-encoding"] == "gzip"
    assert b"textContent" in gzip.decompress(packed)
    status, _, _ = ui_server.request("GET", "/app.js", headers={"If-None-Match": headers["etag"]})
    assert status == 304
    assert ui_server.request("GET", "/app.css")[1]["content-type"].startswith("text/css")
    assert not any(x in (body + gzip.decompress(packed)) for x in (b"http://", b"https://", b"//cdn"))


@pytest.mark.parametrize("path", ["/../koboldlite.py", "/%2e%2e/koboldlite.py", "/embedded_ui/../koboldlite.py",
                                  "//etc/passwd", "/app.js/../../koboldlite.py", "/%2F..%2Fkoboldlite.py",
                                  "/..%5Ckoboldlite.py", "/etc/passwd", "/koboldlite.py"])
def test_paths_outside_embedded_ui_are_never_served(ui_server, path):
    sock = ui_server.raw_socket()
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    reply = sock.makefile("rb").read()
    sock.close()
    assert reply.startswith(b"HTTP/1.1 404"), reply[:100]
    assert b"import" not in reply and b"root:" not in reply


def test_queue_position_while_waiting(page, ui_server):
    from tests.harness import SSEStream, kobold_event_json
    settings(page, max_length=8)
    page.goto(ui_server.base)
    page.wait_for_selector("#model-name:has-text('SmolLM2')")
    other = SSEStream(ui_server, "/api/extra/generate/stream",
                      {"prompt": "Someone else's long story:", "max_length": 1500, "ban_eos_token": True,
                       "genkey": "OTHER-USER"})
    kobold_event_json(other.next_event())
    page.fill("#input", "My turn?")
    page.press("#input", "Enter")
    page.wait_for_selector("#status-text:has-text('number 1 in the queue')")
    shot(page, "queued")
    ui_server.json("POST", "/api/extra/abort", {"genkey": "OTHER-USER"})
    wait_reply_done(page)
    assert page.inner_text(".msg.assistant .text")
    other.close()


def test_two_users_pick_two_models(browser, starter_model, gemma_model, tmp_path):
    """With a models folder the footer is a picker; each browser's pick goes with its own requests."""
    os.symlink(starter_model, tmp_path / "smollm.gguf")
    os.symlink(gemma_model, tmp_path / "gemma.gguf")
    s = ServerProcess(["--model", str(tmp_path / "smollm.gguf"), "--modeldir", str(tmp_path), "--maxmodels", "2",
                       "--contextsize", "1024"])
    contexts = []
    try:
        pages = []
        for pick in ("gemma", ""):
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            contexts.append(context)
            page = context.new_page()
            page.set_default_timeout(60_000)
            settings(page, max_length=6)
            page.goto(s.base)
            page.wait_for_selector("#model-picker:visible")
            assert not page.is_visible("#model-name")
            options = page.eval_on_selector_all("#model-picker option", "os => os.map(o => o.textContent)")
            assert options == ["smollm (loaded)", "gemma (unloaded)"]
            page.select_option("#model-picker", pick)
            pages.append(page)
        shot(pages[0], "model-picker")
        for page, served in zip(pages, ("gemma", "smollm")):
            mark = s.mark()
            page.fill("#input", "Hello!")
            page.press("#input", "Enter")
            wait_reply_done(page)
            s.wait_for_line(rf"job \d+ ended: .*model {served}$", start=mark)
        pages[0].reload()                  # the pick is remembered, and the list shows what is loaded now
        pages[0].wait_for_selector("#model-picker:visible")
        assert pages[0].input_value("#model-picker") == "gemma"
        assert "gemma (loaded)" in pages[0].inner_text("#model-picker")
    finally:
        for context in contexts:
            context.close()
        s.stop()
