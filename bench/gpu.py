"""The GPU suite (one H100/H200, under 10 minutes): `python -m bench --suite gpu [--out-dir DIR] [--quick]`.

  decode     Llama-3-8B shape, bfloat16 weights and KV cache, random normal(0.02) weights made on the device
             (`init_params`): Engine decode tokens/s at batch 1/8/64 (128-token prompts, --new-tokens each) and
             TTFT for 128- and 2048-token prompts, against the HBM roofline (bandwidth of a 4 GiB in-place device
             copy) and the bf16 peak (an 8192^3 matmul)
  training   Llama-3.2-1B and 3B full fine-tuning steps (float32 params and AdamW, bfloat16 compute) for each
             --remat policy: tokens/s and MFU; a policy that runs out of memory is reported as such
  attention  whether jax.nn.dot_product_attention(implementation="cudnn") runs here

`--dry-run` prints the plan with the byte and FLOP counts (no GPU needed).
"""

from __future__ import annotations

import gc
import sys
import time

import jax
import jax.numpy as jnp

from bench import roofline
from bench.common import GB, best, interleave, md_table
from bench.decode import OurGenerate
from bench.train import OurTrainStep
from llama_jax import init_params, preset

DECODE_MODEL = "llama3-8b"
BATCHES = (1, 8, 64)
PROMPT = 128
LONG_PROMPT = 2048
TRAIN = {"llama3.2-1b": (8, 2048), "llama3.2-3b": (2, 2048)}  # preset: (batch, seq_len); 3B fp32 AdamW needs ~80 GB


def log(message: str) -> None:
    print(f"[bench gpu {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def plan(args) -> str:
    """The suite's shapes and the bytes/FLOPs behind its roofline and MFU figures."""
    config = preset(DECODE_MODEL)
    context = roofline.decode_mean_context(PROMPT, args.new_tokens)
    rows = [[DECODE_MODEL, f"decode batch {b}",
             f"{roofline.decode_bytes_per_step(config, b, context, 'bfloat16') / GB:.2f} GB read/step",
             f"{roofline.decode_flops_per_step(config, b, context) / 1e9:.0f} GFLOP/step"] for b in BATCHES]
    rows += [[DECODE_MODEL, f"prefill 1 x {n}", "-", f"{roofline.prefill_flops(config, 1, n) / 1e12:.2f} TFLOP"]
             for n in (PROMPT, LONG_PROMPT)]
    for name, (batch, seq) in TRAIN.items():
        c = preset(name)
        params = roofline.matmul_params(c) + c.vocab_size * c.hidden_size * (not c.tie_word_embeddings)
        rows.append([name, f"train {batch} x {seq}, remat {args.remat}",
                     f"~{16 * params / GB:.0f} GB params+grads+Adam (fp32)",
                     f"{roofline.train_flops(c, batch, seq) / 1e12:.1f} TFLOP/step"])
    return md_table(["model", "run", "memory", "work"], rows)


def cudnn_attention() -> str:
    """'available' when jax.nn.dot_product_attention(implementation="cudnn") runs a causal bf16 call, else why not."""
    try:
        q = jnp.ones((1, 256, 8, 128), jnp.bfloat16)
        out = jax.nn.dot_product_attention(q, q, q, is_causal=True, implementation="cudnn")
        out.block_until_ready()
        return "available"
    except Exception as e:  # noqa: BLE001 - the reason is the result
        return f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:160]}"


def _decode_rows(args, limits, rounds) -> tuple[list[dict], list[dict]]:
    config = preset(DECODE_MODEL)
    dtype = jnp.bfloat16
    log(f"{DECODE_MODEL}: random bfloat16 weights on the device")
    params = init_params(config, jax.random.key(0), dtype=dtype)
    context = roofline.decode_mean_context(PROMPT, args.new_tokens)
    decode, prefill = [], []
    for batch in BATCHES:
        log(f"decode batch {batch}")
        ours = OurGenerate(params, config, dtype=dtype, batch=batch, prompt_len=PROMPT, new_tokens=args.new_tokens)
        runs = interleave({"ours": ours}, rounds)["ours"]
        row = {"model": DECODE_MODEL, "dtype": "bfloat16", "batch": batch, "new_tokens": args.new_tokens,
               "compile_s": ours.compile_s, "runs": runs,
               "ours_tok_s": best([r["decode_tok_s"] for r in runs]),
               "ours_ttft_s": best([r["ttft_s"] for r in runs], higher_is_better=False),
               "limit_tok_s": roofline.decode_limit(config, batch, context, dtype, limits["bandwidth"])}
        decode.append(row)
        if batch == 1:
            prefill.append(_prefill_row(config, PROMPT, row["ours_ttft_s"], ours.compile_s, limits))
        del ours
        gc.collect()
    log(f"TTFT, {LONG_PROMPT}-token prompt")
    ours = OurGenerate(params, config, dtype=dtype, batch=1, prompt_len=LONG_PROMPT, new_tokens=2)
    runs = interleave({"ours": ours}, rounds)["ours"]
    prefill.append(_prefill_row(config, LONG_PROMPT, best([r["ttft_s"] for r in runs], higher_is_better=False),
                                ours.compile_s, limits))
    del ours, params
    gc.collect()
    return decode, prefill


def _prefill_row(config, prompt_len, ttft, compile_s, limits) -> dict:
    flops = roofline.prefill_flops(config, 1, prompt_len)
    return {"dtype": "bfloat16", "batch": 1, "prompt_len": prompt_len, "compile_s": compile_s, "flops": flops,
            "ours_ttft_s": ttft, "ours_prefill_tok_s": prompt_len / ttft,
            "ours_mfu": roofline.mfu(flops, ttft, limits["peak"]["bfloat16"])}


def _train_rows(args, limits, steps) -> list[dict]:
    rows = []
    policies = ["full"] if args.quick else [p.strip() for p in args.remat.split(",") if p.strip()]
    for name, (batch, seq) in TRAIN.items():
        config = preset(name)
        flops = roofline.train_flops(config, batch, seq)
        for remat in policies:
            log(f"{name} training step, remat {remat}, {batch} x {seq}")
            row = {"model": name, "dtype": "bfloat16", "batch": batch, "seq_len": seq, "remat": remat, "flops": flops}
            try:
                params = init_params(config, jax.random.key(1), dtype=jnp.float32)
                ours = OurTrainStep(params, config, dtype=jnp.bfloat16, batch=batch, seq_len=seq, remat=remat,
                                    copy_params=False)
                del params
                runs = interleave({"ours": ours}, steps)["ours"]
                step_s = best([r["step_s"] for r in runs], higher_is_better=False)
                row.update(compile_s=ours.compile_s, runs=runs, ours_step_s=step_s, ours_tok_s=batch * seq / step_s,
                           ours_mfu=roofline.mfu(flops, step_s, limits["peak"]["bfloat16"]), ours_loss=runs[0]["loss"])
                del ours
            except Exception as e:  # noqa: BLE001 - out of memory and the like: record and go on
                message = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
                row["error"] = "out of memory" if "RESOURCE_EXHAUSTED" in str(e) or "memory" in str(e).lower() \
                    else f"{type(e).__name__}: {message}"
                log(f"  failed: {row['error']}")
            rows.append(row)
            gc.collect()
    return rows


def require_gpu() -> None:
    if jax.default_backend() != "gpu":
        raise SystemExit(f"the gpu suite needs a GPU; jax's default backend here is {jax.default_backend()!r} "
                         "(use --dry-run for the plan)")


def run(args, limits: dict) -> dict:
    require_gpu()
    rounds = 2 if args.quick else 3
    out = {"attention": cudnn_attention()}
    log(f"cuDNN attention: {out['attention']}")
    out["decode"], out["prefill"] = _decode_rows(args, limits, rounds)
    out["train"] = _train_rows(args, limits, steps=2 if args.quick else 3)
    out["notes"] = [f"jax.nn.dot_product_attention(implementation=\"cudnn\"): {out['attention']}",
                    (f"decode: {DECODE_MODEL} shape with random weights, {PROMPT}-token prompts, "
                    f"{args.new_tokens} new tokens per row, best of {rounds} runs; training: float32 params and "
                    "AdamW, bfloat16 compute, MFU against the measured bf16 peak")]
    return out
