"""Grouped-query self-attention with RoPE and an optional KV cache; K/V are never repeated per query head."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.model.cache import load, store
from llama_jax.model.config import LlamaConfig
from llama_jax.model.paged import Pages, grouped_queries, paged_attend, paged_store
from llama_jax.model.rope import apply_rope, inverse_frequencies
from llama_jax.model.sharding import constrain
from llama_jax.model.weights import project, weight

# A finite "minus infinity": a row whose keys are all masked (padding) gets a uniform softmax, never NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def causal_mask(seq: int, kv_len: int, q_offset: jax.Array | int) -> jax.Array:
    """bool `[1 or batch, seq, kv_len]`: query i (at slot q_offset + i) sees slots 0 .. q_offset + i.
    q_offset: a scalar, or `[batch]` (each row's own)."""
    offset = jnp.reshape(q_offset, (-1, 1, 1))
    return jnp.arange(kv_len)[None, None, :] <= offset + jnp.arange(seq)[None, :, None]


def attention_mask(q_segments: jax.Array, kv_segments: jax.Array, q_offset: jax.Array | int) -> jax.Array:
    """Which keys each query may see: causal by slot, same segment, and never an empty/padding slot.

    q_segments `[batch, seq]`, kv_segments `[batch, kv_len]` (0 = padding/empty), q_offset = slot of query 0 (a
    scalar or `[batch]`). Returns bool `[batch, seq, kv_len]`. Segments keep packed examples apart; left padding is
    segment 0.
    """
    causal = causal_mask(q_segments.shape[1], kv_segments.shape[1], q_offset)
    same = q_segments[:, :, None] == kv_segments[:, None, :]
    return causal & same & (kv_segments[:, None, :] != 0)


# How `Attention` computes softmax(q k^T) v (forward's `attention=`): "xla" is `attend` below, on any backend;
# "cudnn" is cuDNN's fused flash attention (`jax.nn.dot_product_attention`; a GPU, 16-bit compute) for every call
# with more than one query (prefill, training), and `attend` for one-token decode steps.
ATTENTION_IMPLS = ("xla", "cudnn")

# Queries per block in `attend`: a long prompt attends block by block, each block to the keys it can see.
QUERY_BLOCK = 256


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, block: int = QUERY_BLOCK
           ) -> jax.Array:
    """Softmax attention, scores and softmax in float32.

    q `[batch, seq, heads, head_dim]`, k/v `[batch, kv_heads, kv_len, head_dim]`, mask `[batch, seq, kv_len]`,
    causal as `attention_mask` makes it: query i sees no slot after kv_len - seq + i (the queries are the last
    tokens written); mask None: that causal rule alone. Query head h reads kv head h // (heads // kv_heads), as
    in the reference. Queries go in blocks of `block`, each against only the slots it may see: causal attention
    over a long prompt computes about half the scores, and holds one block's scores at a time.
    Returns `[batch, seq, heads, head_dim]`.
    """
    seq, kv_len = q.shape[1], k.shape[2]
    if mask is None:
        mask = causal_mask(seq, kv_len, kv_len - seq)
    blocks = []
    for start in range(0, seq, block):
        stop = min(start + block, seq)
        visible = kv_len - seq + stop
        blocks.append(_attend_block(q[:, start:stop], k[:, :, :visible], v[:, :, :visible],
                                    mask[:, start:stop, :visible]))
    return blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=1)


def _attend_block(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """`attend` for one block of queries, over every slot given."""
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    q, spec = grouped_queries(q, kv_heads)
    scores = jnp.einsum(f"{spec},bktd->bkgst", q, k, preferred_element_type=jnp.float32) * head_dim**-0.5
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    # Heads-major output, transposed after: asking XLA:CPU for `bskgd` directly picks a batched dot 5x slower.
    out = jnp.einsum("bkgst,bktd->bkgsd", probs, v)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, heads, head_dim)


def attend_fused(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *, causal: bool,
                 implementation: str) -> jax.Array:
    """`attend` through `jax.nn.dot_product_attention` (implementation "cudnn", or its "xla" reference).

    Shapes and mask as `attend`. causal: the mask allows nothing above the diagonal of a square seq x kv_len
    score matrix (a forward without a cache), so a fused kernel may skip those blocks; with mask None as well it
    reads no mask at all (cuDNN turns a mask into an additive bias, and computes that bias's gradient).
    """
    k, v = (t.transpose(0, 2, 1, 3) for t in (k, v))  # [batch, kv_len, kv_heads, head_dim]
    return jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None], is_causal=causal,
                                        implementation=implementation)


class Attention(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention: str = "xla"  # one of ATTENTION_IMPLS

    def project_in(self, name: str, x: jax.Array, heads_axis: str, heads: int) -> jax.Array:
        """x `[batch, seq, embed]` -> `[batch, seq, heads, head_dim]`."""
        c = self.config
        out = project("bse,ehd->bshd", x, weight(self, name, ("embed", heads_axis, "head_dim"),
                                                 (c.hidden_size, heads, c.head_dim)))
        if c.attention_bias:
            out = out + weight(self, f"{name}_bias", (heads_axis, "head_dim"), (heads, c.head_dim),
                               nn.initializers.zeros)
        return constrain(out, ("batch", "seq", heads_axis, "head_dim"))

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
                 cache: tuple[jax.Array, jax.Array] | None, layer: jax.Array | int, cache_index: jax.Array | int,
                 pages: Pages | None = None):
        """Self-attention over `x` and, when given, this layer's cached keys/values.

        x `[batch, seq, embed]`; positions `[batch, seq]` (RoPE positions); mask `[batch, seq, kv_len]`, or None
        for plain causal attention without a cache.
        cache: None, or every layer's (k, v, k_scale, v_scale) as KVCache holds them (`[layers, batch, kv_heads,
        max_len, head_dim]`; scales None unless int8); this layer's new keys and values are written in place at
        `[layer, :, :, cache_index : cache_index + seq]` (cache_index a scalar or `[batch]`) and attention reads
        that layer's first kv_len slots (kv_len <= max_len then, else seq).
        pages: with a paged cache (the pool's (k, v, k_scale, v_scale) as `cache`), where each row's tokens go
        and what they attend to (llama_jax.model.paged); mask and cache_index are unused then.
        Returns (`[batch, seq, embed]`, the updated cache or None).
        """
        c = self.config
        inv_freq = inverse_frequencies(c)
        q = apply_rope(self.project_in("q", x, "heads", c.num_attention_heads), positions, inv_freq)
        k = apply_rope(self.project_in("k", x, "kv_heads", c.num_key_value_heads), positions, inv_freq)
        v = self.project_in("v", x, "kv_heads", c.num_key_value_heads)
        k, v = (t.transpose(0, 2, 1, 3) for t in (k, v))  # [batch, kv_heads, seq, head_dim]
        if pages is not None:
            cache = paged_store(cache, k, v, layer, pages)
            out = paged_attend(q, cache, layer, pages, self.dtype)
        else:
            if cache is not None:
                cache = store(cache, k, v, layer, cache_index)
                k, v = load(cache, layer, self.dtype, mask.shape[-1])
            if self.attention == "cudnn" and q.shape[1] > 1:
                out = attend_fused(q, k, v, mask, causal=cache is None, implementation="cudnn")
            else:
                out = attend(q, k, v, mask)
        o = weight(self, "o", ("heads", "head_dim", "embed"), (c.num_attention_heads, c.head_dim, c.hidden_size))
        # As one [heads * head_dim, embed] matrix: contracting (heads, head_dim) as two axes lets XLA:CPU pick a
        # layout that transposes the whole weight at every call.
        out = project("bsf,fe->bse", out.reshape(*out.shape[:2], -1), o.reshape(-1, c.hidden_size))
        if c.attention_bias:
            out = out + weight(self, "o_bias", ("embed",), (c.hidden_size,), nn.initializers.zeros)
        return out, cache
