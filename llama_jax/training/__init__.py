"""Training: the loss, the optimizer and the train step, JSONL data to batches, and resumable run checkpoints.
Imports `model` and `text`, never `generation`."""

from llama_jax.training.data import Dataset, batches, batches_per_epoch, eval_batches, load_jsonl
from llama_jax.training.loss import next_token_loss
from llama_jax.training.run_checkpoints import RunCheckpoints
from llama_jax.training.step import (OptimizerConfig, TrainState, abstract_state, init_state, learning_rate,
                                     make_optimizer, state_shardings, train_step)

__all__ = [
    "Dataset", "OptimizerConfig", "RunCheckpoints", "TrainState", "abstract_state", "batches", "batches_per_epoch",
    "eval_batches", "init_state", "learning_rate", "load_jsonl", "make_optimizer", "next_token_loss",
    "state_shardings", "train_step",
]
