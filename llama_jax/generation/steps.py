"""The device programs both engines run: a prefill that samples each row's first token, and an on-device decode
loop. `Engine` (a batch of prompts, a dense cache) jits these with its static arguments, and `PagedEngine` (requests
joining and leaving a running batch, a paged pool) runs `decode_loop` with block tables; neither has another copy of
the step.

Rows are independent: each has its own PRNG stream, sampling parameters (`SamplingRows`), token limit and step
count, and (with a paged pool) its own blocks.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llama_jax.generation.penalties import Counts, PenaltyRows, count_tokens, penalize
from llama_jax.generation.sampling import SamplingRows, sample, step_keys
from llama_jax.model import KVCache, LlamaConfig, PagedCache, Pages, forward

EMPTY = -1  # what a finished row emits on device; never returned


class DecodeState(NamedTuple):
    """Where each row is, every field `[batch]`."""

    token: jax.Array  # int32, the last token emitted (the next input)
    position: jax.Array  # int32, the RoPE position of `token`
    done: jax.Array  # bool, the row has emitted a stop id (or was let go)
    step: jax.Array  # int32, tokens emitted so far by the row


class Emitted(NamedTuple):
    """Tokens a program emitted, `[batch, width]` (EMPTY where a row emitted none), and, when asked for, their
    log-probabilities under the model (log-softmax of the raw logits, before temperature and filters) and the
    `n` most likely tokens at each step (`[batch, width, n]`); None otherwise."""

    tokens: jax.Array
    logprob: jax.Array | None = None
    top_ids: jax.Array | None = None
    top_logprobs: jax.Array | None = None


def emitted(logits: jax.Array, tokens: jax.Array, top_logprobs: int) -> Emitted:
    """One step's Emitted (width 1) for tokens `[batch]` (EMPTY allowed) picked from logits `[batch, vocab]`."""
    if not top_logprobs:
        return Emitted(tokens[:, None])
    logits = logits.astype(jnp.float32)
    normalizer = jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # log-probabilities without writing them all
    chosen = jnp.take_along_axis(logits, jnp.maximum(tokens, 0)[:, None], axis=-1) - normalizer
    top, ids = jax.lax.top_k(logits, top_logprobs)
    top = top - normalizer
    return Emitted(tokens[:, None], chosen, ids[:, None].astype(jnp.int32), top[:, None])


def decode_step(params, cache: KVCache | PagedCache, tokens: jax.Array, positions: jax.Array, config: LlamaConfig,
                dtype=jnp.float32, attention: str = "xla", kv_len: int | None = None, live: jax.Array | None = None,
                tables: jax.Array | None = None) -> tuple[jax.Array, KVCache | PagedCache]:
    """One cached step: tokens `[batch]` at RoPE positions `[batch]` -> logits `[batch, vocab]`, updated cache
    (attending over the cache's first kv_len slots: see `forward`). live: bool `[batch]`, rows whose token is real;
    the others' slots are written as padding (segment 0), so that a row that goes on later never sees them.
    tables: with a paged pool as `cache`, each row's blocks `[batch, table_len]` (position = the row's place);
    a row that is not live writes nothing there."""
    if tables is not None:
        length = positions + 1 if live is None else jnp.where(live, positions + 1, 0)
        logits, cache = forward(params, tokens[:, None], config, cache=cache, dtype=dtype, attention=attention,
                                pages=Pages(tables, positions[:, None], length))
        return logits[:, 0], cache
    segments = None if live is None else live[:, None].astype(jnp.int32)
    logits, cache = forward(params, tokens[:, None], config, positions=positions[:, None], segment_ids=segments,
                            cache=cache, dtype=dtype, attention=attention, kv_len=kv_len)
    return logits[:, 0], cache


def prefill(params, cache, tokens, positions, segment_ids, keys, rows: SamplingRows, is_stop, *, config, dtype,
            attention, candidates=None, top_logprobs=0, kv_len=None) -> tuple[KVCache, DecodeState, Emitted]:
    """Prompts `[batch, seq]` into the cache (after what it holds); samples each row's first token.

    keys: `[batch]` PRNG keys, one stream per row; rows: each row's sampling parameters; is_stop: bool `[vocab]`,
    the stop tokens; candidates: see `sample`; kv_len: see `forward`. Returns (cache, state, the first tokens as
    Emitted of width 1).
    """
    logits, cache = forward(params, tokens, config, positions=positions, segment_ids=segment_ids, cache=cache,
                            dtype=dtype, last_only=True, attention=attention, kv_len=kv_len)
    logits = logits[:, -1]
    first = sample(logits, step_keys(keys, 0), rows, candidates)
    state = DecodeState(first, positions[:, -1] + 1, is_stop[first], jnp.ones_like(first))
    return cache, state, emitted(logits, first, top_logprobs)


def decode_loop(params, cache, state: DecodeState, keys, rows: SamplingRows, is_stop, limit, *, config, dtype,
                attention, width, candidates=None, top_logprobs=0, kv_len=None, tables=None,
                penalties: tuple[PenaltyRows, Counts] | None = None
                ) -> tuple[KVCache | PagedCache, DecodeState, Emitted]:
    """Up to `width` steps, until every row is finished: done, or its step count at `limit` (a scalar or `[batch]`).

    Returns (cache, state, Emitted `[batch, width]`): EMPTY where a row had already finished or the loop had ended.
    kv_len: the cache slots the steps attend over (`forward`'s); every unfinished row's slots must fit in them.
    tables: with a paged pool as `cache`, each row's blocks (see `decode_step`), holding every position it reaches.
    penalties: each row's logit bias and penalties and the counts they start from (llama_jax.generation.penalties),
    counted on as the rows generate.
    """
    batch = state.token.shape[0]
    out = Emitted(jnp.full((batch, width), EMPTY, jnp.int32))
    if top_logprobs:
        out = Emitted(out.tokens, jnp.zeros((batch, width), jnp.float32),
                      jnp.zeros((batch, width, top_logprobs), jnp.int32),
                      jnp.zeros((batch, width, top_logprobs), jnp.float32))

    def finished(s: DecodeState) -> jax.Array:
        return s.done | (s.step >= limit)

    def running(carry):
        _, s, _, _, i = carry
        return (i < width) & ~jnp.all(finished(s))

    def step(carry):
        cache, s, out, counts, i = carry
        over = finished(s)
        logits, cache = decode_step(params, cache, jnp.where(over, 0, s.token), s.position, config, dtype,
                                    attention, kv_len, ~over, tables)
        adjusted = logits if penalties is None else penalize(logits, penalties[0], counts)
        token = sample(adjusted, step_keys(keys, s.step), rows, candidates)
        new = emitted(logits, jnp.where(over, EMPTY, token), top_logprobs)
        out = jax.tree.map(lambda buffer, x: jax.lax.dynamic_update_slice_in_dim(buffer, x, i, axis=1), out, new)
        state = DecodeState(token, s.position + 1, s.done | (~over & is_stop[token]), s.step + 1)
        counts = None if penalties is None else count_tokens(counts, token, ~over)
        return cache, state, out, counts, i + 1

    counts = None if penalties is None else penalties[1]
    cache, state, out, _, _ = jax.lax.while_loop(running, step, (cache, state, out, counts, jnp.int32(0)))
    return cache, state, out
