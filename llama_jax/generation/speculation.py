"""Speculative decoding, lossless: a request's next tokens are proposed cheaply, and the model checks them all in one
forward (`verify_pages`), keeping the longest run it would have produced itself.

The proposal is deterministic (a point mass q on each proposed token d), so the standard acceptance rule (Leviathan
et al. 2023; Chen et al. 2023: accept d with probability min(1, p(d) / q(d)) = p(d), on rejection sample from
norm(max(0, p - q)), which is p without d) is carried out by drawing t ~ p with the very key plain decoding would use
at that step and accepting d when t == d: d is accepted with probability p(d), and a rejected step emits t, which is
then distributed as p given t != d. So a request's tokens are not only distributed as the model's, they are the
tokens plain decoding gives with the same seed (greedy: the argmax; sampled: the same draws), whatever was proposed;
when all k proposals are accepted, the draw after the last is a bonus token.

Proposers:
    NgramProposer(k): prompt lookup (no draft model): the k tokens that followed the most recent earlier occurrence
    of the longest n-gram (up to `max_ngram` tokens) that ends the request's tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.generation.paged_steps import request_keys
from llama_jax.generation.penalties import PenaltyRows, count_tokens, penalize, token_counts
from llama_jax.generation.sampling import SamplingRows, sample, step_keys
from llama_jax.generation.steps import EMPTY, Emitted, emitted
from llama_jax.model import PagedCache, Pages, forward, select_adapters


@dataclasses.dataclass(frozen=True)
class NgramProposer:
    """Prompt lookup: propose up to `k` tokens by matching the last `max_ngram` .. `min_ngram` tokens earlier on."""

    k: int = 4
    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self):
        if self.k < 1 or not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need k >= 1 and 1 <= min_ngram <= max_ngram, got {self.k}, {self.min_ngram}, "
                             f"{self.max_ngram}")

    def propose(self, tokens: list[int]) -> list[int]:
        """The tokens that followed the latest earlier match of the longest suffix n-gram (none: [])."""
        ids = np.asarray(tokens, np.int64)
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)  # window i: ids[i:i + n], i + n < len
            found = np.flatnonzero((windows == ids[-n:]).all(axis=1))
            if found.size:
                start = int(found[-1]) + n
                return ids[start:start + self.k].tolist()
        return []


def verify_pages(params, pool: PagedCache, tokens, pages: Pages, seeds, streams, steps, rows: SamplingRows,
                 penalties: PenaltyRows, history, prompt_lengths, adapters, is_stop, limit, proposed, *, config,
                 dtype, attention, top_logprobs) -> tuple[PagedCache, Emitted]:
    """Each row's last token and its proposals, `tokens` `[rows, k + 1]` (right padded: `proposed` `[rows]` of them
    are real, the columns after are padding with positions at or past `pages.lengths`), into the rows' blocks (each
    row through its LoRA adapter `adapters` `[rows]`, as `prefill_chunk`), and the tokens the model emits: at
    column i the token drawn (as `decode_loop` draws the row's step `steps + i`) from the logits after the first i
    proposals, emitted while every proposal before it equalled the token drawn before it, and the row neither
    stopped nor reached `limit`. Returns (pool, Emitted `[rows, k + 1]`, EMPTY after a
    row's last)."""
    logits, pool = forward(select_adapters(params, adapters), tokens, config, cache=pool, pages=pages, dtype=dtype,
                           attention=attention)
    keys, width = request_keys(seeds, streams), tokens.shape[1]
    following = jnp.concatenate([tokens[:, 1:], jnp.full_like(tokens[:, :1], EMPTY)], axis=1)

    def column(carry, xs):
        counts, alive = carry
        x, proposal, i = xs
        token = sample(penalize(x, penalties, counts), step_keys(keys, steps + i), rows)
        out = emitted(x, jnp.where(alive, token, EMPTY), top_logprobs)
        counts = count_tokens(counts, token, alive)
        alive = alive & (i < proposed) & (proposal == token) & ~is_stop[token] & (steps + i + 1 < limit)
        return (counts, alive), out

    start = (token_counts(history, prompt_lengths, config.vocab_size), pages.lengths > 0)
    _, out = jax.lax.scan(column, start, (jnp.moveaxis(logits, 1, 0), following.T, jnp.arange(width)))
    return pool, jax.tree.map(lambda a: jnp.moveaxis(a[:, :, 0], 0, 1), out)  # [width, rows, 1, ...] -> [rows, ...]
