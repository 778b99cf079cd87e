"""What a request's images and audio must be before llama.cpp sees them (koboldlite/media.py): known formats only,
headers read and capped, clear 4xx for the rest (issue 35)."""

from __future__ import annotations

import base64

import pytest

from koboldlite.errors import RequestError
from koboldlite.media import (MAX_AUDIO_SECONDS, MediaKind, decode_base64, read_media)
from tests import media_files


def refused(data: bytes, status: int = 400, **kw) -> str:
    with pytest.raises(RequestError) as e:
        read_media(data, "images[0]", **kw)
    assert e.value.status == status, e.value
    assert str(e.value).startswith("images[0]: ")
    return str(e.value)


@pytest.mark.parametrize("make, fmt, size", [
    (lambda: media_files.png(32, 24), "png", (32, 24)),
    (lambda: media_files.gif(4, 3), "gif", (4, 3)),
    (lambda: media_files.bmp(2, 2), "bmp", (2, 2)),
    (lambda: media_files.jpeg_frame(640, 488), "jpeg", (640, 488)),
])
def test_images_are_known_by_their_bytes_and_sized_by_their_headers(make, fmt, size):
    item = read_media(make(), "images[0]")
    assert (item.kind, item.format, (item.width, item.height)) == (MediaKind.IMAGE, fmt, size)


def test_wav_length_comes_from_its_header():
    item = read_media(media_files.wav(1.5), "audio[0]")
    assert item.kind is MediaKind.AUDIO and item.format == "wav" and item.seconds == pytest.approx(1.5)


def test_unknown_formats_never_reach_the_decoder():
    assert "not a file this server reads" in refused(b"<html><script>alert(1)</script>", 415)
    assert "not a file this server reads" in refused(b"\x00\x00\x00\x18ftypmp42" + b"\0" * 64, 415)   # video


def test_a_truncated_or_lying_image_is_a_400():
    whole = media_files.png(16, 16)
    assert "truncated or damaged" in refused(whole[:len(whole) // 2])
    assert "truncated or damaged" in refused(media_files.jpeg_frame(10, 10)[:-2])
    assert "more than this server decodes" in refused(media_files.png_header_claiming(100_000, 100_000), 413)
    assert "0x5 pixels" in refused(media_files.png_header_claiming(0, 5))


def test_audio_that_claims_more_than_it_holds_or_too_little_is_refused():
    good = media_files.wav(1.0)
    data_at = good.index(b"data")
    lying = good[:data_at + 4] + (2**31).to_bytes(4, "little") + good[data_at + 8:]
    assert "truncated or damaged" in refused(lying)
    assert "too short" in refused(media_files.wav(0.01))


def test_long_audio_is_a_413():
    rate = 8000
    body = media_files.wav(0.2, rate=rate)
    data_at = body.index(b"data")
    samples = body[data_at + 8:]
    n = int((MAX_AUDIO_SECONDS + 60) * rate * 2)
    long = body[:4] + (36 + n).to_bytes(4, "little") + body[8:data_at + 4] + n.to_bytes(4, "little") \
        + samples * (n // len(samples) + 1)
    assert "minutes" in refused(long[:data_at + 8 + n], 413)


def test_only_the_kind_asked_for():
    assert "audio (wav) where image was expected" in refused(media_files.wav(1.0), 415, allowed=(MediaKind.IMAGE,))


def test_base64_bare_or_as_a_data_uri():
    raw = media_files.png()
    b64 = base64.b64encode(raw).decode()
    assert decode_base64(b64, "x") == raw
    assert decode_base64("data:image/png;base64," + b64, "x") == raw
    assert decode_base64(b64[:40] + "\n" + b64[40:], "x") == raw       # line breaks, as some clients wrap


@pytest.mark.parametrize("value, says", [
    ("", "expected a base64 string"), (None, "expected a base64 string"), (12, "expected a base64 string"),
    ("not base64!", "not valid base64"), ("data:image/png,rawbytes", "must be base64-encoded"),
    ("https://example.com/cat.png", "does not fetch addresses"), ("file:///etc/passwd", "does not fetch addresses"),
])
def test_bad_base64_is_a_400_that_says_why(value, says):
    with pytest.raises(RequestError) as e:
        decode_base64(value, "messages[0].content[1]")
    assert e.value.status == 400 and says in str(e.value) and str(e.value).startswith("messages[0].content[1]: ")


def test_a_projector_is_found_beside_its_model(tmp_path):
    from koboldlite.model_files import find_projector
    for name in ("gemma-3-4b-it-Q4_K_M.gguf", "mmproj-gemma-3-4b-it-f16.gguf", "qwen2.5-7b.gguf",
                 "SmolLM2.gguf", "SmolLM2.mmproj.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    assert find_projector(str(tmp_path / "gemma-3-4b-it-Q4_K_M.gguf")).endswith("mmproj-gemma-3-4b-it-f16.gguf")
    assert find_projector(str(tmp_path / "SmolLM2.gguf")).endswith("SmolLM2.mmproj.gguf")
    assert find_projector(str(tmp_path / "qwen2.5-7b.gguf")) is None       # another model's projector: not taken
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "model-q4.gguf").write_bytes(b"GGUF")
    (alone / "mmproj-model-f16.gguf").write_bytes(b"GGUF")
    assert find_projector(str(alone / "model-q4.gguf")).endswith("mmproj-model-f16.gguf")   # one model, one projector


def test_mmproj_names_the_default_models_projector_and_listings_read_the_others(tmp_path):
    """--mmproj binds to the default model; another model of the folder takes its own projector (found beside it,
    or its preset's); a listing says what each reads from its projector file's header, without loading it."""
    import json
    from koboldlite.config import PRESETS_FILE, load_config
    from koboldlite.service.catalog import ModelCatalog
    from tests import media_models
    for name in ("alpha.gguf", "beta.gguf", "gamma.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    media_models.vision(str(tmp_path / "beta.mmproj.gguf"))
    media_models.audio(str(tmp_path / "mmproj-ears.gguf"))
    (tmp_path / PRESETS_FILE).write_text(json.dumps({"gamma": {"mmproj": str(tmp_path / "mmproj-ears.gguf")}}))
    config = load_config(["--modeldir", str(tmp_path), "--model", str(tmp_path / "alpha.gguf"),
                          "--mmproj", str(tmp_path / "beta.mmproj.gguf")])
    catalog = ModelCatalog(config)
    alpha, beta, gamma = (catalog.find(n) for n in ("alpha", "beta", "gamma"))
    assert alpha.config(config).mmproj == str(tmp_path / "beta.mmproj.gguf")
    assert beta.config(config).mmproj is None and gamma.config(config).mmproj == str(tmp_path / "mmproj-ears.gguf")
    assert alpha.modalities(config) == {"vision": True, "audio": False}
    assert beta.modalities(config) == {"vision": True, "audio": False}     # its own, found beside it
    assert gamma.modalities(config) == {"vision": False, "audio": True}
    assert catalog.find("mmproj-ears") is None          # a projector is not a model
