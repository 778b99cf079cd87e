"""A loaded GGUF through llama-cpp-python's low-level bindings: model, vocabulary, one llama context."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import re
import sys
from typing import Callable, NamedTuple

from ..errors import Invalid, ModelLoadError
from ..model_files import model_name_of
from .gpu import GPUDevice
from .llama_build import GGMLRegistry
from .threadpool import ContextPools, CountPools, ThreadpoolUnavailable


class LlamaLog:
    """llama.cpp has one log callback for the whole process. Its lines go to the model loading now (each model
    reads what it allocated from its own lines) and, with --debug, to stderr. The callback object lives as long
    as the process: llama.cpp keeps its pointer, and an unloaded model must not take it along."""

    _callback = None
    _sink: "LlamaModel | None" = None
    _show = False

    @classmethod
    def route_to(cls, lib, model: "LlamaModel", show: bool):
        cls._sink, cls._show = model, show
        if cls._callback is None:
            cls._callback = lib.llama_log_callback(lambda level, text, user: cls._logged(text))
            lib.llama_log_set(cls._callback, None)

    @classmethod
    def _logged(cls, data: bytes):
        text = data.decode("utf-8", errors="replace")
        if cls._show:
            sys.stderr.write(text)
        if cls._sink is not None:
            cls._sink.llama_logged(text)


class ScratchContext(NamedTuple):
    """What a measurement decodes with: LlamaModel.scratch_context's context, in LlamaModel's names."""
    lib: object
    ctx: object
    memory: object
    n_batch: int
    bos: int


class LlamaModel:
    """A loaded GGUF: model, vocabulary and one llama context.

    Tokenizing and detokenizing only read the vocabulary and may run on any
    thread; the context belongs to the generation loop alone.
    """

    KV_TYPES = {0: ("f16", 1), 1: ("q8_0", 8), 2: ("q4_0", 2)}      # quantkv -> (name, ggml type)

    def __init__(self, path: str, n_ctx: int, n_seq: int, n_threads: int, n_gpu_layers: int,
                 n_batch: int = 512, progress: Callable[[float], None] | None = None,
                 show_llama_log: bool = False, shared_kv: bool = False, split_kv: bool = False,
                 flash_attention: bool | None = None, quantkv: int = 0, use_mmap: bool = True, use_mlock: bool = False,
                 devices: list["GPUDevice"] | None = None, main_gpu: int | None = None,
                 tensor_split: list[float] | None = None, row_split: bool = False,
                 threadpool_poll: int | None = None, threadpool_size: int = 0,
                 share_threadpools: CountPools | None = None):
        """`threadpool_poll`, `threadpool_size`: where the build runs ggml's own threads (no OpenMP), the context
        gets threadpools of that poll level, one per thread count up to that size (engine/threadpool.py); None:
        ggml's own pool per decode. `share_threadpools`: instead, those of another model whose context the same
        thread decodes on (a draft model's target's)."""
        import llama_cpp  # loaded here so that --help and bad arguments answer fast
        self.lib = llama_cpp
        self.path = path
        self.name = model_name_of(path)
        self.size_bytes = os.path.getsize(path)
        # llama.cpp's own log: kept (what it allocated is read from it), shown only with --debug.
        self.llama_log: collections.deque[str] = collections.deque(maxlen=4000)
        self._log_partial = ""
        LlamaLog.route_to(llama_cpp, self, show_llama_log)
        _check_gguf_magic(path)
        registry = GGMLRegistry(llama_cpp)
        registry.load_backends()      # a dynamic-backend build's modules (once; plan_gpu did it)
        llama_cpp.llama_backend_init()
        cpu = registry.cpu_backend()
        self.extra_buffers = cpu.extra_buffers_fault is None
        self.openmp = cpu.openmp            # the CPU backend runs OpenMP's threads (None: the build does not say)
        self._load_weights(n_gpu_layers, devices, main_gpu, tensor_split, row_split, use_mmap, use_mlock, progress)
        self._make_context(n_ctx, n_seq, n_threads, n_batch, shared_kv, split_kv, flash_attention, quantkv)
        self.threadpools: ContextPools | None = None
        if cpu.openmp is False and share_threadpools is not None:
            self.threadpools = share_threadpools.attach(self.lib.llama_cpp._lib, self.ctx, n_threads)
        elif cpu.openmp is False and threadpool_poll is not None:
            self._attach_threadpools(registry, max(threadpool_size, n_threads), threadpool_poll, n_threads)
        self._read_vocabulary()

    def _load_weights(self, n_gpu_layers: int, devices: list["GPUDevice"] | None, main_gpu: int | None,
                      tensor_split: list[float] | None, row_split: bool, use_mmap: bool, use_mlock: bool,
                      progress: Callable[[float], None] | None):
        llama_cpp, path = self.lib, self.path
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers          # -1: all (llama.cpp's own convention)
        mparams.use_extra_bufts = self.extra_buffers  # AMX and repacked weights, unless their code would crash
        if devices:        # NULL-terminated; kept alive with the model, llama.cpp reads it while loading
            self._devices = (ctypes.c_void_p * (len(devices) + 1))(*[d.handle for d in devices], None)
            mparams.devices = ctypes.cast(self._devices, ctypes.c_void_p)
        if main_gpu is not None:
            mparams.main_gpu = main_gpu
        if tensor_split:
            self._tensor_split = (ctypes.c_float * llama_cpp.llama_max_devices())(*tensor_split)
            mparams.tensor_split = ctypes.cast(self._tensor_split, ctypes.POINTER(ctypes.c_float))
        if row_split:
            mparams.split_mode = llama_cpp.LLAMA_SPLIT_MODE_ROW
        # llama.cpp's load mode: 1 map the file, 0 read it, 2 read and lock, 3 map and lock; -1 its choice.
        if use_mlock:
            mparams.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP_MLOCK if use_mmap else llama_cpp.LLAMA_LOAD_MODE_MLOCK
        elif not use_mmap:
            mparams.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE
        if progress is not None:
            self._progress_callback = llama_cpp.llama_progress_callback(lambda p, user: (progress(p), True)[1])
            mparams.progress_callback = self._progress_callback
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), mparams)
        if not self.model:
            raise ModelLoadError(f"llama.cpp could not load {path} (damaged or unsupported GGUF?)")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.model)
        offloaded = re.findall(r"offloaded (\d+)/\d+ layers to GPU", "\n".join(self.llama_log))
        self.layers_offloaded = int(offloaded[-1]) if offloaded else 0     # 0: attention runs on the CPU

    def _make_context(self, n_ctx: int, n_seq: int, n_threads: int, n_batch: int, shared_kv: bool, split_kv: bool,
                      flash_attention: bool | None, quantkv: int):
        llama_cpp, path = self.lib, self.path
        self.n_seq = n_seq
        self.n_batch = n_batch
        self.kv_type = self.KV_TYPES[quantkv][0]
        self._kv_ggml_type = self.KV_TYPES[quantkv][1]
        self.flash_attention = flash_attention
        # Shared: the slots share one pool of n_ctx cells (llama.cpp's unified KV cache), each request
        # still up to n_ctx tokens; split: every slot gets its own n_ctx / n_seq (llama.cpp rounds it up
        # to a multiple of 256), which bounds each request; per slot: every slot gets its own n_ctx.
        assert not (shared_kv and split_kv)
        cparams = self._context_params(n_ctx if shared_kv or split_kv else n_ctx * n_seq, n_seq, n_threads, n_batch)
        cparams.kv_unified = shared_kv
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise ModelLoadError(f"llama.cpp could not create a context of {n_ctx} tokens for {path}"
                                 + (" (a quantized KV cache needs flash attention)" if quantkv else ""))
        self.n_ctx = llama_cpp.llama_n_ctx_seq(self.ctx) if split_kv else n_ctx   # what one request may fill
        self.shared_kv = shared_kv
        self.pool_tokens = llama_cpp.llama_n_ctx(self.ctx)   # KV cells in all: what llama.cpp allocated
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.can_shift = bool(llama_cpp.llama_memory_can_shift(self.memory))
        # A plain attention KV cache, whose cells a shared pool can lay out anew (recurrent state is not cells).
        self.attention_only = not (llama_cpp.llama_model_is_recurrent(self.model)
                                   or llama_cpp.llama_model_is_hybrid(self.model))

    def _context_params(self, n_cells: int, n_seq: int, n_threads: int, n_batch: int):
        """A context's parameters: these sizes, and this model's attention and KV type."""
        cparams = self.lib.llama_context_default_params()
        cparams.n_ctx = n_cells
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.no_perf = True
        cparams.flash_attn_type = {True: 1, False: 0, None: -1}[self.flash_attention]     # None: llama.cpp's auto
        cparams.type_k = cparams.type_v = self._kv_ggml_type
        return cparams

    @contextlib.contextmanager
    def scratch_context(self, n_tokens: int, n_threads: int):
        """A second, small context of these weights (its own `n_tokens` cells, one sequence, the model's attention
        and KV type, decoding on the model's threadpools where it has them), freed on leaving: for a measurement
        that must leave the slots' cache as it is (engine/drafting.py's step costs). The caller holds the llama
        lock on the thread that makes every decode."""
        n_batch = min(self.n_batch, n_tokens)
        ctx = self.lib.llama_init_from_model(self.model, self._context_params(n_tokens, 1, n_threads, n_batch))
        if not ctx:
            raise ModelLoadError(f"llama.cpp could not create a scratch context of {n_tokens} tokens")
        pools = self.threadpools.shared.attach(self.lib.llama_cpp._lib, ctx, n_threads) if self.threadpools else None
        try:
            yield ScratchContext(self.lib, ctx, self.lib.llama_get_memory(ctx), n_batch, self.bos)
        finally:
            self.lib.llama_free(ctx)
            if pools is not None:
                pools.release()           # after the context: its last decode has ended

    def _attach_threadpools(self, registry: GGMLRegistry, size: int, poll: int, n_threads: int):
        try:
            self.threadpools = CountPools(registry, size, poll).attach(self.lib.llama_cpp._lib, self.ctx, n_threads)
        except ThreadpoolUnavailable as e:
            print(f"CPU: {e}: ggml makes a pool for each decode, and --cpuwait does not reach it", file=sys.stderr)

    def set_threads(self, count: int):
        """The thread count of the context's next decodes (read when the next graph runs: free to change between
        decodes), on that count's threadpool where it has its own."""
        self.lib.llama_set_n_threads(self.ctx, count, count)
        if self.threadpools is not None:
            self.threadpools.use(count)

    def _read_vocabulary(self):
        llama_cpp = self.lib
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.bos = llama_cpp.llama_vocab_bos(self.vocab)
        self.eos = llama_cpp.llama_vocab_eos(self.vocab)
        self.eog_tokens = [t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t)]
        self._eog = frozenset(self.eog_tokens)
        self._pieces: dict[tuple[int, bool], bytes] = {}

    def llama_logged(self, text: str):
        self._log_partial += text
        *lines, self._log_partial = self._log_partial.split("\n")
        self.llama_log.extend(lines)

    def close(self):
        """Free the context and the weights (an unloaded model). Nothing may use this model after it."""
        if getattr(self, "ctx", None):
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "threadpools", None):
            self.threadpools.release()        # after the context: its last decode has ended
            self.threadpools = None
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = None

    def memory_report(self) -> dict:
        """What llama.cpp says it allocated: the KV cache and compute buffers, from its own log."""
        log = "\n".join(self.llama_log)
        mib = lambda pattern: sum(float(x) for x in re.findall(pattern, log))     # noqa: E731
        flash = re.findall(r"flash_attn\s+=\s+(\w+)", log)
        mode = re.findall(r"load_mode = ([\w+]+)", log)
        devices: dict[str, dict[str, float]] = {}
        for device, part, size in re.findall(r"(\S+) (model|KV|compute) buffer size =\s+([\d.]+) MiB", log):
            row = devices.setdefault(device, {"model": 0.0, "kv": 0.0, "compute": 0.0})
            row[part.lower()] = round(row[part.lower()] + float(size), 2)
        offloaded = re.findall(r"offloaded (\d+)/(\d+) layers to GPU", log)
        return {"model_mib": round(self.lib.llama_model_size(self.model) / 2**20, 1),
                "devices": devices,            # MiB of model, KV cache and compute buffers per llama.cpp buffer
                "layers_offloaded": int(offloaded[-1][0]) if offloaded else 0,
                "layers_total": int(offloaded[-1][1]) if offloaded else 0,
                "kv_cache_mib": mib(r"KV buffer size =\s+([\d.]+) MiB"),
                "compute_mib": mib(r"compute buffer size =\s+([\d.]+) MiB"),
                "kv_cells": self.pool_tokens, "kv_shared": self.shared_kv,
                "kv_types": sorted(set(re.findall(r"[KV] \((\w+)\):", log))),
                "flash_attn": flash[-1] if flash else "", "load_mode": mode[-1] if mode else "",
                "n_batch": self.lib.llama_n_batch(self.ctx), "n_ubatch": self.lib.llama_n_ubatch(self.ctx)}

    def is_end_of_generation(self, token: int) -> bool:
        return token in self._eog

    def tokenize(self, text: str, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8", errors="replace")
        capacity = len(data) + 8
        while True:
            buf = (self.lib.llama_token * capacity)()
            n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, capacity,
                                        add_bos and self.add_bos, parse_special)
            if n >= 0:
                return buf[:n]
            capacity = -n

    def piece(self, token: int, special: bool = False) -> bytes:
        key = (token, special)
        cached = self._pieces.get(key)
        if cached is None:
            buf = ctypes.create_string_buffer(256)
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
            cached = self._pieces[key] = buf.raw[:n]
        return cached

    def detokenize(self, tokens: list[int], special: bool = False) -> str:
        return b"".join(self.piece(t, special) for t in tokens).decode("utf-8", errors="replace")

    def metadata(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def check_grammar(self, grammar: str):
        """Parse a GBNF grammar once, so that a bad one is a 400 and not a failed generation."""
        sampler = self.lib.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        if not sampler:
            raise Invalid("the grammar could not be parsed (GBNF with a 'root' rule expected)")
        self.lib.llama_sampler_free(sampler)

    def valid_token(self, token: int) -> bool:
        return 0 <= token < self.n_vocab


def _check_gguf_magic(path: str):
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"cannot read model file {path}: {e}") from None
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF model file")


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
