"""The generation engine: batched prefill and an on-device decode loop over a static, donated KV cache.

    engine = Engine(params, config, max_len=512, sampling=SamplingParams(temperature=0.7, top_p=0.9))
    result = engine.generate([[1, 15, 42], [1, 7]], max_new_tokens=64, stop_ids=config.eos_token_id, seed=0)
    result.completions[0].tokens, result.completions[0].finish_reason

Prompts are left padded to a bucketed length (padding is segment 0, so it is never attended to) and every row
gets its own RoPE positions starting at 0, so a row's tokens do not depend on the rows batched with it. The
whole batch is prefilled in one call; the decode loop is a `lax.while_loop` on device that exits early once
every row has stopped, and returns to the host only once per streamed chunk. Each shape is compiled ahead of
time, once per engine (and across runs with `enable_compilation_cache`), and the compile time is reported apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.generation.sampling import GREEDY, SamplingParams, candidates, row_keys, sampling_rows
from llama_jax.generation.steps import EMPTY, DecodeState, Emitted, decode_loop, prefill
from llama_jax.model import (CACHE_NAMES, KVCache, LlamaConfig, check_attention, init_cache, named_sharding,
                             param_logical_names, rows_layout, tree_shardings, unstack_layers)
from llama_jax.model import CPU_NARROW_WEIGHT_OPTIONS, narrow_weight_options  # a global here: a test swaps it

MIN_BUCKET = 16


def enable_compilation_cache(path: str | Path) -> None:
    """Keep every compiled program under `path`, so a later run with the same shapes skips XLA compilation; a
    directory the user gave jax (JAX_COMPILATION_CACHE_DIR, or jax's config) is used instead of `path`."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def bucket(length: int) -> int:
    """The padded prompt length for `length` tokens: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << (length - 1).bit_length())


def prefill_lengths(max_len: int) -> list[int]:
    """The padded prompt lengths up to max_len: `bucket`'s powers of two below max_len, then max_len."""
    lengths = sorted({bucket(n) for n in range(1, max_len + 1)} - {bucket(max_len)} | {max_len})
    return [n for n in lengths if n <= max_len]


def cache_length(longest_prompt: int, max_new_tokens: int, limit: int) -> int:
    """KV-cache slots for prompts of up to `longest_prompt` tokens and `max_new_tokens` more: the bucketed prompt
    plus the new tokens, rounded up to a power of two (so nearby requests share compiled programs), at most `limit`."""
    return min(bucket(bucket(longest_prompt) + max_new_tokens), limit)


def left_pad(prompts: Sequence[Sequence[int]], length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prompts -> (tokens, positions, segment_ids), each int32 `[batch, length]`, every prompt right-aligned.

    Padding is token 0, position 0, segment 0; a prompt's own tokens are segment 1 at positions 0..len-1.
    """
    tokens, positions, segments = (np.zeros((len(prompts), length), np.int32) for _ in range(3))
    for row, prompt in enumerate(prompts):
        start = length - len(prompt)
        tokens[row, start:] = prompt
        positions[row, start:] = np.arange(len(prompt))
        segments[row, start:] = 1
    return tokens, positions, segments


class Completion(NamedTuple):
    tokens: list[int]  # the generated ids; the last is the stop id when finish_reason == "stop" (as transformers)
    finish_reason: str  # "stop" (emitted a stop id) or "length" (reached max_new_tokens)


@dataclasses.dataclass(frozen=True)
class Generation:
    """What `Engine.generate` returns: one Completion per prompt, in order, and timings in seconds."""

    completions: list[Completion]
    compile_s: float  # compiling shapes this engine had not seen (0 once warm)
    ttft_s: float  # prefill of the batch up to every row's first token on the host, compilation excluded
    decode_s: float  # everything after the first tokens, compilation excluded
    decode_tokens: int  # tokens emitted after the first ones, all rows together

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


class Engine:
    """Generates from a batch of prompts with a static KV cache of `max_len` slots per row.

    params:      the model params per layer (`load_params(..., per_layer=True)`, or `unstack_layers`' tree), used as
                 they are when already on the device in `param_shardings(..., unstacked=True)`; or stacked, then put
                 on the device and split per layer into the engine's own copy (the caller may drop theirs). Weights
                 may be int8 QuantArrays (`load_params(..., quantize="int8")`).
    max_len:     cache slots per row: the longest prompt plus max_new_tokens - 1 must fit.
    sampling:    how tokens are picked (every row alike).
    cache_dtype: dtype of the cached keys and values (int8: quantized per token and head); dtype: compute dtype of
                 the forward.
    attention:   "xla" or "cudnn" (see `forward`; one-token decode steps attend the "xla" way either way).
    mesh:        a mesh with axes data/fsdp/tensor: rows split over data (and fsdp), heads and vocab over tensor.
    """

    def __init__(self, params: Any, config: LlamaConfig, *, max_len: int, sampling: SamplingParams = GREEDY,
                 cache_dtype=jnp.float32, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None,
                 attention: str = "xla"):
        check_attention(attention, dtype)
        if sampling.penalized:
            raise ValueError("logit_bias and the penalties are applied by the serving engine (PagedEngine) only")
        self.config, self.max_len, self.sampling, self.mesh = config, max_len, sampling, mesh
        self.cache_dtype, self.dtype, self.attention = cache_dtype, dtype, attention
        stacked = "layers" in params
        names = param_logical_names(config, unstacked=not stacked)
        params = jax.device_put(params, None if mesh is None else tree_shardings(mesh, names, params))
        with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
            self.params = jax.jit(unstack_layers)(params) if stacked else params
        self.params = rows_layout(self.params)  # on a GPU: int8 weights read as rows (a no-op if they already are)
        self._executables: dict[Any, Any] = {}
        self._compiler_options = CPU_NARROW_WEIGHT_OPTIONS if narrow_weight_options(self.params) else {}

    def _sharding(self, names, shape):
        return None if self.mesh is None else named_sharding(self.mesh, names, shape)

    def _put(self, array, names):
        """A host array onto the device(s), laid out by logical axis names."""
        sharding = self._sharding(names, np.shape(array))
        return jnp.asarray(array) if sharding is None else jax.device_put(array, sharding)

    def _layout(self, batch: int, width: int = 1):
        """Shardings of the outputs (cache, state, Emitted `[batch, width]`), or None without a mesh."""
        if self.mesh is None:
            return None
        empty = jax.eval_shape(self._empty_cache_fn(batch))
        kv, scale = (None if a is None else self._sharding(CACHE_NAMES, a.shape) for a in (empty.k, empty.k_scale))
        cache = KVCache(kv, kv, self._sharding(("batch", "seq"), (batch, self.max_len)), self._sharding((), ()),
                        scale, scale)
        rows = self._sharding(("batch",), (batch,))
        return cache, DecodeState(rows, rows, rows, rows), Emitted(self._sharding(("batch", "seq"), (batch, width)))

    def _executable(self, fn: Callable, args: tuple, batch: int, width: int | None = None
                    ) -> tuple[Callable, float]:
        """`fn` jitted (cache = argument 1 donated) and compiled for these argument shapes, and the seconds it
        took to compile now (0 when this engine already had it)."""
        key = (fn, width, tuple((np.shape(x), x.dtype) for x in jax.tree.leaves(args)))
        if key in self._executables:
            return self._executables[key], 0.0
        start = time.perf_counter()
        static = dict(config=self.config, dtype=self.dtype, attention=self.attention,
                      candidates=candidates(self.sampling, self.config.vocab_size))
        if width is not None:
            static["width"] = width
        jitted = jax.jit(functools.partial(fn, **static), donate_argnums=1,
                         out_shardings=self._layout(batch, width or 1))
        with contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh):
            self._executables[key] = jitted.lower(*args).compile(compiler_options=self._compiler_options)
        return self._executables[key], time.perf_counter() - start

    def _empty_cache_fn(self, batch: int) -> Callable[[], KVCache]:
        return functools.partial(init_cache, self.config, batch, self.max_len, self.cache_dtype)

    def empty_cache(self, batch: int) -> KVCache:
        """A zeroed cache for `batch` rows, laid out on the mesh."""
        make = self._empty_cache_fn(batch)
        return make() if self.mesh is None else jax.jit(make, out_shardings=self._layout(batch)[0])()

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, stop_ids: Sequence[int] = (),
                 seed: int = 0, on_tokens: Callable[[list[list[int]]], None] | None = None, stream_chunk: int = 1
                 ) -> Generation:
        """Up to `max_new_tokens` tokens after each prompt (lists of token ids, any lengths, at least one token).

        stop_ids:  a row finishes when it emits any of these (e.g. the checkpoint's `config.eos_token_id`).

        on_tokens: streaming callback, called with each row's new tokens (a list per row, empty once a row has
                   stopped) as soon as they reach the host: first the first tokens, then every `stream_chunk`
                   steps. Without it the whole decode runs in a single device call.
        seed:      sampling seed; row r's random stream depends only on (seed, r).
        """
        batch, longest = len(prompts), max((len(p) for p in prompts), default=0)
        if not batch or min(len(p) for p in prompts) < 1:
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1 or stream_chunk < 1:
            raise ValueError(f"max_new_tokens and stream_chunk must be >= 1, got {max_new_tokens}, {stream_chunk}")
        if any(not 0 <= t < self.config.vocab_size for p in prompts for t in p):
            raise ValueError(f"prompt token ids must be in [0, {self.config.vocab_size})")
        room = self.max_len - max_new_tokens + 1
        if longest > room:
            raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} does not fit "
                             f"max_len={self.max_len}")
        tokens, positions, segments = left_pad(prompts, min(bucket(longest), room))
        keys = self._put(row_keys(seed, batch), ("batch",))
        per_row = jax.tree.map(lambda a: self._put(a, ("batch",)), sampling_rows([self.sampling] * batch))
        stop_mask = np.zeros(self.config.vocab_size, bool)
        stop_mask[[i for i in stop_ids if 0 <= i < self.config.vocab_size]] = True
        is_stop = self._put(stop_mask, (None,))
        limit = self._put(np.int32(max_new_tokens), ())
        width = stream_chunk if on_tokens else self.max_len
        emit = on_tokens or (lambda new: None)
        rows: list[list[int]] = [[] for _ in range(batch)]

        def collect(chunk: np.ndarray) -> None:
            new = [[int(t) for t in row if t != EMPTY] for row in chunk]
            for row, row_new in zip(rows, new, strict=True):
                row.extend(row_new)
            emit(new)

        inputs = (self._put(a, ("batch", "seq")) for a in (tokens, positions, segments))
        args = (self.params, self.empty_cache(batch), *inputs, keys, per_row, is_stop)
        run_prefill, compile_s = self._executable(prefill, args, batch)
        start = time.perf_counter()
        cache, state, first = run_prefill(*args)
        collect(np.asarray(first.tokens))
        ttft_s = time.perf_counter() - start

        decode, seconds = self._executable(decode_loop, (self.params, cache, state, keys, per_row, is_stop, limit),
                                           batch, width)
        compile_s += seconds
        start = time.perf_counter()
        cache, state, chunk = decode(self.params, cache, state, keys, per_row, is_stop, limit)
        reach = 1 + width  # tokens per row the calls made so far can emit: the first, then `width` per call
        while True:  # keep one chunk queued on the device while the host reads the previous one
            more = reach < max_new_tokens  # else those calls reach the limit: nothing to queue
            if more:
                cache, next_state, next_chunk = decode(self.params, cache, state, keys, per_row, is_stop, limit)
                reach += width
            collect(np.asarray(chunk.tokens))
            if not more or bool(np.all(np.asarray(state.done) | (np.asarray(state.step) >= max_new_tokens))):
                break
            state, chunk = next_state, next_chunk
        decode_s = time.perf_counter() - start

        completions = [Completion(row, "stop" if stop_mask[row[-1]] else "length") for row in rows]
        return Generation(completions, compile_s, ttft_s, decode_s, sum(len(r) - 1 for r in rows))
