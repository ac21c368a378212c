"""Next-token samplers: greedy, temperature, top-k, top-p (nucleus) and min-p, combinable, one PRNG stream per row."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. Hashable, so a jitted function can take it as a static argument.

    temperature: 0 = greedy (argmax; the other fields are then irrelevant), else logits are divided by it.
    top_k:       keep the k most likely tokens (0 = off).
    top_p:       keep the smallest set of most likely tokens whose probability reaches top_p (1 = off);
                 the most likely token is always kept.
    min_p:       keep tokens whose probability is at least min_p times the most likely one's (0 = off).
    The filters compose in that order (temperature, top-k, top-p, min-p), as in Hugging Face and vLLM.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams()


def row_keys(seed: int, batch: int) -> jax.Array:
    """One independent PRNG key per row, `[batch]`: row r's stream depends only on (seed, r), not on the batch."""
    return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), jnp.arange(batch))


def step_keys(keys: jax.Array, step: jax.Array | int) -> jax.Array:
    """The keys `[batch]` for generation step `step` of each row's stream."""
    return jax.vmap(jax.random.fold_in, (0, None))(keys, step)


def filter_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Temperature-scaled logits `[batch, vocab]` with every token the filters exclude set to -inf."""
    x = logits.astype(jnp.float32) / params.temperature
    vocab = x.shape[-1]
    k = min(params.top_k or vocab, vocab)
    if k < vocab or params.top_p < 1:
        top = jax.lax.top_k(x, k)[0]  # [batch, k], descending
        threshold = top[:, -1:]
        if params.top_p < 1:
            probs = jax.nn.softmax(top, axis=-1)
            mass_before = jnp.cumsum(probs, axis=-1) - probs
            kept = jnp.sum(mass_before < params.top_p, axis=-1, keepdims=True)  # >= 1: the first has mass 0 before
            threshold = jnp.take_along_axis(top, kept - 1, axis=-1)
        x = jnp.where(x >= threshold, x, -jnp.inf)
    if params.min_p > 0:
        x = jnp.where(x >= jnp.max(x, axis=-1, keepdims=True) + math.log(params.min_p), x, -jnp.inf)
    return x


def sample(logits: jax.Array, keys: jax.Array, params: SamplingParams) -> jax.Array:
    """Next tokens `[batch]` int32 from logits `[batch, vocab]`, row r drawing from keys[r] (`[batch]` keys)."""
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.vmap(jax.random.categorical)(keys, filter_logits(logits, params)).astype(jnp.int32)
