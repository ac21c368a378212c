"""The llama_jax checkpoint directory: an Orbax checkpoint of the params plus everything needed to use it.

    CKPT/
      params/                 Orbax checkpoint (zarr3, one array per leaf) of the params tree, layers stacked as
                              the model uses them
      config.json             HF-compatible model config
      generation_config.json  bos, all stop ids (eos_token_id list) and sampling defaults
      tokenizer.json          a `tokenizers` tokenizer
      chat_template.jinja     the chat template, when the source had one
      llama_jax.json          metadata (format version, source, dtype, converter version); written last

A checkpoint is written leaf by leaf and chunk by chunk (Orbax writes the tree metadata, tensorstore the
arrays in Orbax's layout, see `leaf_store`), so writing needs memory for one stacked tensor; it is restored with
Orbax straight into sharded arrays: the arrays are stored in chunks of at most 32 MiB, and each device reads only
the chunks of its own shard. Every chunk is stored (zeros too), and both writing and reading check from a
listing that none is missing before the params are read.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from jax.sharding import Mesh

from llama_jax.checkpoints.atomic import atomic_directory
from llama_jax.checkpoints.hf_io import read_chat_template, read_json
from llama_jax.checkpoints.leaf_store import check_leaves, leaf_directory, read_leaf, write_leaf
from llama_jax.checkpoints.quantized import from_stored, quantize_blocks, stored_shapes, to_stored
from llama_jax.errors import InputError
from llama_jax.model import (LlamaConfig, QuantArray, check_quantization, input_axes, is_quantized_leaf,
                             named_sharding, param_logical_names, param_shapes, place, quantize_tree, tree_shardings)

FORMAT = "llama_jax"
FORMAT_VERSION = 1
METADATA_FILE = "llama_jax.json"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """An opened checkpoint directory (its small files read; params not loaded)."""

    directory: Path
    config: LlamaConfig
    metadata: dict
    generation_config: dict
    chat_template: str | None

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / "tokenizer.json"

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.metadata["dtype"])

    @property
    def quantization(self) -> str | None:
        """"int8" for a checkpoint of int8 weights (`convert --quantize int8`), else None."""
        return self.metadata.get("quantization")

    @property
    def stop_ids(self) -> tuple[int, ...]:
        eos = self.generation_config.get("eos_token_id", list(self.config.eos_token_id))
        return tuple(eos) if isinstance(eos, list) else (eos,)


def open_checkpoint(directory: str | Path) -> Checkpoint:
    """Read a checkpoint's small files; InputError if `directory` is not a complete llama_jax checkpoint."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(directory, "no such checkpoint directory")
    metadata = read_json(directory / METADATA_FILE)
    if metadata is None or metadata.get("format") != FORMAT:
        raise InputError(directory, f"not a llama_jax checkpoint (no {METADATA_FILE}); "
                                    "make one with `python -m convert`")
    if metadata.get("version") != FORMAT_VERSION:
        raise InputError(directory / METADATA_FILE, f"unsupported checkpoint format version {metadata.get('version')}")
    return Checkpoint(directory, LlamaConfig.load(directory), metadata,
                      read_json(directory / "generation_config.json", {}), read_chat_template(directory))


def check_params(checkpoint: Checkpoint) -> None:
    """InputError naming the first leaf that lacks a chunk, found from a listing before any data is read."""
    check_leaves(checkpoint.directory / "params", param_paths(checkpoint.config, checkpoint.quantization),
                 problem="the checkpoint is incomplete (llama_jax 0.1.0 left out chunks of zeros); convert or "
                         "train it again")


def load_params(checkpoint: Checkpoint, *, mesh: Mesh | None = None, dtype=None, per_layer: bool = False,
                quantize: str | None = None) -> Any:
    """Restore the params as jax arrays (cast to `dtype`, default the stored one), sharded over `mesh` if given.

    per_layer: restore straight into the tree the Engine runs (`unstack_layers`': `layer_0` .. instead of the stacked
    `layers`), one layer of one leaf at a time, each device reading only its own shard's slice: memory holds the
    weights once plus one such slice, never a stacked copy beside the per-layer one.
    quantize:  "int8": the weights as int8 QuantArrays, quantized while loading (per layer: one layer of one leaf at
    a time, never the float model). A checkpoint stored quantized loads as int8 with or without it.
    """
    check_params(checkpoint)
    if quantize is not None:
        check_quantization(quantize)
    config, dtype = checkpoint.config, np.dtype(jnp.dtype(dtype or checkpoint.dtype))
    if per_layer:
        return _load_per_layer(checkpoint, mesh, dtype, quantize)
    shapes = param_shapes(config, dtype, quantization=checkpoint.quantization)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes)
    else:
        shardings = tree_shardings(mesh, param_logical_names(config), shapes)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    with _orbax_warnings_off():  # it looks for OCDBT files, which we do not write
        params = from_stored(ocp.load(checkpoint.directory / "params", to_stored(abstract)))
    if quantize is None or checkpoint.quantization is not None:
        return params
    return jax.jit(functools.partial(quantize_tree, logical_names=param_logical_names(config)))(params)


def _load_per_layer(checkpoint: Checkpoint, mesh: Mesh | None, dtype: np.dtype, quantize: str | None) -> Any:
    """The per-layer params tree, each array read from its layer of the stored (stacked) leaf."""
    names = param_logical_names(checkpoint.config, unstacked=True)
    flat, treedef = jax.tree_util.tree_flatten_with_path(names, is_leaf=lambda n: isinstance(n, tuple))
    params_dir = checkpoint.directory / "params"
    arrays = []
    for keys, axes in flat:
        path = tuple(k.key for k in keys)
        layer = int(path[0].removeprefix("layer_")) if path[0].startswith("layer_") else None
        stored_path = path if layer is None else ("layers", *path[1:])

        def leaf(suffix=(), layer=layer, stored_path=stored_path):  # opened lazily: reads only zarr.json
            store = read_leaf(params_dir, stored_path + suffix)
            return store if layer is None else store[layer]  # store[i] is lazy too

        quantized = is_quantized_leaf(path, axes)
        if quantized and checkpoint.quantization is not None:
            arrays.append(QuantArray(_read_array(leaf(("values",)), axes, mesh, np.dtype(np.int8)),
                                     _read_array(leaf(("scale",)), axes, mesh, np.dtype(np.float32))))
        elif quantized and quantize is not None:
            stored = leaf()
            parts = quantize_blocks(lambda index, stored=stored: stored[index].read().result(), tuple(stored.shape),
                                    input_axes(path, axes))
            arrays.append(QuantArray(*(_place(a, axes, mesh) for a in parts)))
        else:
            arrays.append(_read_array(leaf(), axes, mesh, dtype))
    return jax.tree.unflatten(treedef, arrays)


def _place(host: np.ndarray, axes: tuple[str | None, ...], mesh: Mesh | None) -> jax.Array:
    """A host array onto the device, or laid out on `mesh` by its logical `axes`."""
    return jax.device_put(host) if mesh is None else place(host, named_sharding(mesh, axes, host.shape))


def _read_array(stored, axes: tuple[str | None, ...], mesh: Mesh | None, dtype: np.dtype) -> jax.Array:
    """A stored (tensorstore) array as a jax array in `dtype`, laid out on `mesh` by its logical `axes`: each device's
    callback reads only the chunks of its own shard."""
    shape = tuple(stored.shape)
    sharding = (jax.sharding.SingleDeviceSharding(jax.devices()[0]) if mesh is None
                else named_sharding(mesh, axes, shape))
    return jax.make_array_from_callback(
        shape, sharding, lambda index: stored[index].read().result().astype(dtype, copy=False))


def param_paths(config: LlamaConfig, quantization: str | None = None) -> list[tuple[str, ...]]:
    """Every stored leaf's path (`("layers", "attn", "q")`, ...; `(..., "q", "values")` and `"scale"` when int8)."""
    return list(stored_shapes(config, jnp.float32, quantization))


@contextlib.contextmanager
def _orbax_warnings_off() -> Iterator[None]:
    """Orbax warns about OCDBT files it does not find, when saving (nothing to merge) and loading ("may be a sign
    of a malformed checkpoint"): our checkpoints have none by design, so only its errors are shown."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def _release_freed_memory() -> None:
    """Hand memory freed by the last leaf back to the OS (glibc keeps it otherwise, raising the next peak)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to do
        pass


def write_checkpoint(destination: str | Path, config: LlamaConfig, leaves: Iterable[tuple[tuple[str, ...], Any]], *,
                     dtype, source: str, tokenizer_json: str | None, chat_template: str | None,
                     generation_config: dict, force: bool = False, quantization: str | None = None) -> Path:
    """Write a checkpoint atomically from (stored leaf path, array) pairs produced one at a time.

    `leaves` must cover the whole params tree of `config`. Orbax writes the tree's metadata (from tiny stand-in
    arrays); each leaf's data is then written by tensorstore straight from the given array, chunk by chunk, in the
    layout Orbax reads (an Orbax save would hold two more copies of the leaf). So peak memory is the largest leaf
    as the caller holds it plus one chunk. In a multi-process JAX job every process calls it with the same
    leaves; process 0 writes. Returns the destination path. With `quantization` "int8" the leaves are those of
    `quantized.stored_shapes` (each quantized weight as `values` and `scale`); floats are stored in `dtype`.
    """
    dtype = np.dtype(jnp.dtype(dtype))
    expected = stored_shapes(config, dtype, quantization)
    leaf_dtypes = {path: np.dtype(s.dtype) for path, s in expected.items()}
    primary = jax.process_index() == 0
    with atomic_directory(destination, force=force) as work:
        params_dir = work / "params"
        context = ocp.Context()
        context.array.saving.use_ocdbt = False
        with context, _orbax_warnings_off():
            ocp.save(params_dir, to_stored(jax.tree.map(lambda s: np.zeros((1,) * len(s.shape), s.dtype),
                                                        param_shapes(config, dtype, quantization=quantization))))
        for path, value in leaves:
            if getattr(expected.pop(path, None), "shape", None) != np.shape(value):
                raise ValueError(f"unexpected params leaf {'/'.join(path)} {np.shape(value)}")
            if primary:
                write_leaf(leaf_directory(params_dir, path), value, leaf_dtypes[path], stacked=path[0] == "layers")
            del value
            _release_freed_memory()
        if expected:
            raise ValueError(f"params leaves never written: {sorted('/'.join(p) for p in expected)}")
        if primary:
            check_leaves(params_dir, list(leaf_dtypes),
                         problem="the write did not store it (is the disk full?); the checkpoint was not kept")
            _write_small_files(work, config, dtype, source, tokenizer_json, chat_template, generation_config,
                               quantization)
    return Path(destination)


def _write_small_files(work: Path, config: LlamaConfig, dtype: np.dtype, source: str, tokenizer_json: str | None,
                       chat_template: str | None, generation_config: dict, quantization: str | None) -> None:
    """Everything but the params; the metadata file last, since it marks the checkpoint complete."""
    config.save(work / "config.json")
    write_usage_files(work, generation_config, tokenizer_json, chat_template)
    metadata = {"format": FORMAT, "version": FORMAT_VERSION, "source": source, "dtype": dtype.name,
                "converter": f"llama_jax {importlib.metadata.version('llama_jax')}",
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    if quantization is not None:
        metadata["quantization"] = quantization
    (work / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")


def write_usage_files(directory: Path, generation_config: dict, tokenizer_json: str | None,
                      chat_template: str | None) -> None:
    """generation_config.json, tokenizer.json and chat_template.jinja (the last two when there is one): the files
    a checkpoint and a HF directory share."""
    (directory / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    if tokenizer_json is not None:
        (directory / "tokenizer.json").write_text(tokenizer_json)
    if chat_template is not None:
        (directory / "chat_template.jinja").write_text(chat_template)
