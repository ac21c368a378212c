"""The params `python -m infer` runs: the checkpoint's weights (per layer, int8 with --quantize) and, with
--adapter, a PEFT LoRA adapter attached to them (not merged)."""

from __future__ import annotations

import sys
from typing import Any

from llama_jax.checkpoints import Checkpoint, load_params, read_adapter
from llama_jax.model import attach, unstack_layers


def load_weights(args, checkpoint: Checkpoint, dtype, mesh) -> Any:
    """load_params per layer; the adapter is read (and checked against the base) before the weights."""
    adapter = read_adapter(args.adapter, checkpoint.config) if args.adapter else None
    params = load_params(checkpoint, mesh=mesh, dtype=dtype, per_layer=True, quantize=args.quantize)
    if adapter is None:
        return params
    print(f"adapter {args.adapter}: LoRA rank {adapter.rank} on {', '.join(adapter.targets)} (scale "
          f"{adapter.scale:g})", file=sys.stderr)
    return attach(params, unstack_layers(adapter.weights), adapter.scale)
