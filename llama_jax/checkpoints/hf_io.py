"""Hugging Face model directories on disk: read one tensor at a time (memory-mapped), write in shards."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from llama_jax.errors import InputError
from llama_jax.model import LlamaConfig

INDEX_FILE = "model.safetensors.index.json"


def read_json(path: Path, default: Any = None) -> Any:
    """The parsed JSON file, or `default` when it does not exist; InputError when it is not JSON."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(path, f"not valid JSON ({e})") from None


def read_chat_template(directory: Path) -> str | None:
    """The chat template: transformers 5's chat_template.jinja, else tokenizer_config.json's entry."""
    jinja = directory / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    template = read_json(directory / "tokenizer_config.json", {}).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = {t["name"]: t["template"] for t in template}.get("default")
    return template


SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
                      "int32": "I32", "int64": "I64"}
NUMPY_DTYPES = {code: np.dtype(name) for name, code in SAFETENSORS_DTYPES.items() if name != "bfloat16"}
NUMPY_DTYPES["BF16"] = np.dtype(ml_dtypes.bfloat16)


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # of the first byte, from the start of the file


def read_safetensors_header(file: Path) -> dict[str, StoredTensor]:
    """The tensors a .safetensors file holds, checked against the file's size (InputError if truncated)."""
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if size < 8 or header_len > size - 8:
                raise InputError(file, "unreadable or truncated safetensors file (header runs past the end)")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise InputError(file, "missing safetensors shard (listed in the index)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(file, "unreadable or truncated safetensors file (corrupt header)") from None
    data_start, data_size = 8 + header_len, size - 8 - header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = NUMPY_DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InputError(file, f"unsupported or corrupt entry for tensor {name} in the header") from None
        if end > data_size:
            raise InputError(file, f"truncated: tensor {name} ends at byte {end} of data, the file has {data_size}")
        if end - begin != dtype.itemsize * int(np.prod(shape)):
            raise InputError(file, f"corrupt header: tensor {name} has {end - begin} bytes for shape {shape}")
        tensors[name] = StoredTensor(file, dtype, shape, data_start + begin)
    return tensors


class HFCheckpoint:
    """A HF `LlamaForCausalLM` directory: config.json, one or many *.safetensors (with the index), tokenizer.

    Tensors are memory-mapped views of the files: reading one costs no memory of its own, only page cache.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise InputError(self.directory, "not a directory")
        self.config = LlamaConfig.load(self.directory)
        self.generation_config: dict = read_json(self.directory / "generation_config.json", {})
        self.chat_template = read_chat_template(self.directory)
        tokenizer = self.directory / "tokenizer.json"
        self.tokenizer_json = tokenizer.read_text() if tokenizer.exists() else None
        self._tensors: dict[str, StoredTensor] = {}
        index = read_json(self.directory / INDEX_FILE)
        if index is not None:
            weight_map = {name: self.directory / file for name, file in index.get("weight_map", {}).items()}
            for file in sorted(set(weight_map.values())):
                stored = read_safetensors_header(file)
                for name in (n for n, f in weight_map.items() if f == file):
                    if name not in stored:
                        raise InputError(file, f"tensor {name} listed in {INDEX_FILE} is not in this shard")
                    self._tensors[name] = stored[name]
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise InputError(self.directory, "no *.safetensors weights found")
            for file in files:
                self._tensors.update(read_safetensors_header(file))

    def names(self) -> list[str]:
        return list(self._tensors)

    def _stored(self, name: str) -> StoredTensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise InputError(self.directory, f"missing tensor {name}") from None

    def file_of(self, name: str) -> Path:
        return self._stored(name).file

    def get(self, name: str) -> np.ndarray:
        """One tensor, in its stored dtype and HF layout: a read-only memory-mapped view."""
        t = self._stored(name)
        return np.memmap(t.file, dtype=t.dtype, mode="r", offset=t.offset, shape=t.shape)

    def dtype(self) -> np.dtype:
        """The dtype the weights are stored in (that of the embedding)."""
        return self._stored("model.embed_tokens.weight").dtype


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> int:
    """Write a .safetensors file tensor by tensor (never a second copy of them all); returns the data bytes.

    Non-contiguous arrays (transposed views) are written in logical C order, one at a time.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype.name], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for tensor in tensors.values():
            f.write(np.ascontiguousarray(tensor).reshape(-1).view(np.uint8).data)
    return offset


def write_safetensors_shards(directory: Path, shards: Iterable[dict[str, np.ndarray]], count: int) -> None:
    """Write `count` groups of HF tensors as model-0000i-of-0000n.safetensors plus the index json."""
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{count:05d}.safetensors"
        total += write_safetensors(directory / name, tensors)
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
