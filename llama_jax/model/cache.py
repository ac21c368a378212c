"""The static, preallocated key/value cache that the forward fills and reads."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llama_jax.model.config import LlamaConfig

# Logical axis names of the cache's arrays, for sharding.
CACHE_NAMES = ("layers", "batch", "kv_heads", "seq", "head_dim")


class KVCache(NamedTuple):
    """Keys and values of every layer for `max_len` slots, and which slots hold which segment.

    k, v:        `[layers, batch, kv_heads, max_len, head_dim]`, already rotated (RoPE applied to k). Slots are the
                 second-minor axis so that attention reads each head's keys as one contiguous matrix.
    segment_ids: `[batch, max_len]` int32; 0 = empty or padding (never attended to).
    index:       int32 scalar, the next slot to write (all rows advance together; rows differ by left padding).
    """

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    index: jax.Array


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens in total (prompt plus generated)."""
    shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))


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
