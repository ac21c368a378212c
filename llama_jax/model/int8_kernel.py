"""An int8 weight times a few token rows on a GPU, as a Pallas (Triton) kernel that reads each int8 byte once.

Decode is bound by the weights' bytes. XLA reads an int8 weight converted inside a dot with few rows at about half
the memory bandwidth, and a product written as a multiply and a sum ran slower still inside the Engine (BENCHMARKS,
"GPU tuning suite"). Here each program takes `block_n` output channels over a `chunk` of the contracted axis (a
split of K, so that narrow weights still fill the chip) and streams its int8 tile `[block_n, block_k]` at a time
along contiguous memory (the weight stored `[N, K]`: `quant.rows_layout`'s order). It converts the tile in registers
and accumulates in float32: one row as a multiply and a sum, 2..DOT_ROWS rows as a matrix product with the rows
padded to DOT_ROWS. The chunks' partial sums `[K / chunk, rows, N]` are added after, by XLA.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

DOT_ROWS = 16  # the least rows of a Triton matrix product: 2..16 rows are padded to it
TRITON_BACKEND = "jax.experimental.pallas.triton"


@dataclasses.dataclass(frozen=True)
class Tiles:
    """How the kernel splits `[N, K]`: block_n output channels and `chunk` contracted elements per program,
    block_k of them per loop step; warps and pipeline stages per program (Triton's)."""

    block_n: int = 32
    chunk: int = 1024
    block_k: int = 256
    warps: int = 4
    stages: int = 3


def fits(rows: int, n: int, k: int, tiles: Tiles = Tiles()) -> bool:
    """Whether `rows_product` takes these shapes: at most DOT_ROWS rows, block_n dividing N, and a chunk (a power of
    two, at least block_k) dividing K."""
    return 1 <= rows <= DOT_ROWS and n % tiles.block_n == 0 and _chunk(k, tiles) is not None


def _chunk(k: int, tiles: Tiles) -> int | None:
    chunk = tiles.chunk
    while chunk >= tiles.block_k and k % chunk:
        chunk //= 2
    return chunk if chunk >= tiles.block_k and k % chunk == 0 else None


def rows_product(x: jax.Array, wt: jax.Array, tiles: Tiles = Tiles(), interpret: bool = False) -> jax.Array:
    """x `[rows, K]` (float) times int8 wt `[N, K]` transposed -> `[rows, N]` float32, for `fits` shapes.
    Differentiable in x (the cotangent through the dequantized dot; the int8 weight gets none)."""
    return _product(x, wt, tiles, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _product(x, wt, tiles, interpret):
    return _kernel(x, wt, tiles, interpret)


def _product_fwd(x, wt, tiles, interpret):
    return _kernel(x, wt, tiles, interpret), (wt, jnp.zeros((), x.dtype))  # the scalar carries x's dtype


def _product_bwd(tiles, interpret, residuals, g):
    wt, x_type = residuals
    return jnp.dot(g.astype(x_type.dtype), wt.astype(x_type.dtype), preferred_element_type=jnp.float32
                   ).astype(x_type.dtype), None


_product.defvjp(_product_fwd, _product_bwd)


def _kernel(x: jax.Array, wt: jax.Array, tiles: Tiles, interpret: bool) -> jax.Array:
    """x `[rows, K]` times wt `[N, K]` transposed -> `[rows, N]` float32: the grid `[N / block_n, K / chunk]` writes
    partial sums `[K / chunk, rows or DOT_ROWS, N]`, added here."""
    rows, k = x.shape
    n = wt.shape[0]
    chunk = _chunk(k, tiles)
    steps, splits = chunk // tiles.block_k, k // chunk
    grid = (n // tiles.block_n, splits)
    params = None if interpret else _triton_params(tiles)
    w_spec = pl.BlockSpec((tiles.block_n, chunk), lambda j, s: (j, s))
    if rows == 1:  # a multiply and a sum over each tile: no padded rows
        def gemv(x_ref, w_ref, o_ref):
            def body(i, acc):
                part = pl.ds(i * tiles.block_k, tiles.block_k)
                w = w_ref[:, part].astype(jnp.float32)
                return acc + jnp.sum(w * x_ref[part].astype(jnp.float32)[None, :], axis=1)
            o_ref[...] = jax.lax.fori_loop(0, steps, body, jnp.zeros((tiles.block_n,), jnp.float32))

        out = pl.pallas_call(gemv, jax.ShapeDtypeStruct((splits, n), jnp.float32), grid=grid,
                             in_specs=[pl.BlockSpec((chunk,), lambda j, s: (s,)), w_spec],
                             out_specs=pl.BlockSpec((None, tiles.block_n), lambda j, s: (s, j)),
                             compiler_params=params, interpret=interpret)(x[0], wt)
        return jnp.sum(out, axis=0)[None]

    def gemm(x_ref, w_ref, o_ref):
        def body(i, acc):
            part = pl.ds(i * tiles.block_k, tiles.block_k)
            w = w_ref[:, part].astype(x_ref.dtype)
            return acc + jax.lax.dot_general(x_ref[:, part], w, (((1,), (1,)), ((), ())),
                                             preferred_element_type=jnp.float32)
        o_ref[...] = jax.lax.fori_loop(0, steps, body, jnp.zeros((DOT_ROWS, tiles.block_n), jnp.float32))

    padded = jnp.pad(x, ((0, DOT_ROWS - rows), (0, 0)))
    out = pl.pallas_call(gemm, jax.ShapeDtypeStruct((splits, DOT_ROWS, n), jnp.float32), grid=grid,
                         in_specs=[pl.BlockSpec((DOT_ROWS, chunk), lambda j, s: (0, s)), w_spec],
                         out_specs=pl.BlockSpec((None, DOT_ROWS, tiles.block_n), lambda j, s: (s, 0, j)),
                         compiler_params=params, interpret=interpret)(padded, wt)
    return jnp.sum(out, axis=0)[:rows]


def _triton_params(tiles: Tiles):
    plt = importlib.import_module(TRITON_BACKEND)  # only where the kernel is compiled for a GPU

    return plt.CompilerParams(num_warps=tiles.warps, num_stages=tiles.stages)


def einsum_product(spec: str, x: jax.Array, values: jax.Array, tiles: Tiles = Tiles(), interpret: bool = False
                   ) -> jax.Array | None:
    """`jnp.einsum(spec, x, values)` in float32 through `rows_product`, for a projection whose output is x's
    leading (token) axes then w's kept axes (every projection of the model: "bse,ehd->bshd"). None where the spec or
    the shapes do not fit, or (not interpreted) where this jax has no Pallas Triton backend. x's tokens become the
    rows, w's kept axes N and the contracted ones K (with values laid out by `quant.rows_layout`, `[N, K]` is how
    they lie in memory)."""
    inputs, out = spec.split("->")
    x_axes, w_axes = inputs.split(",")
    kept = [a for a in w_axes if a in out]
    contracted = [a for a in w_axes if a not in out]
    lead = [a for a in x_axes if a not in w_axes]
    if list(out) != lead + kept or sorted(contracted) != sorted(a for a in x_axes if a in w_axes):
        return None
    sizes = dict(zip(x_axes, x.shape)) | dict(zip(w_axes, values.shape))
    rows, n, k = (math.prod(sizes[a] for a in axes) for axes in (lead, kept, contracted))
    if not fits(rows, n, k, tiles) or not (interpret or importlib.util.find_spec(TRITON_BACKEND)):
        return None  # also where this jax has no Pallas Triton backend (deprecated from jax 0.11): then the dot
    x2 = jnp.transpose(x, [x_axes.index(a) for a in lead + contracted]).reshape(rows, k)
    wt = jnp.transpose(values, [w_axes.index(a) for a in kept + contracted]).reshape(n, k)
    return rows_product(x2, wt, tiles, interpret).reshape([sizes[a] for a in out])
