"""Images and audio through the real server (issue 35): the starter model with the tiny projectors of
tests/media_models.py, through the official OpenAI SDK. The projectors' weights are random: their replies are
nonsense, but a different image gives a different greedy reply and the same image the same one."""

from __future__ import annotations

import base64
import json

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


def media_server(starter_model: str, projector: str, *extra: str) -> ServerProcess:
    """The starter model with a projector: a 1024-token context, one thread (two encode eight times slower here)."""
    return ServerProcess(["--model", starter_model, "--contextsize", "1024", "--threads", "1", "--nodraft",
                          "--mmproj", projector, *extra])


@pytest.fixture(scope="module")
def vision_server(starter_model, projectors):
    s = media_server(starter_model, projectors["vision"])
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


@pytest.fixture(scope="module")
def audio_server(starter_model, projectors):
    s = media_server(starter_model, projectors["audio"])
    yield s
    s.stop()


def test_audio_through_the_openai_api(audio_server):
    import openai
    client = openai.OpenAI(base_url=audio_server.base + "/v1", api_key="none", max_retries=0)

    def hear(seconds: float, freq: float):
        return client.chat.completions.create(model="x", temperature=0, max_tokens=6, messages=[
            {"role": "user", "content": [
                {"type": "text", "text": "What do you hear?"},
                {"type": "input_audio", "input_audio": {
                    "data": base64.b64encode(media_files.wav(seconds, freq=freq)).decode(), "format": "wav"}}]}])
    a, b = hear(2.0, 440.0), hear(2.0, 1200.0)
    assert a.usage.prompt_tokens >= 100 and b.usage.prompt_tokens >= 100
    assert a.choices[0].message.content != b.choices[0].message.content
    assert audio_server.json("GET", "/props")["modalities"]["audio"] is True


def test_transcription_through_the_official_client(audio_server, vision_server):
    """OpenAI's /v1/audio/transcriptions through client.audio.transcriptions.create, each response_format; the
    transcript is the model's reply to the clip (nonsense from random weights, but the clip's: another differs)."""
    import openai
    client = openai.OpenAI(base_url=audio_server.base + "/v1", api_key="none", max_retries=0)
    low, high = media_files.wav(2.0, freq=440.0), media_files.wav(2.0, freq=1200.0)
    one = client.audio.transcriptions.create(model="x", file=("low.wav", low), extra_body={"max_tokens": 6})
    again = client.audio.transcriptions.create(model="x", file=("low.wav", low), extra_body={"max_tokens": 6})
    assert isinstance(one.text, str) and one.text and one.text == again.text
    assert one.usage.input_tokens >= 100 and again.usage.input_tokens_details["cached_tokens"] >= 100
    # The prompt field is the instruction (as llama-server reads it); under this one the two clips differ.
    low_heard, high_heard = (client.audio.transcriptions.create(model="x", file=(name, clip), prompt="What do you hear?",
                                                                extra_body={"max_tokens": 6}).text
                             for name, clip in (("low.wav", low), ("high.wav", high)))
    assert low_heard != high_heard
    text = client.audio.transcriptions.create(model="x", file=("low.wav", low), response_format="text",
                                              extra_body={"max_tokens": 6})
    assert text.strip() == one.text
    verbose = client.audio.transcriptions.create(model="x", file=("low.wav", low), response_format="verbose_json",
                                                 language="en", extra_body={"max_tokens": 6})
    assert verbose.duration == pytest.approx(2.0) and verbose.language == "en" and verbose.text
    # KoboldCpp's route, as KoboldAI Lite sends it: a data: URI in JSON.
    kobold = audio_server.json("POST", "/api/extra/transcribe", {"audio_data": data_uri(low, "audio/wav"),
                                                                   "prompt": ""})
    assert isinstance(kobold["text"], str) and kobold["text"]
    assert audio_server.json("GET", "/api/extra/version")["transcribe"] is True
    # Refusals in the API's shape, and the server goes on.
    for server, body, says in [
            (vision_server, {"audio_data": data_uri(low, "audio/wav")}, b"does not hear audio"),
            (audio_server, {"audio_data": data_uri(media_files.png(), "image/png")}, b"was expected"),
            (audio_server, {"audio_data": "!!"}, b"not valid base64")]:
        code, _, answer = server.request("POST", "/api/extra/transcribe", body)
        assert code in (400, 415) and says in answer, answer
    with pytest.raises(openai.BadRequestError, match="srt"):
        client.audio.transcriptions.create(model="x", file=("low.wav", low), response_format="srt")
    code, _, answer = audio_server.request("POST", "/v1/audio/transcriptions", {"file": "x"})
    assert code == 415 and b"multipart/form-data" in answer
    assert audio_server.json("GET", "/props")["modalities"]["audio"] is True


def test_responses_input_image_and_file_and_a_stored_conversation(vision_server, client):
    """The Responses API's input_image and input_file parts; a turn that continues a stored response sends its
    image again with the stored words, and reads it from the cache."""
    image = data_uri(media_files.png(28, 28, seed=11), "image/png")
    first = client.responses.create(model="x", temperature=0, max_output_tokens=6, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                     {"type": "input_image", "image_url": image}]}])
    assert first.usage.input_tokens > 64
    second = client.responses.create(model="x", temperature=0, max_output_tokens=6, previous_response_id=first.id,
                                     input="And its colours?")
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.usage.input_tokens_details.cached_tokens >= 64      # the image was not read again
    as_file = client.responses.create(model="x", temperature=0, max_output_tokens=6, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                     {"type": "input_file", "filename": "a.png", "file_data": image}]}])
    assert as_file.output_text == first.output_text
    code, _, body = vision_server.request("POST", "/v1/responses", {"input": [{"role": "user", "content": [
        {"type": "input_file", "file_id": "file-123"}]}]})
    assert code == 400 and b"no files API" in body


def test_completions_multimodal_prompt_and_kobold_fields(vision_server):
    """llama-server's multimodal prompt on /v1/completions, and KoboldCpp's images (SillyTavern sends them there)."""
    png = base64.b64encode(media_files.png(20, 20, seed=12)).decode()
    out = vision_server.json("POST", "/v1/completions", {
        "prompt": {"prompt_string": "Picture: <__media__> It shows", "multimodal_data": [png]}, "max_tokens": 4,
        "temperature": 0})
    assert out["usage"]["prompt_tokens"] > 64
    code, _, body = vision_server.request("POST", "/v1/completions", {
        "prompt": {"prompt_string": "no marker", "multimodal_data": [png]}, "max_tokens": 2})
    assert code == 400 and b"markers" in body
    status, headers, body = vision_server.request("POST", "/v1/completions", {
        "prompt": "It shows", "images": [png], "max_tokens": 2, "temperature": 0})
    assert status == 200 and json.loads(body)["usage"]["prompt_tokens"] > 64
    assert "images" not in headers.get("x-koboldlite-ignored", "")


def test_model_listings_say_what_a_model_reads(vision_server, server):
    import ollama
    assert "vision" in ollama.Client(host=vision_server.base).show("x").capabilities
    assert "vision" not in server.json("POST", "/api/show", {"model": "x"})["capabilities"]
    listed = vision_server.json("GET", "/v1/models")["data"][0]
    assert listed["architecture"]["input_modalities"] == ["text", "image"]


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


@pytest.fixture
def image_host():
    """A real HTTP server on loopback with one PNG at /cat.png and a redirect to it at /moved."""
    import http.server
    import threading
    png = media_files.png(26, 26, seed=13)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "/cat.png")
                self.end_headers()
                return
            self.send_response(200 if self.path == "/cat.png" else 404)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(png if self.path == "/cat.png" else b"")

        def log_message(self, *args):
            pass
    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{host.server_address[1]}", png
    host.shutdown()


def test_image_addresses_are_fetched_only_as_the_operator_allows(starter_model, projectors, vision_server,
                                                                 image_host):
    """--mediaurls: off (the default: refused, naming the option), public (a loopback or LAN address refused, 403),
    any (fetched: the same reply as the same image sent as data). Redirects are not followed."""
    base, png = image_host

    def ask(server, url):
        return server.request("POST", "/v1/chat/completions", {"temperature": 0, "max_tokens": 6, "seed": 1,
                              "messages": [{"role": "user", "content": [
                                  {"type": "text", "text": "What is in this picture?"},
                                  {"type": "image_url", "image_url": {"url": url}}]}]})
    code, _, body = ask(vision_server, base + "/cat.png")
    assert code == 400 and b"--mediaurls public" in body
    public = media_server(starter_model, projectors["vision"], "--mediaurls", "public")
    try:
        for url in (base + "/cat.png", "http://localhost:9/x.png", "http://192.168.1.1/x.png", "http://[::1]/x.png"):
            code, _, body = ask(public, url)
            assert code == 403 and b"--mediaurls any" in body, (url, body)
    finally:
        public.stop()
    anywhere = media_server(starter_model, projectors["vision"], "--mediaurls", "any")
    try:
        code, _, fetched = ask(anywhere, base + "/cat.png")
        assert code == 200
        code, _, sent = ask(anywhere, data_uri(png, "image/png"))
        assert json.loads(fetched)["choices"][0]["message"]["content"] == \
            json.loads(sent)["choices"][0]["message"]["content"]
        code, _, body = ask(anywhere, base + "/moved")
        assert code == 502 and b"redirects are not followed" in body
        code, _, body = ask(anywhere, base + "/missing.png")
        assert code == 502 and b"404" in body
    finally:
        anywhere.stop()


def test_an_audio_projector_llama_cpp_would_abort_on_is_not_used_for_audio():
    """clip.cpp aborts the whole process on every clip of an ultravox projector whose stack factor does not divide
    1,500 frames (a real Ultravox's 8): such a projector's audio is left out, with the reason."""
    from koboldlite.engine.projector import audio_abort_reason
    assert audio_abort_reason({"clip.projector_type": "ultravox", "clip.audio.projector.stack_factor": 15}) is None
    reason = audio_abort_reason({"clip.projector_type": "ultravox", "clip.audio.projector.stack_factor": 8})
    assert "188" in reason and "187" in reason
    assert audio_abort_reason({"clip.projector_type": "mlp"}) is None


def test_an_aborting_audio_projector_loads_without_audio(starter_model, tmp_path):
    path = str(tmp_path / "ultravox8.gguf")
    media_models.audio(path, stack=8)
    s = media_server(starter_model, path)
    try:
        assert any("audio left out" in line for line in s.lines), s.lines
        code, _, body = s.request("POST", "/v1/chat/completions", {"max_tokens": 2, "messages": [
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {
                "data": base64.b64encode(media_files.wav(1.0)).decode(), "format": "wav"}}]}]})
        assert code == 400 and b"audio input is not supported" in body
        assert s.json("GET", "/props")["modalities"]["audio"] is False
    finally:
        s.stop()


def test_two_image_chats_at_once_and_their_second_turns_read_only_new_words(starter_model, projectors):
    """--parallel 2 in a shared pool: two image chats at once, then both second turns at once; each image is
    encoded once (the log counts the chunks encoded), and each second turn reads its image from the cache."""
    from tests.harness import in_thread, result_of
    s = ServerProcess(["--model", starter_model, "--contextsize", "2048", "--threads", "1", "--nodraft",
                       "--parallel", "2", "--mmproj", projectors["vision"]])
    try:
        def turn(messages):
            return s.json("POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 8, "temperature": 0})

        firsts = [[{"role": "user", "content": [
            {"type": "text", "text": f"Picture {i}: what is in it?"},
            {"type": "image_url", "image_url": {"url": data_uri(media_files.png(30, 30, seed=30 + i), "image/png")}}]}]
            for i in range(2)]
        answers = [result_of(q, 300) for q in [in_thread(turn, m) for m in firsts]]
        assert all(a["usage"]["prompt_tokens"] > 64 for a in answers)
        encoded = s.wait_for_lines("media chunk[(]s[)] encoded", 2)
        assert len(encoded) == 2 and all("1 media chunk(s)" in line for line in encoded), encoded
        seconds = [m + [{"role": "assistant", "content": a["choices"][0]["message"]["content"]},
                        {"role": "user", "content": "And what colours does it have?"}]
                   for m, a in zip(firsts, answers)]
        again = [result_of(q, 300) for q in [in_thread(turn, m) for m in seconds]]
        for first, second in zip(answers, again):
            assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"]
        ended = s.wait_for_lines(" ended: ", 4)
        assert len(ended) == 4 and len([line for line in ended if "media chunk(s) encoded" in line]) == 2, ended
    finally:
        s.stop()


def test_an_image_conversation_comes_back_from_disk_after_a_restart(starter_model, projectors, tmp_path):
    """The disk cache keeps a conversation's cells with its image's placeholders (made from the file's hash, the same
    in every process): after a restart, the next turn with the same image comes from disk, its image not encoded."""
    from tests.test_cache import chat
    folder = str(tmp_path / "cache")
    args = ["--model", starter_model, "--contextsize", "2048", "--threads", "1", "--nodraft",
            "--mmproj", projectors["vision"], "--cachedir", folder]
    words = "A long note about harbours and their lamps, kept for later. " * 20      # past the cache's minimum
    first = [{"role": "user", "content": [{"type": "text", "text": words + "What is in the picture?"},
                                          {"type": "image_url", "image_url": {
                                              "url": data_uri(media_files.png(30, 30, seed=40), "image/png")}}]}]
    s = ServerProcess(args)
    try:
        reply, stats = chat(s, first)
        assert stats["prompt"] > 256
        turn_two = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And its colours?"}]
        expected, _ = chat(s, turn_two)
    finally:
        assert s.stop() == 0
    s = ServerProcess(args)
    try:
        mark = s.mark()
        again, stats = chat(s, turn_two)
        assert stats["source"] == "disk" and stats["cached"] >= stats["prompt"] - 20 and again == expected
        line = s.wait_for_line(r"job \d+ ended: ", start=mark).string
        assert "media chunk" not in line, line
    finally:
        s.stop()


def test_embeddings_of_an_image_are_a_clear_refusal(vision_server):
    code, _, body = vision_server.request("POST", "/v1/embeddings", {"input": [
        {"type": "image_url", "image_url": {"url": data_uri(media_files.png(), "image/png")}}]})
    assert code == 400 and b"embeddings of images are not served" in body
    assert vision_server.json("POST", "/v1/embeddings", {"input": "still serving"})["data"]


def test_an_image_chats_next_turn_is_read_ahead(vision_server):
    """The next-turn read-ahead tokenizes the expected next prompt with the chat's image as the same placeholders
    its slot holds: the guess matches, the turn markers are read while idle, and the next turn reads only the user's
    new words. (A guess that took the image for text would share nothing past it, and read nothing.)"""
    from tests.test_cache import chat
    first = [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": data_uri(media_files.png(30, 30, seed=50), "image/png")}}]}]
    mark = vision_server.mark()
    reply, _ = chat(vision_server, first)
    read = int(vision_server.wait_for_line(r"read slot 0's next turn ahead \((\d+) tokens\)", start=mark).group(1))
    _, stats = chat(vision_server, first + [{"role": "assistant", "content": reply},
                                            {"role": "user", "content": "And the colours?"}])
    new_words = vision_server.json("POST", "/api/extra/tokencount",
                                   {"prompt": "And the colours?<|im_end|>\n<|im_start|>assistant\n"})["value"]
    assert read >= 5 and stats["source"] == "slot" and stats["prompt"] - stats["cached"] <= new_words


def test_transcription_honours_the_password(make_server):
    s = make_server("--password", "hunter2", tls=False)
    wav = media_files.wav(1.0)
    for k, (path, body, headers) in enumerate((
            ("/api/extra/transcribe", {"audio_data": data_uri(wav, "audio/wav")}, {}),
            ("/v1/audio/transcriptions", b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
             b"\r\n" + wav + b"\r\n--b--\r\n", {"Content-Type": "multipart/form-data; boundary=b"}))):
        status, _, _ = s.request("POST", path, body, headers, source=f"127.0.2.{k + 1}")
        assert status == 401, path
        status, _, answer = s.request("POST", path, body, {**headers, "Authorization": "Bearer hunter2"})
        assert status == 400 and b"does not hear audio" in answer, answer      # past the gate: no projector


def test_an_images_detail_is_named_as_ignored(vision_server):
    """The projector reads every image at its one resolution: a `detail` that asks for another is named."""
    image = data_uri(media_files.png(20, 20, seed=60), "image/png")
    _, headers, _ = vision_server.request("POST", "/v1/chat/completions", {"max_tokens": 2, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image, "detail": "high"}}]}]})
    assert "detail" in headers.get("x-koboldlite-ignored", "").split(",")
    _, headers, _ = vision_server.request("POST", "/v1/chat/completions", {"max_tokens": 2, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image, "detail": "auto"}}]}]})
    assert "detail" not in headers.get("x-koboldlite-ignored", "")
    _, headers, _ = vision_server.request("POST", "/v1/responses", {"max_output_tokens": 2, "input": [
        {"role": "user", "content": [{"type": "input_image", "image_url": image, "detail": "low"}]}]})
    assert "detail" in headers.get("x-koboldlite-ignored", "").split(",")
