"""--speculate for `python -m infer` and `python -m infer.serve`: `ngram` (prompt lookup) or `draft:CKPT_DIR` (a
smaller llama_jax checkpoint with the same tokenizer), proposing --speculate-tokens tokens per step."""

from __future__ import annotations

import sys

from llama_jax.checkpoints import Checkpoint, load_params, open_checkpoint
from llama_jax.errors import InputError
from llama_jax.generation import DraftModel, NgramProposer
from llama_jax.text import Encoder, encoder_for

HELP = ("speculative decoding (the same tokens, fewer forwards of the model): ngram proposes the tokens that followed "
        "the latest earlier occurrence of the text's last few tokens (prompt lookup); draft:CKPT_DIR, a smaller "
        "checkpoint with the same tokenizer, proposes its greedy continuation")


def check_spec(spec: str | None, k: int) -> str | None:
    """None if --speculate and --speculate-tokens make sense, else what is wrong (for argparse's error)."""
    if k < 1:
        return "--speculate-tokens must be at least 1"
    if spec is not None and spec != "ngram" and not (spec.startswith("draft:") and len(spec) > len("draft:")):
        return f"--speculate {spec!r}: choose ngram or draft:CKPT_DIR"
    return None


def open_draft(spec: str | None, encoder: Encoder) -> Checkpoint | None:
    """The draft checkpoint of `draft:CKPT_DIR`, checked (before any weight is read) to have the target's tokenizer
    (InputError naming it otherwise); None for ngram or no speculation."""
    if spec is None or not spec.startswith("draft:"):
        return None
    path = spec[len("draft:"):]
    draft = open_checkpoint(path)
    if encoder_for(draft).tokenizer.get_vocab() != encoder.tokenizer.get_vocab():
        raise InputError(path, "the draft model's tokenizer is not the target's (speculation needs the same tokens)")
    return draft


def proposer(spec: str | None, k: int, draft: Checkpoint | None, dtype) -> NgramProposer | DraftModel | None:
    """What the engine's `speculate` takes: the n-gram proposer, the draft model's weights (read now), or None."""
    if spec is None:
        return None
    if draft is None:
        return NgramProposer(k)
    print(f"draft model {spec[len('draft:'):]}: {draft.config.num_hidden_layers} layers, {k} tokens per step",
          file=sys.stderr)
    return DraftModel(load_params(draft, dtype=dtype, per_layer=True), draft.config, k)
