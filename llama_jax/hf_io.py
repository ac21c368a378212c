"""Hugging Face model directories on disk: read one tensor at a time (memory-mapped), write in shards."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from llama_jax.config import LlamaConfig
from llama_jax.errors import InputError

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


class HFCheckpoint:
    """A HF `LlamaForCausalLM` directory: config.json, one or many *.safetensors (with the index), tokenizer."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise InputError(self.directory, "not a directory")
        self.config = LlamaConfig.load(self.directory)
        self.generation_config: dict = read_json(self.directory / "generation_config.json", {})
        self.chat_template = read_chat_template(self.directory)
        tokenizer = self.directory / "tokenizer.json"
        self.tokenizer_json = tokenizer.read_text() if tokenizer.exists() else None
        self._files: dict[Path, Any] = {}
        self._where: dict[str, Path] = {}
        index_path = self.directory / INDEX_FILE
        index = read_json(index_path)
        if index is not None:
            for name, file in index.get("weight_map", {}).items():
                self._where[name] = self.directory / file
            for file in sorted(set(self._where.values())):
                self._check_contains(file, [n for n, f in self._where.items() if f == file])
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise InputError(self.directory, "no *.safetensors weights found")
            for file in files:
                self._where.update(dict.fromkeys(self._open(file).keys(), file))

    def _open(self, file: Path):
        if file not in self._files:
            if not file.exists():
                raise InputError(file, "missing safetensors shard (listed in the index)")
            try:
                self._files[file] = safe_open(file, framework="np")
            except SafetensorError as e:
                raise InputError(file, f"unreadable or truncated safetensors file ({e})") from None
        return self._files[file]

    def _check_contains(self, file: Path, names: list[str]) -> None:
        present = set(self._open(file).keys())
        missing = [n for n in names if n not in present]
        if missing:
            raise InputError(file, f"tensor {missing[0]} listed in {INDEX_FILE} is not in this shard")

    def names(self) -> list[str]:
        return list(self._where)

    def file_of(self, name: str) -> Path:
        try:
            return self._where[name]
        except KeyError:
            raise InputError(self.directory, f"missing tensor {name}") from None

    def get(self, name: str) -> np.ndarray:
        """One tensor, in its stored dtype and HF layout."""
        return self._open(self.file_of(name)).get_tensor(name)

    def dtype(self) -> np.dtype:
        """The dtype the weights are stored in (that of the embedding)."""
        return self.get("model.embed_tokens.weight").dtype


def write_safetensors_shards(directory: Path, shards: Iterable[dict[str, np.ndarray]], count: int) -> None:
    """Write `count` groups of HF tensors as model-0000i-of-0000n.safetensors plus the index json."""
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{count:05d}.safetensors"
        # safetensors writes an array's memory as it lies, so transposed views must be made contiguous first.
        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        save_file(tensors, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
