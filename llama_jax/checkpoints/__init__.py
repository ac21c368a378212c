"""Weights on disk: Hugging Face directories (safetensors), GGUF files, our checkpoint directory (Orbax params plus
config, tokenizer and chat template), the conversions between them, and atomic directory writes. Above `model`."""

from llama_jax.checkpoints.conversion import (cache_home, export_hf, gguf_source, hf_source, smollm2_checkpoint,
                                              to_checkpoint)
from llama_jax.checkpoints.directory import (METADATA_FILE, Checkpoint, check_params, load_params, open_checkpoint,
                                             write_checkpoint)
from llama_jax.checkpoints.gguf_file import GGUFModel, open_gguf, smollm2_gguf_path
from llama_jax.checkpoints.hf_io import HFCheckpoint
from llama_jax.checkpoints.hf_mapping import TensorMapping, params_from_hf, params_to_hf, tensor_mappings
from llama_jax.checkpoints.peft import Adapter, read_adapter, write_adapter

__all__ = [
    "METADATA_FILE", "Adapter", "Checkpoint", "GGUFModel", "HFCheckpoint", "TensorMapping", "cache_home",
    "check_params", "export_hf", "gguf_source", "hf_source", "load_params", "open_checkpoint", "open_gguf",
    "params_from_hf", "params_to_hf", "read_adapter", "smollm2_checkpoint", "smollm2_gguf_path", "tensor_mappings",
    "to_checkpoint", "write_adapter", "write_checkpoint",
]
