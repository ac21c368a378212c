"""Rotary position embedding in the rotate-half layout (the Hugging Face layout), with Llama 3.1 scaling."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.model.config import LlamaConfig


def inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """Per-pair rotation frequencies `[head_dim // 2]`, float32, computed in float32 exactly as the reference does."""
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = np.float32(1.0) / (np.float32(config.rope_theta) ** exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    factor = np.float32(scaling.factor)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = ((np.float32(scaling.original_max_position_embeddings) / wavelen - np.float32(scaling.low_freq_factor))
              / np.float32(scaling.high_freq_factor - scaling.low_freq_factor))
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate `x` `[batch, seq, heads, head_dim]` by `positions` `[batch, seq]`; angles and products in float32."""
    angles = positions.astype(jnp.float32)[:, :, None, None] * jnp.asarray(inv_freq)  # [batch, seq, 1, head_dim/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
