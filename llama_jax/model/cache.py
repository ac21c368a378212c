"""The static, preallocated key/value cache that the forward fills and reads."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llama_jax.model.config import LlamaConfig
from llama_jax.model.quant import quantize

# Logical axis names of the cache's arrays, for sharding.
CACHE_NAMES = ("layers", "batch", "kv_heads", "seq", "head_dim")


class KVCache(NamedTuple):
    """Keys and values of every layer for `max_len` slots, and which slots hold which segment.

    k, v:        `[layers, batch, kv_heads, max_len, head_dim]`, already rotated (RoPE applied to k). Slots are the
                 second-minor axis so that attention reads each head's keys as one contiguous matrix.
    segment_ids: `[batch, max_len]` int32; 0 = empty or padding (never attended to).
    index:       int32, the next slot to write: a scalar (all rows advance together; rows differ by left padding,
                 as `Engine` fills them).
    k_scale, v_scale: float32 `[layers, batch, kv_heads, max_len, 1]` when k and v are int8 (symmetric, one scale
                 per token and head: the key is k * k_scale); None for a float cache.
    """

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    index: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens in total (prompt plus generated); `dtype` int8
    makes a quantized one (half the bytes of bfloat16, plus a float32 scale per token and head)."""
    shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
    scales = (None, None)
    if jnp.dtype(dtype) == jnp.int8:
        scales = tuple(jnp.zeros((*shape[:-1], 1), jnp.float32) for _ in range(2))
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, max_len), jnp.int32),
                   jnp.zeros((), jnp.int32), *scales)


def store(kv: tuple, k: jax.Array, v: jax.Array, layer: jax.Array | int, index: jax.Array | int) -> tuple:
    """Write one layer's new keys and values `[batch, kv_heads, seq, head_dim]` at slots index.. of that layer.

    kv: (k, v, k_scale, v_scale) of the whole cache, as KVCache holds them (scales None for a float cache); returns
    the same tuple updated. An int8 cache stores each token and head as int8 values and its absmax / 127.
    """
    cache_k, cache_v, k_scale, v_scale = kv
    if k_scale is None:
        return write_rows(cache_k, k, layer, index), write_rows(cache_v, v, layer, index), None, None
    k, v = (quantize(t, (t.ndim - 1,)) for t in (k, v))  # absmax over head_dim: a scale per token and head
    return (write_rows(cache_k, k.values, layer, index), write_rows(cache_v, v.values, layer, index),
            write_rows(k_scale, k.scale, layer, index), write_rows(v_scale, v.scale, layer, index))


def load(kv: tuple, layer: jax.Array | int, dtype, length: int | None = None) -> tuple[jax.Array, jax.Array]:
    """One layer's keys and values `[batch, kv_heads, length, head_dim]` in `dtype` (dequantized when int8): its
    first `length` slots (default all max_len), so a step reads only the slots that can hold tokens."""
    cache_k, cache_v, k_scale, v_scale = kv
    length = cache_k.shape[3] if length is None else length
    if k_scale is None:
        return cache_k[layer, :, :, :length].astype(dtype), cache_v[layer, :, :, :length].astype(dtype)
    return tuple((t[layer, :, :, :length].astype(jnp.float32) * s[layer, :, :, :length]).astype(dtype)
                 for t, s in ((cache_k, k_scale), (cache_v, v_scale)))


def write_rows(buffer: jax.Array, new: jax.Array, layer: jax.Array | int, index: jax.Array | int) -> jax.Array:
    """buffer `[layers, batch, kv_heads, max_len, d]` with new `[batch, kv_heads, seq, d]` written at
    `[layer, :, :, index : index + seq]`."""
    return write(buffer, new[None], (layer, 0, 0, index, 0))


def write(buffer: jax.Array, new: jax.Array, start: tuple) -> jax.Array:
    """`lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), start)`; 16-bit floats on their bits.

    XLA:CPU upcasts a bfloat16 dynamic-update-slice to float32 over the whole buffer (for a cache: every layer's
    keys, converted there and back at every layer of every step); on uint16 it writes the slice in place.
    """
    new = new.astype(buffer.dtype)
    if buffer.dtype.itemsize != 2:
        return jax.lax.dynamic_update_slice(buffer, new, start)
    bits = [jax.lax.bitcast_convert_type(a, jnp.uint16) for a in (buffer, new)]
    return jax.lax.bitcast_convert_type(jax.lax.dynamic_update_slice(*bits, start), buffer.dtype)
