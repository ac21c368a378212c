"""Fine-tuning data: JSONL records -> examples (`text.Encoder`) -> fixed-shape (optionally packed) batches."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from llama_jax.errors import InputError
from llama_jax.text import Encoder, Example

TooLong = Literal["truncate", "skip"]


@dataclasses.dataclass(frozen=True)
class Dataset:
    examples: list[Example]
    truncated: int
    skipped: int


def load_jsonl(path: str | Path, encoder: Encoder, seq_len: int, too_long: TooLong = "truncate") -> Dataset:
    """Encode every line of a JSONL file; InputError names `path:line` for a malformed one.

    Examples longer than `seq_len` are cut to it ("truncate") or dropped ("skip"); an example left with no target
    to learn (e.g. its answer truncated away) is dropped too. Each example is counted at most once: `skipped`
    holds every dropped one, `truncated` those kept after cutting.
    """
    path = Path(path)
    examples, truncated, skipped = [], 0, 0
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except UnicodeDecodeError:
        raise InputError(path, "not UTF-8 text") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            example = encoder.record(json.loads(line))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{number}", f"not valid JSON ({e.msg})") from None
        except ValueError as e:
            raise InputError(f"{path}:{number}", str(e)) from None
        cut = len(example.ids) > seq_len
        if cut:
            example = Example(example.ids[:seq_len], example.loss_mask[:seq_len])
        if (cut and too_long == "skip") or not example.loss_mask[1:].any():
            skipped += 1
            continue
        truncated += cut
        examples.append(example)
    if not examples:
        raise InputError(path, "no usable examples")
    return Dataset(examples, truncated, skipped)


def pack_rows(examples: Sequence[Example], seq_len: int, pack: bool) -> list[list[Example]]:
    """Group examples into rows of at most `seq_len` tokens: one per row, or greedily packed in order."""
    rows: list[list[Example]] = []
    used = seq_len + 1
    for example in examples:
        if not pack or used + len(example.ids) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(example)
        used += len(example.ids)
    return rows


def row_arrays(row: Sequence[Example], seq_len: int) -> dict[str, np.ndarray]:
    """One row `[seq_len]`: tokens, loss_mask, positions restarting per example, segment ids 1.. (0 = padding)."""
    out = {"tokens": np.zeros(seq_len, np.int32), "loss_mask": np.zeros(seq_len, np.float32),
           "positions": np.zeros(seq_len, np.int32), "segment_ids": np.zeros(seq_len, np.int32)}
    start = 0
    for segment, example in enumerate(row, start=1):
        end = start + len(example.ids)
        out["tokens"][start:end] = example.ids
        out["loss_mask"][start:end] = example.loss_mask
        out["positions"][start:end] = np.arange(len(example.ids))
        out["segment_ids"][start:end] = segment
        start = end
    return out


def epoch_rows(dataset: Dataset, seq_len: int, pack: bool, seed: int, epoch: int) -> list[list[Example]]:
    """The rows of one epoch: examples shuffled by (seed, epoch), then grouped into rows."""
    order = np.random.default_rng([seed, epoch]).permutation(len(dataset.examples))
    return pack_rows([dataset.examples[i] for i in order], seq_len, pack)


def stack_rows(rows: Sequence[Sequence[Example]], seq_len: int) -> dict[str, np.ndarray]:
    """Rows of examples -> arrays `[len(rows), seq_len]` (see `row_arrays`)."""
    arrays = [row_arrays(row, seq_len) for row in rows]
    return {k: np.stack([a[k] for a in arrays]) for k in arrays[0]}


def batches(dataset: Dataset, *, batch_size: int, grad_accum: int, seq_len: int, pack: bool, seed: int,
            start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches `[grad_accum, batch_size, seq_len]`, epoch after epoch; skip the first `start` (resume).

    A batch that reaches past the end of an epoch is filled from the next one. Batch number n is the same
    whether reached directly or by resuming at `start = n`.
    """
    rows_per_batch = batch_size * grad_accum
    epoch, rows, index = 0, epoch_rows(dataset, seq_len, pack, seed, 0), 0
    produced = 0
    while True:
        batch = []
        while len(batch) < rows_per_batch:
            if index == len(rows):
                epoch, index = epoch + 1, 0
                rows = epoch_rows(dataset, seq_len, pack, seed, epoch)
            batch.append(rows[index])
            index += 1
        if produced >= start:
            yield {k: v.reshape(grad_accum, batch_size, seq_len) for k, v in stack_rows(batch, seq_len).items()}
        produced += 1


def eval_batches(dataset: Dataset, *, batch_size: int, seq_len: int, pack: bool) -> Iterator[dict[str, np.ndarray]]:
    """Every example exactly once, in file order: batches `[batch_size, seq_len]`, the last filled with padding."""
    rows = pack_rows(dataset.examples, seq_len, pack)
    for first in range(0, len(rows), batch_size):
        chunk = rows[first:first + batch_size]
        yield stack_rows(chunk + [[]] * (batch_size - len(chunk)), seq_len)


def batches_per_epoch(dataset: Dataset, *, batch_size: int, grad_accum: int, seq_len: int, pack: bool) -> int:
    """Optimizer steps for one pass over the data (with packing, as packed in file order)."""
    rows = len(pack_rows(dataset.examples, seq_len, pack))
    return max(1, -(-rows // (batch_size * grad_accum)))
