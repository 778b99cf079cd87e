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


def test_the_server_reports_what_it_reads(vision_server):
    assert vision_server.json("GET", "/props")["modalities"] == {"vision": True, "video": False, "audio": False}
    v = vision_server.json("GET", "/api/extra/version")
    assert v["vision"] is True and v["audio"] is False      # KoboldAI Lite shows its image button on this


def kobold(server, prompt: str, images: list[bytes], memory: str = "") -> str:
    return server.json("POST", "/api/v1/generate", {
        "prompt": prompt, "memory": memory, "max_length": 6, "temperature": 0.01, "top_k": 1, "sampler_seed": 1,
        "images": [base64.b64encode(i).decode() for i in images]})["results"][0]["text"]


def test_kobold_images_at_the_front_of_memory_or_where_the_text_says(vision_server):
    cat, dog = media_files.png(30, 30, seed=4), media_files.png(30, 30, seed=5)
    front = kobold(vision_server, "\nUser: what is it?\nAssistant:", [cat])
    assert front == kobold(vision_server, "\nUser: what is it?\nAssistant:", [cat])
    assert front != kobold(vision_server, "\nUser: what is it?\nAssistant:", [dog])
    # "(Attached Image N)" places it inline, as KoboldCpp does: another prompt than the front placement.
    inline = kobold(vision_server, "\nUser: (Attached Image 1) what is it?\nAssistant:", [cat])
    assert isinstance(inline, str)


def test_ollama_images_on_generate_and_chat(vision_server):
    import ollama
    client = ollama.Client(host=vision_server.base)
    image = media_files.png(24, 24, seed=6)
    out = client.generate(model="x", prompt="Describe it.", images=[image],
                          options={"temperature": 0, "num_predict": 5, "seed": 1})
    assert out.response is not None and out.prompt_eval_count > 64
    chat = client.chat(model="x", messages=[{"role": "user", "content": "Describe it.", "images": [image]}],
                       options={"temperature": 0, "num_predict": 5, "seed": 1})
    assert chat.message.content is not None and chat.prompt_eval_count > 64


def test_audio_through_the_openai_api(starter_model, projectors):
    import openai
    s = ServerProcess(["--model", starter_model, "--contextsize", "1024", "--threads", "1", "--nodraft",
                       "--mmproj", projectors["audio"]])
    try:
        client = openai.OpenAI(base_url=s.base + "/v1", api_key="none", max_retries=0)

        def hear(seconds: float, freq: float):
            return client.chat.completions.create(model="x", temperature=0, max_tokens=6, messages=[
                {"role": "user", "content": [
                    {"type": "text", "text": "What do you hear?"},
                    {"type": "input_audio", "input_audio": {
                        "data": base64.b64encode(media_files.wav(seconds, freq=freq)).decode(), "format": "wav"}}]}])
        a, b = hear(2.0, 440.0), hear(2.0, 1200.0)
        assert a.usage.prompt_tokens >= 100 and b.usage.prompt_tokens >= 100
        assert a.choices[0].message.content != b.choices[0].message.content
        assert s.json("GET", "/props")["modalities"]["audio"] is True
    finally:
        s.stop()


def test_anthropic_image_blocks_and_images_in_tool_results(vision_server):
    import anthropic
    client = anthropic.Anthropic(base_url=vision_server.base, api_key="none", max_retries=0)

    def block(seed):
        return {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                            "data": base64.b64encode(media_files.png(20, 20, seed=seed)).decode()}}
    one = client.messages.create(model="x", max_tokens=6, extra_body={"temperature": 0}, messages=[
        {"role": "user", "content": [block(7), {"type": "text", "text": "What is this?"}]}])
    other = client.messages.create(model="x", max_tokens=6, extra_body={"temperature": 0}, messages=[
        {"role": "user", "content": [block(8), {"type": "text", "text": "What is this?"}]}])
    assert one.usage.input_tokens > 64 and one.content[0].text != other.content[0].text
    in_result = client.messages.create(model="x", max_tokens=4, extra_body={"temperature": 0}, messages=[
        {"role": "user", "content": "Take a screenshot."},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "screenshot", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [block(9)]}]}],
        tools=[{"name": "screenshot", "description": "Take one", "input_schema": {"type": "object"}}])
    assert in_result.usage.input_tokens > 64
    code, _, body = vision_server.request("POST", "/v1/messages", {"model": "x", "max_tokens": 2, "messages": [
        {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://10.0.0.1/x.png"}}]}]})
    assert code == 400 and b"does not fetch addresses" in body and b'"type": "error"' in body
