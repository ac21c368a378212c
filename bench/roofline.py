"""What the hardware allows: bytes a decode step must read, FLOPs of a prefill and of a training step.

Pure functions of the config and shapes (no device needed), used by the CPU and GPU suites alike.
"""

from __future__ import annotations

import jax.numpy as jnp

from llama_jax.model import LlamaConfig, forward_flops_per_token, matmul_params, training_flops_per_token


def weight_bytes(config: LlamaConfig, dtype) -> int:
    """Bytes of the weights one decode step reads: every matmul weight once (lm_head / tied embedding included;
    the embedding lookup and the norms are negligible)."""
    return matmul_params(config) * jnp.dtype(dtype).itemsize


def kv_bytes_per_token(config: LlamaConfig, cache_dtype) -> int:
    """Bytes of cached keys and values that one token of context adds (all layers)."""
    c = config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * jnp.dtype(cache_dtype).itemsize


def decode_mean_context(prompt_len: int, new_tokens: int) -> float:
    """Mean number of cached tokens a decode step attends to while generating `new_tokens` after the prompt."""
    return prompt_len + new_tokens / 2


def decode_bytes_per_step(config: LlamaConfig, batch: int, context: float, dtype, cache_dtype=None) -> float:
    """Bytes read from memory by one decode step of `batch` rows at `context` cached tokens each."""
    return weight_bytes(config, dtype) + batch * context * kv_bytes_per_token(config, cache_dtype or dtype)


def decode_limit(config: LlamaConfig, batch: int, context: float, dtype, bandwidth: float, cache_dtype=None) -> float:
    """Roofline tokens/s of decode (all rows together): bandwidth / bytes per step x batch."""
    return bandwidth / decode_bytes_per_step(config, batch, context, dtype, cache_dtype) * batch


def decode_flops_per_step(config: LlamaConfig, batch: int, context: float) -> float:
    """Forward FLOPs of one decode step: `batch` tokens, each attending to `context` cached tokens."""
    return batch * forward_flops_per_token(config, int(context))


def prefill_flops(config: LlamaConfig, batch: int, prompt_len: int) -> float:
    """Forward FLOPs of a causal prompt of `prompt_len` tokens per row (mean context prompt_len/2)."""
    return batch * prompt_len * forward_flops_per_token(config, prompt_len // 2)


def train_flops(config: LlamaConfig, batch: int, seq_len: int) -> float:
    """Forward + backward FLOPs of one training step over `batch` x `seq_len` tokens (no remat recompute)."""
    return batch * seq_len * training_flops_per_token(config, seq_len)


def mfu(flops: float, seconds: float, peak: float) -> float:
    return flops / seconds / peak
