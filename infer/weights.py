"""The params `python -m infer` runs: the checkpoint's weights (per layer, int8 with --quantize) and, with
--adapter, a PEFT LoRA adapter attached to them (not merged); the server's named adapters, several side by side."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from llama_jax.checkpoints import Adapter, Checkpoint, load_params, read_adapter
from llama_jax.errors import InputError
from llama_jax.model import attach, attach_many, rows_layout, unstack_layers


def load_weights(args, checkpoint: Checkpoint, dtype, mesh, named: Sequence[tuple[str, str]] = ()) -> Any:
    """load_params per layer, with --adapter DIR attached, or else the `named` adapters ((NAME, DIR) each: slot i + 1
    of `attach_many` for the i-th, 0 the base). Adapters are read (and checked against the base) before the
    weights; one that does not fit is an InputError naming it."""
    single = read_adapter(args.adapter, checkpoint.config) if args.adapter else None
    served = {name: read_named(name, directory, checkpoint) for name, directory in named}
    # On a GPU, int8 weights laid out as the engines read them, one at a time (one copy of the weights)
    params = rows_layout(load_params(checkpoint, mesh=mesh, dtype=dtype, per_layer=True, quantize=args.quantize))
    for label, adapter in ({args.adapter: single} if single else served).items():
        print(f"adapter {label}: LoRA rank {adapter.rank} on {', '.join(adapter.targets)} (scale "
              f"{adapter.scale:g})", file=sys.stderr)
    if single is not None:
        return attach(params, unstack_layers(single.weights), single.scale)
    return attach_many(params, [(unstack_layers(a.weights), a.scale) for a in served.values()]) if served else params


def read_named(name: str, directory: str, checkpoint: Checkpoint) -> Adapter:
    """read_adapter, its error naming the adapter."""
    try:
        return read_adapter(directory, checkpoint.config)
    except InputError as e:
        raise InputError(f"adapter {name!r}", str(e)) from None
