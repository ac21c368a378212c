"""Build Hugging Face model directories from the committed fixtures, for converter tests."""

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from conftest import FIXTURES


def byte_tokenizer_json() -> str:
    """A byte-level BPE tokenizer over 256 byte tokens (fits the fixtures' vocab of 256)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer.to_str()


def make_hf_dir(directory: Path, variant: str, *, dtype=np.float32, shards: int = 1) -> Path:
    """A HF directory of fixture `variant`: weights cast to `dtype`, split over `shards` files with an index."""
    directory.mkdir(parents=True)
    shutil.copy(FIXTURES / variant / "config.json", directory / "config.json")
    (directory / "tokenizer.json").write_text(byte_tokenizer_json())
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2], "temperature": 0.7}))
    tensors = {k: v.astype(dtype) for k, v in load_file(FIXTURES / variant / "model.safetensors").items()}
    if shards == 1:
        save_file(tensors, directory / "model.safetensors")
        return directory
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate(np.array_split(np.array(names), shards), start=1):
        file = f"model-{i:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, directory / file)
        weight_map.update(dict.fromkeys(part.tolist(), file))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


def zero_model_hf_dir(directory: Path) -> Path:
    """The `bias` fixture with every bias zero, v_proj and o_proj zero in every layer (whole leaves of zeros) and
    down_proj zero in layer 0 only (a leaf with one zero chunk and one that is not)."""
    make_hf_dir(directory, "bias")
    tensors = load_file(directory / "model.safetensors")
    for name, value in tensors.items():
        if (name.endswith(".bias") or ".v_proj." in name or ".o_proj." in name
                or name == "model.layers.0.mlp.down_proj.weight"):
            tensors[name] = np.zeros_like(value)
    save_file(tensors, directory / "model.safetensors")
    return directory


def read_hf_tensors(directory: Path) -> dict[str, np.ndarray]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors
