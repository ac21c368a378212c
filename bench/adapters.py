"""python -m bench.adapters [CKPT_DIR] [--requests 8] [--tokens 64] [--rank 16] [--rounds 3]

What serving several LoRA adapters from one base costs: the same batch of requests (different prompts of about 60
tokens, greedy, --tokens new each, all added at once) through `PagedEngine` on the base alone, on the base with one
adapter attached by `attach` (every request runs it), and on the base with two adapters attached by `attach_many`
(rank --rank and half that, on all seven projections, random factors), the requests on the base or spread over both
adapters and the base. A first round compiles what the batch uses; then interleaved rounds, best of each; prints a
markdown table of generated tokens/s with each row against the base alone in the same run. Default checkpoint:
SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from bench.common import md_table
from llama_jax.checkpoints import cache_home, load_params, open_checkpoint, smollm2_checkpoint
from llama_jax.generation import PagedEngine, Request
from llama_jax.model import (LORA_TARGETS, attach, attach_many, init_adapters, param_logical_names, param_shapes,
                             unstack_layers)


def random_adapter(config, rank: int, seed: int) -> tuple[dict, float]:
    """Per-layer factors of a rank-`rank` adapter on every target (a as PEFT initializes it, b small and random),
    and its scale (alpha 2 x rank)."""
    factors = init_adapters(param_shapes(config), param_logical_names(config), rank=rank, targets=LORA_TARGETS,
                            rng=jax.random.key(seed))
    rng = np.random.default_rng(seed)
    factors = jax.tree.map(lambda pair: {"a": pair["a"], "b": rng.normal(0, 0.01, pair["b"].shape).astype(np.float32)},
                           factors, is_leaf=lambda x: isinstance(x, dict) and set(x) == {"a", "b"})
    return unstack_layers(factors), 2.0


def throughput(engine: PagedEngine, requests: list[Request]) -> float:
    """Generated tokens per second of the requests, all added at once, until the last is done."""
    start, made = time.perf_counter(), 0
    for request in requests:
        engine.add(request)
    while engine.running or engine.waiting:
        made += sum(len(out.tokens) for out in engine.step())
    return made / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    checkpoint = open_checkpoint(args.checkpoint or smollm2_checkpoint(cache_home()))
    config = checkpoint.config
    params = load_params(checkpoint, per_layer=True)
    adapters = [random_adapter(config, args.rank, 1), random_adapter(config, args.rank // 2, 2)]
    sizes = dict(slots=args.requests, max_len=512, stop_ids=())  # no stop: every request makes --tokens tokens
    engines = {"base": PagedEngine(params, config, **sizes),
               "one": PagedEngine(attach(params, *adapters[0]), config, **sizes),
               "adapters": PagedEngine(attach_many(params, adapters), config, **sizes)}
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, config.vocab_size, 56 + 4 * i).tolist() for i in range(args.requests)]
    runs = {  # name: (engine, each request's adapter)
        "base alone": ("base", [0] * args.requests),
        "1 adapter (attach), every row": ("one", [0] * args.requests),
        "2 adapters + base, all rows the base": ("adapters", [0] * args.requests),
        "2 adapters + base, rows spread 1, 2, 0, ...": ("adapters", [(i + 1) % 3 for i in range(args.requests)]),
    }
    best: dict[str, float] = {}
    for round_ in range(args.rounds + 1):  # round 0 compiles
        for name, (engine, chosen) in runs.items():
            requests = [Request(prompt, args.tokens, adapter=a) for prompt, a in zip(prompts, chosen, strict=True)]
            measured = throughput(engines[engine], requests)
            best[name] = max(best.get(name, 0.0), measured if round_ else 0.0)
    base = best["base alone"]
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores, {jax.devices()[0].platform}")
    print(md_table(["batch", "tokens/s", "/ base alone"],
                   [[name, f"{value:.1f}", f"{value / base:.2f}x"] for name, value in best.items()]))
    print(json.dumps(best))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
