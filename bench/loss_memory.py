"""The vocabulary-chunked loss against the whole-vocabulary one in a full fine-tuning step: the step's temporary
memory (XLA's own count for the compiled program) and its time, on this machine.

    python -m bench.loss_memory [--preset smollm2-135m] [--batch 4] [--seq-len 512] [--steps 3] [--compile-only]

Random weights of the preset's shape (float32 params and AdamW, bfloat16 compute, remat full: the activations the
backward keeps are then little beside the logits), one micro-batch; `vocab_chunk` = the vocabulary (one slice: the
float32 logits `[batch, seq, vocab]` whole, as before the chunked loss) against VOCAB_CHUNK, compiled and timed in
turn (best of --steps after a warm-up). Prints a markdown table. `--compile-only`: the temporaries alone, the step
compiled for abstract params (nothing allocated, so shapes bigger than this machine's memory can be counted).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from bench.common import best, interleave, md_table
from bench.train import OPTIMIZER, OurTrainStep, jitted_step
from llama_jax import init_params, preset
from llama_jax.model import PRESETS, param_shapes
from llama_jax.training import VOCAB_CHUNK, abstract_state, make_optimizer

MIB = 1 << 20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smollm2-135m", choices=PRESETS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--compile-only", action="store_true")
    args = parser.parse_args(argv)
    for name in ("batch", "seq_len", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    config = preset(args.preset)
    logits_bytes = args.batch * args.seq_len * config.vocab_size * 4
    if args.compile_only:
        whole, sliced = (compiled_temporaries(config, args.batch, args.seq_len, chunk)
                         for chunk in (config.vocab_size, VOCAB_CHUNK))
        print(md_table(["loss", "step temporaries MiB"], [["whole vocabulary", f"{whole / MIB:,.0f}"],
                                                          [f"slices of {VOCAB_CHUNK}", f"{sliced / MIB:,.0f}"]]))
        print(f"\n{args.preset} shape, batch {args.batch} x {args.seq_len}: the batch's float32 logits are "
              f"{logits_bytes / MIB:,.0f} MiB; sliced / whole: temporaries {sliced / whole:.2f}x")
        return 0
    steps = {}
    for name, chunk in (("whole vocabulary", config.vocab_size), (f"slices of {VOCAB_CHUNK}", VOCAB_CHUNK)):
        params = init_params(config, jax.random.key(0), dtype=jnp.float32)
        steps[name] = OurTrainStep(params, config, dtype=jnp.bfloat16, batch=args.batch, seq_len=args.seq_len,
                                   remat="full", copy_params=False, vocab_chunk=chunk)
    runs = interleave(steps, args.steps)
    rows, figures = [], {}
    for name, step in steps.items():
        figures[name] = (step.step.memory_analysis().temp_size_in_bytes,
                         best([r["step_s"] for r in runs[name]], higher_is_better=False))
        rows.append([name, f"{figures[name][0] / MIB:,.0f}", f"{figures[name][1]:.3f}", f"{runs[name][0]['loss']:.5f}"])
    (whole_bytes, whole_s), (sliced_bytes, sliced_s) = figures.values()
    print(md_table(["loss", "step temporaries MiB", "step s (best)", "first loss"], rows))
    print(f"\n{args.preset} shape, batch {args.batch} x {args.seq_len}: the batch's float32 logits are "
          f"{logits_bytes / MIB:,.0f} MiB; sliced / whole: temporaries {sliced_bytes / whole_bytes:.2f}x, step time "
          f"{sliced_s / whole_s:.2f}x")
    return 0


def compiled_temporaries(config, batch: int, seq_len: int, chunk: int) -> int:
    """XLA's temporary bytes of the full fine-tuning step (as OurTrainStep's) compiled for abstract params."""
    state = abstract_state(param_shapes(config), make_optimizer(OPTIMIZER))
    tokens = jax.ShapeDtypeStruct((1, batch, seq_len), jnp.int32)
    step = jitted_step(config, dtype=jnp.bfloat16, remat="full", vocab_chunk=chunk)
    batch_shapes = {"tokens": tokens, "loss_mask": jax.ShapeDtypeStruct(tokens.shape, jnp.float32)}
    return step.lower(state, batch_shapes).compile().memory_analysis().temp_size_in_bytes


if __name__ == "__main__":
    sys.exit(main())
