"""Timing, tables and the BENCHMARKS.md record, shared by the CPU and GPU suites."""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

GB = 1e9
SECTION = "## Inference and training (python -m bench)"
SECTION_INTRO = """\
`python -m bench` measures the machine's limits and llama_jax in the same run: memory bandwidth (a 1 GiB
in-place read+write, best of several: numpy and a donated jax `x + 1`), peak matmul FLOP/s
(`llama_jax.flops.measured_peak_flops`), then generation with `Engine` (greedy, no early stop) and the jitted
`train_step`, against the same work done by transformers (`generate`, and a torch forward+backward+AdamW step)
on the same weights and inputs, the two interleaved run by run (the torch training step in a child process: in
one process each framework's training step slows the other's). Each figure is the best of its runs (the
machine is shared with other jobs; load averages are noted). Decode roofline: tokens/s limit = bandwidth x batch /
bytes read per step (every matmul weight once + the KV cache up to the mean context); prefill and training MFU =
model FLOPs (`llama_jax.model.flops`, causal attention counted as half) / time / measured peak of the compute dtype.
The CPU suite also times the converter, as the section above describes, in the same run (entries from
2026-11-24 08:00 UTC on).
Newest entry last.
"""


def logger(suite: str) -> Callable[[str], None]:
    """A function printing "[bench SUITE HH:MM:SS] message" lines to stderr (progress, apart from the results)."""
    def log(message: str) -> None:
        print(f"[bench {suite} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
    return log


def timed(fn: Callable[[], object]) -> float:
    """Seconds `fn()` took (it must block until its work is done)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def int_list(text: str) -> list[int]:
    """An argparse type: comma-separated integers ("128,256,512")."""
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def interleave(runs: dict[str, Callable[[], dict]], rounds: int) -> dict[str, list[dict]]:
    """Call every `runs[name]()` once per round, in turn, so slow phases of a shared machine hit all of them alike.

    Each call returns a dict of figures; the result keeps each name's list of dicts, round by round.
    """
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            results[name].append(run())
    return results


def best(values: Sequence[float], higher_is_better: bool = True) -> float:
    return max(values) if higher_is_better else min(values)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def fmt(value, spec: str = ".1f", missing: str = "-") -> str:
    if value is None:
        return missing
    if isinstance(value, str):
        return value
    return format(value, spec)


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def record(path: Path, entry: str, section: str = SECTION, intro: str = SECTION_INTRO) -> None:
    """Insert `entry` at the end of `section` in `path` (section, and file, created when missing); the rest of the
    file, other sections included, is kept as it is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if section not in text:
        text = text.rstrip("\n") + f"\n\n{section}\n\n{intro}"
    start = text.index(section) + len(section)
    following = re.search(r"^## ", text[start:], flags=re.MULTILINE)
    end = start + following.start() if following else len(text)
    body = text[start:end].rstrip("\n") + "\n\n" + entry.rstrip("\n") + "\n"
    path.write_text(text[:start] + body + ("\n" + text[end:] if following else ""))
