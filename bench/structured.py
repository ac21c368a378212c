"""python -m bench.structured [CKPT_DIR] [--tokens 48] [--rounds 3]

What structured output costs per token: one SmolLM2 request alone through the serving engine, greedy, free (--chunk 4
decode steps per call, as the server runs), free at one token per call, and constrained by llguidance to JSON mode
and to a JSON schema (one token per call, a mask computed on the host and applied on the device for each).
Interleaved rounds, best of each; prints a markdown table with each row against the free request in the same run.
"""

from __future__ import annotations

import argparse
import json
import time

from bench.common import md_table
from infer.grammar import Grammars
from llama_jax.checkpoints import cache_home, load_params, open_checkpoint, smollm2_checkpoint
from llama_jax.generation import PagedEngine, Request
from llama_jax.text import encoder_for

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {
    "type": "string"}}, "score": {"type": "number"}}, "required": ["name", "tags", "score"]}


def per_token(engine: PagedEngine, request: Request) -> tuple[float, int]:
    """Seconds per token after the first, and tokens made."""
    engine.add(request)
    times = []
    while engine.running or engine.waiting:
        for out in engine.step():
            times.extend([time.perf_counter()] * len(out.tokens))
    return (times[-1] - times[0]) / max(len(times) - 1, 1), len(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    checkpoint = open_checkpoint(args.checkpoint or smollm2_checkpoint(cache_home()))
    encoder = encoder_for(checkpoint)
    grammars = Grammars(encoder, checkpoint.config.vocab_size, checkpoint.stop_ids)
    params = load_params(checkpoint, per_layer=True)
    engines = {chunk: PagedEngine(params, checkpoint.config, slots=4, max_len=512, stop_ids=(), chunk=chunk)
               for chunk in (4, 1)}
    for engine in engines.values():
        engine.warm_up()
    prompt = encoder.render([{"role": "user", "content": "Describe a city as JSON."}], add_generation_prompt=True)
    kinds = {"free, 4 steps per call": (4, None), "free, 1 step per call": (1, None),
             "JSON mode": (4, grammars.grammar({"type": "json_object"})),
             "JSON schema": (4, grammars.grammar({"type": "json_schema", "json_schema": {"schema": SCHEMA}}))}
    best = {}
    for _ in range(args.rounds):
        for name, (chunk, grammar) in kinds.items():
            constraint = None if grammar is None else grammars.constraint(grammar)
            seconds, made = per_token(engines[chunk], Request(prompt, args.tokens, constraint=constraint))
            best[name] = min(best.get(name, (float("inf"), 0)), (seconds, made))
    base = best["free, 4 steps per call"][0]
    print(md_table(["request", "tokens", "ms per token", "/ free"],
                   [[name, str(made), f"{s * 1e3:.2f}", f"{s / base:.2f}x"] for name, (s, made) in best.items()]))
    print(json.dumps({name: s for name, (s, _) in best.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
