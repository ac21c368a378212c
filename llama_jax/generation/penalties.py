"""Logit bias, repetition penalties and allowed-token masks, each row with its own settings in one compiled step:
OpenAI's `logit_bias`, `presence_penalty` and `frequency_penalty` (over the tokens generated so far),
transformers'/vLLM's `repetition_penalty` (over the prompt and the tokens generated so far), and a bitmask of the
tokens a row may take next (a grammar's, for structured output). Applied to the logits in that order, before the
sampler (greedy rows too); log-probabilities reported to clients stay the model's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.generation.sampling import SamplingParams

MAX_LOGIT_BIAS = 300  # entries of logit_bias per request, as OpenAI allows


class PenaltyRows(NamedTuple):
    """Each row's settings: presence, frequency, repetition float32 `[rows]`; bias_ids int32 and bias_values
    float32 `[rows, MAX_LOGIT_BIAS]` (id -1 where unused); allowed int32 `[rows, mask_words(vocab)]`, bit t % 32 of
    word t // 32 set where token t may come next (llguidance's layout; all bits set: no constraint)."""

    presence: jax.Array
    frequency: jax.Array
    repetition: jax.Array
    bias_ids: jax.Array
    bias_values: jax.Array
    allowed: jax.Array


def mask_words(vocab: int) -> int:
    """int32 words of an allowed-token bitmask over `vocab` tokens."""
    return -(-vocab // 32)


class Counts(NamedTuple):
    """What the penalties look at, per row: generated int32 `[rows, vocab]` (times each token was generated) and
    seen bool `[rows, vocab]` (in the prompt or generated)."""

    generated: jax.Array
    seen: jax.Array


def penalty_rows(params: Sequence[SamplingParams], vocab: int) -> PenaltyRows:
    """One row per SamplingParams, as host arrays (every token allowed)."""
    ids = np.full((len(params), MAX_LOGIT_BIAS), -1, np.int32)
    values = np.zeros((len(params), MAX_LOGIT_BIAS), np.float32)
    for r, p in enumerate(params):
        if len(p.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias: at most {MAX_LOGIT_BIAS} entries, got {len(p.logit_bias)}")
        for i, (token, value) in enumerate(p.logit_bias):
            ids[r, i], values[r, i] = token, value
    column = lambda name: np.array([getattr(p, name) for p in params], np.float32)  # noqa: E731
    return PenaltyRows(column("presence_penalty"), column("frequency_penalty"), column("repetition_penalty"), ids,
                       values, np.full((len(params), mask_words(vocab)), -1, np.int32))


def token_counts(history: jax.Array, prompt_lengths: jax.Array, vocab: int) -> Counts:
    """Counts from each row's tokens so far `[rows, n]` (the prompt's `prompt_lengths[r]` first, then the generated
    ones; -1 after the last)."""
    rows, n = history.shape
    valid = history >= 0
    generated = valid & (jnp.arange(n)[None] >= prompt_lengths[:, None])
    index = (jnp.arange(rows)[:, None], jnp.where(valid, history, vocab))  # vocab: out of range, dropped
    counts = jnp.zeros((rows, vocab), jnp.int32).at[index].add(generated.astype(jnp.int32), mode="drop")
    seen = jnp.zeros((rows, vocab), bool).at[index].set(True, mode="drop")
    return Counts(counts, seen)


def count_tokens(counts: Counts, tokens: jax.Array, live: jax.Array) -> Counts:
    """Counts after each live row (bool `[rows]`) generated tokens `[rows]`."""
    rows = jnp.arange(tokens.shape[0])
    token = jnp.where(live, tokens, counts.seen.shape[1])
    return Counts(counts.generated.at[rows, token].add(1, mode="drop"),
                  counts.seen.at[rows, token].set(True, mode="drop"))


def penalize(logits: jax.Array, rows: PenaltyRows, counts: Counts) -> jax.Array:
    """float32 logits `[rows, vocab]` with each row's bias added, its penalties applied and the tokens it may not take
    at -inf (untouched when no row asks for any of it)."""
    def apply(x):
        vocab = x.shape[-1]
        token = jnp.arange(vocab)
        allowed = (jnp.asarray(rows.allowed)[:, token // 32] >> (token % 32)[None]) & 1
        ids = jnp.where(rows.bias_ids >= 0, rows.bias_ids, vocab)
        x = x.at[jnp.arange(x.shape[0])[:, None], ids].add(rows.bias_values, mode="drop")
        repetition = rows.repetition[:, None]
        x = jnp.where(counts.seen, jnp.where(x > 0, x / repetition, x * repetition), x)
        generated = counts.generated.astype(jnp.float32)
        x = x - rows.frequency[:, None] * generated - rows.presence[:, None] * (generated > 0)
        return jnp.where(allowed == 1, x, -jnp.inf)

    active = (jnp.any(rows.bias_ids >= 0) | jnp.any(rows.presence != 0) | jnp.any(rows.frequency != 0)
              | jnp.any(rows.repetition != 1) | jnp.any(rows.allowed != -1))
    x = logits.astype(jnp.float32)
    return jax.lax.cond(active, apply, lambda x: x, x)
