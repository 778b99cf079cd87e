"""A multimodal projector (an mmproj GGUF) beside a loaded model, through llama.cpp's libmtmd: what it reads
(images, audio), turning one image or audio file into the chunks the model reads, and encoding a chunk into
the embeddings the generation loop decodes.

Who calls what: ServedModel loads a Projector after its LlamaModel. A request's own thread calls media_pieces()
(libmtmd's tokenizing and preprocessing are thread-safe); the generation thread calls encode() before it decodes
a media chunk into a slot's sequence (encoding is not thread-safe: a lock keeps one at a time, and the output is
copied before the next). A media chunk stands in a slot's token list as a run of placeholder ids, negative, made
from the file's SHA-256, so that the same image in a later prompt matches the cache and a different one does not.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import threading
import weakref

from ..errors import ModelLoadError, RequestError
from ..media import MediaItem, MediaKind
from .gguf_layout import GGUFLayout
from .llama_model import LlamaModel


def audio_abort_reason(metadata: dict) -> str | None:
    """Why llama.cpp's clip code would abort the process on every audio chunk of this projector, if it would: an
    ultravox projector whose stack factor does not divide the 1,500 encoder frames of a 30 s chunk makes its graph
    one token longer than the count it checks (a real Ultravox, factor 8: 188 against 187)."""
    stack = metadata.get("clip.audio.projector.stack_factor")
    if metadata.get("clip.projector_type") != "ultravox" or not isinstance(stack, int) or stack <= 0:
        return None
    made, expected = -(-1500 // stack), (-(-3000 // stack) * stack) // stack // 2
    if made == expected:
        return None
    return (f"audio left out: llama.cpp would end the whole server on every clip (this ultravox projector's stack "
            f"factor {stack} makes {made} tokens a chunk where llama.cpp checks for {expected})")


@dataclasses.dataclass(eq=False)
class MediaChunk:
    """One chunk of a media file as the model reads it: n_tokens embeddings, decoded at n_tokens positions."""
    kind: MediaKind
    media_id: str                 # the file's SHA-256 (libmtmd's bitmap id)
    index: int                    # its place among the chunks of that file (an audio file: one per 30 s)
    n_tokens: int
    handle: int                   # an owned mtmd_input_chunk, freed with this object (or by Projector.release)

    def placeholders(self) -> list[int]:
        """The ids that stand for its positions in a token list: negative, never a vocabulary token, and within
        int32 like every token (the prompt cache stores them so)."""
        base = int(self.media_id[:12], 16) * 64 + self.index
        return [-(1 + (base * 4099 + i) % ((1 << 31) - 2)) for i in range(self.n_tokens)]


# What a prompt is made of once its media are read: token lists and media chunks, in order.
Piece = "list[int] | MediaChunk"


class Projector:
    """libmtmd's context for one model: loaded once, freed with the model."""

    def __init__(self, path: str, model: LlamaModel, n_threads: int, use_gpu: bool):
        try:
            import llama_cpp.mtmd_cpp as mtmd    # from the llama.cpp build already loaded (see llama_build)
        except (OSError, RuntimeError, FileNotFoundError) as e:
            raise ModelLoadError(f"this llama.cpp build has no libmtmd, which a projector needs ({e}); rebuild it "
                                 f"with tools/build_llama_lib.sh") from None
        self.mtmd, self.path, self.model = mtmd, path, model
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads
        params.print_timings = False
        params.warmup = True
        self._marker = f"<__media_{os.urandom(8).hex()}__>".encode()   # never in a client's text
        params.media_marker = self._marker
        self.ctx = mtmd.mtmd_init_from_file(path.encode(), model.model, params)
        if not self.ctx:
            raise ModelLoadError(f"llama.cpp could not load the projector {path} for {model.name} (a projector made "
                                 f"for another model, whose width differs, is refused; --debug shows llama.cpp's "
                                 f"reason)")
        self.vision = bool(mtmd.mtmd_support_vision(self.ctx))
        self.audio = bool(mtmd.mtmd_support_audio(self.ctx))
        self.audio_refused = audio_abort_reason(GGUFLayout(path).metadata) if self.audio else None
        self.audio = self.audio and self.audio_refused is None
        self.sample_rate = mtmd.mtmd_get_audio_sample_rate(self.ctx)
        self.mrope = bool(mtmd.mtmd_decode_use_mrope(self.ctx))
        if self.mrope:       # positions in 2-D per token: not what this engine's batches, shifts and reuse keep
            mtmd.mtmd_free(self.ctx)
            raise ModelLoadError(f"{os.path.basename(path)}: {model.name} places media by M-RoPE (Qwen-VL and its "
                                 f"kind), which KoboldLite does not serve yet")
        self.size_bytes = os.path.getsize(path)
        self._encoding = threading.Lock()

    @property
    def kinds(self) -> tuple[MediaKind, ...]:
        return tuple(k for k, on in ((MediaKind.IMAGE, self.vision), (MediaKind.AUDIO, self.audio)) if on)

    def describe(self) -> str:
        reads = " and ".join(k.value for k in self.kinds) or "nothing it can use"
        refused = f"; {self.audio_refused}" if self.audio_refused else ""
        return f"projector {os.path.basename(self.path)}: reads {reads}, {self.size_bytes / 2**20:.0f} MiB{refused}"

    def media_pieces(self, item: MediaItem, where: str) -> list:
        """One image or audio file as the model reads it: its begin/end text as tokens (a projector's own
        <start_of_image>, say) and its media chunks. A RequestError if this projector cannot read it."""
        mtmd = self.mtmd
        if item.kind not in self.kinds:
            raise RequestError(f"{where}: {item.kind.value} input is not supported by this model's projector "
                               f"(it reads {' and '.join(k.value for k in self.kinds) or 'neither'})")
        buf = (ctypes.c_uint8 * len(item.data)).from_buffer_copy(item.data)
        bitmap = mtmd.mtmd_helper_bitmap_init_from_buf(self.ctx, buf, len(item.data), False)
        if not bitmap:
            raise RequestError(f"{where}: the {item.format} file could not be decoded")
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            if item.kind is MediaKind.AUDIO and mtmd.mtmd_bitmap_get_nx(bitmap) < self.sample_rate // 10:
                raise RequestError(f"{where}: the audio is too short to hear")
            text = mtmd.mtmd_input_text(self._marker, len(self._marker), False, True)
            status = mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text),
                                        (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
            if status != 0:
                raise RequestError(f"{where}: the {item.format} file could not be prepared for the model")
            media_id = hashlib.sha256(item.data).hexdigest()
            return self._pieces(chunks, media_id, item.kind)
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)

    def _pieces(self, chunks, media_id: str, kind: MediaKind) -> list:
        mtmd = self.mtmd
        pieces, index = [], 0
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t(0)
                tokens = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                if n.value:
                    pieces.append([tokens[j] for j in range(n.value)])
                continue
            owned = mtmd.mtmd_input_chunk_copy(chunk)
            media = MediaChunk(kind, media_id, index, mtmd.mtmd_input_chunk_get_n_tokens(chunk), owned)
            # Freed when the request is gone, however it ended (a job never admitted holds its chunks too).
            media._free = weakref.finalize(media, mtmd.mtmd_input_chunk_free, owned)
            pieces.append(media)
            index += 1
        return pieces

    def encode(self, chunk: MediaChunk) -> ctypes.Array:
        """Its embeddings, n_tokens x the model's input width, as floats of our own (libmtmd's buffer is reused by
        the next encode). Generation thread only."""
        with self._encoding:
            if self.mtmd.mtmd_encode_chunk(self.ctx, chunk.handle) != 0:
                raise RequestError(f"the {chunk.kind.value} could not be encoded by the projector", status=500)
            width = self.model.lib.llama_model_n_embd_inp(self.model.model)
            n = chunk.n_tokens * width
            out = (ctypes.c_float * n)()
            ctypes.memmove(out, self.mtmd.mtmd_get_output_embd(self.ctx), n * ctypes.sizeof(ctypes.c_float))
            return out

    def non_causal(self, chunk: MediaChunk) -> bool:
        """Whether this chunk's decode needs attention in both directions (Gemma 3's images)."""
        return bool(self.mtmd.mtmd_decode_use_non_causal(self.ctx, chunk.handle))

    def release(self, chunk: MediaChunk):
        """Free its pixels (or samples) now rather than when it is collected."""
        if chunk.handle:
            chunk._free()
            chunk.handle = 0

    def close(self):
        if self.ctx:
            self.mtmd.mtmd_free(self.ctx)
            self.ctx = None


def decode_media(model: LlamaModel, projector: Projector, chunk: MediaChunk, seq_id: int, pos: int) -> int:
    """Encode a media chunk and decode its embeddings into one sequence at pos..pos+n_tokens-1, in a decode of
    its own (llama.cpp takes no batch that mixes tokens and embeddings); llama_decode's status. Generation thread,
    under the llama lock."""
    lib = model.lib
    embd = projector.encode(chunk)
    width = lib.llama_model_n_embd_inp(model.model)
    batch = lib.llama_batch_init(chunk.n_tokens, width, 1)
    non_causal = projector.non_causal(chunk)
    try:
        ctypes.memmove(batch.embd, embd, chunk.n_tokens * width * ctypes.sizeof(ctypes.c_float))
        for i in range(chunk.n_tokens):
            batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = pos + i, 1, seq_id, False
        batch.n_tokens = chunk.n_tokens
        if non_causal:                   # Gemma 3's image tokens see each other both ways
            lib.llama_set_causal_attn(model.ctx, False)
        return lib.llama_decode(model.ctx, batch)
    finally:
        if non_causal:
            lib.llama_set_causal_attn(model.ctx, True)
        lib.llama_batch_free(batch)
