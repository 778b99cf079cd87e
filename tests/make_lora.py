"""A small LoRA adapter for the starter model (SmolLM2-135M, a llama), made at test time with the gguf package:
random low-rank weights in the layout llama.cpp's src/llama-adapter.cpp checks (general.type "adapter",
adapter.type "lora", adapter.lora.alpha; for each adapted weight W of ggml shape [n_in, n_out], `<W>.lora_a` of
shape [n_in, rank] and `<W>.lora_b` of shape [rank, n_out]). No package ships a LoRA for it; the adapter means
nothing, but at scale 1 it changes greedy replies.

    python3 tests/make_lora.py OUT.gguf [BASE.gguf]
"""

from __future__ import annotations

import os
import sys

import gguf
import numpy as np

ADAPTED = ("attn_q", "attn_v", "attn_output", "ffn_up")


def make_lora(out: str, base: str, rank: int = 8, seed: int = 7, std: float = 0.08) -> str:
    reader = gguf.GGUFReader(base)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(out, arch)
    writer.add_type("adapter")                       # general.type
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))   # scale x alpha / rank: the scale itself
    writer.add_name("koboldlite-test-lora")
    for tensor in reader.tensors:
        name = tensor.name
        if not (name.startswith("blk.") and name.split(".")[2] in ADAPTED and name.endswith(".weight")):
            continue
        n_in, n_out = (int(x) for x in tensor.shape[:2])          # ggml order: ne[0] is the input width
        # numpy shapes are ggml's reversed: lora_a [n_in, rank] is (rank, n_in), lora_b [rank, n_out] (n_out, rank).
        writer.add_tensor(name + ".lora_a", (rng.standard_normal((rank, n_in)) * std).astype(np.float32))
        writer.add_tensor(name + ".lora_b", (rng.standard_normal((n_out, rank)) * std).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    if len(sys.argv) > 2:
        model = sys.argv[2]
    else:                                            # the starter model, as the server finds it
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from koboldlite.model_files import find_starter_model
        model = find_starter_model()
    print(make_lora(sys.argv[1], model))
