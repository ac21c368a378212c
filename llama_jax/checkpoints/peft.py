"""LoRA adapters in Hugging Face PEFT's format, both ways: what `PeftModel.from_pretrained` reads and writes.

    ADAPTER/
      adapter_config.json          PEFT's LoraConfig (peft_type LORA, r, lora_alpha, target_modules, ...)
      adapter_model.safetensors    base_model.model.model.layers.{i}.{self_attn.q_proj|...}.lora_{A,B}.weight
      llama_jax_adapter.json       ours (written by us, ignored by PEFT): the base checkpoint's path and hash

lora_A is `[r, in_features]` and lora_B `[out_features, r]` of the HF `nn.Linear`; ours are `a [layers, *in, r]`
and `b [layers, r, *out]` in the model's own axes (`llama_jax.model.lora`). scale = lora_alpha / r (or / sqrt(r)
with use_rslora).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from llama_jax.checkpoints.atomic import atomic_directory
from llama_jax.checkpoints.hf_io import read_json
from llama_jax.checkpoints.hf_mapping import tensor_mappings
from llama_jax.errors import InputError
from llama_jax.model import LORA_TARGETS, LlamaConfig

CONFIG_FILE, WEIGHTS_FILE, OURS_FILE = "adapter_config.json", "adapter_model.safetensors", "llama_jax_adapter.json"
PREFIX = "base_model.model.model.layers."
KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj\.lora_([AB])\.weight")
# LoraConfig fields that change the math in ways we do not implement, and the value that means "not used".
UNSUPPORTED = {"use_dora": False, "bias": "none", "modules_to_save": None, "fan_in_fan_out": False,
               "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False}


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A LoRA adapter in our layout: `weights` {"layers": {"attn"|"mlp": {name: {"a", "b"}}}} (numpy float32)."""

    weights: dict
    rank: int
    alpha: float
    targets: tuple[str, ...]
    rslora: bool = False
    dropout: float = 0.0  # what it was trained with (PEFT's lora_dropout); no effect on inference

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def _linear_shapes(config: LlamaConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Target name -> (our input shape, our output shape) of its per-layer weight."""
    shapes = {}
    for m in tensor_mappings(config):
        if m.path[-1] in LORA_TARGETS:
            n_in = m.hf_shape[1]
            split = next(k for k in range(len(m.shape) + 1) if math.prod(m.shape[:k]) == n_in)
            shapes[m.path[-1]] = (m.shape[:split], m.shape[split:])
    return shapes


def _group(target: str) -> str:
    return "attn" if target in ("q", "k", "v", "o") else "mlp"


def _module(target: str) -> str:
    return f"{'self_attn' if _group(target) == 'attn' else 'mlp'}.{target}_proj"


def read_adapter(directory: str | Path, config: LlamaConfig) -> Adapter:
    """A PEFT LoRA adapter for a Llama model of `config`; InputError (one line, naming the file) for anything else."""
    directory = Path(directory)
    settings = read_json(directory / CONFIG_FILE)
    if settings is None:
        raise InputError(directory, f"not a PEFT adapter (no {CONFIG_FILE})")
    if settings.get("peft_type") != "LORA":
        raise InputError(directory / CONFIG_FILE, f"PEFT adapter type {settings.get('peft_type')!r} is not "
                                                  "supported (only LORA)")
    for field, plain in UNSUPPORTED.items():
        if settings.get(field, plain) not in (plain, None, {}, False):
            raise InputError(directory / CONFIG_FILE, f"LoRA with {field}={settings[field]!r} is not supported")
    rank, alpha = settings.get("r"), settings.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise InputError(directory / CONFIG_FILE, f"r must be a positive integer and lora_alpha a number, got r="
                                                  f"{rank!r}, lora_alpha={alpha!r}")
    try:
        tensors = load_file(directory / WEIGHTS_FILE)
    except (OSError, ValueError, SafetensorError) as e:
        raise InputError(directory / WEIGHTS_FILE, f"cannot read the adapter weights ({e})") from None
    shapes, layers = _linear_shapes(config), config.num_hidden_layers
    found: dict[str, dict[str, dict[int, np.ndarray]]] = {}
    for key, tensor in tensors.items():
        match = KEY.fullmatch(key)
        if match is None or match[3] not in shapes or int(match[1]) >= layers:
            raise InputError(directory / WEIGHTS_FILE, f"tensor {key} does not fit this base model "
                                                       f"({layers} layers, targets {', '.join(LORA_TARGETS)})")
        inputs, outputs = shapes[match[3]]
        expected = (rank, math.prod(inputs)) if match[4] == "A" else (math.prod(outputs), rank)
        if tensor.shape != expected:
            raise InputError(directory / WEIGHTS_FILE, f"tensor {key} has shape {tensor.shape}; this base model "
                                                       f"needs {expected}")
        found.setdefault(match[3], {}).setdefault(match[4], {})[int(match[1])] = tensor.astype(np.float32)
    if not found:
        raise InputError(directory / WEIGHTS_FILE, "no LoRA tensors")
    weights: dict = {"layers": {}}
    for target, parts in found.items():
        inputs, outputs = shapes[target]
        a = np.zeros((layers, *inputs, rank), np.float32)  # a layer without an adapter adds nothing
        b = np.zeros((layers, rank, *outputs), np.float32)
        for i, lora_a in parts.get("A", {}).items():
            a[i] = lora_a.T.reshape(*inputs, rank)
        for i, lora_b in parts.get("B", {}).items():
            b[i] = lora_b.T.reshape(rank, *outputs)
        weights["layers"].setdefault(_group(target), {})[target] = {"a": a, "b": b}
    targets = tuple(t for t in LORA_TARGETS if t in found)
    return Adapter(weights, rank, float(alpha), targets, bool(settings.get("use_rslora", False)),
                   float(settings.get("lora_dropout") or 0.0))


def hf_tensors(adapter: Adapter, config: LlamaConfig) -> dict[str, np.ndarray]:
    """The adapter as PEFT's tensors (float32): lora_A `[r, in]`, lora_B `[out, r]` per layer and target."""
    out = {}
    for target in adapter.targets:
        pair = adapter.weights["layers"][_group(target)][target]
        a, b = np.asarray(pair["a"], np.float32), np.asarray(pair["b"], np.float32)
        for i in range(config.num_hidden_layers):
            name = f"{PREFIX}{i}.{_module(target)}"
            out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, adapter.rank).T)
            out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(adapter.rank, -1).T)
    return out


def checkpoint_hash(checkpoint_dir: Path) -> str:
    """sha256 of a checkpoint's config.json and llama_jax.json (its converter, source and creation time)."""
    digest = hashlib.sha256()
    for name in ("config.json", "llama_jax.json"):
        digest.update((Path(checkpoint_dir) / name).read_bytes())
    return digest.hexdigest()


def write_adapter(destination: str | Path, adapter: Adapter, config: LlamaConfig, *, base: Path,
                  extra: dict[str, Any] | None = None, force: bool = False) -> Path:
    """Write `adapter` as a PEFT LoRA directory (atomically), recording the base checkpoint it was trained on."""
    settings = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": adapter.rank, "lora_alpha": adapter.alpha,
                "lora_dropout": adapter.dropout, "target_modules": [f"{t}_proj" for t in adapter.targets],
                "bias": "none",
                "use_rslora": adapter.rslora, "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
                "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": str(base)}
    ours = {"base_checkpoint": str(Path(base).resolve()), "base_checkpoint_sha256": checkpoint_hash(base),
            **(extra or {})}
    with atomic_directory(destination, force=force) as work:  # every process of a job enters; process 0 writes
        if jax.process_index() == 0:
            save_file(hf_tensors(adapter, config), work / WEIGHTS_FILE, metadata={"format": "pt"})
            (work / CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")
            (work / OURS_FILE).write_text(json.dumps(ours, indent=2) + "\n")
    return Path(destination)
