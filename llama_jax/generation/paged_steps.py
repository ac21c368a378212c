"""The paged engine's device programs and their shapes: a prefill of prompt chunks, which samples each row's next
token, over a `PagedCache` (llama_jax.model.paged), and decode steps (`steps.decode_loop` with block tables). The
model, the sampler and the emitted tokens' format are the ones `Engine` uses; only where keys and values live
differs.

Rows carry what the host knows about each request: its seed and stream (the request's PRNG stream is row `stream`
of `row_keys(seed, ...)`, as row `stream` of `Engine.generate(..., seed=seed)`), tokens emitted so far (the step whose
key samples the next token), sampling parameters, logit bias and penalties with the tokens they count (`history`:
prompt then generated tokens, -1 after them; `prompt_lengths`), its LoRA adapter (`adapters`, a slot of the
params' `MultiLoraWeight`s, 0 the base) and token limit. Unused rows have length 0: they write and emit nothing.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os

import jax
import jax.numpy as jnp

from llama_jax.generation.penalties import PenaltyRows, penalize, token_counts
from llama_jax.generation.sampling import SamplingRows, sample, step_keys
from llama_jax.generation.steps import EMPTY, DecodeState, Emitted, decode_loop, emitted
from llama_jax.model import PagedCache, Pages, forward, select_adapters


CALL_TOKENS = 64  # a prefill call's fixed cost, as tokens computed (see choose_shape)
ROW_CONTEXT_TOKENS = 300  # context tokens a prefill row gathers and attends over that cost about one token computed


def request_keys(seeds: jax.Array, streams: jax.Array) -> jax.Array:
    """Each row's PRNG stream `[rows]` from its request's seed and stream, as `row_keys(seed, n)[stream]`."""
    return jax.vmap(lambda seed, stream: jax.random.fold_in(jax.random.key(seed), stream))(seeds, streams)


def prefill_chunk(params, pool: PagedCache, tokens, pages: Pages, seeds, streams, steps, rows: SamplingRows,
                  penalties: PenaltyRows, history, prompt_lengths, adapters, *, config, dtype, attention, top_logprobs
                  ) -> tuple[PagedCache, Emitted]:
    """Prompt chunks `[rows, q]`, left padded (a row's tokens end at its last column), into their rows' blocks, each
    row through its LoRA adapter `adapters` `[rows]` (`select_adapters`); samples each row's next token from its last
    token's logits with the key of step `steps` `[rows]`.
    Returns (pool, Emitted of width 1); the host keeps the token only for rows whose chunk ends their tokens."""
    logits, pool = forward(select_adapters(params, adapters), tokens, config, cache=pool, pages=pages, dtype=dtype,
                           last_only=True, attention=attention)
    logits = logits[:, -1]
    adjusted = penalize(logits, penalties, token_counts(history, prompt_lengths, logits.shape[-1]))
    token = sample(adjusted, step_keys(request_keys(seeds, streams), steps), rows)
    return pool, emitted(logits, jnp.where(pages.lengths > 0, token, EMPTY), top_logprobs)


def decode_pages(params, pool, tables, state: DecodeState, seeds, streams, rows, penalties: PenaltyRows, history,
                 prompt_lengths, adapters, is_stop, limit, *, config, dtype, attention, width, top_logprobs):
    """`decode_loop` over a paged pool, the rows' PRNG streams from their seeds, each row through its LoRA adapter
    `adapters` `[rows]`. -> (pool, Emitted)."""
    counts = token_counts(history, prompt_lengths, config.vocab_size)
    pool, _, out = decode_loop(select_adapters(params, adapters), pool, state, request_keys(seeds, streams), rows,
                               is_stop, limit, config=config, dtype=dtype, attention=attention, width=width,
                               top_logprobs=top_logprobs, tables=tables, penalties=(penalties, counts))
    return pool, out


def powers_of_two(limit: int) -> list[int]:
    """1, 2, 4, ... up to and including `limit` (the last one `limit` itself when it is not a power of two)."""
    sizes = [n for n in (1 << i for i in range(32)) if n < limit]
    return sizes + [limit]


def block_size_for(max_len: int) -> int:
    """The largest block size of 16 or fewer tokens (a power of two) that divides max_len."""
    return next(b for b in (16, 8, 4, 2, 1) if max_len % b == 0)


def prefill_shapes(max_batch_tokens: int, slots: int, max_len: int) -> list[tuple[int, int]]:
    """The (rows, width) shapes a prefill runs with: 1, 4 or 16 prompt chunks (rows <= slots) of the whole budget,
    a quarter or a sixteenth of it (at least 32 tokens, at most max_len), rows x width <= max_batch_tokens; so a
    short prompt, or the tail left after a prefix-cache hit, is not padded to the whole budget."""
    widths = {max_batch_tokens} | {w for w in (max_batch_tokens // 4, max_batch_tokens // 16) if w >= 32}
    return sorted({(rows, min(width, max_len)) for rows in (1, 4, 16) for width in widths
                   if rows <= slots and rows * width <= max_batch_tokens})


def lay_out(pending: list[int], rows: int, width: int) -> list[tuple[int, int]]:
    """The waiting prompts' `pending` tokens (first come, first served) over `rows` rows of `width`: a row `(i, n)`
    holds the next n tokens of prompt i, and a prompt takes as many rows as it needs (its tokens in order, the last
    row its remainder), so short prompts pack a wide call with little padding. One prefill writes every row's keys
    and values before any row attends, so a row sees the earlier rows of its prompt."""
    layout: list[tuple[int, int]] = []
    for i, tokens in enumerate(pending):
        while tokens > 0 and len(layout) < rows:
            layout.append((i, min(tokens, width)))
            tokens -= layout[-1][1]
    return layout


def choose_shape(shapes: list[tuple[int, int]], pending: list[int], contexts: list[int] | None = None
                 ) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """The shape (and its `lay_out`) that prefills the prompts' `pending` tokens at the least cost per token: rows x
    width computed, a call's fixed cost (reading the weights) of CALL_TOKENS tokens, and each row's reading of the
    longest context in the call (every row attends that far; `contexts`: each prompt's tokens before its pending
    ones) at ROW_CONTEXT_TOKENS context tokens per token. Ties go to fewer rows."""
    contexts = contexts or [0] * len(pending)

    def cost(option):
        (rows, width), layout = option
        covered = sum(n for _, n in layout)
        reach = max(contexts[i] + sum(m for j, m in layout if j == i) for i, _ in layout)
        return (rows * width + CALL_TOKENS + rows * reach / ROW_CONTEXT_TOKENS) / covered, -covered, rows

    return min(((shape, lay_out(pending, *shape)) for shape in shapes), key=cost)


def compile_all(lowered: dict, options: dict | None = None) -> dict:
    """Compile lowered programs `{key: jax.stages.Lowered}` on a thread each (XLA compiles outside the GIL, so a
    machine with several cores compiles several at once); returns `{key: compiled}`."""
    with concurrent.futures.ThreadPoolExecutor(min(len(lowered), os.cpu_count() or 1) or 1) as pool:
        compiled = pool.map(lambda program: program.compile(compiler_options=options or {}), lowered.values())
        return dict(zip(lowered, compiled, strict=True))


class Programs:
    """Jitted functions by kind, each compiled once per (kind, shape): on first use, or ahead (`compile`, several at
    once); on `mesh` when given. `runs` counts the calls of each (kind, shape)."""

    def __init__(self, functions: dict, options: dict, mesh: jax.sharding.Mesh | None = None):
        self.functions, self.options, self.mesh = functions, options, mesh
        self.compiled: dict[tuple, object] = {}
        self.runs: collections.Counter = collections.Counter()

    def __call__(self, kind: str, shape, args: tuple):
        if (kind, shape) not in self.compiled:
            self.compile({(kind, shape): self.lower(kind, args)})
        self.runs[kind, shape] += 1
        return self.compiled[kind, shape](*args)

    def lower(self, kind: str, args: tuple):
        with contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh):
            return self.functions[kind].lower(*args)

    def compile(self, lowered: dict) -> None:
        """Compile `{(kind, shape): lowered}`, of this object's kinds."""
        self.compiled.update(compile_all(lowered, self.options))


def check_sizes(*, slots: int, max_len: int, kv_tokens: int, block_size: int, max_batch_tokens: int,
                chunk: int) -> None:
    """ValueError (one line, naming the setting) unless the engine's sizes make sense together."""
    if slots < 1 or chunk < 1 or max_len < 2:
        raise ValueError(f"need slots >= 1, chunk >= 1 and max_len >= 2, got {slots}, {chunk}, {max_len}")
    if block_size < 1 or max_len % block_size:
        raise ValueError(f"block_size {block_size} must divide max_len {max_len}")
    if kv_tokens < max_len:
        raise ValueError(f"kv_tokens {kv_tokens} is below max_len {max_len}: one request of max_len must fit")
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
