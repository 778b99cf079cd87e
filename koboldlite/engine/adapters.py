"""LoRA adapters: the files loaded on a model, their global scales, and the scale set each request runs under.

A scale set's key says what KV cells computed under it may be reused by: cells computed under other scales hold
other keys and values, so the slots, the KV pool's lending and the prompt cache compare keys as well as tokens.
llama.cpp applies one scale set to a whole context (llama_set_adapters_lora), so the engine sets it before each
decode and batches together only slots whose keys are equal."""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import math
import os
import threading
from typing import Any

from ..errors import ModelLoadError, RequestError
from .llama_model import LlamaModel

# (adapter identity, scale) for every adapter of non-zero scale, in id order. llama.cpp leaves an adapter of scale
# 0 out of the graph, so a key without it is the same computation: scale 0 is no adapter, to the byte.
ScaleKey = tuple[tuple[str, float], ...]
NO_ADAPTERS: ScaleKey = ()


def parse_scale_list(value: Any, where: str) -> dict[int, float]:
    """llama-server's adapter list [{"id": 0, "scale": 0.5}, ...] as {id: scale}; a 400 naming what is wrong.
    A missing scale is 0, as llama-server reads it; the ids are checked against the adapters loaded later."""
    if not isinstance(value, list):
        raise RequestError(f"'{where}' must be a list of objects with 'id' and 'scale'")
    scales: dict[int, float] = {}
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise RequestError(f"'{where}[{i}]' must be an object with 'id' and 'scale'")
        adapter_id, scale = entry.get("id"), entry.get("scale", 0.0)
        if isinstance(adapter_id, bool) or not isinstance(adapter_id, int) or adapter_id < 0:
            raise RequestError(f"'{where}[{i}].id' must be an adapter id (a whole number from 0), not {adapter_id!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise RequestError(f"'{where}[{i}].scale' must be a number, not {scale!r}")
        scales[adapter_id] = float(scale)
    return scales


@dataclasses.dataclass
class Adapter:
    id: int
    path: str
    identity: str           # the file's name and a hash of its start: what a key names (saved states outlive ids)
    handle: Any             # llama.cpp's llama_adapter_lora *, freed with the model
    scale: float            # the global scale: what a request without its own `lora` runs under


class LoraAdapters:
    """The adapters loaded on one model (--lora FILE[:SCALE]), in the order given: their ids are 0, 1, ...

    Request threads read and set the global scales (POST /lora-adapters) under a lock; the generation thread alone
    applies a key to the context (`apply`), which llama.cpp skips when nothing changed."""

    def __init__(self, model: LlamaModel, specs: list[tuple[str, float]]):
        self.lib, self.model = model.lib, model
        self.adapters: list[Adapter] = []
        for i, (path, scale) in enumerate(specs):
            handle = self.lib.llama_adapter_lora_init(model.model, os.fsencode(path))
            if not handle:
                raise ModelLoadError(f"llama.cpp could not load the LoRA adapter {path} (not a GGUF LoRA for "
                                     f"{model.name}'s architecture and shapes? --debug shows llama.cpp's reason)")
            self.adapters.append(Adapter(i, path, _identity_of(path), handle, scale))
        self._lock = threading.Lock()
        self._applied: ScaleKey | None = None      # what the context runs under now (None: never set)
        self.switches = 0                           # times a decode needed another scale set than the last

    def __len__(self) -> int:
        return len(self.adapters)

    def listing(self) -> list[dict]:
        """llama-server's GET /lora-adapters: [{id, path, scale}]."""
        with self._lock:
            return [{"id": a.id, "path": a.path, "scale": a.scale} for a in self.adapters]

    def set_global(self, scales: dict[int, float]):
        """llama-server's POST /lora-adapters: the listed adapters take these scales, the others 0. Requests queued
        already keep the scales they were prepared under."""
        self._check_ids(scales, "lora-adapters")
        with self._lock:
            for a in self.adapters:
                a.scale = scales.get(a.id, 0.0)

    def key_for(self, requested: dict[int, float] | None) -> ScaleKey:
        """The key a request runs under: its own `lora` scales (adapters it leaves out at 0, as llama-server does),
        or the global scales as they are now."""
        if requested is not None:
            self._check_ids(requested, "lora")
        with self._lock:
            scales = [(a, a.scale if requested is None else requested.get(a.id, 0.0)) for a in self.adapters]
        return tuple((a.identity, s) for a, s in scales if s != 0.0)

    def _check_ids(self, scales: dict[int, float], where: str):
        unknown = sorted(set(scales) - {a.id for a in self.adapters})
        if unknown:
            n = len(self.adapters)
            have = {0: "none (start with --lora FILE)", 1: "id 0"}.get(n, f"ids 0 to {n - 1}")
            raise RequestError(f"'{where}': no LoRA adapter with id {unknown[0]}; the adapters loaded: {have}")

    def apply(self, key: ScaleKey):
        """Make the context run under this key (generation thread; the caller holds the llama lock)."""
        if key == self._applied:
            return
        by_identity = {a.identity: a for a in self.adapters}
        chosen = [(by_identity[identity], scale) for identity, scale in key]
        handles = (self.lib.llama_adapter_lora_p_ctypes * max(1, len(chosen)))(*[a.handle for a, _ in chosen])
        scales = (ctypes.c_float * max(1, len(chosen)))(*[s for _, s in chosen])
        self.lib.llama_set_adapters_lora(self.model.ctx, handles, len(chosen), scales)
        if self._applied is not None:
            self.switches += 1
        self._applied = key


def _identity_of(path: str) -> str:
    """The file's name, size and a hash of its first MiB: a state saved under an adapter is found again after a
    restart with the same file, and never under another file of the same name."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
    return f"{os.path.basename(path)}:{os.path.getsize(path)}:{digest.hexdigest()[:16]}"
