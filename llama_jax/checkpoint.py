"""The llama_jax checkpoint directory: an Orbax checkpoint of the params plus everything needed to use it.

    CKPT/
      params/                 Orbax (OCDBT) checkpoint of the params tree, layers stacked as the model uses them
      config.json             HF-compatible model config
      generation_config.json  bos, all stop ids (eos_token_id list) and sampling defaults
      tokenizer.json          a `tokenizers` tokenizer
      chat_template.jinja     the chat template, when the source had one
      llama_jax.json          metadata (format version, source, dtype, converter version); written last

A checkpoint is written leaf by leaf (Orbax partial saves), so writing needs memory for one stacked tensor,
and restored straight into sharded arrays: the arrays are stored in chunks, and each device reads only the
chunks of its own shard.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import importlib.metadata
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from jax.sharding import Mesh

from llama_jax.atomic import atomic_directory
from llama_jax.config import LlamaConfig
from llama_jax.errors import InputError
from llama_jax.hf_io import read_chat_template, read_json
from llama_jax.model import param_logical_names, param_shapes
from llama_jax.sharding import tree_shardings

FORMAT = "llama_jax"
FORMAT_VERSION = 1
METADATA_FILE = "llama_jax.json"
CHUNK_BYTES = 32 << 20  # storage chunk size: the unit a device reads when restoring its shard


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


def load_params(checkpoint: Checkpoint, *, mesh: Mesh | None = None, dtype=None) -> Any:
    """Restore the params as jax arrays (cast to `dtype`, default the stored one), sharded over `mesh` if given."""
    shapes = param_shapes(checkpoint.config, dtype or checkpoint.dtype)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes)
    else:
        shardings = tree_shardings(mesh, param_logical_names(checkpoint.config), shapes)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return ocp.load(checkpoint.directory / "params", abstract)


def _nested(path: tuple[str, ...], value: Any) -> dict:
    for key in reversed(path):
        value = {key: value}
    return value


def _release_freed_memory() -> None:
    """Hand memory freed by the last leaf back to the OS (glibc keeps it otherwise, raising the next peak)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to do
        pass


def _storage_context() -> ocp.Context:
    context = ocp.Context()
    context.array.saving.storage_options.chunk_byte_size = CHUNK_BYTES
    # zstd ran at ~0.17 GB/s here and made conversion CPU-bound; weights barely compress anyway.
    context.array.saving.use_compression = False
    return context


def write_checkpoint(destination: str | Path, config: LlamaConfig, leaves: Iterable[tuple[tuple[str, ...], Any]], *,
                     dtype, source: str, tokenizer_json: str | None, chat_template: str | None,
                     generation_config: dict, force: bool = False) -> Path:
    """Write a checkpoint atomically from (params path, array) pairs produced one at a time.

    `leaves` must cover the whole params tree of `config`; each is cast to `dtype` and saved before the next is
    requested, so peak memory is about one stacked tensor. Returns the destination path. In a multi-process JAX
    job every process calls it with the same leaves; process 0 writes them.
    """
    dtype = jnp.dtype(dtype)
    with atomic_directory(destination, force=force) as work, _storage_context():
        params_dir = work / "params"
        expected = jax.tree_util.tree_flatten_with_path(param_shapes(config, dtype))[0]
        expected = {tuple(k.key for k in path): s.shape for path, s in expected}
        for path, value in leaves:
            value = np.asarray(value).astype(dtype, copy=False)
            if expected.pop(path, None) != value.shape:
                raise ValueError(f"unexpected params leaf {'/'.join(path)} {value.shape}")
            ocp.partial.save(params_dir, _nested(path, value))
            del value
            _release_freed_memory()
        if expected:
            raise ValueError(f"params leaves never written: {sorted('/'.join(p) for p in expected)}")
        ocp.partial.finalize(params_dir)
        if jax.process_index() == 0:
            _write_small_files(work, config, dtype, source, tokenizer_json, chat_template, generation_config)
    return Path(destination)


def _write_small_files(work: Path, config: LlamaConfig, dtype: np.dtype, source: str, tokenizer_json: str | None,
                       chat_template: str | None, generation_config: dict) -> None:
    """Everything but the params; the metadata file last, since it marks the checkpoint complete."""
    config.save(work / "config.json")
    (work / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    if tokenizer_json is not None:
        (work / "tokenizer.json").write_text(tokenizer_json)
    if chat_template is not None:
        (work / "chat_template.jinja").write_text(chat_template)
    metadata = {"format": FORMAT, "version": FORMAT_VERSION, "source": source, "dtype": dtype.name,
                "converter": f"llama_jax {importlib.metadata.version('llama_jax')}",
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    (work / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
