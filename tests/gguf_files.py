"""Tiny synthetic llama GGUF files, written the way llama.cpp's converter writes them (for tests)."""

import gguf
import numpy as np

TINY = {"hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 256, "layers": 2, "vocab": 48}

# HF module -> llama.cpp tensor name, per layer (written out here independently of gguf_io's table).
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def hf_tensors(rng, *, hidden, heads, kv_heads, ffn, layers, vocab, attention_bias=False, tied=True):
    """Random HF-named, HF-layout float32 tensors of a tiny llama."""
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
            p + "mlp.down_proj.weight": (hidden, ffn),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        }
        if attention_bias:
            shapes |= {p + f"self_attn.{m}_proj.bias": (shapes[p + f"self_attn.{m}_proj.weight"][0],)
                       for m in "qkvo"}
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def llama_cpp_permute(weights, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rotate-half rows -> llama.cpp interleaved rows."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def to_llama_cpp(tensors, *, heads, kv_heads, **_):
    """HF tensors renamed and q/k-permuted the way llama.cpp's converter writes them."""
    out = {}
    for name, value in tensors.items():
        module, leaf = name.rsplit(".", 1)
        if module.startswith("model.layers."):
            _, _, layer, rest = module.split(".", 3)
            gguf_name = f"blk.{layer}.{LAYER_NAMES[rest]}.{leaf}"
        else:
            gguf_name = f"{TOP_NAMES[module]}.{leaf}"
        if ".attn_q." in gguf_name:
            value = llama_cpp_permute(value, heads)
        elif ".attn_k." in gguf_name:
            value = llama_cpp_permute(value, kv_heads)
        out[gguf_name] = value
    return out


def write_gguf(path, tensors, *, arch="llama", hidden, heads, kv_heads, ffn, layers, vocab, metadata=None):
    """Write a llama-style GGUF. `tensors`: GGUF name -> float32 array, or (uint8 blocks, quant type)."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    for key, value in (metadata or {}).items():
        value_type = {int: gguf.GGUFValueType.UINT32, float: gguf.GGUFValueType.FLOAT32,
                      str: gguf.GGUFValueType.STRING, bool: gguf.GGUFValueType.BOOL}[type(value)]
        writer.add_key_value(key, value, value_type)
    for name, value in tensors.items():
        if isinstance(value, tuple):
            writer.add_tensor(name, value[0], raw_dtype=value[1])
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_gguf_file(path, *, arch="llama", tensors=None, metadata=None):
    """A valid tiny llama GGUF at `path` (F32, seed 0), or with `tensors` (GGUF names) / `metadata` replaced."""
    if tensors is None:
        tensors = to_llama_cpp(hf_tensors(np.random.default_rng(0), **TINY), **TINY)
    return write_gguf(path, tensors, arch=arch, metadata=metadata, **TINY)
