"""LoRA: a frozen weight plus a trainable low-rank update, W + scale * A B, applied inside `weights.project`.

A `LoraWeight` stands in the params tree where the plain weight (or its int8 `QuantArray`: QLoRA) was. For a weight
`[*in, *out]` (in: its contracted axes, `quant.input_axes`), `a` is `[*in, rank]` and `b` `[rank, *out]`; with
stacked layers all three carry the leading layer axis, so `nn.scan` slices them alike. The model math never sees
the difference: `project` adds `scale * (x a) b` to `x W`. Adapters live in their own tree (`init_adapters`), the
only thing a LoRA fine-tune differentiates; `attach` puts them on the frozen base for a forward.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from llama_jax.model.quant import QuantArray, input_axes

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@struct.dataclass
class LoraWeight:
    """base (frozen; first leaf, so Flax's param shape check sees it), a `[*in, rank]`, b `[rank, *out]`; with
    `dropout` > 0 and a `key` (raw key data `[..., 2]`, per layer when stacked), x is dropped out before a, as PEFT
    does in training."""

    base: jax.Array | QuantArray
    a: jax.Array
    b: jax.Array
    scale: float = struct.field(pytree_node=False)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    key: jax.Array | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape

    @property
    def dtype(self) -> jnp.dtype:
        return self.base.dtype

    def reshape(self, *shape: int) -> LoraWeight:
        """Merging input axes only (o's `[heads, head_dim, embed]` -> `[heads * head_dim, embed]`)."""
        outputs = self.b.ndim - 1
        if tuple(shape[len(shape) - outputs:]) != tuple(self.base.shape[self.base.ndim - outputs:]):
            raise ValueError(f"cannot reshape a {self.shape} LoraWeight to {shape}")
        a = self.a.reshape(*shape[:len(shape) - outputs], self.a.shape[-1])
        return self.replace(base=self.base.reshape(*shape), a=a)


def low_rank(spec: str, x: jax.Array, w: LoraWeight) -> jax.Array:
    """`scale * (x a) b` for `jnp.einsum(spec, x, W)` (`spec` puts W's output axes last, as `project` requires),
    accumulated in float32: x `[..., *in]` -> float32 `[..., *out]`."""
    inputs, out = spec.split("->")
    x_axes, w_axes = inputs.split(",")
    contracted = "".join(c for c in w_axes if c in x_axes)
    kept = "".join(c for c in x_axes if c not in contracted)
    r = next(c for c in "rzyxwq" if c not in spec)
    if w.dropout > 0 and w.key is not None:
        keep = jax.random.bernoulli(jax.random.wrap_key_data(w.key), 1 - w.dropout, x.shape)
        x = jnp.where(keep, x / (1 - w.dropout), 0).astype(x.dtype)
    h = jnp.einsum(f"{x_axes},{contracted}{r}->{kept}{r}", x, w.a, preferred_element_type=jnp.float32)
    h = jnp.einsum(f"{kept}{r},{r}{w_axes.replace(contracted, '')}->{out}", h.astype(x.dtype), w.b,
                   preferred_element_type=jnp.float32)
    return w.scale * h


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
    flat = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=lambda x: isinstance(x, dict) and
                                                set(x) == {"a", "b"})[0]
    result = dict(params)
    for index, (path, pair) in enumerate(flat):
        keys = tuple(k.key for k in path)
        node = result
        for k in keys[:-1]:
            node[k] = dict(node[k])
            node = node[k]
        leaf_key = None
        if dropout > 0 and key is not None:
            leaf_key = jax.random.fold_in(key, index)
            if keys[0] == "layers":
                leaf_key = jax.random.split(leaf_key, pair["a"].shape[0])
            leaf_key = jax.random.key_data(leaf_key)
        node[keys[-1]] = LoraWeight(node[keys[-1]], pair["a"], pair["b"], scale, dropout, leaf_key)
    return result
