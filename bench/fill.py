"""python -m bench.fill [--preset llama3-8b] [--slots 16] [--max-len 4096] [--dtype bfloat16] [--rounds 5]

The paged engine's decode step (random weights, prompts prefilled first) with every slot's request filled to 10%
and to 100% of --max-len, and with one request alone at 10% on --slots and on one slot: the step's cost should
follow the tokens attended and the requests running, not the pool's size or the slots. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from bench.common import md_table
from llama_jax import init_params, preset
from llama_jax.generation import PagedEngine, Request


def step_ms(engine: PagedEngine, rounds: int) -> float:
    """Best time of one decode step (a `chunk`-step call divided by chunk), in ms."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        engine.step()
        jax.block_until_ready(engine.pool)
        times.append((time.perf_counter() - start) / engine.chunk * 1e3)
    return min(times)


def measure(args) -> list[list[str]]:
    config = preset(args.preset)
    dtype = jnp.dtype(args.dtype)
    params = init_params(config, jax.random.key(0), dtype=dtype)
    rows, base = [], None
    for fill, slots, running in ((0.1, args.slots, args.slots), (1.0, args.slots, args.slots), (0.1, args.slots, 1),
                                 (0.1, 1, 1)):
        engine = PagedEngine(params, config, slots=slots, max_len=args.max_len, cache_dtype=dtype, dtype=dtype,
                             chunk=args.chunk, prefix_cache=False)
        # room for the decode steps taken while the others prefill (a prompt chunk of 512 a step), and the rounds
        margin = args.chunk * (args.rounds + 2 + running * -(-args.max_len // 512))
        prompt = max(1, int(fill * args.max_len) - margin)
        for row in range(running):
            ids = [1 + (row + i) % (config.vocab_size - 1) for i in range(prompt)]
            engine.add(Request(ids, args.max_len - prompt))
        while any(not s.decoding for s in engine.running.values()) or engine.waiting:
            engine.step()  # prefills (and compiles or loads the programs)
        engine.step()
        held = sum(len(s.tokens) for s in engine.running.values()) / len(engine.running)
        ms = step_ms(engine, args.rounds)
        base = base or ms
        rows.append([f"{fill:.0%} ({held:.0f} tokens)", f"{len(engine.running)} of {slots}", f"{ms:.2f}",
                     f"{ms / base:.2f}x"])
        del engine
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama3-8b")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    rows = measure(args)
    print(f"{args.preset}, {args.slots} slots x {args.max_len} tokens, {args.dtype}, {jax.devices()[0].device_kind}")
    print(md_table(["fill", "requests running of slots", "decode step ms", "/ the first row's time"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
