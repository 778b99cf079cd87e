"""A copy of the starter model (SmolLM2-135M) whose GGUF metadata names fill-in-the-middle tokens, for the infill
tests: the starter model declares none, and no package ships a small FIM model as a plain GGUF.

Every tensor and key is copied as it is (gguf's GGUFReader and GGUFWriter); added are the keys llama.cpp reads for
FIM (src/llama-arch.cpp, LLM_KV_TOKENIZER_FIM_*_ID), each naming one of the vocabulary's own rare special tokens,
and `tokenizer.ggml.add_bos_token` set true, so that the tests see where the BOS goes in the layout. The model was
never trained on these tokens in these roles: it fills the middle with nonsense. The tests check the plumbing (the
prompt laid out token by token, the answer's shape), never the completion's quality.

    python3 tests/fim_model.py OUT.gguf      (the tests call make_fim_model from a fixture)
"""

from __future__ import annotations

import os
import sys

# The roles, and the SmolLM2 special token each is given (token ids 3, 5, 11, 12, 13 of its vocabulary).
FIM_ROLES = {
    "fim_pre": "<jupyter_start>",
    "fim_suf": "<jupyter_text>",
    "fim_mid": "<jupyter_code>",
    "fim_rep": "<repo_name>",
    "fim_sep": "<file_sep>",
}


def make_fim_model(source: str, out: str) -> dict[str, int]:
    """Write the copy of `source` to `out`; the FIM token ids it names, by role ("fim_pre": 11, ...)."""
    import gguf
    reader = gguf.GGUFReader(source)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    roles = {role: tokens.index(text) for role, text in FIM_ROLES.items()}
    added = {f"tokenizer.ggml.{role}_token_id": token for role, token in roles.items()}
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(out, arch, endianess=reader.endianess)
    for field in reader.fields.values():
        # The writer writes the architecture and the GGUF. header fields itself.
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name == gguf.Keys.Tokenizer.ADD_BOS:
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    for key, token in added.items():
        writer.add_key_value(key, token, gguf.GGUFValueType.UINT32)
    writer.add_key_value(gguf.Keys.Tokenizer.ADD_BOS, True, gguf.GGUFValueType.BOOL)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                               tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
    return roles


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))    # the repository's root
    from koboldlite.model_files import find_starter_model
    print(make_fim_model(find_starter_model(), sys.argv[1]))
