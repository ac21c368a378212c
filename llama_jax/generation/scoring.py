"""Perplexity of a token sequence with a sliding window, as in transformers' "Perplexity of fixed-length models".

Windows of up to `context` tokens start every `stride` tokens; each window scores only the tokens that no earlier
window scored, so every token after the first is scored exactly once, with up to `context - 1` tokens before it
(with `stride == context` a window's first token has nothing before it in the window and is not scored, as there).
Windows are batched, right-padded to `context` (padding is segment 0, which causal attention never reaches).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.model import LlamaConfig, forward, init_cache


@dataclasses.dataclass(frozen=True)
class Window:
    """Tokens [begin, end) of the sequence, scoring those in [first_target, end)."""

    begin: int
    end: int
    first_target: int


@dataclasses.dataclass(frozen=True)
class Perplexity:
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def sliding_windows(length: int, context: int, stride: int) -> list[Window]:
    """The windows over a sequence of `length` tokens; ValueError unless 2 <= length, 2 <= context, 1 <= stride <=
    context."""
    if length < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {length}")
    if context < 2 or not 1 <= stride <= context:
        raise ValueError(f"need context >= 2 and 1 <= stride <= context, got context {context}, stride {stride}")
    windows, scored = [], 1  # the first token has nothing before it
    for begin in range(0, length, stride):
        end = min(begin + context, length)
        windows.append(Window(begin, end, max(scored, begin + 1)))
        scored = end
        if end == length:
            break
    return windows


def token_logprobs(params: Any, tokens: jax.Array, segment_ids: jax.Array, config: LlamaConfig, dtype,
                   cache_dtype=None, top: int = 0) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """log p(token t | tokens before it) for t = 1.. of each row: tokens `[batch, seq]` -> float32 `[batch, seq-1]`;
    with `top`, also the `top` most likely tokens at each of those positions (ids int32 and log-probabilities,
    `[batch, seq-1, top]`), else None for both.

    cache_dtype: None, a plain forward; else the tokens go through an empty KV cache of that dtype as a prefill does
    (keys and values written to it, then attended from it: with int8, their quantization is in the score).
    """
    cache = None if cache_dtype is None else init_cache(config, tokens.shape[0], tokens.shape[1], cache_dtype)
    logits, _ = forward(params, tokens, config, segment_ids=segment_ids, cache=cache, dtype=dtype)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    if not top:
        return chosen, None, None
    values, ids = jax.lax.top_k(logp, top)
    return chosen, ids.astype(jnp.int32), values


def token_nll(params: Any, tokens: jax.Array, segment_ids: jax.Array, config: LlamaConfig, dtype, cache_dtype=None
              ) -> jax.Array:
    """-log p(token t | tokens before it) for t = 1.. of each row `[batch, seq-1]`: see `token_logprobs`."""
    return -token_logprobs(params, tokens, segment_ids, config, dtype, cache_dtype)[0]


def perplexity(params: Any, ids: Sequence[int], config: LlamaConfig, *, context: int, stride: int, batch_size: int,
               dtype=jnp.float32, cache_dtype=None, on_batch: Callable[[int], None] = lambda windows: None
               ) -> Perplexity:
    """The sliding-window perplexity of `ids` (through a KV cache of `cache_dtype`, if given: see `token_nll`);
    `on_batch` is told how many windows each batch scored."""
    windows = sliding_windows(len(ids), context, stride)
    score = jax.jit(functools.partial(token_nll, config=config, dtype=dtype, cache_dtype=cache_dtype))
    ids = np.asarray(ids, np.int32)
    total, count = 0.0, 0
    for first in range(0, len(windows), batch_size):
        batch = windows[first:first + batch_size]
        tokens = np.zeros((batch_size, context), np.int32)  # a short last batch is padded: one compiled shape
        segments = np.zeros((batch_size, context), np.int32)
        for row, w in enumerate(batch):
            tokens[row, :w.end - w.begin] = ids[w.begin:w.end]
            segments[row, :w.end - w.begin] = 1
        nll = np.asarray(score(params, tokens, segments), np.float64)  # [batch, context - 1]: nll[j] scores j + 1
        for row, w in enumerate(batch):
            picked = nll[row, w.first_target - w.begin - 1:w.end - w.begin - 1]
            total, count = total + float(picked.sum()), count + picked.size
        on_batch(len(batch))
    return Perplexity(total / count, count)
