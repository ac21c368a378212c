"""int8 weights: symmetric, one scale per output channel, dequantized inside the matmul that reads them.

A quantized weight is a `QuantArray` in the params tree in place of the float array: `values` int8 of the weight's
shape and `scale` of the same rank, 1 along the contracted (input) axes, so `values * scale` is the weight. Every
other axis keeps its length, so indexing a layer (`nn.scan`), a vocab slice or a transpose applies to both alike,
and the logical axis names of the weight lay out both on a mesh (a length-1 axis is never sharded).
`weights.project` multiplies by `values` converted in the dot and scales the output channels after: the int8
weight is what is read from memory. Norms and biases stay as they are.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.experimental.layout import Format, Layout

QUANTIZATIONS = ("int8",)
# The input (contracted) logical axes of each quantized weight, by its params name; every other weight with two or
# more axes besides `layers` is contracted over "embed" (q, k, v, gate, up, lm_head; embed is looked up by row).
INPUT_AXES = {"o": ("heads", "head_dim"), "down": ("mlp",)}
QUANTIZED_NAMES = ("q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head")


@struct.dataclass
class QuantArray:
    """values int8 `[...]`, scale float32 of the same rank (1 on the contracted axes): the weight is their product.
    `values` is the first leaf, so Flax's param shape check compares it with the declared shape."""

    values: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def dtype(self) -> jnp.dtype:
        return self.values.dtype

    @property
    def ndim(self) -> int:
        return self.values.ndim

    @property
    def T(self) -> QuantArray:  # noqa: N802 (as jax.Array.T)
        return QuantArray(self.values.T, self.scale.T)

    def __getitem__(self, index) -> QuantArray:
        return QuantArray(self.values[index], self.scale[index])

    def reshape(self, *shape: int) -> QuantArray:
        """`values.reshape(*shape)`, for a weight whose kept (output) axes are its last ones and stay so: o's
        `[heads, head_dim, embed]` -> `[heads * head_dim, embed]`."""
        values = self.values.reshape(*shape)
        kept = next((shape[len(shape) - m:] for m in range(len(shape) + 1)
                     if math.prod(shape[len(shape) - m:]) == self.scale.size), None)
        if kept is None or self.scale.shape[self.scale.ndim - len(kept):] != tuple(kept):
            raise ValueError(f"cannot reshape a {self.shape} QuantArray (scale {self.scale.shape}) to {shape}")
        scale_shape = (1,) * (len(shape) - len(kept)) + tuple(kept)
        return QuantArray(values, self.scale.reshape(scale_shape))

    @property
    def output_scale(self) -> jax.Array:
        """The scale without its contracted axes: it broadcasts against a matmul output `[..., *kept axes]`."""
        return self.scale.reshape([s for i, s in enumerate(self.scale.shape) if i not in self.contracted])

    @property
    def contracted(self) -> tuple[int, ...]:
        """The contracted (input) axes: those the scale does not span."""
        return tuple(i for i, (s, n) in enumerate(zip(self.scale.shape, self.shape, strict=True)) if s == 1 and n != 1)

    def dequantize(self, dtype) -> jax.Array:
        return (self.values.astype(jnp.float32) * self.scale).astype(dtype)


def rows_layout(params: Any, platforms: tuple[str, ...] = ("gpu",)) -> Any:
    """`params` with each int8 weight's values stored with their contracted axes innermost (an `[in, out]` weight
    as `[out, in]` in memory), where the params live on one of `platforms`; elsewhere `params` as they are. The
    logical shapes, and so the model code, are unchanged (jit compiles for the layout its arguments have). On a GPU,
    `weights.project` multiplies a few tokens by such a weight through `int8_kernel`, which reads it as `[out, in]`
    in long contiguous runs: the Engines and `python -m infer`'s loader lay out their params so there.

    Values already so laid out are kept as they are. The others are copied one weight at a time, and each original
    is released as soon as its copy exists when nothing else holds it: given a tree no one else keeps (a loader's
    result), the device holds one extra weight at a time, not a second copy of them all."""
    leaves, treedef = jax.tree.flatten(params, is_leaf=lambda leaf: isinstance(leaf, QuantArray))
    del params  # the leaves list is then the only holder of a tree nobody else keeps
    if not leaves or not any(d.platform in platforms for d in jax.tree.leaves(leaves[0])[0].devices()):
        return jax.tree.unflatten(treedef, leaves)
    for i, w in enumerate(leaves):
        if isinstance(w, QuantArray):
            order = tuple(a for a in range(w.ndim) if a not in w.contracted) + w.contracted
            if w.values.format.layout.major_to_minor != order:
                leaves[i] = w.replace(values=jax.device_put(w.values, Format(Layout(major_to_minor=order),
                                                                                w.values.sharding)))
    return jax.tree.unflatten(treedef, leaves)


def input_axes(path: tuple[str, ...], names: tuple[str | None, ...]) -> tuple[int, ...]:
    """Positions of the contracted axes of the weight at params `path` with logical `names`."""
    inputs = INPUT_AXES.get(path[-1], ("embed",))
    return tuple(i for i, n in enumerate(names) if n in inputs)


def is_quantized_leaf(path: tuple[str, ...], names: tuple[str | None, ...]) -> bool:
    """Whether int8 quantization stores the weight at `path` as a QuantArray (matrices; not norms or biases)."""
    return path[-1] in QUANTIZED_NAMES and len([n for n in names if n != "layers"]) >= 2


def quantize(w: jax.Array, axes: tuple[int, ...]) -> QuantArray:
    """Symmetric int8 with one float32 scale per output channel: absmax over the contracted `axes` / 127."""
    w = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)  # an all-zero channel stays zero
    values = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return QuantArray(values, scale)


def quantize_tree(params: Any, logical_names: Any) -> Any:
    """Every weight of `params` that `is_quantized_leaf` as a QuantArray; the rest as given. `logical_names` is the
    matching tree of axis-name tuples (`param_logical_names`). Works on arrays and on `jax.ShapeDtypeStruct`s
    (under `jax.eval_shape`)."""
    def one(path, names, w):
        path = tuple(k.key for k in path)
        return quantize(w, input_axes(path, names)) if is_quantized_leaf(path, names) else w

    return jax.tree_util.tree_map_with_path(one, logical_names, params, is_leaf=lambda n: isinstance(n, tuple))


def check_quantization(quantization: str) -> None:
    """ValueError unless `quantization` is one of QUANTIZATIONS."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}: choose from {', '.join(QUANTIZATIONS)}")
