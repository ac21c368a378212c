"""What the serving engine sends its programs for each row of a step, and reads back: host arrays built from the
requests' state (with no requests: the arrays a program is compiled for), and the emitted tokens as `Token`s."""

from __future__ import annotations

import numpy as np

from llama_jax.generation.penalties import penalty_rows
from llama_jax.generation.requests import RequestState, Token
from llama_jax.generation.sampling import GREEDY, sampling_rows
from llama_jax.generation.steps import EMPTY, DecodeState, Emitted
from llama_jax.model import Pages


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


def block_tables(chosen: list[RequestState], rows: int, table_len: int) -> np.ndarray:
    """Each row's blocks `[rows, table_len]` (the null block 0 after them)."""
    tables = np.zeros((rows, table_len), np.int32)
    for r, sequence in enumerate(chosen):
        tables[r, :len(sequence.blocks)] = sequence.blocks
    return tables


def prefill_arrays(layout: list[tuple[RequestState, int]], rows: int, width: int, table_len: int, max_len: int
                   ) -> tuple[np.ndarray, Pages, np.ndarray]:
    """Rows of prompt tokens `[rows, width]`, left padded: a row (request, n) of `layout` holds the request's next n
    uncomputed tokens after those of its earlier rows (paged_steps.lay_out); their Pages (padding at position
    max_len: never a row's; every row of a request holds, once written, all the tokens its rows bring) and each row's
    tokens emitted so far `[rows]`."""
    tokens = np.zeros((rows, width), np.int32)
    positions = np.full((rows, width), max_len, np.int32)
    lengths, steps = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
    taken: dict[int, int] = {}  # request id -> its tokens in the rows so far
    for r, (sequence, n) in enumerate(layout):
        start = sequence.computed + taken.get(sequence.sid, 0)
        tokens[r, width - n:] = sequence.tokens[start:start + n]
        positions[r, width - n:] = np.arange(start, start + n)
        taken[sequence.sid], steps[r] = taken.get(sequence.sid, 0) + n, sequence.emitted
    for r, (sequence, _) in enumerate(layout):
        lengths[r] = sequence.computed + taken[sequence.sid]
    chosen = [sequence for sequence, _ in layout]
    return tokens, Pages(block_tables(chosen, rows, table_len), positions, lengths), steps


def decode_arrays(decoding: list[RequestState], rows: int, table_len: int
                  ) -> tuple[np.ndarray, DecodeState, np.ndarray]:
    """Block tables, DecodeState (rows past `decoding` done) and token limits `[rows]` for `decode_pages`; a
    constrained request gets one token per call (its mask changes with each)."""
    token, position, steps, limit = (np.zeros(rows, np.int32) for _ in range(4))
    for r, sequence in enumerate(decoding):
        token[r], position[r] = sequence.tokens[-1], len(sequence.tokens) - 1
        steps[r], limit[r] = sequence.emitted, sequence.request.max_new_tokens
        if sequence.request.constraint is not None:
            limit[r] = min(limit[r], sequence.emitted + 1)
    done = np.arange(rows) >= len(decoding)
    return block_tables(decoding, rows, table_len), DecodeState(token, position, done, steps), limit


def verify_arrays(decoding: list[RequestState], proposals: list[list[int]], rows: int, width: int, table_len: int,
                  max_len: int) -> tuple[np.ndarray, Pages, np.ndarray, np.ndarray, np.ndarray]:
    """For `speculation.verify_pages`: each row's last token then its proposals, right padded `[rows, width]`, their
    Pages (padding at position max_len), tokens emitted so far, token limits and proposals' counts `[rows]`."""
    tokens = np.zeros((rows, width), np.int32)
    positions = np.full((rows, width), max_len, np.int32)
    lengths, steps, limit, proposed = (np.zeros(rows, np.int32) for _ in range(4))
    for r, (sequence, proposal) in enumerate(zip(decoding, proposals, strict=True)):
        part, start = [sequence.tokens[-1], *proposal], len(sequence.tokens) - 1
        tokens[r, :len(part)] = part
        positions[r, :len(part)] = np.arange(start, start + len(part))
        lengths[r], steps[r] = start + len(part), sequence.emitted
        limit[r], proposed[r] = sequence.request.max_new_tokens, len(proposal)
    return tokens, Pages(block_tables(decoding, rows, table_len), positions, lengths), steps, limit, proposed
