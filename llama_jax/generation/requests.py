"""What the serving engine takes and gives: a request, its tokens, a step's output, and its state on the host."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from llama_jax.generation.sampling import GREEDY, SamplingParams


@dataclasses.dataclass(frozen=True)
class Request:
    """A prompt (token ids), up to `max_new_tokens` more, and how to sample them (seed and stream: the request's
    PRNG stream, as row `stream` of `Engine.generate(..., seed=seed)`; the choices of one prompt take streams 0, 1,
    ...); stop_ids: its own stop tokens, besides the checkpoint's; constraint: the tokens it may take next (a grammar,
    for structured output), an object with `fill(mask)`, which writes an int32 bitmask `[ceil(vocab / 32)]` of them
    (llama_jax.generation.penalties' layout), and `consume(token)`, told each token the request emits; adapter: the
LoRA adapter it runs with, a slot of the engine's params (`attach_many`), 0 the base alone."""

    prompt: Sequence[int]
    max_new_tokens: int
    sampling: SamplingParams = GREEDY
    seed: int = 0
    stream: int = 0
    stop_ids: tuple[int, ...] = ()
    constraint: Any = None
    adapter: int = 0


@dataclasses.dataclass(frozen=True)
class Token:
    """One emitted token, with (when the engine keeps them) its log-probability and the most likely alternatives."""

    id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class Output:
    """What a step gave request `sid`: new tokens and, on its last, why it finished ("stop": a stop id;
    "length": max_new_tokens)."""

    sid: int
    tokens: list[Token]
    finish_reason: str | None = None
    cached: int = 0  # on a request's first Output: its prompt tokens that came from the prefix cache
    proposed: int = 0  # on its last: tokens proposed by speculation for it, and those the model accepted
    accepted: int = 0


@dataclasses.dataclass
class RequestState:
    """A request's state on the host."""

    sid: int
    request: Request
    tokens: list[int]  # the prompt and every token emitted
    blocks: list[int] = dataclasses.field(default_factory=list)
    keys: list[bytes] = dataclasses.field(default_factory=list)  # keys of its full, computed blocks
    computed: int = 0  # tokens whose keys and values are in its blocks
    emitted: int = 0
    cached: int = 0  # tokens taken from the prefix cache at its (last) admission
    proposed: int = 0  # speculated tokens verified for it, and accepted
    accepted: int = 0

    @property
    def decoding(self) -> bool:
        """All its tokens but the last are computed: a decode step feeds that one (a prompt of one token, or one the
        prefix cache holds all but the last token of, starts here; its first token is sampled as a prefill would)."""
        return self.computed == len(self.tokens) - 1

    def last_position(self) -> int:
        """The position of the last token it can ever feed: prompt + max_new_tokens - 1 tokens in all."""
        return len(self.request.prompt) + self.request.max_new_tokens - 2

    def room(self) -> int:
        """Tokens it may still feed after its last one (so many proposals can be verified)."""
        return self.last_position() - (len(self.tokens) - 1)


def check_request(request: Request, vocab: int, adapters: int, max_len: int) -> None:
    """ValueError unless the request can run on an engine of this vocabulary, adapters (slots, 0 the base) and
    tokens per request: a prompt of ids in the vocabulary, room for its tokens in a row."""
    n = len(request.prompt)
    if n < 1 or request.max_new_tokens < 1:
        raise ValueError("a request needs a prompt of at least one token and max_new_tokens >= 1")
    if any(not 0 <= t < vocab for t in request.prompt):
        raise ValueError(f"prompt token ids must be in [0, {vocab})")
    if any(not 0 <= t < vocab for t, _ in request.sampling.logit_bias):
        raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
    if any(not 0 <= t < vocab for t in request.stop_ids):
        raise ValueError(f"stop_token_ids must be in [0, {vocab})")
    if not 0 <= request.adapter < adapters:
        raise ValueError(f"adapter {request.adapter} is not one of the engine's {adapters} (0: the base)")
    if n + request.max_new_tokens - 1 > max_len:
        raise ValueError(f"a prompt of {n} tokens plus max_new_tokens={request.max_new_tokens} does not fit the "
                         f"context of {max_len} tokens")
