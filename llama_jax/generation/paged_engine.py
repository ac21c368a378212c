"""The serving engine: requests join and leave a running batch whose KV cache is one pool of blocks.

    engine = PagedEngine(params, config, slots=16, max_len=4096, kv_tokens=65536, stop_ids=checkpoint.stop_ids)
    engine.warm_up()                                   # compiles every shape it will run
    sid = engine.add(Request(prompt, max_new_tokens=64, sampling=SamplingParams(0.7, top_p=0.9), seed=1))
    for out in engine.step(): ...                      # Output(sid, new tokens, finish reason or None)
    engine.abort(sid)                                  # a client left: its blocks are free at once

Each `step` admits waiting requests (first come, first served) while a row (`slots`) and blocks for their prompt are
free, starting each from the longest run of its prompt's blocks in the prefix cache (then the tokens it shares with
one more cached block, copied into its own); prefills up to
`max_batch_tokens` prompt tokens of the requests still prefilling (several prompts in one call, each over as many of
its rows as it needs; a long one in chunks over several steps); then runs up to `chunk` decode steps of every
request that is decoding, those whose prompts that prefill completed included. Only rows in use are computed (the
row counts are bucketed to powers of two), and attention reads only the blocks a row holds. When a decoding request
needs a block and none is free, the youngest request is preempted: its blocks released (their full blocks stay in
the prefix cache) and it waits again at the head of the queue, its tokens kept, so it continues exactly where it
was.

A request's tokens equal `Engine.generate` on its prompt alone with the same settings and seed: its rows's PRNG
stream and step count go with it, whatever rows, chunks or preemptions it goes through. Beyond what `Engine` does,
each request may carry a logit bias and penalties (llama_jax.generation.penalties: the counts they need are rebuilt
from its tokens at every call), its own stop ids, a constraint (a grammar's allowed tokens, filled into its row's
mask before every token; such a request decodes one token per call) and a LoRA adapter. With `speculate`, decoding
requests' proposed tokens are verified in one forward (speculation.py); their tokens are the same.
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
from llama_jax.generation.paged_steps import (Programs, check_sizes, choose_shape, compile_all, decode_pages,
                                              powers_of_two, prefill_chunk, prefill_shapes)
from llama_jax.generation.requests import Output, Request, RequestState, Token, check_request
from llama_jax.generation.rows import decode_arrays, host_tokens, prefill_arrays, row_args, verify_arrays
from llama_jax.generation.drafting import DraftModel, Drafter
from llama_jax.generation.speculation import NgramProposer, verify_pages
from llama_jax.model import (CPU_NARROW_WEIGHT_OPTIONS, POOL_NAMES, LlamaConfig, check_attention, chunk_blocks,
                             copy_blocks, init_paged_cache, named_sharding, narrow_weight_options, param_logical_names,
                             adapter_count, rows_layout, tree_shardings, unstack_layers)

# A step's new tokens, by request id: sid -> (the request, its tokens)
StepTokens = dict[int, tuple[RequestState, list[Token]]]


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
    speculate:        an `NgramProposer` (speculation.py) or a `DraftModel` (drafting.py): a step whose decoding
                      requests have proposals verifies them in one forward instead of `chunk` decode steps; the
                      tokens are the same either way. (A draft model runs on one device, unsharded.)
    """

    def __init__(self, params: Any, config: LlamaConfig, *, slots: int, max_len: int, kv_tokens: int | None = None,
                 block_size: int = 16, max_batch_tokens: int = 512, prefix_cache: bool = True,
                 stop_ids: Sequence[int] = (), cache_dtype=jnp.float32, dtype=jnp.float32, attention: str = "xla",
                 chunk: int = 4, top_logprobs: int = 0, mesh: jax.sharding.Mesh | None = None,
                 speculate: NgramProposer | DraftModel | None = None):
        check_attention(attention, dtype)
        kv_tokens = slots * max_len if kv_tokens is None else kv_tokens
        check_sizes(slots=slots, max_len=max_len, kv_tokens=kv_tokens, block_size=block_size,
                    max_batch_tokens=max_batch_tokens, chunk=chunk)
        self.config, self.slots, self.max_len, self.chunk, self.mesh = config, slots, max_len, chunk, mesh
        self.speculate = speculate
        self.ahead = max(chunk, 1 + (speculate.k if speculate else 0)) - 1  # tokens fed past a row's last, at most
        self.block_size = block_size
        self.blocks = BlockPool(kv_tokens // block_size + 1, block_size, prefix_cache=prefix_cache)
        per_chunk = chunk_blocks(block_size)
        self.table_len = -(-(max_len // block_size) // per_chunk) * per_chunk
        names = param_logical_names(config, unstacked="layers" not in params)
        params = jax.device_put(params, None if mesh is None else tree_shardings(mesh, names, params))
        with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
            self.params = jax.jit(unstack_layers)(params) if "layers" in params else params
        self.params = rows_layout(self.params)  # on a GPU: int8 weights read as rows (a no-op if they already are)
        pool = init_paged_cache(config, self.blocks.usable + 1, block_size, cache_dtype)
        self.pool = jax.device_put(pool, None if mesh is None else jax.tree.map(
            lambda a: named_sharding(mesh, POOL_NAMES, a.shape), pool))
        self.adapters = adapter_count(params)  # slots: the base and each adapter
        self._options = CPU_NARROW_WEIGHT_OPTIONS if narrow_weight_options(params) else {}
        self.drafter = None if not isinstance(speculate, DraftModel) else Drafter(
            speculate, config, blocks=self.blocks.usable + 1, block_size=block_size, cache_dtype=cache_dtype,
            dtype=dtype, options=self._options)
        self.is_stop = np.zeros(config.vocab_size, bool)
        self.is_stop[[i for i in stop_ids if 0 <= i < config.vocab_size]] = True

        static = dict(config=config, dtype=dtype, attention=attention, top_logprobs=top_logprobs)
        self.programs = Programs({kind: jax.jit(functools.partial(function, **static), donate_argnums=(1,))
                                  for kind, function in (("prefill", prefill_chunk), ("verify", verify_pages),
                                                         ("decode", functools.partial(decode_pages, width=chunk)))}
                                 | {"copy": jax.jit(copy_blocks, donate_argnums=(0,))}, self._options, mesh)
        self.runs = self.programs.runs  # (kind, shape) -> times a program ran
        self.prefill_shapes = prefill_shapes(max_batch_tokens, slots, max_len)
        self.decode_rows = powers_of_two(slots)

        self.waiting: collections.deque[RequestState] = collections.deque()
        self.running: dict[int, RequestState] = {}  # sid -> sequence, in admission order
        self._ids = itertools.count()
        # every key present from the start: another thread may copy it while this one counts
        self.counters = collections.Counter(dict.fromkeys(
            ("prompt_tokens", "generated_tokens", "cached_tokens", "queried_tokens", "preemptions", "proposed_tokens",
             "accepted_tokens"), 0))

    # -- requests -------------------------------------------------------------------------------------------------

    def check(self, request: Request) -> None:
        """ValueError unless the request can run here (`check_request`)."""
        check_request(request, self.config.vocab_size, self.adapters, self.max_len)

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
        that is decoding (those whose prompts this prefill completed too). Returns what each request got (finished
        ones are gone from the engine)."""
        self._admit()
        prefilling = [s for s in self.running.values() if not s.decoding]
        outputs: StepTokens = {}
        if prefilling:
            self._prefill(prefilling, outputs)
        # a request whose prompt is now all in decodes in this step too (its row would idle for a call otherwise)
        decoding = self._grow([s for s in self.running.values() if s.decoding and self._reason(s) is None])
        if decoding:
            self._decode(decoding, outputs)
        return self._finish(outputs)

    def _admit(self) -> None:
        copies: list[tuple[int, int]] = []  # (cached block, the request's own) to copy before any program runs
        while self.waiting and len(self.running) < self.slots:
            sequence = self.waiting[0]
            # the last token is always computed; a block is of use only under the adapter that computed it
            root = root_key(sequence.request.adapter)
            keys = block_keys(sequence.tokens[:-1], self.block_size, root)
            hit = self.blocks.match(keys)
            start = len(hit) * self.block_size  # then some tokens of a cached block, copied into its own
            source, shared = self.blocks.extend(keys[len(hit) - 1] if hit else root, sequence.tokens[start:-1])
            held = hit + [source] * (source is not None)
            self.blocks.take(held)
            fresh = self.blocks.allocate(-(-len(sequence.tokens) // self.block_size) - len(hit))
            if fresh is None:  # wait for blocks (a request that fits the pool alone always gets them in the end)
                self.blocks.release(held)
                break
            copies += [(source, fresh[0])] * (source is not None)
            self.waiting.popleft()
            sequence.blocks, sequence.keys = hit + fresh, keys[:len(hit)]
            sequence.computed = sequence.cached = start + shared
            self.counters["queried_tokens"] += len(sequence.tokens)
            self.counters["cached_tokens"] += sequence.cached
            self.running[sequence.sid] = sequence
        if copies:
            pairs = np.zeros((2, self.slots), np.int32)  # null-block pairs after them copy nothing
            pairs[:, :len(copies)] = np.asarray(copies, np.int32).T
            self.pool = self.programs("copy", self.slots, (self.pool, *pairs))
            if self.drafter is not None:
                self.drafter.copy(pairs)
            self.blocks.release([source for source, _ in copies])

    def _grow(self, decoding: list[RequestState]) -> list[RequestState]:
        """Blocks for the next `chunk` tokens (or the proposals verified) of each decoding request, preempting the
        youngest requests when the pool runs out; returns the requests that decode this step."""
        ready = []
        for sequence in decoding:
            last = min(len(sequence.tokens) - 1 + self.ahead, sequence.last_position())
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

    def _prefill(self, prefilling: list[RequestState], outputs: StepTokens) -> None:
        shape, layout = choose_shape(self.prefill_shapes, [len(s.tokens) - s.computed for s in prefilling],
                                     [s.computed for s in prefilling])
        rows = [(prefilling[i], n) for i, n in layout]
        args = self._args("prefill", shape, rows)
        self.pool, first = self.programs("prefill", shape, args)
        if self.drafter is not None:
            self.drafter.prefill(args[2], args[3])
        pages, first = args[3], host_tokens(first)
        self.counters["prompt_tokens"] += int(np.sum(pages.positions < pages.lengths[:, None]))
        last = {sequence.sid: r for r, (sequence, _) in enumerate(rows)}  # a request's last row samples its token
        for r in last.values():
            sequence = rows[r][0]
            sequence.computed = int(pages.lengths[r])
            if sequence.computed == len(sequence.tokens):  # its tokens are all in: the next one is sampled
                self._emit(sequence, first[r][0], outputs)
            self._register(sequence)

    def _decode(self, decoding: list[RequestState], outputs: StepTokens) -> None:
        """Up to `chunk` tokens of each decoding request, or with speculation, when some request has proposals, one
        verifying forward of them all."""
        rows = next(n for n in self.decode_rows if n >= len(decoding))
        drafted = ([[]] * len(decoding) if self.speculate is None else
                   self.drafter.propose(decoding, rows, self.table_len, self.max_len) if self.drafter is not None else
                   [self.speculate.propose(s.tokens) for s in decoding])
        proposals = [self._proposal(s, d) for s, d in zip(decoding, drafted, strict=True)]
        kind = "verify" if any(proposals) else "decode"
        args = self._args(kind, rows, decoding, proposals)
        self.pool, out = self.programs(kind, rows, args)
        for sequence, new, proposal in zip(decoding, host_tokens(out), proposals, strict=False):
            accepted = len(new) - 1 if proposal else 0
            sequence.proposed, sequence.accepted = sequence.proposed + len(proposal), sequence.accepted + accepted
            self.counters["proposed_tokens"] += len(proposal)
            self.counters["accepted_tokens"] += accepted
            stops = [i for i, t in enumerate(new) if t.id in sequence.request.stop_ids]
            new = new[:stops[0] + 1] if stops else new  # the request's own stop ids end it on the host
            sequence.computed += len(new)
            for t in new:
                self._emit(sequence, t, outputs)
            self._register(sequence)

    def _proposal(self, sequence: RequestState, drafted: list[int]) -> list[int]:
        """What is verified of a request's proposed tokens: as many as its blocks and max_new_tokens allow (none for a
        constrained request: its mask changes with each token)."""
        if sequence.request.constraint is not None:
            return []
        return drafted[:sequence.room()]

    def _args(self, kind: str, shape, chosen: list, proposals: Sequence[list[int]] = ()) -> tuple:
        """A program's arguments for the requests `chosen` in its rows (for a prefill, (request, tokens) pairs as
        `lay_out` gives them; none: the arrays it is compiled for)."""
        rows = shape[0] if kind == "prefill" else shape
        sequences = [sequence for sequence, _ in chosen] if kind == "prefill" else chosen
        per_row = row_args(sequences, rows, self.max_len, self.config.vocab_size)  # seeds, streams, sampling, ...
        seeds, streams = per_row[:2]
        if kind == "prefill":
            tokens, pages, steps = prefill_arrays(chosen, *shape, self.table_len, self.max_len)
            return self.params, self.pool, tokens, pages, seeds, streams, steps, *per_row[2:]
        if kind == "decode":
            tables, state, limit = decode_arrays(chosen, rows, self.table_len)
            return self.params, self.pool, tables, state, *per_row, self.is_stop, limit
        tokens, pages, steps, limit, proposed = verify_arrays(chosen, list(proposals), rows, self.speculate.k + 1,
                                                              self.table_len, self.max_len)
        return self.params, self.pool, tokens, pages, seeds, streams, steps, *per_row[2:], self.is_stop, limit, proposed

    def _emit(self, sequence: RequestState, token: Token, outputs: StepTokens) -> None:
        if sequence.request.constraint is not None:
            sequence.request.constraint.consume(token.id)
        sequence.tokens.append(token.id)
        sequence.emitted += 1
        self.counters["generated_tokens"] += 1
        outputs.setdefault(sequence.sid, (sequence, []))[1].append(token)

    def _register(self, sequence: RequestState) -> None:
        """Key the request's newly full, computed blocks, and note what its last, partly computed one holds, so later
        requests can share them."""
        size, done, full = self.block_size, len(sequence.keys), sequence.computed // self.block_size
        parent = sequence.keys[-1] if sequence.keys else root_key(sequence.request.adapter)
        for i, key in enumerate(block_keys(sequence.tokens[done * size:full * size], size, parent), done):
            self.blocks.register(sequence.blocks[i], key, parent, sequence.tokens[i * size:(i + 1) * size])
            sequence.keys.append(parent := key)
        if sequence.computed % size:
            self.blocks.note(sequence.blocks[full], parent, sequence.tokens[full * size:sequence.computed])

    def _reason(self, sequence: RequestState) -> str | None:
        """Why the request has finished ("stop": a stop id, "length": max_new_tokens), or None."""
        if not sequence.emitted:  # its last token is its prompt's
            return None
        last = sequence.tokens[-1]
        return ("stop" if self.is_stop[last] or last in sequence.request.stop_ids else
                "length" if sequence.emitted >= sequence.request.max_new_tokens else None)

    def _finish(self, outputs: StepTokens) -> list[Output]:
        """Each request's Output; finished ones leave the engine (running, or waiting if preempted since)."""
        results = []
        for sid, (sequence, tokens) in outputs.items():
            reason = self._reason(sequence)
            if reason is not None:
                self.abort(sid)
            first = sequence.emitted == len(tokens)
            speculated = (sequence.proposed, sequence.accepted) if reason else (0, 0)
            results.append(Output(sid, tokens, reason, sequence.cached if first else 0, *speculated))
        return results

    # -- programs -------------------------------------------------------------------------------------------------

    def warm_up(self) -> tuple[int, float]:
        """Compile every prefill, decode (and verify) shape now, several at once (none is compiled while serving);
        returns (programs, seconds)."""
        start = time.perf_counter()
        kinds = ("decode", "verify") if self.speculate is not None else ("decode",)
        shapes = [("prefill", shape) for shape in self.prefill_shapes]
        shapes += [(kind, rows) for kind in kinds for rows in self.decode_rows]
        lowered = {(kind, shape): self.programs.lower(kind, self._args(kind, shape, [])) for kind, shape in shapes}
        lowered["copy", self.slots] = self.programs.lower("copy", (self.pool, *np.zeros((2, self.slots), np.int32)))
        if self.drafter is not None:  # compiled together, then each takes its own
            lowered |= self.drafter.lowered(self.prefill_shapes, self.decode_rows, self.table_len, self.max_len)
        compiled = compile_all(lowered, self._options)
        for programs in [self.programs] + ([self.drafter.programs] if self.drafter is not None else []):
            programs.compiled.update({key: compiled[key] for key in compiled if key[0] in programs.functions})
        return len(compiled), time.perf_counter() - start
