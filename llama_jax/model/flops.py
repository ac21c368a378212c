"""Model FLOPs per token (for MFU) and the machine's measured matmul peak."""

import time

import jax
import jax.numpy as jnp

from llama_jax.model.config import LlamaConfig


def matmul_params(config: LlamaConfig) -> int:
    """Weights that take part in a matmul per token: all but the embedding lookup (and norms)."""
    c = config
    attn = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * (attn + mlp) + c.hidden_size * c.vocab_size


def forward_flops_per_token(config: LlamaConfig, context: int) -> float:
    """Forward FLOPs for one token attending to `context` earlier tokens on average (causal: half the square)."""
    c = config
    attention = 2 * 2 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * context
    return 2 * matmul_params(config) + attention


def training_flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """Forward plus backward (3x forward) per token of a causal sequence of `seq_len` (mean context seq_len/2)."""
    return 3 * forward_flops_per_token(config, seq_len // 2)


def measured_peak_flops(dtype=jnp.float32, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` jitted `size`^3 matmuls on the default device: this machine's own ceiling."""
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
