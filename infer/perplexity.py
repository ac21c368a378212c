"""`python -m infer [CKPT] --perplexity FILE [--context N] [--stride S] [--json]`: the sliding-window perplexity of a
UTF-8 text file (see llama_jax.generation.scoring), with --quantize, --kv-cache and --adapter as in generation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from infer.weights import load_weights
from llama_jax.checkpoints import Checkpoint
from llama_jax.errors import InputError
from llama_jax.generation import perplexity, sliding_windows
from llama_jax.text import Encoder


def read_text(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise InputError(path, f"cannot read the text ({e.__class__.__name__})") from None
    except UnicodeDecodeError as e:
        raise InputError(path, f"not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise InputError(path, "the text is empty")
    return text


def run_perplexity(args, checkpoint: Checkpoint, encoder: Encoder, dtype, mesh) -> int:
    config = checkpoint.config
    context = args.context
    stride = args.stride if args.stride is not None else max(1, context // 2)
    if not 2 <= context <= config.max_position_embeddings:
        raise ValueError(f"--context {context} must be between 2 and the model's context of "
                         f"{config.max_position_embeddings} tokens")
    if not 1 <= stride <= context:
        raise ValueError(f"--stride {stride} must be between 1 and --context {context}")
    ids = encoder.tokenizer.encode(read_text(args.perplexity)).ids
    if len(ids) < 2:
        raise InputError(args.perplexity, f"{len(ids)} token(s): perplexity needs at least 2")
    windows = len(sliding_windows(len(ids), context, stride))
    params = load_weights(args, checkpoint, dtype, mesh)
    with tqdm(total=windows, desc="perplexity", unit="window", disable=not sys.stderr.isatty()) as bar:
        result = perplexity(params, ids, config, context=context, stride=stride, batch_size=args.batch_size,
                            dtype=dtype, cache_dtype=args.kv_cache, on_batch=bar.update)
    if args.json:
        print(json.dumps({"perplexity": result.perplexity, "tokens": result.tokens, "nll": result.nll}))
    else:
        print(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens (mean NLL {result.nll:.4f} nats; "
              f"context {context}, stride {stride})")
    return 0
