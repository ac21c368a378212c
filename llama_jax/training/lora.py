"""LoRA fine-tuning: which weights get adapters, their first values and layout, and the adapter a run writes.

The base params are frozen (in the compute dtype, or int8 for QLoRA) and passed to `train_step` beside the
TrainState, whose params are only the adapters: only they get gradients and Adam moments.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.checkpoints import Adapter
from llama_jax.model import (LORA_TARGETS, LlamaConfig, attach, init_adapters, param_logical_names, param_shapes,
                             unstack_layers)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (scale = alpha / r), the adapted projections (of LORA_TARGETS), dropout of their inputs."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = LORA_TARGETS
    dropout: float = 0.0

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"unknown LoRA target {', '.join(unknown) or '(none given)'}: choose from "
                             f"{', '.join(LORA_TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def adapter_shapes(config: LlamaConfig, lora: LoraConfig) -> Any:
    """The adapters tree of ShapeDtypeStructs (float32), computed without allocating anything."""
    return jax.eval_shape(lambda: init_adapters(param_shapes(config), param_logical_names(config), rank=lora.rank,
                                                targets=lora.targets, rng=jax.random.key(0)))


def adapter_shardings(config: LlamaConfig, lora: LoraConfig, mesh: Mesh) -> Any:
    """Adapters are small (rank x width): replicated on every device."""
    return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), adapter_shapes(config, lora))


def init_lora(config: LlamaConfig, lora: LoraConfig, rng: jax.Array, mesh: Mesh) -> Any:
    """Fresh adapters (a random, b zero: the model starts as its base), laid out on `mesh`."""
    make = lambda r: init_adapters(param_shapes(config), param_logical_names(config), rank=lora.rank,  # noqa: E731
                                   targets=lora.targets, rng=r)
    return jax.jit(make, out_shardings=adapter_shardings(config, lora, mesh))(rng)


def attach_adapters(frozen: Any, adapters: Any, scale: float, **dropout) -> Any:
    """`model.attach` of the (stacked) adapters to a frozen base that is stacked or per layer (`load_params(...,
    per_layer=True)`: then the adapters are split per layer too); `dropout`: attach's dropout and key."""
    return attach(frozen, adapters if "layers" in frozen else unstack_layers(adapters), scale, **dropout)


def to_adapter(adapters: Any, lora: LoraConfig) -> Adapter:
    """Trained adapters (host arrays or jax arrays on this host) as a checkpoints.Adapter, ready to write."""
    return Adapter(jax.tree.map(lambda x: np.asarray(x, np.float32), adapters), lora.rank, float(lora.alpha),
                   tuple(t for t in LORA_TARGETS if t in lora.targets), dropout=lora.dropout)


# A LoRA step's share of a full fine-tune's matmul FLOPs: the forward and the activation gradients (4 of 6 per
# parameter), no weight gradients for the frozen base (the adapters' own FLOPs are negligible).
LORA_FLOPS_FRACTION = 4 / 6
