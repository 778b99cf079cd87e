"""Images and audio through the real server (issue 35): the starter model with the tiny projectors of
tests/media_models.py, through the official OpenAI SDK. The projectors' weights are random: their replies are
nonsense, but a different image gives a different greedy reply and the same image the same one."""

from __future__ import annotations

import base64

import pytest

from tests import media_files, media_models
from tests.harness import ServerProcess


@pytest.fixture(scope="module")
def projectors(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("mmproj")
    out = {"vision": str(folder / "vision.gguf"), "audio": str(folder / "audio.gguf")}
    media_models.vision(out["vision"])
    media_models.audio(out["audio"])
    return out


@pytest.fixture(scope="module")
def vision_server(starter_model, projectors):
    s = ServerProcess(["--model", starter_model, "--contextsize", "1024", "--threads", "1", "--nodraft",
                       "--mmproj", projectors["vision"]])
    yield s
    s.stop()


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def ask_about(client, image: bytes, question: str = "What is in this picture?", **kw):
    return client.chat.completions.create(
        model="x", temperature=0, max_tokens=8, seed=1,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": question},
            {"type": "image_url", "image_url": {"url": data_uri(image, "image/png")}}]}], **kw)


@pytest.fixture
def client(vision_server):
    import openai
    return openai.OpenAI(base_url=vision_server.base + "/v1", api_key="none", max_retries=0)


def test_start_up_names_the_projector_and_what_it_reads(vision_server):
    assert any("projector vision.gguf: reads image" in line for line in vision_server.lines), vision_server.lines


def test_different_images_give_different_replies_and_the_same_image_the_same(client):
    one = ask_about(client, media_files.png(40, 30, seed=1))
    again = ask_about(client, media_files.png(40, 30, seed=1))
    other = ask_about(client, media_files.png(40, 30, seed=2))
    assert one.choices[0].message.content == again.choices[0].message.content
    assert one.choices[0].message.content != other.choices[0].message.content
    assert one.usage.prompt_tokens > 64                     # the image's 64 positions and the words
    assert again.usage.prompt_tokens_details.cached_tokens >= 64     # the same image: its cells reused


def test_streamed_too(client):
    stream = ask_about(client, media_files.png(20, 20, seed=3), stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == ask_about(client, media_files.png(20, 20, seed=3)).choices[0].message.content


@pytest.mark.parametrize("part, status, says", [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}, 400, "not valid base64"),
    ({"type": "image_url", "image_url": {"url": data_uri(b"<svg/>", "image/svg+xml")}}, 415, "not a file this server reads"),
    ({"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}}, 400, "does not fetch addresses"),
    ({"type": "image_url", "image_url": {"url": data_uri(media_files.png()[:40], "image/png")}}, 400, "truncated"),
    ({"type": "input_audio", "input_audio": {"data": base64.b64encode(media_files.wav(1.0)).decode(),
                                             "format": "wav"}}, 400, "audio input is not supported"),
])
def test_bad_media_is_a_clear_error_and_the_server_goes_on(vision_server, client, part, status, says):
    code, _, body = vision_server.request("POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}], "max_tokens": 2})
    assert code == status and says in body.decode(), body
    assert ask_about(client, media_files.png(8, 8)).choices[0].message.content is not None


def test_a_model_without_a_projector_says_so(server):
    code, _, body = server.request("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(media_files.png(), "image/png")}}]}], "max_tokens": 2})
    assert code == 400 and b"image input is not supported" in body and b"--mmproj" in body
