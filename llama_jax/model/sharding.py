"""Logical axis names -> mesh axes: one table of rules, a mesh builder, and placement helpers.

Every weight and the main activations are annotated with logical names (see `RULES`). A logical name maps
to one or more of the mesh axes `data`, `fsdp`, `tensor`. A mesh axis is used at most once per array, and a
dimension that does not divide evenly by its mesh axes stays replicated (e.g. 9 heads on tensor=2), so every
preset works on every mesh.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes, in priority order: earlier dimensions of an array claim mesh axes first.
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "seq": (),
    "layers": (),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
}


def parse_mesh_spec(spec: str, num_devices: int) -> dict[str, int]:
    """`"data=1,fsdp=-1,tensor=2"` -> {"data": 1, "fsdp": 4, "tensor": 2} for 8 devices (-1 = the rest).

    Axes not named are 1. ValueError on unknown axes, bad numbers, or sizes that do not multiply to the devices.
    """
    sizes = dict.fromkeys(MESH_AXES, 1)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in sizes:
            raise ValueError(f"bad mesh spec {spec!r}: expected axis=size with axes {', '.join(MESH_AXES)}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"bad mesh spec {spec!r}: size of {name!r} is not an integer") from None
        if sizes[name] == 0 or sizes[name] < -1:
            raise ValueError(f"bad mesh spec {spec!r}: size of {name!r} must be positive or -1")
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"bad mesh spec {spec!r}: at most one axis may be -1")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % known:
            raise ValueError(f"mesh spec {spec!r} does not divide {num_devices} devices")
        sizes[free[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh spec {spec!r} uses {math.prod(sizes.values())} devices, "
                         f"but {num_devices} are available")
    return sizes


def make_mesh(spec: str = "fsdp=-1", devices=None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor) from a spec such as `data=1,fsdp=-1,tensor=2`."""
    devices = jax.devices() if devices is None else devices
    sizes = parse_mesh_spec(spec, len(devices))
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(names: tuple[str | None, ...], shape: tuple[int, ...], axis_sizes: dict[str, int]
                    ) -> PartitionSpec:
    """The PartitionSpec for an array of `shape` whose dimensions carry logical `names`."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape, strict=True):
        chosen: list[str] = []
        for axis in RULES.get(name, ()) if name else ():
            size = math.prod(axis_sizes[a] for a in chosen) * axis_sizes.get(axis, 1)
            if axis in used or axis not in axis_sizes or dim % size:
                break
            chosen.append(axis)
        chosen = [a for a in chosen if axis_sizes[a] > 1]
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, names: tuple[str | None, ...], shape: tuple[int, ...]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, dict(mesh.shape)))


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Constrain an activation's layout by logical names, under the mesh set with `jax.set_mesh`; else a no-op."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, dict(mesh.shape)))


def tree_shardings(mesh: Mesh, logical_names: Any, shapes: Any) -> Any:
    """NamedShardings for a pytree, given matching pytrees of logical names (tuples) and shapes/arrays. A leaf of
    names may stand for a subtree of arrays (a `QuantArray`'s values and scale, a `LoraWeight`): each array of the
    names' rank is laid out by those names, any other (a LoRA factor, small) replicated."""
    def one(names, a):
        shape = tuple(np.shape(a))
        return named_sharding(mesh, names, shape) if len(shape) == len(names) else NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(lambda names, x: jax.tree.map(lambda a: one(names, a), x),
                        logical_names, shapes, is_leaf=lambda n: isinstance(n, tuple))


def place(host_array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Put a host array onto the mesh, each device receiving only its own slice."""
    return jax.make_array_from_callback(host_array.shape, sharding, lambda index: host_array[index])
