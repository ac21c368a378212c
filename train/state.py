"""What a training run starts from and leaves behind: the LoRA settings of the command line, the initial (or
resumed) TrainState, and RUN_DIR/final (a checkpoint, or a PEFT adapter)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from llama_jax.checkpoints import load_params, write_adapter, write_checkpoint
from llama_jax.errors import InputError
from llama_jax.model import check_quantization, param_shapes, param_shardings
from llama_jax.training import (LoraConfig, RunCheckpoints, TrainState, abstract_state, adapter_shapes,
                                adapter_shardings, init_lora, init_state, to_adapter)


def initial_state(checkpoints: RunCheckpoints, checkpoint, mesh, optimizer, param_dtype, lora, seed
                  ) -> tuple[TrainState, int]:
    """The newest saved state and the batches it consumed, or a fresh state and 0: from the checkpoint's params, or
    fresh LoRA adapters (`lora`)."""
    config = checkpoint.config
    if checkpoints.latest_step() is None:
        if lora is not None:
            return init_state(init_lora(config, lora, jax.random.key(seed), mesh), optimizer), 0
        return init_state(load_params(checkpoint, mesh=mesh, dtype=param_dtype), optimizer), 0
    if lora is not None:
        shapes, shardings = adapter_shapes(config, lora), adapter_shardings(config, lora, mesh)
    else:
        shapes, shardings = param_shapes(config, param_dtype), param_shardings(config, mesh)
    abstract_params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                                   shardings)
    state, progress = checkpoints.restore(abstract_state(abstract_params, optimizer))
    return state, int(progress["batches_consumed"])


def gathered(tree) -> Any:
    """Each array whole on this host; a collective, so every process must call it."""
    return jax.tree.map(lambda leaf: np.asarray(multihost_utils.process_allgather(leaf, tiled=True)), tree)


def save_final(run_dir: Path, checkpoint, params, lora) -> Path:
    """RUN_DIR/final: a checkpoint in the input checkpoint's dtype, or the LoRA adapter in PEFT's format; every
    process takes part (the arrays are gathered)."""
    if lora is not None:
        return write_adapter(run_dir / "final", to_adapter(gathered(params), lora), checkpoint.config,
                             base=checkpoint.directory, extra={"source": f"train:{run_dir}"}, force=True)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    leaves = ((tuple(k.key for k in path), gathered(leaf)) for path, leaf in flat)  # one leaf at a time
    tokenizer = checkpoint.tokenizer_path.read_text() if checkpoint.tokenizer_path.exists() else None
    return write_checkpoint(run_dir / "final", checkpoint.config, leaves, dtype=checkpoint.dtype,
                            source=f"train:{run_dir}", tokenizer_json=tokenizer, chat_template=checkpoint.chat_template,
                            generation_config=checkpoint.generation_config, force=True)


LORA_FLAGS = {"rank": "--lora-rank", "target": "--lora-targets", "dropout": "--lora-dropout", "alpha": "--lora-alpha"}


def lora_config(args) -> LoraConfig | None:
    """The LoRA settings of the command line (None without --lora-rank); a bad one is a one-line InputError."""
    if args.lora_rank is None:
        return None
    if args.quantize is not None:
        try:
            check_quantization(args.quantize)
        except ValueError as e:
            raise InputError("--quantize", str(e)) from None
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    try:
        return LoraConfig(args.lora_rank, args.lora_alpha or 2.0 * args.lora_rank, targets, args.lora_dropout)
    except ValueError as e:
        raise InputError(next(flag for word, flag in LORA_FLAGS.items() if word in str(e)), str(e)) from None
