"""python -m bench.fill [--preset llama3-8b] [--slots 16] [--max-len 4096] [--dtype bfloat16] [--rounds 5]

The slot engine's decode step with every slot filled to 10% and to 100% of --max-len (random weights, real
prompts prefilled), and, at 10%, the same step made to attend over all max_len slots (what an engine without
read-length buckets does): the step's cost should follow the tokens cached. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from bench.common import md_table
from llama_jax import init_params, preset
from llama_jax.generation import Request, SlotEngine


def step_ms(engine: SlotEngine, kv_len: int, rounds: int) -> float:
    """Best time of one decode step (a `chunk`-step call divided by chunk), in ms."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        engine.step(kv_len)
        jax.block_until_ready(engine.state)
        times.append((time.perf_counter() - start) / engine.chunk * 1e3)
    return min(times)


def measure(args) -> list[list[str]]:
    config = preset(args.preset)
    dtype = jnp.dtype(args.dtype)
    params = init_params(config, jax.random.key(0), dtype=dtype)
    rows, base = [], None
    for fill in (0.1, 1.0):
        engine = SlotEngine(params, config, slots=args.slots, max_len=args.max_len, cache_dtype=dtype, dtype=dtype,
                            chunk=args.chunk)
        prompt = int(fill * args.max_len) - args.chunk * (args.rounds + 2)  # the rows end the run at that fill
        for slot in range(args.slots):
            ids = [1 + (slot + i) % (config.vocab_size - 1) for i in range(prompt)]
            engine.admit(slot, Request(ids, args.max_len - prompt))
        engine.step()  # compiles (or loads) the step program
        ms = step_ms(engine, engine.kv_len(), args.rounds)
        base = base or ms
        rows.append([f"{fill:.0%}", str(engine.kv_len()), f"{ms:.2f}", f"{ms / base:.2f}x"])
        if fill < 1:
            engine.step(args.max_len)
            whole = step_ms(engine, args.max_len, args.rounds)
            rows.append([f"{fill:.0%}, whole cache read", str(args.max_len), f"{whole:.2f}", f"{whole / base:.2f}x"])
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
    print(md_table(["fill", "kv_len read", "decode step ms", "/ the 10% step's time"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
