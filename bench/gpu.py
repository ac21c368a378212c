"""The GPU suite (one H100/H200, under 10 minutes): `python -m bench --suite gpu [--out-dir DIR] [--quick]`.

  decode     Llama-3-8B shape, bfloat16 weights and KV cache, random normal(0.02) weights made on the device
             (`init_params`): Engine decode tokens/s at batch 1/8/64 (128-token prompts, --new-tokens each), then
             the same with those weights quantized to int8 (`quantize_tree`, bfloat16 compute and cache), and
             TTFT for 128- and 2048-token prompts with attention "xla" and "cudnn", against the HBM roofline
             (bandwidth of a 4 GiB in-place device copy) and the bf16 peak (an 8192^3 matmul)
  training   Llama-3.2-1B and 3B full fine-tuning steps (float32 params and AdamW, bfloat16 compute) for each
             --remat policy with attention "xla", then with "cudnn" under the faster policy: tokens/s and MFU; a
             step that runs out of memory is reported as such; then a Llama-3-8B LoRA step (rank 16, frozen
             bfloat16 base, 1 x 2048, remat full; MFU counts 4/6 of a full step's FLOPs)
  attention  whether jax.nn.dot_product_attention(implementation="cudnn") runs here, and how far the 8B model's
             logits with attention "cudnn" are from those with "xla" (KL divergence, max abs difference)

The measurements after the decode runs are skipped (and reported so) once --time-budget seconds have passed
since the suite started, and results.partial.json in the output directory holds what was measured so far, so a
run cut off by the device's 10-minute limit still leaves its numbers.

`--dry-run` prints the plan with the byte and FLOP counts (no GPU needed).
"""

from __future__ import annotations

import functools
import gc
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from bench import roofline
from bench.common import GB, best, interleave, md_table
from bench.decode import OurGenerate, random_prompts
from bench.train import OurTrainStep
from llama_jax import forward, init_params, preset
from llama_jax.model import param_logical_names, quantize_tree
from llama_jax.training import LORA_FLOPS_FRACTION, LoraConfig

DECODE_MODEL = "llama3-8b"
BATCHES = (1, 8, 64)
PROMPT = 128
LONG_PROMPT = 2048
CHECK_PROMPT = 512  # tokens of the cudnn-against-xla logits check
TRAIN = {"llama3.2-1b": (8, 2048), "llama3.2-3b": (2, 2048)}  # preset: (batch, seq_len); 3B fp32 AdamW needs ~80 GB
LORA_TRAIN = ("llama3-8b", 1, 2048, LoraConfig(16, 32.0))  # a LoRA step on the seed's model: frozen bfloat16 base


def log(message: str) -> None:
    print(f"[bench gpu {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def plan(args) -> str:
    """The suite's shapes and the bytes/FLOPs behind its roofline and MFU figures."""
    config = preset(DECODE_MODEL)
    context = roofline.decode_mean_context(PROMPT, args.new_tokens)
    rows = [[DECODE_MODEL, f"decode batch {b}",
             f"{roofline.decode_bytes_per_step(config, b, context, 'bfloat16') / GB:.2f} GB read/step",
             f"{roofline.decode_flops_per_step(config, b, context) / 1e9:.0f} GFLOP/step"] for b in BATCHES]
    rows += [[DECODE_MODEL, f"decode batch {b}, int8 weights",
              f"{roofline.decode_bytes_per_step(config, b, context, 'int8', 'bfloat16') / GB:.2f} GB read/step",
              f"{roofline.decode_flops_per_step(config, b, context) / 1e9:.0f} GFLOP/step"] for b in BATCHES]
    rows += [[DECODE_MODEL, f"prefill 1 x {n}, attention xla and cudnn", "-",
              f"{roofline.prefill_flops(config, 1, n) / 1e12:.2f} TFLOP"] for n in (PROMPT, LONG_PROMPT)]
    for name, (batch, seq) in TRAIN.items():
        c = preset(name)
        params = roofline.matmul_params(c) + c.vocab_size * c.hidden_size * (not c.tie_word_embeddings)
        rows.append([name, f"train {batch} x {seq}, remat {args.remat} (xla), then cudnn",
                     f"~{16 * params / GB:.0f} GB params+grads+Adam (fp32)",
                     f"{roofline.train_flops(c, batch, seq) / 1e12:.1f} TFLOP/step"])
    name, batch, seq, lora = LORA_TRAIN
    rows.append([name, f"LoRA r{lora.rank} train {batch} x {seq}, remat full (xla)", "~16 GB bfloat16 base",
                 f"{roofline.train_flops(preset(name), batch, seq) * LORA_FLOPS_FRACTION / 1e12:.1f} TFLOP/step"])
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


def attention_agreement(params, config) -> dict:
    """Logits of one CHECK_PROMPT-token prompt with attention "cudnn" against "xla" (bfloat16 compute):
    KL(xla || cudnn) per position (mean, max) and the max abs logit difference."""
    tokens = jnp.asarray(random_prompts(config.vocab_size, 1, CHECK_PROMPT, seed=3))
    run = jax.jit(forward, static_argnames=("config", "dtype", "attention"))
    xla, cudnn = (run(params, tokens, config, dtype=jnp.bfloat16, attention=a)[0][0] for a in ("xla", "cudnn"))
    log_p, log_q = jax.nn.log_softmax(xla), jax.nn.log_softmax(cudnn)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return {"prompt_len": CHECK_PROMPT, "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "max_abs_logit_diff": float(jnp.abs(xla - cudnn).max()), "finite": bool(jnp.isfinite(cudnn).all())}


def _out_of_time(deadline: float) -> bool:
    if time.perf_counter() < deadline:
        return False
    log("  skipped: the time budget is spent")
    return True


SKIPPED = "skipped: --time-budget spent"


def _decode_rows(args, limits, rounds, impls, deadline) -> tuple[list[dict], list[dict], dict | None]:
    config = preset(DECODE_MODEL)
    dtype = jnp.bfloat16
    log(f"{DECODE_MODEL}: random bfloat16 weights on the device")
    params = init_params(config, jax.random.key(0), dtype=dtype)
    context = roofline.decode_mean_context(PROMPT, args.new_tokens)
    decode, prefill = [], []
    quantized = None
    for weights in ("bfloat16", "int8"):
        if weights == "int8":
            if _out_of_time(deadline):
                break
            log(f"{DECODE_MODEL}: the same weights quantized to int8 on the device")
            quantized = jax.jit(functools.partial(quantize_tree, logical_names=param_logical_names(config)))(params)
        for batch in BATCHES:
            log(f"decode batch {batch}, {weights} weights")
            ours = OurGenerate(quantized if weights == "int8" else params, config, dtype=dtype, batch=batch,
                               prompt_len=PROMPT, new_tokens=args.new_tokens)
            runs = interleave({"ours": ours}, rounds)["ours"]
            row = {"model": DECODE_MODEL, "dtype": "bfloat16" if weights == "bfloat16" else "int8 weights",
                   "batch": batch, "new_tokens": args.new_tokens, "compile_s": ours.compile_s, "runs": runs,
                   "ours_tok_s": best([r["decode_tok_s"] for r in runs]),
                   "ours_ttft_s": best([r["ttft_s"] for r in runs], higher_is_better=False),
                   "limit_tok_s": roofline.decode_limit(config, batch, context, weights, limits["bandwidth"],
                                                        cache_dtype=dtype)}
            decode.append(row)
            if batch == 1 and weights == "bfloat16":
                prefill.append(_prefill_row(config, PROMPT, "xla", row["ours_ttft_s"], ours.compile_s, limits))
            del ours
            gc.collect()
    del quantized
    for prompt_len, attention in [(n, a) for n in (PROMPT, LONG_PROMPT) for a in impls]:
        if (prompt_len, attention) == (PROMPT, "xla"):
            continue  # measured with the batch-1 decode above
        log(f"TTFT, {prompt_len}-token prompt, attention {attention}")
        row = {"dtype": "bfloat16", "batch": 1, "prompt_len": prompt_len, "attention": attention}
        prefill.append(row)
        if _out_of_time(deadline):
            row["error"] = SKIPPED
            continue
        try:
            ours = OurGenerate(params, config, dtype=dtype, batch=1, prompt_len=prompt_len, new_tokens=2,
                               attention=attention)
            runs = interleave({"ours": ours}, rounds)["ours"]
            ttft = best([r["ttft_s"] for r in runs], higher_is_better=False)
            row.update(_prefill_row(config, prompt_len, attention, ttft, ours.compile_s, limits))
            del ours
        except Exception as e:  # noqa: BLE001 - out of memory, an unsupported shape: record and go on
            row["error"] = failure(e)
        gc.collect()
    agreement = None
    if "cudnn" in impls:
        log("attention cudnn against xla: logits of one prompt")
        if _out_of_time(deadline):
            agreement = {"error": SKIPPED}
        else:
            try:
                agreement = attention_agreement(params, config)
            except Exception as e:  # noqa: BLE001 - as above
                agreement = {"error": failure(e)}
    del params
    gc.collect()
    return decode, prefill, agreement


def _prefill_row(config, prompt_len, attention, ttft, compile_s, limits) -> dict:
    flops = roofline.prefill_flops(config, 1, prompt_len)
    return {"dtype": "bfloat16", "batch": 1, "prompt_len": prompt_len, "attention": attention,
            "compile_s": compile_s, "flops": flops,
            "ours_ttft_s": ttft, "ours_prefill_tok_s": prompt_len / ttft,
            "ours_mfu": roofline.mfu(flops, ttft, limits["peak"]["bfloat16"])}


def _train_rows(args, limits, steps, impls, deadline, save: Callable[[list[dict]], None]) -> list[dict]:
    rows = []
    policies = ["full"] if args.quick else [p.strip() for p in args.remat.split(",") if p.strip()]
    for name, (batch, seq) in TRAIN.items():
        config = preset(name)
        flops = roofline.train_flops(config, batch, seq)
        for remat, attention in [(r, "xla") for r in policies] + [(None, a) for a in impls if a != "xla"]:
            if remat is None:  # the other attention under the policy that was fastest with xla
                done = [r for r in rows if r["model"] == name and "ours_step_s" in r]
                if not done:
                    continue
                remat = min(done, key=lambda r: r["ours_step_s"])["remat"]
            log(f"{name} training step, remat {remat}, attention {attention}, {batch} x {seq}")
            row = {"model": name, "dtype": "bfloat16", "batch": batch, "seq_len": seq, "remat": remat,
                   "attention": attention, "flops": flops}
            rows.append(row)
            if _out_of_time(deadline):
                row["error"] = SKIPPED
                continue
            try:
                row.update(_time_train_step(config, batch, seq, remat, attention, steps))
                row.update(ours_tok_s=batch * seq / row["ours_step_s"],
                           ours_mfu=roofline.mfu(flops, row["ours_step_s"], limits["peak"]["bfloat16"]))
            except Exception as e:  # noqa: BLE001 - out of memory and the like: record and go on
                row["error"] = failure(e)
            save(rows)
            gc.collect()
    name, batch, seq, lora = LORA_TRAIN
    log(f"{name} LoRA rank {lora.rank} step, remat full, {batch} x {seq}")
    flops = roofline.train_flops(preset(name), batch, seq) * LORA_FLOPS_FRACTION
    row = {"model": f"{name} LoRA r{lora.rank}", "dtype": "bfloat16", "batch": batch, "seq_len": seq, "remat": "full",
           "attention": "xla", "flops": flops}
    rows.append(row)
    if _out_of_time(deadline):
        row["error"] = SKIPPED
        return rows
    try:
        row.update(_time_train_step(preset(name), batch, seq, "full", "xla", steps, lora=lora))
        row.update(ours_tok_s=batch * seq / row["ours_step_s"],
                   ours_mfu=roofline.mfu(flops, row["ours_step_s"], limits["peak"]["bfloat16"]))
    except Exception as e:  # noqa: BLE001 - as above
        row["error"] = failure(e)
    save(rows)
    return rows


def _time_train_step(config, batch: int, seq: int, remat: str, attention: str, steps: int,
                     lora: LoraConfig | None = None) -> dict:
    """One OurTrainStep on fresh random params (float32; bfloat16 for a LoRA base), timed `steps` times. A
    function of its own, so that the model and optimizer state are freed when it returns or raises (before the
    next run allocates its own)."""
    ours = OurTrainStep.fresh(config, batch=batch, seq_len=seq, remat=remat, attention=attention, lora=lora)
    runs = interleave({"ours": ours}, steps)["ours"]
    return {"compile_s": ours.compile_s, "runs": runs, "ours_loss": runs[0]["loss"],
            "ours_step_s": best([r["step_s"] for r in runs], higher_is_better=False)}


def failure(e: Exception) -> str:
    """A failed measurement's one-line reason ("out of memory" or the exception's first line), also logged."""
    message = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
    reason = "out of memory" if "RESOURCE_EXHAUSTED" in str(e) or "memory" in str(e).lower() \
        else f"{type(e).__name__}: {message}"
    log(f"  failed: {reason}")
    return reason


def require_gpu() -> None:
    if jax.default_backend() != "gpu":
        raise SystemExit(f"the gpu suite needs a GPU; jax's default backend here is {jax.default_backend()!r} "
                         "(use --dry-run for the plan)")


def run(args, limits: dict, started: float, save: Callable[[dict], None]) -> dict:
    """The suite; `started`: its time.perf_counter() start (for --time-budget); `save(out)` keeps partial results."""
    require_gpu()
    deadline = started + args.time_budget
    rounds = 2 if args.quick else 3
    out = {"attention": cudnn_attention()}
    log(f"cuDNN attention: {out['attention']}")
    impls = ("xla", "cudnn") if out["attention"] == "available" else ("xla",)
    out["decode"], out["prefill"], agreement = _decode_rows(args, limits, rounds, impls, deadline)
    save(out)
    out["train"] = _train_rows(args, limits, 2 if args.quick else 3, impls, deadline,
                               lambda rows: save({**out, "train": rows}))
    out["notes"] = [f"jax.nn.dot_product_attention(implementation=\"cudnn\"): {out['attention']}",
                    (f"decode: {DECODE_MODEL} shape with random weights, {PROMPT}-token prompts, "
                    f"{args.new_tokens} new tokens per row, best of {rounds} runs; training: float32 params and "
                    "AdamW, bfloat16 compute, MFU against the measured bf16 peak")]
    if agreement is not None and "error" in agreement:
        out["notes"].append(f"{DECODE_MODEL} logits, attention cudnn against xla: not measured ({agreement['error']})")
    elif agreement is not None:
        out["attention_agreement"] = agreement
        out["notes"].append(f"{DECODE_MODEL} logits, attention cudnn against xla ({CHECK_PROMPT}-token prompt, "
                            f"bfloat16): KL mean {agreement['kl_mean']:.2g}, max {agreement['kl_max']:.2g}; max abs "
                            f"logit difference {agreement['max_abs_logit_diff']:.2g}; finite: {agreement['finite']}")
    out["notes"] += attention_speedups(out["prefill"], out["train"])
    return out


def attention_speedups(prefill: list[dict], train: list[dict]) -> list[str]:
    """One line per prefill length and per training model: cudnn's time against xla's (same shapes and remat)."""
    lines = []
    for n in sorted({r["prompt_len"] for r in prefill}):
        by = {r["attention"]: r["ours_ttft_s"] for r in prefill if r["prompt_len"] == n and "ours_ttft_s" in r}
        if {"xla", "cudnn"} <= by.keys():
            lines.append(f"prefill 1 x {n}: attention cudnn {by['xla'] / by['cudnn']:.2f}x the speed of xla")
    for r in (r for r in train if r["attention"] == "cudnn" and "ours_step_s" in r):
        xla = [x for x in train if x["model"] == r["model"] and x["remat"] == r["remat"] and x["attention"] == "xla"]
        if xla and "ours_step_s" in xla[0]:
            lines.append(f"training {r['model']} (remat {r['remat']}): attention cudnn "
                         f"{xla[0]['ours_step_s'] / r['ours_step_s']:.2f}x the speed of xla")
    return lines
