"""One decode step's attention over a paged pool against the same attention over a dense cache, per context length
and per span (the tokens `paged_attend` gathers per iteration; for one query per row the engine uses
`llama_jax.model.paged.DECODE_KV_CHUNK_TOKENS`).

    python -m bench.paged_attention [--preset smollm2-135m] [--rows 8] [--contexts 150,1000,3000]
                                    [--spans 128,256,512] [--rounds 10]

Every layer of the preset, one query per row, float32, the rows' blocks scattered over a pool of rows x 4096 tokens
as a served batch's are. The dense figure is `attend` over `[rows, kv_heads, context, head_dim]` caches, which is what
the batch Engine reads: the gap between the two is the cost of gathering the blocks. Times are the best of
`--rounds` calls, the variants called in turn in each round (`bench.common.interleave`).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import int_list, interleave, md_table, timed
from llama_jax.model import Pages, attend, paged_attend, preset

BLOCK, POOL_TOKENS_PER_ROW = 16, 4096


def layers_of(attention, layers: int):
    """A jitted step through `layers` layers of `attention(q, layer) -> q-shaped`, each layer's output feeding the
    next (so none is skipped), layer indices static as in the unrolled decoder."""
    def step(q, *args):
        for layer in range(layers):
            q = q + 0.01 * attention(q, layer, *args)
        return q
    return jax.jit(step)


def variants(config, rows: int, context: int, spans: list[int], rng: np.random.Generator) -> dict:
    """{name: a call that returns {"ms": ...}} for the dense cache and each span over the same keys and values."""
    layers, kv_heads, head_dim = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    per_row, used = POOL_TOKENS_PER_ROW // BLOCK, -(-context // BLOCK)
    tables = np.zeros((rows, per_row), np.int32)
    for row in range(rows):  # scattered within the row's share of the pool, as blocks freed and taken again are
        tables[row, :used] = 1 + row * per_row + rng.permutation(per_row)[:used]
    shape = (layers, rows * per_row + 1, kv_heads, BLOCK, head_dim)
    pool = tuple(jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(2)) + (None, None)
    pages = Pages(jnp.asarray(tables), jnp.full((rows, 1), context - 1, jnp.int32),
                  jnp.full((rows,), context, jnp.int32))
    dense = [tuple(jnp.asarray(np.asarray(part[layer])[tables[:, :used]].transpose(0, 2, 1, 3, 4).reshape(
        rows, kv_heads, used * BLOCK, head_dim)[:, :, :context]) for part in pool[:2]) for layer in range(layers)]
    q = jnp.asarray(rng.standard_normal((rows, 1, config.num_attention_heads, head_dim), np.float32))

    outputs = []

    def run(fn, *args):
        outputs.append(np.asarray(fn(q, *args)))  # compiles; the variants must compute the same thing
        np.testing.assert_allclose(outputs[-1], outputs[0], rtol=1e-4, atol=1e-4)
        return lambda: {"ms": 1e3 * timed(lambda: fn(q, *args).block_until_ready())}

    calls = {"dense": run(layers_of(lambda x, layer, caches: attend(x, *caches[layer], None), layers), dense)}
    for span in spans:
        calls[f"paged, span {span}"] = run(layers_of(lambda x, layer, pool, pages, blocks=span // BLOCK: paged_attend(
            x, pool, layer, pages, jnp.float32, per_chunk=blocks), layers), pool, pages)
    return calls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.paged_attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--contexts", type=int_list, default="150,1000,3000")
    parser.add_argument("--spans", type=int_list, default="128,256,512")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    config = preset(args.preset)
    contexts, spans = args.contexts, args.spans
    if (min(contexts) < 1 or max(contexts) > POOL_TOKENS_PER_ROW or args.rows < 1
            or any(span < BLOCK or POOL_TOKENS_PER_ROW % span or span % BLOCK for span in spans)):
        parser.error(f"contexts must be in 1..{POOL_TOKENS_PER_ROW}, spans multiples of {BLOCK} that divide "
                     f"{POOL_TOKENS_PER_ROW}, rows >= 1")
    rng = np.random.default_rng(0)
    table = []
    for context in contexts:
        results = interleave(variants(config, args.rows, context, spans, rng), args.rounds)
        dense = min(r["ms"] for r in results["dense"])
        for name, runs in results.items():
            fastest = min(r["ms"] for r in runs)
            table.append([str(context), name, f"{fastest:.2f}", f"{fastest / dense:.2f}x"])
    print(f"{args.preset}: {config.num_hidden_layers} layers, {args.rows} rows, one query each, float32, best of "
          f"{args.rounds}")
    print(md_table(["context", "attention", "ms per step", "/ dense"], table))


if __name__ == "__main__":
    main()
