"""The slot engine: continuous batching over a fixed number of slots, the rows of one static KV cache.

    engine = SlotEngine(params, config, slots=8, max_len=2048, stop_ids=checkpoint.stop_ids)
    engine.warm_up()                                     # compiles every shape it will run
    first = engine.admit(slot, Request(prompt, max_new_tokens=64, sampling=SamplingParams(0.7, top_p=0.9), seed=1))
    chunk = engine.step()                                # every busy slot advances up to `chunk` tokens
    engine.release(slot)                                 # when its request stops, ends or its client leaves

A request is prefilled alone (its prompt left padded to a power-of-two bucket, as `Engine` does) and moved into a
free row while the other rows keep their state; every `step` advances all busy rows together. Each row has its own
cache index (a row spends one slot per token), PRNG stream, sampling parameters and token limit, so a request's
tokens equal `Engine.generate` on that prompt alone with the same settings and seed. A step attends over the first
kv_len slots only, kv_len the smallest power of two that holds every busy row's tokens after the chunk: its cost
follows the tokens cached, not the cache's size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.generation.engine import bucket, left_pad
from llama_jax.generation.sampling import GREEDY, SamplingParams, row_keys, sampling_rows
from llama_jax.generation.steps import EMPTY, DecodeState, Emitted, decode_loop, prefill
from llama_jax.model import (CACHE_NAMES, CPU_NARROW_WEIGHT_OPTIONS, LlamaConfig, check_attention, init_cache,
                             insert_row, named_sharding, narrow_weight_options, param_logical_names, put_row,
                             take_row, tree_shardings, unstack_layers)

MIN_KV_LEN = 64  # the smallest kv_len a step attends over


@dataclasses.dataclass(frozen=True)
class Request:
    """A prompt (token ids), up to `max_new_tokens` more, and how to sample them (seed: the row's PRNG stream, as
    row 0 of `Engine.generate(..., seed=seed)`)."""

    prompt: Sequence[int]
    max_new_tokens: int
    sampling: SamplingParams = GREEDY
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Token:
    """One emitted token, with (when the engine keeps them) its log-probability and the most likely alternatives."""

    id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


def kv_lengths(max_len: int) -> list[int]:
    """The kv_len values steps run with: powers of two from MIN_KV_LEN, then max_len."""
    lengths = [n for n in (MIN_KV_LEN << i for i in range(32)) if n < max_len]
    return lengths + [max_len]


def prefill_lengths(max_len: int) -> list[int]:
    """The padded prompt lengths admissions run with: `bucket`'s powers of two below max_len, then max_len."""
    lengths = sorted({bucket(n) for n in range(1, max_len + 1)} - {bucket(max_len)} | {max_len})
    return [n for n in lengths if n <= max_len]


def _place(slot, state, keys, rows, limit, new_state, key, sampling, new_limit):
    """The per-row arrays with row `slot` set from one-row ones."""
    put = lambda full, one: full.at[slot].set(one[0])  # noqa: E731
    return (jax.tree.map(put, state, new_state), put(keys, key), jax.tree.map(put, rows, sampling),
            put(limit, new_limit))


def _admit(params, cache, state, keys, rows, limit, tokens, positions, segments, key, sampling, new_limit, slot,
           length, is_stop, *, config, dtype, attention, cache_dtype, top_logprobs):
    """Prefill one prompt `[1, P]` into a fresh one-row cache and move it into row `slot` of the running batch,
    with the row's state, key, sampling parameters and limit. -> (cache, state, keys, rows, limit, first Emitted)."""
    row = init_cache(config, 1, tokens.shape[1], cache_dtype)
    row, first_state, first = prefill(params, row, tokens, positions, segments, key, sampling, is_stop,
                                      config=config, dtype=dtype, attention=attention, top_logprobs=top_logprobs)
    placed = _place(slot, state, keys, rows, limit, first_state, key, sampling, new_limit)
    return insert_row(cache, row, slot, length), *placed, first


def _resume(params, cache, state, keys, rows, limit, tokens, positions, segments, key, sampling, new_limit, slot,
            is_stop, *, config, dtype, attention, top_logprobs, kv_len):
    """`_admit`, the prompt `[1, P]` prefilled after the tokens row `slot` already holds (attending over its first
    kv_len slots)."""
    row, first_state, first = prefill(params, take_row(cache, slot), tokens, positions, segments, key, sampling,
                                      is_stop, config=config, dtype=dtype, attention=attention,
                                      top_logprobs=top_logprobs, kv_len=kv_len)
    placed = _place(slot, state, keys, rows, limit, first_state, key, sampling, new_limit)
    return put_row(cache, row, slot), *placed, first


def _step(params, cache, state, keys, rows, is_stop, limit, busy, *, config, dtype, attention, width, kv_len,
          top_logprobs):
    """`decode_loop` over every row, rows not `busy` (bool `[batch]`) finished from the start."""
    state = state._replace(done=state.done | ~busy)
    return decode_loop(params, cache, state, keys, rows, is_stop, limit, config=config, dtype=dtype,
                       attention=attention, width=width, top_logprobs=top_logprobs, kv_len=kv_len)


class SlotEngine:
    """`slots` rows of one KV cache of `max_len` slots each (prompt plus generated tokens, per request).

    params:       per layer, as `Engine` takes them (`load_params(..., per_layer=True)`), used as they are when on the
                  device(s) in their layout; or stacked, then split per layer into the engine's own copy.
    stop_ids:     a request finishes when it emits any of these.
    chunk:        decode steps per `step` call (a request admitted meanwhile waits at most that long).
    top_logprobs: 0, or how many most likely tokens (with log-probabilities) to return with every token.
    mesh:         a mesh with axes data/fsdp/tensor: weights as `Engine` lays them out, the cache's rows over data
                  and its heads over tensor.
    """

    def __init__(self, params: Any, config: LlamaConfig, *, slots: int, max_len: int, stop_ids: Sequence[int] = (),
                 cache_dtype=jnp.float32, dtype=jnp.float32, attention: str = "xla", chunk: int = 4,
                 top_logprobs: int = 0, mesh: jax.sharding.Mesh | None = None):
        check_attention(attention, dtype)
        if slots < 1 or chunk < 1 or max_len < 2:
            raise ValueError(f"need slots >= 1, chunk >= 1 and max_len >= 2, got {slots}, {chunk}, {max_len}")
        self.config, self.slots, self.max_len, self.chunk, self.mesh = config, slots, max_len, chunk, mesh
        names = param_logical_names(config, unstacked="layers" not in params)
        params = jax.device_put(params, None if mesh is None else tree_shardings(mesh, names, params))
        with self._on_mesh():
            self.params = jax.jit(unstack_layers)(params) if "layers" in params else params
        stop_mask = np.zeros(config.vocab_size, bool)
        stop_mask[[i for i in stop_ids if 0 <= i < config.vocab_size]] = True
        zeros = lambda: np.zeros(slots, np.int32)  # noqa: E731  distinct buffers: the state is donated
        cache = init_cache(config, slots, max_len, cache_dtype)
        held = (cache._replace(index=zeros()), DecodeState(zeros(), zeros(), np.ones(slots, bool), zeros()),
                row_keys(0, slots), sampling_rows([GREEDY] * slots), zeros(), stop_mask)
        if mesh is None:
            held = jax.device_put(held)
        else:  # the cache's rows over data and heads over tensor; the small per-row arrays replicated
            kv = lambda a: named_sharding(mesh, CACHE_NAMES if a.ndim == 5 else (None,) * a.ndim, a.shape)  # noqa
            held = jax.device_put(held, jax.tree.map(kv, held))
        self.cache, self.state, self.keys, self.rows, self.limit, self.is_stop = held
        self.length = np.zeros(slots, np.int64)  # host copy: tokens each busy row holds in the cache
        self.busy = np.zeros(slots, bool)

        static = dict(config=config, dtype=dtype, attention=attention, top_logprobs=top_logprobs)
        self._options = CPU_NARROW_WEIGHT_OPTIONS if narrow_weight_options(params) else {}
        layout = None if mesh is None else jax.tree.map(lambda a: a.sharding, held[:5])
        emitted = None if mesh is None else named_sharding(mesh, (), ())  # every Emitted array replicated
        placed = None if mesh is None else (*layout, emitted)  # (cache, state, keys, rows, limit, first)
        self._admit_fn = jax.jit(functools.partial(_admit, **static, cache_dtype=cache_dtype), donate_argnums=(1, 2),
                                 out_shardings=placed)
        self._step_fn = jax.jit(functools.partial(_step, **static, width=chunk), static_argnames="kv_len",
                                donate_argnums=(1, 2), out_shardings=None if mesh is None else (*layout[:2], emitted))
        self._resume_fn = jax.jit(functools.partial(_resume, **static), static_argnames="kv_len",
                                  donate_argnums=(1, 2), out_shardings=placed)
        self._programs: dict[tuple, Any] = {}  # ("admit", padded) / ("step", kv_len) -> compiled program
        self._prefill_lengths = prefill_lengths(max_len)  # computed once: admissions are on the serving path

    def check(self, request: Request) -> None:
        """ValueError unless the request fits a row: a prompt of ids in the vocabulary, room for its tokens."""
        n = len(request.prompt)
        if n < 1 or request.max_new_tokens < 1:
            raise ValueError("a request needs a prompt of at least one token and max_new_tokens >= 1")
        if any(not 0 <= t < self.config.vocab_size for t in request.prompt):
            raise ValueError(f"prompt token ids must be in [0, {self.config.vocab_size})")
        if n + request.max_new_tokens - 1 > self.max_len:
            raise ValueError(f"a prompt of {n} tokens plus max_new_tokens={request.max_new_tokens} does not fit the "
                             f"context of {self.max_len} tokens")

    def free_slots(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.busy)]

    def padded(self, prompt_len: int) -> int:
        """The prefill length a prompt of `prompt_len` tokens is left padded to (max_len + 1: it does not fit)."""
        return next((p for p in self._prefill_lengths if p >= prompt_len), self.max_len + 1)

    def admit(self, slot: int, request: Request) -> Token:
        """Prefill `request` into free row `slot`; returns its first token (check `finish_reasons` after)."""
        self.check(request)
        if self.busy[slot]:
            raise ValueError(f"slot {slot} is busy")
        n = len(request.prompt)
        padded = self.padded(n)
        args = self._admit_args(request.prompt, padded, request, slot)
        self.cache, self.state, self.keys, self.rows, self.limit, first = self._program("admit", padded, args)(*args)
        self.busy[slot], self.length[slot] = True, n
        return self._tokens(first)[0][0]

    def resume(self, slot: int, request: Request, position: int) -> Token:
        """Like `admit`, with `request.prompt` put after the tokens free row `slot` still holds from its last request
        (a conversation's earlier turns: not prefilled again). position: the RoPE position of the prompt's first
        token, the number of tokens the row holds (the last request's prompt and every token it emitted but the
        last, which was never fed back)."""
        self.check(request)
        if self.busy[slot]:
            raise ValueError(f"slot {slot} is busy")
        n = len(request.prompt)
        padded = self.padded(n)
        start = int(self.length[slot])
        if request.max_new_tokens > self.room(slot, n):
            raise ValueError(f"{n} more tokens and max_new_tokens={request.max_new_tokens} do not fit after the "
                             f"{start} slots this row holds (context {self.max_len})")
        admit_args = self._admit_args(request.prompt, padded, request, slot)
        tokens, positions, segments = admit_args[6:9]  # the resumed prompt's positions follow the row's tokens
        args = (*admit_args[:7], np.where(segments > 0, positions + position, 0), *admit_args[8:13], self.is_stop)
        kv_len = next(k for k in kv_lengths(self.max_len) if k >= start + padded)
        self.cache, self.state, self.keys, self.rows, self.limit, first = self._program(
            "resume", (padded, kv_len), args)(*args)
        self.busy[slot], self.length[slot] = True, start + padded
        return self._tokens(first)[0][0]

    def room(self, slot: int, prompt_len: int) -> int:
        """The most tokens `resume` can generate after `prompt_len` more in row `slot` (< 1: they do not fit)."""
        return self.max_len - int(self.length[slot]) - self.padded(prompt_len) + 1

    def finish_reasons(self) -> dict[int, str]:
        """The busy rows that have finished (release them): slot -> "stop" (emitted a stop id) or "length"."""
        done, step, limit = (np.asarray(a) for a in (self.state.done, self.state.step, self.limit))
        return {int(s): "stop" if done[s] else "length" for s in np.flatnonzero(self.busy & (done | (step >= limit)))}

    def kv_len(self) -> int:
        """The kv_len the next step runs with: every busy row's tokens after `chunk` more fit in it."""
        need = int(self.length[self.busy].max(initial=0)) + self.chunk
        return next(n for n in kv_lengths(self.max_len) if n >= min(need, self.max_len))

    def step(self, kv_len: int | None = None) -> list[list[Token]]:
        """Up to `chunk` decode steps over the busy rows; returns each slot's new tokens (empty for idle rows).
        kv_len: the slots attended over (default `kv_len()`, the fewest that hold the rows; a benchmark may ask for
        more, up to max_len, to compare)."""
        kv_len = self.kv_len() if kv_len is None else kv_len
        args = self._step_args()
        self.cache, self.state, out = self._program("step", kv_len, args)(*args)
        tokens = self._tokens(out)
        self.length += max((len(t) for t in tokens), default=0)  # every row advanced once per step the loop ran
        return tokens

    def release(self, slot: int) -> None:
        """Free row `slot` (its request stopped, reached its limit, or was abandoned)."""
        self.busy[slot] = False

    @staticmethod
    def _tokens(out: Emitted) -> list[list[Token]]:
        ids = np.asarray(out.tokens)
        if out.logprob is None:
            return [[Token(int(t)) for t in row if t != EMPTY] for row in ids]
        logprob, top_ids, top_lp = (np.asarray(a) for a in (out.logprob, out.top_ids, out.top_logprobs))
        return [[Token(int(ids[r, i]), float(logprob[r, i]),
                       tuple(zip(top_ids[r, i].tolist(), top_lp[r, i].tolist(), strict=True)))
                 for i in range(ids.shape[1]) if ids[r, i] != EMPTY] for r in range(ids.shape[0])]

    def _admit_args(self, prompt, padded: int, request: Request, slot: int) -> tuple:
        return (self.params, self.cache, self.state, self.keys, self.rows, self.limit, *left_pad([prompt], padded),
                row_keys(request.seed, 1), sampling_rows([request.sampling]),
                np.array([request.max_new_tokens], np.int32), np.int32(slot), np.int32(len(prompt)), self.is_stop)

    def _step_args(self) -> tuple:
        return (self.params, self.cache, self.state, self.keys, self.rows, self.is_stop, self.limit, self.busy)

    def _program(self, kind: str, size, args: tuple):
        """The compiled admission (prompts padded to `size`), step (kv_len `size`) or resumption ((padded, kv_len)),
        compiled on first use."""
        if (kind, size) not in self._programs:
            fn, static = {"admit": (self._admit_fn, {}), "step": (self._step_fn, {"kv_len": size}),
                          "resume": (self._resume_fn, {"kv_len": size[1] if kind == "resume" else None})}[kind]
            with self._on_mesh():
                self._programs[kind, size] = fn.lower(*args, **static).compile(compiler_options=self._options)
        return self._programs[kind, size]

    def _on_mesh(self):
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def warm_up(self) -> tuple[int, float]:
        """Compile every admission and step shape now (none is compiled while serving); returns (programs,
        seconds)."""
        start = time.perf_counter()
        probe = Request([0], 1)
        for padded in self._prefill_lengths:
            self._program("admit", padded, self._admit_args([0], padded, probe, 0))
        for kv_len in kv_lengths(self.max_len):
            self._program("step", kv_len, self._step_args())
        return len(self._programs), time.perf_counter() - start
