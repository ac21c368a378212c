"""The Llama decoder as stateless Flax modules, and the one forward that inference and training share.

Params tree (L = num_hidden_layers; the decoder layer is one `nn.scan`, so its params carry a leading layer axis):

    embed                 [vocab, embed]
    layers/attn_norm/scale  [L, embed]
    layers/attn/{q,k,v}     [L, embed, heads|kv_heads, head_dim]   (+ {q,k,v}_bias [L, heads|kv_heads, head_dim])
    layers/attn/o           [L, heads, head_dim, embed]            (+ o_bias [L, embed])
    layers/mlp_norm/scale   [L, embed]
    layers/mlp/{gate,up}    [L, embed, mlp], layers/mlp/down [L, mlp, embed]   (+ *_bias)
    final_norm/scale      [embed]
    lm_head               [embed, vocab]   (absent when tie_word_embeddings)

`unstack_layers` turns `layers` into one subtree per layer (`layer_0` .. `layer_{L-1}`, no layer axis); `forward`
then runs the same decoder layer unrolled. Inference uses that: XLA:CPU copies each layer's slice of a stacked
weight before its matmul, every step, which costs a decode step about a fifth of its time (see BENCHMARKS.md).
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.model.attention import ATTENTION_IMPLS, Attention, attention_mask
from llama_jax.model.cache import KVCache
from llama_jax.model.config import LlamaConfig
from llama_jax.model.mlp import MLP
from llama_jax.model.paged import PagedCache, Pages
from llama_jax.model.norm import RMSNorm
from llama_jax.model.sharding import constrain, logical_to_spec, tree_shardings
from llama_jax.model.quant import QuantArray, check_quantization, quantize_tree
from llama_jax.model.weights import INIT, cast, lookup, project

# The compute dtypes the programs offer (`--dtype`); params may be stored in any float dtype.
COMPUTE_DTYPES = ("float32", "bfloat16")
Remat = Literal["none", "full", "dots"]
HEAD_SLICE_BYTES = 256 << 20  # see vocab_logits
# What the backward pass may keep instead of recomputing: "full" keeps nothing, "dots" keeps matmul outputs.
REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


class DecoderLayer(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, carry, layer, positions, mask, cache_index, pages):
        """One pre-norm block. carry: (x `[batch, seq, embed]`, the whole KV cache or paged pool (k, v, k_scale,
        v_scale), or None); layer: this layer's index into the cache; see Attention for the rest.

        Shaped for `nn.scan`: (carry, scanned=layer) -> (carry, None).
        """
        x, cache = carry
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h, cache = Attention(c, **kw, attention=self.attention, name="attn")(
            RMSNorm(c.rms_norm_eps, self.param_dtype, name="attn_norm")(x), positions, mask, cache, layer,
            cache_index, pages)
        x = x + h
        x = x + MLP(c, **kw, name="mlp")(RMSNorm(c.rms_norm_eps, self.param_dtype, name="mlp_norm")(x))
        return (constrain(x, ("batch", "seq", "embed")), cache), None


class Llama(nn.Module):
    """Token ids -> float32 logits (and the updated KV cache). Use `forward` rather than this class directly."""

    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: Remat = "none"
    last_only: bool = False  # logits for the last position only (prefill needs no more)
    scan_layers: bool = True  # params stacked under `layers` (one nn.scan), or one `layer_{i}` each (unrolled)
    attention: str = "xla"  # see llama_jax.attention.ATTENTION_IMPLS
    kv_len: int | None = None  # with a cache: attend over its first kv_len slots only (default all)
    hidden: bool = False  # return (final-normed hidden states, the head weight) instead of (logits, cache)

    @nn.compact
    def __call__(self, tokens, positions, segment_ids, cache: KVCache | PagedCache | None,
                 pages: Pages | None = None):
        c = self.config
        embed = self.param("embed", nn.with_logical_partitioning(INIT, ("vocab", "embed")),
                           (c.vocab_size, c.hidden_size), self.param_dtype)
        x = constrain(lookup(embed, tokens, self.dtype), ("batch", "seq", "embed"))

        offset, kv, mask = 0, None, None  # no cache, one causal sequence per row: no mask array is needed
        if pages is not None:  # a paged pool: `pages` says where the tokens go and what they see
            kv = tuple(cache)
        elif cache is not None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32) if segment_ids is None else segment_ids
            offset, kv = cache.index, (cache.k, cache.v, cache.k_scale, cache.v_scale)
            kv_segments = write_segments(cache.segment_ids, segment_ids, offset)
            mask = attention_mask(segment_ids, kv_segments[:, :self.kv_len], offset)
        elif segment_ids is not None:
            mask = attention_mask(segment_ids, segment_ids, 0)

        layer = DecoderLayer
        if self.remat != "none":  # CSE is harmless inside a scan; unrolled, it would merge the recomputation with
            # the forward and keep what remat is meant to drop (e.g. every layer's converted int8 weights)
            layer = nn.remat(DecoderLayer, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers)
        carry, layer_args = (x, kv), (positions, mask, offset, pages)
        if self.scan_layers:
            layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                             in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                             length=c.num_hidden_layers,
                             metadata_params={nn.PARTITION_NAME: "layers"})
            carry, _ = layers(c, self.dtype, self.param_dtype, self.attention, name="layers")(
                carry, jnp.arange(c.num_hidden_layers), *layer_args)
        else:
            for i in range(c.num_hidden_layers):
                carry, _ = layer(c, self.dtype, self.param_dtype, self.attention, name=f"layer_{i}")(
                    carry, i, *layer_args)
        x, kv = carry

        if self.last_only:
            x = x[:, -1:]
        x = RMSNorm(c.rms_norm_eps, self.param_dtype, name="final_norm")(x)
        if c.tie_word_embeddings:
            head = embed.T
        else:
            head = self.param("lm_head", nn.with_logical_partitioning(INIT, ("embed", "vocab")),
                              (c.hidden_size, c.vocab_size), self.param_dtype)
        head = cast(head, self.dtype)
        if self.hidden:
            return x, head
        logits = constrain(vocab_logits(x, head), ("batch", "seq", "vocab"))
        if pages is not None:
            cache = PagedCache(*kv)
        elif cache is not None:
            cache = KVCache(kv[0], kv[1], kv_segments, offset + tokens.shape[1], kv[2], kv[3])
        return logits, cache


def write_segments(kv_segments: jax.Array, segment_ids: jax.Array, offset: jax.Array) -> jax.Array:
    """The cache's segment ids `[batch, max_len]` with segment_ids `[batch, seq]` written at slots offset.."""
    return jax.lax.dynamic_update_slice(kv_segments, segment_ids, (0, offset))


def vocab_logits(x: jax.Array, head: jax.Array | QuantArray) -> jax.Array:
    """x `[batch, seq, embed]` @ head `[embed, vocab]` -> float32 logits `[batch, seq, vocab]`.

    On a CPU, for a single token (batch 1: a decode step, a last-only prefill) and a head narrower than float32
    (bfloat16, int8) whose vocabulary is not sharded, the head is multiplied in slices of at most HEAD_SLICE_BYTES
    (as float32): XLA:CPU turns that product into a float32 one over the whole converted head, 2 GB more memory for
    Llama 3 8B in bfloat16 (13% of its weights); sliced, it holds one converted slice at a time. Elsewhere it is one
    product (on a GPU the slices would be copies, for nothing).
    """
    mesh = jax.sharding.get_abstract_mesh()
    sharded = not mesh.empty and any(logical_to_spec(("embed", "vocab"), head.shape, dict(mesh.shape)))
    width = max(1, HEAD_SLICE_BYTES // (head.shape[0] * 4))
    if (jax.default_backend() != "cpu" or x.shape[0] * x.shape[1] != 1 or head.dtype.itemsize >= 4 or sharded
            or width >= head.shape[1]):
        return project("bse,ev->bsv", x, head, jnp.float32)
    return jnp.concatenate([project("bse,ev->bsv", x, head[:, start:start + width], jnp.float32)
                            for start in range(0, head.shape[1], width)], axis=-1)


def forward(params: Any, tokens: jax.Array, config: LlamaConfig, *, positions: jax.Array | None = None,
            segment_ids: jax.Array | None = None, cache: KVCache | PagedCache | None = None, dtype=jnp.float32,
            remat: Remat = "none", last_only: bool = False, attention: str = "xla", kv_len: int | None = None,
            pages: Pages | None = None, hidden: bool = False) -> tuple[jax.Array, KVCache | PagedCache | None]:
    """The model: token ids `[batch, seq]` -> float32 logits `[batch, seq, vocab]` and the updated cache.

    positions:   `[batch, seq]` RoPE positions; default 0.. (after the cache's filled slots, if any).
    segment_ids: `[batch, seq]` int; tokens attend only to earlier tokens of the same segment; 0 marks padding.
                 Default: all ones (one causal sequence per row).
    cache:       a `KVCache` to append these tokens to (slots cache.index .., per row when the index is `[batch]`),
                 or None for a plain forward.
    kv_len:      with a cache, attend over its first kv_len slots only (they must hold every slot written so far
                 and these tokens): a step's cost then follows the tokens cached, not the cache's size.
    pages:       with a `PagedCache` as `cache`: each row's block table, the tokens' positions (the default
                 `positions`) and the rows' lengths (llama_jax.model.paged); segment_ids and kv_len are unused.
    dtype:       compute dtype (params are cast to it; norms, softmax and logits stay float32).
    remat:       rematerialisation policy of each layer for training: none, full, or dots (save matmul outputs).
    last_only:   return logits `[batch, 1, vocab]` for the last position only (a prefill needs no others).
    attention:   "xla" (any backend) or "cudnn" (a GPU and a 16-bit dtype; see llama_jax.model.attention).
    hidden:      return (the final-normed hidden states `[batch, seq, embed]`, the head `[embed, vocab]` in the
                 compute dtype) instead: for a loss that applies the head a slice of the vocabulary at a time.
    params:      stacked (`layers`, as `init_params` and checkpoints make them) or from `unstack_layers`.
    Jit it with `config`, `dtype`, `remat`, `last_only`, `attention`, `kv_len` and `hidden` static.
    """
    check_attention(attention, dtype)
    if positions is None and pages is not None:
        positions = pages.positions
    if positions is None:
        start = 0 if cache is None else jnp.reshape(cache.index, (-1, 1))
        positions = jnp.broadcast_to(start + jnp.arange(tokens.shape[1]), tokens.shape)
    model = Llama(config, dtype=dtype, remat=remat, last_only=last_only, scan_layers="layers" in params,
                  attention=attention, kv_len=kv_len, hidden=hidden)
    return model.apply({"params": params}, tokens, positions, segment_ids, cache, pages)


def check_attention(attention: str, dtype, backend: str | None = None) -> None:
    """ValueError unless `attention` is one of ATTENTION_IMPLS and runs in compute `dtype` (and, when given, on
    jax `backend`: the programs check that before loading anything)."""
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_IMPLS)}, got {attention!r}")
    if attention == "cudnn" and jnp.dtype(dtype).itemsize != 2:
        raise ValueError(f"cuDNN attention needs a 16-bit compute dtype (bfloat16), not {jnp.dtype(dtype).name}")
    if attention == "cudnn" and backend not in (None, "gpu"):
        raise ValueError(f"cuDNN attention needs a GPU; jax runs on {backend} here")


def unstack_layers(params: Any) -> Any:
    """Stacked params -> the same weights with `layers` split into `layer_0` .. `layer_{L-1}` (leading axis
    dropped), for an unrolled `forward`. The result is new arrays (jit it to keep a mesh layout)."""
    layers = params["layers"]
    rest = {name: value for name, value in params.items() if name != "layers"}
    count = jax.tree.leaves(layers)[0].shape[0]
    return rest | {f"layer_{i}": jax.tree.map(lambda a, i=i: a[i], layers) for i in range(count)}


def _boxed_init(config: LlamaConfig, param_dtype):
    model = Llama(config, param_dtype=param_dtype)
    dummy = jnp.zeros((1, 1), jnp.int32)
    return lambda rng: model.init(rng, dummy, dummy, dummy + 1, None)["params"]


@functools.lru_cache(maxsize=16)
def _abstract_init(config: LlamaConfig, param_dtype) -> tuple:
    """The boxed params tree of `init_params` as ShapeDtypeStructs, flattened (leaves, treedef): tracing the model's
    init takes about a tenth of a second, and checkpoints, loaders and shardings ask for it many times."""
    boxed = jax.eval_shape(_boxed_init(config, param_dtype), jax.random.key(0))
    return jax.tree.flatten(boxed, is_leaf=lambda p: isinstance(p, nn.Partitioned))


def _boxed_shapes(config: LlamaConfig, param_dtype) -> Any:
    """A new tree (its dicts the caller's own) of the cached `_abstract_init`."""
    leaves, treedef = _abstract_init(config, jnp.dtype(param_dtype))
    return jax.tree.unflatten(treedef, leaves)


def param_logical_names(config: LlamaConfig, *, unstacked: bool = False) -> Any:
    """The params tree with, at each leaf, the tuple of logical axis names of that weight (of the tree
    `unstack_layers` makes, when `unstacked`)."""
    boxed = _boxed_shapes(config, jnp.float32)
    names = jax.tree.map(lambda p: tuple(p.names), boxed, is_leaf=lambda p: isinstance(p, nn.Partitioned))
    if not unstacked:
        return names
    layer = jax.tree.map(lambda n: n[1:], names["layers"], is_leaf=lambda n: isinstance(n, tuple))
    return {k: v for k, v in names.items() if k != "layers"} | {
        f"layer_{i}": layer for i in range(config.num_hidden_layers)}


def param_shapes(config: LlamaConfig, dtype=jnp.float32, *, unstacked: bool = False,
                 quantization: str | None = None) -> Any:
    """The params tree of `jax.ShapeDtypeStruct`s (of `unstack_layers`' tree, when `unstacked`; with QuantArrays
    of them for `quantization` "int8"), computed without allocating anything."""
    shapes = nn.meta.unbox(_boxed_shapes(config, dtype))
    shapes = jax.eval_shape(unstack_layers, shapes) if unstacked else shapes
    if quantization is None:
        return shapes
    check_quantization(quantization)
    return jax.eval_shape(lambda p: quantize_tree(p, param_logical_names(config, unstacked=unstacked)), shapes)


def param_shardings(config: LlamaConfig, mesh: jax.sharding.Mesh, *, unstacked: bool = False,
                    quantization: str | None = None) -> Any:
    """The params tree of `NamedSharding`s on `mesh`, from the logical names and the sharding rules."""
    return tree_shardings(mesh, param_logical_names(config, unstacked=unstacked),
                          param_shapes(config, unstacked=unstacked, quantization=quantization))


def init_params(config: LlamaConfig, rng: jax.Array, *, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None
                ) -> Any:
    """Random params (normal(0.02) weights, unit norms, zero biases), created directly in their sharded layout."""
    init = _boxed_init(config, dtype)
    shardings = None if mesh is None else param_shardings(config, mesh)
    return jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)
