"""LoRA: a frozen weight plus a trainable low-rank update, W + scale * A B, applied inside `weights.project`.

A `LoraWeight` stands in the params tree where the plain weight (or its int8 `QuantArray`: QLoRA) was. For a weight
`[*in, *out]` (in: its contracted axes, `quant.input_axes`), `a` is `[*in, rank]` and `b` `[rank, *out]`; with
stacked layers all three carry the leading layer axis, so `nn.scan` slices them alike. The model math never sees
the difference: `project` adds `scale * (x a) b` to `x W`. Adapters live in their own tree (`init_adapters`), the
only thing a LoRA fine-tune differentiates; `attach` puts them on the frozen base for a forward.

Several adapters served from one base in one batch (S-LoRA, Punica): `attach_many` puts a `MultiLoraWeight` there
instead, the adapters' factors stacked (slot 0 zeros: the base alone) and gathered per row by the adapter ids that
`select_adapters` sets into the tree inside the jitted program.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from llama_jax.model.quant import QuantArray, input_axes

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


class AdaptedWeight:
    """A frozen base weight with LoRA factors `a` (`leading` axes before its input axes) and `b`: the model sees the
    base's shape and dtype, and reshapes both alike."""

    leading = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape

    @property
    def dtype(self) -> jnp.dtype:
        return self.base.dtype

    def reshape(self, *shape: int):
        """Merging input axes only (o's `[heads, head_dim, embed]` -> `[heads * head_dim, embed]`)."""
        outputs = self.b.ndim - 1 - self.leading
        if tuple(shape[len(shape) - outputs:]) != tuple(self.base.shape[self.base.ndim - outputs:]):
            raise ValueError(f"cannot reshape a {self.shape} {type(self).__name__} to {shape}")
        a = self.a.reshape(*self.a.shape[:self.leading], *shape[:len(shape) - outputs], self.a.shape[-1])
        return self.replace(base=self.base.reshape(*shape), a=a)


@struct.dataclass
class LoraWeight(AdaptedWeight):
    """base (frozen; first leaf, so Flax's param shape check sees it), a `[*in, rank]`, b `[rank, *out]`; with
    `dropout` > 0 and a `key` (raw key data `[..., 2]`, per layer when stacked), x is dropped out before a, as PEFT
    does in training."""

    base: jax.Array | QuantArray
    a: jax.Array
    b: jax.Array
    scale: float = struct.field(pytree_node=False)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    key: jax.Array | None = None


@struct.dataclass
class MultiLoraWeight(AdaptedWeight):
    """Several adapters over one base (first leaf, as LoraWeight's): a `[adapters, *in, rank]`, b `[adapters, rank,
    *out]`, scale float32 `[adapters]` (with stacked layers all with the leading layer axis); slot 0 is zeros (the
    base alone), smaller ranks are zero-padded. ids `[batch]`: each row's slot (None: every row the base alone)."""

    leading = 1

    base: jax.Array | QuantArray
    a: jax.Array
    b: jax.Array
    scale: jax.Array
    ids: jax.Array | None = None


def low_rank(spec: str, x: jax.Array, w: LoraWeight | MultiLoraWeight) -> jax.Array:
    """`scale * (x a) b` for `jnp.einsum(spec, x, W)` (`spec` puts W's output axes last, as `project` requires),
    accumulated in float32: x `[batch, seq, ..., *in]` -> float32 `[batch, seq, ..., *out]`; with a MultiLoraWeight,
    each row of x with its own adapter's a, b and scale (0 without ids). A decode step (seq 1) reads every adapter's
    factors once and masks the others' out; a longer x (a prefill) gathers each row's own, once for all its tokens
    (computing every adapter's would multiply the low-rank FLOPs by their number)."""
    if isinstance(w, MultiLoraWeight):
        if w.ids is None:
            return jnp.zeros((), jnp.float32)
        if x.shape[1] == 1:
            h = factors(spec, x, w.a, w.b, mask=jax.nn.one_hot(w.ids, w.scale.shape[-1], dtype=jnp.float32))
        else:
            h = factors(spec, x, w.a[w.ids], w.b[w.ids], per_row=True)
        return w.scale[w.ids].reshape(-1, *(1,) * (h.ndim - 1)) * h
    if w.dropout > 0 and w.key is not None:
        keep = jax.random.bernoulli(jax.random.wrap_key_data(w.key), 1 - w.dropout, x.shape)
        x = jnp.where(keep, x / (1 - w.dropout), 0).astype(x.dtype)
    return w.scale * factors(spec, x, w.a, w.b)


def factors(spec: str, x: jax.Array, a: jax.Array, b: jax.Array, *, per_row: bool = False,
            mask: jax.Array | None = None) -> jax.Array:
    """`(x a) b` in float32 for `jnp.einsum(spec, x, W)`. per_row: a and b lead with x's first (batch) axis, each
    row its own; mask `[batch, n]`: a and b lead with an axis of n adapters, each row summing over them weighted by
    its mask row (a one-hot row: that adapter's exactly)."""
    inputs, out = spec.split("->")
    x_axes, w_axes = inputs.split(",")
    contracted = "".join(c for c in w_axes if c in x_axes)
    kept = "".join(c for c in x_axes if c not in contracted)
    r, n = next(c for c in "rzyxwq" if c not in spec), next(c for c in "nmlkji" if c not in spec)
    lead = x_axes[0] if per_row else n if mask is not None else ""
    inner = n if mask is not None else ""  # h's axis of adapters, masked
    h = jnp.einsum(f"{x_axes},{lead}{contracted}{r}->{kept}{inner}{r}", x, a, preferred_element_type=jnp.float32)
    if mask is not None:
        h = h * mask.reshape(mask.shape[0], *(1,) * (h.ndim - 3), mask.shape[1], 1)
    return jnp.einsum(f"{kept}{inner}{r},{lead}{r}{w_axes.replace(contracted, '')}->{out}", h.astype(x.dtype), b,
                      preferred_element_type=jnp.float32)


def adapter_shapes(path: tuple[str, ...], names: tuple[str | None, ...], shape: tuple[int, ...], rank: int
                   ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of a and b for the weight at params `path` of logical `names` and `shape` (layer axes kept)."""
    contracted = input_axes(path, names)
    layers = tuple(n for n, name in zip(shape, names, strict=True) if name == "layers")
    outputs = tuple(n for i, n in enumerate(shape) if i not in contracted and names[i] != "layers")
    return layers + tuple(shape[i] for i in contracted) + (rank,), layers + (rank,) + outputs


def init_adapters(shapes: Any, logical_names: Any, *, rank: int, targets: tuple[str, ...], rng: jax.Array) -> Any:
    """{path...: {"a", "b"}} for every weight named in `targets`, float32: a ~ U(+-1/sqrt(fan_in)) as PEFT's
    kaiming-uniform(sqrt 5) init, b = 0 (so the model starts as the base). `shapes`/`logical_names`: the params tree
    of arrays or ShapeDtypeStructs and of axis names (`param_shapes`, `param_logical_names`)."""
    flat = jax.tree_util.tree_flatten_with_path(logical_names, is_leaf=lambda n: isinstance(n, tuple))[0]
    leaves = dict(zip((tuple(k.key for k in p) for p, _ in flat),
                      jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, QuantArray)), strict=True))
    adapters: dict = {}
    for index, (keys, names) in enumerate(flat):
        path = tuple(k.key for k in keys)
        if path[-1] not in targets:
            continue
        a_shape, b_shape = adapter_shapes(path, names, tuple(leaves[path].shape), rank)
        fan_in = math.prod(a_shape[len(a_shape) - 1 - len(input_axes(path, names)):-1])
        bound = 1 / math.sqrt(fan_in)
        node = adapters
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = {"a": jax.random.uniform(jax.random.fold_in(rng, index), a_shape, jnp.float32, -bound, bound),
                          "b": jnp.zeros(b_shape, jnp.float32)}
    return adapters


def attach(params: Any, adapters: Any, scale: float, *, dropout: float = 0.0, key: jax.Array | None = None) -> Any:
    """The params with each adapted weight replaced by `LoraWeight(weight, a, b, scale)`; with `dropout` and a PRNG
    `key`, each gets its own dropout key (one per layer for stacked weights)."""
    result = dict(params)
    for index, (keys, pair) in enumerate(_pairs(adapters)):
        leaf_key = None
        if dropout > 0 and key is not None:
            leaf_key = jax.random.fold_in(key, index)
            if keys[0] == "layers":
                leaf_key = jax.random.split(leaf_key, pair["a"].shape[0])
            leaf_key = jax.random.key_data(leaf_key)
        _replace(result, keys, functools.partial(LoraWeight, a=pair["a"], b=pair["b"], scale=scale, dropout=dropout,
                                                 key=leaf_key))
    return result


def attach_many(params: Any, adapters: Sequence[tuple[Any, float]]) -> Any:
    """The params with each weight that one of `adapters` targets replaced by a `MultiLoraWeight`: slot 0 the base
    alone, slot i the i-th adapter (zeros where it lacks the target). `adapters`: (factors as `attach` takes them,
    scale) each, in the params' layout (stacked or per layer)."""
    found: dict[tuple[str, ...], list] = {}
    for i, (tree, _) in enumerate(adapters):
        for keys, pair in _pairs(tree):
            found.setdefault(keys, [None] * len(adapters))[i] = pair
    scales = np.array([0.0, *(scale for _, scale in adapters)], np.float32)
    result = dict(params)
    for keys, pairs in found.items():
        lead = int(keys[0] == "layers")
        a = _stacked([None if p is None else p["a"] for p in pairs], lead, -1)
        b = _stacked([None if p is None else p["b"] for p in pairs], lead, lead)
        scale = jnp.asarray(np.broadcast_to(scales, (*a.shape[:lead], len(scales))))
        _replace(result, keys, functools.partial(MultiLoraWeight, a=a, b=b, scale=scale))
    return result


def _stacked(parts: list, lead: int, rank_axis: int) -> jax.Array:
    """One target's factor of each adapter (None: lacks it) `[*layers, *shape]` -> float32 `[*layers, 1 + adapters,
    *shape]`: slot 0 and missing ones zeros, each zero-padded on `rank_axis` to the largest rank (exact)."""
    arrays = [None if f is None else np.asarray(f, np.float32) for f in parts]
    given = [f for f in arrays if f is not None]
    rank = max(f.shape[rank_axis] for f in given)
    shape = list(given[0].shape)
    shape[rank_axis] = rank
    padded = [np.zeros(shape, np.float32) if f is None else
              np.pad(f, [(0, rank - n if axis == rank_axis % f.ndim else 0) for axis, n in enumerate(f.shape)])
              for f in [None, *arrays]]
    return jnp.asarray(np.stack(padded, axis=lead))


def select_adapters(params: Any, ids: jax.Array) -> Any:
    """The params with each MultiLoraWeight's ids set: row i of a forward on them runs adapter `ids[i]` (`[batch]`,
    0 the base alone); inside a jitted program, so that the ids are an argument of it."""
    def select(w):
        if not isinstance(w, MultiLoraWeight):
            return w
        return w.replace(ids=jnp.broadcast_to(ids, (*w.scale.shape[:-1], *jnp.shape(ids))))  # stacked: per layer

    return jax.tree.map(select, params, is_leaf=lambda x: isinstance(x, MultiLoraWeight))


def adapter_count(params: Any) -> int:
    """The slots of the params' MultiLoraWeights (1 + adapters); 1 (the base) without any."""
    multi = [w for w in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, MultiLoraWeight))
             if isinstance(w, MultiLoraWeight)]
    return multi[0].scale.shape[-1] if multi else 1


def _pairs(adapters: Any) -> list[tuple[tuple[str, ...], dict]]:
    """(params path, {"a", "b"}) of each adapted weight in a tree of adapters."""
    flat = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=lambda x: isinstance(x, dict) and
                                                set(x) == {"a", "b"})[0]
    return [(tuple(k.key for k in path), pair) for path, pair in flat]


def _replace(params: dict, keys: tuple[str, ...], make) -> None:
    """Set the leaf at `keys` to `make(leaf)`, copying the dicts on the way (`params` itself is the caller's copy)."""
    node = params
    for k in keys[:-1]:
        node[k] = dict(node[k])
        node = node[k]
    node[keys[-1]] = make(node[keys[-1]])
