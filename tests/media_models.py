"""Tiny multimodal projectors made at test time with the gguf package, for the starter model (SmolLM2-135M,
n_embd 576): random weights in the shapes llama.cpp's clip.cpp reads (no package ships a small multimodal model;
llama.cpp's own CI downloads one). `vision`: a LLaVA-style `mlp` projector, 64 tokens an image (112 px, 14 px
patches). `audio`: an `ultravox` projector, stack factor 15 (100 tokens per 30 s chunk; other factors make
clip.cpp abort on a token-count mismatch). They answer nonsense, but different images give different replies.
"""

import numpy as np
import gguf

N_TEXT = 576          # SmolLM2-135M llama.embedding_length


def vision(path, seed=1, n_embd=64, n_ff=128, n_layer=2, n_head=4, image=112, patch=14, hidden=256, out_scale=1.0):
    rng = np.random.default_rng(seed)
    r = lambda *s, scale=0.05: (rng.standard_normal(s) * scale).astype(np.float32)
    w = gguf.GGUFWriter(path, "clip")              # general.architecture = "clip"
    w.add_type("mmproj")                           # general.type (informational)
    w.add_name("tiny-test-mlp-projector")
    w.add_clip_has_vision_encoder(True)            # clip.has_vision_encoder (bool)
    w.add_clip_projector_type("mlp")               # clip.projector_type (string)
    w.add_vision_projection_dim(N_TEXT)            # clip.vision.projection_dim (u32, required)
    w.add_vision_image_size(image)                 # clip.vision.image_size (u32)
    w.add_vision_patch_size(patch)                 # clip.vision.patch_size (u32)
    w.add_vision_embedding_length(n_embd)          # clip.vision.embedding_length (u32)
    w.add_vision_feed_forward_length(n_ff)         # clip.vision.feed_forward_length (u32)
    w.add_vision_block_count(n_layer)              # clip.vision.block_count (u32)
    w.add_vision_head_count(n_head)                # clip.vision.attention.head_count (u32)
    w.add_vision_attention_layernorm_eps(1e-6)     # clip.vision.attention.layer_norm_epsilon (f32)
    w.add_vision_image_mean([0.5, 0.5, 0.5])       # clip.vision.image_mean (f32[3], needed)
    w.add_vision_image_std([0.5, 0.5, 0.5])        # clip.vision.image_std  (f32[3], needed)
    w.add_vision_use_gelu(True)                    # clip.use_gelu (optional; default gelu_quick)
    n_pos = (image // patch) ** 2
    w.add_tensor("v.patch_embd.weight", r(n_embd, 3, patch, patch).astype(np.float16))
    w.add_tensor("v.patch_embd.bias", r(n_embd))
    w.add_tensor("v.position_embd.weight", r(n_pos, n_embd))
    for i in range(n_layer):
        p = f"v.blk.{i}."
        for t in ("attn_q", "attn_k", "attn_v", "attn_out"):
            w.add_tensor(p + t + ".weight", r(n_embd, n_embd)); w.add_tensor(p + t + ".bias", r(n_embd))
        for t in ("ln1", "ln2"):
            w.add_tensor(p + t + ".weight", np.ones(n_embd, np.float32)); w.add_tensor(p + t + ".bias", np.zeros(n_embd, np.float32))
        w.add_tensor(p + "ffn_up.weight", r(n_ff, n_embd)); w.add_tensor(p + "ffn_up.bias", r(n_ff))
        w.add_tensor(p + "ffn_down.weight", r(n_embd, n_ff)); w.add_tensor(p + "ffn_down.bias", r(n_embd))
    w.add_tensor("mm.0.weight", r(hidden, n_embd, scale=0.2)); w.add_tensor("mm.0.bias", r(hidden))
    w.add_tensor("mm.2.weight", r(N_TEXT, hidden, scale=0.2 * out_scale)); w.add_tensor("mm.2.bias", r(N_TEXT))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()

def audio(path, seed=2, n_embd=64, n_ff=128, n_layer=1, n_head=4, n_mel=80, stack=15, hidden=256):
    rng = np.random.default_rng(seed)
    r = lambda *s, scale=0.05: (rng.standard_normal(s) * scale).astype(np.float32)
    w = gguf.GGUFWriter(path, "clip")
    w.add_type("mmproj")
    w.add_clip_has_audio_encoder(True)             # clip.has_audio_encoder
    w.add_clip_projector_type("ultravox")
    w.add_audio_projection_dim(N_TEXT)             # clip.audio.projection_dim
    w.add_audio_embedding_length(n_embd)           # clip.audio.embedding_length
    w.add_audio_feed_forward_length(n_ff)          # clip.audio.feed_forward_length
    w.add_audio_block_count(n_layer)               # clip.audio.block_count
    w.add_audio_head_count(n_head)                 # clip.audio.attention.head_count
    w.add_audio_attention_layernorm_eps(1e-5)      # clip.audio.attention.layer_norm_epsilon
    w.add_audio_num_mel_bins(n_mel)                # clip.audio.num_mel_bins (<=256)
    w.add_audio_stack_factor(stack)                # clip.audio.projector.stack_factor (MUST divide 1500)
    w.add_tensor("a.conv1d.1.weight", r(n_embd, n_mel, 3).astype(np.float16)); w.add_tensor("a.conv1d.1.bias", r(n_embd, 1))
    w.add_tensor("a.conv1d.2.weight", r(n_embd, n_embd, 3).astype(np.float16)); w.add_tensor("a.conv1d.2.bias", r(n_embd, 1))
    w.add_tensor("a.position_embd.weight", r(1500, n_embd))
    for i in range(n_layer):
        p = f"a.blk.{i}."
        w.add_tensor(p + "attn_q.weight", r(n_embd, n_embd)); w.add_tensor(p + "attn_q.bias", r(n_embd))
        w.add_tensor(p + "attn_k.weight", r(n_embd, n_embd))            # no k bias (asserted)
        w.add_tensor(p + "attn_v.weight", r(n_embd, n_embd)); w.add_tensor(p + "attn_v.bias", r(n_embd))
        w.add_tensor(p + "attn_out.weight", r(n_embd, n_embd)); w.add_tensor(p + "attn_out.bias", r(n_embd))
        for t in ("ln1", "ln2"):
            w.add_tensor(p + t + ".weight", np.ones(n_embd, np.float32)); w.add_tensor(p + t + ".bias", np.zeros(n_embd, np.float32))
        w.add_tensor(p + "ffn_up.weight", r(n_ff, n_embd)); w.add_tensor(p + "ffn_up.bias", r(n_ff))
        w.add_tensor(p + "ffn_down.weight", r(n_embd, n_ff)); w.add_tensor(p + "ffn_down.bias", r(n_embd))
    w.add_tensor("mm.a.norm_pre.weight", np.ones(n_embd * stack, np.float32))
    w.add_tensor("mm.a.mlp.1.weight", r(2 * hidden, n_embd * stack))
    w.add_tensor("mm.a.norm_mid.weight", np.ones(hidden, np.float32))
    w.add_tensor("mm.a.mlp.2.weight", r(N_TEXT, hidden, scale=0.2))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
