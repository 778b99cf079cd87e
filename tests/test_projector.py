"""A multimodal projector through libmtmd (koboldlite/engine/projector.py), in-process on the starter model and
the tiny projectors tests/media_models.py writes (issue 35): what a file becomes, its placeholders, its
embeddings, and their decode into a sequence."""

from __future__ import annotations

import ctypes

import pytest

from koboldlite.engine.llama_model import LlamaModel
from koboldlite.engine.projector import MediaChunk, Projector
from koboldlite.errors import RequestError
from koboldlite.media import MediaKind, read_media
from tests import media_files, media_models


@pytest.fixture(scope="module")
def model(starter_model):
    m = LlamaModel(starter_model, n_ctx=512, n_seq=1, n_threads=1, n_gpu_layers=0)
    yield m
    m.close()


def loaded_projector(model, tmp_path_factory, kind: str):
    """One of tests/media_models.py's projectors, written and loaded beside the model; closed at the end."""
    path = str(tmp_path_factory.mktemp("mmproj") / f"{kind}.gguf")
    getattr(media_models, kind)(path)
    p = Projector(path, model, n_threads=1, use_gpu=False)
    yield p
    p.close()


@pytest.fixture(scope="module")
def vision(model, tmp_path_factory):
    yield from loaded_projector(model, tmp_path_factory, "vision")


@pytest.fixture(scope="module")
def audio(model, tmp_path_factory):
    yield from loaded_projector(model, tmp_path_factory, "audio")


def chunks_of(projector: Projector, data: bytes) -> list:
    return projector.media_pieces(read_media(data, "x"), "x")


def decode_embeddings(model: LlamaModel, embd, n_tokens: int, pos: int) -> list[float]:
    """The chunk's embeddings decoded into sequence 0 at pos..; the logits after its last position."""
    lib = model.lib
    width = lib.llama_model_n_embd_inp(model.model)
    batch = lib.llama_batch_init(n_tokens, width, 1)
    try:
        ctypes.memmove(batch.embd, embd, n_tokens * width * ctypes.sizeof(ctypes.c_float))
        for i in range(n_tokens):
            batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = pos + i, 1, 0, i == n_tokens - 1
        batch.n_tokens = n_tokens
        assert lib.llama_decode(model.ctx, batch) == 0
        logits = lib.llama_get_logits_ith(model.ctx, -1)
        return [logits[i] for i in range(model.n_vocab)]
    finally:
        lib.llama_batch_free(batch)
        lib.llama_memory_seq_rm(model.memory, 0, -1, -1)


def test_what_the_projectors_read(vision, audio):
    assert vision.kinds == (MediaKind.IMAGE,) and audio.kinds == (MediaKind.AUDIO,)
    assert audio.sample_rate == 16000 and not vision.mrope
    assert "reads image" in vision.describe()


def test_an_image_is_one_chunk_of_64_with_placeholders_of_its_own(vision):
    (a,) = chunks_of(vision, media_files.png(40, 30, seed=1))
    (a2,) = chunks_of(vision, media_files.png(40, 30, seed=1))
    (b,) = chunks_of(vision, media_files.png(40, 30, seed=2))
    assert isinstance(a, MediaChunk) and a.n_tokens == 64 and a.kind is MediaKind.IMAGE
    assert a.placeholders() == a2.placeholders() and a.placeholders()[0] != b.placeholders()[0]
    assert all(t < 0 for t in a.placeholders()) and len(set(a.placeholders())) == 64
    for c in (a, a2, b):
        vision.release(c)


def test_different_images_give_different_logits_and_the_same_image_the_same(model, vision):
    def logits_for(seed):
        (c,) = chunks_of(vision, media_files.png(40, 30, seed=seed))
        try:
            return decode_embeddings(model, vision.encode(c), c.n_tokens, 0)
        finally:
            vision.release(c)
    one, again, other = logits_for(1), logits_for(1), logits_for(2)
    assert one == pytest.approx(again, abs=1e-3)
    assert max(abs(x - y) for x, y in zip(one, other)) > 1e-2


def test_audio_is_100_tokens_a_30_s_chunk(audio):
    pieces = chunks_of(audio, media_files.wav(2.0))
    media = [p for p in pieces if isinstance(p, MediaChunk)]
    assert [c.n_tokens for c in media] == [100] and media[0].kind is MediaKind.AUDIO
    for c in media:
        audio.release(c)


def test_a_kind_the_projector_cannot_read_is_a_400(vision, audio):
    with pytest.raises(RequestError, match="audio input is not supported by this model's projector"):
        chunks_of(vision, media_files.wav(1.0))
    with pytest.raises(RequestError, match="image input is not supported"):
        chunks_of(audio, media_files.png())


def test_a_projector_for_another_width_is_a_load_error(model, tmp_path):
    from koboldlite.errors import ModelLoadError
    path = str(tmp_path / "wide.gguf")
    saved = media_models.N_TEXT
    media_models.N_TEXT = 640          # Gemma 3 270M's width, not the starter's 576
    try:
        media_models.vision(path)
    finally:
        media_models.N_TEXT = saved
    with pytest.raises(ModelLoadError, match="could not load the projector"):
        Projector(path, model, n_threads=1, use_gpu=False)


def test_a_context_shift_drops_or_keeps_an_image_whole(model, vision):
    """A full context drops the older half of what follows the kept front; a cut that would fall inside an image's
    run of placeholders moves past it, so the cache never holds half an image (the model would read half its
    embeddings). Here the first image lies across the first shift's cut, in a 512-cell context the reply runs past."""
    from koboldlite.engine.engine import Engine
    from koboldlite.generation import GenerationRequest, SamplerSettings
    from koboldlite.media import MEDIA_MARKER
    from koboldlite.engine.kv_pool import media_run_end
    assert media_run_end([1, -5, -6, -7, 2], 2) == 4 and media_run_end([1, -5, -6, 2], 1) == 1
    engine = Engine(model, projector=vision)
    images = [read_media(media_files.png(16, 16, seed=s), "x") for s in (21, 22)]
    # The first shift cuts at 256 of 512: the first image is placed across it (from about 224 to 288).
    before = "Two pictures."
    while len(model.tokenize(before)) < 224:
        before += " Words before the first."
    prompt = before + MEDIA_MARKER + " and " + "words between them. " * 10 + MEDIA_MARKER + " Describe both."
    job = engine.prepare(GenerationRequest(prompt, max_length=400, media=images,
                                           sampler=SamplerSettings(temperature=0, ban_eos=True)))
    assert engine.admit(job)
    slot = next(s for s in engine.slots if s.job is job)
    shifts_seen = 0
    while not job.buffer.done:
        engine.step()
        runs = [len(r) for r in _negative_runs(slot.cached)]
        assert all(n == 64 for n in runs), runs          # whole images only
        shifts_seen = job.stats.shifted_tokens
    assert shifts_seen > 0 and job.stats.generated_tokens == 400


def _negative_runs(tokens: list[int]) -> list[list[int]]:
    runs, run = [], []
    for t in tokens:
        if t < 0:
            run.append(t)
        elif run:
            runs.append(run)
            run = []
    return runs + ([run] if run else [])
