"""Embeddings, from a llama context of their own."""

from __future__ import annotations

import threading
from typing import Callable

from ..errors import Failed, ModelLoadError
from .llama_model import LlamaModel


class Embedder:
    """Embeddings from a llama context of their own (embeddings on, pooled as the GGUF says, or mean
    pooling for a chat model that says nothing), on the loaded model's weights or a second GGUF.

    It has its own lock and runs on the calling request's thread, beside the generation loop: the two
    never share a context, so an embedding request does not wait for a reply to finish; they share
    the CPU cores while it is computed.
    """

    def __init__(self, model: LlamaModel, n_ctx: int, n_threads: int):
        lib = model.lib
        self.lib, self.model = lib, model
        self.n_ctx = max(32, min(n_ctx, model.n_ctx_train or n_ctx))
        self.n_embd = lib.llama_model_n_embd(model.model)
        self.encoder = bool(lib.llama_model_has_encoder(model.model))
        self.ctx = self._context(lib.LLAMA_POOLING_TYPE_UNSPECIFIED, n_threads)
        if lib.llama_pooling_type(self.ctx) == lib.LLAMA_POOLING_TYPE_NONE:
            lib.llama_free(self.ctx)                   # a chat model: mean of its last hidden states
            self.ctx = self._context(lib.LLAMA_POOLING_TYPE_MEAN, n_threads)
        self.pooling = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}.get(lib.llama_pooling_type(self.ctx), "?")
        self.batch = lib.llama_batch_init(self.n_ctx, 0, 1)
        self.lock = threading.Lock()

    MAX_CONTEXT = 4096       # an embedding input is cut to this (or the model's context, if smaller)

    @classmethod
    def made_for(cls, model: LlamaModel, contextsize: int, threads: int, log: Callable[[str], None]) -> "Embedder":
        """The embedding context of a model, made on first use (it costs memory chat alone never needs)."""
        embedder = cls(model, min(contextsize, cls.MAX_CONTEXT), threads)
        log(f"embeddings: {model.name}, {embedder.pooling} pooling, {embedder.n_embd} dimensions, "
            f"up to {embedder.n_ctx} tokens an input")
        return embedder

    def close(self):
        with self.lock:
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)

    def _context(self, pooling: int, n_threads: int):
        cparams = self.lib.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = self.n_ctx   # one input: one batch
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.embeddings = True
        cparams.pooling_type = pooling
        cparams.no_perf = True
        ctx = self.lib.llama_init_from_model(self.model.model, cparams)
        if not ctx:
            raise ModelLoadError("llama.cpp could not create an embedding context")
        return ctx

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Unit-length vectors (as OpenAI, Ollama and llama-server return them) and the tokens read.
        An input longer than the embedding context is cut to fit."""
        import numpy
        lib, vectors, n_tokens = self.lib, [], 0
        with self.lock:
            for text in texts:
                tokens = self.model.tokenize(text, add_bos=True)[:self.n_ctx] or [max(self.model.bos, 0)]
                lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
                for i, t in enumerate(tokens):
                    self.batch.token[i], self.batch.pos[i] = t, i
                    self.batch.n_seq_id[i], self.batch.seq_id[i][0], self.batch.logits[i] = 1, 0, True
                self.batch.n_tokens = len(tokens)
                status = (lib.llama_encode if self.encoder else lib.llama_decode)(self.ctx, self.batch)
                if status != 0:
                    raise Failed(f"llama.cpp could not embed this input ({status})")
                v = numpy.ctypeslib.as_array(lib.llama_get_embeddings_seq(self.ctx, 0), shape=(self.n_embd,))
                v = v.astype(numpy.float64)
                norm = numpy.linalg.norm(v)
                vectors.append((v / norm if norm > 0 else v).tolist())
                n_tokens += len(tokens)
        return vectors, n_tokens
