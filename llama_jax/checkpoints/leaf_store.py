"""How one params leaf is stored in a checkpoint: a zarr3 array in Orbax's layout, written chunk by chunk.

Every chunk is stored, including one whose data equals the fill value (zeros): TensorStore skips such chunks by
default, and Orbax, which treats a missing chunk as an error, could then not read the checkpoint back. Our own
reads treat a missing chunk as an error too, and `missing_chunks` finds one from a directory listing alone.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import tensorstore as ts

from llama_jax.errors import InputError

CHUNK_BYTES = 32 << 20  # storage chunk size: the unit a device reads when restoring its shard, and of writes


def leaf_directory(params_dir: Path, path: tuple[str, ...]) -> Path:
    """Where Orbax keeps one leaf (zarr3, no OCDBT): `params/state/<dotted path>`."""
    return params_dir / "state" / ".".join(path)


def chunk_shape(shape: tuple[int, ...], itemsize: int, stacked: bool) -> list[int]:
    """Storage chunks of at most CHUNK_BYTES: one layer of a stacked leaf, split further along its largest dims."""
    chunk = [1 if stacked and i == 0 else d for i, d in enumerate(shape)]
    while math.prod(chunk) * itemsize > CHUNK_BYTES and max(chunk) > 1:
        largest = chunk.index(max(chunk))
        chunk[largest] = -(-chunk[largest] // 2)
    return chunk


def write_leaf(directory: Path, value: np.ndarray, dtype: np.dtype, stacked: bool) -> None:
    """Write one leaf as a zarr3 array, a slab of chunks at a time (cast slab by slab): no copy of the whole."""
    chunk = chunk_shape(value.shape, dtype.itemsize, stacked)
    store = ts.open({
        **_zarr3(directory),
        "store_data_equal_to_fill_value": True,
        "metadata": {"shape": list(value.shape), "data_type": dtype.name, "fill_value": 0,
                     "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
                     "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}]},
        "create": True, "delete_existing": True}).result()
    for start in range(0, value.shape[0], chunk[0]):
        store[start:start + chunk[0]].write(np.asarray(value[start:start + chunk[0]], dtype)).result()


def read_leaf(params_dir: Path, path: tuple[str, ...]) -> ts.TensorStore:
    """One stored leaf, opened lazily: index it (e.g. `[layer]`) and `.read().result()` to get numpy. A missing
    chunk is an error when read, never zeros."""
    directory = leaf_directory(params_dir, path)
    return ts.open({**_zarr3(directory), "open": True, "fill_missing_data_reads": False}).result()


def _zarr3(directory: Path) -> dict:
    """The tensorstore spec of the zarr3 array in `directory` (how Orbax stores a leaf without OCDBT)."""
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(directory)}}


def missing_chunks(directory: Path) -> list[str]:
    """The chunk files that the zarr3 array in `directory` lacks (relative paths), from its `zarr.json` and a
    listing: no data is read. A missing `zarr.json` is reported as such."""
    try:
        metadata = json.loads((directory / "zarr.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return ["zarr.json"]
    grid = [range(-(-size // chunk)) for size, chunk in
            zip(metadata["shape"], metadata["chunk_grid"]["configuration"]["chunk_shape"], strict=True)]
    # zarr3's default chunk key encoding, the one we and Orbax write: c/0/1/2
    separator = metadata.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/")
    keys = (separator.join(["c", *map(str, index)]) for index in itertools.product(*grid))
    return [key for key in keys if not (directory / key).is_file()]


def check_leaves(params_dir: Path, paths: list[tuple[str, ...]], *, problem: str) -> None:
    """InputError (naming the first incomplete leaf's directory and `problem`) unless every chunk of every leaf in
    `paths` is stored."""
    for path in paths:
        directory = leaf_directory(params_dir, path)
        missing = missing_chunks(directory)
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise InputError(directory, f"chunk {missing[0]}{more} missing: {problem}")
