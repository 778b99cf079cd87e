"""The rest of koboldlite.py, being split into the modules below it."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import errno
import functools
import glob
import gzip
import hashlib
import hmac
import http.client
import http.server
import ipaddress
import itertools
import json
import math
import os
import queue
import re
import secrets
import select
import shutil
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import webbrowser
import zlib
from typing import Any, Callable, Iterator

from .paths import program_folder
from .version import KOBOLDCPP_COMPAT_VERSION, KOBOLD_API_VERSION, __version__
from .errors import ConfigError, ModelLoadError, RequestError
from .model_files import SPLIT_GGUF, is_model_url, model_name_of, scan_model_folder
from .config import (
    BUILTIN_CHAT_TEMPLATES, Config, flash_attention_of, load_config, make_tls_context, normalized_origin,
    read_presets
)
from .desktop import double_click_arguments, is_double_click_start, keep_window_open
from .text import PhraseGuard, ReasoningSplitter, TextAssembler
from .fields import FieldReader, _asks, _more_than_one, ignored_fields
from .generation import (
    GenerationRequest, SAMPLER_REP_PEN, SAMPLER_TEMP, SAMPLER_TFS, SAMPLER_TOP_A, SAMPLER_TOP_K, SAMPLER_TOP_P,
    SAMPLER_TYPICAL, SamplerSettings, context_overflow, parse_sampler_settings
)
from .jobs import Job, JobStats, TokenLogprob


# Fields each API defines that this server does not act on, each with the test of a value that asks for
# something: such a field is named in the log and in X-KoboldLite-Ignored, never dropped in silence.
KOBOLD_IGNORED_FIELDS: dict[str, Callable[[Any], bool]] = {
    "images": _asks, "audio": _asks,                       # no vision or audio model is served
    "n": _more_than_one,                                   # one text per request
    "use_story": _asks, "use_memory": _asks, "use_authors_note": _asks, "use_world_info": _asks,
    "negative_prompt": _asks, "guidance_scale": lambda v: v not in (None, 0, 1),
    "grammar_retain_state": _asks,
    "adaptive_target": lambda v: isinstance(v, (int, float)) and v > 0,
}


OPENAI_IGNORED_FIELDS: dict[str, Callable[[Any], bool]] = {
    **{k: v for k, v in KOBOLD_IGNORED_FIELDS.items() if k != "n"},   # SillyTavern sends these to /v1 too
    "functions": _asks, "function_call": _asks, "suffix": _asks, "echo": _asks, "best_of": _more_than_one,
    "reasoning_effort": _asks, "modalities": lambda v: v not in (None, ["text"]), "audio": _asks,
    "prediction": _asks, "web_search_options": _asks,
}


OLLAMA_IGNORED_FIELDS: dict[str, Callable[[Any], bool]] = {
    "images": _asks, "context": _asks, "template": _asks, "suffix": _asks,
}


OLLAMA_IGNORED_OPTIONS = ("num_gpu", "main_gpu", "num_thread", "num_batch", "num_keep", "numa", "low_vram",
                          "use_mmap", "use_mlock", "penalize_newline", "vocab_only")


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
                 tensor_split: list[float] | None = None, row_split: bool = False):
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
        llama_cpp.llama_backend_init()

        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers          # -1: all (llama.cpp's own convention)
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

        self.n_seq = n_seq
        self.n_batch = n_batch
        self.kv_type = self.KV_TYPES[quantkv][0]
        cparams = llama_cpp.llama_context_default_params()
        # Shared: the slots share one pool of n_ctx cells (llama.cpp's unified KV cache), each request
        # still up to n_ctx tokens; split: every slot gets its own n_ctx / n_seq (llama.cpp rounds it up
        # to a multiple of 256), which bounds each request; per slot: every slot gets its own n_ctx.
        assert not (shared_kv and split_kv)
        cparams.n_ctx = n_ctx if shared_kv or split_kv else n_ctx * n_seq
        cparams.kv_unified = shared_kv
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.no_perf = True
        cparams.flash_attn_type = {True: 1, False: 0, None: -1}[flash_attention]     # None: llama.cpp's auto
        self.flash_attention = flash_attention
        cparams.type_k = cparams.type_v = self.KV_TYPES[quantkv][1]
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
            raise RequestError("the grammar could not be parsed (GBNF with a 'root' rule expected)")
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


GPU_BUILD_HELP = ("build llama.cpp with a GPU backend beside the CPU one: bash tools/build_llama_lib.sh vulkan "
                  "(any GPU) or cuda (NVIDIA); README: GPUs")


def use_gpu_build():
    """Point llama-cpp-python at a GPU build of llama.cpp when one was made beside this script (or ships inside
    the executable) and LLAMA_CPP_LIB_PATH names none: pip's llama-cpp-python stays the CPU fallback."""
    if not os.environ.get("LLAMA_CPP_LIB_PATH"):
        here = program_folder()
        for folder in ("llama_gpu", ".llama-cuda/lib", ".llama-vulkan/lib"):
            candidate = os.path.join(here, folder)
            if glob.glob(os.path.join(candidate, "*llama.*")):
                os.environ["LLAMA_CPP_LIB_PATH"] = candidate
                break
    folder = os.environ.get("LLAMA_CPP_LIB_PATH")
    # ggml's own libraries from that folder first, by path: the dynamic linker then binds libllama's needs to
    # them by name, never to another build's copies found on a library path (the CPU ones beside them in the
    # executable, say). A backend module whose driver is missing (libggml-cuda without libcuda) is skipped.
    for stem in ("ggml-base", "ggml-cpu", "ggml-vulkan", "ggml-blas", "ggml") if folder else ():
        path = ggml_library(folder, stem)
        if path is not None:
            try:
                ctypes.CDLL(path, mode=getattr(ctypes, "RTLD_GLOBAL", 0))
            except OSError:
                pass


def ggml_library(folder: str, stem: str) -> str | None:
    for name in (f"lib{stem}.so", f"lib{stem}.dylib", f"{stem}.dll"):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


@dataclasses.dataclass
class GPUDevice:
    index: int                # among all devices that are GPUs, in llama.cpp's order
    name: str                 # llama.cpp's: Vulkan0, CUDA0...
    description: str
    backend: str              # Vulkan, CUDA, Metal...
    free: int
    total: int
    handle: int               # ggml_backend_dev_t


class Devices:
    """The backends and GPU devices of the llama.cpp build that llama-cpp-python loaded (ggml's registry).

    A build with dynamic backend loading (GGML_BACKEND_DL, the CUDA build) registers none until its backend
    modules are loaded from its folder; a module whose driver is missing (no NVIDIA driver) is skipped, so
    the CPU module still runs. ggml's Vulkan backend skips CPU-type devices (lavapipe) unless
    GGML_VK_VISIBLE_DEVICES names them."""

    GPU_TYPES = (1, 2)        # GGML_BACKEND_DEVICE_TYPE_GPU, _IGPU

    def __init__(self, llama_cpp_module):
        folder = os.path.dirname(llama_cpp_module.llama_cpp._lib._name)
        self.folder = folder
        ggml = self._load(folder, "ggml")
        base = self._load(folder, "ggml-base")
        for lib, name, res, args in (
                (ggml, "ggml_backend_reg_count", ctypes.c_size_t, []),
                (ggml, "ggml_backend_reg_get", ctypes.c_void_p, [ctypes.c_size_t]),
                (base, "ggml_backend_reg_name", ctypes.c_char_p, [ctypes.c_void_p]),
                (ggml, "ggml_backend_dev_count", ctypes.c_size_t, []),
                (ggml, "ggml_backend_dev_get", ctypes.c_void_p, [ctypes.c_size_t]),
                (base, "ggml_backend_dev_name", ctypes.c_char_p, [ctypes.c_void_p]),
                (base, "ggml_backend_dev_description", ctypes.c_char_p, [ctypes.c_void_p]),
                (base, "ggml_backend_dev_type", ctypes.c_int, [ctypes.c_void_p]),
                (base, "ggml_backend_dev_backend_reg", ctypes.c_void_p, [ctypes.c_void_p]),
                (base, "ggml_backend_dev_memory", None,
                 [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]),
                (ggml, "ggml_backend_load_all_from_path", None, [ctypes.c_char_p])):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        self._ggml, self._base = ggml, base
        if ggml.ggml_backend_reg_count() == 0:
            ggml.ggml_backend_load_all_from_path(folder.encode())
        self.backends = [base.ggml_backend_reg_name(ggml.ggml_backend_reg_get(i)).decode()
                         for i in range(ggml.ggml_backend_reg_count())]
        self.gpus: list[GPUDevice] = []
        for i in range(ggml.ggml_backend_dev_count()):
            dev = ggml.ggml_backend_dev_get(i)
            if base.ggml_backend_dev_type(dev) not in self.GPU_TYPES:
                continue
            free, total = self.memory(dev)
            self.gpus.append(GPUDevice(
                len(self.gpus), base.ggml_backend_dev_name(dev).decode(),
                (base.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
                base.ggml_backend_reg_name(base.ggml_backend_dev_backend_reg(dev)).decode(), free, total, dev))

    @staticmethod
    def _load(folder: str, stem: str) -> ctypes.CDLL:
        return ctypes.CDLL(ggml_library(folder, stem) or f"lib{stem}.so", mode=getattr(ctypes, "RTLD_GLOBAL", 0))

    def memory(self, dev: int) -> tuple[int, int]:
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        self._base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        return free.value, total.value

    BACKEND_FILES = {"vulkan": "Vulkan", "cuda": "CUDA", "metal": "Metal", "hip": "ROCm", "sycl": "SYCL"}

    @property
    def gpu_backends(self) -> list[str]:
        """The GPU backends this build carries, whether or not they found a device: a Vulkan backend with no
        driver at all registers nothing, but its library is there."""
        found = [b for b in self.backends if b not in ("CPU", "BLAS", "RPC")]
        for stem, name in self.BACKEND_FILES.items():
            if name not in found and ggml_library(self.folder, f"ggml-{stem}") is not None:
                found.append(name)
        return found

    def choose(self, backend: str | None, ids: list[int] | None) -> list[GPUDevice]:
        """The devices a request for a backend (and device numbers within it) names; a ConfigError if none."""
        pool = [d for d in self.gpus if backend is None or d.backend.lower() == backend.lower()]
        if backend is not None and not any(b.lower() == backend.lower() for b in self.gpu_backends):
            raise ConfigError(f"this llama.cpp build has no {backend} backend (it has: "
                              f"{', '.join(self.backends) or 'none'}); {GPU_BUILD_HELP}")
        if backend is not None and not pool:
            raise ConfigError(f"the {backend} backend found no usable device (a driver missing, or a CPU-type "
                              f"device such as lavapipe, which ggml uses only when GGML_VK_VISIBLE_DEVICES names it)")
        if ids:
            bad = [i for i in ids if not 0 <= i < len(pool)]
            if bad:
                raise ConfigError(f"no {backend or 'GPU'} device {bad[0]}: the devices are "
                                  + ", ".join(f"{k} {d.name} ({d.description})" for k, d in enumerate(pool)))
            pool = [pool[i] for i in ids]
        return pool


class GGUFLayout:
    """A GGUF file's layers as its tensor table says: bytes of each block's weights, the rest apart, and the
    numbers its KV cache is sized by. Read from the file (a few MB of its head), before llama.cpp loads it."""

    SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def __init__(self, path: str):
        import struct
        self.metadata: dict[str, Any] = {}
        self.array_lengths: dict[str, int] = {}
        with open(path, "rb") as f:
            def read(fmt: str):
                size = struct.calcsize("<" + fmt)
                data = f.read(size)
                if len(data) < size:
                    raise ModelLoadError(f"{path}: the GGUF header ends early")
                return struct.unpack("<" + fmt, data)[0]

            def string() -> str:
                return f.read(read("Q")).decode("utf-8", errors="replace")

            def value(kind: int, key: str = ""):
                if kind == 8:
                    return string()
                if kind == 9:
                    item, count = read("I"), read("Q")
                    self.array_lengths[key] = count
                    if item == 8:                       # the vocabulary: its length is what is wanted
                        for _ in range(count):
                            f.seek(read("Q"), 1)
                        return None
                    if item in self.SCALARS and count > 4096:     # scores, merges: skipped in one seek
                        f.seek(count * struct.calcsize("<" + self.SCALARS[item]), 1)
                        return None
                    return [value(item) for _ in range(count)]    # per-layer head counts, for one
                if kind not in self.SCALARS:
                    raise ModelLoadError(f"{path}: unknown GGUF value type {kind}")
                return read(self.SCALARS[kind])

            if f.read(4) != b"GGUF":
                raise ModelLoadError(f"{path} is not a GGUF model file")
            read("I")
            n_tensors, n_kv = read("Q"), read("Q")
            for _ in range(n_kv):
                key = string()
                self.metadata[key] = value(read("I"), key)
            tensors = []
            for _ in range(n_tensors):
                name = string()
                f.seek(8 * read("I"), 1)
                read("I")
                tensors.append((read("Q"), name))
            align = int(self.metadata.get("general.alignment") or 32)
            data_start = (f.tell() + align - 1) // align * align
        end = os.path.getsize(path) - data_start
        tensors.sort()
        self.layer_bytes: dict[int, int] = collections.Counter()
        self.other_bytes = 0
        for k, (offset, name) in enumerate(tensors):
            size = (tensors[k + 1][0] if k + 1 < len(tensors) else end) - offset
            m = re.match(r"blk\.(\d+)\.", name)
            if m:
                self.layer_bytes[int(m.group(1))] += size
            else:
                self.other_bytes += size
        arch = self.metadata.get("general.architecture", "")
        get = lambda key, default=0: self.metadata.get(f"{arch}.{key}", default)    # noqa: E731
        self.n_layer = int(get("block_count", len(self.layer_bytes)))
        heads = get("attention.head_count", 1) or 1
        heads = max(heads) if isinstance(heads, list) else heads
        kv_heads = get("attention.head_count_kv", heads) or heads
        kv_heads = max(kv_heads) if isinstance(kv_heads, list) else kv_heads
        embd = get("embedding_length", 0)
        self.n_vocab = self.array_lengths.get("tokenizer.ggml.tokens", 0)
        self.kv_width = kv_heads * (get("attention.key_length", embd // heads) +
                                    get("attention.value_length", embd // heads))   # K and V values per token


KV_BYTES = {0: 2.0, 1: 34 / 32, 2: 18 / 32}     # f16, q8_0, q4_0 bytes per value


def fit_gpu_layers(layout: GGUFLayout, free: int, n_cells: int, quantkv: int, n_batch: int,
                   margin: int = 512 << 20) -> tuple[int, dict]:
    """How many layers fit in `free` bytes with their share of a KV cache of `n_cells` tokens, after a margin
    for compute buffers, as llama.cpp places them: the last layers first, the output layer once all fit
    (n_layer + 1 is everything). Returns (n_gpu_layers, the arithmetic)."""
    kv_per_layer = int(n_cells * layout.kv_width * KV_BYTES[quantkv])
    compute = n_batch * (layout.n_vocab or 65536) * 4      # the logits of a batch, the largest compute buffer
    budget = free - margin - compute
    used = layers = 0
    for i in reversed(range(layout.n_layer)):
        need = layout.layer_bytes.get(i, 0) + kv_per_layer
        if used + need > budget:
            break
        used += need
        layers += 1
    if layers == layout.n_layer and used + layout.other_bytes <= budget:
        used += layout.other_bytes
        layers += 1
    return layers, {"free_mib": free >> 20, "budget_mib": max(budget, 0) >> 20, "planned_mib": used >> 20,
                    "kv_mib_per_layer": kv_per_layer >> 20, "margin_mib": (margin + compute) >> 20,
                    "budget_bytes": max(budget, 0), "planned_bytes": used, "kv_bytes_per_layer": kv_per_layer}


@dataclasses.dataclass
class GPUPlan:
    """Where the model goes: the layers to offload, the devices chosen (none: llama.cpp's default, all),
    and what start-up says about it."""
    n_gpu_layers: int = 0
    devices: list[GPUDevice] = dataclasses.field(default_factory=list)
    chosen: bool = False                 # devices named by --usevulkan/--usecuda (else llama.cpp takes all)
    backends: list[str] = dataclasses.field(default_factory=list)
    fit: dict | None = None              # the automatic fit's arithmetic
    lines: list[str] = dataclasses.field(default_factory=list)

    def report(self, memory: dict) -> dict:
        """For /props, /api/extra/perf and /api/ps: devices, layers, and MiB per device as llama.cpp allocated."""
        on_gpu = {name: parts for name, parts in memory["devices"].items()
                  if not name.startswith("CPU") and not name.endswith("_Host")}
        return {"backends": self.backends, "auto": self.fit is not None, "fit": self.fit,
                "devices": [{"name": d.name, "description": d.description, "backend": d.backend,
                             "free_mib": d.free >> 20, "total_mib": d.total >> 20} for d in self.devices],
                "layers_offloaded": memory["layers_offloaded"], "layers_total": memory["layers_total"],
                "vram_mib": round(sum(sum(parts.values()) for parts in on_gpu.values()), 2),
                "buffers_mib": memory["devices"]}


FIT_FREE_CAP_ENV = "KOBOLDLITE_FIT_FREE_MIB"    # tests: cap the free memory the automatic fit sees


def plan_gpu(config: Config) -> GPUPlan:
    """Find the build's GPU devices and decide the offload: --gpulayers if given, else as many layers as fit."""
    use_gpu_build()
    import llama_cpp
    found = Devices(llama_cpp)
    plan = GPUPlan(backends=found.backends)
    backend = "Vulkan" if config.usevulkan is not None else "CUDA" if config.usecuda is not None else None
    if (backend or config.tensor_split or config.maingpu is not None) and not found.gpu_backends:
        option = ("--usevulkan" if config.usevulkan is not None else "--usecuda" if config.usecuda is not None
                  else "--tensor_split" if config.tensor_split else "--maingpu")
        raise ConfigError(f"{option}: this llama.cpp build runs on the CPU only; {GPU_BUILD_HELP}")
    if not found.gpu_backends:
        if config.gpulayers not in (None, 0):
            plan.lines.append(f"GPU: this llama.cpp build runs on the CPU only, so --gpulayers does nothing; "
                              f"{GPU_BUILD_HELP}")
        return plan
    ids = config.usevulkan or [int(w) for w in config.usecuda or () if str(w).isdigit()]
    plan.devices = found.choose(backend, ids) if backend else list(found.gpus)
    plan.chosen = backend is not None
    if not plan.devices:
        plan.lines.append(f"GPU: the {'/'.join(found.gpu_backends)} backend found no usable device (no driver, or "
                          f"only CPU-type devices): running on the CPU")
        return plan
    for d in plan.devices:
        plan.lines.append(f"GPU: {d.name} ({d.description}, {d.backend}): {d.free >> 20} MiB free of "
                          f"{d.total >> 20} MiB")
    if config.gpulayers is not None:
        plan.n_gpu_layers = config.gpulayers
        return plan
    free = sum(d.free for d in plan.devices)
    if os.environ.get(FIT_FREE_CAP_ENV, "").isdigit():
        free = min(free, int(os.environ[FIT_FREE_CAP_ENV]) << 20)
    layout = GGUFLayout(config.model)
    cells = config.contextsize * (config.parallel if config.kvperslot else 1)
    plan.n_gpu_layers, plan.fit = fit_gpu_layers(layout, free, cells, config.quantkv, config.batchsize)
    plan.fit["layers"] = plan.n_gpu_layers
    plan.lines.append(f"GPU: {plan.n_gpu_layers} of {layout.n_layer + 1} layers (with the output layer) fit in "
                      f"{plan.fit['free_mib']} MiB free: {plan.fit['planned_mib']} MiB of weights and KV cache, "
                      f"{plan.fit['margin_mib']} MiB kept for compute buffers; --gpulayers N chooses")
    return plan


class CandidateSampler:
    """A sampler of our own in llama.cpp's chain, through its `llama_sampler_i` interface.

    `apply` gets the candidate array as one numpy view (id, logit, p) over llama.cpp's own buffer and
    works on it whole; `accept` sees each token the chain accepts. A filter keeps the best `n` by
    sorting the view in place and shrinking the array's size, as llama.cpp's own filters do.
    """

    def __init__(self, lib, name: str, apply: Callable, accept: Callable[[int], None] | None = None):
        import numpy
        self._np = numpy
        self._token_data = lib.llama_token_data
        self._name = name.encode()
        self._apply_fn = apply
        self._accept_fn = accept
        self._callbacks = [lib.llama_sampler_i_name(lambda smpl: self._name),
                           lib.llama_sampler_i_apply(self._apply)]
        iface = lib.llama_sampler_i()
        iface.name, iface.apply = self._callbacks
        if accept is not None:
            self._callbacks.append(lib.llama_sampler_i_accept(lambda smpl, token: accept(token)))
            iface.accept = self._callbacks[-1]
        self._iface = iface           # llama.cpp keeps a pointer to it: it lives as long as this object
        self.sampler = lib.llama_sampler_init(ctypes.byref(iface), None)

    def _apply(self, smpl, cur_p):
        arr = cur_p.contents
        if arr.size == 0:
            return
        data = (self._token_data * arr.size).from_address(ctypes.cast(arr.data, ctypes.c_void_p).value)
        keep = self._apply_fn(self._np.ctypeslib.as_array(data), arr.sorted)
        if keep is not None:          # the view is now sorted by logit, best first: keep the best `keep`
            arr.size = max(1, keep)
            arr.sorted = True

    @staticmethod
    def sort(view) -> None:
        order = view["logit"].argsort(kind="stable")[::-1]
        view[:] = view[order]


def softmax(logits):
    import numpy
    e = numpy.exp(logits - logits.max())
    return e / e.sum()


def top_a_filter(a: float):
    """KoboldCpp's top-a: drop tokens less likely than a * p_max squared."""
    def apply(view, sorted_):
        if not sorted_:
            CandidateSampler.sort(view)
        p = softmax(view["logit"])
        below = p < a * p[0] * p[0]
        return int(below.argmax()) if below.any() else None
    return apply


def tail_free_filter(z: float):
    """KoboldCpp's tail-free sampling: cut where the normalised curvature of the sorted
    probabilities has summed past z."""
    import numpy
    def apply(view, sorted_):
        if len(view) <= 2:
            return None
        if not sorted_:
            CandidateSampler.sort(view)
        p = softmax(view["logit"])
        d2 = numpy.abs(numpy.diff(p, 2))
        total = d2.sum()
        d2 = d2 / total if total > 1e-6 else numpy.full(len(d2), 1.0 / len(d2))
        past = numpy.cumsum(d2) > z
        past[:1] = False                       # keep at least one
        return int(past.argmax()) if past.any() else None
    return apply


def smoothing_transform(factor: float, curve: float):
    """KoboldCpp's quadratic (and, with a curve above 1, cubic) smoothing of the logits around the best one."""
    k, c = (3 - curve) / 2, (curve - 1) / 2
    def apply(view, sorted_):
        logits = view["logit"]
        h = logits.max()
        d = logits - h
        view["logit"] = -(k * factor * d * d) + (c * factor * d * d * d) + h
        return None
    return apply


class SlopedRepetitionPenalty:
    """KoboldCpp's repetition penalty with `rep_pen_slope`: tokens seen in the older half of the
    range get 1 + (rep_pen - 1) * slope, the newer half the full rep_pen; presence penalty on all."""

    def __init__(self, n_vocab: int, last_n: int, rep_pen: float, slope: float, presence: float):
        import numpy
        self._np = numpy
        self.history: collections.deque[int] = collections.deque(maxlen=max(1, last_n))
        self.rep_pen, self.reduced, self.presence = rep_pen, 1 + (rep_pen - 1) * slope, presence
        self.n_vocab = n_vocab

    def accept(self, token: int):
        self.history.append(token)

    def apply(self, view, sorted_):
        np = self._np
        if not self.history:
            return None
        recent = np.fromiter(self.history, dtype=np.int32, count=len(self.history))
        penalty = np.ones(self.n_vocab, dtype=np.float32)
        seen = np.zeros(self.n_vocab, dtype=bool)
        split = len(recent) // 2
        penalty[recent[:split]] = self.reduced
        penalty[recent[split:]] = self.rep_pen
        seen[recent] = True
        ids = view["id"]
        logits = view["logit"]
        p = penalty[ids]
        view["logit"] = np.where(logits <= 0, logits * p, logits / p) - np.where(seen[ids], self.presence, 0.0)
        return None


def min_tokens_guard(eog_tokens: list[int], count: int):
    """No end of generation before `count` tokens: end tokens are masked until then."""
    import numpy
    eog = numpy.array(eog_tokens, dtype=numpy.int32)
    state = {"seen": 0}
    def apply(view, sorted_):
        if state["seen"] < count:
            view["logit"] = numpy.where(numpy.isin(view["id"], eog), -numpy.inf, view["logit"])
        return None
    def accept(token):
        state["seen"] += 1
    return apply, accept


class PositionBans:
    """Tokens banned at one position of a reply only (where a banned phrase began).

    A sampler that counts the tokens the chain accepts, so it knows which position it samples for.
    If the bans would leave no candidate at all it bans nothing and says `exhausted`: the
    generation then ends there instead of looping.
    """

    def __init__(self):
        self.by_index: dict[int, set[int]] = {}
        self.index = 0
        self.exhausted = False

    def ban(self, index: int, token: int) -> int:
        self.by_index.setdefault(index, set()).add(token)
        return len(self.by_index[index])

    def apply(self, view, sorted_):
        import numpy
        bans = self.by_index.get(self.index)
        if bans:
            hit = numpy.isin(view["id"], numpy.fromiter(bans, dtype=numpy.int32, count=len(bans)))
            if not (~hit & (view["logit"] > -numpy.inf)).any():
                self.exhausted = True
            else:
                view["logit"] = numpy.where(hit, -numpy.inf, view["logit"])
        return None

    def accept(self, token: int):
        self.index += 1


class DrawSnapshot:
    """The candidates the final draw chooses from, after every other sampler, as log-probabilities
    (KoboldCpp reports these): a sampler placed just before the draw, only when asked for."""

    def __init__(self, n_top: int):
        self.n_top = n_top
        self.ids = self.logprobs = None

    def apply(self, view, sorted_):
        import numpy
        logits = view["logit"]
        alive = logits > -numpy.inf
        ids, kept = view["id"][alive], logits[alive].astype(numpy.float64)
        top = kept.max()
        self.ids, self.logprobs = ids.copy(), kept - top - numpy.log(numpy.exp(kept - top).sum())
        return None

    def entry(self, token: int) -> TokenLogprob:
        import numpy
        where = numpy.flatnonzero(self.ids == token)
        order = numpy.argsort(-self.logprobs, kind="stable")[:self.n_top]
        return TokenLogprob(token, float(self.logprobs[where[0]]) if len(where) else -math.inf,
                            [(int(self.ids[i]), float(self.logprobs[i])) for i in order])


class SamplerChain:
    """llama.cpp's native sampler chain for one generation's settings, in KoboldCpp's order:
    logit bias and bans, (min_tokens), DRY, grammar, then `sampler_order` (top-k, top-a, top-p with
    min-p, tail-free, typical, temperature or dynamic temperature with smoothing and n-sigma,
    repetition penalty), then XTC, then the draw. Our own samplers fill only what llama.cpp lacks."""

    def __init__(self, model: LlamaModel, s: SamplerSettings, seed: int, banned_token_ids: list[int] = (),
                 position_bans: PositionBans | None = None, snapshot: DrawSnapshot | None = None):
        lib = model.lib
        self.lib = lib
        self.chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        self._own: list[CandidateSampler] = []      # kept alive while the chain uses them
        self._history_samplers = []                  # samplers that must see the prompt (penalties, DRY)
        self.snapshot = snapshot
        self._candidates = self._view = self._ids = None   # the candidate array, reused token to token
        self._may_dead_end = bool(s.grammar)
        try:
            if position_bans is not None:
                self._own_sampler("phrase-bans", position_bans.apply, position_bans.accept)
            self._build(model, s, seed, banned_token_ids)
        except Exception:
            self.free()
            raise

    def _build(self, model: LlamaModel, s: SamplerSettings, seed: int, banned_token_ids):
        lib = self.lib
        bias = dict(s.logit_bias)
        for t in banned_token_ids:
            bias[t] = -math.inf
        if s.ban_eos:
            for t in model.eog_tokens:
                bias[t] = -math.inf
        bias = {t: b for t, b in bias.items() if model.valid_token(t)}
        if bias:
            arr = (lib.llama_logit_bias * len(bias))(*[lib.llama_logit_bias(t, b) for t, b in bias.items()])
            self._add(lib.llama_sampler_init_logit_bias(model.n_vocab, len(bias), arr))
        if s.min_tokens > 0 and not s.ban_eos:
            self._own_sampler("min_tokens", *min_tokens_guard(model.eog_tokens, s.min_tokens))
        if s.dry_multiplier > 0:
            breakers = [b.encode() for b in s.dry_sequence_breakers]
            array = (ctypes.c_char_p * max(1, len(breakers)))(*breakers)
            last_n = model.n_ctx if s.dry_penalty_last_n <= 0 else s.dry_penalty_last_n
            dry = lib.llama_sampler_init_dry(model.vocab, s.dry_multiplier, s.dry_base, s.dry_allowed_length,
                                             last_n, array, len(breakers))
            self._add(dry)
            self._history_samplers.append((dry, last_n))
        if s.grammar:
            grammar = lib.llama_sampler_init_grammar(model.vocab, s.grammar.encode(), b"root")
            if not grammar:
                raise RequestError("the grammar could not be parsed")
            self._add(grammar)
        if s.mirostat:
            self._add_repetition_penalty(model, s)
            self._add_temperature(s, dynamic=False)
            self._add_snapshot()
            if s.mirostat == 1:
                self._add(lib.llama_sampler_init_mirostat(model.n_vocab, seed, s.mirostat_tau, s.mirostat_eta, 100))
            else:
                self._add(lib.llama_sampler_init_mirostat_v2(seed, s.mirostat_tau, s.mirostat_eta))
            return
        for step in s.sampler_order:
            if step == SAMPLER_TOP_K and s.top_k > 0:
                self._add(lib.llama_sampler_init_top_k(s.top_k))
            elif step == SAMPLER_TOP_A and s.top_a > 0:
                self._own_sampler("top-a", top_a_filter(s.top_a))
            elif step == SAMPLER_TOP_P:
                if s.top_p < 1.0:
                    self._add(lib.llama_sampler_init_top_p(s.top_p, 1))
                if s.min_p > 0.0:
                    self._add(lib.llama_sampler_init_min_p(s.min_p, 1))
            elif step == SAMPLER_TFS and s.tfs < 1.0:
                self._own_sampler("tail-free", tail_free_filter(s.tfs))
            elif step == SAMPLER_TYPICAL and s.typical < 1.0:
                self._add(lib.llama_sampler_init_typical(s.typical, 1))
            elif step == SAMPLER_TEMP:
                self._add_temperature(s, dynamic=True)
            elif step == SAMPLER_REP_PEN:
                self._add_repetition_penalty(model, s)
        if s.xtc_probability > 0 and s.xtc_threshold <= 0.5:    # above 0.5 no two tokens can both pass it
            self._add(lib.llama_sampler_init_xtc(s.xtc_probability, s.xtc_threshold, 1, seed))
        self._add_snapshot()
        self._add(lib.llama_sampler_init_dist(seed))

    def _add_snapshot(self):
        if self.snapshot is not None:
            self._own_sampler("draw-snapshot", self.snapshot.apply)

    def _add_temperature(self, s: SamplerSettings, dynamic: bool):
        lib = self.lib
        if s.temperature <= 0.0:
            self._add(lib.llama_sampler_init_top_k(1))       # greedy, at temperature's place in the order
            return
        if dynamic and s.dynatemp_range > 0:
            self._add(lib.llama_sampler_init_temp_ext(s.temperature, s.dynatemp_range, s.dynatemp_exponent))
        else:
            self._add(lib.llama_sampler_init_temp(s.temperature))
        if s.smoothing_factor > 0:
            self._own_sampler("smoothing", smoothing_transform(s.smoothing_factor, s.smoothing_curve))
        if dynamic and s.nsigma > 0:
            self._add(lib.llama_sampler_init_top_n_sigma(s.nsigma))

    def _add_repetition_penalty(self, model: LlamaModel, s: SamplerSettings):
        if s.rep_pen == 1.0 and not s.presence_penalty and not s.frequency_penalty:
            return
        if s.rep_pen_slope < 1.0 and s.rep_pen > 1.0 and not s.frequency_penalty:
            sloped = SlopedRepetitionPenalty(model.n_vocab, s.rep_pen_range, s.rep_pen, s.rep_pen_slope,
                                             s.presence_penalty)
            own = self._own_sampler("rep-pen-slope", sloped.apply, sloped.accept)
            self._history_samplers.append((own, s.rep_pen_range))
            return
        penalties = self.lib.llama_sampler_init_penalties(model.n_vocab, s.rep_pen_range, s.rep_pen,
                                                          s.frequency_penalty, s.presence_penalty)
        self._add(penalties)
        self._history_samplers.append((penalties, s.rep_pen_range))

    def _own_sampler(self, name: str, apply: Callable, accept: Callable[[int], None] | None = None):
        own = CandidateSampler(self.lib, name, apply, accept)
        self._own.append(own)
        self._add(own.sampler)
        return own.sampler

    def _add(self, sampler):
        self.lib.llama_sampler_chain_add(self.chain, sampler)

    def remember_prompt(self, tokens: list[int]):
        """Repetition penalties and DRY count the prompt too (as KoboldCpp's do); the grammar must not see it."""
        for sampler, last_n in self._history_samplers:
            for t in tokens[-last_n:] if last_n > 0 else ():
                self.lib.llama_sampler_accept(sampler, t)

    def replay(self, tokens: list[int]):
        """Accept tokens already generated (after a rewind, into a new chain): grammar, penalties, DRY."""
        for t in tokens:
            self.lib.llama_sampler_accept(self.chain, t)

    def sample(self, ctx, index: int, n_vocab: int) -> int | None:
        """Draw a token from the logits at batch `index`; None when nothing may be drawn (a grammar,
        bans and biases that together leave no candidate). llama_sampler_sample would then draw a
        forbidden token and the grammar would abort the process on accepting it, so with a grammar the
        chain is applied here and a token is accepted only if it was allowed. Without one, bans and
        biases never forbid the whole vocabulary, and llama.cpp draws on its own."""
        lib = self.lib
        if not self._may_dead_end:
            return lib.llama_sampler_sample(self.chain, ctx, index)     # the whole draw in C
        import numpy
        if self._candidates is None or len(self._candidates) != n_vocab:
            self._candidates = (lib.llama_token_data * n_vocab)()
            self._view = numpy.ctypeslib.as_array(self._candidates)
            self._ids = numpy.arange(n_vocab, dtype=numpy.int32)
        view = self._view
        view["id"] = self._ids             # anew each time: filters reorder the array in place
        view["logit"] = numpy.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, index), shape=(n_vocab,))
        view["p"] = 0.0
        arr = lib.llama_token_data_array(self._candidates, n_vocab, -1, False)
        lib.llama_sampler_apply(self.chain, ctypes.byref(arr))
        if not 0 <= arr.selected < arr.size:
            return None
        chosen = arr.data[arr.selected]
        if not chosen.logit > -math.inf:
            return None
        lib.llama_sampler_accept(self.chain, chosen.id)
        return chosen.id

    def free(self):
        if self.chain:
            self.lib.llama_sampler_free(self.chain)
            self.chain = None


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
                    raise RequestError(f"llama.cpp could not embed this input ({status})", status=500,
                                       kind="server_error")
                v = numpy.ctypeslib.as_array(lib.llama_get_embeddings_seq(self.ctx, 0), shape=(self.n_embd,))
                v = v.astype(numpy.float64)
                norm = numpy.linalg.norm(v)
                vectors.append((v / norm if norm > 0 else v).tolist())
                n_tokens += len(tokens)
        return vectors, n_tokens


class NgramDrafter:
    """Draft tokens from a slot's own context (prompt lookup): the longest of its last MAX_N..MIN_N tokens that
    occurred before proposes what followed its latest earlier occurrence. The latest occurrence, because text
    that repeats (a passage rewritten, code edited, names in a story) repeats what was just read; the longest
    match, because a 2-token match is as often chance as copy. An index of every n-gram's latest continuation
    keeps a lookup O(1) whatever the context's length; it follows the context as it grows and is rebuilt when
    the context changes otherwise (a rewind, a shift).

    Each draft is a point mass (one proposed token per place), so the exact speculative-sampling rule reduces
    to: draw from the model's own distribution at each place and keep the draft while the draws equal it
    (see speculative_accept). The text's distribution is unchanged, and a seed draws the same numbers."""

    MIN_N, MAX_N = 3, 6

    def __init__(self):
        self.tokens: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}     # n-gram -> the position after its latest occurrence

    def sync(self, tokens: list[int]):
        """Follow the slot's context: appended tokens are indexed, any other change rebuilds the index."""
        n = len(self.tokens)
        if len(tokens) < n or tokens[:n] != self.tokens:
            self.tokens, self._next, n = [], {}, 0
        for i in range(n, len(tokens)):
            self.tokens.append(tokens[i])
            for k in range(self.MIN_N, self.MAX_N + 1):
                if i - k >= 0:
                    self._next[tuple(self.tokens[i - k:i])] = i

    def has_match(self) -> bool:
        t = self.tokens
        return len(t) > self.MIN_N and tuple(t[-self.MIN_N:]) in self._next

    def source(self) -> int | None:
        """Where the earlier text that the context's end repeats goes on: the position after the latest earlier
        occurrence of its longest repeated tail (MAX_N..MIN_N tokens); None if nothing repeats."""
        t = self.tokens
        for k in range(self.MAX_N, self.MIN_N - 1, -1):
            if len(t) > k:
                at = self._next.get(tuple(t[-k:]))
                if at is not None:
                    return at
        return None

    def repeat_length(self, most: int = 32) -> int:
        """For how many tokens (up to `most`) the context's end has been repeating the earlier text: a long
        repeat (text copied word for word) goes on far more often than a fresh 3-token match."""
        at = self.source()
        if at is None:
            return 0
        t, end, n = self.tokens, len(self.tokens), 0
        while n < most and at - 1 - n >= 0 and t[at - 1 - n] == t[end - 1 - n]:
            n += 1
        return n

    def propose(self, limit: int) -> list[int]:
        at = self.source()
        return [] if at is None else self.tokens[at:at + limit]


def speculative_accept(p, q, draft: int, rng) -> tuple[int, bool]:
    """The speculative-sampling rule for one place (Leviathan et al. 2023; Chen et al. 2023): keep the draft
    token d with probability min(1, p(d) / q(d)), else draw from the residual max(0, p - q), normalized. The
    token that comes out is distributed as p, whatever q was. Returns (token, kept the draft).
    With a point-mass q (n-gram and greedy drafts) this is: draw x from p, keep the draft iff x == d; the engine
    does that, drawing with the request's own sampler chain."""
    import numpy
    p, q = numpy.asarray(p, dtype=numpy.float64), numpy.asarray(q, dtype=numpy.float64)
    if q[draft] > 0 and rng.random() < min(1.0, p[draft] / q[draft]):
        return draft, True
    residual = numpy.maximum(p - q, 0.0)
    total = residual.sum()
    residual = residual / total if total > 0 else p
    return int(rng.choice(len(p), p=residual)), False


class DraftModel:
    """A small second model with the target's vocabulary that drafts greedily (a point mass again: the same rule
    keeps the text the target's). Its own llama context, one sequence per slot, each following its slot's context
    by common prefix: what the target kept of a draft is already in it, what it did not is cut."""

    def __init__(self, path: str, target: LlamaModel, n_ctx: int, n_threads: int, n_gpu_layers: int,
                 show_llama_log: bool = False):
        self.model = LlamaModel(path, n_ctx=n_ctx, n_seq=target.n_seq, n_threads=n_threads,
                                n_gpu_layers=n_gpu_layers, n_batch=min(512, n_ctx), show_llama_log=show_llama_log)
        mismatch = self._vocabulary_mismatch(target)
        if mismatch:
            self.model.close()
            raise ModelLoadError(f"the draft model {os.path.basename(path)} cannot draft for "
                                 f"{os.path.basename(target.path)}: {mismatch}")
        self.lib = self.model.lib
        self.cached: list[list[int]] = [[] for _ in range(target.n_seq)]
        self._batch = self.lib.llama_batch_init(self.model.n_batch, 0, 1)

    def _vocabulary_mismatch(self, target: LlamaModel) -> str | None:
        a, b = self.model, target
        if a.n_vocab != b.n_vocab:
            return f"its vocabulary has {a.n_vocab} tokens, the model's {b.n_vocab}"
        for t in range(a.n_vocab):
            if a.piece(t, special=True) != b.piece(t, special=True):
                return f"token {t} is {a.piece(t, special=True)!r} in one and {b.piece(t, special=True)!r} in the other"
        return None

    def _decode(self, seq: int, tokens: list[int], start: int) -> bool:
        lib, batch = self.lib, self._batch
        for at in range(0, len(tokens), self.model.n_batch):
            chunk = tokens[at:at + self.model.n_batch]
            for i, t in enumerate(chunk):
                batch.token[i], batch.pos[i] = t, start + at + i
                batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = 1, seq, i == len(chunk) - 1
            batch.n_tokens = len(chunk)
            if lib.llama_decode(self.model.ctx, batch) != 0:
                return False
        return True

    def propose(self, seq: int, context: list[int], limit: int) -> list[int]:
        """Up to `limit` tokens the draft model would write after `context` (its argmax each time)."""
        import numpy
        if len(context) + limit >= self.model.n_ctx:
            return []
        lib, memory = self.lib, self.model.memory
        cached = self.cached[seq]
        keep = min(common_prefix_length(cached, context), len(context) - 1)   # the last one gives the logits
        lib.llama_memory_seq_rm(memory, seq, keep, -1)
        del cached[keep:]
        if not self._decode(seq, context[keep:], keep):
            lib.llama_memory_seq_rm(memory, seq, -1, -1)
            cached.clear()
            return []
        cached.extend(context[keep:])
        draft = []
        n_vocab = self.model.n_vocab
        while True:
            logits = numpy.ctypeslib.as_array(lib.llama_get_logits_ith(self.model.ctx, -1), shape=(n_vocab,))
            token = int(logits.argmax())
            if self.model.is_end_of_generation(token):
                break
            draft.append(token)
            if len(draft) == limit or not self._decode(seq, [token], len(cached)):
                break
            cached.append(token)
        return draft

    def close(self):
        self.lib.llama_batch_free(self._batch)
        self.model.close()


class StepCost:
    """What a decode of n tokens costs here, measured at start-up (a few decodes of each width on this machine's
    llama.cpp build): drafting pays only where a wider batch costs less than the tokens it is expected to add.
    On this project's 2-core CPU a 9-token batch costs about five 1-token steps; on a GPU it costs about one."""

    WIDTHS = (1, 2, 4, 8, 16, 32)

    def __init__(self, widths: list[int], seconds: list[float]):
        self.widths, self.seconds = widths, seconds

    @classmethod
    def measure(cls, model: "LlamaModel", batch, most: int, reps: int = 2) -> "StepCost":
        """Time decodes of each width up to `most` after a short prefix, in sequence 0 (then emptied): about half
        a second. The caller holds the llama lock, on the thread that makes every decode."""
        lib, ctx, memory = model.lib, model.ctx, model.memory
        widths = [w for w in cls.WIDTHS if w <= max(2, most)]
        filler = max(model.bos, 0)

        def decode(n: int, pos: int, logits: bool) -> float:
            for i in range(n):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = filler, pos + i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, logits
            batch.n_tokens = n
            started = time.perf_counter()
            ok = lib.llama_decode(ctx, batch) == 0
            return time.perf_counter() - started if ok else math.inf
        decode(64, 0, False)
        seconds = []
        for w in widths:
            runs = []
            for _ in range(reps + 1):                  # the first of each width warms it up
                runs.append(decode(w, 64, True))
                lib.llama_memory_seq_rm(memory, 0, 64, -1)
            seconds.append(min(runs[1:]))
        lib.llama_memory_seq_rm(memory, 0, -1, -1)
        if not all(math.isfinite(t) for t in seconds):
            return cls([1, 2], [1.0, 1e9])           # could not measure: never draft
        return cls(widths, seconds)

    def __call__(self, n: int) -> float:
        w, t = self.widths, self.seconds
        if n <= w[0]:
            return t[0]
        for i in range(1, len(w)):
            if n <= w[i]:
                return t[i - 1] + (t[i] - t[i - 1]) * (n - w[i - 1]) / (w[i] - w[i - 1])
        return t[-1] + (t[-1] - t[-2]) * (n - w[-1]) / (w[-1] - w[-2])      # on past the widest measured


class DraftControl:
    """How far a slot drafts in a step: as far as the tokens it is expected to gain outweigh what the wider
    batch costs. The gain of a draft of k tokens is a + a^2 + ... + a^k, a being the share of drafted tokens
    this slot's model has kept lately (a draft is kept up to its first miss); the cost is the extra decode
    time, valued at the batch's own tokens per second. Where that is nothing (text that does not repeat) it
    does not draft, and its estimate drifts back towards the prior, so it tries again later.

    Two estimates: one for a draft that goes on a long repeat (the context's end has been copying the earlier
    text for LONG_REPEAT tokens or more) and one for a fresh match. Measured on bench_speculative's workloads
    with SmolLM2, drafts of 8: a long repeat's first token was kept 95% of the time, 7 of 8 tokens on average;
    a fresh 3-token match's 73%, and 3.6 of 8 (each token checked kept about 80% of the time). One estimate for
    both learnt the fresh matches' misses and then drafted short, or not at all, through passages copied word
    for word."""

    LONG_REPEAT = 8
    PRIORS = {False: 0.8, True: 0.95}    # fresh match, long repeat: the share of checked tokens kept, measured
    LEARN = 0.15              # weight of each drafted token's outcome in the estimate
    DRIFT = 0.02              # per step without drafts, back towards the prior

    def __init__(self, most: int):
        self.most = most
        self.rates = dict(self.PRIORS)

    @property
    def rate(self) -> float:
        """The fresh matches' estimate."""
        return self.rates[False]

    @rate.setter
    def rate(self, value: float):
        self.rates[False] = value

    def length(self, width: int, cost: StepCost, long_repeat: bool = False) -> int:
        """The best draft length for a slot joining a batch of `width` tokens; 0: no draft."""
        rate = self.rates[long_repeat]
        base = cost(width)
        value = width / base                      # tokens per second of the batch without this draft
        best_k, best, gain, p = 0, 0.0, 0.0, 1.0
        for k in range(1, self.most + 1):
            p *= rate
            gain += p
            net = gain - (cost(width + k) - base) * value
            if net > best:
                best_k, best = k, net
        if not best_k:
            self.rates[long_repeat] = rate + self.DRIFT * (self.PRIORS[long_repeat] - rate)
        return best_k

    def update(self, drafted: int, kept: int, long_repeat: bool = False):
        """Tokens are checked in order up to the first one the model did not keep."""
        rate = self.rates[long_repeat]
        for i in range(min(drafted, kept + 1)):
            rate += self.LEARN * ((1.0 if i < kept else 0.0) - rate)
        self.rates[long_repeat] = rate


class Slot:
    """One KV-cache sequence and the generation using it, if any."""

    def __init__(self, seq_id: int):
        self.seq_id = seq_id
        self.cached: list[int] = []     # tokens whose keys and values are in this sequence
        self.job: Job | None = None
        self.sampler: SamplerChain | None = None
        self.assembler: TextAssembler | None = None
        self.to_prefill: list[int] = []  # prompt tokens still to be decoded
        self.next_token: int | None = None  # sampled, to be decoded in the next step
        # Positions below this may be cells shared with another slot's sequence (a prompt's start lent
        # or borrowed in a shared pool). llama.cpp keeps one position per cell, so these are never moved.
        self.shared_upto = 0
        self.lender: Slot | None = None  # the slot whose cells this one's first `borrowed` positions are
        self.borrowed = 0
        self.generated: list[int] = []   # this job's tokens so far (those a rewind took back excluded)
        self.guard: PhraseGuard = PhraseGuard()
        self.bans: PositionBans | None = None
        self.rewinds = 0
        self.t_admitted = 0.0
        self.t_first_token = 0.0
        self.last_used = 0.0
        self.drafter: NgramDrafter | None = None
        self.draft_control: DraftControl | None = None
        self.long_repeat = False         # this step's draft goes on a long repeat (DraftControl)
        self.expected: tuple[GenerationRequest, str] | None = None   # a chat's reply, for NextTurnReader

    @property
    def busy(self) -> bool:
        return self.job is not None


def put_tokens(batch, n: int, slot: Slot, tokens: list[int], logits_last: bool, logits_all: bool = False) -> int:
    """Append a slot's tokens to a llama batch from index n, at the positions after what its sequence holds;
    the batch's new length."""
    pos = len(slot.cached)
    seq = slot.seq_id
    last = len(tokens) - 1
    for i, t in enumerate(tokens):
        batch.token[n] = t
        batch.pos[n] = pos + i
        batch.n_seq_id[n] = 1
        batch.seq_id[n][0] = seq
        batch.logits[n] = logits_all or (logits_last and i == last)
        n += 1
    return n


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SavedState:
    """One displaced conversation: its tokens and its sequence's state, in RAM (data), on disk (path), or both."""

    def __init__(self, tokens: list[int], data: bytes | None, size: int, path: str | None = None):
        self.tokens = tokens
        self.data = data
        self.size = size
        self.path = path
        self.last_used = time.monotonic()


STATE_MAGIC = b"KLKVSTATE1\n"


class StateFileError(Exception):
    pass


def write_state_file(path: str, identity: dict, tokens: list[int], data: bytes):
    """A sequence's state after a header naming what made it, its tokens and the state's hash; written whole
    under a temporary name, then renamed (a crash leaves the old file or none, never half of one)."""
    header = json.dumps({**identity, "tokens": list(tokens), "state_bytes": len(data),
                         "state_crc32": zlib.crc32(data)}).encode()
    temporary = path + ".tmp"
    try:
        with open(temporary, "wb") as f:
            f.write(STATE_MAGIC + len(header).to_bytes(8, "little") + header)
            f.write(data)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def read_state_file(path: str, identity: dict, with_data: bool = True) -> tuple[dict, bytes | None]:
    """(header, state) of a state file made by this model in this layout; StateFileError says what is wrong."""
    try:
        with open(path, "rb") as f:
            if f.read(len(STATE_MAGIC)) != STATE_MAGIC:
                raise StateFileError("not a KoboldLite state file")
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length)) if 0 < length < 1 << 30 else None
            if not isinstance(header, dict) or not isinstance(header.get("tokens"), list):
                raise StateFileError("a damaged header")
            wrong = next((k for k, v in identity.items() if header.get(k) != v), None)
            if wrong:
                raise StateFileError(f"made by another model or layout ({wrong} differs)")
            if os.path.getsize(path) != len(STATE_MAGIC) + 8 + length + header.get("state_bytes", -1):
                raise StateFileError("cut short")
            data = f.read() if with_data else None
    except (OSError, ValueError, UnicodeDecodeError, TypeError) as e:
        raise StateFileError(f"unreadable ({e})") from None
    # A CRC-32 finds damage (it is no guard against forgery: the folder is the user's own) at memory speed.
    if data is not None and zlib.crc32(data) != header.get("state_crc32"):
        raise StateFileError("damaged (its checksum does not match)")
    return header, data


def model_identity(model: "LlamaModel") -> dict:
    """What a saved state must have been made by: this model file (its size and a hash of its first MiB),
    this llama.cpp, this KV type, context and layout."""
    digest = hashlib.sha256()
    with open(model.path, "rb") as f:
        digest.update(f.read(1 << 20))
    return {"model_size": os.path.getsize(model.path), "model_head_sha256": digest.hexdigest(),
            "llama_cpp": getattr(model.lib, "__version__", ""), "kv_type": model.kv_type,
            "n_ctx": model.n_ctx, "pool_tokens": model.pool_tokens, "shared_kv": model.shared_kv,
            "n_seq": model.n_seq}


class PromptCache:
    """Conversations displaced from the slots, kept as their sequences' states (llama_state_seq_get_data): in
    host memory up to `ram_bytes`, least recently used first out; with a folder, also on disk up to `disk_bytes`,
    across restarts. A file holds one state after a header that names what made it (the model file's size and a
    hash of its first MiB, llama.cpp's version, the KV type, the context layout and size) and its tokens, and a
    checksum of the state: a file made by anything else, cut short or damaged is skipped with one log line and
    removed, never loaded. Files are written whole under a temporary name, then renamed."""

    MIN_TOKENS = 256          # shorter conversations are cheaper to read again than to keep

    def __init__(self, model: "LlamaModel", ram_bytes: int, folder: str | None, disk_bytes: int,
                 log: Callable[[str], None] = lambda line: None):
        self.ram_bytes, self.folder, self.disk_bytes, self.log = ram_bytes, folder, disk_bytes, log
        self.identity = model_identity(model)
        self.entries: list[SavedState] = []
        self.saved = collections.Counter()     # states copied in: ahead (idle slots) or when displaced
        self._lock = threading.Lock()          # request threads read the listing; the loop changes it
        if folder:
            os.makedirs(folder, exist_ok=True)
            self._read_index()

    # -- what it holds --------------------------------------------------------------------------------------

    def best(self, prompt: list[int]) -> tuple[SavedState | None, int]:
        """The kept state whose tokens start the prompt for longest, and that length."""
        best, n = None, 0
        with self._lock:
            for entry in self.entries:
                common = common_prefix_length(entry.tokens, prompt)
                if common > n:
                    best, n = entry, common
        return best, n

    def keep(self, tokens: list[int], data: bytes, ahead: bool = False):
        """A displaced conversation's state (`ahead`: one still in its idle slot, kept before it is displaced).
        One that a kept state extends, or that extends one, replaces it."""
        self.saved["ahead" if ahead else "when_displaced"] += 1
        entry = SavedState(list(tokens), data, len(data))
        with self._lock:
            for old in [e for e in self.entries if common_prefix_length(e.tokens, tokens) == len(e.tokens)]:
                self.entries.remove(old)          # this one holds all it held, and more
                self._forget_file(old)
            self.entries.append(entry)
        self._bound()

    def data_of(self, entry: SavedState) -> bytes | None:
        """Its state, from RAM or read back from its file (checked); None if the file is gone or bad."""
        entry.last_used = time.monotonic()
        if entry.data is not None:
            return entry.data
        read = self._read_file(entry.path, with_data=True)
        if read is None:
            with self._lock:
                if entry in self.entries:
                    self.entries.remove(entry)
            return None
        return read[1]

    def taken(self, entry: SavedState):
        """Restored into a slot: the slot holds it now (it comes back here when displaced again)."""
        with self._lock:
            if entry in self.entries:
                self.entries.remove(entry)
        self._forget_file(entry)

    def holds(self, tokens: list[int]) -> bool:
        """Whether a kept state is exactly this conversation (kept ahead while it still held its slot)."""
        with self._lock:
            return any(e.tokens == tokens for e in self.entries)

    @property
    def ram_used(self) -> int:
        with self._lock:
            return sum(e.size for e in self.entries if e.data is not None)

    @property
    def disk_used(self) -> int:
        with self._lock:
            return sum(e.size for e in self.entries if e.path is not None)

    def _bound(self):
        """RAM over its bound: the least recently used go to disk (with a folder) or are dropped; disk likewise."""
        with self._lock:
            in_ram = sorted((e for e in self.entries if e.data is not None), key=lambda e: e.last_used)
            used = sum(e.size for e in in_ram)
            leaving = []
            while used > self.ram_bytes and in_ram:
                e = in_ram.pop(0)
                used -= e.size
                leaving.append(e)
        for e in leaving:
            if self.folder and e.path is None and e.size <= self.disk_bytes:
                self._write_file(e)
            e.data = None
            if e.path is None:
                with self._lock:
                    if e in self.entries:
                        self.entries.remove(e)
        with self._lock:
            on_disk = sorted((e for e in self.entries if e.path is not None and e.data is None),
                             key=lambda e: e.last_used)
            used = sum(e.size for e in self.entries if e.path is not None)
            while used > self.disk_bytes and on_disk:
                e = on_disk.pop(0)
                used -= e.size
                self.entries.remove(e)
                self._forget_file(e)

    def flush(self):
        """At a clean shutdown: what is only in RAM goes to disk."""
        if not self.folder:
            return
        with self._lock:
            pending = [e for e in self.entries if e.path is None and e.data is not None]
        for e in sorted(pending, key=lambda e: -e.last_used):
            if self.disk_used + e.size <= self.disk_bytes:
                self._write_file(e)

    # -- files ---------------------------------------------------------------------------------------------

    def _write_file(self, e: SavedState):
        path = os.path.join(self.folder, hashlib.sha256(json.dumps(e.tokens).encode()).hexdigest()[:24] + ".klstate")
        try:
            write_state_file(path, self.identity, e.tokens, e.data)
            e.path = path
        except OSError as error:
            self.log(f"prompt cache: could not write {path}: {error}")

    def _forget_file(self, e: SavedState):
        if e.path:
            with contextlib.suppress(OSError):
                os.remove(e.path)
            e.path = None

    def _read_file(self, path: str, with_data: bool) -> tuple[dict, bytes | None] | None:
        """(header, state) of a file made here, or None (after one log line, the file removed)."""
        try:
            return read_state_file(path, self.identity, with_data)
        except StateFileError as e:
            self.log(f"prompt cache: skipped {os.path.basename(path)}: {e}; removed")
            with contextlib.suppress(OSError):
                os.remove(path)
            return None

    def _read_index(self):
        for name in sorted(os.listdir(self.folder)):
            path = os.path.join(self.folder, name)
            if name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.remove(path)          # a write a crash cut short
                continue
            if not name.endswith(".klstate"):
                continue
            read = self._read_file(path, with_data=False)
            if read is not None and isinstance(read[0].get("tokens"), list):
                entry = SavedState(read[0]["tokens"], None, read[0]["state_bytes"], path)
                entry.last_used = time.monotonic() - 1e6 + os.path.getmtime(path) / 1e4
                self.entries.append(entry)
        if self.entries:
            self.log(f"prompt cache: {len(self.entries)} conversation(s) on disk in {self.folder}")
        self._bound()


class KVPool:
    """The llama context's KV cache as the slots use it: which tokens each sequence's cells hold, reusing a
    cached start for a new prompt (moving the runs a client kept), lending a start to another sequence in a
    shared pool, making room by dropping idle caches, compacting interleaved cells, shifting a full context
    and cutting a sequence back. It runs on the generation thread; every call into llama.cpp is made under
    the engine's `llama_lock`."""

    CACHE_REUSE_MIN_CHUNK = 64           # cached runs at least this long are moved into place, not re-read
    # A shared pool is compacted once concurrent replies have interleaved this many cells, or an eighth
    # of what the slots hold if that is more (the copy costs in proportion to what it moves), and only
    # while the copy held in memory stays under the byte limit.
    COMPACT_AFTER_CELLS = 64
    COMPACT_MAX_BYTES = 128 << 20

    def __init__(self, model: LlamaModel, slots: list[Slot], llama_lock: threading.Lock, context_shift: bool,
                 cache: PromptCache | None = None):
        self.model = model
        self.cache = cache               # where displaced conversations go, and come back from
        self.lib = model.lib
        self.slots = slots
        self.llama_lock = llama_lock
        self.context_shift = context_shift
        self.interleaved = 0             # cells concurrent replies have put side by side since the last compaction
        # llama.cpp re-rotates moved keys (seq_add) only at the next decode, and a saved state does not
        # carry that pending work: no compaction until it is done.
        self._moved_since_decode = False
        self.compactions = 0

    def decoded(self):
        """A decode ran: moved keys are rotated now."""
        self._moved_since_decode = False

    def state_of(self, slot: Slot) -> bytes | None:
        """The slot's sequence as llama.cpp saves it (its cells' keys and values, and positions)."""
        lib, ctx = self.lib, self.model.ctx
        with self.llama_lock:
            size = lib.llama_state_seq_get_size(ctx, slot.seq_id)
            buf = (ctypes.c_uint8 * size)()
            if not size or lib.llama_state_seq_get_data(ctx, buf, size, slot.seq_id) != size:
                return None
        return buf                       # kept as it is: a state is tens of MiB, and copies cost time

    def restore(self, slot: Slot, tokens: list[int], data: bytes) -> bool:
        """Put a saved sequence into this (idle) slot in place of what it held."""
        lib, ctx, memory = self.lib, self.model.ctx, self.model.memory
        slot.cached = []
        self.trimmed(slot)
        slot.lender, slot.borrowed, slot.shared_upto = None, 0, 0
        with self.llama_lock:
            lib.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
            src = (ctypes.cast(data, ctypes.POINTER(ctypes.c_uint8)) if isinstance(data, ctypes.Array)
                   else ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8)))   # no copy either way
            if lib.llama_state_seq_set_data(ctx, src, len(data), slot.seq_id) != len(data):
                lib.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
                return False
        slot.cached = list(tokens)
        return True

    def stash(self, slot: Slot, keep: int = 0, ahead: bool = False):
        """The slot's conversation is about to be dropped (all but its first `keep` tokens): keep its state in
        the prompt cache first, when it is worth keeping and not kept already."""
        if self.cache is None or len(slot.cached) - keep < PromptCache.MIN_TOKENS or self.cache.holds(slot.cached):
            return
        data = self.state_of(slot)
        if data is not None:
            self.cache.keep(slot.cached, data, ahead)

    def keep_ahead(self):
        """While nothing runs: keep the idle slots' conversations in the prompt cache now, so that a prompt that
        displaces one later does not wait while it is saved. Only into the RAM bound's free room: a copy of what
        a slot still holds never pushes out a conversation that has no other copy."""
        if self.cache is None:
            return
        for slot in self.slots:
            if slot.busy or len(slot.cached) < PromptCache.MIN_TOKENS or self.cache.holds(slot.cached):
                continue
            with self.llama_lock:
                size = self.lib.llama_state_seq_get_size(self.model.ctx, slot.seq_id)
            if self.cache.ram_used + size <= self.cache.ram_bytes:
                self.stash(slot, ahead=True)
                self.cache.log(f"prompt cache: kept slot {slot.seq_id}'s conversation ({len(slot.cached)} tokens) "
                               "ahead of its displacement")

    def truncate(self, slot: Slot, n: int):
        """Cut the slot's sequence back to its first n positions (a rewind, rejected draft tokens)."""
        with self.llama_lock:
            self.lib.llama_memory_seq_rm(self.model.memory, slot.seq_id, n, -1)
        del slot.cached[n:]
        self.trimmed(slot)

    def plan_reuse(self, cached: list[int], prompt: list[int]) -> tuple[int, list[tuple[int, int, int]]]:
        """How much of `prompt` a cache holding `cached` can supply without reading it again.

        First their common prefix; then, with context shift, every later run of at least
        CACHE_REUSE_MIN_CHUNK tokens that the prompt goes on with and the cache still holds further on
        (the turns a client kept after dropping older ones), in order. Returns the tokens reused and
        the moves that bring those runs into place: (start in the cache, length, shift).
        """
        head_p = head_c = common_prefix_length(cached, prompt)
        moves = []
        if not self.context_shift:
            return head_p, moves
        n_cached, n_prompt = len(cached), len(prompt)
        while head_c < n_cached and head_p < n_prompt:
            try:
                head_c = cached.index(prompt[head_p], head_c)
            except ValueError:
                break
            n = 1
            while head_c + n < n_cached and head_p + n < n_prompt and cached[head_c + n] == prompt[head_p + n]:
                n += 1
            if n >= self.CACHE_REUSE_MIN_CHUNK:
                moves.append((head_c, n, head_p - head_c))
                head_p += n
                head_c += n
            else:
                head_c += 1
        return head_p, moves

    def reuse(self, slot: Slot, prompt: list[int]) -> int:
        """Make the slot's sequence hold the longest reusable start of `prompt`; return its length."""
        lib, memory, seq = self.lib, self.model.memory, slot.seq_id
        keep, moves = self.plan_reuse(slot.cached, prompt)
        if keep == len(prompt):
            keep -= 1                      # one token must be decoded to get logits
        with self.llama_lock:
            for start, length, shift in moves:
                if start + shift >= keep or start < slot.shared_upto:
                    keep = min(keep, start + shift)
                    break
                lib.llama_memory_seq_rm(memory, seq, start + shift, start)     # what the client dropped
                lib.llama_memory_seq_add(memory, seq, start, start + length, shift)
                self._moved_since_decode = True
            if not lib.llama_memory_seq_rm(memory, seq, keep, -1):
                lib.llama_memory_seq_rm(memory, seq, -1, -1)
                keep = 0
        slot.cached = list(prompt[:keep])
        self.trimmed(slot)
        return keep

    def trimmed(self, slot: Slot):
        """The slot's cache was cut to len(slot.cached): what it shared beyond that is no longer shared,
        and a slot that borrowed those cells now holds them alone."""
        n = len(slot.cached)
        slot.shared_upto = min(slot.shared_upto, n)
        slot.borrowed = min(slot.borrowed, n)
        for other in self.slots:
            if other.lender is slot:
                other.borrowed = min(other.borrowed, n)

    def borrow_prefix(self, slot: Slot, prompt: list[int], keep: int) -> int:
        """In a shared pool, take a longer start of the prompt from another slot's cache than the slot's
        own holds (a system prompt or character card that several users send): llama.cpp lets the two
        sequences share those cells, so they are neither read again nor stored twice."""
        if not self.model.shared_kv:
            return keep
        lender, n = None, keep
        for other in self.slots:
            common = min(common_prefix_length(other.cached, prompt), len(prompt) - 1)
            if other is not slot and common > n:
                lender, n = other, common
        if lender is None:
            return keep
        lib, memory = self.lib, self.model.memory
        with self.llama_lock:
            lib.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
            lib.llama_memory_seq_cp(memory, lender.seq_id, slot.seq_id, 0, n)
        slot.cached = []
        self.trimmed(slot)
        slot.cached = list(prompt[:n])
        slot.lender, slot.borrowed, slot.shared_upto = lender, n, n
        lender.shared_upto = max(lender.shared_upto, n)
        return n

    def cells_used(self) -> int:
        """KV cells the slots hold, or have been promised (prompt still to read); borrowed cells count once."""
        return sum(len(s.cached) - s.borrowed + len(s.to_prefill) for s in self.slots)

    def make_room(self, n: int, keep: Slot | None = None) -> bool:
        """Make n cells free in a shared pool: idle slots' caches go, least recently used first (they only
        save time; a running reply's context is never taken). False if running replies hold too much."""
        if not self.model.shared_kv:
            return True                    # every slot has a context of its own
        idle = sorted((s for s in self.slots if not s.busy and s.cached and s is not keep), key=lambda s: s.last_used)
        while self.model.pool_tokens - self.cells_used() < n and idle:
            dropped = idle.pop(0)
            self.stash(dropped)
            with self.llama_lock:
                self.lib.llama_memory_seq_rm(self.model.memory, dropped.seq_id, -1, -1)
            dropped.cached = []
            self.trimmed(dropped)
        return self.model.pool_tokens - self.cells_used() >= n

    def compaction_due(self) -> bool:
        return (self.model.shared_kv and self.model.attention_only and self.model.flash_attention is not False
                and not self._moved_since_decode
                and sum(1 for s in self.slots if s.next_token is not None) > 1
                and self.interleaved >= max(self.COMPACT_AFTER_CELLS, self.cells_used() // 8))

    def compact(self):
        """Lay each running reply's cells out as one block again. Replies generating together put their
        cells side by side in a shared pool, one of each per step, and llama.cpp's flash attention on the
        CPU then reads every sequence's keys strided through memory: at 4 replies 600 tokens deep, a
        quarter of the speed goes (bench/bench_kv_layout.py). Without flash attention the scores are one
        matrix product over all the cells, whatever their order, so it is not done there. llama.cpp
        cannot move cells, so each sequence's state is copied out, its cells freed, and the copy restored:
        it lands in the lowest free cells, each sequence in one piece and its cells in the same order, so
        its arithmetic does not change (a start shared with another slot is shared again, which may leave
        a hole that later cells fill)."""
        self.interleaved = 0
        lib, ctx, memory = self.lib, self.model.ctx, self.model.memory
        moving = [s for s in self.slots if s.busy and s.cached]
        # A shared start is restored as a copy before it is shared again: the pool needs room for that.
        if sum(s.borrowed for s in moving) > self.model.pool_tokens - self.cells_used():
            return
        with self.llama_lock:
            sizes = [lib.llama_state_seq_get_size(ctx, s.seq_id) for s in moving]
            if sum(sizes) > self.COMPACT_MAX_BYTES:
                return
            saved = []
            for slot, size in zip(moving, sizes):
                copy = (ctypes.c_uint8 * size)()
                if lib.llama_state_seq_get_data(ctx, copy, size, slot.seq_id) != size:
                    return                 # nothing has moved yet
                saved.append((slot, copy, size))
            for slot in moving:
                lib.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
            lost = [slot for slot, copy, size in saved
                    if lib.llama_state_seq_set_data(ctx, copy, size, slot.seq_id) != size]
            del saved
            for slot in lost:
                lib.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
                self.read_again(slot)
            # Share the borrowed starts again; a lender that is itself a borrower goes first.
            pending = [s for s in moving if s.lender is not None and s.borrowed]
            while pending:
                for slot in [s for s in pending if s.lender not in pending] or pending[:1]:
                    pending.remove(slot)
                    n = slot.borrowed
                    if common_prefix_length(slot.lender.cached, slot.cached) >= n:
                        lib.llama_memory_seq_rm(memory, slot.seq_id, 0, n)
                        lib.llama_memory_seq_cp(memory, slot.lender.seq_id, slot.seq_id, 0, n)
                    else:
                        slot.lender, slot.borrowed = None, 0    # it keeps its own copy
        self.compactions += 1

    def read_again(self, slot: Slot):
        """The slot's cells are gone: all it held, and the token it sampled last, are read again as
        prompt, after which it goes on as before."""
        pending = slot.cached + ([slot.next_token] if slot.next_token is not None else []) + slot.to_prefill
        slot.cached, slot.next_token, slot.to_prefill = [], None, pending
        self.trimmed(slot)

    def shift(self, slot: Slot) -> bool:
        """A full context: drop the older half of what follows the kept front, and move the rest down.
        The front kept includes cells shared with another slot (they cannot move). False if nothing can go."""
        job, lib, memory, seq = slot.job, self.lib, self.model.memory, slot.seq_id
        n_past = len(slot.cached)
        n_keep = max(job.n_keep, slot.shared_upto)
        n_discard = (n_past - n_keep) // 2
        if n_discard <= 0:
            return False
        with self.llama_lock:
            lib.llama_memory_seq_rm(memory, seq, n_keep, n_keep + n_discard)
            lib.llama_memory_seq_add(memory, seq, n_keep + n_discard, n_past, -n_discard)
            self._moved_since_decode = True
        del slot.cached[n_keep:n_keep + n_discard]
        job.stats.shifted_tokens += n_discard
        return True


# For the fault tests only: with KOBOLDLITE_FAULT_INJECTION=MARKER set, a generation whose
# prompt holds MARKER raises inside the generation loop. Unset (always, in use): no effect.
FAULT_INJECTION_MARKER = os.environ.get("KOBOLDLITE_FAULT_INJECTION") or None


class NextTurnReader:
    """After a chat reply most of the next prompt is known: the client sends the conversation back with the
    reply in it, and the template closes the reply's turn and opens the user's before the user's new words.
    While the loop is idle, those tokens are read into the reply's slot, so that the next turn's first token
    waits only on the new words (at 3000 tokens of context, 12 ms a token on a CPU). A guess the next prompt
    does not share is cut back by the usual reuse; a recurrent model's state cannot be cut, so none is made."""

    MOST = 64          # tokens read ahead at most (a template's turn markers, a reply's last token)
    CUT_MOST = 8       # of the slot's last tokens a guess may replace (a stop string's tokens, not shown)

    def __init__(self, model: LlamaModel, pool: KVPool, batch, llama_lock: threading.Lock,
                 log: Callable[[str], None]):
        self.model, self.pool, self.batch, self.llama_lock, self.log = model, pool, batch, llama_lock, log
        self.tokens_read = 0

    def expect(self, slot: Slot, job: Job, reason: str):
        """A reply ended: what the slot holds may go on as the next prompt (a chat's, ended by itself or its length)."""
        request = job.request
        usable = reason in ("stop", "length") and request.next_turn is not None and self.model.attention_only
        slot.expected = (request, job.buffer.text()) if usable else None

    def read(self, slot: Slot) -> int:
        """On the generation thread, while nothing runs: read the slot's expected next turn; the tokens read."""
        if slot.busy or slot.expected is None:
            return 0
        request, reply = slot.expected
        slot.expected = None
        text = request.next_turn(reply)
        if not text:
            return 0
        tokens = self.model.tokenize(text, add_bos=request.add_bos)
        keep = common_prefix_length(slot.cached, tokens)
        rest = tokens[keep:]
        if not rest or len(rest) > self.MOST or keep < max(len(slot.cached) - self.CUT_MOST, slot.shared_upto, 1):
            return 0                       # not this conversation going on (or the slot's cache has gone)
        pool_full = self.model.shared_kv and self.model.pool_tokens - self.pool.cells_used() < len(rest)
        if len(tokens) >= self.model.n_ctx or pool_full:
            return 0                       # no room to spare: no other slot's cache goes for a guess
        if keep < len(slot.cached):
            self.pool.truncate(slot, keep)
        n = put_tokens(self.batch, 0, slot, rest, logits_last=False)
        self.batch.n_tokens = n
        with self.llama_lock:
            status = self.model.lib.llama_decode(self.model.ctx, self.batch)
            if status == 0:
                self.pool.decoded()
        if status != 0:
            if status != 1:                # 1: no room found, nothing changed; else the sequence is unknown
                self.pool.truncate(slot, 0)
            return 0
        slot.cached.extend(rest)
        self.tokens_read += len(rest)
        self.log(f"read slot {slot.seq_id}'s next turn ahead ({len(rest)} tokens)")
        return len(rest)


class Engine:
    """Prepares requests (on the caller's thread) and runs the one generation loop.

    Only the generation thread calls into the llama context (admission, steps, rewinds, shifts):
    that is what keeps two threads from ever calling into it at once. Every such call is also made
    under `llama_lock`, which therefore never waits today; it is there so that anything added later
    that must touch the context from another thread (a state save, say) has one lock to take.
    Each step decodes one token for every generating slot, plus a chunk of
    prompt for a newly admitted one, in a single batch.
    """

    SHORT_PROMPT = 128                   # new prompts up to this many tokens get a step of their own
    PREFILL_CHUNK_WHILE_STREAMING = 128  # else, prompt tokens read per step while others generate

    def __init__(self, model: LlamaModel, context_shift: bool = True, draft_most: int = 0,
                 draft_model: DraftModel | None = None, prompt_cache: PromptCache | None = None,
                 log: Callable[[str], None] = lambda line: None):
        self.model = model
        self.lib = model.lib
        self.draft_most = draft_most     # tokens a speculative draft may propose per step; 0: no drafts
        self.draft_model = draft_model   # drafts from a small model; else from the context (n-grams)
        # Context shift: reuse a cache whose front turns a client dropped, and shift a full context
        # instead of stopping. Needs a model whose cache positions can move.
        self.context_shift = context_shift and model.can_shift
        self.llama_lock = threading.Lock()
        self.slots = [Slot(i) for i in range(model.n_seq)]
        self._batch = self.lib.llama_batch_init(model.n_batch, 0, model.n_seq)
        self.pool = KVPool(model, self.slots, self.llama_lock, self.context_shift, prompt_cache)
        self.next_turns = NextTurnReader(model, self.pool, self._batch, self.llama_lock, log)
        self.step_cost: StepCost | None = None      # measured on the thread that decodes: see ready_on_this_thread
        self._drafts_paused = False                 # for one step, after llama.cpp found no room for the drafts

    @property
    def compactions(self) -> int:
        return self.pool.compactions

    def ready_on_this_thread(self):
        """What is done before the first job, on the thread that will make every decode (the generation loop's).
        llama.cpp's CPU backend runs a team of OpenMP threads per calling thread: one decode made on another
        thread (start-up's) left its team beside the loop's, and every later step took twice as long on this
        2-core machine. So the step cost is measured here, while every slot is still empty."""
        if self.draft_most and self.step_cost is None and not any(s.cached for s in self.slots):
            most = min(self.model.n_batch - 64, len(self.slots) * (1 + self.draft_most), self.model.n_ctx // 2)
            with self.llama_lock:
                self.step_cost = StepCost.measure(self.model, self._batch, most)

    # -- on request threads -------------------------------------------------

    def _tokenize(self, request: GenerationRequest) -> tuple[list[int], list[int]]:
        m = self.model
        memory = m.tokenize(request.memory, add_bos=request.add_bos) if request.memory else []
        return memory, m.tokenize(request.prompt, add_bos=request.add_bos and not memory)

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """The tokens `prepare` would read for this request, before any cut to fit (count_tokens endpoints)."""
        memory, prompt = self._tokenize(request)
        return len(memory) + len(prompt)

    def prepare(self, request: GenerationRequest) -> Job:
        """Tokenize, fit the prompt into the context, check the grammar: a job ready to queue.

        The reply never takes room from the prompt: it is capped by what the prompt leaves.
        Only a Kobold request cuts its prompt, and only as KoboldCpp does (see GenerationRequest).
        """
        m = self.model
        n_ctx = m.n_ctx
        if request.max_context_length is not None:
            n_ctx = max(16, min(n_ctx, request.max_context_length))
        memory, prompt = self._tokenize(request)
        tokens = memory + prompt
        truncated = 0
        if request.cut_overlong_prompt:
            # Room for the reply as KoboldCpp keeps it, but an over-large max_length takes at most half.
            reserve = min(request.max_length or n_ctx, n_ctx // 2)
            room = n_ctx - reserve
            if len(tokens) > room:
                keep_prompt = max(room - len(memory), 1)
                tokens = (memory + prompt[-keep_prompt:])[-room:]    # the oldest story text goes first
                truncated = len(memory) + len(prompt) - len(tokens)
        elif len(tokens) >= n_ctx:
            raise context_overflow(len(tokens), n_ctx)
        if not tokens:
            tokens = [m.bos if m.bos >= 0 else m.eos]
        room_left = n_ctx - len(tokens)
        if request.max_length is None:
            max_new = room_left            # until the context is full
        elif self.context_shift:
            max_new = request.max_length   # past a full context, by shifting it
        else:
            max_new = min(request.max_length, room_left)
        max_new = max(1, max_new)
        if request.sampler.grammar:
            m.check_grammar(request.sampler.grammar)
        banned = [t for t in request.sampler.banned_token_ids if m.valid_token(t)]
        job = Job(request, tokens, max_new)
        job.n_ctx = n_ctx
        keep = memory if not truncated or not memory else []
        if request.keep_prefix:
            keep = m.tokenize(request.keep_prefix, add_bos=request.add_bos)
        job.n_keep = min(common_prefix_length(keep, tokens), n_ctx // 2)
        job.banned_token_ids = banned

        job.stats.truncated_tokens = truncated
        return job

    # -- on the generation thread ------------------------------------------

    def keep_ahead(self):
        """The loop is idle: get ahead of the next requests. Each chat's expected next turn is read into its slot
        (NextTurnReader), then the prompt cache takes copies of the idle slots' conversations (KVPool.keep_ahead)."""
        for slot in self.slots:
            self.next_turns.read(slot)
        self.pool.keep_ahead()

    def admit(self, job: Job) -> bool:
        """Place a job in the free slot whose cache it reuses most, and make that cache hold what it reuses."""
        free = [s for s in self.slots if not s.busy]
        if not free:
            return False
        self.ready_on_this_thread()         # the Scheduler has done it; an engine driven directly does it here
        slot = self._choose_slot(free, job.prompt_tokens)
        slot.expected = None
        source = self._bring_back(slot, job.prompt_tokens)
        keep = self.pool.reuse(slot, job.prompt_tokens)
        keep = self.pool.borrow_prefix(slot, job.prompt_tokens, keep)
        if not self.pool.make_room(len(job.prompt_tokens) - keep + 1, keep=slot):
            return False                   # a shared pool held by running replies: wait in the queue
        seed = job.request.sampler.seed
        if seed < 0:
            seed = secrets.randbelow(1 << 31)
        job.stats.seed = seed
        job.stats.cached_tokens = keep
        job.stats.cache_source = source if keep else "none"
        slot.job = job
        slot.generated = []
        slot.guard = PhraseGuard(job.request.sampler.banned_strings)
        slot.bans = PositionBans() if slot.guard.active else None
        slot.rewinds = 0
        slot.sampler = self._sampler_for(slot)
        slot.assembler = TextAssembler(job.request.stop_strings, job.request.trim_stop)
        slot.to_prefill = job.prompt_tokens[keep:]
        slot.next_token = None
        drafting = self.draft_most > 0 and job.request.sampler.draft
        slot.drafter = NgramDrafter() if drafting else None
        slot.draft_control = DraftControl(self.draft_most) if drafting else None
        slot.t_admitted = slot.last_used = time.monotonic()
        job.state = "running"
        return True

    RESTORE_MIN_GAIN = 64     # a kept state is restored only if it saves this many more tokens than the slots'

    def _bring_back(self, slot: Slot, prompt: list[int]) -> str:
        """Where this prompt's cache comes from: "slot" (a slot's, as ever), or "ram" / "disk" when a displaced
        conversation kept in the prompt cache starts it for longer than any slot's cache: it is restored into
        the chosen slot (whose own conversation, if worth it, goes to the cache first)."""
        pool, cache = self.pool, self.pool.cache
        own = pool.plan_reuse(slot.cached, prompt)[0] if slot.cached else 0
        if cache is None:
            return "slot"
        entry, common = cache.best(prompt)
        others = max((common_prefix_length(s.cached, prompt) for s in self.slots if s is not slot), default=0)
        if entry is None or common < max(own, others if self.model.shared_kv else 0) + self.RESTORE_MIN_GAIN:
            pool.stash(slot, own)             # what of it this prompt will not reuse is about to go
            return "slot"
        pool.stash(slot)
        if not pool.make_room(len(entry.tokens) - len(slot.cached) + len(prompt) - common + 1, keep=slot):
            return "slot"
        where = "ram" if entry.data is not None else "disk"
        data = cache.data_of(entry)
        if data is None or not pool.restore(slot, entry.tokens, data):
            return "slot"
        if common == len(entry.tokens):
            cache.taken(entry)                # the slot holds it all now
        return where

    def _sampler_for(self, slot: Slot) -> SamplerChain:
        """The slot's job's sampler chain, having seen its prompt and what it has generated so far."""
        job = slot.job
        request = job.request
        snapshot = DrawSnapshot(request.top_logprobs) if request.logprobs and request.logprobs_after_samplers else None
        if slot.bans is not None:
            slot.bans.index = 0
        chain = SamplerChain(self.model, request.sampler, job.stats.seed, job.banned_token_ids, slot.bans, snapshot)
        chain.remember_prompt(job.prompt_tokens)
        chain.replay(slot.generated)
        return chain

    def _choose_slot(self, free: list[Slot], prompt: list[int]) -> Slot:
        """The free slot where this prompt costs least: prompt tokens still to read plus cached tokens
        thrown away (a shift's savings count). Only the least recently used slot and the slots this
        prompt continues are candidates: those whose cache it reuses at least half of (a chat going
        on), or that supply at least half of it (the same prompt sent again, to regenerate a reply).

        Counting what is thrown away keeps a common opening ("Chapter", a system prompt) from
        evicting another user's long story while a cheaper slot is free.
        """
        lru = min(free, key=lambda s: s.last_used)
        costs = {}
        for s in free:
            reused = self.pool.plan_reuse(s.cached, prompt)[0] if s.cached else 0
            if s is lru or (reused and (2 * reused >= len(s.cached) or 2 * reused >= len(prompt))):
                costs[s.seq_id] = (len(prompt) - reused) + (len(s.cached) - reused)
        return min(free, key=lambda s: (costs.get(s.seq_id, math.inf), s is lru))

    @property
    def n_slots(self) -> int:
        return len(self.slots)

    def step(self) -> list[Job]:
        """Decode one batch and sample for every slot that is due; return the jobs that ended."""
        finished: list[Job] = []
        for slot in self.slots:
            if slot.busy and slot.job.cancelled.is_set():
                finished.append(self._finish(slot, "abort"))
        if self.pool.compaction_due():
            self.pool.compact()
        batch = self._batch
        n = 0
        # (slot, batch index of its first logits, the draft tokens whose logits follow)
        due: list[tuple[Slot, int, list[int]]] = []
        added: list[tuple[Slot, list[int]]] = []
        drafts: dict[int, list[int]] = {}
        taking = 0                          # cells the generating slots take in this step
        width = sum(1 for s in self.slots if s.busy and s.next_token is not None)    # the batch before drafts
        for slot in self.slots:
            if not slot.busy or slot.next_token is None:
                continue
            full = len(slot.cached) >= slot.job.n_ctx or not self.pool.make_room(taking + 1)
            if full and self.context_shift and self.pool.shift(slot):   # its own context, or its share of a full pool
                full = not self.pool.make_room(taking + 1)
            if full:
                slot.job.stats.stop_reason = 0
                finished.append(self._finish(slot, "length"))
            else:
                draft = [] if self._drafts_paused else self._draft(slot, self.model.n_batch - taking - 1, width)
                if draft and not self.pool.make_room(taking + 1 + len(draft)):
                    draft = []
                drafts[slot.seq_id] = draft
                taking += 1 + len(draft)
                width += len(draft)
        prefilling = [s for s in self.slots if s.busy and s.to_prefill]
        generating = [s for s in self.slots if s.busy and s.next_token is not None]
        # A short new prompt gets a step of its own: its first token comes sooner, and the others
        # lose one short step. A long one is read in chunks beside the others' tokens, so they keep
        # streaming while it is read.
        short_prefill = prefilling and sum(len(s.to_prefill) for s in prefilling) <= self.SHORT_PROMPT
        if not short_prefill:
            for slot in generating:
                # The sampled token and its draft, each with logits; only the sampled one is the cache's
                # for now: the draft's cells are kept or cut once the model has checked it.
                draft = drafts.get(slot.seq_id, [])
                first = n
                n = put_tokens(batch, n, slot, [slot.next_token, *draft], logits_last=True, logits_all=bool(draft))
                due.append((slot, first, draft))
                added.append((slot, [slot.next_token]))
        budget = self.model.n_batch if short_prefill or not generating else self.PREFILL_CHUNK_WHILE_STREAMING
        for slot in prefilling:
            room = min(budget, self.model.n_batch - n)
            if room <= 0:
                break
            chunk = slot.to_prefill[:room]
            if len(chunk) == len(slot.to_prefill) > 1 and self._reproducible(slot):
                # The prompt's last token is read in a step of its own, as it is when the rest is cached:
                # a batch of one rounds differently from a long one, and so a seed gives the same text
                # whether or not the prompt was cached.
                chunk = chunk[:-1]
            done = len(chunk) == len(slot.to_prefill)
            n = put_tokens(batch, n, slot, chunk, logits_last=done)
            budget -= len(chunk)
            if done:
                due.append((slot, n - 1, []))
            added.append((slot, chunk))
        if n == 0:
            return finished
        batch.n_tokens = n
        with self.llama_lock:
            status = self.lib.llama_decode(self.model.ctx, batch)
            self._drafts_paused = False
            if status == 1 and any(drafts.values()):
                # No cells for the batch in a nearly full pool (llama.cpp found no room for it, and changed
                # nothing): nothing of this step was kept, so the next one does the same work without drafts.
                self._drafts_paused = True
                return finished
            if status != 0:
                for slot, _ in added:
                    finished.append(self._finish(slot, "error", f"llama_decode failed ({status})"))
                return finished
            self.pool.decoded()
            for slot, chunk in added:
                slot.cached.extend(chunk)
                if slot.next_token is None:
                    del slot.to_prefill[:len(chunk)]
                else:
                    slot.next_token = None
            if len(generating) > 1 and not short_prefill:      # cells side by side: a token and its draft each
                self.pool.interleaved += sum(1 + len(drafts.get(s.seq_id, ())) for s in generating)
            sampled = []
            for slot, i, draft in due:
                # The model's own draw at each place; a draft is checked while the draws equal it.
                draws = []
                for j in range(len(draft) + 1):
                    token = slot.sampler.sample(self.model.ctx, i + j, self.model.n_vocab)
                    draws.append((token, self._logprob_entry(slot, i + j, token) if token is not None else None))
                    if j == len(draft) or token != draft[j]:
                        break
                sampled.append((slot, draws, draft))
        now = time.monotonic()
        for slot, draws, draft in sampled:
            job = slot.job
            if job.stats.generated_tokens == 0:
                slot.t_first_token = now
                job.stats.prompt_seconds = now - slot.t_admitted
            kept = 0
            try:
                for j, (token, entry) in enumerate(draws):
                    rewinds = slot.rewinds
                    ended = self._accept(slot, token, entry)
                    if ended or slot.rewinds != rewinds:
                        break
                    if j < len(draft) and token == draft[j]:
                        slot.cached.append(token)      # decoded in this step already
                        slot.next_token = None
                        kept += 1
                    else:
                        break
            except Exception as e:  # one request's failure must not end its batch-mates
                ended = "error"
                error = f"generation failed: {type(e).__name__}: {e}"
            else:
                error = None
            if draft:
                job.stats.drafted_tokens += len(draft)
                job.stats.draft_accepted += kept
                slot.draft_control.update(len(draft), kept, slot.long_repeat)
                if kept < len(draft):
                    self.pool.truncate(slot, len(slot.cached))     # the cells of what was not kept go
            if ended:
                finished.append(self._finish(slot, ended, error))
        return finished

    def _draft(self, slot: Slot, room: int, width: int) -> list[int]:
        """Tokens to propose after the slot's sampled token: as many as pay for the wider batch, never past
        its context, its reply's length, or the batch."""
        if slot.drafter is None:
            return []
        job = slot.job
        limit = min(room, job.n_ctx - len(slot.cached) - 1, job.max_new_tokens - job.stats.generated_tokens - 1)
        if limit <= 0:
            return []
        context = slot.cached + [slot.next_token]
        if self.draft_model is None:
            slot.drafter.sync(context)
            if not slot.drafter.has_match():
                return []                    # nothing repeats here: no cost, and the estimate stays as it is
        slot.long_repeat = (self.draft_model is None
                            and slot.drafter.repeat_length(DraftControl.LONG_REPEAT) >= DraftControl.LONG_REPEAT)
        cost = self.step_cost        # unmeasured: only what the request asks for
        paying = slot.draft_control.length(width, cost, slot.long_repeat) if cost else 0
        limit = min(limit, max(paying, job.request.sampler.draft_min))
        if limit <= 0:
            return []
        if self.draft_model is not None:
            return self.draft_model.propose(slot.seq_id, context, limit)
        return slot.drafter.propose(limit)

    def _reproducible(self, slot: Slot) -> bool:
        """Whether a fixed seed can give this slot's reply again: always with a context per slot; in a
        shared pool only when it runs alone (beside others their cells interleave with its own, and the
        arithmetic rounds differently). Where it cannot, the step that keeps it so is not spent."""
        return not self.model.shared_kv or not any(s.busy for s in self.slots if s is not slot)

    def _logprob_entry(self, slot: Slot, batch_index: int, token: int) -> TokenLogprob | None:
        """The sampled token's log-probability and the top alternatives, only when the request asks:
        from the draw's candidates (KoboldCpp's way), or from the model's own distribution (the
        logits llama.cpp just computed; OpenAI's and llama-server's way)."""
        request = slot.job.request
        if not request.logprobs:
            return None
        if request.logprobs_after_samplers:
            return slot.sampler.snapshot.entry(token)
        import numpy
        logits = numpy.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.model.ctx, batch_index),
                                          shape=(self.model.n_vocab,)).astype(numpy.float64)
        top = logits.max()
        norm = top + math.log(numpy.exp(logits - top).sum())
        n = request.top_logprobs
        best = numpy.argpartition(-logits, n)[:n] if n else numpy.array([], dtype=numpy.int64)
        best = best[numpy.argsort(-logits[best], kind="stable")]
        return TokenLogprob(token, float(logits[token] - norm), [(int(t), float(logits[t] - norm)) for t in best])

    MAX_BANS_AT_ONE_PLACE = 64     # then a phrase ban leaves no way on: the reply ends there
    MAX_REWINDS = 1024

    def _accept(self, slot: Slot, token: int, entry: TokenLogprob | None = None) -> str | None:
        """Take one sampled token: emit its text, or take back a banned phrase, or say why generation ends."""
        job = slot.job
        if FAULT_INJECTION_MARKER and FAULT_INJECTION_MARKER in job.request.prompt:
            raise RuntimeError("fault injected for a test")
        if token is None or (slot.bans is not None and slot.bans.exhausted):
            job.stats.stop_reason = 1       # nothing may follow: the grammar, bans and biases allow no token
            return "stop"
        if self.model.is_end_of_generation(token) or token in job.stop_tokens:
            job.stats.stop_reason = 1
            return "stop"
        job.stats.generated_tokens += 1
        slot.generated.append(token)
        released, rewind = slot.guard.push(token, self.model.piece(token, job.request.render_special), entry)
        if rewind:
            return self._rewind(slot, rewind)
        for released_token, data, released_entry in released:
            self._emit(slot, released_token, data, released_entry)
        if slot.assembler.stopped_by is not None:
            job.stats.stop_reason = 2
            job.stats.stop_string = slot.assembler.stopped_by
            return "stop"
        if job.stats.generated_tokens >= job.max_new_tokens:
            job.stats.stop_reason = 0
            return "length"
        slot.next_token = token
        return None

    def _emit(self, slot: Slot, token: int, data: bytes, entry: TokenLogprob | None):
        """A token's text goes to the stop-string assembler, and what it lets through to the readers."""
        job = slot.job
        if entry is not None:
            job.logprobs.append(entry)
        if not data and not job.request.render_special:
            # A control token shows no text, yet a stop string may name it (a template's start of turn).
            text = slot.assembler.feed(self.model.piece(token, special=True), hidden=True)
        else:
            text = slot.assembler.feed(data)
        if text:
            job.buffer.append(text)

    def _rewind(self, slot: Slot, n: int) -> str | None:
        """Take back the last n tokens (a banned phrase begins in the first): the KV cache, the position
        and the samplers' state go back to where it began, its first token is banned there, and the
        token before it is decoded again to sample anew."""
        job = slot.job
        first = slot.generated[-n]
        del slot.generated[-n:]
        job.stats.generated_tokens -= n
        # The newest token was sampled but not decoded; the n - 1 before it are the cache's last.
        cut = len(slot.cached) - n
        slot.next_token = slot.cached[cut]
        self.pool.truncate(slot, cut)
        slot.rewinds += 1
        banned_here = slot.bans.ban(len(slot.generated), first)
        if banned_here > self.MAX_BANS_AT_ONE_PLACE or slot.rewinds > self.MAX_REWINDS:
            job.stats.stop_reason = 1
            return "stop"
        slot.sampler.free()
        slot.sampler = self._sampler_for(slot)
        return None

    def _finish(self, slot: Slot, reason: str, error: str | None = None) -> Job:
        job = slot.job
        if reason in ("stop", "length"):
            for token, data, entry in slot.guard.flush():
                self._emit(slot, token, data, entry)
            tail = slot.assembler.flush()
            if tail:
                job.buffer.append(tail)
        self.next_turns.expect(slot, job, reason)
        if slot.t_first_token and job.stats.generated_tokens:
            job.stats.generation_seconds = time.monotonic() - slot.t_first_token
        if slot.to_prefill:
            # The prompt was not fully read in: the cache holds only what was decoded.
            slot.to_prefill = []
        if reason == "error":
            slot.cached = []       # after a failed decode the sequence's state is unknown
            self.pool.trimmed(slot)
        slot.sampler.free()
        slot.sampler = None
        slot.job = None
        slot.next_token = None
        slot.t_first_token = 0.0
        job.end(reason, error)
        return job

    def abort_all(self) -> list[Job]:
        return [self._finish(s, "abort") for s in self.slots if s.busy]

    # -- saved states (llama-server's /slots, KoboldCpp's admin states); on the generation thread ---------

    @functools.cached_property
    def identity(self) -> dict:
        return model_identity(self.model)

    def idle_slot(self, i: int) -> Slot:
        if not 0 <= i < len(self.slots):
            raise RequestError(f"no slot {i}: this server has slots 0 to {len(self.slots) - 1}", status=404,
                               kind="not_found")
        if self.slots[i].busy:
            raise RequestError(f"slot {i} is generating: try again when it is done", status=409, kind="conflict")
        return self.slots[i]

    def save_slot(self, i: int, path: str) -> tuple[int, int]:
        """The slot's conversation to a file; (tokens, bytes)."""
        slot = self.idle_slot(i)
        data = self.pool.state_of(slot) if slot.cached else None
        if data is None:
            raise RequestError(f"slot {i} holds nothing to save")
        write_state_file(path, self.identity, slot.cached, data)
        return len(slot.cached), len(data)

    def restore_slot(self, i: int, tokens: list[int], data: bytes) -> int:
        """A saved conversation into an idle slot, where the next prompt that continues it finds it."""
        slot = self.idle_slot(i)
        self.pool.stash(slot)
        if not self.pool.make_room(len(tokens) - len(slot.cached), keep=slot) \
                or not self.pool.restore(slot, tokens, data):
            raise RequestError(f"slot {i}: the saved state does not fit in the KV cache now", status=503,
                               kind="service_unavailable")
        slot.last_used = time.monotonic()
        return len(tokens)

    def erase_slot(self, i: int) -> int:
        slot = self.idle_slot(i)
        n = len(slot.cached)
        self.pool.truncate(slot, 0)
        return n

    def latest_slot(self) -> Slot | None:
        """The idle slot used last that holds a conversation (KoboldCpp's one context, as far as a state goes)."""
        held = [s for s in self.slots if s.cached and not s.busy]
        return max(held, key=lambda s: s.last_used) if held else None

    def fail_all(self, error: str) -> list[Job]:
        return [self._finish(s, "error", error) for s in self.slots if s.busy]


class ServerBusy(Exception):
    pass


class FairQueue:
    """Waiting jobs, served round-robin across client addresses: one client's burst of requests
    waits behind every other client's next request, not in front of it."""

    def __init__(self):
        self._lines: collections.OrderedDict[str, collections.deque[Job]] = collections.OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def append(self, job: Job):
        self._lines.setdefault(job.client, collections.deque()).append(job)
        self._count += 1

    def popleft(self) -> Job:
        client, line = next(iter(self._lines.items()))
        job = line.popleft()
        del self._lines[client]
        if line:
            self._lines[client] = line          # that client's next request goes to the back
        self._count -= 1
        return job

    def push_front(self, job: Job):
        """Back to the head of the queue (it could not start yet)."""
        self._lines.setdefault(job.client, collections.deque()).appendleft(job)
        self._lines.move_to_end(job.client, last=False)
        self._count += 1

    def remove(self, job: Job):
        line = self._lines[job.client]
        line.remove(job)
        if not line:
            del self._lines[job.client]
        self._count -= 1

    def __iter__(self) -> Iterator[Job]:
        """In the order they will run."""
        lines = [list(line) for line in self._lines.values()]
        for i in range(max(map(len, lines), default=0)):
            yield from (line[i] for line in lines if i < len(line))

    def clear(self) -> list[Job]:
        jobs = list(self)
        self._lines.clear()
        self._count = 0
        return jobs


class Scheduler:
    """The queue in front of the engine, and the thread that runs the generation loop.

    Also the registry of jobs by genkey, for check and abort, and the one place every job's end is
    recorded (totals for /metrics, the log line), whatever ended it. Request threads see jobs only
    through this object, under its condition; the engine's slots belong to the generation thread.
    """

    RECENT_KEYED_JOBS = 256
    KEEP_AHEAD_AFTER = 0.5    # seconds idle before the slots' conversations are kept in the prompt cache

    def __init__(self, engine: "Engine", max_waiting: int, on_finished: Callable[[Job], None] = lambda job: None):
        self.engine = engine
        self.on_finished = on_finished
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._queue = FairQueue()
        self._running: list[Job] = []            # admitted, in order of admission
        self._by_genkey: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._last_unkeyed: Job | None = None    # shown to a check without genkey while it runs
        self._stopping = threading.Event()     # the shared abort signal: ends every job
        self._calls: list[tuple[Callable, dict, threading.Event]] = []   # work for the loop thread, between steps
        self._thread = threading.Thread(target=self._run, name="generation-loop", daemon=True)
        self._stepped = False                  # work done since the loop last kept its slots' conversations
        self.total_generations = 0
        self.totals = collections.Counter()     # for /metrics
        self.last_job: Job | None = None

    def start(self):
        """Start the loop; return once the engine is ready on it (so a first request finds the loop waiting)."""
        self._ready = threading.Event()
        self._thread.start()
        self._ready.wait()

    # -- request threads ---------------------------------------------------

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._stopping.is_set():
                raise ServerBusy("the server is shutting down")
            if self._full():
                raise ServerBusy()
            self._queue.append(job)
            if job.genkey:
                self._by_genkey.pop(job.genkey, None)
                self._by_genkey[job.genkey] = job
                while len(self._by_genkey) > self.RECENT_KEYED_JOBS:
                    self._by_genkey.popitem(last=False)
            elif job.request.checkable_without_genkey:
                self._last_unkeyed = job
            self._cond.notify_all()
        return job

    def call(self, fn: Callable[["Engine"], Any], timeout: float = 120.0) -> Any:
        """Run fn(engine) on the generation thread between two steps (only it may use the llama context), and
        give back what it returns or raises."""
        box: dict = {}
        done = threading.Event()
        with self._cond:
            if self._stopping.is_set():
                raise ServerBusy("the server is shutting down")
            self._calls.append((fn, box, done))
            self._cond.notify_all()
        if not done.wait(timeout):
            raise RequestError("the generation loop did not answer in time", status=503, kind="service_unavailable")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def _run_calls(self):
        with self._cond:
            calls, self._calls = self._calls, []
        for fn, box, done in calls:
            try:
                box["result"] = fn(self.engine)
            except Exception as e:   # handed to the caller
                box["error"] = e
            done.set()

    def _full(self) -> bool:
        return len(self._queue) >= self.engine.n_slots - len(self._running) + self.max_waiting

    def find(self, genkey: str) -> Job | None:
        """The latest job of this genkey; with no genkey, the unkeyed Kobold-API job while it is queued
        or running (old clients poll so during their own blocking generate; after it, the text is
        nobody else's business)."""
        with self._cond:
            return self._by_genkey.get(genkey) if genkey else self._last_unkeyed

    def abort(self, genkey: str) -> Job | None:
        """Abort the job with this genkey, or without one the latest running job that has none
        (SillyTavern's stop button): take it out of the queue, or cancel it."""
        with self._cond:
            job = self._by_genkey.get(genkey) if genkey else self._latest_unkeyed()
            if job is None or job.state == "done":
                return None
            if job.state == "queued":
                self._queue.remove(job)
                self._end_unstarted(job, "abort")
                return job
        job.cancel()
        return job

    def _latest_unkeyed(self) -> Job | None:
        running = [j for j in self._running if not j.genkey]
        if running:
            return running[-1]
        waiting = [j for j in self._queue if not j.genkey]
        return waiting[-1] if waiting else None

    def queue_position(self, job: Job) -> int:
        """1 for the next to run; 0 when not waiting."""
        with self._cond:
            return next((i for i, j in enumerate(self._queue, 1) if j is job), 0)

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._queue)

    @property
    def active(self) -> int:
        with self._cond:
            return len(self._running)

    @property
    def saturated(self) -> bool:
        """True when one more request would be refused as busy."""
        with self._cond:
            return self._full()

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._queue and not self._running

    def stop(self, timeout: float = 5.0):
        """Abort everything, queued and running, and let the loop thread end."""
        with self._cond:
            self._stopping.set()
            for job in self._queue.clear():
                self._end_unstarted(job, "abort")
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- every job's end ------------------------------------------------------

    def _end_unstarted(self, job: Job, reason: str, error: str | None = None):
        """A job that never reached the engine (aborted in the queue, or refused by it). Holds _cond."""
        job.end(reason, error)
        self._record([job])

    def _record(self, jobs: list[Job]):
        """Holds _cond. The jobs have ended: count them, forget them as running, log them."""
        for job in jobs:
            if job in self._running:
                self._running.remove(job)
            if self._last_unkeyed is job:
                self._last_unkeyed = None
            self.total_generations += 1
            s = job.stats
            self.totals.update(requests=1, prompt_tokens=s.prompt_tokens - s.cached_tokens,
                               prompt_seconds=s.prompt_seconds, generated_tokens=s.generated_tokens,
                               generation_seconds=s.generation_seconds)
            self.totals[f"finished_{job.buffer.finish_reason}"] += 1
            self.last_job = job
            self.on_finished(job)
        self._cond.notify_all()

    # -- the generation thread -----------------------------------------------

    def _run(self):
        engine = self.engine
        try:
            engine.ready_on_this_thread()
        finally:
            self._ready.set()
        while True:
            with self._cond:
                keep_ahead = False
                while not self._stopping.is_set() and not self._queue and not self._running and not self._calls:
                    if not self._stepped:
                        self._cond.wait()
                    elif not self._cond.wait(self.KEEP_AHEAD_AFTER):
                        keep_ahead = True      # idle for a while (a client's next request at once never waits)
                        break
                if self._stopping.is_set():
                    self._record(engine.abort_all())
                    for _, box, done in self._calls:
                        box["error"] = RequestError("the server is shutting down", 503, "service_unavailable")
                        done.set()
                    return
            if keep_ahead:
                self._stepped = False
                engine.keep_ahead()
                continue
            if self._calls:
                self._run_calls()
            with self._cond:
                starting = []
                while self._queue and len(self._running) < engine.n_slots:
                    job = self._queue.popleft()
                    job.state = "starting"
                    self._running.append(job)
                    starting.append(job)
            for i, job in enumerate(starting):   # outside the condition: samplers and grammars are built here
                try:
                    admitted = engine.admit(job)
                except Exception as e:  # e.g. a sampler llama.cpp refuses: this job fails alone
                    with self._cond:
                        self._end_unstarted(job, "error", f"could not start the generation: {e}")
                    continue
                if not admitted:        # no room yet (a shared KV pool held by running replies)
                    with self._cond:
                        for waiting in reversed(starting[i:]):
                            self._running.remove(waiting)
                            waiting.state = "queued"
                            self._queue.push_front(waiting)
                        if not self._running:    # nothing will free room: never wait on nothing
                            self._queue.remove(job)
                            self._end_unstarted(job, "error", "the prompt does not fit in the KV cache")
                    break
            self._stepped = True
            try:
                ended = engine.step()
            except Exception as e:  # a failure fails the running jobs, never the server
                ended = engine.fail_all(f"generation failed: {e}")
            if ended:
                with self._cond:
                    self._record(ended)


class ChatTemplate:
    """A Jinja chat template rendered in a sandbox, as Hugging Face tokenizers render it."""

    END_OF_TURN_MARKERS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>")

    def __init__(self, source: str, name: str, model: LlamaModel):
        import jinja2.ext
        import jinja2.sandbox
        # As transformers renders templates: loop controls, a tojson that does not escape HTML, and
        # the {% generation %} tag (which marks the assistant's text for training; here it just renders).
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, generation_tag()])
        env.filters["tojson"] = lambda value, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
            json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals["raise_exception"] = self._raise
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
        self.source = source
        self.name = name
        self.template = env.from_string(source)
        self.bos_text = model.piece(model.bos, special=True).decode("utf-8", "replace") if model.bos >= 0 else ""
        self.eos_text = model.piece(model.eos, special=True).decode("utf-8", "replace") if model.eos >= 0 else ""
        # The template's end-of-turn marker ends a reply, whether the model emits it as a token or as text.
        self.stop_strings = [m for m in self.END_OF_TURN_MARKERS if m in source]
        self.stop_token_ids = []
        for marker in self.stop_strings:
            ids = model.tokenize(marker, parse_special=True)
            if len(ids) == 1:
                self.stop_token_ids.append(ids[0])

    @staticmethod
    def _raise(message: str):
        raise RequestError(f"the chat template rejected these messages: {message}")

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
        import jinja2
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_text, eos_token=self.eos_text, **variables)
        except jinja2.TemplateError as e:
            raise RequestError(f"the chat template could not render these messages: {e}") from None

    def generation_request(self, messages: list[dict], stop_strings: list[str] = (), template_vars: dict | None = None,
                           **fields) -> GenerationRequest:
        """The request for a chat; its leading system turns are what a context shift keeps.
        `template_vars`: more variables real templates read (`tools`, `enable_thinking`)."""
        system = list(itertools.takewhile(lambda m: m["role"] == "system", messages))
        try:
            keep = self.render(system, add_generation_prompt=False) if system else ""
        except RequestError:       # a template that wants a user turn after the system one
            keep = ""
        return self.prompt_request(self.render(messages, **(template_vars or {})), stop_strings=list(stop_strings),
                                   keep_prefix=keep, next_turn=self._next_turn(messages, template_vars or {}),
                                   **fields)

    def _next_turn(self, messages: list[dict], variables: dict) -> Callable[[str], str | None]:
        def next_turn(reply: str) -> str | None:
            """The next prompt's text up to where its user's words go, should the client send the reply back."""
            marker = "\x00next-turn\x00"
            try:
                text = self.render(messages + [{"role": "assistant", "content": reply},
                                               {"role": "user", "content": marker}],
                                   add_generation_prompt=False, **variables)
            except RequestError:
                return None
            cut = text.find(marker)
            return text[:cut] if cut > 0 else None
        return next_turn

    def prompt_request(self, prompt: str, memory: str = "", stop_strings: list[str] = (),
                       **fields) -> GenerationRequest:
        """A request for text this template rendered: its own BOS (none added on top), and its end of
        turn ends the reply."""
        head = memory or prompt
        return GenerationRequest(prompt=prompt, memory=memory,
                                 add_bos=not (self.bos_text and head.startswith(self.bos_text)),
                                 stop_strings=list(stop_strings) + self.stop_strings,
                                 stop_token_ids=list(self.stop_token_ids), **fields)

    # -- KoboldCpp's instruct placeholders --------------------------------------------

    def render_instruct(self, memory: str, prompt: str) -> tuple[str, str] | None:
        """Memory and prompt written with {{[INPUT]}}-style placeholders, rendered as this template
        renders the same conversation; None when neither holds one. Text before the first placeholder
        stays in front as it is, and text after an unclosed last turn starts that turn's text (after
        {{[OUTPUT]}}: the start of the reply). The memory's whole turns stay in the memory part, so a
        story cut from the front still keeps them."""
        if not (INSTRUCT_PLACEHOLDER.search(memory) or INSTRUCT_PLACEHOLDER.search(prompt)):
            return None
        convo = InstructConversation.parse(memory + prompt)
        rendered = self._render_conversation(convo)
        if not INSTRUCT_PLACEHOLDER.search(memory):
            kept = memory                               # plain memory: in front, as it is
        else:
            in_memory = InstructConversation.parse(memory)
            whole = in_memory.messages + ([in_memory.open_message()] if in_memory.open_role else [])
            if INSTRUCT_PLACEHOLDER.match(prompt.lstrip()) is None and in_memory.open_role:
                whole = in_memory.messages             # the memory's last turn goes on in the prompt
            kept = in_memory.prefix + self._strip_bos(self.render(whole, add_generation_prompt=False)) \
                if whole else in_memory.prefix
        bos = self.bos_text if self.bos_text and rendered.startswith(self.bos_text) else ""
        body = rendered[len(bos):]
        if body.startswith(kept):
            return bos + kept, body[len(kept):]
        return "", rendered

    def _strip_bos(self, text: str) -> str:
        return text[len(self.bos_text):] if self.bos_text and text.startswith(self.bos_text) else text

    def _render_conversation(self, convo: "InstructConversation") -> str:
        messages = convo.messages
        if convo.open_role == "assistant":
            text = self.render(messages, add_generation_prompt=True) + convo.tail.lstrip()
        elif convo.open_role is not None:
            # An unclosed user or system turn: render up to where its text goes, then the text itself.
            marker = "\x00open-turn\x00"
            full = self.render(messages + [{"role": convo.open_role, "content": marker}], add_generation_prompt=False)
            cut = full.find(marker)
            text = full[:cut] + convo.tail.lstrip() if cut >= 0 else \
                self.render(messages + [convo.open_message()], add_generation_prompt=False)
        else:
            text = self.render(messages, add_generation_prompt=False)
        if convo.prefix:
            bos = self.bos_text if self.bos_text and text.startswith(self.bos_text) else ""
            text = bos + convo.prefix + text[len(bos):]
        return text

    def instruct_stops(self, stops: list[str]) -> list[str]:
        """Placeholders in stop strings become where this template starts (or, for the _END forms,
        ends) that role's turn; one that maps to nothing is dropped."""
        markers = self.turn_markers
        out = []
        for stop in stops:
            replaced = INSTRUCT_PLACEHOLDER.sub(
                lambda m: markers.get((PLACEHOLDER_ROLES[m.group(1)], bool(m.group(2))), ""), stop)
            if replaced.strip():
                out.append(replaced.strip() if INSTRUCT_PLACEHOLDER.fullmatch(stop) else replaced)
        return out

    @functools.cached_property
    def turn_markers(self) -> dict[tuple[str, bool], str]:
        """(role, is_end) -> the text this template puts at the start or end of that role's turn,
        found by rendering a probe conversation and reading what stands between its messages."""
        words = {k: f"KLPROBE{k}X" for k in ("S", "U1", "A1", "U2", "A2")}
        probe = [("user", "U1"), ("assistant", "A1"), ("user", "U2"), ("assistant", "A2")]
        rendered = None
        for with_system in (True, False):
            msgs = ([("system", "S")] if with_system else []) + probe
            try:
                text = self.render([{"role": r, "content": words[k]} for r, k in msgs], add_generation_prompt=False)
            except RequestError:
                continue
            if all(words[k] in text for _, k in msgs):
                rendered = text
                break
        markers: dict[tuple[str, bool], str] = {}
        if rendered is None:
            return markers

        def between(a: str, b: str) -> str:
            start = rendered.index(words[a]) + len(words[a])
            return rendered[start:rendered.index(words[b], start)]

        for role, before, after in (("user", "A1", "U2"), ("assistant", "U2", "A2")):
            gap = between(before, after).strip()
            previous = "assistant" if role == "user" else "user"
            for end in self.END_OF_TURN_MARKERS:
                if gap.startswith(end):
                    markers[(previous, True)] = end
                    gap = gap[len(end):].strip()
                    break
            markers[(role, False)] = gap
        if words["S"] in rendered:
            head = self._strip_bos(rendered[:rendered.index(words["S"])]).strip()
            if head and not head.startswith(markers.get(("user", False), "\x00")):
                markers[("system", False)] = head
            after_system = between("S", "U1").strip()
            for end in self.END_OF_TURN_MARKERS:
                if after_system.startswith(end):
                    markers[("system", True)] = end
        return markers


@functools.cache
def generation_tag() -> type:
    """The Jinja extension for transformers' {% generation %}...{% endgeneration %}: renders its body."""
    import jinja2.ext

    class GenerationTag(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return GenerationTag


INSTRUCT_PLACEHOLDER = re.compile(r"\{\{\[(SYSTEM|INPUT|OUTPUT)(_END)?\]\}\}")


PLACEHOLDER_ROLES = {"SYSTEM": "system", "INPUT": "user", "OUTPUT": "assistant"}


@dataclasses.dataclass
class InstructConversation:
    """Text with KoboldCpp's instruct placeholders, read as a conversation."""
    prefix: str                   # text before the first placeholder
    messages: list[dict]          # closed turns
    open_role: str | None         # the role of a last turn left open (no _END, nothing after)
    tail: str                     # that open turn's text so far

    @classmethod
    def parse(cls, text: str) -> "InstructConversation":
        parts = INSTRUCT_PLACEHOLDER.split(text)   # text, (kind, end, text)*
        convo = cls(prefix=parts[0], messages=[], open_role=None, tail="")
        current: dict | None = None
        for i in range(1, len(parts), 3):
            kind, is_end, body = parts[i], parts[i + 1], parts[i + 2]
            if is_end:
                if current is not None:
                    convo.messages.append(current)
                    current = None
                if body.strip():          # stray text between turns belongs to the one before it
                    if convo.messages:
                        convo.messages[-1]["content"] += "\n" + body.strip()
                    else:
                        convo.prefix += body
                continue
            if current is not None:
                convo.messages.append(current)
            current = {"role": PLACEHOLDER_ROLES[kind], "content": body}
        if current is not None:
            convo.open_role, convo.tail = current["role"], current["content"]
        for m in convo.messages:
            m["content"] = m["content"].strip()
        convo.messages = [m for m in convo.messages if m["content"]]
        return convo

    def open_message(self) -> dict:
        return {"role": self.open_role, "content": self.tail.strip()}


def load_chat_template(model: LlamaModel, choice: str | None) -> tuple[ChatTemplate, str]:
    """The template to use, and a line saying where it came from."""
    if choice in BUILTIN_CHAT_TEMPLATES:
        return ChatTemplate(BUILTIN_CHAT_TEMPLATES[choice], choice, model), f"chat template: built-in {choice}"
    if choice:
        with open(choice, encoding="utf-8") as f:
            return ChatTemplate(f.read(), os.path.basename(choice), model), f"chat template: {choice}"
    own = model.metadata("tokenizer.chat_template")
    if own:
        return ChatTemplate(own, "model", model), "chat template: the model's own"
    return (ChatTemplate(BUILTIN_CHAT_TEMPLATES["chatml"], "chatml", model),
            "chat template: the model has none; using ChatML (choose another with --chat-template)")


# Routes get a Request and return a Response; App holds the model, the engine and the scheduler,
# starts generations and logs their ends. Nothing here knows about HTTP.
class Response:
    def __init__(self, status: int = 200, body: bytes = b"", content_type: str = "application/json",
                 headers: dict[str, str] | None = None):
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers or {}


class JSONResponse(Response):
    def __init__(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None):
        super().__init__(status, json.dumps(obj).encode(), "application/json", headers)


class StreamResponse(Response):
    """A body written piece by piece as `chunks` yields; the connection closes at its end."""

    def __init__(self, content_type: str, chunks: Iterator[bytes], job: Job | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(200, b"", content_type, headers)
        self.chunks = chunks
        self.job = job


BUSY_MESSAGE = "Server is busy; please try again later."


class ResponseStore:
    """Responses kept for `previous_response_id`: least recently used out first, at most MAX_ITEMS of them and
    MAX_BYTES of their conversations' JSON; each readable only with the key (or no key) that made it."""

    MAX_ITEMS = 1024
    MAX_BYTES = 64 * 1024 * 1024

    def __init__(self):
        self._lock = threading.Lock()
        self._items: collections.OrderedDict[str, tuple[str, dict, list[dict], int]] = collections.OrderedDict()
        self._bytes = 0

    def put(self, owner: str, response: dict, conversation: list[dict]):
        size = len(json.dumps([response, conversation]))
        if size > self.MAX_BYTES:
            return
        with self._lock:
            self._items[response["id"]] = (owner, response, conversation, size)
            self._bytes += size
            while len(self._items) > self.MAX_ITEMS or self._bytes > self.MAX_BYTES:
                _, (_, _, _, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped

    def get(self, owner: str, response_id: str) -> tuple[dict, list[dict]] | None:
        with self._lock:
            item = self._items.get(response_id)
            if item is None or not hmac.compare_digest(item[0], owner):
                return None
            self._items.move_to_end(response_id)
            return item[1], item[2]

    def delete(self, owner: str, response_id: str) -> bool:
        with self._lock:
            item = self._items.get(response_id)
            if item is None or not hmac.compare_digest(item[0], owner):
                return False
            del self._items[response_id]
            self._bytes -= item[3]
            return True


class DownloadError(Exception):
    pass


class ModelDownload:
    """One GGUF file fetched from an http(s) URL into the models folder. The bytes go to NAME.gguf.part (never
    taken for a model), an interrupted transfer goes on from where it stopped with a Range request (within one
    call, and in a later one), the file is checked against the size and SHA-256 the server states (Hugging
    Face: X-Linked-Size, X-Linked-ETag, on the redirect to its CDN), and only then renamed into place."""

    CHUNK = 1 << 20
    ATTEMPTS = 5            # connections for one download before it gives up (each one resumes)
    TIMEOUT = 60.0
    _locks: dict[str, threading.Lock] = {}
    _locks_guard = threading.Lock()

    def __init__(self, url: str, folder: str, progress: Callable[[int, int], None] = lambda done, total: None,
                 stage: Callable[[str], None] = lambda what: None):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise DownloadError(f"not an http(s) URL: {url}")
        file = os.path.basename(urllib.parse.unquote(parsed.path))
        if not re.fullmatch(r"[\w.+-]+\.gguf", file, re.I) or file.startswith("."):
            raise DownloadError(f"the URL must name a .gguf file, not {file or parsed.path!r}")
        self.url, self.folder, self.progress, self.stage = url, folder, progress, stage
        self.path = os.path.join(folder, file)
        self.part = self.path + ".part"
        self.name = model_name_of(self.path)
        self.total = 0
        self.sha256: str | None = None

    def run(self) -> str:
        """The downloaded file's path (at once if it is already there)."""
        with self._locks_guard:
            lock = self._locks.setdefault(self.path, threading.Lock())
        with lock:                      # two pulls of one file: the second finds it done
            if os.path.isfile(self.path):
                return self.path
            for attempt in range(self.ATTEMPTS):
                have = os.path.getsize(self.part) if os.path.isfile(self.part) else 0
                try:
                    if self._transfer(have):
                        break
                except (OSError, http.client.HTTPException) as e:   # a dropped connection: resume
                    if attempt == self.ATTEMPTS - 1:
                        raise DownloadError(f"download of {self.url} failed after {self.ATTEMPTS} tries: "
                                            f"{e}; run it again to resume") from None
            self._verify()
            os.replace(self.part, self.path)
            return self.path

    def _open(self, have: int):
        """The response, following redirects by hand: the first hop carries Hugging Face's size and hash."""
        import urllib.request
        stated: dict[str, str] = {}

        class Remember(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, req, fp, code, msg, headers, newurl):
                for key in ("X-Linked-Size", "X-Linked-ETag"):
                    if headers.get(key):
                        stated[key] = headers[key]
                return super().redirect_request(req, fp, code, msg, headers, newurl)
        opener = urllib.request.build_opener(Remember)
        request = urllib.request.Request(self.url, headers={"User-Agent": f"koboldlite/{__version__}",
                                                            **({"Range": f"bytes={have}-"} if have else {})})
        try:
            response = opener.open(request, timeout=self.TIMEOUT)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:          # the part is all there is: check it
                return None, stated
            raise DownloadError(f"{self.url}: HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            raise DownloadError(f"cannot reach {self.url}: {e.reason}") from None
        for key in ("X-Linked-Size", "X-Linked-ETag"):
            stated.setdefault(key, response.headers.get(key) or "")
        return response, stated

    def _transfer(self, have: int) -> bool:
        """One connection's worth; True when the file is complete."""
        response, stated = self._open(have)
        if response is None:
            return True
        with response:
            if have and response.status != 206:
                have = 0                           # the server ignored the Range: start again
            if response.status == 206:
                start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
                if not start or int(start.group(1)) != have:
                    raise DownloadError(f"{self.url}: the server resumed at the wrong place")
            length = int(response.headers.get("Content-Length") or 0)
            self.total = int(stated.get("X-Linked-Size") or 0) or (have + length if length else 0)
            etag = (stated.get("X-Linked-ETag") or response.headers.get("ETag") or "").strip('W/"')
            self.sha256 = etag.lower() if re.fullmatch(r"[0-9a-fA-F]{64}", etag) else None
            free = shutil.disk_usage(self.folder).free
            if self.total and self.total - have > free:
                raise DownloadError(f"not enough disk space for {os.path.basename(self.path)}: it needs "
                                    f"{(self.total - have) >> 20} MiB more, {free >> 20} MiB are free in "
                                    f"{self.folder}")
            done = have
            with open(self.part, "ab" if have else "wb") as out:
                self.progress(done, self.total)
                while True:
                    data = response.read(self.CHUNK)
                    if not data:
                        break
                    out.write(data)
                    done += len(data)
                    self.progress(done, self.total)
            return not self.total or done >= self.total

    def _verify(self):
        """Size, then the hash the server stated, then the GGUF magic; a bad file is removed."""
        self.stage("verifying sha256 digest")
        size = os.path.getsize(self.part)
        problem = None
        if self.total and size != self.total:
            problem = f"it is {size} bytes, the server said {self.total}"
        elif self.sha256:
            digest = hashlib.sha256()
            with open(self.part, "rb") as f:
                while block := f.read(self.CHUNK):
                    digest.update(block)
            if digest.hexdigest() != self.sha256:
                problem = f"its SHA-256 is {digest.hexdigest()}, the server said {self.sha256}"
        if problem is None:
            with open(self.part, "rb") as f:
                if f.read(4) != b"GGUF":
                    problem = "it is not a GGUF file"
        if problem:
            os.remove(self.part)
            raise DownloadError(f"download of {self.url} refused: {problem}")


class ConsoleProgress:
    """A download's progress on stderr, redrawn when a step of the bar fills."""

    WIDTH = 30

    def __init__(self, name: str):
        self.name, self._shown = name, None

    def __call__(self, done: int, total: int):
        filled = int(done / total * self.WIDTH) if total else 0
        shown = (filled, done >> 24 if not total else 0)
        if shown == self._shown:
            return
        self._shown = shown
        bar = f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done / total * 100:3.0f}% " if total else ""
        end = "\n" if total and done >= total else ""
        print(f"\rDownloading {self.name} {bar}{done >> 20}/{total >> 20 if total else '?'} MiB", end=end,
              file=sys.stderr, flush=True)


# A request names a model, or gets the default one. The roster loads it beside the others while --maxmodels
# and the memory allow, else in place of the least recently used idle one; a model is unloaded only when no
# request holds it and its loop has nothing to run, so a swap never touches another model's stream.
@dataclasses.dataclass
class ModelEntry:
    """A model a request may name: its files (a split model has several), and the options of its preset."""
    name: str
    files: list[str]
    options: dict = dataclasses.field(default_factory=dict)

    @property
    def path(self) -> str:
        return self.files[0]           # llama.cpp finds a split model's other parts from its first

    @property
    def size_bytes(self) -> int:
        return sum(os.path.getsize(f) for f in self.files if os.path.isfile(f))

    @property
    def aliases(self) -> list[str]:
        return list(self.options.get("aliases", ()))

    def config(self, base: Config) -> Config:
        """The server's options with this model's preset over them."""
        cfg = dataclasses.replace(base, model=self.path,
                                  **{k: v for k, v in self.options.items() if k != "aliases"})
        if cfg.quantkv:
            cfg.flashattention, cfg.noflashattention = True, False
        per_request = cfg.contextsize // cfg.parallel if cfg.kvsplit else cfg.contextsize
        cfg.max_length = min(cfg.max_length, per_request // 2)
        return cfg

    @functools.cached_property
    def layout(self) -> "GGUFLayout | None":
        """The file's header, read once: what a listing says of a model that is not loaded."""
        try:
            return GGUFLayout(self.path)
        except (OSError, ModelLoadError):
            return None

    def estimated_bytes(self, base: Config) -> int:
        """Weights plus KV cache at its context: what loading it will take, about."""
        cfg, layout = self.config(base), self.layout
        cells = cfg.contextsize * (cfg.parallel if cfg.kvperslot else 1)
        kv = int(cells * layout.kv_width * layout.n_layer * KV_BYTES[cfg.quantkv]) if layout else 0
        return self.size_bytes + kv


class ModelCatalog:
    """The models a request may name: the --model files and every GGUF in --modeldir, read again when asked
    for a name it does not know (a file copied in since) and for every listing."""

    def __init__(self, config: Config):
        self.folder = config.modeldir
        self.presets = read_presets(self.folder) if self.folder else {}
        self._lock = threading.Lock()
        self._given: dict[str, ModelEntry] = {}
        self._found: dict[str, ModelEntry] = {}
        for path in [config.model, *config.models]:
            self.add_file(path)
        self.initial_name = model_name_of(config.model)
        self.default_name = self.initial_name     # the Kobold API's model: the admin API may switch it
        self.rescan()

    def add_file(self, path: str) -> ModelEntry:
        name = model_name_of(path)
        with self._lock:
            known = self._given.get(name)
            if known and os.path.realpath(known.path) != os.path.realpath(path):
                raise ConfigError(f"two models are named {name}: {known.path} and {path}")
            folder = os.path.dirname(path) or "."
            files = scan_model_folder(folder).get(name, [path]) if SPLIT_GGUF.match(
                os.path.splitext(os.path.basename(path))[0]) else [path]
            entry = self._given[name] = ModelEntry(name, files, self.presets.get(name, {}))
            return entry

    def rescan(self):
        if not self.folder:
            return
        found = scan_model_folder(self.folder)
        with self._lock:
            self._found = {name: self._found[name] if name in self._found and self._found[name].files == files
                           else ModelEntry(name, files, self.presets.get(name, {}))
                           for name, files in found.items() if name not in self._given}

    def forget(self, name: str):
        """A model whose files were deleted."""
        with self._lock:
            self._given.pop(name, None)
            self._found.pop(name, None)

    def entries(self) -> list[ModelEntry]:
        """The default model first (clients that take the first listed get it), then by name."""
        with self._lock:
            every = {**self._found, **self._given}
        return sorted(every.values(), key=lambda e: (e.name != self.default_name, e.name.lower()))

    @property
    def several(self) -> bool:
        """With one model, any name a client sends means it (as with KoboldCpp and llama-server); with a
        folder or several models a name chooses, and a name that matches none is a 404."""
        return self.folder is not None or len(self.entries()) > 1

    def find(self, name: str | None) -> ModelEntry | None:
        """The model a request names: its name or an alias, in any case, with or without .gguf, Ollama's
        :latest or the koboldcpp/ that /api/v1/model puts in front. None: no such model, or a path."""
        if not name:
            return self.find(self.default_name)
        key = name.strip().lower().removeprefix("koboldcpp/").removesuffix(":latest").removesuffix(".gguf")
        if not key or "/" in key or "\\" in key or key in (".", ".."):
            return None
        for attempt in range(2):
            for entry in self.entries():
                if key == entry.name.lower() or key in (a.lower() for a in entry.aliases):
                    return entry
            if attempt == 0:
                self.rescan()
        return None


def available_memory() -> int | None:
    """Bytes of RAM the system could still give (Linux: MemAvailable); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class ServedModel:
    """One loaded model and what serves it: its chat template, engine, generation loop and embedder."""

    def __init__(self, entry: ModelEntry, app: "App", on_job_end: Callable[["ServedModel", Job], None]):
        self.entry = entry
        self.name = entry.name
        self.config = cfg = entry.config(app.config)
        self.app = app
        started = time.monotonic()
        gpu = plan_gpu(cfg)
        for line in gpu.lines:
            print(line, file=sys.stderr, flush=True)
        self.model = LlamaModel(cfg.model, n_ctx=cfg.contextsize, n_seq=cfg.parallel,
                                n_threads=cfg.threads, n_gpu_layers=gpu.n_gpu_layers, n_batch=cfg.batchsize,
                                devices=gpu.devices if gpu.chosen else None, main_gpu=cfg.maingpu,
                                tensor_split=cfg.tensor_split, row_split="rowsplit" in (cfg.usecuda or ()),
                                shared_kv=not (cfg.kvperslot or cfg.kvsplit), split_kv=cfg.kvsplit,
                                flash_attention=flash_attention_of(cfg), quantkv=cfg.quantkv,
                                use_mmap=not cfg.nommap, use_mlock=cfg.usemlock,
                                progress=None if cfg.quiet else ProgressBar(), show_llama_log=cfg.debug)
        try:
            self.chat_template, self.template_origin = load_chat_template(self.model, cfg.chat_template)
        except Exception:
            self.model.close()
            raise
        self.gpu = gpu
        self.memory = self.model.memory_report()
        self.gpu_info = gpu.report(self.memory)
        self.draft_model: DraftModel | None = None
        if cfg.draftmodel and not cfg.nodraft:
            try:
                self.draft_model = DraftModel(cfg.draftmodel, self.model, cfg.contextsize, cfg.threads,
                                              gpu.n_gpu_layers if cfg.draftgpulayers is None else cfg.draftgpulayers,
                                              show_llama_log=cfg.debug)
            except ModelLoadError:
                self.model.close()
                raise
        self.prompt_cache = self._prompt_cache(cfg)
        self.engine = Engine(self.model, context_shift=not cfg.noshift,
                             draft_most=0 if cfg.nodraft else cfg.draftamount, draft_model=self.draft_model,
                             prompt_cache=self.prompt_cache, log=self.app.log)
        self.scheduler = Scheduler(self.engine, cfg.multiuser, lambda job: on_job_end(self, job))
        self.scheduler.start()
        self.load_seconds = time.monotonic() - started
        self.leases = 0                          # requests using it now (the roster's count, under its lock)
        self.jobs = 0                            # its jobs not yet ended (so the roster never asks the loop)
        self.last_used = time.monotonic()
        self.keep_alive: float | None = None     # idle seconds before unloading, as the last request asked
        self.unloading = False
        self._embedder: Embedder | None = None
        self._embedder_lock = threading.Lock()
        self.saved_states: dict[int, tuple[list[int], bytes]] = {}   # KoboldCpp's admin save_state, by number

    CACHE_CONTEXTS = 4       # the default RAM cache: this many full contexts of the model's KV cache...
    CACHE_RAM_SHARE = 4      # ...but at most a quarter of the memory the system has free

    def _prompt_cache(self, cfg: Config) -> PromptCache | None:
        """Displaced conversations: by default as many full contexts as a LAN with a few more conversations than
        slots brings back, from the model's own KV cost per token."""
        per_token = self.memory["kv_cache_mib"] * 2**20 / max(1, self.model.pool_tokens)
        if cfg.cacheram is None:
            ram = int(per_token * self.model.n_ctx * self.CACHE_CONTEXTS)
            free = available_memory()
            if free is not None:
                ram = min(ram, free // self.CACHE_RAM_SHARE)
        else:
            ram = cfg.cacheram << 20
        folder = os.path.join(cfg.cachedir, self.name) if cfg.cachedir else None    # one folder per model
        if not ram and not folder:
            return None
        cache = PromptCache(self.model, ram, folder, cfg.cachedisk << 20, self.app.log)
        self.app.log(f"prompt cache for {self.name}: up to {ram >> 20} MiB in RAM ({per_token / 1024:.0f} KiB a "
                     f"token)" + (f", {cfg.cachedisk} MiB on disk in {folder}" if folder else ""))
        return cache

    def save_conversations(self):
        """Unloading or stopping: every slot's conversation into the prompt cache, and RAM's onto disk.
        The loop has ended: this thread may use the context."""
        if self.prompt_cache is None:
            return
        for slot in self.engine.slots:
            self.engine.pool.stash(slot)
        self.prompt_cache.flush()

    @property
    def resident_mib(self) -> float:
        m = self.memory
        return round(m["model_mib"] + m["kv_cache_mib"] + m["compute_mib"], 1)

    def start_generation(self, request: GenerationRequest) -> Job:
        """Prepare and queue a generation; a full queue is the 503 KoboldAI Lite understands."""
        job = self.engine.prepare(request)
        job.stats.model = self.name
        roster = self.app.roster
        roster.job_started(self)
        try:
            self.scheduler.submit(job)
        except ServerBusy:
            roster.job_done(self)
            raise RequestError(BUSY_MESSAGE, status=503, kind="service_unavailable") from None
        position = self.scheduler.queue_position(job)     # 0 once the loop has taken it
        self.app.log(f"job {job.id}: {len(job.prompt_tokens)} prompt tokens, up to "
                     f"{job.max_new_tokens} new"
                     + (f", {job.stats.truncated_tokens} oldest prompt tokens cut to fit the context"
                        if job.stats.truncated_tokens else "")
                     + (f", genkey {job.genkey}" if job.genkey else "")
                     + (f", ignored fields: {', '.join(job.ignored_fields)}" if job.ignored_fields else "")
                     + (f", queued at {position}" if position else "")
                     + (f", model {self.name}" if self.app.catalog.several else ""))
        return job

    def embedder(self) -> Embedder:
        with self._embedder_lock:
            if self._embedder is None:
                self._embedder = Embedder.made_for(self.model, self.config.contextsize, self.config.threads,
                                                   self.app.log)
            return self._embedder

    def close(self):
        """End the loop (it has nothing left to run: the roster saw to that) and free the memory."""
        self.scheduler.stop()
        self.save_conversations()
        with self._embedder_lock:
            if self._embedder is not None:
                self._embedder.close()
                self._embedder = None
        if self.draft_model is not None:
            self.draft_model.close()
        self.model.close()


class ModelRoster:
    """The loaded models: load on demand, the --maxmodels seats, and unloading models idle past their
    keep-alive. Loads happen one at a time (llama.cpp's log has one callback) on the requesting thread;
    requests for a model that is loading wait on the condition, others go on being served."""

    def __init__(self, app: "App"):
        self.app = app
        self.catalog = app.catalog
        self._cond = threading.Condition()
        self.loaded: dict[str, ServedModel] = {}
        self.loading: set[str] = set()
        self.failures: dict[str, str] = {}       # the last load error of each model, for listings
        self.events: collections.deque[dict] = collections.deque(maxlen=64)   # loads and unloads, for perf
        self._load_lock = threading.Lock()
        self._stopping = False
        self._reaper = threading.Thread(target=self._reap, name="idle-unload", daemon=True)
        self._reaper.start()

    # -- request threads ------------------------------------------------------------------------------

    def state_of(self, name: str) -> str:
        with self._cond:
            served = self.loaded.get(name)
            return ("unloading" if served.unloading else "loaded") if served else \
                "loading" if name in self.loading else "unloaded"

    def current(self, name: str | None = None) -> ServedModel | None:
        """The loaded model of this name (default: the default one), without loading anything."""
        with self._cond:
            served = self.loaded.get(name or self.catalog.default_name)
            return served if served and not served.unloading else None

    def any_loaded(self) -> list[ServedModel]:
        with self._cond:
            return [s for s in self.loaded.values() if not s.unloading]

    def acquire(self, entry: ModelEntry) -> ServedModel:
        """The loaded model, loading it first if need be; the caller must release() it."""
        with self._cond:
            while True:
                if self._stopping:
                    raise RequestError("the server is shutting down", status=503, kind="service_unavailable")
                served = self.loaded.get(entry.name)
                if served and not served.unloading:
                    served.leases += 1
                    served.last_used = time.monotonic()
                    return served
                if served is None and entry.name not in self.loading:
                    victims = self._make_room(entry)
                    if victims is not None:
                        break
                self._cond.wait()
            self.loading.add(entry.name)
            for victim in victims:
                victim.unloading = True
        for victim in victims:
            self._unload(victim, f"to make room for {entry.name}")
        try:
            with self._load_lock:
                served = ServedModel(entry, self.app, self._job_ended)
        except (ModelLoadError, ConfigError, OSError) as e:
            with self._cond:
                self.loading.discard(entry.name)
                self.failures[entry.name] = str(e)
                self._cond.notify_all()
            self.app.log(f"model {entry.name}: could not load: {e}")
            error = RequestError(f"could not load model {entry.name}: {e}", status=500, kind="server_error")
            error.cause = e                      # start-up reports the cause in its own words
            raise error from None
        self.app.log(f"model {entry.name} loaded in {served.load_seconds:.1f} s: {served.resident_mib:.0f} MiB "
                     f"(model {served.memory['model_mib']:.0f}, KV cache {served.memory['kv_cache_mib']:.0f}, "
                     f"compute {served.memory['compute_mib']:.0f}), context {served.model.n_ctx}, "
                     f"{self.app.describe_gpu(served)}")
        with self._cond:
            self.loading.discard(entry.name)
            self.failures.pop(entry.name, None)
            served.leases = 1
            self.loaded[entry.name] = served
            self.events.append({"event": "load", "model": entry.name, "at": time.time(),
                                "seconds": round(served.load_seconds, 3), "mib": served.resident_mib})
            self._cond.notify_all()
        return served

    def hold(self, served: ServedModel) -> bool:
        """A lease on a model only if it is loaded now."""
        with self._cond:
            if self.loaded.get(served.name) is not served or served.unloading:
                return False
            served.leases += 1
            return True

    def release(self, served: ServedModel, keep_alive: float | None = None):
        """A request is done with the model; keep_alive (seconds, Ollama's) says how long it may then sit idle."""
        with self._cond:
            served.leases -= 1
            served.last_used = time.monotonic()
            if keep_alive is not None:
                served.keep_alive = keep_alive
            self._cond.notify_all()

    def touch(self):
        """Something a waiter or the reaper reads has changed (a keep-alive)."""
        with self._cond:
            self._cond.notify_all()

    def unload(self, name: str, reason: str) -> bool:
        """Unload now if it is idle; False if it is not loaded or in use."""
        with self._cond:
            served = self.loaded.get(name)
            if served is None or served.unloading or not self._idle(served):
                return False
            served.unloading = True
        self._unload(served, reason)
        return True

    def stop(self):
        with self._cond:
            self._stopping = True
            every = list(self.loaded.values())
            self._cond.notify_all()
        for served in every:
            served.scheduler.stop()
            served.save_conversations()

    # -- inside --------------------------------------------------------------------------------------

    def _idle(self, served: ServedModel) -> bool:
        # Its own counts, never the loop's lock: the loop calls _job_ended holding that lock.
        return served.leases == 0 and served.jobs == 0

    def _make_room(self, entry: ModelEntry) -> list[ServedModel] | None:
        """Holds _cond. The idle models to unload before this one loads ([]: none), or None: wait, every
        seat is held by a model in use. Memory is best effort: idle models go first while it looks short."""
        seated = [s for s in self.loaded.values() if not s.unloading]
        idle = sorted((s for s in seated if self._idle(s)), key=lambda s: s.last_used)
        short = len(seated) + len(self.loading) + 1 - self.app.config.maxmodels
        if short > len(idle):
            return None
        victims = idle[:max(short, 0)]
        free = available_memory()
        if free is not None:
            need = entry.estimated_bytes(self.app.config)
            spare = idle[len(victims):]
            freed = sum(v.entry.size_bytes for v in victims)
            while spare and need > free + freed:
                victims.append(spare.pop(0))
                freed += victims[-1].entry.size_bytes
        return victims

    def _unload(self, served: ServedModel, reason: str):
        """The model is marked unloading and idle: free it, then take it off the roster."""
        started = time.monotonic()
        mib = served.resident_mib
        served.close()
        seconds = time.monotonic() - started
        with self._cond:
            self.loaded.pop(served.name, None)
            self.events.append({"event": "unload", "model": served.name, "at": time.time(), "reason": reason,
                                "seconds": round(seconds, 3), "mib": mib})
            self._cond.notify_all()
        self.app.log(f"model {served.name} unloaded ({reason}) in {seconds:.2f} s: {mib:.0f} MiB freed")

    def job_started(self, served: ServedModel):
        with self._cond:
            served.jobs += 1

    def _job_ended(self, served: ServedModel, job: Job):
        self.app.log_finished(job)
        self.job_done(served)

    def job_done(self, served: ServedModel):
        with self._cond:
            served.jobs -= 1
            served.last_used = time.monotonic()
            self._cond.notify_all()

    def keep_alive_of(self, served: ServedModel) -> float | None:
        """Seconds it may sit idle; None: for ever."""
        seconds = served.keep_alive if served.keep_alive is not None else (self.app.config.idleunload or None)
        return None if seconds is None or seconds < 0 else seconds

    def expires_at(self, served: ServedModel) -> float | None:
        """When (time.time()) an idle model will be unloaded; None: never, or not idle."""
        with self._cond:
            seconds = self.keep_alive_of(served)
            if seconds is None:
                return None
            return time.time() + max(0.0, served.last_used + seconds - time.monotonic()) if self._idle(served) \
                else time.time() + seconds

    def _reap(self):
        """Unload models idle past their keep-alive; sleeps on the condition until the next one is due."""
        with self._cond:
            while not self._stopping:
                now, due, expired = time.monotonic(), [], None
                for served in self.loaded.values():
                    seconds = self.keep_alive_of(served)
                    if served.unloading or seconds is None or not self._idle(served):
                        continue
                    if served.last_used + seconds <= now:
                        expired = served
                        break
                    due.append(served.last_used + seconds)
                if expired is None:
                    self._cond.wait(min(due) - now if due else None)
                    continue
                expired.unloading = True
                self._cond.release()
                try:
                    self._unload(expired, "keep_alive 0" if expired.keep_alive == 0 else
                                 f"idle {self.keep_alive_of(expired):g} s")
                finally:
                    self._cond.acquire()


class App:
    """Everything a route needs: the config, the models by name and the roster that loads them."""

    def __init__(self, config: Config):
        self.config = config
        self.catalog = ModelCatalog(config)
        self.ready = threading.Event()                     # the default model was loaded once
        self.started = time.monotonic()
        self.instance_id = config.instance_id or ""
        self.responses = ResponseStore()                   # the Responses API's stored responses
        self.embeddings_source: LlamaModel | None = None   # --embeddings-model; else each model's own
        self._embedder: Embedder | None = None
        self._embedder_lock = threading.Lock()
        self.last_job: Job | None = None
        self.totals = collections.Counter()                # every model's jobs, for /metrics and perf
        # Lines go to stderr from a thread of their own: the generation loop logs each job's end,
        # and a slow reader of stderr must never hold it up.
        self._log_lines: "queue.SimpleQueue[str | None]" = queue.SimpleQueue()
        self._logger = threading.Thread(target=self._write_log, name="log-writer", daemon=True)
        self._logger.start()
        self.roster = ModelRoster(self)

    def embedder(self, served: ServedModel) -> Embedder:
        """--embeddings-model's context for every request, else the named model's own."""
        if self.embeddings_source is None:
            return served.embedder()
        with self._embedder_lock:
            if self._embedder is None:
                self._embedder = Embedder.made_for(self.embeddings_source, self.config.contextsize,
                                                   self.config.threads, self.log)
            return self._embedder

    def find_job(self, genkey: str) -> tuple[Job, ServedModel] | None:
        """The job of this genkey (or the unkeyed one), and the loaded model that runs it."""
        for served in self.roster.any_loaded():
            job = served.scheduler.find(genkey)
            if job is not None:
                return job, served
        return None

    def abort(self, genkey: str) -> Job | None:
        for served in self.roster.any_loaded():
            job = served.scheduler.abort(genkey)
            if job is not None:
                return job
        return None

    @staticmethod
    def describe_gpu(served: ServedModel) -> str:
        m = served.memory
        return (f"{m['layers_offloaded']}/{m['layers_total']} layers on the GPU" if served.gpu.devices
                else "on the CPU")

    def log_finished(self, job: Job):
        s = job.stats
        self.last_job = job
        self.totals.update(requests=1, prompt_tokens=s.prompt_tokens - s.cached_tokens,
                           prompt_seconds=s.prompt_seconds, generated_tokens=s.generated_tokens,
                           generation_seconds=s.generation_seconds, drafted_tokens=s.drafted_tokens,
                           draft_accepted=s.draft_accepted)
        self.totals[f"finished_{job.buffer.finish_reason}"] += 1
        rate = s.generated_tokens / s.generation_seconds if s.generation_seconds else 0.0
        self.log(f"job {job.id} ended: {job.buffer.finish_reason}, {s.prompt_tokens} prompt tokens "
                 f"({s.cached_tokens} cached) in {s.prompt_seconds:.2f}s, {s.generated_tokens} generated "
                 f"in {s.generation_seconds:.2f}s ({rate:.1f} tokens/s)"
                 + (f", drafts {s.draft_accepted}/{s.drafted_tokens} kept" if s.drafted_tokens else "")
                 + (f", cache from {s.cache_source}" if s.cache_source in ("ram", "disk") else "")
                 + f", model {s.model}")

    def log(self, message: str):
        if not self.config.quiet:
            self._log_lines.put(message)

    def _write_log(self):
        while (line := self._log_lines.get()) is not None:
            # One write with its newline: print() writes the two apart, and stdout's lines (the main thread's
            # "Serving at ...") could land between them on a terminal or pipe that both share.
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def flush_log(self, timeout: float = 5.0):
        """At exit: write what is still queued."""
        self._log_lines.put(None)
        self._logger.join(timeout)


class Request:
    """What a route sees of one request: method, path, query, headers, body, whether it carried the
    password, and, from whatever carried it, who sent it and how to watch for them hanging up."""

    def __init__(self, app: App, method: str, path: str, query: dict[str, str], headers, body: bytes,
                 authorized: bool, client: str = "", watch_hangup: Callable[[Job], None] = lambda job: None,
                 style: str = "kobold"):
        self.app = app
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.authorized = authorized
        self.client = client
        self.style = style
        self._watch_hangup = watch_hangup
        self.job: Job | None = None
        self.ignored: list[str] = []      # fields named in X-KoboldLite-Ignored
        self.served: ServedModel | None = None   # the model this request uses, held until it ends
        self.keep_alive: float | None = None     # Ollama's keep_alive: how long the model stays after
        self._json: Any = None
        self._parsed = False

    def json(self, optional: bool = False) -> Any:
        """The body as JSON; an empty body is None when optional, else a 400."""
        if not self._parsed:
            self._parsed = True
            if self.body.strip():
                try:
                    self._json = json.loads(self.body)
                except (ValueError, UnicodeDecodeError) as e:
                    raise RequestError(f"the request body is not valid JSON: {e}") from None
                except RecursionError:
                    raise RequestError("the request body is nested too deeply") from None
        if self._json is None and not optional:
            raise RequestError("a JSON request body is required")
        return self._json

    def entry(self, name: Any = None) -> ModelEntry:
        """The model a request names (none, or with one model any name: the default); else a 404."""
        catalog = self.app.catalog
        if not catalog.several:
            name = None
        elif name is not None and not isinstance(name, str):
            raise RequestError("'model' must be a string")
        entry = catalog.find(name)
        if entry is None:
            raise model_not_found(self.style, name)
        return entry

    def use(self, name: Any = None) -> ServedModel:
        """The model this request names, loaded (this may wait for a load or a swap), held until it ends."""
        if self.served is None:
            self.served = self.app.roster.acquire(self.entry(name))
        return self.served

    def ignore_fields_but(self, body: dict, *known: str):
        """A route that reads only `known` of its body: the rest is named (header and log), never dropped."""
        self.ignored = [k for k in body if k not in known]
        if self.ignored:
            self.app.log(f"{self.method} {self.path}: ignored fields: {', '.join(self.ignored)}")

    def use_loaded(self, served: ServedModel) -> ServedModel | None:
        """Hold this model if it is still loaded (never loads it); None if it is gone."""
        if self.served is None and self.app.roster.hold(served):
            self.served = served
        return self.served if self.served is served else None

    def release(self):
        """The request has ended: its answer is written (a stream to its end)."""
        if self.served is not None:
            served, self.served = self.served, None
            self.app.roster.release(served, self.keep_alive)

    def start_generation(self, request: GenerationRequest) -> Job:
        """Queue a generation for this client; it is cancelled if the client hangs up."""
        request.client = self.client
        self.job = self.use().start_generation(request)
        self.ignored = self.job.ignored_fields
        self._watch_hangup(self.job)
        return self.job


def model_not_found(style: str, name: Any) -> RequestError:
    if style == "ollama":
        return RequestError(f'model "{name}" not found, try pulling it first', status=404, kind="not_found")
    return RequestError(f"model '{name}' not found: GET /v1/models lists the models of this server", status=404,
                        kind="not_found_error" if style == "anthropic" else "invalid_request_error",
                        code="model_not_found")


def wait_for_text(job: Job) -> str:
    """The whole text of a non-streamed request; a failed generation is a 500."""
    job.buffer.wait_done()
    if job.buffer.finish_reason == "error":
        raise RequestError(job.buffer.error or "generation failed", status=500, kind="server_error")
    return job.buffer.text()


# Each route is a small function (app, request) -> Response that turns JSON into
# one GenerationRequest and the job's token buffer back into its API's shape.
def error_body(style: str, error: RequestError) -> dict:
    """The error shape each family of clients understands."""
    if style == "openai":
        return {"error": {"message": str(error), "type": error.kind, "code": error.code or error.status,
                          **error.extra}}
    if style == "ollama":
        return {"error": str(error)}
    if style == "anthropic":
        kind = ANTHROPIC_ERROR_TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": str(error)}}
    return {"detail": {"msg": str(error), "type": error.kind}}


def error_response(style: str, error: RequestError) -> Response:
    """An error in its API's shape; Anthropic's clients know a full queue as 529 (overloaded)."""
    status = 529 if style == "anthropic" and error.status == 503 else error.status
    return JSONResponse(error_body(style, error), status, error.headers)


def unauthorized(style: str) -> RequestError:
    """401, in the words OpenAI-style clients look for (they show 'invalid API key' and stop retrying)."""
    message = "a valid password is required (Authorization: Bearer <password>, or X-Api-Key)"
    if style == "openai":
        return RequestError(message, status=401, kind="authentication_error", code="invalid_api_key")
    return RequestError(message, status=401, kind="unauthorized")


KOBOLD_TOP_LOGPROBS = 5     # KoboldCpp reports the 5 most likely alternatives


def parse_kobold_request(req, app: App) -> GenerationRequest:
    f = FieldReader(req.json())
    if "prompt" not in f.body:
        raise RequestError("'prompt' is required")
    stops = f.string_list("stop_sequence")
    if f.boolean("singleline"):
        stops.append("\n")
    served = req.use(f.body.get("model"))      # KoboldAI Lite sends none: the default model
    return instruct_request(served, f, prompt=f.string("prompt"), memory=f.string("memory"), stop_strings=stops,
        max_length=f.integer("max_length", default=served.config.max_length, lo=1, hi=1 << 20),
        max_context_length=f.integer("max_context_length", "truncation_length", default=served.model.n_ctx,
                                     lo=1, hi=1 << 24),
        trim_stop=f.boolean("trim_stop", default=True),
        sampler=parse_sampler_settings(f),
        genkey=genkey_of(req),
        render_special=f.boolean("render_special", default=False),
        checkable_without_genkey=True,
        cut_overlong_prompt=True,
        ignored_fields=ignored_fields(f.body, KOBOLD_IGNORED_FIELDS),
        logprobs=f.boolean("logprobs"), top_logprobs=KOBOLD_TOP_LOGPROBS, logprobs_after_samplers=True,
    )


def instruct_request(served: ServedModel, f: FieldReader, prompt: str, memory: str = "", stop_strings: list[str] = (),
                     **fields) -> GenerationRequest:
    """A text-completion request, its instruct placeholders rendered with the model's chat template
    (KoboldCpp replaces them unless "replace_instruct_placeholders" is false)."""
    if not f.boolean("replace_instruct_placeholders", default=True):
        return GenerationRequest(prompt=prompt, memory=memory, stop_strings=list(stop_strings), **fields)
    template = served.chat_template
    stops = template.instruct_stops(stop_strings) if any(INSTRUCT_PLACEHOLDER.search(s) for s in stop_strings) \
        else list(stop_strings)
    rendered = template.render_instruct(memory, prompt)
    if rendered is None:
        return GenerationRequest(prompt=prompt, memory=memory, stop_strings=stops, **fields)
    memory, prompt = rendered
    return template.prompt_request(prompt, memory=memory, stop_strings=stops, **fields)


def genkey_of(req) -> str:
    """A genkey from the JSON body, the query string, or a `genkey` header: every API takes all
    three, so check and abort (and a balancer hashing on it) reach any generation."""
    body = req.json(optional=True)
    if body is not None and not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    key = (body or {}).get("genkey") or req.query.get("genkey") or req.headers.get("genkey") or ""
    if not isinstance(key, str):
        raise RequestError("'genkey' must be a string")
    return key


def kobold_sse_event(token: str, finish_reason: str | None) -> bytes:
    """One KoboldCpp SSE event; ASCII-only JSON on one line (a raw U+2028 breaks KoboldAI Lite)."""
    data = json.dumps({"token": token, "finish_reason": finish_reason}, ensure_ascii=True)
    return f"event: message\ndata: {data}\n\n".encode("ascii")


def wire_finish_reason(reason: str | None) -> str:
    """Clients know 'stop' and 'length'; an aborted or failed generation stopped."""
    return "length" if reason == "length" else "stop"


class LogprobShapes:
    """A job's token log-probabilities in each API's shape. `legacy` keeps the text offset across
    the chunks of one stream."""

    def __init__(self, model: LlamaModel):
        self.model = model
        self.offset = 0

    def _token(self, token: int) -> dict:
        data = self.model.piece(token)
        return {"token": data.decode("utf-8", errors="replace"), "bytes": list(data)}

    def chat(self, entries: list[TokenLogprob]) -> list[dict]:
        """OpenAI chat's `content` list (also Ollama's `logprobs`)."""
        return [{**self._token(e.token), "logprob": e.logprob,
                 "top_logprobs": [{**self._token(t), "logprob": lp} for t, lp in e.top]} for e in entries]

    def legacy(self, entries: list[TokenLogprob]) -> dict:
        """OpenAI completions' shape: tokens, token_logprobs, top_logprobs, text_offset."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            text = self._token(e.token)["token"]
            out["tokens"].append(text)
            out["token_logprobs"].append(e.logprob)
            out["top_logprobs"].append({self._token(t)["token"]: lp for t, lp in e.top})
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out

    def kobold(self, entries: list[TokenLogprob]) -> dict:
        """KoboldCpp's: the chat `content` list and the legacy lists side by side."""
        return {"content": self.chat(entries), **self.legacy(entries)}


def batches_with_logprobs(job: Job) -> Iterator[tuple[list[str], list[TokenLogprob]]]:
    """The job's text as it arrives, each batch with the log-probabilities of the tokens shown since the
    last (they are recorded before their text); a last ([], rest) for tokens whose text never showed."""
    sent = 0
    for batch in job.buffer.batches():
        n = len(job.logprobs)
        yield batch, job.logprobs[sent:n]
        sent = n
    if len(job.logprobs) > sent:
        yield [], job.logprobs[sent:]


# Routes get (app, request) and return a Response; see the HTTP layer below.
def kobold_model(app, req):
    if app.config.password and not req.authorized:
        return JSONResponse({"result": "koboldcpp/protected-model"})   # KoboldCpp's words
    return JSONResponse({"result": f"koboldcpp/{app.catalog.default_name}"})   # even while it (re)loads


def kobold_info_version(app, req):
    return JSONResponse({"result": KOBOLD_API_VERSION})


def kobold_max_length(app, req):
    return JSONResponse({"value": app.config.max_length})


def default_context_size(app) -> int:
    """The default model's context: as loaded, or (unloaded, loading) as it will be. Never waits for a load."""
    served = app.roster.current()
    if served is not None:
        return served.model.n_ctx
    entry = app.catalog.find(None)
    return entry.config(app.config).contextsize if entry else app.config.contextsize


def kobold_max_context_length(app, req):
    return JSONResponse({"value": default_context_size(app)})


def kobold_generate(app, req):
    job = req.start_generation(parse_kobold_request(req, app))
    result = {"text": wait_for_text(job), "finish_reason": wire_finish_reason(job.buffer.finish_reason)}
    if job.request.logprobs:
        result["logprobs"] = LogprobShapes(req.use().model).kobold(job.logprobs)
    return JSONResponse({"results": [result]})


def kobold_last_logprobs(app, req):
    """The log-probabilities of this genkey's latest generation; never another's, and none without a key."""
    genkey = genkey_of(req)
    found = app.find_job(genkey) if genkey else None
    served = req.use_loaded(found[1]) if found else None      # its model, unless unloaded since
    if served is None or not found[0].request.logprobs:
        return JSONResponse({"logprobs": None})
    return JSONResponse({"logprobs": LogprobShapes(served.model).kobold(list(found[0].logprobs))})


def kobold_generate_stream(app, req):
    job = req.start_generation(parse_kobold_request(req, app))

    def events():
        for batch in job.buffer.batches():    # one write for all the tokens already waiting
            yield b"".join(kobold_sse_event(piece, None) for piece in batch)
        yield kobold_sse_event("", wire_finish_reason(job.buffer.finish_reason))
    return StreamResponse("text/event-stream", events(), job)


def kobold_extra_version(app, req):
    return JSONResponse({
        "result": "KoboldCpp", "version": KOBOLDCPP_COMPAT_VERSION, "protected": bool(app.config.password),
        "server": "KoboldLite", "koboldlite_version": __version__,
        "txt2img": False, "vision": False, "audio": False, "transcribe": False, "multiplayer": False,
        "websearch": False, "tts": False, "embeddings": True, "savedata": False,
        "admin": 1 if app.config.admin else 0, "router": app.catalog.several,
    })


def kobold_check(app, req):
    job, served = app.find_job(genkey_of(req)) or (None, None)
    text = job.buffer.text() if job is not None else ""
    result = {"text": text}
    if job is not None and job.state == "queued":
        result["queue_position"] = served.scheduler.queue_position(job)
    return JSONResponse({"results": [result]})


def kobold_abort(app, req):
    job = app.abort(genkey_of(req))
    if job is None:
        return JSONResponse({"success": "false", "done": "false"})
    done = job.buffer.wait_done(timeout=2.0)   # the loop stops within one token
    return JSONResponse({"success": "true", "done": "true" if done else "false"})


def kobold_tokencount(app, req):
    f = FieldReader(req.json())
    text = f.string("prompt")
    special = f.boolean("special", default=True)
    ids = req.use().model.tokenize(text, add_bos=special, parse_special=special)
    return JSONResponse({"value": len(ids), "ids": ids})


def kobold_detokenize(app, req):
    f = FieldReader(req.json())
    ids = f.token_ids("ids", "tokens")
    model = req.use().model
    bad = [t for t in ids if not model.valid_token(t)]
    if bad:
        raise RequestError(f"'ids' holds ids outside the vocabulary (0..{model.n_vocab - 1}): {bad[0]}")
    return JSONResponse({"result": model.detokenize(ids), "success": True})


def kobold_json_to_grammar(app, req):
    """A JSON schema (the body, or its 'schema' field) as GBNF, for clients that then send it as 'grammar'."""
    f = FieldReader(req.json())
    schema = f.body.get("schema", f.body)
    return JSONResponse({"result": json_grammar(schema, "schema"), "success": True})


def sd_models(app, req):
    """No image model is served: KoboldCpp answers an empty list, and KoboldAI Lite asks on every connect."""
    return JSONResponse([])


def kobold_true_max_context_length(app, req):
    return JSONResponse({"value": default_context_size(app)})


def kobold_perf(app, req):
    """Counts and timings, no text; of the default model's loop when it is loaded (it never loads one)."""
    last = app.last_job
    s = last.stats if last else JobStats()
    loaded = app.roster.any_loaded()
    served = app.roster.current() or (loaded[0] if loaded else None)
    return JSONResponse({
        "last_process": round(s.prompt_seconds, 4),
        "last_eval": round(s.generation_seconds, 4),
        "last_token_count": s.generated_tokens,
        "last_input_count": s.prompt_tokens,
        "last_cached_count": s.cached_tokens,
        "last_truncated_count": s.truncated_tokens,    # oldest prompt tokens cut to fit the context
        "last_shifted_count": s.shifted_tokens,        # tokens a context shift dropped while generating
        "truncated": s.truncated,
        "last_seed": s.seed,
        "last_model": s.model,                         # the model that served the last job
        "last_cache_source": s.cache_source,           # slot, ram, disk or none: where its cached tokens came from
        "prompt_cache": prompt_cache_report(served) if served else None,
        "last_draft_count": s.drafted_tokens,          # speculative draft tokens checked, and kept
        "last_draft_accepted": s.draft_accepted,
        "total_draft_count": app.totals["drafted_tokens"], "total_draft_accepted": app.totals["draft_accepted"],
        "total_gens": app.totals["requests"],
        "stop_reason": s.stop_reason,
        "queue": sum(m.scheduler.waiting for m in loaded),
        "idle": 0 if any(not m.scheduler.idle for m in loaded) else 1,
        "active_slots": sum(m.scheduler.active for m in loaded),
        "slots": len(served.engine.slots) if served else 0,
        "kv_compactions": served.engine.compactions if served else 0,   # a shared pool laid out anew (README)
        "read_ahead_tokens": served.engine.next_turns.tokens_read if served else 0,   # chats' next turns (README)
        "gpu": gpu_report(served) if served else None,
        "models": model_states(app),
        "model_events": list(app.roster.events),       # loads and unloads: when, why, seconds, MiB
        "uptime": round(time.monotonic() - app.started, 3),
        "instance": app.instance_id,
        "hordeexitcounter": -1,
        "quiet": app.config.quiet,
    })


def prompt_cache_report(served: ServedModel) -> dict | None:
    cache = served.prompt_cache
    if cache is None:
        return None
    with cache._lock:
        entries = list(cache.entries)
    return {"conversations": len(entries), "in_ram": sum(e.data is not None for e in entries),
            "on_disk": sum(e.path is not None for e in entries), "ram_mib": round(cache.ram_used / 2**20, 1),
            "disk_mib": round(cache.disk_used / 2**20, 1), "ram_limit_mib": cache.ram_bytes >> 20,
            "disk_limit_mib": cache.disk_bytes >> 20 if cache.folder else 0,
            "saved_ahead": cache.saved["ahead"], "saved_when_displaced": cache.saved["when_displaced"]}


def gpu_report(served: ServedModel) -> dict:
    """Fixed once the model is loaded; read then, not from llama.cpp's log (which scrolls) on every request."""
    return served.gpu_info


def model_states(app) -> list[dict]:
    """Every model a request may name, with its state, size and context (as loaded, or as it would be)."""
    out = []
    for entry in app.catalog.entries():
        served = app.roster.current(entry.name)
        out.append({"name": entry.name, "aliases": entry.aliases, "state": app.roster.state_of(entry.name),
                    "default": entry.name == app.catalog.default_name, "size": entry.size_bytes,
                    "context": served.model.n_ctx if served else entry.config(app.config).contextsize,
                    **({"error": app.roster.failures[entry.name]} if entry.name in app.roster.failures else {})})
    return out


def kobold_preloadstory(app, req):
    return JSONResponse({})


CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


def parse_chat_messages(value: Any) -> list[dict]:
    """OpenAI- or Ollama-style messages; a 400 names the message that is wrong. Tool calls and tool
    results are kept as Hugging Face templates read them (arguments as objects)."""
    if not isinstance(value, list) or not value:
        raise RequestError("'messages' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, not {role!r}")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(f"messages[{i}].content[{j}] must be a text part "
                                       "({{\"type\": \"text\", \"text\": ...}}); images are not supported")
                texts.append(part["text"])
            content = "".join(texts)
        elif not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string or a list of text parts")
        message = {"role": "system" if role == "developer" else role, "content": content}
        if m.get("tool_calls"):
            message["tool_calls"] = [tool_call_of(call, f"messages[{i}].tool_calls[{j}]")
                                     for j, call in enumerate(m["tool_calls"] if isinstance(m["tool_calls"], list)
                                                              else [None])]
        for key in ("tool_call_id", "name", "tool_name"):
            if isinstance(m.get(key), str):
                message[key] = m[key]
        out.append(message)
    return out


def tool_call_of(call: Any, where: str) -> dict:
    """An assistant's earlier tool call, arguments as an object (OpenAI sends them as a JSON string)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise RequestError(f"{where} must be {{'function': {{'name': ..., 'arguments': ...}}}}")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise RequestError(f"{where}.function.arguments is not valid JSON") from None
    return {"id": call.get("id") or f"call_{secrets.token_hex(8)}", "type": "function",
            "function": {"name": function["name"], "arguments": arguments}}


def json_grammar(spec: Any, where: str) -> str:
    """GBNF for 'any JSON object' (spec True) or for a JSON schema (spec a dict)."""
    from llama_cpp import llama_grammar
    if spec is True:
        return llama_grammar.JSON_GBNF
    if not isinstance(spec, dict):
        raise RequestError(f"'{where}' must be a JSON schema object")
    try:
        return llama_grammar.json_schema_to_gbnf(json.dumps(spec))
    except Exception as e:   # the converter asserts or fails on what it cannot express
        raise RequestError(f"'{where}' is not a JSON schema this server can enforce: {e}") from None


class ToolUse:
    """The tools a chat request offers: how they reach the prompt, the grammar that enforces a call
    when one is required, and how the reply is read back as calls.

    The call format is the template's own, recognised from its source: Hermes and Qwen
    (`<tool_call>{...}</tool_call>`), Mistral (`[TOOL_CALLS][{...}]`), Llama 3 (`{"name", "parameters"}`,
    after `<|python_tag|>` or alone). A template that does not read `tools` gets them described in a
    system message, with the answer asked for as one JSON object `{"tool_calls": [...]}`.
    """

    def __init__(self, template: "ChatTemplate", tools: Any, choice: Any, parallel: bool):
        if not isinstance(tools, list) or not all(
                isinstance(t, dict) and isinstance(t.get("function"), dict)
                and isinstance(t["function"].get("name"), str) for t in tools):
            raise RequestError("'tools' must be a list of {'type': 'function', 'function': {'name': ...}}")
        self.tools = tools
        self.names = [t["function"]["name"] for t in tools]
        self.parallel = parallel
        if choice in (None, "auto", "none", "required"):
            self.choice = choice or "auto"
        elif isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str):
            self.choice = choice["function"]["name"]
            if self.choice not in self.names:
                raise RequestError(f"'tool_choice' names {self.choice!r}, which is not in 'tools'")
        else:
            raise RequestError("'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', "
                               "'function': {'name': ...}}")
        source = template.source
        self.format = ("hermes" if "<tool_call>" in source else "mistral" if "[TOOL_CALLS]" in source
                       else "llama3" if "<|python_tag|>" in source or ("tools" in source and '"parameters"' in source)
                       else "generic" if "tools" not in source else "hermes")
        self.template_reads_tools = "tools" in source

    @property
    def may_call(self) -> bool:
        """With tool_choice "none" the model sees the tools (and earlier calls) but its reply is text."""
        return self.choice != "none"

    def prompt(self, messages: list[dict]) -> tuple[list[dict], dict]:
        """Messages and template variables with the tools in them."""
        if self.template_reads_tools:
            return messages, {"tools": self.tools}
        specs = json.dumps([t["function"] for t in self.tools], ensure_ascii=False)
        guide = (f"You can call these tools: {specs}\nTo call tools, reply with only this JSON object: "
                 '{"tool_calls": [{"name": "<tool name>", "arguments": {<its arguments>}}]}. '
                 "Otherwise, answer normally.")
        out = []
        for m in messages:              # earlier calls and their results, as this format writes them
            if m.get("tool_calls"):
                calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                         for c in m["tool_calls"]]
                m = {"role": "assistant", "content": json.dumps({"tool_calls": calls}, ensure_ascii=False)}
            elif m["role"] == "tool":
                m = {"role": "user", "content": f"Tool result ({m.get('name') or m.get('tool_call_id') or 'call'}): "
                                                f"{m['content']}"}
            out.append(m)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + guide}
        else:
            out.insert(0, {"role": "system", "content": guide})
        return out, {}

    def apply(self, messages: list[dict], sampler: SamplerSettings) -> tuple[list[dict], dict]:
        """The tools into a chat request: its messages and template variables, and the grammar that
        forces a call (when one is required) onto its sampler."""
        messages, template_vars = self.prompt(messages)
        sampler.grammar = self.grammar() or sampler.grammar
        return messages, template_vars

    def grammar(self) -> str | None:
        """GBNF forcing a call, from the tools' JSON schemas, when one is required or named."""
        if self.choice in ("auto", "none"):
            return None
        from llama_cpp import llama_grammar
        wanted = [t for t in self.tools if self.choice == "required" or t["function"]["name"] == self.choice]
        args_key = "parameters" if self.format == "llama3" else "arguments"
        call = {"anyOf": [{"type": "object", "required": ["name", args_key], "properties": {
            "name": {"const": t["function"]["name"]},
            args_key: bounded_strings(t["function"].get("parameters") or {"type": "object"})}} for t in wanted]}
        most = self.MAX_CALLS if self.parallel else 1      # a forced reply must close within its length
        if self.format == "generic":
            schema = {"type": "object", "required": ["tool_calls"], "properties": {"tool_calls": {
                "type": "array", "items": call, "minItems": 1, "maxItems": most}}}
        elif self.format == "mistral":
            schema = {"type": "array", "items": call, "minItems": 1, "maxItems": most}
        else:
            schema = call
        try:
            gbnf = llama_grammar.json_schema_to_gbnf(json.dumps(schema))
        except Exception as e:
            raise RequestError(f"a tool's 'parameters' is not a JSON schema this server can enforce: {e}") from None
        body = gbnf.replace("root ::=", "call ::=", 1)
        if self.format == "hermes":
            repeat = ' ("\\n<tool_call>\\n" call "\\n</tool_call>")?' * (most - 1)
            return f'root ::= "<tool_call>\\n" call "\\n</tool_call>"{repeat}\n' + body
        if self.format == "mistral":
            return 'root ::= "[TOOL_CALLS]" call\n' + body
        return "root ::= call\n" + body

    CALL_STARTS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "{")
    MAX_CALLS = 4                  # calls in one reply when a call is forced and parallel calls are allowed

    def may_be_call(self, text: str) -> bool:
        """Whether a reply beginning so may still turn out to be a call (a stream holds it back)."""
        head = text.lstrip()
        return any(head.startswith(s) or s.startswith(head) for s in self.CALL_STARTS)

    def parse(self, text: str) -> tuple[str, list[dict]]:
        """(content, calls): each call {'name', 'arguments'} naming an offered tool."""
        found, content = [], text
        for block in re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.S):
            found += self._calls_in(block)
        if found:
            content = re.sub(r"<tool_call>.*?</tool_call>", "", text, flags=re.S)
        else:
            head = text.strip()
            for prefix in ("[TOOL_CALLS]", "<|python_tag|>"):
                if head.startswith(prefix):
                    head = head[len(prefix):].strip()
            found = self._calls_in(head)
            if found:
                content = ""
        calls = [c for c in found if c["name"] in self.names]
        if not self.parallel:
            calls = calls[:1]
        return (content.strip() if calls else text), calls

    @staticmethod
    def _calls_in(text: str) -> list[dict]:
        try:
            value = json.loads(text)
        except ValueError:
            return []
        if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
            value = value["tool_calls"]
        items = value if isinstance(value, list) else [value]
        calls = []
        for item in items:
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                args = item.get("arguments", item.get("parameters", {}))
                if isinstance(args, str):
                    try:
                        args = json.loads(args)
                    except ValueError:
                        return []
                if isinstance(args, dict):
                    calls.append({"name": item["name"], "arguments": args})
        return calls


class CallWatch:
    """A streamed answer that may be a tool call: shown as it comes unless it begins like one, then
    held; at the end, read as calls (or shown after all)."""

    def __init__(self, tools: ToolUse | None):
        self.tools = tools if tools is not None and tools.may_call else None
        self.deciding = self.tools is not None
        self.held = ""
        self.calls: list[dict] = []

    def feed(self, answer: str) -> str:
        if not self.deciding:
            return answer
        self.held += answer
        if self.tools.may_be_call(self.held):
            return ""
        self.deciding = False
        out, self.held = self.held, ""
        return out

    def finish(self, answer: str = "") -> str:
        text, self.held = self.held + answer, ""
        if self.tools is None or not text.strip():
            return text
        content, self.calls = self.tools.parse(text)
        return content

    def openai_calls(self) -> list[dict]:
        return [{"id": f"call_{secrets.token_hex(12)}", "type": "function",
                 "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                for c in self.calls]


TOOL_STRING_LIMIT = 100


def bounded_strings(schema: Any) -> Any:
    """The schema with a maxLength on every string that sets none, so that a forced call always
    closes within a reply's length, even from a small model that would ramble inside a string."""
    if isinstance(schema, list):
        return [bounded_strings(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: bounded_strings(v) for k, v in schema.items()}
    if out.get("type") == "string" and not {"maxLength", "enum", "const", "pattern", "format"} & out.keys():
        out["maxLength"] = TOOL_STRING_LIMIT
    return out


def tool_use_of(served: ServedModel, f: FieldReader, choice: Any = None) -> ToolUse | None:
    tools = f.body.get("tools")
    if not tools:
        return None
    return ToolUse(served.chat_template, tools, choice if choice is not None else f.body.get("tool_choice"),
                   f.body.get("parallel_tool_calls") is not False)


OPENAI_DEFAULTS = SamplerSettings(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, rep_pen_range=64)


def openai_max_tokens(f: FieldReader, default: int | None) -> int | None:
    """`max_tokens` (or its newer name): at least 1; -1, as llama.cpp clients send it, means no limit."""
    names = ("max_tokens", "max_completion_tokens", "max_length")
    value = f.integer(*names, default=-1 if default is None else default)
    if value == -1:
        return None
    if value < 1:
        raise RequestError(f"'max_tokens' must be at least 1 (or -1 for no limit), not {value}",
                           code="invalid_value")
    return value


def openai_generation_fields(req, f: FieldReader, default_max: int | None) -> dict:
    if f.integer("n", default=1) != 1:
        raise RequestError("'n' must be 1: this server returns one choice per request")
    sampler = parse_sampler_settings(f, OPENAI_DEFAULTS)
    fmt = f.body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            sampler.grammar = json_grammar(True, "response_format")
        elif kind == "json_schema":
            schema = fmt.get("json_schema")
            schema = schema.get("schema") if isinstance(schema, dict) else None
            sampler.grammar = json_grammar(schema, "response_format.json_schema.schema")
        elif kind != "text":
            raise RequestError("'response_format.type' must be 'text', 'json_object' or 'json_schema'")
    return dict(max_length=openai_max_tokens(f, default_max),
                stop_strings=f.string_list("stop"), sampler=sampler, genkey=genkey_of(req),
                ignored_fields=ignored_fields(f.body, OPENAI_IGNORED_FIELDS))


MAX_TOP_LOGPROBS = 20


def openai_logprob_fields(f: FieldReader, legacy: bool) -> dict:
    """Completions: `logprobs` is the number of alternatives; chat: `logprobs` true, `top_logprobs` N.
    Both from the model's own distribution, as OpenAI and llama-server report them."""
    if legacy:
        value = f.body.get("logprobs")
        if value is None or value is False:
            return {}
        top = 1 if value is True else f.integer("logprobs", default=0, lo=0, hi=MAX_TOP_LOGPROBS)
        return {"logprobs": True, "top_logprobs": top}
    if not f.boolean("logprobs"):
        return {}
    return {"logprobs": True, "top_logprobs": f.integer("top_logprobs", default=0, lo=0, hi=MAX_TOP_LOGPROBS)}


def openai_usage(job: Job) -> dict:
    p, c = job.stats.prompt_tokens, job.stats.generated_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": job.stats.cached_tokens},
            "truncated": job.stats.truncated}     # llama-server's flag: a context shift dropped text


def sse_data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def openai_stream(job: Job, head: dict, choice: Callable[[str], dict | None], first: dict | None,
                  final: dict, include_usage: bool,
                  logprobs: Callable[[list[TokenLogprob]], Any] | None = None,
                  tail: Callable[[], dict | None] | None = None,
                  finish_reason: Callable[[], str] | None = None) -> Iterator[bytes]:
    """`data:` lines only (no `event:`), exactly one final chunk, optional usage chunk, then [DONE].
    With `logprobs`, each write's last chunk carries the log-probabilities of its tokens; `tail` gives
    what a held-back choice still has at the end."""
    def chunk(choice_fields: dict, finish_reason=None, entries=()) -> bytes:
        return sse_data({**head, "choices": [{"index": 0, **choice_fields,
                                              "logprobs": logprobs(entries) if logprobs and entries else None,
                                              "finish_reason": finish_reason}]})
    if first is not None:
        yield chunk(first)
    rest: list[TokenLogprob] = []       # log-probabilities of tokens not yet shown in a chunk
    for batch, entries in batches_with_logprobs(job):
        rest += entries
        shown = [c for c in map(choice, batch) if c is not None]     # None: held back (a tag forming)
        if shown:
            yield b"".join(chunk(c, entries=rest if k == len(shown) - 1 else ()) for k, c in enumerate(shown))
            rest = []
    last = tail() if tail is not None else None
    if last is not None:
        yield chunk(last, entries=rest)
        rest = []
    if job.buffer.finish_reason == "error":
        yield sse_data({"error": {"message": job.buffer.error or "generation failed", "type": "server_error"}})
    else:
        yield chunk(final, finish_reason() if finish_reason else wire_finish_reason(job.buffer.finish_reason), rest)
        if include_usage:
            yield sse_data({**head, "choices": [], "usage": openai_usage(job)})
    yield SSE_DONE


def openai_head(served: ServedModel, kind: str, prefix: str) -> dict:
    return {"id": f"{prefix}-{secrets.token_hex(12)}", "object": kind, "created": int(time.time()),
            "model": served.name}


def include_usage_of(f: FieldReader) -> bool:
    options = f.body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def openai_models(app, req):
    """Every model, the default first; `status` as llama-server's router mode says it."""
    return JSONResponse({"object": "list", "data": [{
        "id": m["name"], "object": "model", "created": int(os.path.getmtime(app.catalog.find(m["name"]).path)),
        "owned_by": "koboldlite", "aliases": m["aliases"], "status": {"value": m["state"]},
        "size": m["size"], "context_length": m["context"]} for m in model_states(app)]})


def openai_completions(app, req):
    f = FieldReader(req.json())
    served = req.use(f.body.get("model"))
    prompt = f.body.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError("'prompt' must be a string (or a list of one string)")
    fields = openai_generation_fields(req, f, default_max=16)
    request = instruct_request(served, f, prompt=prompt, stop_strings=fields.pop("stop_strings"), **fields,
                               **openai_logprob_fields(f, legacy=True))
    job = req.start_generation(request)
    head = openai_head(served, "text_completion", "cmpl")
    shapes = LogprobShapes(served.model)
    if f.boolean("stream"):
        return StreamResponse("text/event-stream", openai_stream(
            job, head, lambda piece: {"text": piece}, None, {"text": ""}, include_usage_of(f), shapes.legacy), job)
    text = wait_for_text(job)
    return JSONResponse({**head, "choices": [{"text": text, "index": 0,
                                              "logprobs": shapes.legacy(job.logprobs) if request.logprobs else None,
                                              "finish_reason": wire_finish_reason(job.buffer.finish_reason)}],
                         "usage": openai_usage(job)})


def reasoning_fields(splitter: ReasoningSplitter | None, reasoning: str, answer: str,
                     names: tuple[str, str] = ("reasoning_content", "content")) -> dict:
    """The text as an API shows it: a thinking block apart (llama-server's `reasoning_content`,
    Ollama's `thinking`), or all inline."""
    if splitter is None:
        return {names[1]: reasoning + answer}
    return {**({names[0]: reasoning} if reasoning else {}), **({names[1]: answer} if answer else {})}


def openai_chat_completions(app, req):
    f = FieldReader(req.json())
    served = req.use(f.body.get("model"))
    messages = parse_chat_messages(f.body.get("messages"))
    fields = openai_generation_fields(req, f, default_max=None)
    tools = tool_use_of(served, f)
    template_vars = {}
    if tools is not None:
        messages, template_vars = tools.apply(messages, fields["sampler"])
    request = served.chat_template.generation_request(messages, template_vars=template_vars, **fields,
                                                      **openai_logprob_fields(f, legacy=False))
    job = req.start_generation(request)
    head = openai_head(served, "chat.completion.chunk", "chatcmpl")
    content = lambda entries: {"content": LogprobShapes(served.model).chat(entries)}    # noqa: E731
    # A thinking block goes to `reasoning_content` unless the client asks for it inline.
    inline = f.string("reasoning_format", default="auto") == "none"
    splitter = None if inline else ReasoningSplitter.for_prompt(request.prompt)
    watch = CallWatch(tools)

    def finish_reason() -> str:
        return "tool_calls" if watch.calls else wire_finish_reason(job.buffer.finish_reason)
    if f.boolean("stream"):
        def delta(piece: str) -> dict | None:
            reasoning, answer = splitter.feed(piece) if splitter else ("", piece)
            d = reasoning_fields(splitter, reasoning, watch.feed(answer))
            return {"delta": d} if any(d.values()) else None

        def tail() -> dict | None:
            reasoning, answer = splitter.flush() if splitter else ("", "")
            d = reasoning_fields(splitter, reasoning, watch.finish(answer))
            if watch.calls:
                d["tool_calls"] = [{"index": i, **call} for i, call in enumerate(watch.openai_calls())]
            return {"delta": d} if any(d.values()) else None
        return StreamResponse("text/event-stream", openai_stream(
            job, head, delta, {"delta": {"role": "assistant", "content": ""}}, {"delta": {}}, include_usage_of(f),
            content, tail, finish_reason), job)
    text = wait_for_text(job)
    reasoning, answer = splitter.split(text) if splitter else ("", text)
    message = {"role": "assistant", "content": "", **reasoning_fields(splitter, reasoning, watch.finish(answer))}
    if watch.calls:
        message["tool_calls"] = watch.openai_calls()
        message["content"] = message["content"] or None
    return JSONResponse({**head, "object": "chat.completion",
                         "choices": [{"index": 0, "message": message,
                                      "logprobs": content(job.logprobs) if request.logprobs else None,
                                      "finish_reason": finish_reason()}],
                         "usage": openai_usage(job)})


OLLAMA_DEFAULTS = SamplerSettings(temperature=0.8, top_k=40, top_p=0.9, min_p=0.0, rep_pen=1.1, rep_pen_range=64)


OLLAMA_VERSION = "0.12.0"


def ollama_timestamp() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e9):09d}Z"


def ollama_model_entry(app, entry: ModelEntry) -> dict:
    """Ollama's listing of a model, from its file's header: it need not be loaded."""
    mtime = os.path.getmtime(entry.path)
    meta = entry.layout.metadata if entry.layout else {}
    family = str(meta.get("general.architecture") or "")
    return {
        "name": entry.name, "model": entry.name,
        "modified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime)),
        "size": entry.size_bytes,
        "digest": hashlib.sha256(f"{entry.name}:{entry.size_bytes}:{mtime}".encode()).hexdigest(),
        "details": {"parent_model": "", "format": "gguf", "family": family, "families": [family],
                    "parameter_size": str(meta.get("general.size_label") or ""),
                    "quantization_level": str(meta.get("general.file_type") or "")},
    }


DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def keep_alive_of(f: FieldReader) -> float | None:
    """Ollama's keep_alive: seconds as a number, or a Go duration ("5m", "1h30m", "-1m"); negative: for ever.
    None when the request does not say."""
    value = f.body.get("keep_alive")
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        sign = -1 if text.startswith("-") else 1
        body = text.lstrip("+-")
        parts = DURATION_PART.findall(body)
        if parts and "".join(n + u for n, u in parts) == body:
            return sign * sum(float(n) * DURATION_UNITS[u] for n, u in parts)
    raise RequestError("'keep_alive' must be seconds or a duration such as \"5m\" (negative: keep loaded)")


def ollama_use(req, f: FieldReader) -> ServedModel:
    """The model an Ollama request names (`model`, or the old `name`), and how long it stays loaded after."""
    req.keep_alive = keep_alive_of(f)
    return req.use(f.body.get("model", f.body.get("name")))


def ollama_generation_fields(req, f: FieldReader, app) -> dict:
    options = FieldReader(f.body.get("options") or {}, "options")
    sampler = parse_sampler_settings(options, OLLAMA_DEFAULTS)
    fmt = f.body.get("format")
    if fmt == "json":
        sampler.grammar = json_grammar(True, "format")
    elif fmt not in (None, ""):
        sampler.grammar = json_grammar(fmt, "format")
    num_predict = options.integer("num_predict", default=-1, lo=-2, hi=1 << 20)
    fields = {}
    if f.boolean("logprobs"):
        fields["logprobs"] = True
        fields["top_logprobs"] = f.integer("top_logprobs", default=0, lo=0, hi=MAX_TOP_LOGPROBS)
    return dict(**fields, max_length=None if num_predict < 0 else max(1, num_predict),
                max_context_length=options.integer("num_ctx", default=req.use().model.n_ctx, lo=16, hi=1 << 24),
                stop_strings=options.string_list("stop"), sampler=sampler, genkey=genkey_of(req),
                ignored_fields=ignored_fields(f.body, OLLAMA_IGNORED_FIELDS) + ignored_fields(
                    options.body, dict.fromkeys(OLLAMA_IGNORED_OPTIONS, lambda v: v is not None), "options."))


def ollama_final(job: Job, head: dict) -> dict:
    s = job.stats
    return {**head, "done": True, "done_reason": "length" if job.buffer.finish_reason == "length" else "stop",
            "total_duration": int((time.monotonic() - job.created) * 1e9), "load_duration": 0,
            "prompt_eval_count": s.prompt_tokens, "prompt_eval_duration": int(s.prompt_seconds * 1e9),
            "eval_count": s.generated_tokens, "eval_duration": int(s.generation_seconds * 1e9)}


def ollama_answer(job: Job, served: ServedModel, f: FieldReader, text_fields: Callable[[dict], dict],
                  tools: ToolUse | None = None) -> Response:
    """NDJSON, one object per token and a final one with counts; or one object with "stream": false.
    With "logprobs": true, objects carry their tokens' `logprobs` (Ollama's shape, OpenAI chat's list).
    A thinking block goes to `thinking`, unless "think": false asks for none (then it stays inline)."""
    model = served.name
    shapes = LogprobShapes(served.model)
    splitter = None if f.body.get("think") is False else ReasoningSplitter.for_prompt(job.request.prompt)
    watch = CallWatch(tools)

    def fields_of(reasoning: str, answer: str, last: bool = False) -> dict:
        answer = watch.finish(answer) if last else watch.feed(answer)
        out = text_fields(reasoning_fields(splitter, reasoning, answer, ("thinking", "content")))
        if watch.calls:   # Ollama's shape: arguments as an object
            out["message"]["tool_calls"] = [{"function": {"name": c["name"], "arguments": c["arguments"]}}
                                            for c in watch.calls]
        return out

    def obj(fields: dict, entries=()) -> dict:
        return {"model": model, "created_at": ollama_timestamp(), **fields,
                **({"logprobs": shapes.chat(entries)} if job.request.logprobs and entries else {})}
    if f.boolean("stream", default=True):
        def lines():
            rest = []
            for batch, entries in batches_with_logprobs(job):
                rest += entries
                parts = [splitter.feed(piece) if splitter else ("", piece) for piece in batch]
                parts = [(r, watch.feed(a)) for r, a in parts]
                parts = [p for p in parts if any(p)]
                if parts:
                    yield b"".join(json.dumps({**obj(text_fields(reasoning_fields(splitter, *p, ("thinking", "content"))),
                                                     rest if k == len(parts) - 1 else ()),
                                               "done": False}).encode() + b"\n" for k, p in enumerate(parts))
                    rest = []
            if job.buffer.finish_reason == "error":
                yield json.dumps({"error": job.buffer.error or "generation failed"}).encode() + b"\n"
            else:
                last = splitter.flush() if splitter else ("", "")
                yield json.dumps(ollama_final(job, obj(fields_of(*last, last=True), rest))).encode() + b"\n"
        return StreamResponse("application/x-ndjson", lines(), job)
    text = wait_for_text(job)
    return JSONResponse(ollama_final(job, obj(fields_of(*(splitter.split(text) if splitter else ("", text)), last=True),
                                              job.logprobs)))


def ollama_template_vars(f: FieldReader) -> dict:
    """`think`, for templates that read `enable_thinking` (Qwen3 and others) to think or not."""
    think = f.body.get("think")
    return {"enable_thinking": think} if isinstance(think, bool) else {}


def ollama_generate(app, req):
    f = FieldReader(req.json())
    prompt = f.string("prompt")
    if not prompt and not f.has("suffix"):
        # Ollama's way to load a model (an empty prompt), or with keep_alive 0 to unload it.
        if keep_alive_of(f) == 0:
            entry = req.entry(f.body.get("model"))
            served = app.roster.current(entry.name)
            if served is not None and not app.roster.unload(entry.name, "keep_alive 0"):
                served.keep_alive = 0.0          # in use: unloaded as soon as its work ends
                app.roster.touch()
            return JSONResponse({"model": entry.name, "created_at": ollama_timestamp(), "response": "",
                                 "done": True, "done_reason": "unload"})
        served = ollama_use(req, f)
        return JSONResponse({"model": served.name, "created_at": ollama_timestamp(), "response": "",
                             "done": True, "done_reason": "load"})
    served = ollama_use(req, f)
    fields = ollama_generation_fields(req, f, app)
    if f.boolean("raw"):
        request = GenerationRequest(prompt=prompt, **fields)
    else:
        messages = ([{"role": "system", "content": f.string("system")}] if f.string("system") else []) + \
                   [{"role": "user", "content": prompt}]
        request = served.chat_template.generation_request(messages, template_vars=ollama_template_vars(f), **fields)
    job = req.start_generation(request)
    return ollama_answer(job, served, f, lambda t: {"response": t.get("content", ""),
                                                 **({"thinking": t["thinking"]} if "thinking" in t else {})})


def ollama_chat(app, req):
    f = FieldReader(req.json())
    served = ollama_use(req, f)
    messages = parse_chat_messages(f.body.get("messages"))
    fields = ollama_generation_fields(req, f, app)
    # Ollama has no tool_choice; we take one beside the tools or in `options` (which its clients pass on).
    options = f.body.get("options") if isinstance(f.body.get("options"), dict) else {}
    tools = tool_use_of(served, f, f.body.get("tool_choice", options.get("tool_choice")))
    template_vars = ollama_template_vars(f)
    if tools is not None:
        messages, more = tools.apply(messages, fields["sampler"])
        template_vars.update(more)
    job = req.start_generation(served.chat_template.generation_request(messages, template_vars=template_vars,
                                                                       **fields))
    return ollama_answer(job, served, f, lambda t: {"message": {"role": "assistant", "content": t.get("content", ""),
                                                             **({"thinking": t["thinking"]} if "thinking" in t
                                                                else {})}}, tools)


def ollama_tags(app, req):
    return JSONResponse({"models": [ollama_model_entry(app, entry) for entry in app.catalog.entries()]})


def iso_time(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def ollama_ps(app, req):
    """The loaded models, with when each will be unloaded (Ollama's far future: never)."""
    out = []
    for served in app.roster.any_loaded():
        expires = app.roster.expires_at(served)
        out.append({**ollama_model_entry(app, served.entry), "size_vram": int(gpu_report(served)["vram_mib"] * 2**20),
                    "expires_at": iso_time(expires) if expires is not None else "9999-12-31T23:59:59Z",
                    "context_length": served.model.n_ctx})
    return JSONResponse({"models": out})


def ollama_version(app, req):
    return JSONResponse({"version": OLLAMA_VERSION})


def ollama_show(app, req):
    """What a model is, from its file's header (it need not be loaded)."""
    f = FieldReader(req.json())
    entry = req.entry(f.body.get("model", f.body.get("name")))
    listing = ollama_model_entry(app, entry)
    meta = entry.layout.metadata if entry.layout else {}
    family = listing["details"]["family"]
    template = entry.config(app.config).chat_template
    if template in BUILTIN_CHAT_TEMPLATES:
        template = BUILTIN_CHAT_TEMPLATES[template]
    elif template:
        with open(template, encoding="utf-8") as file:
            template = file.read()
    return JSONResponse({"modelfile": "", "parameters": "",
                         "template": template or str(meta.get("tokenizer.chat_template") or ""),
                         "details": listing["details"], "model_info": {
                             "general.architecture": family,
                             f"{family}.context_length": meta.get(f"{family}.context_length", 0)},
                         "capabilities": ["completion"], "modified_at": listing["modified_at"]})


def download_folder(app) -> str:
    """Where downloads go: the models folder, or without one the folder the server was started in."""
    return app.config.modeldir or os.getcwd()


def add_downloaded(app, path: str) -> ModelEntry:
    if app.config.modeldir and os.path.dirname(os.path.abspath(path)) == os.path.abspath(app.config.modeldir):
        app.catalog.rescan()
        return app.catalog.find(model_name_of(path))
    return app.catalog.add_file(path)


def load_in_background(app, entry: ModelEntry):
    """Load a model for requests to come (the admin switch): the caller is answered at once."""
    def run():
        try:
            app.roster.release(app.roster.acquire(entry))
        except RequestError:
            pass                         # logged by the roster; listings show the error
    threading.Thread(target=run, name=f"load-{entry.name}", daemon=True).start()


ADMIN_WORDS = ("unload_model", "initial_model")     # KoboldCpp's list_options entries that are not files


def admin_folder(app) -> str | None:
    return app.config.admindir or app.config.modeldir


def admin_list_options(app, req):
    """The model files the admin API may switch to, and KoboldCpp's two words; [] with admin mode off."""
    folder = admin_folder(app)
    if not app.config.admin or not folder:
        return JSONResponse([])
    files = sorted(os.path.basename(files[0]) for files in scan_model_folder(folder).values())
    return JSONResponse(files + list(ADMIN_WORDS))


def admin_reload_config(app, req):
    """Switch the Kobold API's model to a file of the admin folder (loaded in the background: the polling
    endpoints and /api/v1/model answer meanwhile); `unload_model` unloads it, `initial_model` goes back."""
    if not app.config.admin:
        raise RequestError("the admin API is off: start with --admin (and --admindir or --modeldir)", status=403,
                           kind="forbidden")
    f = FieldReader(req.json())
    req.ignore_fields_but(f.body, "filename")
    filename = f.string("filename")
    if filename == "unload_model":
        name = app.catalog.default_name
        if app.roster.current(name) is not None and not app.roster.unload(name, "admin unload_model"):
            raise RequestError(f"model {name} is busy: try again when its replies end", status=409, kind="conflict")
        return JSONResponse({"success": True})
    if filename == "initial_model":
        entry = app.catalog.find(app.catalog.initial_name)
    else:
        folder = admin_folder(app)
        if not folder:
            raise RequestError("no admin folder: start with --admindir or --modeldir", status=403, kind="forbidden")
        # By name, not by where links lead: a link the user put in the folder is his to choose.
        root = os.path.abspath(folder)
        path = os.path.normpath(os.path.join(root, filename))
        outside = os.path.isabs(filename) or os.path.commonpath([root, path]) != root or path == root
        if outside or "\0" in filename:
            raise RequestError("filename must name a file inside the admin folder", status=403, kind="forbidden")
        if not filename.lower().endswith(".gguf") or not os.path.isfile(path):
            raise RequestError(f"no model file {filename!r} in the admin folder (GET /api/admin/list_options)",
                               status=404, kind="not_found")
        try:
            entry = app.catalog.find(model_name_of(path))
            if entry is None or os.path.realpath(entry.path) != os.path.realpath(path):
                entry = app.catalog.add_file(path)
        except ConfigError as e:
            raise RequestError(str(e), status=409, kind="conflict") from None
    app.catalog.default_name = entry.name
    app.log(f"admin: the Kobold API's model is now {entry.name}")
    load_in_background(app, entry)
    return JSONResponse({"success": True})


def router_load(app, req):
    """llama-server's POST /models/load: load it now (the answer waits for the load)."""
    f = FieldReader(req.json())
    entry = req.entry(f.string("model"))
    app.roster.release(app.roster.acquire(entry))
    return JSONResponse({"success": True})


def router_unload(app, req):
    f = FieldReader(req.json())
    entry = req.entry(f.string("model"))
    if app.roster.current(entry.name) is None:
        raise RequestError(f"model {entry.name} is not loaded")
    if not app.roster.unload(entry.name, "asked by /models/unload"):
        raise RequestError(f"model {entry.name} is busy: try again when its replies end", status=409, kind="conflict")
    return JSONResponse({"success": True})


def ollama_pull(app, req):
    """Ollama's pull, for an http(s) URL of a GGUF file (there is no model registry here), with its NDJSON
    progress objects. A pull of a model already here is a success; a hang-up stops the download and a
    later pull resumes it."""
    f = FieldReader(req.json())
    req.ignore_fields_but(f.body, "model", "name", "stream")
    source = f.string("model", "name")
    if not is_model_url(source):
        if app.catalog.find(source) is not None:
            return JSONResponse({"status": "success"})
        raise RequestError(f'model "{source}" not found: this server pulls http(s) URLs of GGUF files (a Hugging '
                           f'Face .../resolve/main/FILE.gguf), it reaches no model registry', status=404,
                           kind="not_found")
    updates: "queue.Queue[dict | None]" = queue.Queue()
    stop = threading.Event()
    last = [-1]

    def progress(done: int, total: int):
        if stop.is_set():
            raise DownloadError("the client hung up")
        step = done * 100 // total if total else done >> 24
        if step != last[0] or done == total:
            last[0] = step
            updates.put({"status": f"pulling {download.name}", "digest": f"sha256:{download.sha256 or ''}",
                         "total": total, "completed": done})
    try:
        download = ModelDownload(source, download_folder(app), progress, lambda what: updates.put({"status": what}))
    except DownloadError as e:
        raise RequestError(str(e)) from None

    def run() -> dict:
        try:
            path = download.run()
        except DownloadError as e:
            return {"error": str(e)}
        entry = add_downloaded(app, path)
        app.log(f"pulled {source} into {path} ({entry.size_bytes >> 20} MiB)")
        return {"status": "success"}
    if not f.boolean("stream", default=True):
        result = run()
        if "error" in result:
            raise RequestError(result["error"], status=500, kind="server_error")
        return JSONResponse(result)

    def worker():
        updates.put(run())
        updates.put(None)
    threading.Thread(target=worker, name="pull", daemon=True).start()

    def lines():
        try:
            yield json.dumps({"status": "pulling manifest"}).encode() + b"\n"
            while (update := updates.get()) is not None:
                if update.get("status") == "success":
                    yield b"".join(json.dumps({"status": s}).encode() + b"\n" for s in ("writing manifest", "success"))
                else:
                    yield json.dumps(update).encode() + b"\n"
        finally:
            stop.set()
    return StreamResponse("application/x-ndjson", lines())


def ollama_delete(app, req):
    """Remove a model's files from the models folder (never a file outside it, never the default model)."""
    f = FieldReader(req.json())
    name = f.string("model", "name")
    entry = app.catalog.find(name) if app.catalog.several else None
    folder = os.path.realpath(app.config.modeldir) if app.config.modeldir else None
    if entry is None or folder is None or os.path.dirname(os.path.realpath(entry.path)) != folder:
        raise RequestError(f'model "{name}" not found in the models folder', status=404, kind="not_found")
    if entry.name == app.catalog.default_name:
        raise RequestError(f"model {entry.name} is the default model: it cannot be deleted", status=409,
                           kind="conflict")
    if app.roster.current(entry.name) is not None and not app.roster.unload(entry.name, "deleted"):
        raise RequestError(f"model {entry.name} is busy: try again when its replies end", status=409, kind="conflict")
    for file in entry.files:
        os.remove(file)
    app.catalog.forget(entry.name)
    app.log(f"deleted model {entry.name}: {', '.join(entry.files)}")
    return Response(200, b"", "application/json")


SLOT_FILE_NAME = re.compile(r"[\w][\w.-]{0,199}")


def slots_list(app, req):
    """llama-server's GET /slots: each slot, whether it generates, how much it holds (no text)."""
    served = req.use(req.query.get("model"))
    return JSONResponse([{"id": s.seq_id, "n_ctx": served.model.n_ctx, "is_processing": s.busy,
                          "n_cached": len(s.cached)} for s in served.engine.slots])


def slot_file(app, f: FieldReader) -> tuple[str, str]:
    folder = app.config.slot_save_path
    if not folder:
        raise RequestError("saving slots is off: start with --slot-save-path DIR", status=501,
                           kind="not_supported_error")
    name = f.string("filename")
    if not SLOT_FILE_NAME.fullmatch(name) or ".." in name:
        raise RequestError("Invalid filename: a file name only, no path")
    return name, os.path.join(folder, name)


def slots_action(app, req):
    """llama-server's POST /slots/{id}?action=save|restore|erase, run on the generation loop between steps."""
    try:
        i = int(req.path.rsplit("/", 1)[1])
    except ValueError:
        raise RequestError("the slot id must be a number") from None
    action = req.query.get("action")
    served = req.use(req.query.get("model"))
    f = FieldReader(req.json(optional=True) or {})
    req.ignore_fields_but(f.body, "filename")
    started = time.monotonic()
    ms = lambda: round((time.monotonic() - started) * 1000, 3)    # noqa: E731
    if action == "erase":
        return JSONResponse({"id_slot": i, "n_erased": served.scheduler.call(lambda e: e.erase_slot(i))})
    if action == "save":
        name, path = slot_file(app, f)
        n, size = served.scheduler.call(lambda e: e.save_slot(i, path))
        app.log(f"slot {i}: {n} tokens saved to {name}")
        return JSONResponse({"id_slot": i, "filename": name, "n_saved": n, "n_written": size,
                             "timings": {"save_ms": ms()}})
    if action == "restore":
        name, path = slot_file(app, f)
        if not os.path.isfile(path):
            raise RequestError(f"no saved slot file {name!r}", status=404, kind="not_found")
        try:
            header, data = read_state_file(path, served.engine.identity)
        except StateFileError as e:
            raise RequestError(f"{name} cannot be restored here: {e}") from None
        n = served.scheduler.call(lambda e: e.restore_slot(i, header["tokens"], data))
        app.log(f"slot {i}: {n} tokens restored from {name}")
        return JSONResponse({"id_slot": i, "filename": name, "n_restored": n, "n_read": len(data),
                             "timings": {"restore_ms": ms()}})
    raise RequestError("action must be save, restore or erase")


KOBOLD_STATE_SLOTS = 3       # KoboldCpp's admin API keeps this many saved states


def admin_state_slot(app, req) -> tuple[FieldReader, int, ServedModel]:
    if not app.config.admin:
        raise RequestError("the admin API is off: start with --admin", status=403, kind="forbidden")
    f = FieldReader(req.json(optional=True) or {})
    k = f.integer("slot", default=0)
    if not 0 <= k < KOBOLD_STATE_SLOTS:
        raise RequestError(f"'slot' must be 0 to {KOBOLD_STATE_SLOTS - 1}, not {k}")
    return f, k, req.use()


def admin_save_state(app, req):
    """The conversation used last (KoboldCpp has one context) into saved state N, in RAM."""
    f, k, served = admin_state_slot(app, req)

    def save(engine: Engine):
        slot = engine.latest_slot()
        data = engine.pool.state_of(slot) if slot else None
        return (list(slot.cached), data) if data else None
    saved = served.scheduler.call(save)
    if saved is None:
        return JSONResponse({"success": False, "error": "no conversation to save"})
    served.saved_states[k] = saved
    return JSONResponse({"success": True, "new_state_size": len(saved[1]), "new_tokens": len(saved[0])})


def admin_load_state(app, req):
    """Saved state N back into the least recently used idle slot: the next prompt that continues it reads
    only what is new."""
    f, k, served = admin_state_slot(app, req)
    saved = served.saved_states.get(k)
    if saved is None:
        return JSONResponse({"success": False, "error": f"no saved state {k}"})

    def load(engine: Engine):
        idle = [s for s in engine.slots if not s.busy]
        if not idle:
            raise RequestError("every slot is generating: try again when one is done", status=409, kind="conflict")
        return engine.restore_slot(min(idle, key=lambda s: s.last_used).seq_id, *saved)
    n = served.scheduler.call(load)
    return JSONResponse({"success": True, "new_state_size": len(saved[1]), "new_tokens": n})


def admin_check_state(app, req):
    f, k, served = admin_state_slot(app, req)
    return JSONResponse({"success": True, "old_states": [len(served.saved_states[i][0]) if i in served.saved_states
                                                         else 0 for i in range(KOBOLD_STATE_SLOTS)],
                         "new_state_size": len(served.saved_states[k][1]) if k in served.saved_states else 0,
                         "new_tokens": len(served.saved_states[k][0]) if k in served.saved_states else 0})


def admin_clear_state(app, req):
    f, k, served = admin_state_slot(app, req)
    served.saved_states.pop(k, None)
    return JSONResponse({"success": True})


# Coding agents (Claude Code, Codex CLI) speak these. Both are adapters onto the same chat request, template,
# tools and reasoning split as the chat completions above; what differs is how a reply is cut into
# blocks (Anthropic) or output items (Responses) and how those stream.
class ReplyParts:
    """A chat reply read as the block APIs show it: ("reasoning", text) and ("text", text) parts as they
    stream, then the tool calls at the end (a reply that begins like a call is held until it is one)."""

    def __init__(self, job: Job, tools: ToolUse | None):
        self.splitter = ReasoningSplitter.for_prompt(job.request.prompt)
        self.watch = CallWatch(tools)

    def feed(self, piece: str) -> list[tuple[str, str]]:
        reasoning, answer = self.splitter.feed(piece)
        return self._parts(reasoning, self.watch.feed(answer))

    def finish(self) -> list[tuple[str, str]]:
        reasoning, answer = self.splitter.flush()
        return self._parts(reasoning, self.watch.finish(answer))

    @staticmethod
    def _parts(reasoning: str, answer: str) -> list[tuple[str, str]]:
        return [(kind, text) for kind, text in (("reasoning", reasoning), ("text", answer)) if text]

    @property
    def calls(self) -> list[dict]:
        return self.watch.calls


def sse_event(kind: str, data: dict) -> bytes:
    """`event:` and `data:` with the same type, as both APIs (and their SDKs, which drop events without it) want."""
    return (f"event: {kind}\ndata: ".encode() + json.dumps({"type": kind, **data}, ensure_ascii=False).encode()
            + b"\n\n")


def api_key_owner(req) -> str:
    """Whose stored responses a request may see: a digest of the key it offered (none is a key too)."""
    auth = req.headers.get("Authorization", "")
    key = auth[7:].strip() if auth[:7].lower() == "bearer " else req.headers.get("X-Api-Key", "").strip()
    return hashlib.sha256(key.encode()).hexdigest()


def text_only(kind: str, where: str) -> RequestError:
    return RequestError(f"{where} is a{'n' if kind[0] in 'aeiou' else ''} {kind} block: this server's model reads "
                        "text only")


def tool_result_names(messages: list[dict]) -> dict[str, str]:
    """call id -> tool name, for templates that show a tool result's name."""
    return {c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls", ())}


def block_request_fields(req, f: FieldReader, max_length: int | None, ignored: list[str]) -> dict:
    return dict(max_length=max_length, sampler=parse_sampler_settings(f, OPENAI_DEFAULTS), genkey=genkey_of(req),
                ignored_fields=ignored)


ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 405: "invalid_request_error", 411: "invalid_request_error",
                         413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                         503: "overloaded_error", 529: "overloaded_error"}


ANTHROPIC_IGNORED_FIELDS: dict[str, Callable[[Any], bool]] = {
    "metadata": _asks, "service_tier": _asks, "container": _asks, "mcp_servers": _asks,
    "context_management": _asks,
}


ANTHROPIC_PING_SECONDS = 5.0      # a ping while nothing else is sent (a long prompt being read)


def anthropic_text(value: Any, where: str) -> str:
    """A string, or text blocks (others refused); `cache_control` on them needs nothing: prompts are cached anyway."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise RequestError(f"'{where}' must be a string or a list of text blocks")
    texts = []
    for j, block in enumerate(value):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind in ("image", "document", "search_result"):
            raise text_only(kind, f"{where}[{j}]")
        if kind != "text" or not isinstance(block.get("text"), str):
            raise RequestError(f"{where}[{j}] must be a text block ({{\"type\": \"text\", \"text\": ...}})")
        texts.append(block["text"])
    return "\n".join(texts)


def anthropic_messages(body: dict) -> list[dict]:
    """Anthropic's system and messages as the chat template reads them: tool_use blocks become the assistant's
    tool_calls, tool_result blocks tool messages, thinking blocks its reasoning_content."""
    out = [{"role": "system", "content": anthropic_text(body["system"], "system")}] if body.get("system") else []
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant", "system"):     # Claude Code sometimes sends a system turn here
            raise RequestError(f"{where}.role must be 'user' or 'assistant', not {role!r}")
        content = m.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise RequestError(f"{where}.content must be a string or a list of content blocks")
        texts, calls, results, thinking = [], [], [], []
        for j, block in enumerate(blocks):
            at = f"{where}.content[{j}]"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind in ("image", "document", "search_result"):
                raise text_only(kind, at)
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(block.get("name"), str) or not isinstance(block.get("input", {}), dict):
                    raise RequestError(f"{at} must be a tool_use block with a 'name' and an 'input' object")
                calls.append({"id": str(block.get("id") or f"toolu_{secrets.token_hex(12)}"), "type": "function",
                              "function": {"name": block["name"], "arguments": block.get("input") or {}}})
            elif kind == "tool_result" and role == "user":
                if not isinstance(block.get("tool_use_id"), str):
                    raise RequestError(f"{at}.tool_use_id must be a string")
                result = anthropic_text(block.get("content") or "", f"{at}.content")
                results.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                                "content": ("Error: " + result) if block.get("is_error") is True else result})
            elif kind == "thinking" and role == "assistant":
                thinking.append(str(block.get("thinking") or ""))
            elif kind == "redacted_thinking" and role == "assistant":
                continue                       # encrypted by another server: nothing a template could show
            else:
                raise RequestError(f"{at} must be a text, tool_use (assistant), tool_result (user) or thinking "
                                   f"block, not {kind!r}")
        names = tool_result_names(out)
        out += [{**r, "name": names[r["tool_call_id"]]} if r["tool_call_id"] in names else r for r in results]
        if role == "assistant":
            message = {"role": "assistant", "content": "".join(texts)}
            if calls:
                message["tool_calls"] = calls
            if thinking:
                message["reasoning_content"] = "".join(thinking)
            out.append(message)
        elif texts or not results:
            out.append({"role": role, "content": "\n".join(texts)})
    return out


def anthropic_tools(served: ServedModel, f: FieldReader, ignored: list[str]) -> ToolUse | None:
    """Client tools as function tools; server tools (a `type` such as web_search_20250305) are skipped, named."""
    tools = f.body.get("tools") or []
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list of tools")
    functions = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise RequestError(f"tools[{i}] must be a tool with a 'name'")
        if t.get("type") not in (None, "custom"):
            ignored.append(f"tools[{t['type']}]")
            continue
        functions.append({"type": "function", "function": {
            "name": t["name"], "description": t.get("description", ""),
            "parameters": t.get("input_schema") or {"type": "object"}}})
    choice = f.body.get("tool_choice")
    if choice is not None and not (isinstance(choice, dict) and choice.get("type") in ("auto", "any", "tool", "none")):
        raise RequestError("'tool_choice' must be {\"type\": \"auto\"}, {\"type\": \"any\"}, {\"type\": \"none\"} "
                           "or {\"type\": \"tool\", \"name\": ...}")
    if not functions:
        return None
    kind = (choice or {}).get("type", "auto")
    wanted = {"auto": "auto", "any": "required", "none": "none",
              "tool": {"type": "function", "function": {"name": (choice or {}).get("name")}}}[kind]
    return ToolUse(served.chat_template, functions, wanted, not (choice or {}).get("disable_parallel_tool_use"))


def anthropic_thinking_vars(f: FieldReader, ignored: list[str]) -> dict:
    """`thinking` turns a template's thinking on or off (`enable_thinking`); its token budget is not enforced."""
    thinking = f.body.get("thinking")
    if thinking is None:
        return {}
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind not in ("enabled", "disabled", "adaptive"):
        raise RequestError("'thinking' must be {\"type\": \"enabled\", \"budget_tokens\": N} or {\"type\": \"disabled\"}")
    if kind == "enabled" and thinking.get("budget_tokens") is not None:
        ignored.append("thinking.budget_tokens")
    return {"enable_thinking": kind != "disabled"}


def anthropic_request(app, req, count_only: bool = False) -> tuple[GenerationRequest, ToolUse | None, list[str]]:
    """(the generation request, its tools, the client's own stop sequences)."""
    f = FieldReader(req.json())
    served = req.use(f.body.get("model"))
    ignored = ignored_fields(f.body, ANTHROPIC_IGNORED_FIELDS)
    messages = anthropic_messages(f.body)
    if count_only:
        max_tokens = None
    elif not f.has("max_tokens"):
        raise RequestError("'max_tokens' is required")
    else:
        max_tokens = f.integer("max_tokens", default=1, lo=-(1 << 62), hi=1 << 20)
        if max_tokens < 1:
            raise RequestError(f"'max_tokens' must be at least 1, not {max_tokens}")
    fields = block_request_fields(req, f, max_tokens, ignored)
    config = f.body.get("output_config") if isinstance(f.body.get("output_config"), dict) else {}
    fmt = config.get("format") or f.body.get("output_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        fields["sampler"].grammar = json_grammar(fmt.get("schema"), "output_config.format.schema")
    if config.get("effort") is not None:
        ignored.append("output_config.effort")
    template_vars = anthropic_thinking_vars(f, ignored)
    tools = anthropic_tools(served, f, ignored)
    if tools is not None:
        messages, more = tools.apply(messages, fields["sampler"])
        template_vars.update(more)
    stops = f.string_list("stop_sequences")
    request = served.chat_template.generation_request(messages, stop_strings=stops, template_vars=template_vars,
                                                      **fields)
    return request, tools, stops


class AnthropicBlocks:
    """A reply's content blocks, built as its parts arrive, with the stream events that announce them
    (thrown away when the reply is not streamed: both answers are the same blocks)."""

    def __init__(self):
        self.content: list[dict] = []
        self._open: str | None = None

    def part(self, kind: str, text: str) -> bytes:
        block_type = "thinking" if kind == "reasoning" else "text"
        out = b""
        if self._open != block_type:
            out += self.close()
            self._open = block_type
            self.content.append({"type": "thinking", "thinking": "", "signature": ""} if block_type == "thinking"
                                else {"type": "text", "text": ""})
            out += sse_event("content_block_start", {"index": len(self.content) - 1, "content_block": dict(
                self.content[-1])})
        self.content[-1][block_type] += text
        delta = {"type": "thinking_delta", "thinking": text} if block_type == "thinking" else \
            {"type": "text_delta", "text": text}
        return out + sse_event("content_block_delta", {"index": len(self.content) - 1, "delta": delta})

    def close(self) -> bytes:
        if self._open is None:
            return b""
        index = len(self.content) - 1
        out = sse_event("content_block_delta", {"index": index, "delta": {"type": "signature_delta", "signature": ""}}) \
            if self._open == "thinking" else b""
        self._open = None
        return out + sse_event("content_block_stop", {"index": index})

    def tool_use(self, call: dict) -> bytes:
        out = self.close()
        block = {"type": "tool_use", "id": f"toolu_{secrets.token_hex(12)}", "name": call["name"], "input": {}}
        self.content.append({**block, "input": call["arguments"]})
        index = len(self.content) - 1
        return out + sse_event("content_block_start", {"index": index, "content_block": block}) + sse_event(
            "content_block_delta", {"index": index, "delta": {
                "type": "input_json_delta", "partial_json": json.dumps(call["arguments"], ensure_ascii=False)}}) + \
            sse_event("content_block_stop", {"index": index})

    def finish(self, parts: ReplyParts) -> bytes:
        out = b"".join(self.part(kind, text) for kind, text in parts.finish()) + self.close()
        return out + b"".join(self.tool_use(call) for call in parts.calls)


def anthropic_stop(job: Job, parts: ReplyParts, stops: list[str]) -> dict:
    if parts.calls:
        return {"stop_reason": "tool_use", "stop_sequence": None}
    if job.buffer.finish_reason == "length":
        return {"stop_reason": "max_tokens", "stop_sequence": None}
    if job.stats.stop_string is not None and job.stats.stop_string in stops:
        return {"stop_reason": "stop_sequence", "stop_sequence": job.stats.stop_string}
    return {"stop_reason": "end_turn", "stop_sequence": None}


def anthropic_usage(job: Job) -> dict:
    """Anthropic counts prompt tokens the cache held apart: input_tokens + cache_read_input_tokens is the prompt."""
    s = job.stats
    return {"input_tokens": s.prompt_tokens - s.cached_tokens, "output_tokens": s.generated_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": s.cached_tokens}


def anthropic_start(req, request: GenerationRequest) -> Job:
    try:
        return req.start_generation(request)
    except RequestError as e:
        if e.kind == "exceed_context_size_error":   # Claude Code reads these words to compact its conversation
            raise RequestError(f"prompt is too long: {e.extra['n_prompt_tokens']} tokens > {e.extra['n_ctx']} "
                               f"maximum") from None
        raise


def anthropic_messages_route(app, req):
    request, tools, stops = anthropic_request(app, req)
    job = anthropic_start(req, request)
    head = {"id": f"msg_{secrets.token_hex(12)}", "type": "message", "role": "assistant", "model": req.use().name}
    parts, blocks = ReplyParts(job, tools), AnthropicBlocks()
    if FieldReader(req.json()).boolean("stream"):
        def events() -> Iterator[bytes]:
            yield sse_event("message_start", {"message": {
                **head, "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": len(job.prompt_tokens), "output_tokens": 0,
                          "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}}) + sse_event("ping", {})
            index = 0
            while True:
                new, done = job.buffer.read(index, timeout=ANTHROPIC_PING_SECONDS)
                index += len(new)
                if not new and not done:
                    yield sse_event("ping", {})
                    continue
                out = b"".join(blocks.part(kind, text) for piece in new for kind, text in parts.feed(piece))
                if out:
                    yield out
                if done and not new:
                    break
            if job.buffer.finish_reason == "error":
                yield blocks.close() + sse_event("error", {"error": {
                    "type": "api_error", "message": job.buffer.error or "generation failed"}})
                return
            yield blocks.finish(parts) + sse_event("message_delta", {
                "delta": anthropic_stop(job, parts, stops), "usage": anthropic_usage(job)}) + sse_event("message_stop", {})
        return StreamResponse("text/event-stream", events(), job)
    text = wait_for_text(job)
    for kind, part in parts.feed(text):
        blocks.part(kind, part)
    blocks.finish(parts)
    return JSONResponse({**head, "content": blocks.content, **anthropic_stop(job, parts, stops),
                         "usage": anthropic_usage(job)})


def anthropic_count_tokens(app, req):
    request, _, _ = anthropic_request(app, req, count_only=True)
    req.ignored = request.ignored_fields
    return JSONResponse({"input_tokens": req.use().engine.count_prompt_tokens(request)})


RESPONSES_IGNORED_FIELDS: dict[str, Callable[[Any], bool]] = {
    "include": _asks, "prompt_cache_key": _asks, "client_metadata": _asks, "service_tier": _asks,
    "safety_identifier": _asks, "user": _asks, "truncation": lambda v: v == "auto", "background": _asks,
    "top_logprobs": _asks, "prompt": _asks, "max_tool_calls": _asks, "conversation": _asks, "stream_options": _asks,
}


def response_not_found(response_id: str) -> RequestError:
    return RequestError(f"no response with id {response_id!r} is stored here (it was never stored, was deleted, was "
                        f"made with another key, or was evicted: at most {ResponseStore.MAX_ITEMS} are kept)",
                        status=404, kind="invalid_request_error", code="not_found")


def responses_text(value: Any, where: str) -> str:
    """Message content: a string, or parts (input_text, output_text...); images and files refused."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise RequestError(f"'{where}' must be a string or a list of content parts")
    texts = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "summary_text", "reasoning_text") \
                and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        elif kind in ("input_image", "input_file", "input_audio"):
            raise text_only(kind.replace("input_", ""), f"{where}[{j}]")
        else:
            raise RequestError(f"{where}[{j}] must be an input_text or output_text part, not {kind!r}")
    return "".join(texts)


def responses_messages(value: Any, ignored: list[str], earlier: list[dict] = ()) -> list[dict]:
    """`input` (a string or items) as chat messages: function_call items become the assistant's tool_calls,
    function_call_output items tool messages, reasoning items the next assistant turn's reasoning_content."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise RequestError("'input' must be a string or a list of input items")
    out: list[dict] = []
    reasoning: list[str] = []
    names = tool_result_names(list(earlier))
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise RequestError(f"{where} must be an object")
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise RequestError(f"{where}.role must be user, assistant, system or developer, not {role!r}")
            message = {"role": "system" if role == "developer" else role,
                       "content": responses_text(item.get("content"), f"{where}.content")}
            if role == "assistant" and reasoning:
                message["reasoning_content"], reasoning = "".join(reasoning), []
            out.append(message)
        elif kind == "function_call":
            if not isinstance(item.get("name"), str) or not isinstance(item.get("call_id"), str):
                raise RequestError(f"{where} must be a function_call with a 'name' and a 'call_id'")
            call = tool_call_of({"id": item["call_id"], "function": {"name": item["name"],
                                                                       "arguments": item.get("arguments") or "{}"}},
                                where)
            names[item["call_id"]] = item["name"]
            if out and out[-1]["role"] == "assistant":     # the calls of one turn follow its text
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
            if reasoning:
                out[-1]["reasoning_content"], reasoning = "".join(reasoning), []
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise RequestError(f"{where}.call_id must be a string")
            message = {"role": "tool", "tool_call_id": item["call_id"],
                       "content": responses_text(item.get("output") if item.get("output") is not None else "",
                                                 f"{where}.output")}
            if item["call_id"] in names:
                message["name"] = names[item["call_id"]]
            out.append(message)
        elif kind == "reasoning":
            reasoning.append(responses_text(item.get("content") or item.get("summary") or [], f"{where}.content"))
        elif kind == "item_reference":
            raise RequestError(f"{where}: item references are not served; send the items, or previous_response_id")
        else:
            ignored.append(f"input[{kind}]")      # another tool's call or output (local_shell_call...): not run here
    return out


def responses_tools(served: ServedModel, f: FieldReader, ignored: list[str]) -> ToolUse | None:
    """Flat function tools; the kinds this server cannot run (web_search, file_search, local_shell, custom, mcp,
    a namespace group...) are skipped and named, since Codex sends them on every request."""
    tools = f.body.get("tools") or []
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list of tools")
    functions = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise RequestError(f"tools[{i}] must be an object")
        if t.get("type") != "function":
            ignored.append(f"tools[{t.get('type')}]")
            continue
        if not isinstance(t.get("name"), str):
            raise RequestError(f"tools[{i}].name must be a string")
        functions.append({"type": "function", "function": {
            "name": t["name"], "description": t.get("description") or "",
            "parameters": t.get("parameters") or {"type": "object"}}})
    choice = f.body.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") == "function" and isinstance(choice.get("name"), str):
            choice = {"type": "function", "function": {"name": choice["name"]}}
        else:
            ignored.append("tool_choice")        # allowed_tools, or a tool kind not served: the model chooses
            choice = "auto"
    if not functions:
        return None
    return ToolUse(served.chat_template, functions, choice, f.body.get("parallel_tool_calls") is not False)


class ResponseItems:
    """A reply's output items (reasoning, message, function calls), built as its parts arrive, with the
    stream events that announce them, each numbered (thrown away when the reply is not streamed)."""

    def __init__(self):
        self.output: list[dict] = []
        self.sequence = 0
        self._open: str | None = None

    def event(self, kind: str, **data) -> bytes:
        out = sse_event(kind, {"sequence_number": self.sequence, **data})
        self.sequence += 1
        return out

    def _add(self, item: dict, part: dict | None) -> bytes:
        self.output.append(item)
        index = len(self.output) - 1
        out = self.event("response.output_item.added", output_index=index,
                         item={**item, "status": "in_progress", "content": []} if part else dict(item))
        if part is not None:
            item["content"] = [part]
            out += self.event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                              part=dict(part))
        return out

    def part(self, kind: str, text: str) -> bytes:
        item_type = "reasoning" if kind == "reasoning" else "message"
        out = b""
        if self._open != item_type:
            out += self.close()
            self._open = item_type
            if item_type == "reasoning":
                out += self._add({"type": "reasoning", "id": f"rs_{secrets.token_hex(12)}", "summary": [],
                                  "status": "in_progress"}, {"type": "reasoning_text", "text": ""})
            else:
                out += self._add({"type": "message", "id": f"msg_{secrets.token_hex(12)}", "role": "assistant",
                                  "status": "in_progress"}, {"type": "output_text", "text": "", "annotations": [],
                                                             "logprobs": []})
        item = self.output[-1]
        item["content"][0]["text"] += text
        where = dict(item_id=item["id"], output_index=len(self.output) - 1, content_index=0)
        if item_type == "reasoning":
            return out + self.event("response.reasoning_text.delta", **where, delta=text)
        return out + self.event("response.output_text.delta", **where, delta=text, logprobs=[])

    def close(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        item = self.output[-1]
        item["status"] = "completed"
        part = item["content"][0]
        where = dict(item_id=item["id"], output_index=len(self.output) - 1, content_index=0)
        done = "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
        return (self.event(done, **where, text=part["text"], **({} if item["type"] == "reasoning" else {"logprobs": []}))
                + self.event("response.content_part.done", **where, part=dict(part))
                + self.event("response.output_item.done", output_index=len(self.output) - 1, item=dict(item)))

    def function_call(self, call: dict) -> bytes:
        out = self.close()
        arguments = json.dumps(call["arguments"], ensure_ascii=False)
        item = {"type": "function_call", "id": f"fc_{secrets.token_hex(12)}", "call_id": f"call_{secrets.token_hex(12)}",
                "name": call["name"], "arguments": "", "status": "in_progress"}
        out += self._add(item, None)
        index = len(self.output) - 1
        out += self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                          delta=arguments)
        item.update(arguments=arguments, status="completed")
        return out + self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                name=item["name"], arguments=arguments) + \
            self.event("response.output_item.done", output_index=index, item=dict(item))

    def finish(self, parts: ReplyParts) -> bytes:
        out = b"".join(self.part(kind, text) for kind, text in parts.finish()) + self.close()
        return out + b"".join(self.function_call(call) for call in parts.calls)

    def as_message(self) -> dict:
        """The reply as the assistant turn of a stored conversation."""
        message = {"role": "assistant", "content": "".join(
            i["content"][0]["text"] for i in self.output if i["type"] == "message")}
        reasoning = "".join(i["content"][0]["text"] for i in self.output if i["type"] == "reasoning")
        if reasoning:
            message["reasoning_content"] = reasoning
        calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"],
                                                                       "arguments": json.loads(i["arguments"])}}
                 for i in self.output if i["type"] == "function_call"]
        if calls:
            message["tool_calls"] = calls
        return message


class ResponsesCall:
    """One /v1/responses request: its conversation (the stored one it continues, then its input), the
    generation request made of it, and the response object it answers with."""

    def __init__(self, app, req, count_only: bool = False):
        self.app = app
        f = self.f = FieldReader(req.json())
        self.ignored = ignored_fields(f.body, RESPONSES_IGNORED_FIELDS)
        self.owner = api_key_owner(req)
        self.previous_id = f.string("previous_response_id") or None
        earlier: list[dict] = []
        if self.previous_id is not None:
            stored = app.responses.get(self.owner, self.previous_id)
            if stored is None:
                raise response_not_found(self.previous_id)
            earlier = stored[1]
        if f.body.get("input") is None and not earlier:
            raise RequestError("'input' is required")
        self.conversation = earlier + responses_messages(f.body.get("input") or [], self.ignored, earlier)
        instructions = f.string("instructions")
        messages = ([{"role": "system", "content": instructions}] if instructions else []) + self.conversation
        if not messages:
            raise RequestError("'input' must hold at least one item")
        max_output = None if count_only else f.body.get("max_output_tokens")
        if max_output is not None:
            max_output = f.integer("max_output_tokens", default=1, lo=-(1 << 62), hi=1 << 20)
            if max_output < 1:
                raise RequestError(f"'max_output_tokens' must be at least 1, not {max_output}")
        fields = block_request_fields(req, f, max_output, self.ignored)
        self.sampler = fields["sampler"]
        self.format = self._text_format(f)
        template_vars = self._reasoning_vars(f)
        self.served = served = req.use(f.body.get("model"))
        self.tools = responses_tools(served, f, self.ignored)
        if self.tools is not None:
            messages, more = self.tools.apply(messages, self.sampler)
            template_vars.update(more)
        self.request = served.chat_template.generation_request(messages, template_vars=template_vars, **fields)
        self.id = f"resp_{secrets.token_hex(16)}"
        self.created = int(time.time())
        self.store = f.body.get("store") is not False

    def _text_format(self, f: FieldReader) -> dict:
        text = f.body.get("text")
        if text is None:
            return {"type": "text"}
        fmt = text.get("format") if isinstance(text, dict) else None
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if isinstance(text, dict) and text.get("verbosity") is not None:
            self.ignored.append("text.verbosity")
        if fmt is None:
            return {"type": "text"}
        if kind == "json_object":
            self.sampler.grammar = json_grammar(True, "text.format")
        elif kind == "json_schema":
            self.sampler.grammar = json_grammar(fmt.get("schema"), "text.format.schema")
        elif kind != "text":
            raise RequestError("'text.format.type' must be 'text', 'json_object' or 'json_schema'")
        return fmt

    def _reasoning_vars(self, f: FieldReader) -> dict:
        """`reasoning.effort` "none" turns a template's thinking off (`enable_thinking`), any other on."""
        reasoning = f.body.get("reasoning")
        if not isinstance(reasoning, dict):
            return {}
        if reasoning.get("summary") is not None:
            self.ignored.append("reasoning.summary")     # the reasoning itself is given, not a summary
        effort = reasoning.get("effort")
        return {} if effort is None else {"enable_thinking": effort != "none"}

    def response(self, status: str, items: ResponseItems, job: Job | None = None, error: dict | None = None) -> dict:
        usage = None
        if job is not None and status != "in_progress":
            s = job.stats
            reasoning = "".join(i["content"][0]["text"] for i in items.output if i["type"] == "reasoning")
            usage = {"input_tokens": s.prompt_tokens, "input_tokens_details": {"cached_tokens": s.cached_tokens},
                     "output_tokens": s.generated_tokens, "output_tokens_details": {
                         "reasoning_tokens": len(self.served.model.tokenize(reasoning)) if reasoning else 0},
                     "total_tokens": s.prompt_tokens + s.generated_tokens}
        f = self.f
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "background": False, "error": error,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": f.body.get("instructions"), "max_output_tokens": f.body.get("max_output_tokens"),
                "model": self.served.name, "output": [dict(i) for i in items.output] if status != "in_progress"
                else [], "parallel_tool_calls": f.body.get("parallel_tool_calls") is not False,
                "previous_response_id": self.previous_id,
                "reasoning": {"effort": (f.body.get("reasoning") or {}).get("effort"), "summary": None},
                "store": self.store, "temperature": self.sampler.temperature, "top_p": self.sampler.top_p,
                "text": {"format": self.format}, "tool_choice": f.body.get("tool_choice") or "auto",
                "tools": [{"type": "function", **t["function"]} for t in self.tools.tools] if self.tools else [],
                "truncation": "disabled", "usage": usage, "metadata": f.body.get("metadata") or {}}

    def status_of(self, job: Job) -> str:
        if job.buffer.finish_reason == "error":
            return "failed"
        return "incomplete" if job.buffer.finish_reason == "length" else "completed"

    def keep(self, response: dict, items: ResponseItems):
        if self.store and response["status"] != "failed":
            self.app.responses.put(self.owner, response, self.conversation + [items.as_message()])


def responses_create(app, req):
    call = ResponsesCall(app, req)
    job = req.start_generation(call.request)
    parts, items = ReplyParts(job, call.tools), ResponseItems()
    if call.f.boolean("stream"):
        def events() -> Iterator[bytes]:
            yield items.event("response.created", response=call.response("in_progress", items)) + \
                items.event("response.in_progress", response=call.response("in_progress", items))
            for batch in job.buffer.batches():
                out = b"".join(items.part(kind, text) for piece in batch for kind, text in parts.feed(piece))
                if out:
                    yield out
            status = call.status_of(job)
            if status == "failed":
                response = call.response("failed", items, job, {"code": "server_error",
                                                                "message": job.buffer.error or "generation failed"})
                yield items.close() + items.event("response.failed", response=response)
                return
            out = items.finish(parts)
            response = call.response(status, items, job)
            call.keep(response, items)
            yield out + items.event(f"response.{status}", response=response)
        return StreamResponse("text/event-stream", events(), job)
    text = wait_for_text(job)
    for kind, part in parts.feed(text):
        items.part(kind, part)
    items.finish(parts)
    response = call.response(call.status_of(job), items, job)
    call.keep(response, items)
    return JSONResponse(response)


def responses_input_tokens(app, req):
    call = ResponsesCall(app, req, count_only=True)
    req.ignored = call.ignored
    return JSONResponse({"object": "response.input_tokens", "input_tokens": call.served.engine.count_prompt_tokens(call.request)})


def responses_by_id(app, req):
    """GET or DELETE /v1/responses/{id}: only the key that stored it reaches it."""
    response_id = req.path.rsplit("/", 1)[1]
    owner = api_key_owner(req)
    if req.method == "DELETE":
        if not app.responses.delete(owner, response_id):
            raise response_not_found(response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})
    stored = app.responses.get(owner, response_id)
    if stored is None:
        raise response_not_found(response_id)
    return JSONResponse(stored[0])


def embedding_inputs(f: FieldReader, *names: str) -> list[str]:
    value = f.value(*names)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value) and len(value) <= 2048:
        return value
    raise RequestError(f"'{names[0]}' must be a string or a non-empty list of strings")


# Embedding fields we know and do not act on: the vector's size is the model's, input longer than the
# embedding context is always cut.
OPENAI_EMBEDDING_IGNORED = {"dimensions": _asks}


OLLAMA_EMBEDDING_IGNORED = {"dimensions": _asks, "truncate": lambda v: v is False, "options": _asks}


def embedder_for(req, f: FieldReader) -> tuple[Embedder, str]:
    """The embedding context a request uses, and the name its answer gives: --embeddings-model's whatever
    the request names, else the named model's own."""
    app = req.app
    if app.embeddings_source is not None:
        return app.embedder(None), app.embeddings_source.name
    served = req.use(f.body.get("model"))
    return app.embedder(served), served.name


def openai_embeddings(app, req):
    """OpenAI's shape; base64 when asked, as the official client asks by default."""
    import base64
    import numpy
    f = FieldReader(req.json())
    req.ignored = ignored_fields(f.body, OPENAI_EMBEDDING_IGNORED)
    embedder, name = embedder_for(req, f)
    vectors, n_tokens = embedder.embed(embedding_inputs(f, "input", "content"))
    as_base64 = f.string("encoding_format", default="float") == "base64"
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(numpy.asarray(v, dtype="<f4").tobytes()).decode() if as_base64 else v}
            for i, v in enumerate(vectors)]
    return JSONResponse({"object": "list", "data": data, "model": name,
                         "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})


def ollama_embed(app, req):
    f = FieldReader(req.json())
    req.ignored = ignored_fields(f.body, OLLAMA_EMBEDDING_IGNORED)
    req.keep_alive = keep_alive_of(f)
    start = time.monotonic()
    embedder, name = embedder_for(req, f)
    vectors, n_tokens = embedder.embed(embedding_inputs(f, "input"))
    return JSONResponse({"model": name, "embeddings": vectors,
                         "total_duration": int((time.monotonic() - start) * 1e9), "load_duration": 0,
                         "prompt_eval_count": n_tokens})


def ollama_embeddings_legacy(app, req):
    """Ollama's older endpoint: one prompt, one vector."""
    f = FieldReader(req.json())
    req.ignored = ignored_fields(f.body, OLLAMA_EMBEDDING_IGNORED)
    vectors, _ = embedder_for(req, f)[0].embed([f.string("prompt")])
    return JSONResponse({"embedding": vectors[0]})


def health(app, req):
    """Ready for new work: 503 while loading or when the queue is full (a balancer sends work elsewhere)."""
    if not app.ready.is_set():
        return JSONResponse({"status": "loading model"}, 503)
    served = app.roster.current()
    if served is not None and served.scheduler.saturated:
        return JSONResponse({"status": "busy"}, 503)
    return JSONResponse({"status": "ok"})


def health_live(app, req):
    """Alive and loaded, busy or not: a balancer's genkey routing must still reach running generations."""
    if not app.ready.is_set():
        return JSONResponse({"status": "loading model"}, 503)
    return JSONResponse({"status": "ok"})


def props(app, req):
    """llama-server's: of the default model, or of ?model=NAME as its router mode takes it."""
    served = req.use(req.query.get("model"))
    d = OPENAI_DEFAULTS
    return JSONResponse({
        "default_generation_settings": {
            "n_ctx": served.model.n_ctx, "temperature": d.temperature, "top_k": d.top_k, "top_p": d.top_p,
            "min_p": d.min_p, "repeat_penalty": d.rep_pen, "repeat_last_n": d.rep_pen_range,
            "n_predict": -1, "seed": -1},
        "total_slots": len(served.engine.slots),
        "memory": served.model.memory_report(),
        "gpu": gpu_report(served),
        "chat_template": served.chat_template.source,
        "bos_token": served.chat_template.bos_text, "eos_token": served.chat_template.eos_text,
        "model_alias": served.name,
        "model_path": os.path.basename(served.entry.path),
        "models": model_states(app),
        "build_info": f"koboldlite-{__version__}",
    })


def tokenize(app, req):
    f = FieldReader(req.json())
    content = f.string("content", "prompt")
    model = req.use(f.body.get("model")).model
    ids = model.tokenize(content, add_bos=f.boolean("add_special", default=False),
                         parse_special=f.boolean("parse_special", default=True))
    if f.boolean("with_pieces"):
        return JSONResponse({"tokens": [{"id": t, "piece": text_or_bytes(model.piece(t, special=True))}
                                        for t in ids]})
    return JSONResponse({"tokens": ids})


def text_or_bytes(data: bytes) -> str | list[int]:
    """A token's piece as text when it is whole UTF-8, else its bytes (part of a character)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return list(data)


def detokenize(app, req):
    f = FieldReader(req.json())
    ids = f.token_ids("tokens")
    model = req.use(f.body.get("model")).model
    bad = [t for t in ids if not model.valid_token(t)]
    if bad:
        raise RequestError(f"'tokens' holds ids outside the vocabulary (0..{model.n_vocab - 1}): {bad[0]}")
    # Special tokens are shown as their text, so that /tokenize (which parses them) and this round-trip.
    return JSONResponse({"content": model.detokenize(ids, special=True)})


def apply_template(app, req):
    """The prompt a chat request's messages become (llama-server's /apply-template)."""
    f = FieldReader(req.json())
    template = req.use(f.body.get("model")).chat_template
    return JSONResponse({"prompt": template.render(parse_chat_messages(f.body.get("messages")))})


def metrics(app, req):
    totals = app.totals
    loaded = app.roster.any_loaded()
    rows = [
        ("requests_total", "counter", "Generations finished.", totals["requests"]),
        ("prompt_tokens_total", "counter", "Prompt tokens evaluated (cached ones excluded).",
         totals["prompt_tokens"]),
        ("prompt_seconds_total", "counter", "Seconds spent evaluating prompts.", totals["prompt_seconds"]),
        ("tokens_predicted_total", "counter", "Tokens generated.", totals["generated_tokens"]),
        ("tokens_predicted_seconds_total", "counter", "Seconds spent generating.", totals["generation_seconds"]),
        ("requests_aborted_total", "counter", "Generations aborted or dropped by their client.",
         totals["finished_abort"]),
        ("requests_failed_total", "counter", "Generations that failed.", totals["finished_error"]),
        ("queue_depth", "gauge", "Requests waiting for a slot.", sum(m.scheduler.waiting for m in loaded)),
        ("slots_busy", "gauge", "Slots generating now.", sum(m.scheduler.active for m in loaded)),
        ("slots_total", "gauge", "Slots (--parallel) of the loaded models.", sum(len(m.engine.slots) for m in loaded)),
        ("busy", "gauge", "1 while any generation runs or waits.", int(any(not m.scheduler.idle for m in loaded))),
        ("models_loaded", "gauge", "Models loaded now.", len(loaded)),
        ("uptime_seconds", "gauge", "Seconds since start.", time.monotonic() - app.started),
    ]
    out = []
    for name, kind, help_text, value in rows:
        out += [f"# HELP koboldlite_{name} {help_text}", f"# TYPE koboldlite_{name} {kind}",
                f"koboldlite_{name} {value:g}" if isinstance(value, float) else f"koboldlite_{name} {value}"]
    return Response(200, ("\n".join(out) + "\n").encode(), "text/plain; version=0.0.4")


@dataclasses.dataclass
class Route:
    handler: Callable[[App, "Request"], Response]
    protected: bool = False     # needs the password when one is set
    style: str = "kobold"       # error body shape
    needs_model: bool = True
    admin: bool = False         # KoboldCpp's admin API: --adminpassword, when set, instead of --password


class StaticFiles:
    """The files of embedded_ui/, read once at start. Only these exact paths are ever served,
    so no request path (`..`, encoded dots, absolute paths) can reach any other file."""

    TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
             ".js": "text/javascript; charset=utf-8", ".json": "application/json", ".svg": "image/svg+xml",
             ".png": "image/png", ".ico": "image/x-icon", ".webmanifest": "application/manifest+json"}
    COMPRESSIBLE = (".html", ".css", ".js", ".json", ".svg", ".webmanifest")
    HEADERS = {"Cache-Control": "no-cache", "Vary": "Accept-Encoding", "X-Content-Type-Options": "nosniff",
               "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                                          "base-uri 'none'; frame-ancestors 'none'"}

    def __init__(self, directory: str):
        self.files: dict[str, tuple[bytes, bytes | None, str, str]] = {}
        for root, _, names in os.walk(directory):
            for name in sorted(names):
                full = os.path.join(root, name)
                url = "/" + os.path.relpath(full, directory).replace(os.sep, "/")
                with open(full, "rb") as f:
                    data = f.read()
                ext = os.path.splitext(name)[1].lower()
                packed = gzip.compress(data, 9, mtime=0) if ext in self.COMPRESSIBLE else None
                etag = '"' + hashlib.sha256(data).hexdigest()[:20] + '"'
                self.files[url] = (data, packed, self.TYPES.get(ext, "application/octet-stream"), etag)
        if "/index.html" in self.files:
            self.files["/"] = self.files["/index.html"]
        if "/favicon.svg" in self.files:
            self.files["/favicon.ico"] = self.files["/favicon.svg"]   # asked for by browsers and clients anyway

    def route(self, path: str) -> "Route | None":
        return Route(self.serve, needs_model=False) if path in self.files else None

    def serve(self, app, req) -> Response:
        data, packed, content_type, etag = self.files[req.path]
        headers = {**self.HEADERS, "ETag": etag}
        if req.headers.get("If-None-Match") == etag:
            return Response(304, b"", content_type, headers)
        if packed is not None and "gzip" in req.headers.get("Accept-Encoding", ""):
            return Response(200, packed, content_type, {**headers, "Content-Encoding": "gzip"})
        return Response(200, data, content_type, headers)


UI_DIR = os.path.join(program_folder(), "embedded_ui")


class Router:
    """Exact paths to routes, per method; /api/latest/... is /api/v1/...; then, for GET, the fallback (the built-in
    page's files)."""

    def __init__(self, fallback: Callable[[str], "Route | None"] | None = None):
        self._routes: dict[tuple[str, str], Route] = {}
        self._prefixes: list[tuple[str, str, Route]] = []     # (method, prefix, route): /v1/responses/{id}
        self.fallback = fallback

    def add(self, methods: str, paths: str, handler, **kw):
        route = Route(handler, **kw)
        for path in paths.split():
            for method in methods.split():
                self._routes[(method, path)] = route

    def add_prefix(self, methods: str, prefixes: str, handler, **kw):
        """Paths that are the prefix and one more segment (an id), after the exact paths."""
        route = Route(handler, **kw)
        self._prefixes += [(method, prefix, route) for prefix in prefixes.split() for method in methods.split()]

    def match(self, method: str, path: str) -> Route:
        if path.startswith("/api/latest/"):
            path = "/api/v1/" + path[len("/api/latest/"):]
        route = self._routes.get((method, path))
        if route is None:
            route = next((r for m, prefix, r in self._prefixes if m == method and path.startswith(prefix)
                          and "/" not in path[len(prefix):] and path[len(prefix):]), None)
        if route is None and method == "GET" and self.fallback is not None:
            route = self.fallback(path)
        if route is None:
            if any(p == path for _, p in self._routes) or any(
                    path.startswith(prefix) and "/" not in path[len(prefix):] for _, prefix, _ in self._prefixes):
                raise RequestError(f"{method} is not allowed on {path}", status=405, kind="method_not_allowed")
            raise RequestError(f"no such endpoint: {path}", status=404, kind="not_found")
        return route


def build_router(static: StaticFiles | None = None) -> Router:
    r = Router(static.route if static is not None else None)
    r.add("GET", "/api/v1/model", kobold_model)
    r.add("GET", "/api/v1/info/version", kobold_info_version)
    r.add("GET", "/api/v1/config/max_length", kobold_max_length)
    r.add("GET", "/api/v1/config/max_context_length", kobold_max_context_length)
    r.add("POST", "/api/v1/generate", kobold_generate, protected=True)
    r.add("GET", "/api/extra/version", kobold_extra_version, needs_model=False)
    r.add("GET", "/api/extra/true_max_context_length", kobold_true_max_context_length)
    r.add("POST", "/api/extra/generate/stream", kobold_generate_stream, protected=True)
    r.add("GET POST", "/api/extra/generate/check", kobold_check, protected=True)
    r.add("POST", "/api/extra/abort", kobold_abort, protected=True)
    r.add("POST", "/api/extra/last_logprobs", kobold_last_logprobs, protected=True)
    r.add("POST", "/api/extra/embeddings", openai_embeddings, protected=True)       # KoboldCpp: OpenAI's shape
    r.add("POST", "/api/extra/tokencount /api/extra/tokenize", kobold_tokencount, protected=True)
    r.add("POST", "/api/extra/detokenize", kobold_detokenize, protected=True)
    r.add("POST", "/api/extra/json_to_grammar", kobold_json_to_grammar, protected=True)
    r.add("GET", "/sdapi/v1/sd-models", sd_models)
    r.add("GET", "/api/extra/perf", kobold_perf)
    r.add("GET", "/api/admin/list_options", admin_list_options, protected=True, admin=True)
    r.add("POST", "/api/admin/reload_config", admin_reload_config, protected=True, admin=True, needs_model=False)
    r.add("POST", "/api/admin/save_state", admin_save_state, protected=True, admin=True)
    r.add("POST", "/api/admin/load_state", admin_load_state, protected=True, admin=True)
    r.add("GET POST", "/api/admin/check_state", admin_check_state, protected=True, admin=True)
    r.add("POST", "/api/admin/clear_state", admin_clear_state, protected=True, admin=True)          # open, as KoboldCpp's: counts and timings, no text
    # Open, as KoboldCpp's: KoboldAI Lite reads it before it asks for the password.
    r.add("GET", "/api/extra/preloadstory", kobold_preloadstory)

    r.add("GET", "/v1/models /models", openai_models, style="openai")
    r.add("POST", "/v1/completions /completions", openai_completions, protected=True, style="openai")
    r.add("POST", "/v1/chat/completions /chat/completions", openai_chat_completions, protected=True,
          style="openai")
    r.add("POST", "/v1/embeddings /embeddings", openai_embeddings, protected=True, style="openai")
    r.add("POST", "/v1/responses /responses", responses_create, protected=True, style="openai")
    r.add("POST", "/v1/responses/input_tokens /responses/input_tokens", responses_input_tokens, protected=True,
          style="openai")
    r.add_prefix("GET DELETE", "/v1/responses/ /responses/", responses_by_id, protected=True, style="openai")

    r.add("POST", "/v1/messages /messages", anthropic_messages_route, protected=True, style="anthropic")
    r.add("POST", "/v1/messages/count_tokens /messages/count_tokens", anthropic_count_tokens, protected=True,
          style="anthropic")

    r.add("GET", "/api/tags", ollama_tags, style="ollama")     # open, as llama-server's: clients list models first
    r.add("GET", "/api/ps", ollama_ps, protected=True, style="ollama")
    r.add("GET", "/api/version", ollama_version, style="ollama", needs_model=False)
    r.add("POST", "/api/show", ollama_show, protected=True, style="ollama")
    r.add("POST", "/api/generate", ollama_generate, protected=True, style="ollama")
    r.add("POST", "/api/chat", ollama_chat, protected=True, style="ollama")
    r.add("POST", "/api/embed", ollama_embed, protected=True, style="ollama")
    r.add("POST", "/api/embeddings", ollama_embeddings_legacy, protected=True, style="ollama")
    r.add("POST", "/api/pull", ollama_pull, protected=True, style="ollama", needs_model=False)
    r.add("DELETE", "/api/delete", ollama_delete, protected=True, style="ollama")

    r.add("GET", "/health", health, needs_model=False, style="openai")
    r.add("GET", "/health/live", health_live, needs_model=False, style="openai")
    r.add("GET", "/props", props, protected=True, style="openai")
    r.add("POST", "/tokenize", tokenize, protected=True, style="openai")
    r.add("POST", "/detokenize", detokenize, protected=True, style="openai")
    r.add("POST", "/apply-template", apply_template, protected=True, style="openai")
    r.add("GET", "/metrics", metrics, protected=True, style="openai")
    r.add("POST", "/models/load", router_load, protected=True, style="openai")
    r.add("GET", "/slots", slots_list, protected=True, style="openai")
    r.add_prefix("POST", "/slots/", slots_action, protected=True, style="openai")
    r.add("POST", "/models/unload", router_unload, protected=True, style="openai")
    return r


class HangupWatcher:
    """One thread that notices when the client of a running generation hangs up.

    It waits in epoll for peer hang-ups (EPOLLRDHUP) on the sockets of
    in-flight generations and cancels their jobs at once, so a client that
    leaves never keeps the model busy. Where epoll is missing it watches for
    readability and peeks for end-of-file instead.
    """

    def __init__(self, use_epoll: bool | None = None):
        self._lock = threading.Lock()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._use_epoll = hasattr(select, "epoll") if use_epoll is None else use_epoll
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        if self._use_epoll:
            self._epoll = select.epoll()
            self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        self._socks: dict[int, socket.socket] = {}
        threading.Thread(target=self._run, name="hangup-watcher", daemon=True).start()

    def watch(self, sock: socket.socket, on_hangup: Callable[[], None]):
        fd = sock.fileno()
        with self._lock:
            self._callbacks[fd] = on_hangup
            self._socks[fd] = sock
            if self._use_epoll:
                self._epoll.register(fd, select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR)
        if not self._use_epoll:
            self._wake_w.send(b"x")

    def unwatch(self, sock: socket.socket):
        fd = sock.fileno()
        with self._lock:
            if self._callbacks.pop(fd, None) is not None:
                self._socks.pop(fd, None)
                if self._use_epoll:
                    try:
                        self._epoll.unregister(fd)
                    except OSError:
                        pass

    def _fire(self, fd: int):
        with self._lock:
            callback = self._callbacks.pop(fd, None)
            self._socks.pop(fd, None)
            if callback is not None and self._use_epoll:
                try:
                    self._epoll.unregister(fd)
                except OSError:
                    pass
        if callback is not None:
            callback()

    def _run(self):
        while True:
            if self._use_epoll:
                events = self._epoll.poll()
                for fd, _ in events:
                    if fd == self._wake_r.fileno():
                        continue
                    self._fire(fd)
            else:
                with self._lock:
                    socks = list(self._socks.items())
                readable, _, _ = select.select([self._wake_r] + [s for _, s in socks], [], [])
                for s in readable:
                    if s is self._wake_r:
                        try:
                            self._wake_r.recv(4096)
                        except OSError:
                            pass
                        continue
                    if _peer_closed(s):
                        self._fire(s.fileno())
                    else:
                        # Data, not a hang-up: stop watching, or select() would report it forever.
                        with self._lock:
                            self._socks.pop(s.fileno(), None)


def _peer_closed(sock: socket.socket) -> bool:
    """Peek under any TLS layer: end-of-file means the client has gone."""
    raw = socket.socket(sock.family, sock.type, fileno=sock.fileno())
    try:
        return raw.recv(1, socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)) == b""
    except (BlockingIOError, InterruptedError, socket.timeout):
        return False
    except OSError:
        return True
    finally:
        raw.detach()     # the handle belongs to the connection


class DeadlineReaper:
    """Shuts connections that overstay a deadline.

    Socket timeouts apply to each read, so a client that trickles one byte a
    second (slowloris) never trips them; a handshake, or a request's line,
    headers and body, must instead finish by a deadline, or the socket is
    shut and its thread's blocked read ends at once.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._deadlines: dict[int, tuple[float, socket.socket]] = {}
        self._tokens = iter(range(1, 1 << 62))
        threading.Thread(target=self._run, name="deadline-reaper", daemon=True).start()

    def arm(self, sock: socket.socket, seconds: float) -> int:
        with self._cond:
            token = next(self._tokens)
            self._deadlines[token] = (time.monotonic() + seconds, sock)
            self._cond.notify()
            return token

    def disarm(self, token: int | None):
        if token is not None:
            with self._cond:
                self._deadlines.pop(token, None)

    def _run(self):
        with self._cond:
            while True:
                if not self._deadlines:
                    self._cond.wait()
                    continue
                token, (deadline, sock) = min(self._deadlines.items(), key=lambda item: item[1][0])
                left = deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)      # woken early when a nearer deadline is armed
                    continue
                del self._deadlines[token]
                try:
                    # The plain socket's shutdown: SSLSocket.shutdown would drop its TLS state
                    # under the feet of the thread still using it.
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass


class AccessPolicy:
    """Which web pages may use the server behind their user's back: none but those the user runs.

    Two checks, as Ollama makes them. The Host check defeats DNS rebinding (a name that first resolves
    to an attacker's server, then to this machine, makes a page "same-origin" with us): a request naming
    this server by a DNS name that is not local, nor this machine's, nor given with --hostname, is refused;
    IP literals always pass, because no rebinding is possible with them. The origin check refuses a
    request whose `Origin` is not allowed before any work is done, simple requests (which browsers send
    without a preflight) included. Requests from programs carry no Origin and are not affected. With a
    password, the password is the gate: a page that has it may call from anywhere.
    """

    HOSTED_LITE = "https://lite.koboldai.net"       # KoboldCpp's hosted KoboldAI Lite calls local servers
    LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
    METHODS = "GET, POST, PUT, DELETE, OPTIONS"
    ALLOW_HEADERS = ("Authorization, Content-Type, genkey, X-Api-Key, Accept, anthropic-version, "
                     "anthropic-beta, anthropic-dangerous-direct-browser-access")
    HEADER_NAME = re.compile(r"[A-Za-z0-9-]{1,64}")
    EXPOSE = "X-KoboldLite-Instance, X-KoboldLite-Ignored, Retry-After"
    ANY_ORIGIN = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Methods": METHODS,
                  "Access-Control-Allow-Headers": ALLOW_HEADERS, "Access-Control-Max-Age": "86400",
                  "Access-Control-Expose-Headers": EXPOSE}

    def __init__(self, hostnames: list[str], cors_origins: list[str], password_set: bool):
        own = {socket.gethostname().lower().rstrip(".")}
        try:
            own.add(socket.getfqdn().lower().rstrip("."))
        except OSError:
            pass
        own |= {f"{name}.local" for name in list(own) if "." not in name}    # its mDNS name on a LAN
        self.any_host = "*" in hostnames
        self.names = own | {h.lower().rstrip(".") for h in hostnames if h != "*"}
        self.any_origin = "*" in cors_origins
        self.origins = {self.HOSTED_LITE} | {normalized_origin(o) for o in cors_origins if o != "*"}
        self.password_set = password_set

    @staticmethod
    def host_of(value: str) -> str | None:
        """The host of a Host header in lower case (brackets kept around IPv6), or None if malformed."""
        value = value.strip().lower()
        if value.startswith("["):
            end = value.find("]")
            host, rest = value[:end + 1], value[end + 1:]
            return host if end > 0 and (not rest or (rest[0] == ":" and rest[1:].isdigit())) else None
        host, colon, port = value.partition(":")
        return host if host and (not colon or port.isdigit()) else None

    @staticmethod
    def is_ip_literal(host: str) -> bool:
        try:
            ipaddress.ip_address(urllib.parse.unquote(host.strip("[]")))
            return True
        except ValueError:
            return False

    def check_host(self, header: str | None):
        """A 403 for a Host that names this server by a name it does not know (DNS rebinding). No Host at all
        (HTTP/1.0, health checkers) is not a browser's request and passes."""
        if header is None or self.any_host:
            return
        host = self.host_of(header)
        if host is not None and (self.is_ip_literal(host) or host.rstrip(".") in self.names
                                 or host.rstrip(".") == "localhost" or host.rstrip(".").endswith(".localhost")):
            return
        raise RequestError(f"this server is not reached by the name {header!r} (a web page may be trying DNS "
                           f"rebinding); to serve it under that name, start it with --hostname "
                           f"{(host or header).rstrip('.')}", status=403, kind="forbidden")

    def origin_allowed(self, origin: str, host_header: str | None) -> bool:
        normal = normalized_origin(origin)
        if normal is None:
            return False
        if normal in self.origins:
            return True
        scheme, _, netloc = normal.partition("://")
        if host_header is not None and netloc == normalized_origin(f"{scheme}://{host_header}").partition("://")[2]:
            return True          # the server's own page (scheme aside: a TLS-terminating balancer changes it)
        return scheme in ("http", "https") and self.host_of(netloc) in self.LOOPBACK_NAMES

    def cors_headers(self, origin: str | None, host_header: str | None, key_ok: bool, protected: bool,
                     preflight: bool = False, private_network: bool = False,
                     requested_headers: str = "") -> dict[str, str]:
        """The CORS headers of an answer to this request; a 403 for a page that may not make it."""
        if self.any_origin:
            return dict(self.ANY_ORIGIN)
        if origin is None:
            return {"Vary": "Origin"}
        # A preflight carries no password: with one set, the request that follows is gated by it.
        if self.origin_allowed(origin, host_header) or (self.password_set and (key_ok or preflight)):
            headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                       "Access-Control-Expose-Headers": self.EXPOSE}
            if preflight:
                # The SDKs add headers of their own (x-stainless-...): a page that may call may send them.
                extra = [h.strip() for h in requested_headers.split(",") if self.HEADER_NAME.fullmatch(h.strip())]
                headers.update({"Access-Control-Allow-Methods": self.METHODS,
                                "Access-Control-Allow-Headers": ", ".join([self.ALLOW_HEADERS, *extra[:32]]),
                                "Access-Control-Max-Age": "600"})
                if private_network:      # Chrome's Private Network Access preflight
                    headers["Access-Control-Allow-Private-Network"] = "true"
            return headers
        if self.password_set and protected:
            return {"Vary": "Origin"}    # the password check answers: 401, as without an Origin
        raise RequestError(f"web pages from {origin} may not use this server; to allow them, start it with "
                           f"--cors-origin {normalized_origin(origin) or origin}", status=403, kind="forbidden",
                           headers={"Vary": "Origin"})


class AuthThrottle:
    """Wrong passwords per client address: after LIMIT within WINDOW seconds, that address is answered 429
    until the oldest of them is WINDOW old, whatever it offers; other addresses are never slowed."""

    LIMIT = 10
    WINDOW = 60.0
    MAX_ADDRESSES = 4096         # bounded memory against a client that cycles addresses

    def __init__(self, log: Callable[[str], None]):
        self._log = log
        self._lock = threading.Lock()
        self._failures: dict[str, collections.deque] = {}

    def _recent(self, address: str, now: float) -> collections.deque | None:
        times = self._failures.get(address)
        while times and times[0] <= now - self.WINDOW:
            times.popleft()
        if times is not None and not times:
            del self._failures[address]
            return None
        return times

    def retry_after(self, address: str) -> int:
        """Seconds until this address may try again; 0 if it may now."""
        now = time.monotonic()
        with self._lock:
            times = self._recent(address, now)
            if times is None or len(times) < self.LIMIT:
                return 0
            return max(1, math.ceil(times[0] + self.WINDOW - now))

    def failed(self, address: str):
        now = time.monotonic()
        with self._lock:
            times = self._recent(address, now)
            if times is None:
                if len(self._failures) >= self.MAX_ADDRESSES:
                    del self._failures[next(iter(self._failures))]      # the longest-tracked address
                times = self._failures[address] = collections.deque()
            times.append(now)
            count = len(times)
        if count >= self.LIMIT:
            self._log(f"password: {count} wrong passwords from {address} within {self.WINDOW:.0f}s: refusing "
                      f"its requests for {math.ceil(self.WINDOW)}s at most (429)")
        else:
            self._log(f"password: wrong password from {address} ({count} of {self.LIMIT} allowed a minute)")


class RequestHandler(http.server.BaseHTTPRequestHandler):
    """One instance per connection: TLS handshake, then keep-alive requests."""

    protocol_version = "HTTP/1.1"
    server_version = f"KoboldLite/{__version__}"
    sys_version = ""
    server: "KoboldLiteServer"

    def setup(self):
        """Handshake here, in the connection's own thread, with a deadline: never on the accepting thread."""
        # Small writes (headers, then body; one SSE event per token) must leave at once, not wait
        # for Nagle's algorithm to meet the client's delayed ACK (40 ms a request).
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        config = self.server.app.config
        self.request.settimeout(config.handshake_timeout)
        if isinstance(self.request, ssl.SSLSocket):
            deadline = self.server.reaper.arm(self.request, config.handshake_timeout)
            try:
                self.request.do_handshake()
            finally:
                self.server.reaper.disarm(deadline)
        self.timeout = config.idle_timeout
        super().setup()
        self._watched_job: Job | None = None
        self._request_deadline: int | None = None
        self._cors: dict[str, str] = {}

    def handle_one_request(self):
        """Wait idly for a request's first byte; from there the whole request has a deadline."""
        try:
            if not self.rfile.peek(1):
                self.close_connection = True
                return
        except (OSError, ValueError):      # idle timeout, reset, or shut by the reaper
            self.close_connection = True
            return
        self._request_deadline = self.server.reaper.arm(self.connection, self.server.app.config.request_timeout)
        self._cors = {}      # each answer's own: never the last request's on a kept-alive connection
        try:
            super().handle_one_request()
        finally:
            self._request_read()

    def _request_read(self):
        self.server.reaper.disarm(self._request_deadline)
        self._request_deadline = None

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a bad request line, oversize headers...) as JSON, like ours."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"   # errors found before the version is read still get a status line
        if code == 505:
            code = 400    # a bogus HTTP version is the client's error, like any other bad input
        text = message or self.responses.get(code, ("error",))[0]
        error = RequestError(text, code, "invalid_request" if code < 500 else "server_error")
        self._send(JSONResponse(error_body("kobold", error),
                                code))

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format, *args):
        self.server.app.log(f"{self.address_string()} {format % args}")

    def log_request(self, code="-", size="-"):
        if self.server.app.config.debug:
            super().log_request(code, size)

    def do_OPTIONS(self):
        """A CORS preflight: answered for pages that may make the request, refused (403) for the others."""
        self._request_read()
        self._body_unread = self._declared_length()
        try:
            access = self.server.access
            access.check_host(self.headers.get("Host"))
            self._cors = access.cors_headers(
                self.headers.get("Origin"), self.headers.get("Host"), key_ok=False, protected=True,
                preflight=True, private_network=self.headers.get("Access-Control-Request-Private-Network") == "true",
                requested_headers=self.headers.get("Access-Control-Request-Headers", ""))
            response = Response(204, b"", "text/plain")
        except RequestError as e:
            self._cors = e.headers
            response = JSONResponse(error_body("kobold", e), e.status)
        self._send(response)
        if self._body_unread:
            self._linger()

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_HEAD(self):
        self._dispatch("HEAD")

    # -- dispatch ------------------------------------------------------------

    def _dispatch(self, method: str):
        app = self.server.app
        url = urllib.parse.urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        style = "anthropic" if path.startswith(("/v1/messages", "/messages")) else \
            "openai" if path.startswith(("/v1/", "/responses")) or path in ("/models", "/completions",
                                                                           "/chat/completions") else "kobold"
        request = None
        self._body_unread = self._declared_length()
        try:
            self.server.access.check_host(self.headers.get("Host"))
            try:
                route = self.server.router.match("GET" if method == "HEAD" else method, path)
            except RequestError:          # a 404 or 405, readable by the pages that may call
                self._cors = self.server.access.cors_headers(self.headers.get("Origin"), self.headers.get("Host"),
                                                             False, False)
                raise
            style = route.style
            authorized, key_ok = self._authorized(route)
            self._cors = self.server.access.cors_headers(self.headers.get("Origin"), self.headers.get("Host"),
                                                         key_ok, route.protected)
            body = self._read_body()
            self._request_read()
            if route.protected and not authorized:
                raise unauthorized(style)
            if route.needs_model and not app.ready.is_set():
                raise RequestError("the model is still loading", status=503, kind="service_unavailable")
            query = dict(urllib.parse.parse_qsl(url.query))
            request = Request(app, method, path, query, self.headers, body, authorized,
                              client=self.client_address[0], watch_hangup=self.watch_hangup, style=style)
            response = route.handler(app, request)
            if request.ignored:
                response.headers["X-KoboldLite-Ignored"] = ",".join(request.ignored)
        except RequestError as e:
            if request is not None and request.job is not None:
                request.job.cancel()
            response = error_response(style, e)
        except Exception as e:  # a bug must cost one request, never the server
            if request is not None and request.job is not None:
                request.job.cancel()
            app.log(f"internal error on {method} {path}: {type(e).__name__}: {e}")
            response = error_response(style, RequestError("internal server error", 500, "server_error"))
        try:
            if isinstance(response, StreamResponse):
                self._send_stream(response)
            else:
                self._send(response, head_only=method == "HEAD")
                if self._body_unread:
                    self._linger()
        finally:
            self._unwatch_hangup()
            if request is not None:
                request.release()

    LINGER_BYTES = 64 * 1024 * 1024     # at most this much of an unread body is read and thrown away...
    LINGER_SECONDS = 10.0               # ...within this long

    def _linger(self):
        """An answer sent before the body was read (413, 411, 404...): read and discard the rest of the
        body, up to a bound and a deadline, then close. Closing at once would reset the connection under a
        client still writing its body, and clients that write first (Python's http.client, curl) would
        never see the answer (nginx calls this a lingering close)."""
        self.close_connection = True
        try:
            self.wfile.flush()
            # The answer is complete: end our side now, so a client that reads to the end sees it at once.
            socket.socket.shutdown(self.connection, socket.SHUT_WR)
        except OSError:
            return
        deadline = self.server.reaper.arm(self.connection, self.LINGER_SECONDS)
        try:
            left = min(self._body_unread, self.LINGER_BYTES)
            while left > 0:
                data = self.rfile.read1(min(left, 1 << 16))
                if not data:
                    break
                left -= len(data)
        except (OSError, ValueError):
            pass
        finally:
            self.server.reaper.disarm(deadline)

    def _declared_length(self) -> int:
        """The Content-Length the client announced, as far as it can be believed; 0 if none."""
        try:
            return max(0, int(self.headers.get("Content-Length") or 0))
        except ValueError:
            return 0

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise RequestError("chunked request bodies are not supported; send Content-Length", status=411,
                               kind="length_required")
        length = self.headers.get("Content-Length")
        if not length:
            return b""
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise RequestError("bad Content-Length header") from None
        if n > self.server.app.config.max_body_bytes:
            self.close_connection = True
            raise RequestError(f"the request body is larger than {self.server.app.config.max_body_bytes} bytes",
                               status=413, kind="request_too_large")
        data = self.rfile.read(n)
        self._body_unread = 0
        if len(data) < n:
            self.close_connection = True
            raise RequestError("the request body ended early")
        return data

    def _authorized(self, route: Route) -> tuple[bool, bool]:
        """(authorized, key_ok): whether the request may use what the password guards, and whether it
        carried the right password. A wrong one counts against its address (AuthThrottle); an address over
        the limit is answered 429 for anything that needs or offers a password, whatever it offers."""
        config = self.server.app.config
        password = config.adminpassword if route.admin and config.adminpassword else config.password
        if not password:
            return True, False
        offered = ""
        auth = self.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            offered = auth[7:].strip()
        elif self.headers.get("X-Api-Key"):
            offered = self.headers.get("X-Api-Key", "").strip()
        if not offered and not route.protected:
            return False, False
        address = self.client_address[0]
        wait = self.server.auth_throttle.retry_after(address)
        if wait:      # the page learns the same whatever it offered: its key is not looked at
            self._cors = self.server.access.cors_headers(self.headers.get("Origin"), self.headers.get("Host"),
                                                         False, route.protected)
            raise RequestError(f"too many wrong passwords from this address: try again in {wait} s", status=429,
                               kind="rate_limit_error", headers={"Retry-After": str(wait)})
        if not offered:
            return False, False
        ok = hmac.compare_digest(offered.encode(), password.encode())
        if not ok:
            self.server.auth_throttle.failed(address)
        return ok, ok

    # -- hang-ups ------------------------------------------------------------

    def watch_hangup(self, job: Job):
        self._watched_job = job
        self.server.generation_started()
        self.server.hangups.watch(self.connection, job.cancel)

    def _unwatch_hangup(self):
        if self._watched_job is not None:
            self.server.hangups.unwatch(self.connection)
            self._watched_job = None
            self.server.generation_answered()

    # -- writing -------------------------------------------------------------

    def _start_response(self, response: Response):
        self.send_response(response.status)
        for k, v in self._cors.items():
            self.send_header(k, v)
        self.send_header("X-KoboldLite-Instance", self.server.app.instance_id)
        self.send_header("Content-Type", response.content_type)
        for k, v in response.headers.items():
            self.send_header(k, v)

    def _send(self, response: Response, head_only: bool = False):
        self._start_response(response)
        self.send_header("Content-Length", str(len(response.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head_only and response.body:
            self.wfile.write(response.body)

    def _send_stream(self, response: StreamResponse):
        self.close_connection = True
        self._start_response(response)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for chunk in response.chunks:
                self.wfile.write(chunk)
        except (OSError, ValueError):
            pass                         # the client went away: its generation is cancelled below
        finally:
            if response.job is not None and not response.job.buffer.done:
                response.job.cancel()


class KoboldLiteServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with TLS around the listening socket and a cap on connections.

    The listening socket is wrapped with do_handshake_on_connect=False, so
    accept() never handshakes; each connection's thread does (RequestHandler.setup).
    """

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler_class: type, app: App, router: Router,
                 tls: ssl.SSLContext | None = None):
        """`handler_class` is instantiated per connection, as socketserver does (RequestHandler)."""
        self.app = app
        self.router = router
        self.tls = tls
        self.hangups = HangupWatcher()
        self.reaper = DeadlineReaper()
        self.access = AccessPolicy(app.config.hostname, app.config.cors_origin, bool(app.config.password))
        self.auth_throttle = AuthThrottle(app.log)
        self._connections = threading.BoundedSemaphore(app.config.max_connections)
        self._per_client: collections.Counter[str] = collections.Counter()   # open connections per address
        self._per_client_lock = threading.Lock()
        self._answering = 0                  # generation responses still being written
        self._answering_cond = threading.Condition()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler_class)

    def server_bind(self):
        super().server_bind()
        if self.tls is not None:
            self.socket = self.tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def process_request(self, request, client_address):
        with self._per_client_lock:
            mine = self._per_client[client_address[0]] < self.app.config.max_connections_per_client
            if mine:
                self._per_client[client_address[0]] += 1
        if not mine or not self._connections.acquire(blocking=False):
            if mine:
                self._client_left(client_address[0])
            self.shutdown_request(request)     # over a cap: refuse rather than queue threads
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        # ThreadingMixIn's steps, but the client's place is given back before its socket closes: a
        # client that has seen its connection end may connect again at once.
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self._connections.release()
            self._client_left(client_address[0])
            self.shutdown_request(request)

    def _client_left(self, address: str):
        with self._per_client_lock:
            self._per_client[address] -= 1
            if self._per_client[address] <= 0:
                del self._per_client[address]

    def generation_started(self):
        with self._answering_cond:
            self._answering += 1

    def generation_answered(self):
        with self._answering_cond:
            self._answering -= 1
            self._answering_cond.notify_all()

    def wait_answers_written(self, timeout: float) -> bool:
        """At shutdown: let aborted streams write their last event before the process ends."""
        with self._answering_cond:
            return self._answering_cond.wait_for(lambda: self._answering == 0, timeout)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ssl.SSLError, ConnectionError, TimeoutError, socket.timeout)):
            return   # failed handshakes, resets and idle clients are routine
        self.app.log(f"error on connection from {client_address[0]}: {type(exc).__name__}: {exc}")

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def served_urls(server: KoboldLiteServer, host: str) -> list[str]:
    port = server.server_address[1]
    scheme = server.scheme
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        unspecified = False
    if not unspecified:
        shown = f"[{host}]" if ":" in host else host
        return [f"{scheme}://{shown}:{port}"]
    urls = [f"{scheme}://{'[::1]' if host == '::' else '127.0.0.1'}:{port}"]
    addresses = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            addr = info[4][0]
            if not ipaddress.ip_address(addr.split("%")[0]).is_loopback:
                addresses.add(addr)
    except OSError:
        pass
    for addr in sorted(addresses):
        if ":" in addr:
            if host == "::":
                urls.append(f"{scheme}://[{addr}]:{port}")
        else:
            urls.append(f"{scheme}://{addr}:{port}")
    return urls


class ProgressBar:
    """Model loading progress on stderr, redrawn only when a step of the bar fills."""

    WIDTH = 30

    def __init__(self):
        self._shown = -1

    def __call__(self, fraction: float):
        filled = int(fraction * self.WIDTH)
        if filled == self._shown:
            return
        self._shown = filled
        end = "\n" if filled >= self.WIDTH else ""
        print(f"\rLoading model [{'#' * filled}{'.' * (self.WIDTH - filled)}] {fraction * 100:3.0f}%",
              end=end, file=sys.stderr, flush=True)


def fetch_model_urls(config: Config):
    """--model URL: download each (with a bar on the console) before anything loads; the file stays."""
    folder = config.modeldir or os.getcwd()
    fetched = []
    for source in [config.model, *config.models]:
        if is_model_url(source):
            download = ModelDownload(source, folder)
            download.progress = ConsoleProgress(download.name)
            if not os.path.isfile(download.path):
                print(f"Downloading {source} into {folder}", file=sys.stderr, flush=True)
            source = download.run()
        fetched.append(source)
    config.model, config.models = fetched[0], fetched[1:]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    double_click = is_double_click_start(argv)
    status = serve(double_click_arguments if double_click else lambda: argv, double_click)
    if status != 0 and double_click:
        keep_window_open()
    return status


def serve(arguments: Callable[[], list[str]], double_click: bool = False) -> int:
    try:
        config = load_config(arguments())
        tls = make_tls_context(*config.ssl) if config.ssl else None
    except ConfigError as e:
        print(f"koboldlite: error: {e}", file=sys.stderr)
        return 2

    try:
        fetch_model_urls(config)
        app = App(config)
    except (ConfigError, DownloadError) as e:
        print(f"koboldlite: error: {e}", file=sys.stderr)
        return 2
    router = build_router(StaticFiles(UI_DIR) if os.path.isdir(UI_DIR) else None)
    try:
        server = KoboldLiteServer((config.host, config.port), RequestHandler, app, router, tls)
    except OSError as e:
        if not (double_click and e.errno == errno.EADDRINUSE):
            reason = "the port is already in use" if e.errno == errno.EADDRINUSE else str(e)
            print(f"koboldlite: error: cannot listen on {config.host}:{config.port}: {reason}", file=sys.stderr)
            return 2
        # A double-click user cannot pick another port: take a free one and say so.
        print(f"Port {config.port} is in use; serving on a free port instead.", file=sys.stderr)
        server = KoboldLiteServer((config.host, 0), RequestHandler, app, router, tls)
    if not app.instance_id:
        app.instance_id = f"{socket.gethostname()}:{server.server_address[1]}"
    # Serve from now on: /api/extra/version answers while the model loads, the rest says 503.
    threading.Thread(target=server.serve_forever, name="http-accept", daemon=True).start()

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    entries = app.catalog.entries()
    if app.catalog.several:
        print(f"Models: {', '.join(e.name for e in entries)} ({len(entries)}; up to {config.maxmodels} loaded at "
              f"once{f', unloaded after {config.idleunload:g} s idle' if config.idleunload else ''})",
              file=sys.stderr, flush=True)
    print(f"KoboldLite {__version__}: loading {config.model}", file=sys.stderr, flush=True)
    try:
        served = app.roster.acquire(app.catalog.find(None))
    except RequestError as e:
        app.flush_log()                   # its lines first: the error is the last line a user sees
        print(f"koboldlite: error: {getattr(e, 'cause', None) or e}", file=sys.stderr)
        server.server_close()
        return 2
    if config.embeddings_model:
        try:
            app.embeddings_source = LlamaModel(config.embeddings_model, n_ctx=64, n_seq=1, n_threads=1,
                                               n_gpu_layers=served.gpu.n_gpu_layers, show_llama_log=config.debug,
                                               devices=served.gpu.devices if served.gpu.chosen else None)
        except ModelLoadError as e:
            print(f"koboldlite: error: embeddings model: {e}", file=sys.stderr)
            server.server_close()
            return 2
    print(served.template_origin, file=sys.stderr, flush=True)
    if not served.engine.context_shift:
        print("context shift: off (--noshift)" if config.noshift else
              "context shift: off, this model's cache cannot be shifted: a trimmed chat is read again in "
              "full, and a reply ends when the context is full", file=sys.stderr, flush=True)
    model, cfg = served.model, served.config
    urls = served_urls(server, config.host)
    if not is_loopback_host(config.host) and not config.password:
        print("WARNING: serving the network without --password: anyone who can reach this machine "
              "can use the model.", file=sys.stderr)
    if not is_loopback_host(config.host) and config.password and not tls:
        print("WARNING: the password crosses the network in clear text over plain HTTP: anyone on the network "
              "can read it; add --ssl cert.pem key.pem (README: Using it on your LAN, with TLS).", file=sys.stderr)
    print(f"Model {model.name} ready: context {model.n_ctx}, {cfg.parallel} slot(s), "
          f"{cfg.threads} threads", flush=True)
    mem = served.memory
    pool = (f"{mem['kv_cells']} tokens shared by {cfg.parallel} slot(s)" if model.shared_kv
            else f"{model.n_ctx} tokens for each of {cfg.parallel} slot(s)")
    print(f"Memory: model {mem['model_mib']:.0f} MiB, KV cache {mem['kv_cache_mib']:.0f} MiB ({pool}, "
          f"{'/'.join(mem['kv_types']) or model.kv_type}), compute buffers {mem['compute_mib']:.0f} MiB; "
          f"flash attention {mem['flash_attn'] or 'auto'}, model {mem['load_mode'] or 'loaded'}", flush=True)
    if served.gpu.devices:
        parts = "; ".join(f"{name}: model {row['model']:.0f} MiB, KV {row['kv']:.0f} MiB, compute {row['compute']:.0f} MiB"
                          for name, row in mem["devices"].items())
        print(f"GPU: offloaded {mem['layers_offloaded']}/{mem['layers_total']} layers; {parts}", flush=True)
    app.ready.set()
    app.roster.release(served)
    for url in urls:
        print(f"Serving at {url}", flush=True)
    print(f"KoboldAI API at {urls[0]}/api", flush=True)
    if config.launch:
        webbrowser.open(urls[0])

    stop.wait()
    print("Stopping: ending running generations.", file=sys.stderr, flush=True)
    app.roster.stop()
    server.wait_answers_written(timeout=5.0)
    server.shutdown()
    server.server_close()
    app.flush_log()
    return 0
