"""The GPU tuning suite's micro-benchmarks (bench/gpu_tune.py runs them in its child processes): the int8
projection formulations over Llama-3-8B's layers, and decode attention over a KV cache stacked by layer (as
`KVCache` holds it) against one array per layer and against a formulation as reductions.

Each returns seconds per pass (best of `rounds`) and each candidate's relative error against a float32 reference,
so a formulation that is fast because it computes something else shows."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bench.common import timed
from bench.gpu import failure
from llama_jax.model import QuantArray, Tiles, attend, einsum_product, rows_layout

PROJ_BATCHES = (1, 4, 8)
ATTENTION_FORMS = ("stacked", "per-layer", "reduce")


def row_reduce(x: jax.Array, w: jax.Array) -> jax.Array:
    """x `[batch, in]` @ int8 w `[in, out]` (in `rows_layout`) in float32, as a broadcast product summed over `in`:
    XLA fuses it into one reduction along each stored row (what `project` did for one token before `int8_kernel`)."""
    return jnp.sum(x.astype(jnp.float32)[:, None, :] * w.T.astype(jnp.float32)[None], axis=-1)


def proj_case(case: dict, config, rounds: int = 5) -> dict:
    """For each of case["weights"]: seconds per pass over the 32 layers' matmuls (one array per layer, as the
    Engines hold them) at each of PROJ_BATCHES (best of `rounds`), and the int8 ones' relative error against the
    float32 product of the dequantized weight (layer 0's gate, 8 rows). Weights: bfloat16; int8 converted in a
    dot (what `project` does above DOT_ROWS rows) in the default layout or in `rows_layout`; int8 as
    `row_reduce` in `rows_layout`; int8 through `int8_kernel` (what `project` does on a GPU
    up to DOT_ROWS rows), "kernel/block_n/chunk/block_k/warps/stages-rows" with other `Tiles` than its own."""
    e, m, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    shapes = {"q": (e, q), "k": (e, kv), "v": (e, kv), "o": (q, e), "gate": (e, m), "up": (e, m), "down": (m, e)}
    seconds, errors = {}, {}
    for weights in case["weights"]:
        kind, _, how = weights.partition(":")

        def make(key, shape, kind=kind):
            if kind == "bfloat16":
                return (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(jnp.bfloat16)
            scale = jax.random.uniform(key, (1, shape[1]), jnp.float32, 0.5, 1.5) * (0.02 / 127)
            return QuantArray(jax.random.randint(key, shape, -127, 128, jnp.int8), scale)

        make = jax.jit(make, static_argnums=(1,))
        stack = [{name: make(jax.random.key(i * 8 + j), shape) for j, (name, shape) in enumerate(shapes.items())}
                 for i in range(layers)]
        stack = rows_layout(stack) if how.endswith("rows") else stack

        def mm(x, w, how=how):  # x [batch, in] (bfloat16); each formulation explicitly, whatever `project` picks
            if how.startswith("kernel"):  # "kernel[/block_n/chunk/block_k/warps/stages]-rows"
                gpu = jax.default_backend() == "gpu"  # elsewhere (a dry run): interpreted, with tiles that fit
                tiles = Tiles(*map(int, how.removesuffix("-rows").split("/")[1:])) if gpu else Tiles(16, 32, 16)
                out = einsum_product("bi,io->bo", x, w.values, tiles, interpret=not gpu)
                assert out is not None, f"{how}: the kernel does not take {x.shape} x {w.shape}"
            elif how.startswith("reduce"):
                out = row_reduce(x, w.values)
            elif how.startswith("dot"):
                out = jnp.einsum("bi,io->bo", x, w.values.astype(x.dtype), preferred_element_type=jnp.float32)
            else:
                return jnp.einsum("bi,io->bo", x, w, preferred_element_type=x.dtype)
            return (out * w.output_scale).astype(x.dtype)

        def run(x, stack, mm=mm):
            for w in stack:  # every matmul of a decoder layer, in the order the model runs them
                o = mm(mm(x, w["q"]), w["o"])
                d = mm(jax.nn.silu(mm(x, w["gate"])) * mm(x, w["up"]), w["down"])
                x = x + o + d + 0 * (mm(x, w["k"]).sum() + mm(x, w["v"]).sum()).astype(x.dtype)
            return x

        run = jax.jit(run)
        times = {}
        for batch in case.get("batches", PROJ_BATCHES):
            x = (jax.random.normal(jax.random.key(batch), (batch, e), jnp.float32) * 0.01).astype(jnp.bfloat16)
            try:
                jax.block_until_ready(run(x, stack))  # compiles
            except Exception as err:  # noqa: BLE001 (a candidate that does not compile here: reported, not fatal)
                errors[f"{weights} failed"] = failure(err)
                break
            times[f"batch {batch}"] = min(timed(lambda x=x: jax.block_until_ready(run(x, stack)))
                                          for _ in range(rounds))
        seconds[weights] = times
        if kind == "int8" and times:
            w = stack[0]["gate"]
            x = jax.random.normal(jax.random.key(7), (8, e), jnp.float32).astype(jnp.bfloat16)
            want = x.astype(jnp.float32) @ w.dequantize(jnp.float32)
            got = jax.jit(mm)(x, w).astype(jnp.float32)
            errors[weights] = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
        del stack
    return {"seconds": seconds, "rel_error": errors}


def reduce_attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """One query per row over every slot of k, v `[batch, kv_heads, kv_len, head_dim]` (q `[batch, 1, heads,
    head_dim]`), written as a broadcast product and a sum (twice) rather than as dots: XLA fuses a slice of a stacked
    cache into a reduction, where its GEMM fusions copy the slice first. -> `[batch, 1, heads, head_dim]`."""
    batch, _, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(batch, kv_heads, heads // kv_heads, 1, head_dim).astype(jnp.float32)
    scores = jnp.sum(q * k[:, :, None].astype(jnp.float32), axis=-1) * head_dim**-0.5  # [b, k, g, t]
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.sum(probs[..., None] * v[:, :, None].astype(jnp.float32), axis=-2)  # [b, k, g, d]
    return out.reshape(batch, 1, heads, head_dim).astype(v.dtype)


def attention_case(case: dict, config, batch: int, rounds: int = 5) -> dict:
    """Seconds per decode step's attention over all layers (one query per row, `batch` rows, bfloat16), for each
    context length of case["contexts"] and each of ATTENTION_FORMS: `attend` on slices of a stacked cache
    `[layers, batch, kv_heads, max_len, head_dim]` (the Engine's decode), `attend` on one array per layer, and
    `reduce_attend` on the stacked cache; with the largest relative error of each against the first."""
    layers, heads, kv_heads, d = (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
                                  config.head_dim)
    seconds, errors = {}, {}
    for context in case["contexts"]:
        keys = jax.random.split(jax.random.key(context), 3)
        shape = (layers, batch, kv_heads, context + 64, d)  # slots beyond the context, as a cache has
        stacked_k, stacked_v = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys[:2])
        q = jax.random.normal(keys[2], (batch, 1, heads, d), jnp.bfloat16)
        split_k, split_v = ([a[i, :, :, :context] for i in range(layers)] for a in (stacked_k, stacked_v))
        mask = jnp.ones((batch, 1, context), bool)

        def stacked(q, k, v):
            return sum(attend(q, k[i, :, :, :context], v[i, :, :, :context], mask).astype(jnp.float32)
                       for i in range(layers))

        def per_layer(q, k, v):
            return sum(attend(q, k[i], v[i], mask).astype(jnp.float32) for i in range(layers))

        def reduced(q, k, v):
            return sum(reduce_attend(q, k[i, :, :, :context], v[i, :, :, :context]).astype(jnp.float32)
                       for i in range(layers))

        runs = {"stacked": (stacked, stacked_k, stacked_v), "per-layer": (per_layer, split_k, split_v),
                "reduce": (reduced, stacked_k, stacked_v)}
        outs = {}
        for form, (fn, k, v) in runs.items():
            fn = jax.jit(fn)
            outs[form] = jax.block_until_ready(fn(q, k, v))  # compiles
            seconds[f"{form}, context {context}"] = min(
                timed(lambda fn=fn, k=k, v=v: jax.block_until_ready(fn(q, k, v))) for _ in range(rounds))
        first = outs[ATTENTION_FORMS[0]]
        for form in ATTENTION_FORMS[1:]:
            errors[f"{form}, context {context}"] = float(jnp.linalg.norm(outs[form] - first) / jnp.linalg.norm(first))
    return {"seconds": seconds, "rel_error": errors}
