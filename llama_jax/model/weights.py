"""Declaring a weight: logical axis names for sharding, stored in `param_dtype`, used in the compute dtype."""

import flax.linen as nn
import jax
import jax.numpy as jnp

INIT = nn.initializers.normal(0.02)


def project(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`jnp.einsum(spec, x, w)` accumulated in float32 and returned in x's dtype.

    With bfloat16 operands and a bfloat16 result XLA:CPU converts the whole weight to float32 at every call;
    asking for a float32 result lets it multiply the bfloat16 weight directly (about 8x faster per matmul).
    """
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def weight(module: nn.Module, name: str, names: tuple[str, ...], shape: tuple[int, ...], init=INIT) -> jax.Array:
    """Declare (or fetch) param `name` of `module`; returns it cast to `module.dtype`."""
    value = module.param(name, nn.with_logical_partitioning(init, names), shape, module.param_dtype)
    return value.astype(module.dtype)
