"""What a llama GGUF file's metadata and tensors mean to Hugging Face `LlamaForCausalLM`.

GGUF metadata -> config.json field (`llama.` stands for the `general.architecture` prefix):

    general.architecture == "llama"         model_type "llama", architectures ["LlamaForCausalLM"]
    llama.vocab_size                        vocab_size (else the length of tokenizer.ggml.tokens)
    llama.embedding_length                  hidden_size
    llama.feed_forward_length               intermediate_size
    llama.block_count                       num_hidden_layers
    llama.attention.head_count              num_attention_heads
    llama.attention.head_count_kv           num_key_value_heads (default: head_count)
    llama.attention.key_length              head_dim (default: embedding_length / head_count;
                                            attention.value_length and rope.dimension_count must match)
    llama.attention.layer_norm_rms_epsilon  rms_norm_eps
    llama.rope.freq_base                    rope_theta (default 10000, as in llama.cpp)
    llama.context_length                    max_position_embeddings
    tensor rope_freqs.weight                rope_scaling {"rope_type": "llama3", ...}, refitted from the
                                            per-frequency divisors llama.cpp bakes into the file (else
                                            None; a llama.rope.scaling.type other than "none" is refused)
    no tensor output.weight                 tie_word_embeddings
    tensors blk.N.attn_{q,k,v,output}.bias  attention_bias;  blk.N.ffn_{gate,up,down}.bias: mlp_bias
    tokenizer.ggml.bos_token_id             bos_token_id (config and generation_config)
    tokenizer.ggml.eos_token_id             eos_token_id (config); generation_config's eos_token_id
      + tokenizer.ggml.eot/eom_token_id     lists all of these stop ids (an int when there is one)
    tokenizer.ggml.padding_token_id         pad_token_id (both)
    tokenizer.chat_template                 chat_template
    tokenizer.ggml.{model, pre, tokens, token_type, merges, add_bos_token, add_eos_token}
                                            tokenizer.json (`GGUFModel.tokenizer_json`): byte-level BPE
                                            (model "gpt2") only; BOS/EOS added only when add_*_token say so

Tensors come back as float32 in PyTorch layout ([out, in]). llama.cpp stores q_proj / k_proj rows (and
their biases) interleaved for its rope; `get` restores Hugging Face's rotate-half order.

This mirrors transformers' GGUF loader (`modeling_gguf_pytorch_utils`, `integrations/gguf`) and gives the
same tensors and token ids on SmolLM2, except where transformers drops what the file says:
  * rope_freqs.weight: transformers ignores it, so a Llama 3.1/3.2 file loads without its llama3 rope scaling;
  * tokenizer.ggml.pre: transformers only knows some names (not "smollm", which splits digits one by one
    in llama.cpp) and never sets BPE `ignore_merges`, which llama.cpp and Meta's tokenizer.json use for
    Llama 3 ("llama-bpe"; without it 588 of Llama 3's whole-word tokens, e.g. " việc", split into pieces).
    We follow llama.cpp; an unknown `pre` is refused rather than guessed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from llama_jax.errors import InputError

ARCHITECTURE = "llama"
ROPE_FREQS = "rope_freqs.weight"

# Per-layer linear layers: HF module -> (GGUF name, bias flag in the config).
_LAYER_LINEARS = {
    "self_attn.q_proj": ("attn_q", "attention_bias"),
    "self_attn.k_proj": ("attn_k", "attention_bias"),
    "self_attn.v_proj": ("attn_v", "attention_bias"),
    "self_attn.o_proj": ("attn_output", "attention_bias"),
    "mlp.gate_proj": ("ffn_gate", "mlp_bias"),
    "mlp.up_proj": ("ffn_up", "mlp_bias"),
    "mlp.down_proj": ("ffn_down", "mlp_bias"),
}
_LAYER_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


# ----------------------------------------------------------------------------------------------------
# Metadata -> config


def _int(metadata: Mapping, key: str, path, default: int | None = None) -> int:
    """Metadata integer `key`, or `default` when absent; `InputError` if absent without default or not an int."""
    value = metadata.get(key, default)
    if value is None:
        raise InputError(path, f"metadata key {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(path, f"metadata key {key!r} should be a positive integer, not {value!r}")
    return value


def _float(metadata: Mapping, key: str, path, default: float | None = None) -> float:
    """Metadata number `key` as a float, or `default` when absent; `InputError` if absent or not a number."""
    value = metadata.get(key, default)
    if value is None:
        raise InputError(path, f"metadata key {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(path, f"metadata key {key!r} should be a number, not {value!r}")
    return float(value)


def _head_dim(metadata: Mapping, hidden: int, n_heads: int, path) -> int:
    """Per-head width: attention.key_length, else hidden / heads; value and rope widths must agree."""
    a = ARCHITECTURE
    head_dim = _int(metadata, f"{a}.attention.key_length", path, default=hidden // n_heads)
    for key in (f"{a}.attention.value_length", f"{a}.rope.dimension_count"):
        if _int(metadata, key, path, default=head_dim) != head_dim:
            raise InputError(path, f"metadata key {key!r} is {metadata[key]}, but heads are {head_dim} wide; "
                                   f"LlamaForCausalLM needs them equal")
    if head_dim % 2:
        raise InputError(path, f"head width {head_dim} is odd; rope needs it even")
    return head_dim


def hf_config_from_metadata(metadata: Mapping, tensor_names: set[str], n_tokens: int | None,
               rope_freqs: np.ndarray | None, path) -> dict:
    """The Hugging Face LlamaForCausalLM config.json dict the metadata and tensor list describe."""
    a = ARCHITECTURE
    hidden = _int(metadata, f"{a}.embedding_length", path)
    n_heads = _int(metadata, f"{a}.attention.head_count", path)
    n_kv_heads = _int(metadata, f"{a}.attention.head_count_kv", path, default=n_heads)
    if n_heads % n_kv_heads:
        raise InputError(path, f"{n_heads} attention heads cannot be shared among {n_kv_heads} key/value heads")
    head_dim = _head_dim(metadata, hidden, n_heads, path)
    rope_theta = _float(metadata, f"{a}.rope.freq_base", path, default=10000.0)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": _int(metadata, f"{a}.vocab_size", path, default=n_tokens),
        "hidden_size": hidden,
        "intermediate_size": _int(metadata, f"{a}.feed_forward_length", path),
        "num_hidden_layers": _int(metadata, f"{a}.block_count", path),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _float(metadata, f"{a}.attention.layer_norm_rms_epsilon", path),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(metadata, rope_freqs, head_dim, rope_theta, path),
        "max_position_embeddings": _int(metadata, f"{a}.context_length", path),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,
    }
    for field, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                       ("pad_token_id", "padding_token_id")):
        if (token_id := metadata.get(f"tokenizer.ggml.{key}")) is not None:
            config[field] = token_id
    return config


def generation_config_from_metadata(metadata: Mapping) -> dict:
    """generation_config.json dict: bos / pad ids and every stop id the file names (eos, eot, eom)."""
    stop_ids = list(dict.fromkeys(metadata[f"tokenizer.ggml.{kind}_token_id"] for kind in ("eos", "eot", "eom")
                                  if f"tokenizer.ggml.{kind}_token_id" in metadata))
    config = {}
    if "tokenizer.ggml.bos_token_id" in metadata:
        config["bos_token_id"] = metadata["tokenizer.ggml.bos_token_id"]
    if stop_ids:
        config["eos_token_id"] = stop_ids[0] if len(stop_ids) == 1 else stop_ids
    if "tokenizer.ggml.padding_token_id" in metadata:
        config["pad_token_id"] = metadata["tokenizer.ggml.padding_token_id"]
    return config


# ----------------------------------------------------------------------------------------------------
# Rope scaling


def _rope_wavelengths(head_dim: int, rope_theta: float) -> np.ndarray:
    """[head_dim / 2] wavelengths 2 pi / theta_i of plain rope, theta_i = rope_theta ** (-2i / head_dim).

    The frequencies are computed in float32, as llama.cpp's converter does before baking rope_freqs.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    freqs = 1.0 / (np.float32(rope_theta) ** exponents)
    return 2 * math.pi / freqs.astype(np.float64)


def _llama3_rope_factors(scaling: Mapping, head_dim: int, rope_theta: float) -> np.ndarray:
    """The [head_dim / 2] frequency divisors llama.cpp's converter writes as rope_freqs.weight.

    `scaling` is an HF llama3 rope_scaling dict (factor, low/high_freq_factor, original_max_position_embeddings).
    """
    wavelen = _rope_wavelengths(head_dim, rope_theta)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    smooth = (context / wavelen - low) / (high - low)
    medium = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < context / high, 1.0, np.where(wavelen > context / low, factor, medium))


def _fit_llama3_rope_scaling(rope_freqs: np.ndarray, head_dim: int, rope_theta: float) -> dict | None:
    """The llama3 rope_scaling dict whose factors are `rope_freqs` [head_dim / 2], or None if none fits.

    Between the two cut-off wavelengths a factor f gives smooth = (1/f - 1/factor) / (1 - 1/factor),
    which is linear in 1 / wavelength: (context / wavelen - low) / (high - low). The factors fix only the
    ratios context/low and context/high, so low_freq_factor is taken as 1 (Meta's value) and the rest
    solved from a line through the in-between factors.
    """
    factor = float(rope_freqs.max())
    medium = (rope_freqs > 1 + 1e-6) & (rope_freqs < factor * (1 - 1e-6))
    if medium.sum() < 2:
        return None
    inverse_wavelen = 1 / _rope_wavelengths(head_dim, rope_theta)[medium]
    smooth = (1 / rope_freqs[medium].astype(np.float64) - 1 / factor) / (1 - 1 / factor)
    # smooth = slope / wavelen + intercept, with slope = context / (high - low) and intercept = -low / (high - low)
    slope, intercept = np.polyfit(inverse_wavelen, smooth, 1)
    if intercept >= 0:
        return None
    scaling = {
        "rope_type": "llama3",
        "factor": round(factor, 4),
        "low_freq_factor": 1.0,
        "high_freq_factor": round(1 - 1 / intercept, 4),
        "original_max_position_embeddings": round(-slope / intercept),
    }
    refit = _llama3_rope_factors(scaling, head_dim, rope_theta)
    return scaling if np.allclose(refit, rope_freqs, rtol=1e-4, atol=0) else None


def _rope_scaling(metadata: Mapping, rope_freqs: np.ndarray | None, head_dim: int, rope_theta: float,
                  path) -> dict | None:
    """HF rope_scaling: llama3 parameters refitted from rope_freqs.weight, or None without that tensor."""
    kind = metadata.get(f"{ARCHITECTURE}.rope.scaling.type", "none")
    if kind != "none":
        raise InputError(path, f"rope scaling type {kind!r} is not supported (only llama3 via rope_freqs.weight)")
    if rope_freqs is None:
        return None
    if rope_freqs.shape != (head_dim // 2,):
        raise InputError(path, f"tensor {ROPE_FREQS!r} has shape {rope_freqs.shape}, expected ({head_dim // 2},)")
    scaling = _fit_llama3_rope_scaling(rope_freqs, head_dim, rope_theta)
    if scaling is None:
        raise InputError(path, f"tensor {ROPE_FREQS!r} does not hold llama3 rope scaling factors")
    return scaling


# ----------------------------------------------------------------------------------------------------
# Tensors


def tensor_plan(config: Mapping) -> dict[str, tuple[str, tuple[int, ...]]]:
    """HF name -> (GGUF name, HF shape) of every tensor a file with this config holds, in HF order."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    ffn = config["intermediate_size"]
    linear_shapes = {
        "self_attn.q_proj": (q_rows, hidden), "self_attn.k_proj": (kv_rows, hidden),
        "self_attn.v_proj": (kv_rows, hidden), "self_attn.o_proj": (hidden, q_rows),
        "mlp.gate_proj": (ffn, hidden), "mlp.up_proj": (ffn, hidden), "mlp.down_proj": (hidden, ffn),
    }
    plan = {"model.embed_tokens.weight": ("token_embd.weight", (vocab, hidden))}
    for layer in range(config["num_hidden_layers"]):
        for module, (gguf_module, bias_flag) in _LAYER_LINEARS.items():
            hf, gg = f"model.layers.{layer}.{module}", f"blk.{layer}.{gguf_module}"
            plan[f"{hf}.weight"] = (f"{gg}.weight", linear_shapes[module])
            if config[bias_flag]:
                plan[f"{hf}.bias"] = (f"{gg}.bias", linear_shapes[module][:1])
        for module, gguf_module in _LAYER_NORMS.items():
            plan[f"model.layers.{layer}.{module}.weight"] = (f"blk.{layer}.{gguf_module}.weight", (hidden,))
    plan["model.norm.weight"] = ("output_norm.weight", (hidden,))
    if not config["tie_word_embeddings"]:
        plan["lm_head.weight"] = ("output.weight", (vocab, hidden))
    return plan


def check_tensors(plan: Mapping[str, tuple[str, tuple[int, ...]]], tensors: Mapping, path) -> None:
    """Refuse the file unless it holds exactly the planned tensors (plus rope_freqs), each of its shape."""
    expected = {gguf_name: shape for gguf_name, shape in plan.values()}
    if missing := sorted(set(expected) - set(tensors)):
        raise InputError(path, f"missing tensor(s) {', '.join(missing[:5])} that the metadata implies")
    if unexpected := sorted(set(tensors) - set(expected) - {ROPE_FREQS}):
        raise InputError(path, f"unexpected tensor(s) {', '.join(unexpected[:5])} for a llama model")
    for gguf_name, shape in expected.items():
        actual = tuple(int(n) for n in reversed(tensors[gguf_name].shape))  # ggml lists the fastest dim first
        if actual != shape:
            raise InputError(path, f"tensor {gguf_name!r} has shape {list(actual)}, "
                                   f"but the metadata implies {list(shape)}")


def rope_heads(hf_name: str, config: Mapping) -> int | None:
    """How many heads llama.cpp permuted `hf_name`'s rows over: q_proj and k_proj only, else None."""
    if ".self_attn.q_proj." in hf_name:
        return config["num_attention_heads"]
    if ".self_attn.k_proj." in hf_name:
        return config["num_key_value_heads"]
    return None


def unpermute_rope_rows(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rope row permutation of a q/k weight [heads * head_dim, in] or bias [heads * head_dim].

    llama.cpp's converter stores each head's rows pairwise interleaved -- (0, d/2, 1, d/2 + 1, ...) -- for
    its adjacent-pair rope; Hugging Face's rotate-half rope wants the halves contiguous (0, 1, ..., d-1).
    """
    head_dim = weights.shape[0] // n_heads
    per_head = weights.reshape(n_heads, head_dim // 2, 2, *weights.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weights.shape)
