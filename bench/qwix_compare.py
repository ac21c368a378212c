"""int8 weight-only matmuls: llama_jax's `QuantArray` + `weights.project` against qwix's `QArray` + `dot_general`.

    python -m bench.qwix_compare        (qwix is in the `bench` extra)

One SmolLM2-135M decode step's projections (30 layers x q, k, v, o, gate, up, down at one token; weights
normal(0.02), one scale per output channel, float32 activations), jitted as one program each way, and the float32
weights as the reference: best and median ms of 30 calls, XLA's temp bytes, and the relative error of the summed
outputs against float32. Prints a markdown table.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.model import preset, project, quantize

CALLS = 30


def weights(rng: np.random.Generator) -> list[jax.Array]:
    c = preset("smollm2-135m")
    kv = c.num_key_value_heads * c.head_dim
    shapes = [(c.hidden_size, c.hidden_size), (c.hidden_size, kv), (c.hidden_size, kv),
              (c.hidden_size, c.hidden_size), (c.hidden_size, c.intermediate_size),
              (c.hidden_size, c.intermediate_size), (c.intermediate_size, c.hidden_size)]
    return [jnp.asarray(rng.normal(0, 0.02, s).astype(np.float32)) for _ in range(c.num_hidden_layers) for s in shapes]


def program(multiply):
    """A jitted sum over every weight of `multiply(x, w)`, x `[1, 1, in]` picked by the weight's input size."""
    def step(inputs, ws):
        return sum(multiply(inputs[w.shape[0]], w).sum() for w in ws)
    return jax.jit(step)


def main() -> int:
    import qwix

    rng = np.random.default_rng(0)
    floats = weights(rng)
    inputs = {n: jnp.asarray(rng.normal(size=(1, 1, n)).astype(np.float32)) for n in {w.shape[0] for w in floats}}
    ours = [quantize(w, (0,)) for w in floats]
    theirs = [qwix.quantize(w, jnp.int8, channelwise_axes=(1,), scale_dtype=jnp.float32) for w in floats]
    runs = {"float32 weights": (program(lambda x, w: project("bsi,io->bso", x, w)), floats),
            "llama_jax QuantArray + weights.project": (program(lambda x, w: project("bsi,io->bso", x, w)), ours),
            "qwix QArray + qwix.dot_general": (program(lambda x, w: qwix.dot_general(x, w, (((2,), (0,)), ((), ())))),
                                               theirs)}
    reference = float(runs["float32 weights"][0](inputs, floats))
    print("| weights | best ms | median ms | XLA temp MiB | relative error of the sum |")
    print("| --- | --- | --- | --- | --- |")
    for name, (fn, ws) in runs.items():
        value = float(fn(inputs, ws))
        times = []
        for _ in range(CALLS):
            start = time.perf_counter()
            jax.block_until_ready(fn(inputs, ws))
            times.append(time.perf_counter() - start)
        temp = fn.lower(inputs, ws).compile().memory_analysis().temp_size_in_bytes
        print(f"| {name} | {1e3 * min(times):.2f} | {1e3 * float(np.median(times)):.2f} | {temp / 2**20:.1f} | "
              f"{abs(value - reference) / abs(reference):.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
