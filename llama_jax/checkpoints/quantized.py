"""int8 weights on disk and on load: how a QuantArray is stored, and quantizing a float leaf a block at a time.

A quantized checkpoint (`llama_jax.json` "quantization": "int8") stores each quantized weight as two leaves,
`<path>.values` (int8) and `<path>.scale` (float32, 1 along the contracted axes), in place of `<path>`; norms and
biases are stored as in a float checkpoint, in its "dtype".
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.model import LlamaConfig, QuantArray, param_shapes, quantize

BLOCK_BYTES = 64 << 20  # float32 bytes quantized at a time: memory holds the int8 result plus one such block


def to_stored(tree: Any) -> Any:
    """QuantArrays -> {"values", "scale"} dicts: the tree as Orbax's metadata and the leaf files name it."""
    return jax.tree.map(lambda x: {"values": x.values, "scale": x.scale} if isinstance(x, QuantArray) else x, tree,
                        is_leaf=lambda x: isinstance(x, QuantArray))


def from_stored(tree: Any) -> Any:
    """The inverse of `to_stored`."""
    if isinstance(tree, dict):
        if set(tree) == {"values", "scale"}:
            return QuantArray(tree["values"], tree["scale"])
        return {k: from_stored(v) for k, v in tree.items()}
    return tree


def stored_shapes(config: LlamaConfig, dtype, quantization: str | None) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """Every stored leaf's path (`("layers", "mlp", "up", "values")`, ...) and its shape and dtype."""
    flat = jax.tree_util.tree_flatten_with_path(to_stored(param_shapes(config, dtype, quantization=quantization)))[0]
    return {tuple(k.key for k in path): shape for path, shape in flat}


@functools.partial(jax.jit, static_argnums=1)
def _quantize(block: jax.Array, axes: tuple[int, ...]) -> QuantArray:
    return quantize(block, axes)


def quantize_blocks(read: Callable[[tuple[slice, ...]], np.ndarray], shape: tuple[int, ...], axes: tuple[int, ...]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Quantize the float array of `shape` that `read(index)` returns slices of, contracted over `axes`: returns
    (int8 values `shape`, float32 scale `shape` with 1 on `axes`), reading BLOCK_BYTES of it at a time along its first
    kept axis (each output channel's scale needs only its own slice), so a float copy of the whole never exists."""
    axis = next(i for i in range(len(shape)) if i not in axes)
    step = max(1, BLOCK_BYTES // (math.prod(shape) // shape[axis] * 4))
    values = np.empty(shape, np.int8)
    scale = np.empty([1 if i in axes else n for i, n in enumerate(shape)], np.float32)
    for start in range(0, shape[axis], step):
        stop = min(start + step, shape[axis])  # a tensorstore, unlike numpy, refuses a slice past the end
        index = tuple(slice(start, stop) if i == axis else slice(None) for i in range(len(shape)))
        q = _quantize(jnp.asarray(read(index)), axes)
        values[index], scale[index] = np.asarray(q.values), np.asarray(q.scale)
    return values, scale
