"""Between HTTP and the engine: prompts to token ids, requests to the scheduler and its tokens back to text (stop
strings cut there), log-probabilities in OpenAI's shapes, and the prompt scores that `echo` returns."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import AsyncIterator, Sequence

import jax
import numpy as np

from infer.grammar import Grammars
from infer.serve.metrics import Metrics
from infer.serve.protocol import ApiError, Message, Sampling
from llama_jax.generation import (QueueFull, Request, SamplingParams, Scheduler, Ticket, Token, compile_all,
                                  prefill_lengths, token_logprobs)
from llama_jax.model import select_adapters
from llama_jax.text import Encoder, StreamDecoder

MAX_TOP = 5


@dataclasses.dataclass(frozen=True)
class Piece:
    """What one engine update adds to a choice: text (stop strings cut), its tokens, and the finish reason."""

    text: str
    tokens: list[Token]
    finish_reason: str | None


class TextStream:
    """Token ids -> text increments, ending at the first stop string (which is not returned); text that could be the
    start of a stop string is held back until it cannot. A request's own stop token (stop_ids) ends it without
    text, as vLLM's stop_token_ids."""

    def __init__(self, encoder: Encoder, stops: Sequence[str], stop_ids: Sequence[int] = ()):
        self.decoder, self.stops, self.stop_ids = StreamDecoder(encoder.tokenizer), list(stops), set(stop_ids)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""

    def push(self, tokens: list[Token], finish_reason: str | None) -> Piece:
        ids = [t.id for t in tokens]
        if finish_reason == "stop" and ids and ids[-1] in self.stop_ids:
            ids = ids[:-1]
        text = self.pending + self.decoder.push(ids)
        if finish_reason:
            text += self.decoder.flush()
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            return Piece(text[:min(found)], tokens, "stop")
        if finish_reason or not self.hold:
            self.pending = ""
            return Piece(text, tokens, finish_reason)
        cut = max(0, len(text) - self.hold)
        self.pending = text[cut:]
        return Piece(text[:cut], tokens, None)


class Service:
    """The model behind the endpoints: `max_len` tokens of context per request; `name` the base's, `adapters` the
    names of the LoRA adapters in the params' slots 1, 2, ... (`attach_many`)."""

    def __init__(self, *, encoder: Encoder, scheduler: Scheduler, params, config, dtype, max_len: int, name: str,
                 stop_ids: Sequence[int], mesh=None, adapters: Sequence[str] = ()):
        self.encoder, self.scheduler, self.name, self.max_len = encoder, scheduler, name, max_len
        self.models = {name: 0} | {adapter: slot for slot, adapter in enumerate(adapters, 1)}  # model -> slot
        self.grammars = Grammars(encoder, config.vocab_size, stop_ids)
        self.metrics = Metrics(scheduler)
        self.config, self.params, self.mesh = config, params, mesh
        self._score = jax.jit(functools.partial(adapter_logprobs, config=config, dtype=dtype, top=MAX_TOP))
        self._scorers: dict[int, object] = {}  # padded prompt length -> compiled scorer

    def chat_ids(self, messages: list[Message], tools: list[dict] | None = None) -> list[int]:
        try:
            return self.encoder.render([m.turn() for m in messages], add_generation_prompt=True, tools=tools)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None

    def adapter(self, model: str | None) -> int:
        """The adapter slot a request's `model` names (the base's name, or none: 0); ApiError 404 for another."""
        if model is not None and model not in self.models:
            raise ApiError(404, f"The model `{model}` does not exist (this server has "
                                f"{', '.join(f'`{m}`' for m in self.models)})", param="model", code="model_not_found")
        return self.models.get(model, 0)

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.encoder.tokenizer.encode(prompt).ids
        else:
            ids = list(prompt)
            if any(not 0 <= t < self.config.vocab_size for t in ids):
                raise ApiError(400, f"prompt token ids must be in [0, {self.config.vocab_size})", param="prompt")
        if not ids:
            raise ApiError(400, "the prompt has no tokens", param="prompt")
        return ids

    def budget(self, ids: list[int], body: Sampling) -> int:
        """The request's max_tokens, checked against the context (ApiError 400 when the prompt leaves no room)."""
        asked = body.limit()
        room = self.max_len - len(ids)
        if asked is None and room < 1 or asked is not None and asked > room:
            raise ApiError(400, f"This model's maximum context length is {self.max_len} tokens. However, you "
                                f"requested {len(ids) + (asked or 1)} tokens ({len(ids)} in the prompt, "
                                f"{asked or 1} for the completion)", param="max_tokens",
                           code="context_length_exceeded")
        return room if asked is None else asked

    def sampling(self, body: Sampling) -> SamplingParams:
        """OpenAI's defaults (temperature 1, top_p 1) where the request is silent; ApiError 400 naming the field for
        a token id outside the vocabulary."""
        bias = body.bias()
        for name, ids in (("logit_bias", [t for t, _ in bias]), ("stop_token_ids", body.stop_token_ids or [])):
            if any(not 0 <= t < self.config.vocab_size for t in ids):
                raise ApiError(400, f"{name}: token ids must be in [0, {self.config.vocab_size})", param=name)
        return SamplingParams(temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=1.0 if body.top_p is None else body.top_p, top_k=max(body.top_k or 0, 0),
                              min_p=body.min_p or 0.0, presence_penalty=body.presence_penalty or 0.0,
                              frequency_penalty=body.frequency_penalty or 0.0,
                              repetition_penalty=body.repetition_penalty or 1.0, logit_bias=bias)

    async def choices(self, ids: list[int], body: Sampling, max_tokens: int, seed: int, grammar: str | None = None
                      ) -> list[AsyncIterator[Piece]]:
        """`body.n` choices of one prompt (streams 0..n-1 of the seed), constrained by `grammar` (a forced tool
        call's) or else by the response_format. The others are queued once the first has its first token: its
        prompt is then in the prefix cache, and they prefill only its last, partial block."""
        try:  # (a 400 before anything is queued)
            grammar = grammar or self.grammars.grammar(body.response_format)
        except ValueError as e:
            raise ApiError(400, str(e), param="response_format") from None
        first = self.generate(ids, body, max_tokens, seed, grammar=grammar)
        if body.n == 1:
            return [first]
        try:
            head = await anext(first)
            rest = [self.generate(ids, body, max_tokens, seed, stream, grammar) for stream in range(1, body.n)]
        except BaseException:
            await first.aclose()
            raise
        return [prepend(head, first), *rest]

    def generate(self, ids: list[int], body: Sampling, max_tokens: int, seed: int, stream: int = 0,
                 grammar: str | None = None) -> AsyncIterator[Piece]:
        """Queue the request now (ApiError 429 when the queue is full, 503 while shutting down); returns its pieces
        as the engine makes them. Leaving the iterator early (a client gone) frees the slot."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        arrived = time.perf_counter()
        request = Request(ids, max_tokens, self.sampling(body), seed, stream, tuple(body.stop_token_ids or ()),
                          None if grammar is None else self.grammars.constraint(grammar), self.adapter(body.model))
        try:
            ticket = self.scheduler.submit(request, lambda u: loop.call_soon_threadsafe(updates.put_nowait, u))
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({e}); retry later", kind="rate_limit_error",
                           code="queue_full", retry_after=1) from None
        except RuntimeError as e:
            raise ApiError(503, str(e), kind="server_error", retry_after=5) from None
        except ValueError as e:
            raise ApiError(400, str(e), param="prompt") from None
        return self._pieces(ticket, updates, TextStream(self.encoder, body.stops(), request.stop_ids), arrived)

    async def _pieces(self, ticket: Ticket, updates: asyncio.Queue, text: TextStream, arrived: float
                      ) -> AsyncIterator[Piece]:
        last = None
        try:
            while True:
                update = await updates.get()
                if update.finish_reason == "error":
                    raise ApiError(500, f"generation failed: {update.error}", kind="server_error")
                now = time.perf_counter()
                if last is None:
                    self.metrics.time_to_first_token.observe(now - arrived)
                else:
                    for _ in update.tokens:
                        self.metrics.inter_token_latency.observe((now - last) / len(update.tokens))
                last = now
                piece = text.push(update.tokens, update.finish_reason)
                yield piece
                if piece.finish_reason:
                    return
        finally:
            ticket.cancel()

    def _scorer(self, padded: int):
        if padded not in self._scorers:
            self._scorers.update(compile_all({padded: self._lower_scorer(padded)}))
        return self._scorers[padded]

    def _lower_scorer(self, padded: int):
        rows = np.zeros((1, padded), np.int32)
        with contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh):
            return self._score.lower(self.params, np.zeros(1, np.int32), rows, rows)

    def warm_up(self) -> int:
        """Compile the prompt scorer for every prompt length bucket, several at once; returns how many programs."""
        self._scorers.update(compile_all({padded: self._lower_scorer(padded) for padded in prefill_lengths(self.max_len)
                                          if padded not in self._scorers}))
        return len(self._scorers)

    def score(self, ids: list[int], adapter: int = 0) -> list[Token]:
        """Each prompt token with its log-probability given the tokens before it (None for the first) and the
        MAX_TOP most likely tokens there, under LoRA `adapter`: `infer --perplexity`'s scoring (`token_logprobs`),
        one forward."""
        padded = next(p for p in prefill_lengths(self.max_len) if p >= len(ids))
        tokens = np.zeros((1, padded), np.int32)
        segments = np.zeros((1, padded), np.int32)
        tokens[0, :len(ids)], segments[0, :len(ids)] = ids, 1  # right padding: causal attention never sees it
        chosen, top_ids, top_lp = (np.asarray(a)[0] for a in self._scorer(padded)(
            self.params, np.array([adapter], np.int32), tokens, segments))
        return [Token(ids[0])] + [Token(ids[t], float(chosen[t - 1]),
                               tuple(zip(top_ids[t - 1].tolist(), top_lp[t - 1].tolist(), strict=True)))
                         for t in range(1, len(ids))]


def adapter_logprobs(params, adapters, tokens, segment_ids, **static):
    """`token_logprobs` with each row through its LoRA adapter `adapters` `[batch]` (`select_adapters`)."""
    return token_logprobs(select_adapters(params, adapters), tokens, segment_ids, **static)


async def prepend(head: Piece, rest: AsyncIterator[Piece]) -> AsyncIterator[Piece]:
    """`head`, then what `rest` yields (closing `rest` when left early)."""
    try:
        yield head
        if head.finish_reason is None:
            async for piece in rest:
                yield piece
    finally:
        await rest.aclose()
