"""Declaring a weight: logical axis names for sharding, stored in `param_dtype`, used in the compute dtype."""

import flax.linen as nn
import jax

INIT = nn.initializers.normal(0.02)


def weight(module: nn.Module, name: str, names: tuple[str, ...], shape: tuple[int, ...], init=INIT) -> jax.Array:
    """Declare (or fetch) param `name` of `module`; returns it cast to `module.dtype`."""
    value = module.param(name, nn.with_logical_partitioning(init, names), shape, module.param_dtype)
    return value.astype(module.dtype)
