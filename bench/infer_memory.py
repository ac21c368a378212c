"""Peak memory of `python -m infer` on a checkpoint, against the bytes of its weights.

    python -m bench.infer_memory CKPT [--dtype bfloat16] [--max-new-tokens 4] [--quantize] [--int8 CKPT_INT8]

Runs, each in a child process whose peak RSS (VmHWM, sampled every 10 ms) is read from /proc:
  infer    `python -m infer CKPT --prompt ... --max-new-tokens N --dtype D`: params restored per layer, straight into
           the arrays the Engine runs (one copy of the weights);
  quantize the same with `--quantize int8` (`--quantize`): int8 weights quantized while loading, layer by layer;
  int8     the same on CKPT_INT8, a checkpoint stored by `convert ... --quantize int8` (`--int8 CKPT_INT8`);
  stacked  what infer did before (`--stacked`): the stacked restore, then the Engine's own per-layer copy. A
           watchdog ends it when the machine has less than 1 GiB available, so it reports how far it got.
Prints a markdown table: peak RSS, the weights' bytes in the compute dtype and their ratio (the int8 runs: also
against the int8 weights' bytes), and the KV cache's bytes.
For a Llama-3-8B shape: `python bench/make_synthetic_hf.py --preset llama3-8b HF`, copy a tokenizer.json into HF,
`python -m convert hf HF CKPT`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import jax

from bench.convert_bench import run_child
from bench.roofline import kv_bytes_per_token
from llama_jax.checkpoints import open_checkpoint
from llama_jax.errors import exit_code
from llama_jax.model import param_shapes

PROMPT = "The capital of France is"
STACKED = """
import sys, jax.numpy as jnp
from llama_jax.checkpoints import load_params, open_checkpoint
from llama_jax.generation import Engine
checkpoint = open_checkpoint(sys.argv[1])
dtype = jnp.dtype(sys.argv[2])
engine = Engine(load_params(checkpoint, dtype=dtype), checkpoint.config, max_len=32, dtype=dtype, cache_dtype=dtype)
print(engine.generate([[1, 2, 3]], max_new_tokens=int(sys.argv[3])).completions[0].tokens)
"""
GIB = 1 << 30


def weight_bytes(config, dtype: str, quantization: str | None = None) -> int:
    """Bytes of every param in `dtype` (int8 values and their scales with `quantization`): what memory holds
    (bench.roofline.weight_bytes counts what a step reads)."""
    return sum(math.prod(s.shape) * s.dtype.itemsize
               for s in jax.tree.leaves(param_shapes(config, dtype, quantization=quantization)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--stacked", action="store_true", help="also measure the stacked restore + Engine copy")
    parser.add_argument("--quantize", action="store_true", help="also measure infer --quantize int8")
    parser.add_argument("--int8", type=Path, metavar="CKPT_INT8", help="also measure infer on this int8 checkpoint")
    args = parser.parse_args(argv)
    return exit_code(lambda: measure(args), interrupted="interrupted")


def measure(args) -> int:
    config = open_checkpoint(args.checkpoint).config
    weights, int8_weights = weight_bytes(config, args.dtype), weight_bytes(config, args.dtype, "int8")

    def infer(checkpoint, *extra):
        return [sys.executable, "-m", "infer", str(checkpoint), "--prompt", PROMPT, "--max-new-tokens",
                str(args.max_new_tokens), "--dtype", args.dtype, "--temperature", "0", *extra]

    runs = {"infer": infer(args.checkpoint)}
    if args.stacked:
        runs["stacked"] = [sys.executable, "-c", STACKED, str(args.checkpoint), args.dtype, str(args.max_new_tokens)]
    if args.quantize:
        runs["infer --quantize int8"] = infer(args.checkpoint, "--quantize", "int8")
    if args.int8:
        runs["infer (stored int8)"] = infer(args.int8)
    print(f"| run | exit | peak RSS GiB | {args.dtype} weights GiB | peak / {args.dtype} weights | int8 weights GiB | "
          "peak / int8 weights | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, command in runs.items():
        result = run_child(command, min_available=GIB)
        status = f"killed: {result['killed']}" if result["killed"] else str(result["rc"])
        int8 = (f"{int8_weights / GIB:.2f} | {result['maxrss'] / int8_weights:.3f}" if "int8" in name else "- | -")
        print(f"| {name} | {status} | {result['maxrss'] / GIB:.2f} | {weights / GIB:.2f} | "
              f"{result['maxrss'] / weights:.3f} | {int8} | {result['wall']:.0f} |", flush=True)
        if result["rc"] != 0 and not result["killed"]:
            print(result["log"][-2000:], file=sys.stderr)
    kv = kv_bytes_per_token(config, args.dtype)
    print(f"\nKV cache: {kv / (1 << 10):.0f} KiB per token slot; weights {weights:,} bytes ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
