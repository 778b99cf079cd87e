"""Images and audio in the built-in page's chat (issue 35), in a real headless Chromium against the real server with
the tiny random-weight projectors of tests/media_models.py: attach (file picker, paste, drop), remove, send as
OpenAI content parts, kept in the saved conversation; the attach button only where the model reads media, and
files the server does not read refused in the page."""

from __future__ import annotations

import base64
import json

import pytest

from tests import media_files
from tests.harness import ServerProcess
from tests.test_images_and_audio import projectors  # noqa: F401  (a fixture)
from tests.test_ui import browser, page, settings, shot, wait_reply_done  # noqa: F401  (fixtures)

CHAT = "**/v1/chat/completions"


def media_server(starter_model: str, *extra: str) -> ServerProcess:
    return ServerProcess(["--model", starter_model, "--contextsize", "1024", "--threads", "1", "--nodraft", *extra])


@pytest.fixture(scope="module")
def vision_server(starter_model, projectors):  # noqa: F811
    s = media_server(starter_model, "--mmproj", projectors["vision"])
    yield s
    s.stop()


def ready(page, server):
    """The page has asked the server what it reads (connect() ends with it, before 'Ready')."""
    page.goto(server.base)
    page.wait_for_selector("#status-text:has-text('Ready')")


def watch_console(page) -> list[str]:
    problems = []
    page.on("console", lambda m: problems.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
    page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    return problems


def sent_messages(request) -> list[dict]:
    return json.loads(request.post_data)["messages"]


def drop_or_paste(page, how: str, data: bytes, name: str, mime: str) -> bool:
    """A File made in the page, dropped on the chat or pasted into the input; True if the page took the event."""
    return page.evaluate("""([how, b64, name, mime]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, { type: mime }));
        const input = document.getElementById("input");
        let event;
        if (how === "paste") {
            event = new ClipboardEvent("paste", { clipboardData: transfer, bubbles: true, cancelable: true });
        } else {
            input.dispatchEvent(new DragEvent("dragover", { dataTransfer: transfer, bubbles: true, cancelable: true }));
            event = new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true });
        }
        input.dispatchEvent(event);
        return event.defaultPrevented;
    }""", [how, base64.b64encode(data).decode(), name, mime])


def test_attach_remove_send_an_image_and_keep_it(page, vision_server, tmp_path):
    problems = watch_console(page)
    settings(page, max_length=8, ban_eos=True, temperature=0, seed=1)
    image = media_files.png(40, 30, seed=1)
    picture = tmp_path / "<b>red square<i>.png"          # a name with markup: shown as text
    picture.write_bytes(image)
    ready(page, vision_server)
    assert page.is_visible("#attach")
    assert "image/png" in page.get_attribute("#attach-file", "accept")
    page.set_input_files("#attach-file", str(picture))
    page.wait_for_selector("#attachments .attachment.image img")
    page.click("#attachments .attachment .remove")
    page.wait_for_selector("#attachments", state="hidden")
    assert page.locator("#attachments .attachment").count() == 0
    page.set_input_files("#attach-file", str(picture))     # the same file again, after its removal
    page.wait_for_selector("#attachments .attachment.image img")
    assert page.get_attribute("#attachments .attachment", "title") == "<b>red square<i>.png"
    shot(page, "media-composer")
    page.fill("#input", "What is in this picture?")
    with page.expect_request(CHAT) as request:
        page.press("#input", "Enter")
    wait_reply_done(page)
    page.wait_for_selector("#speed:has-text('tokens/s')")         # the reply streamed its 8 tokens
    assert page.is_hidden("#notice") and page.is_hidden("#attachments")
    parts = sent_messages(request.value)[-1]["content"]
    assert parts[0] == {"type": "text", "text": "What is in this picture?"}
    assert parts[1] == {"type": "image_url",
                        "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}}
    used = int(page.inner_text("#context-used").split()[1])
    assert used > 64                                               # the image's 64 positions were read
    user = page.locator(".msg.user")
    assert user.locator(".attachment.image img").evaluate("img => img.naturalWidth") == 40
    assert user.locator(".text").inner_text() == "What is in this picture?"
    assert page.locator(".messages b, .messages i").count() == 0
    shot(page, "media-sent")

    # A second turn sends the first turn's image again, as its parts.
    page.fill("#input", "And now?")
    with page.expect_request(CHAT) as again:
        page.press("#input", "Enter")
    wait_reply_done(page)
    messages = sent_messages(again.value)
    assert messages[0]["content"] == parts and messages[-1]["content"] == "And now?"

    page.reload()                                                  # kept in the browser's saved conversation
    page.wait_for_selector(".msg.user .attachment.image img")
    assert page.locator(".msg.user").first.locator("img").evaluate("img => img.naturalWidth") == 40
    stored = page.evaluate("JSON.parse(localStorage.getItem('kl.conversations'))")
    kept = [m for c in stored for m in c["messages"] if m.get("attachments")]
    assert kept[0]["attachments"][0]["url"] == parts[1]["image_url"]["url"]
    shot(page, "media-reloaded")

    page.click("#mode-story")                                      # the story mode has no attach control
    assert not page.is_visible("#attach") and page.locator("#story-view input[type=file]").count() == 0
    assert problems == [], problems


def test_paste_and_drop_attach(page, vision_server):
    ready(page, vision_server)
    assert drop_or_paste(page, "drop", media_files.png(16, 16, seed=2), "dropped.png", "image/png")
    page.wait_for_selector("#attachments .attachment[title='dropped.png'] img")
    assert drop_or_paste(page, "paste", media_files.gif(), "pasted.gif", "")      # no type given: known by bytes
    page.wait_for_selector("#attachments .attachment[title='pasted.gif'] img")
    assert page.locator("#attachments .attachment").count() == 2
    page.fill("#input", "plain text")                              # a paste of text stays a paste of text
    assert not page.evaluate("""() => {
        const transfer = new DataTransfer();
        transfer.setData("text/plain", "more");
        const event = new ClipboardEvent("paste", { clipboardData: transfer, bubbles: true, cancelable: true });
        document.getElementById("input").dispatchEvent(event);
        return event.defaultPrevented;
    }""")


def test_image_only_model_refuses_audio_and_other_files(page, vision_server, tmp_path):
    requests = []
    page.on("request", lambda r: requests.append(r.url) if "/v1/chat/completions" in r.url else None)
    ready(page, vision_server)
    for name, data, says in [("notes.txt", b"just some text\n", "not a file this server reads"),
                             ("logo.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "not a file this server reads"),
                             ("fake.png", b"not really a png at all", "not a file this server reads"),
                             ("song.wav", media_files.wav(0.5), "this model reads images only, not audio")]:
        path = tmp_path / name
        path.write_bytes(data)
        page.set_input_files("#attach-file", str(path))
        page.wait_for_selector(f"#notice.error:has-text('{name}: {says}')")
        assert page.is_hidden("#attachments")
    shot(page, "media-refused")
    page.press("#input", "Enter")                                 # nothing to send: nothing is sent
    assert page.locator(".msg").count() == 0
    assert requests == []


def test_a_server_error_shows_in_the_page(page, vision_server):
    """A file that looks like a PNG but is cut short: the server's 400 message is shown as the page shows errors."""
    settings(page, max_length=4)
    ready(page, vision_server)
    drop_or_paste(page, "drop", media_files.png()[:40], "cut.png", "image/png")
    page.wait_for_selector("#attachments .attachment[title='cut.png']")
    page.fill("#input", "What is it?")
    page.press("#input", "Enter")
    page.wait_for_selector("#notice.error:has-text('truncated')")
    assert page.locator(".msg.assistant").count() == 0
    # The refused turn is back in the composer, to be fixed, rather than sent again with every later turn.
    page.wait_for_selector("#attachments .attachment[title='cut.png']")
    assert page.input_value("#input") == "What is it?" and page.locator(".msg.user").count() == 0
    shot(page, "media-server-error")
    assert vision_server.json("GET", "/api/extra/perf")["idle"] == 1


def test_no_projector_no_attach_control(page, starter_model):
    s = media_server(starter_model)
    try:
        ready(page, s)
        assert s.json("GET", "/props")["modalities"] == {"vision": False, "video": False, "audio": False}
        assert page.is_hidden("#attach")
        drop_or_paste(page, "drop", media_files.png(), "picture.png", "image/png")   # a drop is not attached
        page.wait_for_selector("#notice.error:has-text('reads text only')")
        assert page.is_hidden("#attachments")
    finally:
        s.stop()


def test_audio_only_model_attach_and_send_a_clip(page, starter_model, projectors, tmp_path):  # noqa: F811
    s = media_server(starter_model, "--mmproj", projectors["audio"])
    problems = watch_console(page)
    settings(page, max_length=6, ban_eos=True)
    try:
        ready(page, s)
        assert page.is_visible("#attach")
        accept = page.get_attribute("#attach-file", "accept")
        assert ".wav" in accept and "image/" not in accept
        picture = tmp_path / "picture.png"
        picture.write_bytes(media_files.png())
        page.set_input_files("#attach-file", str(picture))
        page.wait_for_selector("#notice.error:has-text('picture.png: this model reads audio only, not images')")
        clip = media_files.wav(2.0)
        sound = tmp_path / "beep.wav"
        sound.write_bytes(clip)
        page.set_input_files("#attach-file", str(sound))
        page.wait_for_selector("#attachments .attachment.audio .name:has-text('beep.wav')")
        assert page.is_hidden("#notice")
        page.fill("#input", "What do you hear?")
        with page.expect_request(CHAT) as request:
            page.press("#input", "Enter")
        wait_reply_done(page)
        page.wait_for_selector("#speed:has-text('tokens/s')")
        assert page.is_hidden("#notice")
        parts = sent_messages(request.value)[-1]["content"]
        assert parts == [{"type": "text", "text": "What do you hear?"},
                         {"type": "input_audio", "input_audio": {"data": base64.b64encode(clip).decode(),
                                                                 "format": "wav"}}]
        assert int(page.inner_text("#context-used").split()[1]) > 50
        page.wait_for_selector(".msg.user .attachment.audio .name:has-text('beep.wav')")
        page.click(".msg.user .attachment.audio .play")             # plays through Web Audio, then stops
        page.wait_for_selector(".msg.user .attachment.audio .play:has-text('■')")
        page.click(".msg.user .attachment.audio .play")
        page.wait_for_selector(".msg.user .attachment.audio .play:has-text('▶')")
        shot(page, "media-audio")
        assert problems == [], problems
    finally:
        s.stop()
