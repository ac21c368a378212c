"""python -m train CKPT_DIR --data TRAIN.jsonl --out RUN_DIR [options]: fine-tune a llama_jax checkpoint.

Running the same command again resumes from RUN_DIR's newest checkpoint. SIGINT/SIGTERM save one first.
The trained params land in RUN_DIR/final, a checkpoint that `python -m infer` and `convert export` read.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from llama_jax.chat import chat_template_for
from llama_jax.checkpoint import load_params, open_checkpoint, write_checkpoint
from llama_jax.data import Encoder, batches, batches_per_epoch, load_jsonl
from llama_jax.errors import InputError
from llama_jax.loss import next_token_loss
from llama_jax.flops import measured_peak_flops, training_flops_per_token
from llama_jax.model import param_shapes, param_shardings
from llama_jax.run_checkpoints import RunCheckpoints
from llama_jax.sharding import make_mesh, named_sharding, place
from llama_jax.training import (OptimizerConfig, abstract_state, init_state, learning_rate, make_optimizer,
                                train_step)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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
    length.add_argument("--steps", type=positive(int), help="total optimizer steps of the run")
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
    p.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--compute-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--save-every", type=positive(int), default=100)
    p.add_argument("--eval-every", type=positive(int), help="default: --save-every")
    p.add_argument("--keep", type=positive(int), default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pack", action="store_true", help="pack several examples into each sequence")
    p.add_argument("--too-long", choices=("truncate", "skip"), default="truncate",
                   help="what to do with examples longer than --seq-len")
    args = p.parse_args(argv)
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


class StopRequested:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (so a checkpoint can be saved)."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.signal = signum


def evaluate(eval_step, state, dataset, args, mesh) -> float:
    """Mean loss over the eval set, batch by batch (token-weighted)."""
    total, weight = 0.0, 0.0
    count = batches_per_epoch(dataset, batch_size=args.batch_size, grad_accum=1, seq_len=args.seq_len,
                              pack=args.pack)
    for _, batch in zip(range(count), batches(dataset, batch_size=args.batch_size, grad_accum=1,
                                                seq_len=args.seq_len, pack=args.pack, seed=args.seed)):
        loss_sum, w = eval_step(state.params, place_batch(batch, mesh))
        total, weight = total + float(loss_sum), weight + float(w)
    return total / max(weight, 1.0)


def place_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Global `[accum, batch, seq]` host arrays -> arrays sharded over the batch axis (each process its part)."""
    return {k: place(v, named_sharding(mesh, (None, "batch", "seq")[-v.ndim:], v.shape)) for k, v in batch.items()}


def save_final(run_dir: Path, checkpoint, params, dtype) -> Path:
    leaves = ((tuple(k.key for k in path), np.asarray(jax.device_get(leaf)))
              for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0])
    tokenizer = checkpoint.tokenizer_path.read_text() if checkpoint.tokenizer_path.exists() else None
    return write_checkpoint(run_dir / "final", checkpoint.config, leaves, dtype=dtype, source=f"train:{run_dir}",
                            tokenizer_json=tokenizer, chat_template=checkpoint.chat_template,
                            generation_config=checkpoint.generation_config, force=True)


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines past the checkpoint a run resumes from (they will be produced again)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= last_step]
        path.write_text("".join(line + "\n" for line in lines))


def run(args) -> int:
    checkpoint = open_checkpoint(args.checkpoint)
    config = checkpoint.config
    if not checkpoint.tokenizer_path.exists():
        raise InputError(checkpoint.directory, "checkpoint has no tokenizer.json; training needs one")
    tokenizer = Tokenizer.from_file(str(checkpoint.tokenizer_path))
    try:
        template = chat_template_for(tokenizer, checkpoint.chat_template)
    except ValueError:
        template = None
    bos = tokenizer.id_to_token(config.bos_token_id) if config.bos_token_id is not None else ""
    encoder = Encoder(tokenizer, template, bos_token=bos or "",
                      eos_id=checkpoint.stop_ids[0] if checkpoint.stop_ids else None)
    train_set = load_jsonl(args.data, encoder, args.seq_len, args.too_long)
    eval_set = load_jsonl(args.eval_data, encoder, args.seq_len, args.too_long) if args.eval_data else None
    per_epoch = batches_per_epoch(train_set, batch_size=args.batch_size, grad_accum=args.grad_accum,
                                  seq_len=args.seq_len, pack=args.pack)
    total_steps = args.steps or max(1, math.ceil((args.epochs or 1.0) * per_epoch))
    print(f"{len(train_set.examples)} examples ({train_set.truncated} truncated, {train_set.skipped} skipped), "
          f"{per_epoch} steps per epoch, {total_steps} steps", file=sys.stderr)

    mesh = make_mesh(args.mesh)
    param_dtype, compute_dtype = DTYPES[args.param_dtype], DTYPES[args.compute_dtype]
    opt_config = OptimizerConfig(total_steps=total_steps, lr=args.lr, warmup=args.warmup, schedule=args.schedule,
                                 weight_decay=args.weight_decay, clip=args.clip)
    optimizer, schedule = make_optimizer(opt_config), learning_rate(opt_config)
    run_dir = Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = RunCheckpoints(run_dir, args.keep)
    metrics_path = run_dir / "metrics.jsonl"

    with jax.set_mesh(mesh):
        if checkpoints.latest_step() is not None:
            shapes, shardings = param_shapes(config, param_dtype), param_shardings(config, mesh)
            abstract_params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                           shapes, shardings)
            state, progress = checkpoints.restore(abstract_state(abstract_params, optimizer))
            trim_metrics(metrics_path, int(state.step))
            print(f"resuming {run_dir} at step {int(state.step)}", file=sys.stderr)
        else:
            state = init_state(load_params(checkpoint, mesh=mesh, dtype=param_dtype), optimizer)
        start = int(state.step)

        step_fn = jax.jit(functools.partial(train_step, config=config, optimizer=optimizer, schedule=schedule,
                                            dtype=compute_dtype, remat=args.remat), donate_argnums=0)
        eval_step = jax.jit(lambda p, b: _eval_sums(p, b, config, compute_dtype))
        peak = measured_peak_flops(compute_dtype)
        flops_per_token = training_flops_per_token(config, args.seq_len)
        stop = StopRequested()
        data = batches(train_set, batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len,
                       pack=args.pack, seed=args.seed, start=start)
        eval_every = args.eval_every or args.save_every
        bar = tqdm(total=total_steps, initial=start, desc="train", disable=not sys.stdout.isatty())
        with bar, metrics_path.open("a") as metrics_file:
            for step in range(start, total_steps):
                batch = next(data)
                began = time.perf_counter()
                new_state, metrics = step_fn(state, place_batch(batch, mesh))
                loss = float(metrics["loss"])
                if not math.isfinite(loss):
                    print(f"error: loss became {loss} at step {step + 1}; stopping. The last good checkpoint "
                          f"(step {checkpoints.latest_step()}) is intact in {run_dir / 'checkpoints'}",
                          file=sys.stderr)
                    return 1
                state = new_state
                seconds = time.perf_counter() - began
                tokens = float((batch["segment_ids"] > 0).sum())
                record = {"step": step + 1, "loss": loss, "lr": float(metrics["lr"]),
                          "grad_norm": float(metrics["grad_norm"]), "tokens_per_s": tokens / seconds,
                          "mfu": flops_per_token * tokens / seconds / peak}
                if eval_set is not None and ((step + 1) % eval_every == 0 or step + 1 == total_steps):
                    record["eval_loss"] = evaluate(eval_step, state, eval_set, args, mesh)
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}")
                done = step + 1 == total_steps
                if (step + 1) % args.save_every == 0 or done or stop.signal is not None:
                    checkpoints.save(step + 1, state, {"step": step + 1, "batches_consumed": step + 1,
                                                       "seed": args.seed})
                if stop.signal is not None and not done:
                    print(f"stopped by signal {stop.signal} at step {step + 1}; checkpoint saved, run the same "
                          "command to resume", file=sys.stderr)
                    return 128 + stop.signal
        checkpoints.close()
        final = save_final(run_dir, checkpoint, state.params, checkpoint.dtype)
    print(f"wrote {final}")
    return 0


def _eval_sums(params, batch, config, dtype):
    squeeze = {k: v[0] for k, v in batch.items()}
    _, aux = next_token_loss(params, squeeze, config, dtype=dtype)
    return aux["loss_sum"], aux["weight"]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
