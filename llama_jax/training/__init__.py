"""Training: the loss, the optimizer and the train step (full or LoRA), JSONL data to batches, and resumable run
checkpoints.
Imports `model` and `text`, never `generation`."""

from llama_jax.training.data import Dataset, batches, batches_per_epoch, eval_batches, load_jsonl
from llama_jax.training.lora import (LORA_FLOPS_FRACTION, LoraConfig, adapter_shapes, adapter_shardings,
                                     attach_adapters, init_lora, to_adapter)
from llama_jax.training.loss import VOCAB_CHUNK, next_token_loss, target_nll
from llama_jax.training.run_checkpoints import RunCheckpoints
from llama_jax.training.step import (OptimizerConfig, TrainState, abstract_state, init_state, learning_rate,
                                     make_optimizer, state_shardings, train_step)

__all__ = [
    "LORA_FLOPS_FRACTION", "VOCAB_CHUNK", "Dataset", "LoraConfig", "OptimizerConfig", "RunCheckpoints", "TrainState",
    "abstract_state", "adapter_shapes", "adapter_shardings", "attach_adapters", "batches", "batches_per_epoch",
    "eval_batches", "init_lora", "init_state", "learning_rate", "load_jsonl", "make_optimizer", "next_token_loss",
    "state_shardings", "target_nll", "to_adapter", "train_step",
]
