"""`python -m infer --preset NAME`: one jitted forward on a preset with random weights (a smoke run)."""

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import llama_jax as lj


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infer", description=__doc__)
    parser.add_argument("--preset", default="smollm2-135m", choices=sorted(lj.PRESETS))
    parser.add_argument("--seq-len", type=int, default=32)
    args = parser.parse_args(argv)
    config = lj.preset(args.preset)
    params = lj.init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (1, args.seq_len), 0, config.vocab_size)
    step = jax.jit(lj.forward, static_argnames=("config", "dtype", "remat"))
    start = time.perf_counter()
    logits = np.asarray(step(params, tokens, config)[0])
    print(f"{args.preset}: logits {logits.shape} {logits.dtype}, finite={np.isfinite(logits).all()}, "
          f"{time.perf_counter() - start:.2f}s including compilation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
