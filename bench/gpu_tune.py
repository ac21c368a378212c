"""The GPU tuning suite: `python -m bench --suite gpu-tune [--out-dir DIR] [--time-budget S] [--dry-run]`.

Each candidate runs in a child process of its own (`python -m bench.gpu_tune CASE_JSON`), with its XLA flag set in
XLA_FLAGS (XLA reads them once, when it starts), and prints one JSON line; the parent never starts jax on the GPU.

  limits   the HBM bandwidth (a 4 GiB in-place copy) and the bf16 peak (an 8192^3 matmul): the rooflines below
  proj     the matmuls of Llama-3-8B's 32 decoder layers (q, k, v, o, gate, up, down; no attention) at batch 1 and 8,
           as one scan over stacked weights: bfloat16 weights, and int8 weights in three formulations (`project`'s
           convert inside the dot; multiply + reduce; a mixed bf16 x int8 `dot_general`), under each flag set: time
           against the bytes of the weights at the measured bandwidth, and int8 against bf16
  decode   the Llama-3-8B Engine decode at batch 64 (bfloat16, random weights made on the device) per flag set:
           tokens/s against the HBM roofline
  prefill  time to first token of a 2,048-token prompt under the flag sets (MFU must stay >= 76%)
  train    a Llama-3.2-1B full fine-tuning step (float32 params and AdamW, bfloat16 compute): remat policies, batch
           sizes, the vocabulary-chunked loss against the whole-vocabulary one (vocab_chunk = vocab), flag sets: MFU

The cases run in this order (the int8 and decode targets first, then training, then the TTFT check) until
--time-budget seconds have passed (the rest are reported as skipped); results.json
and results.md go to --out-dir (default $OUT or ./bench_results) after every case. `--dry-run` runs every case the
same way at tiny shapes on whatever backend is here (a CPU does): the code paths and each flag set are exercised,
the numbers mean nothing. Importing jax here starts no backend: only the children touch a device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from bench.common import md_table, timed
from llama_jax.model import QuantArray, project

FLAG_SETS = {
    "default": "",
    "triton-gemm": "--xla_gpu_enable_triton_gemm=true --xla_gpu_triton_gemm_any=true",
    "no-remat-pass": "--xla_disable_hlo_passes=rematerialization",
    "latency-hiding": "--xla_gpu_enable_latency_hiding_scheduler=true",
}
PROJ_BATCHES = (1, 8)
CASES = [{"kind": "limits", "flags": "default"}]
CASES += [{"kind": "proj", "weights": w, "flags": f} for w, f in (
    ("bfloat16", "default"), ("int8:convert-dot", "default"), ("int8:convert-dot", "triton-gemm"),
    ("int8:mul-reduce", "default"), ("int8:mixed-dot", "default"), ("int8:mixed-dot", "triton-gemm"))]
CASES += [{"kind": "decode", "flags": f} for f in ("default", "triton-gemm", "latency-hiding")]
CASES += [{"kind": "train", "remat": r, "batch": b, "vocab_chunk": v, "flags": f} for r, b, v, f in (
    ("dots", 8, "chunked", "default"), ("dots", 8, "whole", "default"), ("dots", 8, "chunked", "no-remat-pass"),
    ("full", 8, "chunked", "default"), ("dots", 8, "chunked", "latency-hiding"), ("dots", 4, "chunked", "default"))]
CASES += [{"kind": "prefill", "flags": f} for f in ("default", "triton-gemm")]
SHAPES = {False: {"decode_model": "llama3-8b", "train_model": "llama3.2-1b", "seq": 2048, "prompt": 128,
                  "long_prompt": 2048, "new_tokens": 64, "decode_batch": 64, "copy_bytes": 4 << 30, "peak": 8192},
          True: {"decode_model": "tiny", "train_model": "tiny", "seq": 64, "prompt": 16, "long_prompt": 64,
                 "new_tokens": 4, "decode_batch": 4, "copy_bytes": 1 << 20, "peak": 256}}


def label(case: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in case.items() if k != "kind")


# -- in the child ---------------------------------------------------------------------------------------------------

def int8_matmul(formulation: str, x: jax.Array, w: QuantArray) -> jax.Array:
    """x `[batch, in]` (bfloat16) @ int8 w `[in, out]` -> `[batch, out]` in x's dtype, formulated as:
    convert-dot (`project`: the int8 values converted inside the dot), mul-reduce (a broadcast multiply and a
    float32 sum over `in`: a GEMV that XLA fuses as a reduction), or mixed-dot (one `dot_general` of bfloat16 x int8
    operands)."""
    if formulation == "convert-dot":
        return project("bi,io->bo", x, w)
    if formulation == "mul-reduce":
        product = x[:, :, None] * w.values.astype(x.dtype)
        return (jnp.sum(product, axis=1, dtype=jnp.float32) * w.output_scale).astype(x.dtype)
    if formulation == "mixed-dot":
        out = jax.lax.dot_general(x, w.values, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return (out * w.output_scale).astype(x.dtype)
    raise ValueError(f"unknown int8 formulation {formulation!r}")


def proj_case(case: dict, config, rounds: int = 5) -> dict:
    """Seconds per pass over the 32 layers' matmuls at each of PROJ_BATCHES, best of `rounds`."""
    weights, _, formulation = case["weights"].partition(":")
    e, m, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    shapes = {"q": (e, q), "k": (e, kv), "v": (e, kv), "o": (q, e), "gate": (e, m), "up": (e, m), "down": (m, e)}
    keys = dict(zip(shapes, jax.random.split(jax.random.key(0), len(shapes)), strict=True))

    def make(name, shape):
        if weights == "bfloat16":
            return (jax.random.normal(keys[name], (layers, *shape), jnp.bfloat16) * 0.02).astype(jnp.bfloat16)
        values = jax.random.randint(keys[name], (layers, *shape), -127, 128, jnp.int8)
        return QuantArray(values, jnp.full((layers, 1, shape[1]), 0.02 / 127, jnp.float32))

    stack = {name: jax.jit(make, static_argnums=(0, 1))(name, shape) for name, shape in shapes.items()}

    def mm(x, w):
        return int8_matmul(formulation, x, w) if isinstance(w, QuantArray) else project("bi,io->bo", x, w)

    def layer(h, w):  # h [batch, embed]: every matmul of a decoder layer, in the order the model runs them
        o = mm(mm(h, w["q"]), w["o"])
        d = mm(jax.nn.silu(mm(h, w["gate"])) * mm(h, w["up"]), w["down"])
        return h + o + d, (mm(h, w["k"]), mm(h, w["v"]))

    run = jax.jit(lambda x, stack: jax.lax.scan(layer, x, stack))
    out = {}
    for batch in PROJ_BATCHES:
        x = jnp.full((batch, e), 0.01, jnp.bfloat16)
        jax.block_until_ready(run(x, stack))  # compiles
        out[f"batch {batch}"] = min(timed(lambda: jax.block_until_ready(run(x, stack))) for _ in range(rounds))
    return {"seconds": out}


def run_case(case: dict, tiny: bool) -> dict:
    """One case, here (the child); returns its measurements."""
    from bench import machine
    from bench.decode import OurGenerate
    from bench.train import OurTrainStep
    from llama_jax import init_params, preset
    from llama_jax.training import VOCAB_CHUNK

    shapes = SHAPES[tiny]
    if case["kind"] == "limits":
        limits = machine.limits(nbytes=shapes["copy_bytes"], repeats=5, peak_size=shapes["peak"], host=False)
        return {"bandwidth": limits["bandwidth"], "peak_bf16": limits["peak"]["bfloat16"],
                "backend": jax.default_backend(), "jax": jax.__version__}
    if case["kind"] == "proj":
        return proj_case(case, preset(shapes["decode_model"]))
    if case["kind"] in ("decode", "prefill"):
        config = preset(shapes["decode_model"])
        params = init_params(config, jax.random.key(0), dtype=jnp.bfloat16)
        decode = case["kind"] == "decode"
        ours = OurGenerate(params, config, dtype=jnp.bfloat16, batch=shapes["decode_batch"] if decode else 1,
                           prompt_len=shapes["prompt"] if decode else shapes["long_prompt"],
                           new_tokens=shapes["new_tokens"] if decode else 2)
        runs = [ours() for _ in range(3)]
        return {"decode_tok_s": max(r["decode_tok_s"] for r in runs), "ttft_s": min(r["ttft_s"] for r in runs),
                "compile_s": ours.compile_s}
    config = preset(shapes["train_model"])
    params = init_params(config, jax.random.key(1), dtype=jnp.float32)
    ours = OurTrainStep(params, config, dtype=jnp.bfloat16, batch=case["batch"], seq_len=shapes["seq"],
                        remat=case["remat"], copy_params=False,
                        vocab_chunk=config.vocab_size if case["vocab_chunk"] == "whole" else VOCAB_CHUNK)
    runs = [ours() for _ in range(3)]
    return {"step_s": min(r["step_s"] for r in runs), "loss": runs[0]["loss"], "compile_s": ours.compile_s}


# -- in the parent --------------------------------------------------------------------------------------------------

def child(case: dict, tiny: bool, timeout: float) -> dict:
    """`run_case` in a child process under the case's flag set; its result, or {"error": why}."""
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FLAG_SETS[case['flags']]}".strip(),
           "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"}
    try:
        done = subprocess.run([sys.executable, "-m", "bench.gpu_tune", json.dumps(case), *(["--tiny"] if tiny else [])],
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over the {timeout:.0f} s left"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
        return {"error": "out of memory" if "RESOURCE_EXHAUSTED" in done.stderr else tail}
    return json.loads(lines[-1])


def figures(case: dict, result: dict, earlier: list[dict], tiny: bool) -> str:
    """The case's result against its floor (roofline fraction or MFU, from the `earlier` results' limits case) and,
    for int8 projections, their speed against the bfloat16 ones measured earlier."""
    from bench import roofline
    from llama_jax import preset

    if "error" in result or case["kind"] == "limits":
        return result.get("error") or (f"{result['bandwidth'] / 1e9:.0f} GB/s, bf16 peak "
                                       f"{result['peak_bf16'] / 1e12:.0f} TFLOP/s ({result['backend']})")
    limits = next((r for r in earlier if r["kind"] == "limits" and "error" not in r), {})
    shapes, bandwidth, peak = SHAPES[tiny], limits.get("bandwidth", float("nan")), limits.get("peak_bf16", float("nan"))
    if case["kind"] == "proj":
        c = preset(shapes["decode_model"])
        values = roofline.matmul_params(c) - c.hidden_size * c.vocab_size  # the decoder layers' weights, no head
        floor = values * (2 if case["weights"] == "bfloat16" else 1) / bandwidth
        bf16 = next((r["seconds"] for r in earlier if r["kind"] == "proj" and r["weights"] == "bfloat16"
                     and "seconds" in r), {})
        return "; ".join(f"{name}: {seconds * 1e3:.2f} ms, {floor / seconds:.0%} of roofline"
                         + (f", {bf16[name] / seconds:.2f}x bf16" if case["weights"] != "bfloat16" and bf16 else "")
                         for name, seconds in result["seconds"].items())
    if case["kind"] == "decode":
        config = preset(shapes["decode_model"])
        context = roofline.decode_mean_context(shapes["prompt"], shapes["new_tokens"])
        limit = roofline.decode_limit(config, shapes["decode_batch"], context, "bfloat16", bandwidth)
        return f"{result['decode_tok_s']:.0f} tok/s, {result['decode_tok_s'] / limit:.0%} of roofline"
    if case["kind"] == "prefill":
        flops = roofline.prefill_flops(preset(shapes["decode_model"]), 1, shapes["long_prompt"])
        return f"TTFT {result['ttft_s'] * 1e3:.0f} ms, MFU {roofline.mfu(flops, result['ttft_s'], peak):.0%}"
    flops = roofline.train_flops(preset(shapes["train_model"]), case["batch"], shapes["seq"])
    return (f"{result['step_s']:.3f} s/step, MFU {roofline.mfu(flops, result['step_s'], peak):.0%}, "
            f"loss {result['loss']:.3f}")


def run(args) -> int:
    """The suite (the parent): every case in a child, the table after each to --out-dir."""
    out_dir = Path(args.out_dir or os.environ.get("OUT", "bench_results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline, rows, results = time.perf_counter() + args.time_budget, [], []
    for case in CASES:
        left = deadline - time.perf_counter()
        print(f"[bench gpu-tune {time.strftime('%H:%M:%S')}] {case['kind']}: {label(case)}", file=sys.stderr,
              flush=True)
        result = child(case, args.dry_run, left) if left > 5 else {"error": "skipped: --time-budget spent"}
        rows.append([case["kind"], label(case), figures(case, result, results, args.dry_run)])
        results.append({**case, **result})
        (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (out_dir / "results.md").write_text(md_table(["kind", "candidate", "measured"], rows) + "\n")
    print(md_table(["kind", "candidate", "measured"], rows))
    return 0


if __name__ == "__main__":
    print(json.dumps(run_case(json.loads(sys.argv[1]), "--tiny" in sys.argv[2:])), flush=True)
