"""python -m train CKPT_DIR --data TRAIN.jsonl --out RUN_DIR [options]: fine-tune a llama_jax checkpoint.

`--steps` is the run's total number of optimizer steps. Running the same command again resumes from RUN_DIR's
newest checkpoint (params, optimizer state, step, data position) and gives the same losses as a run never
stopped. SIGINT/SIGTERM finish the current step, save a checkpoint and exit (a second signal exits at once).
RUN_DIR/metrics.jsonl gets a line per step; RUN_DIR/final is a checkpoint that `python -m infer` and
`python -m convert export` read.

LoRA (`--lora-rank R`): the base weights are frozen (in --compute-dtype, or int8 with `--quantize int8`: QLoRA) and
only the adapters (alpha / R scaled, on --lora-targets) get gradients and optimizer state. RUN_DIR/final is then a
PEFT adapter directory (adapter_config.json, adapter_model.safetensors) that `peft.PeftModel.from_pretrained` loads
on the HF export of CKPT_DIR, and `python -m infer CKPT_DIR --adapter RUN_DIR/final` runs.

A non-finite loss stops the run and leaves the last good checkpoint newest. Each step's metrics are read while
the next step runs (train/records.py), so the device does not wait for the host between steps.
Setting JAX_COMPILATION_CACHE_DIR lets a resumed run reuse the compiled step.

Multi-host: run the same command on every host, adding `--coordinator HOST:PORT --num-processes N
--process-id I` (HOST: process 0's machine, PORT: a free port there), or only `--coordinator auto` where
jax.distributed reads the cluster's environment (Cloud TPU, SLURM, Open MPI). RUN_DIR must be a directory all
hosts share. Each process feeds its own devices' share of every batch; process 0 writes metrics and final.
Two processes on one machine, 4 CPU devices each:

    export JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4
    python -m train CKPT --data d.jsonl --out RUN --coordinator 127.0.0.1:7777 --num-processes 2 --process-id 0 &
    python -m train CKPT --data d.jsonl --out RUN --coordinator 127.0.0.1:7777 --num-processes 2 --process-id 1
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import signal
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from llama_jax.checkpoints import load_params, open_checkpoint
from llama_jax.errors import InputError, exit_code
from llama_jax.model import (ATTENTION_IMPLS, COMPUTE_DTYPES, LORA_TARGETS, check_attention, make_mesh,
                             measured_peak_flops, named_sharding, narrow_weight_options, place,
                             training_flops_per_token)
from llama_jax.text import encoder_for
from llama_jax.training import (LORA_FLOPS_FRACTION, OptimizerConfig, RunCheckpoints, attach_adapters, batches,
                                batches_per_epoch, eval_batches, learning_rate, load_jsonl, make_optimizer,
                                next_token_loss, train_step)
from train.records import NonFiniteLoss, StepRecords
from train.state import initial_state, lora_config, save_final


def positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT_DIR")
    p.add_argument("--data", required=True, metavar="TRAIN.jsonl")
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    p.add_argument("--eval-data", metavar="EVAL.jsonl")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive(int), help="total optimizer steps of the run, resumed or not")
    length.add_argument("--epochs", type=positive(float), help="passes over the data (default 1)")
    p.add_argument("--batch-size", type=positive(int), default=8)
    p.add_argument("--seq-len", type=positive(int), default=512)
    p.add_argument("--grad-accum", type=positive(int), default=1)
    p.add_argument("--lr", type=positive(float), default=2e-5)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--schedule", choices=("cosine", "linear", "constant"), default="cosine")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=positive(float), default=1.0)
    p.add_argument("--remat", choices=("none", "full", "dots"), default="none")
    p.add_argument("--mesh", default="fsdp=-1", help="e.g. data=2,fsdp=-1,tensor=2 (-1: remaining devices)")
    p.add_argument("--param-dtype", choices=COMPUTE_DTYPES, default="float32")
    p.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default="bfloat16")
    p.add_argument("--attention", choices=ATTENTION_IMPLS, default="xla",
                   help="cudnn: cuDNN flash attention (a GPU and --compute-dtype bfloat16)")
    p.add_argument("--save-every", type=positive(int), default=100)
    p.add_argument("--eval-every", type=positive(int), help="default: --save-every")
    p.add_argument("--keep", type=positive(int), default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pack", action="store_true", help="pack several examples into each sequence")
    p.add_argument("--too-long", choices=("truncate", "skip"), default="truncate",
                   help="what to do with examples longer than --seq-len")
    lora = p.add_argument_group("LoRA (frozen base, trainable low-rank adapters)")
    lora.add_argument("--lora-rank", type=int, metavar="R", help="train LoRA adapters of rank R instead of the model")
    lora.add_argument("--lora-alpha", type=positive(float), metavar="A", help="scale = A / R (default: A = 2 R)")
    lora.add_argument("--lora-targets", default=",".join(LORA_TARGETS), metavar="LIST",
                      help=f"projections that get adapters (default: {','.join(LORA_TARGETS)})")
    lora.add_argument("--lora-dropout", type=float, default=0.0, metavar="P",
                      help="dropout of the adapters' inputs in training (PEFT's lora_dropout)")
    lora.add_argument("--quantize", metavar="int8", help="QLoRA: the frozen base in int8 (one scale per channel)")
    p.add_argument("--peak-tflops", type=positive(float),
                   help="one device's peak TFLOP/s, for MFU (default: measured with a matmul at start)")
    hosts = p.add_argument_group("multi-host (jax.distributed.initialize)")
    hosts.add_argument("--coordinator", metavar="HOST:PORT",
                       help="process 0's address, or 'auto' to read the cluster's environment")
    hosts.add_argument("--num-processes", type=positive(int))
    hosts.add_argument("--process-id", type=int)
    args = p.parse_args(argv)
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.coordinator is None and (args.num_processes is not None or args.process_id is not None):
        p.error("--num-processes and --process-id need --coordinator")
    if args.lora_rank is None and (args.quantize is not None or args.lora_alpha is not None or args.lora_dropout):
        p.error("--quantize, --lora-alpha and --lora-dropout need --lora-rank")
    return args


def start_distributed(args) -> None:
    """Join the multi-host job, before anything else touches JAX's backends."""
    if args.coordinator == "auto":
        jax.distributed.initialize()
    elif args.coordinator:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)


def say(message: str) -> None:
    """A status line on stderr, from process 0 only."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr)


class StopRequested:
    """While active, the first SIGINT/SIGTERM only sets `signal` (the loop saves and stops); a second acts as usual."""

    def __enter__(self):
        self.signal = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, _frame):
        self.signal = signum
        self._restore()

    def _restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __exit__(self, *_):
        self._restore()


def on_any_process(flag: bool) -> bool:
    """Whether `flag` is set on some process; the same answer everywhere, so all processes save and stop together."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.process_allgather(np.asarray(flag)).any())


def place_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Global host arrays (`[accum, batch, seq]` or `[batch, seq]`) -> arrays sharded over the batch axis."""
    return {k: place(v, named_sharding(mesh, (None, "batch", "seq")[-v.ndim:], v.shape)) for k, v in batch.items()}


def eval_sums(params, batch, *, config, dtype, attention) -> tuple[jax.Array, jax.Array]:
    """(summed loss, number of targets) of a batch `[batch, seq]`."""
    _, aux = next_token_loss(params, batch, config, dtype=dtype, attention=attention)
    return aux["loss_sum"], aux["weight"]


def evaluate(eval_step, params, dataset, args, mesh) -> float:
    """Mean loss over every eval example (token-weighted)."""
    total, weight = 0.0, 0.0
    for batch in eval_batches(dataset, batch_size=args.batch_size, seq_len=args.seq_len, pack=args.pack):
        loss_sum, w = eval_step(params, place_batch(batch, mesh))
        total, weight = total + float(loss_sum), weight + float(w)
    return total / max(weight, 1.0)


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines past the checkpoint a run resumes from (they will be produced again)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= last_step]
        path.write_text("".join(line + "\n" for line in lines))


def run(args) -> int:
    try:
        check_attention(args.attention, args.compute_dtype, jax.default_backend())
    except ValueError as e:
        raise InputError("--attention", str(e)) from None
    checkpoint = open_checkpoint(args.checkpoint)
    config = checkpoint.config
    lora = lora_config(args)
    encoder = encoder_for(checkpoint)
    train_set = load_jsonl(args.data, encoder, args.seq_len, args.too_long)
    eval_set = load_jsonl(args.eval_data, encoder, args.seq_len, args.too_long) if args.eval_data else None
    per_epoch = batches_per_epoch(train_set, batch_size=args.batch_size, grad_accum=args.grad_accum,
                                  seq_len=args.seq_len, pack=args.pack)
    total_steps = args.steps or max(1, math.ceil((args.epochs or 1.0) * per_epoch))
    try:
        mesh = make_mesh(args.mesh)
    except ValueError as e:
        raise InputError("--mesh", str(e)) from None
    say(f"{len(train_set.examples)} examples ({train_set.truncated} truncated, {train_set.skipped} skipped), "
        f"{per_epoch} steps per epoch, {total_steps} steps, {jax.device_count()} devices")

    param_dtype, compute_dtype = jnp.dtype(args.param_dtype), jnp.dtype(args.compute_dtype)
    opt_config = OptimizerConfig(total_steps=total_steps, lr=args.lr, warmup=args.warmup, schedule=args.schedule,
                                 weight_decay=args.weight_decay, clip=args.clip)
    optimizer, schedule = make_optimizer(opt_config), learning_rate(opt_config)
    run_dir = Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    primary = jax.process_index() == 0
    metrics_path = run_dir / "metrics.jsonl"
    checkpoints = RunCheckpoints(run_dir, args.keep)
    try:
        with jax.set_mesh(mesh):
            state, consumed = initial_state(checkpoints, checkpoint, mesh, optimizer, param_dtype, lora, args.seed)
            # A LoRA base is read per layer (one copy of the weights; int8 quantized layer by layer).
            frozen = None if lora is None else load_params(checkpoint, mesh=mesh, dtype=compute_dtype,
                                                           quantize=args.quantize, per_layer=True)
            model_params = (lambda p: p) if lora is None else (lambda p: attach_adapters(frozen, p, lora.scale))
            start = int(state.step)
            if primary:
                trim_metrics(metrics_path, start)
            if start:
                say(f"resuming {run_dir} at step {start}")
            step_fn = jax.jit(functools.partial(train_step, config=config, optimizer=optimizer, schedule=schedule,
                                                dtype=compute_dtype, remat=args.remat, attention=args.attention,
                                                lora_scale=1.0 if lora is None else lora.scale, seed=args.seed,
                                                lora_dropout=0.0 if lora is None else lora.dropout),
                              donate_argnums=0, compiler_options={} if lora is None else narrow_weight_options(frozen))
            eval_step = jax.jit(functools.partial(eval_sums, config=config, dtype=compute_dtype,
                                                  attention=args.attention))
            peak = args.peak_tflops * 1e12 if args.peak_tflops else measured_peak_flops(compute_dtype)
            flops_per_token = training_flops_per_token(config, args.seq_len) * (1 if lora is None
                                                                                 else LORA_FLOPS_FRACTION)
            data = batches(train_set, batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len,
                           pack=args.pack, seed=args.seed, start=consumed)
            eval_every = args.eval_every or args.save_every
            bar = tqdm(total=total_steps, initial=start, desc="train", disable=not (primary and sys.stdout.isatty()))
            with StopRequested() as stop, bar, open(metrics_path if primary else os.devnull, "a") as metrics_file:
                records = StepRecords(metrics_file, bar, flops_per_token=flops_per_token,
                                      peak_flops=peak * jax.device_count())
                for step in range(start + 1, total_steps + 1):
                    batch = next(data)
                    state, metrics = step_fn(state, place_batch(batch, mesh), frozen)
                    records.add(step, metrics, float((batch["segment_ids"] > 0).sum()))
                    evaluating = eval_set is not None and (step % eval_every == 0 or step == total_steps)
                    stopping = on_any_process(stop.signal is not None) and step < total_steps
                    if evaluating or stopping or step % args.save_every == 0 or step == total_steps:
                        records.settle((lambda: evaluate(eval_step, model_params(state.params), eval_set, args,
                                                         mesh)) if evaluating else None)
                        checkpoints.save(step, state, {"step": step, "batches_consumed": step - start + consumed,
                                                       "seed": args.seed})
                        records.restart()
                    if stopping:
                        say(f"stopped by a signal at step {step}; checkpoint saved; run the same command to resume")
                        return 128 + (stop.signal or signal.SIGTERM)
            final = save_final(run_dir, checkpoint, state.params, lora)
    except NonFiniteLoss as e:
        say(f"error: {e}; stopping. The newest checkpoint, step {checkpoints.latest_step()}, in "
            f"{run_dir / 'checkpoints'} is the last good one")
        return 1
    finally:
        checkpoints.close()
    say(f"wrote {final}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    start_distributed(args)
    return exit_code(lambda: run(args),
                     interrupted="interrupted; the newest checkpoint in RUN_DIR/checkpoints is intact")


if __name__ == "__main__":
    sys.exit(main())
