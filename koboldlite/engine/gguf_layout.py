"""A GGUF file's layers as its header says, and how many fit in a GPU's free memory."""

from __future__ import annotations

import collections
import os
import re
from typing import Any

from ..errors import ModelLoadError


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
