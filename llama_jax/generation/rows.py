"""What the serving engine sends its programs for each row of a step, and reads back: host arrays built from the
requests' state, and the emitted tokens as `Token`s."""

from __future__ import annotations

import numpy as np

from llama_jax.generation.penalties import penalty_rows
from llama_jax.generation.requests import RequestState, Token
from llama_jax.generation.sampling import GREEDY, sampling_rows
from llama_jax.generation.steps import EMPTY, Emitted


def row_args(chosen: list[RequestState], rows: int, max_len: int, vocab: int) -> tuple:
    """Each row's seed, stream, sampling, penalties (with its constraint's allowed tokens), tokens so far
    (`[rows, max_len]`, -1 after them), prompt length and LoRA adapter; rows past `chosen` are greedy and empty."""
    seeds, streams, prompts, adapters = (np.zeros(rows, np.int32) for _ in range(4))
    history = np.full((rows, max_len), -1, np.int32)
    for r, sequence in enumerate(chosen):
        request = sequence.request
        seeds[r], streams[r], prompts[r] = request.seed, request.stream, len(request.prompt)
        adapters[r] = request.adapter
        history[r, :len(sequence.tokens)] = sequence.tokens[:max_len]
    params = [s.request.sampling for s in chosen] + [GREEDY] * (rows - len(chosen))
    penalties = penalty_rows(params, vocab)
    for r, sequence in enumerate(chosen):
        if sequence.request.constraint is not None:
            sequence.request.constraint.fill(penalties.allowed[r])
    return seeds, streams, sampling_rows(params), penalties, history, prompts, adapters


def host_tokens(out: Emitted) -> list[list[Token]]:
    """Each row's emitted tokens (EMPTY dropped), with their log-probabilities when the program kept them."""
    ids = np.asarray(out.tokens)
    if out.logprob is None:
        return [[Token(int(t)) for t in row if t != EMPTY] for row in ids]
    logprob, top_ids, top_lp = (np.asarray(a) for a in (out.logprob, out.top_ids, out.top_logprobs))
    return [[Token(int(ids[r, i]), float(logprob[r, i]),
                   tuple(zip(top_ids[r, i].tolist(), top_lp[r, i].tolist(), strict=True)))
             for i in range(ids.shape[1]) if ids[r, i] != EMPTY] for r in range(ids.shape[0])]
