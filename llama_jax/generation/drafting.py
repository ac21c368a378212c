"""A draft model for speculative decoding: a smaller model with the target's tokenizer proposes each request's next
k tokens (greedy), which the target verifies (speculation.py: whatever the draft proposes, the target's tokens are
those of plain decoding).

The draft keeps its own keys and values in a pool of the same blocks as the engine's, indexed by the same block
tables: it computes every prompt chunk the engine prefills (`draft_prefill`), and before each verification its
rows' last two tokens (the one it has not seen, or the two after all k of its proposals were accepted) and its k - 1
proposals but the last (`draft_propose`). So a request's blocks, shared through the prefix cache or not, hold the
draft's keys and values for its tokens as they hold the target's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.generation.paged_steps import Programs
from llama_jax.generation.requests import RequestState
from llama_jax.generation.rows import block_tables, prefill_arrays
from llama_jax.generation.sampling import greedy_tokens
from llama_jax.generation.steps import decode_step
from llama_jax.model import (LlamaConfig, PagedCache, Pages, copy_blocks, forward, init_paged_cache,
                             unstack_layers)


@dataclasses.dataclass(frozen=True)
class DraftModel:
    """The draft's params (per layer, or stacked), config and the tokens it proposes per step."""

    params: Any = dataclasses.field(hash=False, compare=False)
    config: LlamaConfig
    k: int = 4


def draft_prefill(params, pool: PagedCache, tokens, pages: Pages, *, config, dtype) -> PagedCache:
    """The draft's keys and values of prompt chunks `[rows, q]` (as `prefill_chunk` takes them) into its pool."""
    _, pool = forward(params, tokens, config, cache=pool, pages=pages, dtype=dtype, last_only=True)
    return pool


def draft_propose(params, pool: PagedCache, tokens, pages: Pages, room, *, config, dtype, k
                  ) -> tuple[PagedCache, jax.Array]:
    """Each row's last two tokens `[rows, 2]` (left padded: a row of one token has padding first) into the pool, then
    k greedy tokens `[rows, k]`, each fed back while fewer than `room` `[rows]` were made (so nothing is written past
    the positions a row holds blocks for)."""
    logits, pool = forward(params, tokens, config, cache=pool, pages=pages, dtype=dtype, last_only=True)
    first = greedy_tokens(logits[:, -1])
    position = pages.positions[:, -1] + 1

    def step(carry, i):
        pool, token = carry
        logits, pool = decode_step(params, pool, token, position + i, config, dtype, live=i + 1 < room,
                                   tables=pages.tables)
        following = greedy_tokens(logits)
        return (pool, following), following

    (pool, _), rest = jax.lax.scan(step, (pool, first), jnp.arange(k - 1))
    return pool, jnp.concatenate([first[:, None], rest.T], axis=1)


class Drafter:
    """The draft model, its pool (`blocks` blocks of `block_size` tokens, like the engine's) and its programs."""

    def __init__(self, draft: DraftModel, target: LlamaConfig, *, blocks: int, block_size: int, cache_dtype, dtype,
                 options: dict):
        if draft.config.vocab_size != target.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({draft.config.vocab_size} tokens) is not the target's "
                             f"({target.vocab_size})")
        if draft.k < 1:
            raise ValueError(f"a draft model proposes k >= 1 tokens, got {draft.k}")
        self.k = draft.k
        params = jax.device_put(draft.params)
        self.params = jax.jit(unstack_layers)(params) if "layers" in params else params
        self.pool = init_paged_cache(draft.config, blocks, block_size, cache_dtype)
        static = dict(config=draft.config, dtype=dtype)
        self.programs = Programs({"draft_prefill": jax.jit(functools.partial(draft_prefill, **static),
                                                           donate_argnums=(1,)),
                                  "propose": jax.jit(functools.partial(draft_propose, **static, k=draft.k),
                                                     donate_argnums=(1,)),
                                  "draft_copy": jax.jit(copy_blocks, donate_argnums=(0,))}, options)

    def prefill(self, tokens: np.ndarray, pages: Pages) -> None:
        """The chunks the engine has just prefilled, into the draft's pool."""
        self.pool = self.programs("draft_prefill", tokens.shape, (self.params, self.pool, tokens, pages))

    def copy(self, pairs: np.ndarray) -> None:
        """Blocks `pairs[0]` copied over blocks `pairs[1]` in the draft's pool, as the engine copies them in its own."""
        self.pool = self.programs("draft_copy", pairs.shape[1], (self.pool, *pairs))

    def propose(self, decoding: list[RequestState], rows: int, table_len: int, max_len: int) -> list[list[int]]:
        """k proposals per decoding request (the engine keeps those its blocks and max_new_tokens allow)."""
        args = propose_arrays(decoding, rows, table_len, max_len)
        self.pool, proposals = self.programs("propose", rows, (self.params, self.pool, *args))
        return np.asarray(proposals)[:len(decoding)].tolist()

    def lowered(self, prefill_shapes: list[tuple[int, int]], decode_rows: list[int], table_len: int,
                max_len: int) -> dict:
        """Every program the engine's shapes will need, lowered (for `compile_all`)."""
        lowered = {}
        for rows, width in prefill_shapes:
            tokens, pages, _ = prefill_arrays([], rows, width, table_len, max_len)
            lowered["draft_prefill", (rows, width)] = self.programs.lower(
                "draft_prefill", (self.params, self.pool, tokens, pages))
        for rows in decode_rows:
            lowered["propose", rows] = self.programs.lower(
                "propose", (self.params, self.pool, *propose_arrays([], rows, table_len, max_len)))
        slots = decode_rows[-1]
        lowered["draft_copy", slots] = self.programs.lower("draft_copy", (self.pool, *np.zeros((2, slots), np.int32)))
        return lowered


def propose_arrays(decoding: list[RequestState], rows: int, table_len: int, max_len: int
                   ) -> tuple[np.ndarray, Pages, np.ndarray]:
    """For `draft_propose`: each request's last two tokens, left padded `[rows, 2]`, their Pages (padding at position
    max_len) and the tokens each may feed after its last `[rows]` (with no requests: the arrays it is compiled for)."""
    tokens = np.zeros((rows, 2), np.int32)
    positions = np.full((rows, 2), max_len, np.int32)
    lengths, room = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
    for r, sequence in enumerate(decoding):
        last = sequence.tokens[-2:]
        tokens[r, 2 - len(last):] = last
        positions[r, 2 - len(last):] = np.arange(len(sequence.tokens) - len(last), len(sequence.tokens))
        lengths[r], room[r] = len(sequence.tokens), sequence.room()
    return tokens, Pages(block_tables(decoding, rows, table_len), positions, lengths), room
