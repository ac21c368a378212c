"""python -m bench.prefill_budget [--preset smollm2-135m] [--budgets 128,256,512] [--rounds 3] [--breakdown]

The serving engine's prefill budget (`max_batch_tokens`): for each budget, a ~3,000-token prompt's time to first
token alone (median of --rounds, the budgets taking turns), and the output tokens/s of the serve suite's load (32
requests of 15-207 prompt tokens and 64 new tokens, 8 clients in a closed loop), random weights, float32, 8 slots x
4096 tokens, no prefix cache. Prints a markdown table, each figure also as a ratio to the first budget's. With
--breakdown, then where one more load pass of the first budget spends its time: each program (kind, shape), its
calls and seconds (each call timed to its results).
"""

from __future__ import annotations

import argparse
import collections
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import int_list, md_table
from llama_jax import init_params, preset
from llama_jax.generation import PagedEngine, Request

LONG, CLIENTS, NEW = 3000, 8, 64


def prompt(seed: int, length: int, vocab: int) -> list[int]:
    return [1 + (7 * seed + j) % (vocab - 1) for j in range(length)]


def ttft(engine: PagedEngine, ids: list[int]) -> float:
    """Seconds until the prompt's first token; the engine is left empty."""
    sid, start, first = engine.add(Request(ids, 1)), time.perf_counter(), None
    while engine.running or engine.waiting:
        for out in engine.step():
            if out.sid == sid and out.tokens and first is None:
                first = time.perf_counter() - start
    return first


def load(engine: PagedEngine, vocab: int) -> float:
    """Output tokens/s of 32 requests, CLIENTS at a time (a new one as each finishes)."""
    lengths = [int(1.3 * (12 + (i * 29) % 149)) for i in range(32)]  # the serve suite's prompts, ~1.3 tokens a word
    queue, live, tokens, start = list(range(32)), 0, 0, time.perf_counter()
    while live or queue:
        while queue and live < CLIENTS:
            i = queue.pop(0)
            engine.add(Request(prompt(i, lengths[i], vocab), NEW))
            live += 1
        for out in engine.step():
            tokens += len(out.tokens)
            live -= out.finish_reason is not None
    return tokens / (time.perf_counter() - start)


class Timed:
    """An engine's programs, each call timed until its results are ready: seconds per (kind, shape)."""

    def __init__(self, programs):
        self.programs, self.seconds = programs, collections.Counter()

    def __call__(self, kind: str, shape, args: tuple):
        start = time.perf_counter()
        out = jax.block_until_ready(self.programs(kind, shape, args))
        self.seconds[kind, shape] += time.perf_counter() - start
        return out


def breakdown(engine: PagedEngine, vocab: int) -> str:
    """One load pass with every program call timed: a markdown table of where its time went."""
    programs, runs = engine.programs, collections.Counter(engine.runs)
    engine.programs = timed = Timed(programs)
    start = time.perf_counter()
    rate = load(engine, vocab)
    wall = time.perf_counter() - start
    engine.programs = programs
    rows = [[f"{kind} {shape}", str(engine.runs[kind, shape] - runs[kind, shape]), f"{seconds:.2f}",
             f"{1e3 * seconds / (engine.runs[kind, shape] - runs[kind, shape]):.1f}", f"{seconds / wall:.0%}"]
            for (kind, shape), seconds in timed.seconds.most_common()]
    rows.append(["outside the programs", "-", f"{wall - sum(timed.seconds.values()):.2f}", "-", "-"])
    return (f"load pass: {rate:.1f} tok/s, {wall:.2f} s\n"
            + md_table(["program (rows, width)", "calls", "seconds", "ms each", "of the pass"], rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.prefill_budget", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--budgets", type=int_list, default="128,256,512")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--breakdown", action="store_true", help="then time each program of a load pass")
    args = parser.parse_args(argv)
    budgets = args.budgets
    if min(budgets) < 1 or args.rounds < 1:
        parser.error("budgets and rounds must be >= 1")
    config = preset(args.preset)
    params = init_params(config, jax.random.key(0), dtype=jnp.float32)
    engines, warm = {}, {}
    for budget in budgets:
        engines[budget] = PagedEngine(params, config, slots=8, max_len=4096, max_batch_tokens=budget,
                                      prefix_cache=False)
        warm[budget] = engines[budget].warm_up()
    long, rates = {b: [] for b in budgets}, {b: [] for b in budgets}
    for _ in range(args.rounds):
        for budget, engine in engines.items():
            long[budget].append(ttft(engine, prompt(0, LONG, config.vocab_size)))
    for _ in range(2):
        for budget, engine in engines.items():
            rates[budget].append(load(engine, config.vocab_size))
    first = budgets[0]
    rows = [[str(b), f"{warm[b][0]} in {warm[b][1]:.1f} s", f"{np.median(long[b]):.2f}",
             f"{np.median(long[b]) / np.median(long[first]):.2f}x", f"{np.median(rates[b]):.1f}",
             f"{np.median(rates[b]) / np.median(rates[first]):.2f}x"] for b in budgets]
    print(f"{args.preset}, float32, 8 slots x 4096, {jax.devices()[0].device_kind}; {args.rounds} rounds")
    print(md_table(["max_batch_tokens", "programs compiled", f"{LONG}-token prompt TTFT s", "/ first",
                    f"load ({CLIENTS} clients) tok/s", "/ first"], rows))
    if args.breakdown:
        print(breakdown(engines[first], config.vocab_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
