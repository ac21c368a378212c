"""A paged KV cache: one pool of fixed-size blocks per layer, rows (requests) that hold blocks through block
tables, and attention over a row's own blocks.

A row's tokens sit in its blocks in order: token t (RoPE position t) in block `tables[row, t // block_size]` at
offset `t % block_size`. Block 0 is the null block: it is never given to a row, unused table entries point to it,
and padding tokens are written there, so it holds garbage that no one attends to.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from llama_jax.model.config import LlamaConfig
from llama_jax.model.quant import quantize

# Logical axis names of the pool's arrays, for sharding: heads over `tensor`, as the dense cache's.
POOL_NAMES = ("layers", None, "kv_heads", None, "head_dim")
NULL_BLOCK = 0
KV_CHUNK_TOKENS = 512  # tokens `paged_attend` reads per iteration for prompt chunks; block tables are padded to it
# ... and for one query per row (decode steps): fewer, as the gather copies every token of the span, the padding of a
# short context too (bench.paged_attention, 8 rows: 256 against 512 is 0.71x at 150 tokens, 1.05x at 1,000 and 3,000)
DECODE_KV_CHUNK_TOKENS = 256
# ... and for narrow prompt chunks (NARROW_QUERIES tokens a row or fewer, as the serving engine lays short prompts out)
# when every row's context is NARROW_CONTEXT tokens or fewer: fewer, as every row gathers the whole span whatever its
# width. Chosen at run time: over a long cached prefix the narrow span would take four times the iterations (1.15x
# the time of a 512 span, where from empty contexts it took 0.73-0.81x; SmolLM2, 16 and 4 rows of 30 tokens).
NARROW_QUERIES, NARROW_CONTEXT, NARROW_KV_CHUNK_TOKENS = 32, 256, 128
# A MASK_VALUE-like finite "minus infinity" (attention.py's): a query that sees no key gets a uniform softmax.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


class PagedCache(NamedTuple):
    """The pool. k, v: `[layers, blocks, kv_heads, block_size, head_dim]` (keys already rotated); k_scale, v_scale:
    float32 `[layers, blocks, kv_heads, block_size, 1]` when k and v are int8 (a scale per token and head, as the
    dense cache's), else None."""

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None


class Pages(NamedTuple):
    """Where one forward's tokens `[rows, q]` go and what they attend to.

    tables:    int32 `[rows, table_len]`, each row's block ids in order (NULL_BLOCK where it holds none);
               table_len a multiple of the attention's chunk of blocks.
    positions: int32 `[rows, q]`, each new token's position (= its place in the row); a padding token has one at or
               beyond its row's `lengths` and is neither written nor attended to.
    lengths:   int32 `[rows]`, the tokens the row holds once these are written (0: an idle row).
    """

    tables: jax.Array
    positions: jax.Array
    lengths: jax.Array


def init_paged_cache(config: LlamaConfig, blocks: int, block_size: int, dtype=jnp.float32) -> PagedCache:
    """An empty pool of `blocks` blocks of `block_size` tokens (block 0 the null block); int8 `dtype` quantizes."""
    shape = (config.num_hidden_layers, blocks, config.num_key_value_heads, block_size, config.head_dim)
    scales = (None, None)
    if jnp.dtype(dtype) == jnp.int8:
        scales = tuple(jnp.zeros((*shape[:-1], 1), jnp.float32) for _ in range(2))
    return PagedCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), *scales)


def copy_blocks(pool: PagedCache, sources: jax.Array, targets: jax.Array) -> PagedCache:
    """Blocks `sources` `[n]` copied over blocks `targets` `[n]` in every layer (a pair of null blocks copies
    nothing); for copy on write, where a request takes some of a cached block's tokens into a block of its own."""
    return jax.tree.map(lambda a: a.at[:, targets].set(a[:, sources], mode="promise_in_bounds"), pool)


def paged_store(pool: tuple, k: jax.Array, v: jax.Array, layer: jax.Array | int, pages: Pages) -> tuple:
    """Write one layer's new keys and values `[rows, kv_heads, q, head_dim]` into their rows' blocks.

    pool: (k, v, k_scale, v_scale) as PagedCache holds them; returns it updated. Padding tokens go to the null
    block. One scatter per array (in place: the pool is donated by the programs that run this).
    """
    block_size = pool[0].shape[3]
    lengths = pages.lengths[:, None]
    valid = pages.positions < lengths
    index = jnp.where(valid, pages.positions, 0) // block_size
    blocks = jnp.where(valid, jnp.take_along_axis(pages.tables, index, axis=1), NULL_BLOCK).reshape(-1)
    offsets = jnp.where(valid, pages.positions % block_size, 0).reshape(-1)

    def put(buffer, new):  # new `[rows, kv_heads, q, d]` -> one token per scatter index
        new = new.transpose(0, 2, 1, 3).reshape(-1, *new.shape[1:2], new.shape[3]).astype(buffer.dtype)
        return buffer.at[layer, blocks, :, offsets].set(new, mode="promise_in_bounds")

    cache_k, cache_v, k_scale, v_scale = pool
    if k_scale is None:
        return put(cache_k, k), put(cache_v, v), None, None
    k, v = (quantize(t, (t.ndim - 1,)) for t in (k, v))  # absmax over head_dim: a scale per token and head
    return put(cache_k, k.values), put(cache_v, v.values), put(k_scale, k.scale), put(v_scale, v.scale)


def _blocks(pool: tuple, layer, ids: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """Keys and values of blocks `ids` `[rows, n]` of one layer, as `[rows, kv_heads, n * block_size, head_dim]`
    in `dtype` (dequantized when int8)."""
    cache_k, cache_v, k_scale, v_scale = pool

    def read(buffer, scale):
        x = buffer[layer][ids]  # [rows, n, kv_heads, block_size, d]
        if scale is not None:
            x = x.astype(jnp.float32) * scale[layer][ids]
        rows, n, heads, size, d = x.shape
        return x.astype(dtype).transpose(0, 2, 1, 3, 4).reshape(rows, heads, n * size, d)

    return read(cache_k, k_scale), read(cache_v, v_scale)


def grouped_queries(q: jax.Array, kv_heads: int) -> tuple[jax.Array, str]:
    """Queries `[batch, seq, heads, head_dim]` grouped by their KV head, and their einsum spec: heads-major
    `[batch, kv_heads, group, seq, head_dim]` ("bkgsd") when seq > 1, else `[batch, 1, kv_heads, group, head_dim]`
    ("bskgd"). XLA:CPU runs the score dot of several queries at half the speed when q is not heads-major (512
    queries x 512 keys, SmolLM2's heads: 7.9 against 4.1 ms), and that of one query 1.3x slower when it is."""
    batch, seq, heads, head_dim = q.shape
    q = q.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim)
    return (q, "bskgd") if seq == 1 else (q.transpose(0, 2, 3, 1, 4), "bkgsd")


def chunk_blocks(block_size: int, decode: bool = False) -> int:
    """Blocks `paged_attend` reads per iteration: for prompt chunks (block tables are padded to a multiple of it), or
    for one query per row (`decode`; a divisor of the former)."""
    return max(1, (DECODE_KV_CHUNK_TOKENS if decode else KV_CHUNK_TOKENS) // block_size)


def paged_attend(q: jax.Array, pool: tuple, layer: jax.Array | int, pages: Pages, dtype,
                 per_chunk: int | None = None) -> jax.Array:
    """Causal attention of queries q `[rows, q, heads, head_dim]` over their own rows' cached tokens.

    Query (r, i) at position p sees its row's tokens 0..p (those before `lengths[r]`). The row's blocks are read
    `per_chunk` at a time (a divisor of the tables' width; default `chunk_blocks(block_size, decode=q == 1)`, or for
    rows of NARROW_QUERIES or fewer, NARROW_KV_CHUNK_TOKENS' blocks when no row's context exceeds NARROW_CONTEXT)
    with an online softmax (scores and softmax in float32), for as many chunks as the longest row in the step needs:
    a step's cost follows the tokens attended, not the pool's size or the rows' maximum length. Returns
    `[rows, q, heads, head_dim]`.
    """
    rows, length, heads, head_dim = q.shape
    kv_heads, block_size = pool[0].shape[2], pool[0].shape[3]
    if per_chunk is None and 1 < length <= NARROW_QUERIES:
        narrow = max(1, min(NARROW_KV_CHUNK_TOKENS, KV_CHUNK_TOKENS) // block_size)
        return jax.lax.cond(jnp.max(pages.lengths) <= NARROW_CONTEXT,
                            functools.partial(paged_attend, dtype=dtype, per_chunk=narrow),
                            functools.partial(paged_attend, dtype=dtype, per_chunk=chunk_blocks(block_size)),
                            q, pool, layer, pages)
    if per_chunk is None:
        per_chunk = chunk_blocks(block_size, decode=length == 1)
    group, span = heads // kv_heads, per_chunk * block_size
    q, spec = grouped_queries(q, kv_heads)  # laid out once, before the loop
    q = q.astype(jnp.float32) * head_dim**-0.5
    chunks = (jnp.max(pages.lengths) + span - 1) // span

    def chunk(j, carry):
        top, total, acc = carry  # [rows, kv_heads, group, q] (x2), [rows, kv_heads, group, q, head_dim]
        ids = jax.lax.dynamic_slice_in_dim(pages.tables, j * per_chunk, per_chunk, axis=1)
        k, v = _blocks(pool, layer, ids, dtype)
        slot = j * span + jnp.arange(span)
        seen = (slot[None, None, :] <= pages.positions[:, :, None]) & (slot < pages.lengths[:, None])[:, None]
        scores = jnp.einsum(f"{spec},bktd->bkgst", q, k, preferred_element_type=jnp.float32)
        scores = jnp.where(seen[:, None, None], scores, MASK_VALUE)
        new_top = jnp.maximum(top, scores.max(axis=-1))
        probs = jnp.exp(scores - new_top[..., None])
        scale = jnp.exp(top - new_top)
        acc = acc * scale[..., None] + jnp.einsum("bkgst,bktd->bkgsd", probs.astype(v.dtype), v,
                                                  preferred_element_type=jnp.float32)
        return new_top, total * scale + probs.sum(axis=-1), acc

    shape = (rows, kv_heads, group, length)
    init = (jnp.full(shape, MASK_VALUE, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, head_dim), jnp.float32))
    _, total, acc = jax.lax.fori_loop(0, chunks, chunk, init)
    out = acc / jnp.maximum(total, 1e-30)[..., None]
    return out.transpose(0, 3, 1, 2, 4).reshape(rows, length, heads, head_dim).astype(dtype)
