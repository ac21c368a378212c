"""The LoRA suite: SmolLM2-135M-Instruct training steps, LoRA against our full fine-tune and against torch + PEFT.

  ours full / ours LoRA     `train_step` on float32 params (LoRA: the base frozen, rank-16 adapters on all seven
                            projections, alpha 32), interleaved round by round
  torch full / torch+PEFT   the transformers model with torch AdamW; LoRA through `peft.get_peft_model`, same rank,
                            alpha and targets; each in a child process (see bench.train.peer_train_runs)

Float32 compute, 4 x 256 random tokens, one optimizer step per call. MFU = model FLOPs / time / the measured float32
peak; a LoRA step counts 4/6 of a full step's matmul FLOPs (no weight gradients for the frozen base).
"""

from __future__ import annotations

import os

import jax.numpy as jnp

from bench import roofline
from bench.common import best, interleave, logger
from bench.cpu import smollm2
from bench.train import OurTrainStep, peer_train_runs
from llama_jax.checkpoints import load_params, open_checkpoint
from llama_jax.training import LORA_FLOPS_FRACTION, LoraConfig

RANK = 16


log = logger("lora")


def run(args, limits: dict) -> dict:
    rounds = 2 if args.quick else 3
    dirs, config = smollm2(args.cache_dir)
    params = load_params(open_checkpoint(dirs["float32"]))
    shape = dict(batch=args.train_batch, seq_len=args.train_seq)
    log("compiling our full and LoRA steps")
    ours = {"ours full": OurTrainStep(params, config, dtype=jnp.float32, **shape),
            "ours LoRA": OurTrainStep(params, config, dtype=jnp.float32, lora=LoraConfig(RANK, 2.0 * RANK), **shape)}
    runs = interleave(ours, rounds)
    threads = os.cpu_count() or 1
    for name, rank in (("torch full", None), ("torch + PEFT LoRA", RANK)):
        log(f"{name}, in a child process")
        runs[name] = peer_train_runs(dtype="float32", steps=rounds, threads=threads, lora_rank=rank, **shape)
    flops = roofline.train_flops(config, args.train_batch, args.train_seq)
    rows = []
    for name, results in runs.items():
        step_s = best([r["step_s"] for r in results], higher_is_better=False)
        work = flops * (LORA_FLOPS_FRACTION if "LoRA" in name else 1.0)
        rows.append({"runner": name, "step_s": step_s, "tok_s": args.train_batch * args.train_seq / step_s,
                     "mfu": roofline.mfu(work, step_s, limits["peak"]["float32"]), "loss": results[0]["loss"],
                     "compile_s": getattr(ours.get(name), "compile_s", 0.0)})
        log(f"  {name}: {rows[-1]['tok_s']:.0f} tok/s")
    return {"lora_train": rows, "settings": {"rank": RANK, "batch": args.train_batch, "seq_len": args.train_seq,
                                             "rounds": rounds, "torch_threads": threads}}
