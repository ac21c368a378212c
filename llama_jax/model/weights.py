"""Declaring a weight: logical axis names for sharding, stored in `param_dtype`, used in the compute dtype; and the
two ways a weight is used, `project` (every matmul) and `lookup` (the embedding), float or int8 (`quant`) alike, and
with or without a LoRA adapter (`lora`)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.model.int8_kernel import einsum_product
from llama_jax.model.lora import AdaptedWeight, LoraWeight, MultiLoraWeight, low_rank
from llama_jax.model.quant import QuantArray

INIT = nn.initializers.normal(0.02)
# XLA:CPU multiplies by a weight narrower than float32 (bfloat16, int8) by converting it to float32 first.
# Left alone it hoists those conversions out of loops and schedules them all up front: a float32 copy of every
# weight, twice the bfloat16 weights' bytes (32 GB for an 8B model). These compile options keep one conversion
# alive at a time, at the price of converting at every use (the Engine and a LoRA step over a narrow base use them).
CPU_NARROW_WEIGHT_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
                             "xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def narrow_weight_options(params) -> dict:
    """CPU_NARROW_WEIGHT_OPTIONS when `params` live on a CPU and some are narrower than float32; else none."""
    leaves = jax.tree.leaves(params)
    narrow = any(leaf.dtype.itemsize < 4 for leaf in leaves)
    on_cpu = all(device.platform == "cpu" for device in leaves[0].devices())
    return CPU_NARROW_WEIGHT_OPTIONS if narrow and on_cpu else {}


def project(spec: str, x: jax.Array, w: jax.Array | QuantArray | LoraWeight | MultiLoraWeight, out_dtype=None
            ) -> jax.Array:
    """`jnp.einsum(spec, x, w)` accumulated in float32 and returned in `out_dtype` (default x's dtype).

    The dot's own result type (`result_dtype`): float32 on a CPU, where with bfloat16 operands and a bfloat16
    result XLA:CPU converts the whole weight to float32 at every call (asking for float32 lets it multiply the
    bfloat16 weight directly, about 8x faster per matmul). On a GPU or TPU it is `out_dtype` (the accumulation is
    float32 inside the matmul unit either way), because a float32 result makes the cotangent float32 and so both
    of its gradient dots float32 x bfloat16: float32 (TF32) GEMMs at half the bfloat16 rate, 54% of a Llama-3.2-1B
    bf16 training step's GPU time before (bench/gpu_tune.py's train trace).
    An int8 `QuantArray` is converted to x's dtype inside the dot and the output channels scaled after; on one GPU
    (no mesh of several devices set), a product of at most `int8_kernel.DOT_ROWS` token rows goes through that
    module's kernel instead. `spec` must put w's kept axes last in the output, in order, as every projection of the
    model does. A `LoraWeight` adds its low-rank update; a `MultiLoraWeight` each row's own (x's first axis is the
    batch: row i takes adapter `w.ids[i]`).
    """
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if isinstance(w, AdaptedWeight):
        base = project(spec, x, w.base, result_dtype(x.dtype))
        return (base.astype(jnp.float32) + low_rank(spec, x, w)).astype(out_dtype)
    if isinstance(w, QuantArray):
        mesh = jax.sharding.get_abstract_mesh()  # XLA cannot split the kernel's call: over a mesh, the dot's
        one_device = mesh.empty or mesh.size == 1
        out = einsum_product(spec, x, w.values) if jax.default_backend() == "gpu" and one_device else None
        if out is None:  # not on one GPU, or more rows than the kernel takes
            out = jnp.einsum(spec, x, w.values.astype(x.dtype), preferred_element_type=jnp.float32)
        return (out * w.output_scale).astype(out_dtype)
    return jnp.einsum(spec, x, w, preferred_element_type=result_dtype(out_dtype)).astype(out_dtype)


def result_dtype(out_dtype):
    """What a float projection's dot returns (see `project`): float32 on a CPU, else `out_dtype`."""
    return jnp.float32 if jax.default_backend() == "cpu" else out_dtype


def lookup(table: jax.Array | QuantArray, tokens: jax.Array, dtype) -> jax.Array:
    """Rows of an embedding table `[vocab, embed]` for token ids `[batch, seq]` -> `[batch, seq, embed]` in `dtype`."""
    if isinstance(table, QuantArray):
        rows = table[tokens]
        return (rows.values.astype(jnp.float32) * rows.scale).astype(dtype)
    return jnp.take(table, tokens, axis=0).astype(dtype)


def cast(w: jax.Array | QuantArray | LoraWeight | MultiLoraWeight, dtype
         ) -> jax.Array | QuantArray | LoraWeight | MultiLoraWeight:
    """A float weight in the compute dtype; an int8 one stays int8 (`project` converts it inside the dot); a LoRA
    weight's base as such and its factors in the compute dtype (its scales and ids as they are)."""
    if isinstance(w, AdaptedWeight):
        return w.replace(base=cast(w.base, dtype), a=w.a.astype(dtype), b=w.b.astype(dtype))
    return w if isinstance(w, QuantArray) else w.astype(dtype)


def weight(module: nn.Module, name: str, names: tuple[str, ...], shape: tuple[int, ...], init=INIT
           ) -> jax.Array | QuantArray | LoraWeight:
    """Declare (or fetch) param `name` of `module`; returns it cast to `module.dtype` (see `cast`)."""
    return cast(module.param(name, nn.with_logical_partitioning(init, names), shape, module.param_dtype), module.dtype)
