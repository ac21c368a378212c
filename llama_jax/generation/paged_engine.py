"""The serving engine: requests join and leave a running batch whose KV cache is one pool of blocks.

    engine = PagedEngine(params, config, slots=16, max_len=4096, kv_tokens=65536, stop_ids=checkpoint.stop_ids)
    engine.warm_up()                                   # compiles every shape it will run
    sid = engine.add(Request(prompt, max_new_tokens=64, sampling=SamplingParams(0.7, top_p=0.9), seed=1))
    for out in engine.step(): ...                      # Output(sid, new tokens, finish reason or None)
    engine.abort(sid)                                  # a client left: its blocks are free at once

Each `step` admits waiting requests (first come, first served) while a row (`slots`) and blocks for their prompt
are free, starting each from the longest run of its prompt's blocks in the prefix cache; prefills up to
`max_batch_tokens` prompt tokens of the requests still prefilling (several prompts in one call, a long one in
chunks over several steps); then runs up to `chunk` decode steps of every request that is decoding. Only rows in
use are computed (the row counts are bucketed to powers of two), and attention reads only the blocks a row holds.
When a decoding request needs a block and none is free, the youngest request is preempted: its blocks released
(their full blocks stay in the prefix cache) and it waits again at the head of the queue, its tokens kept, so it
continues exactly where it was.

A request's tokens equal `Engine.generate` on its prompt alone with the same settings and seed: its rows's PRNG
stream and step count go with it, whatever rows, chunks or preemptions it goes through. Beyond what `Engine` does,
each request may carry a logit bias and penalties (llama_jax.generation.penalties: the counts they need are rebuilt
from its tokens at every call), its own stop ids, and a constraint (a grammar's allowed tokens, filled into its row's
mask before every token; such a request decodes one token per call).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.generation.blocks import BlockPool, block_keys, root_key
from llama_jax.generation.paged_steps import (check_sizes, choose_shape, compile_all, decode_pages, powers_of_two,
                                              prefill_chunk, prefill_shapes)
from llama_jax.generation.requests import Output, Request, RequestState, Token
from llama_jax.generation.rows import host_tokens, row_args
from llama_jax.generation.steps import DecodeState
from llama_jax.model import (CPU_NARROW_WEIGHT_OPTIONS, POOL_NAMES, LlamaConfig, check_attention, chunk_blocks,
                             Pages, init_paged_cache, named_sharding, narrow_weight_options, param_logical_names,
                             adapter_count, tree_shardings, unstack_layers)


class PagedEngine:
    """Up to `slots` requests at once, of up to `max_len` tokens each, over a pool of `kv_tokens` token slots.

    params:           per layer, as `Engine` takes them (`load_params(..., per_layer=True)`); or stacked, then split.
                      With LoRA adapters `attach_many` put on them, each request runs its own (`Request.adapter`).
    block_size:       tokens per block; divides max_len.
    max_batch_tokens: prompt tokens prefilled per step at most (one long prompt, or several short ones).
    prefix_cache:     reuse computed blocks across requests (see blocks.py).
    chunk:            decode steps per `step` (a request arriving meanwhile waits at most that long).
    top_logprobs:     0, or how many most likely tokens (with log-probabilities) to return with every token.
    mesh:             a mesh with axes data/fsdp/tensor: weights as `Engine` lays them out, the pool's heads over
                      tensor.
    """

    def __init__(self, params: Any, config: LlamaConfig, *, slots: int, max_len: int, kv_tokens: int | None = None,
                 block_size: int = 16, max_batch_tokens: int = 512, prefix_cache: bool = True,
                 stop_ids: Sequence[int] = (), cache_dtype=jnp.float32, dtype=jnp.float32, attention: str = "xla",
                 chunk: int = 4, top_logprobs: int = 0, mesh: jax.sharding.Mesh | None = None):
        check_attention(attention, dtype)
        kv_tokens = slots * max_len if kv_tokens is None else kv_tokens
        check_sizes(slots=slots, max_len=max_len, kv_tokens=kv_tokens, block_size=block_size,
                    max_batch_tokens=max_batch_tokens, chunk=chunk)
        self.config, self.slots, self.max_len, self.chunk, self.mesh = config, slots, max_len, chunk, mesh
        self.block_size = block_size
        self.blocks = BlockPool(kv_tokens // block_size + 1, block_size, prefix_cache=prefix_cache)
        per_chunk = chunk_blocks(block_size)
        self.table_len = -(-(max_len // block_size) // per_chunk) * per_chunk
        names = param_logical_names(config, unstacked="layers" not in params)
        params = jax.device_put(params, None if mesh is None else tree_shardings(mesh, names, params))
        with self._on_mesh():
            self.params = jax.jit(unstack_layers)(params) if "layers" in params else params
        pool = init_paged_cache(config, self.blocks.usable + 1, block_size, cache_dtype)
        self.pool = jax.device_put(pool, None if mesh is None else jax.tree.map(
            lambda a: named_sharding(mesh, POOL_NAMES, a.shape), pool))
        self.adapters = adapter_count(params)  # slots: the base and each adapter
        self.is_stop = np.zeros(config.vocab_size, bool)
        self.is_stop[[i for i in stop_ids if 0 <= i < config.vocab_size]] = True

        static = dict(config=config, dtype=dtype, attention=attention, top_logprobs=top_logprobs)
        self._options = CPU_NARROW_WEIGHT_OPTIONS if narrow_weight_options(params) else {}
        self._prefill_fn = jax.jit(functools.partial(prefill_chunk, **static), donate_argnums=(1,))
        self._decode_fn = jax.jit(functools.partial(decode_pages, **static, width=chunk), donate_argnums=(1,))
        self._programs: dict[tuple, Any] = {}
        self.prefill_shapes = prefill_shapes(max_batch_tokens, slots, max_len)
        self.decode_rows = powers_of_two(slots)

        self.waiting: collections.deque[RequestState] = collections.deque()
        self.running: dict[int, RequestState] = {}  # sid -> sequence, in admission order
        self._ids = itertools.count()
        # every key present from the start: another thread may copy it while this one counts
        self.counters = collections.Counter(dict.fromkeys(
            ("prompt_tokens", "generated_tokens", "cached_tokens", "queried_tokens", "preemptions"), 0))
        self.runs = collections.Counter()  # (kind, shape) -> times a program ran

    # -- requests -------------------------------------------------------------------------------------------------

    def check(self, request: Request) -> None:
        """ValueError unless the request can run: a prompt of ids in the vocabulary, room for its tokens in a row
        and in the pool."""
        n = len(request.prompt)
        if n < 1 or request.max_new_tokens < 1:
            raise ValueError("a request needs a prompt of at least one token and max_new_tokens >= 1")
        vocab = self.config.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t, _ in request.sampling.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in request.stop_ids):
            raise ValueError(f"stop_token_ids must be in [0, {vocab})")
        if not 0 <= request.adapter < self.adapters:
            raise ValueError(f"adapter {request.adapter} is not one of the engine's {self.adapters} (0: the base)")
        if n + request.max_new_tokens - 1 > self.max_len:
            raise ValueError(f"a prompt of {n} tokens plus max_new_tokens={request.max_new_tokens} does not fit the "
                             f"context of {self.max_len} tokens")

    def add(self, request: Request) -> int:
        """Queue a request (ValueError if it can never run); returns its id."""
        self.check(request)
        sequence = RequestState(next(self._ids), request, list(request.prompt))
        self.waiting.append(sequence)
        return sequence.sid

    def abort(self, sid: int) -> None:
        """Drop a waiting or running request; its blocks are free for the next step."""
        sequence = self.running.pop(sid, None)
        if sequence is not None:
            self.blocks.release(sequence.blocks)
            return
        for i, waiting in enumerate(self.waiting):
            if waiting.sid == sid:
                del self.waiting[i]
                return

    def load(self) -> dict[str, int]:
        """Requests running and waiting, blocks used and free (cached free blocks count as free)."""
        free = self.blocks.available()
        return {"slots": self.slots, "running": len(self.running), "waiting": len(self.waiting),
                "blocks_used": self.blocks.usable - free, "blocks_free": free, "blocks_cached": self.blocks.cached()}

    # -- one step -------------------------------------------------------------------------------------------------

    def step(self) -> list[Output]:
        """Admit, prefill up to max_batch_tokens prompt tokens, then up to `chunk` decode steps of every request
        that is decoding. Returns what each request got (finished ones are gone from the engine)."""
        self._admit()
        decoding = self._grow([s for s in self.running.values() if s.decoding])
        prefilling = [s for s in self.running.values() if not s.decoding]
        outputs: dict[int, list[Token]] = collections.defaultdict(list)
        if prefilling:
            self._prefill(prefilling, outputs)
        if decoding:
            self._decode(decoding, outputs)
        return self._finish(outputs)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.slots:
            sequence = self.waiting[0]
            # the last token is always computed; a block is of use only under the adapter that computed it
            keys = block_keys(sequence.tokens[:-1], self.block_size, root_key(sequence.request.adapter))
            hit = self.blocks.match(keys)
            self.blocks.take(hit)
            need = -(-len(sequence.tokens) // self.block_size) - len(hit)
            fresh = self.blocks.allocate(need)
            if fresh is None:  # wait for blocks (a request that fits the pool alone always gets them in the end)
                self.blocks.release(hit)
                return
            self.waiting.popleft()
            sequence.blocks, sequence.keys = hit + fresh, keys[:len(hit)]
            sequence.computed = sequence.cached = len(hit) * self.block_size
            self.counters["queried_tokens"] += len(sequence.tokens)
            self.counters["cached_tokens"] += sequence.cached
            self.running[sequence.sid] = sequence

    def _grow(self, decoding: list[RequestState]) -> list[RequestState]:
        """Blocks for the next `chunk` tokens of each decoding request, preempting the youngest requests when the
        pool runs out; returns the requests that decode this step."""
        ready = []
        for sequence in decoding:
            last = min(len(sequence.tokens) - 1 + self.chunk - 1, sequence.last_position())
            while sequence.sid in self.running:
                need = last // self.block_size + 1 - len(sequence.blocks)
                fresh = self.blocks.allocate(max(need, 0))
                if fresh is not None:
                    sequence.blocks += fresh
                    ready.append(sequence)
                    break
                self._preempt(next(reversed(self.running.values())))
        return [s for s in ready if s.sid in self.running]

    def _preempt(self, sequence: RequestState) -> None:
        del self.running[sequence.sid]
        self.blocks.release(sequence.blocks)
        sequence.blocks, sequence.keys, sequence.computed = [], [], 0
        self.waiting.appendleft(sequence)
        self.counters["preemptions"] += 1

    def _prefill(self, prefilling: list[RequestState], outputs: dict[int, list[Token]]) -> None:
        rows, width = choose_shape(self.prefill_shapes, [len(s.tokens) - s.computed for s in prefilling])
        chosen = prefilling[:rows]
        tokens = np.zeros((rows, width), np.int32)
        positions = np.full((rows, width), self.max_len, np.int32)  # padding: never a row's position
        lengths, steps = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
        tables = np.zeros((rows, self.table_len), np.int32)
        for r, sequence in enumerate(chosen):
            part = sequence.tokens[sequence.computed:sequence.computed + width]
            tokens[r, width - len(part):] = part
            positions[r, width - len(part):] = np.arange(sequence.computed, sequence.computed + len(part))
            lengths[r] = sequence.computed + len(part)
            tables[r, :len(sequence.blocks)] = sequence.blocks
            steps[r] = sequence.emitted
        seeds, streams, sampling, penalties, history, prompts, adapters = self._rows(chosen, rows)
        args = (self.params, self.pool, tokens, Pages(tables, positions, lengths), seeds, streams, steps, sampling,
                penalties, history, prompts, adapters)
        self.pool, first = self._program("prefill", (rows, width), args)(*args)
        first = host_tokens(first)
        for r, sequence in enumerate(chosen):
            sequence.computed = int(lengths[r])
            self.counters["prompt_tokens"] += int(np.sum(positions[r] < lengths[r]))
            if sequence.computed == len(sequence.tokens):  # its tokens are all in: the next one is sampled
                self._emit(sequence, first[r][0], outputs)
            self._register(sequence)

    def _decode(self, decoding: list[RequestState], outputs: dict[int, list[Token]]) -> None:
        rows = next(n for n in self.decode_rows if n >= len(decoding))
        token, position, steps, limit = (np.zeros(rows, np.int32) for _ in range(4))
        tables = np.zeros((rows, self.table_len), np.int32)
        for r, sequence in enumerate(decoding):
            token[r], position[r] = sequence.tokens[-1], len(sequence.tokens) - 1
            steps[r], limit[r] = sequence.emitted, sequence.request.max_new_tokens
            if sequence.request.constraint is not None:  # one token per call: its mask changes with each
                limit[r] = min(limit[r], sequence.emitted + 1)
            tables[r, :len(sequence.blocks)] = sequence.blocks
        done = np.arange(rows) >= len(decoding)
        seeds, streams, sampling, penalties, history, prompts, adapters = self._rows(decoding, rows)
        args = (self.params, self.pool, tables, DecodeState(token, position, done, steps), seeds, streams, sampling,
                penalties, history, prompts, adapters, self.is_stop, limit)
        self.pool, out = self._program("decode", rows, args)(*args)
        for sequence, new in zip(decoding, host_tokens(out), strict=False):
            stops = [i for i, t in enumerate(new) if t.id in sequence.request.stop_ids]
            new = new[:stops[0] + 1] if stops else new  # the request's own stop ids end it on the host
            sequence.computed += len(new)
            for t in new:
                self._emit(sequence, t, outputs)
            self._register(sequence)

    def _rows(self, chosen: list[RequestState], rows: int) -> tuple:
        return row_args(chosen, rows, self.max_len, self.config.vocab_size)

    def _emit(self, sequence: RequestState, token: Token, outputs: dict[int, list[Token]]) -> None:
        if sequence.request.constraint is not None:
            sequence.request.constraint.consume(token.id)
        sequence.tokens.append(token.id)
        sequence.emitted += 1
        self.counters["generated_tokens"] += 1
        outputs[sequence.sid].append(token)

    def _register(self, sequence: RequestState) -> None:
        """Key the request's newly full, computed blocks, so later requests can share them."""
        done, full = len(sequence.keys), sequence.computed // self.block_size
        if full > done:
            new = block_keys(sequence.tokens[done * self.block_size:full * self.block_size], self.block_size,
                             sequence.keys[-1] if sequence.keys else root_key(sequence.request.adapter))
            for block, key in zip(sequence.blocks[done:full], new, strict=True):
                self.blocks.register(block, key)
            sequence.keys += new

    def _finish(self, outputs: dict[int, list[Token]]) -> list[Output]:
        results = []
        for sid, tokens in outputs.items():
            sequence = self.running[sid]
            last = sequence.tokens[-1]
            reason = ("stop" if self.is_stop[last] or last in sequence.request.stop_ids else
                      "length" if sequence.emitted >= sequence.request.max_new_tokens else None)
            if reason is not None:
                del self.running[sid]
                self.blocks.release(sequence.blocks)
            first = sequence.emitted == len(tokens)
            results.append(Output(sid, tokens, reason, sequence.cached if first else 0))
        return results

    # -- programs -------------------------------------------------------------------------------------------------

    def _program(self, kind: str, shape, args: tuple):
        """The compiled prefill ((rows, width)) or decode (rows) program, compiled on first use."""
        if (kind, shape) not in self._programs:
            self._programs.update(compile_all({(kind, shape): self._lower(kind, args)}, self._options))
        self.runs[kind, shape] += 1
        return self._programs[kind, shape]

    def _lower(self, kind: str, args: tuple):
        with self._on_mesh():
            return (self._prefill_fn if kind == "prefill" else self._decode_fn).lower(*args)

    def _on_mesh(self):
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def warm_up(self) -> tuple[int, float]:
        """Compile every prefill and decode shape now, several at once (none is compiled while serving); returns
        (programs, seconds)."""
        start = time.perf_counter()
        lowered = {}
        for rows, width in self.prefill_shapes:
            zeros = np.zeros((rows, width), np.int32)
            tables = np.zeros((rows, self.table_len), np.int32)
            seeds, streams, sampling, penalties, history, prompts, adapters = self._rows([], rows)
            lowered["prefill", (rows, width)] = self._lower("prefill", (
                self.params, self.pool, zeros, Pages(tables, zeros, seeds), seeds, streams, seeds, sampling,
                penalties, history, prompts, adapters))
        for rows in self.decode_rows:
            zeros = np.zeros(rows, np.int32)
            seeds, streams, sampling, penalties, history, prompts, adapters = self._rows([], rows)
            lowered["decode", rows] = self._lower("decode", (
                self.params, self.pool, np.zeros((rows, self.table_len), np.int32),
                DecodeState(zeros, zeros, np.ones(rows, bool), zeros), seeds, streams, sampling, penalties, history,
                prompts, adapters, self.is_stop, zeros))
        self._programs.update(compile_all(lowered, self._options))
        return len(self._programs), time.perf_counter() - start

