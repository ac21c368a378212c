"""The serving engine on a GPU (a case of bench/gpu_tune.py): `PagedEngine` with `batch` requests at once against
the batch `Engine` decoding the same prompts at that batch size, in one process, on one set of random weights."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from bench.decode import OurGenerate, random_prompts


def paged_pass(engine, prompts: list[list[int]], new_tokens: int) -> dict:
    """Every prompt added at once, stepped until all finish: wall seconds, output tokens, and seconds to the last
    request's first token (the prefills' share)."""
    from llama_jax.generation import Request

    start, tokens, first = time.perf_counter(), 0, {}
    for ids in prompts:
        engine.add(Request(ids, new_tokens))
    while engine.running or engine.waiting:
        for out in engine.step():
            tokens += len(out.tokens)
            if out.tokens:
                first.setdefault(out.sid, time.perf_counter() - start)
    return {"seconds": time.perf_counter() - start, "tokens": tokens, "last_first_token_s": max(first.values())}


def paged_case(case: dict, shapes: dict) -> dict:
    """Output tokens/s of `PagedEngine` (bfloat16, block 16, prefix cache off, max_batch_tokens case["budget"])
    serving case["batch"] requests of shapes["prompt"] tokens and shapes["new_tokens"] new ones, all added at once
    (the second of two passes: the first compiles the shapes it uses), against `Engine.generate` of the same prompts
    (its best of two runs): over its whole call, and over its decode alone."""
    from llama_jax import init_params, preset
    from llama_jax.generation import PagedEngine

    config, batch, new = preset(shapes["decode_model"]), case["batch"], shapes["new_tokens"]
    params = init_params(config, jax.random.key(0), dtype=jnp.bfloat16)
    ours = OurGenerate(params, config, dtype=jnp.bfloat16, batch=batch, prompt_len=shapes["prompt"],
                       new_tokens=new)
    runs = [ours() for _ in range(2)]
    best = min(runs, key=lambda r: r["ttft_s"] + r["decode_s"])
    engine_row = {"tok_s": batch * new / (best["ttft_s"] + best["decode_s"]), "decode_tok_s": best["decode_tok_s"],
                  "ttft_s": best["ttft_s"]}
    del ours
    max_len = -(-(shapes["prompt"] + new + 16) // 16) * 16  # room for the decode chunk's tokens past the last
    paged = PagedEngine(params, config, slots=batch, max_len=max_len, block_size=16, max_batch_tokens=case["budget"],
                        prefix_cache=False, cache_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    prompts = random_prompts(config.vocab_size, batch, shapes["prompt"])
    start = time.perf_counter()
    paged_pass(paged, prompts, new)
    compile_s = time.perf_counter() - start
    timed = paged_pass(paged, prompts, new)
    assert timed["tokens"] == batch * new, timed
    return {"engine": engine_row, "paged": {"tok_s": timed["tokens"] / timed["seconds"], "compile_s": compile_s,
                                            "last_first_token_s": timed["last_first_token_s"],
                                            "programs": sorted(map(str, paged.runs))}}


def paged_figures(result: dict) -> str:
    engine, paged = result["engine"], result["paged"]
    return (f"PagedEngine {paged['tok_s']:.0f} tok/s ({paged['tok_s'] / engine['tok_s']:.2f}x the Engine's "
            f"{engine['tok_s']:.0f} over its whole call, {paged['tok_s'] / engine['decode_tok_s']:.2f}x its decode "
            f"alone, {engine['decode_tok_s']:.0f}); last first token {paged['last_first_token_s'] * 1e3:.0f} ms "
            f"(Engine TTFT {engine['ttft_s'] * 1e3:.0f} ms); first pass {paged['compile_s']:.0f} s")
