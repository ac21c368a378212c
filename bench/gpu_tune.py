"""The GPU tuning suite: `python -m bench --suite gpu-tune [--out-dir DIR] [--time-budget S] [--dry-run]`.

Each candidate runs in a child process of its own (`python -m bench.gpu_tune CASE_JSON`), with its XLA flag set in
XLA_FLAGS (XLA reads them once, when it starts), and prints one JSON line; the parent never starts jax on the GPU.

  limits   the HBM bandwidth (a 4 GiB in-place copy) and the bf16 peak (an 8192^3 matmul): the rooflines below
  engines  the Llama-3-8B Engine's decode (random weights made on the device, 128-token prompts) in int8 and
           bfloat16 at batch 1, 8 and 64: tokens/s against the HBM roofline, int8 against bfloat16, and whether row
           0's greedy tokens match the first run's (random weights: near-ties flip)
  proj     the matmuls of Llama-3-8B's 32 decoder layers (q, k, v, o, gate, up, down; no attention; one array per
           layer, as the Engines hold them) at batch 1 and 8, each formulation called explicitly: bfloat16 weights;
           int8 converted in a dot, as `row_reduce`, and through `int8_kernel` with its own tiles and others, all
           in `rows_layout`: time against the weights' bytes at the measured bandwidth, int8 against bfloat16, and
           each int8 product's error against float32 (the programs' HLO after optimization goes to hlo.tgz)
  paged    the serving engine (PagedEngine, bfloat16) with 64 requests at once against the Engine's batch-64
           generate of the same prompts (bench/gpu_serve.py)
  train    full fine-tuning steps (float32 params and AdamW, bfloat16 compute, cuDNN attention, 8 x 2048): Llama-3.2-1B
           with remat dots and the vocabulary-chunked loss (its profile goes to train.trace.json.gz), Llama-3.2-3B
           the same, a Llama-3-8B LoRA step (rank 16, frozen bfloat16 base, 4 x 2048): MFU against the measured
           peak (a LoRA step counts LORA_FLOPS_FRACTION of a full one)
  attention  decode attention at batch 64 over 32 layers (Llama-3-8B's heads, 1,024 cached tokens): on slices
           of a cache stacked by layer (the Engine's), on one array per layer, and as reductions on the stacked
           cache (bench/gpu_micro.py): against the bytes of K and V (the stacked one's slices were copied, 1.06 ms
           of a 7 ms step in the first H200 profile)
  train    last, Llama-3.2-1B variants: the whole-vocabulary loss, remat none, batch 16

The cases run in this order until --time-budget seconds have passed (the rest are reported as skipped); results.json
and results.md go to --out-dir (default $OUT or ./bench_results) after every case. `--dry-run` runs every case the
same way at tiny shapes on whatever backend is here (a CPU does): the code paths and each flag set are exercised,
the numbers mean nothing. Importing jax here starts no backend: only the children touch a device.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

from bench.common import md_table
from bench.gpu_micro import attention_case, proj_case
from bench.gpu_serve import paged_case, paged_figures

FLAG_SETS = {
    "default": "",
    "triton-gemm": "--xla_gpu_enable_triton_gemm=true --xla_gpu_triton_gemm_any=true",
    "no-remat-pass": "--xla_disable_hlo_passes=rematerialization",
    "latency-hiding": "--xla_gpu_enable_latency_hiding_scheduler=true",
}
KERNEL_TILES = ("64/1024/256/4/3", "32/512/256/4/3", "32/1024/512/4/3", "16/1024/512/4/4")  # block_n/chunk/block_k/..
PROJ_WEIGHTS = ["bfloat16", "int8:dot-rows", "int8:reduce-rows", "int8:kernel-rows"] + [
    f"int8:kernel/{tiles}-rows" for tiles in KERNEL_TILES]
CASES = [{"kind": "limits", "flags": "default"}]
CASES += [{"kind": "engines", "flags": "default", "runs": [[w, b] for b in (1, 8, 64) for w in ("int8", "bfloat16")]}]
CASES += [{"kind": "proj", "weights": PROJ_WEIGHTS, "flags": "default", "dump_hlo": True, "batches": [1, 8]}]
CASES += [{"kind": "paged", "batch": 64, "budget": 2048, "flags": "default"}]
CASES += [{"kind": "train", "remat": "dots", "batch": 8, "vocab_chunk": "chunked", "flags": "default", "trace": True}]
CASES += [{"kind": "train", "model": "llama3.2-3b", "remat": "dots", "batch": 8, "vocab_chunk": "chunked",
           "flags": "default"},
          {"kind": "train", "model": "llama3-8b", "lora": 16, "remat": "dots", "batch": 4, "vocab_chunk": "chunked",
           "flags": "default"}]
CASES += [{"kind": "attention", "flags": "default", "contexts": [1024]}]  # 192 too ran past 130 s
CASES += [{"kind": "train", "remat": r, "batch": b, "vocab_chunk": v, "flags": f} for r, b, v, f in (
    ("dots", 8, "whole", "default"), ("none", 8, "chunked", "default"), ("dots", 16, "chunked", "default"))]
SHAPES = {False: {"decode_model": "llama3-8b", "train_model": "llama3.2-1b", "seq": 2048, "prompt": 128,
                  "new_tokens": 64, "attention_batch": 64, "copy_bytes": 4 << 30, "peak": 8192},
          True: {"decode_model": "tiny", "train_model": "tiny", "seq": 64, "prompt": 16,
                 "new_tokens": 4, "attention_batch": 4, "copy_bytes": 1 << 20, "peak": 256}}


def label(case: dict) -> str:
    if case["kind"] == "engines":
        return "; ".join(f"{w} batch {b}" for w, b in case["runs"])
    return ", ".join(f"{k} {'/'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in case.items()
                     if k not in ("kind", "dump_hlo", "trace"))


# -- in the child ---------------------------------------------------------------------------------------------------

def engines_case(case: dict, shapes: dict) -> dict:
    """Engine decode tokens/s and TTFT for each [weights, batch] of case["runs"] on one set of random
    Llama-3-8B-shape bfloat16 weights and their int8 quantization (`quantize_tree`), bfloat16 compute and cache."""
    from bench.decode import OurGenerate
    from bench.gpu import failure
    from llama_jax import init_params, preset
    from llama_jax.model import param_logical_names, quantize_tree

    config = preset(shapes["decode_model"])
    params = init_params(config, jax.random.key(0), dtype=jnp.bfloat16)
    quantized = jax.jit(lambda p: quantize_tree(p, param_logical_names(config)))(params)
    out = []
    for kind, batch in case["runs"]:
        try:  # one run's failure (a kernel that does not compile here) leaves the others their figures
            ours = OurGenerate(quantized if kind == "int8" else params, config, dtype=jnp.bfloat16, batch=batch,
                               prompt_len=shapes["prompt"], new_tokens=shapes["new_tokens"])
        except Exception as e:  # noqa: BLE001 (reported in the table)
            out.append({"weights": kind, "batch": batch, "error": failure(e)})
            continue
        runs = [ours() for _ in range(2)]
        out.append({"weights": kind, "batch": batch, "compile_s": ours.compile_s,
                    "decode_tok_s": max(r["decode_tok_s"] for r in runs), "ttft_s": min(r["ttft_s"] for r in runs),
                    "row0": ours.engine.generate(ours.prompts, max_new_tokens=shapes["new_tokens"], stop_ids=())
                    .completions[0].tokens})  # random_prompts' first row is the same prompt at every batch
        del ours
    return {"runs": out}


def traced(fn: Callable[[], object], out: Path) -> None:
    """Run `fn` under jax's profiler and keep the perfetto trace at `out` (a .json.gz; the rest is dropped)."""
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            fn()
        found = sorted(Path(tmp).rglob("*.trace.json.gz")) or sorted(Path(tmp).rglob("*.json.gz"))
        if found:
            shutil.copy(found[0], out)


def train_model(case: dict, tiny: bool) -> str:
    """The preset a train case runs: its "model" (Llama-3.2-1B unless named), the tiny one in a dry run."""
    return SHAPES[tiny]["train_model"] if tiny else case.get("model", SHAPES[tiny]["train_model"])


def run_case(case: dict, tiny: bool, out_dir: Path) -> dict:
    """One case, here (the child); returns its measurements."""
    from bench import machine
    from bench.train import OurTrainStep
    from llama_jax import preset
    from llama_jax.training import VOCAB_CHUNK, LoraConfig

    shapes = SHAPES[tiny]
    attention = "xla" if tiny or jax.default_backend() != "gpu" else "cudnn"
    if case["kind"] == "limits":
        limits = machine.limits(nbytes=shapes["copy_bytes"], repeats=5, peak_size=shapes["peak"], host=False)
        return {"bandwidth": limits["bandwidth"], "peak_bf16": limits["peak"]["bfloat16"],
                "backend": jax.default_backend(), "jax": jax.__version__,
                "device": str(jax.devices()[0].device_kind)}
    if case["kind"] == "proj":
        return proj_case(case, preset(shapes["decode_model"]))
    if case["kind"] == "attention":
        return attention_case(case, preset(shapes["decode_model"]), batch=shapes["attention_batch"])
    if case["kind"] == "engines":
        return engines_case(case, shapes)
    if case["kind"] == "paged":
        return paged_case(case, shapes)
    config = preset(train_model(case, tiny))
    vocab_chunk = config.vocab_size if case["vocab_chunk"] == "whole" else VOCAB_CHUNK
    lora = LoraConfig(case["lora"], 2.0 * case["lora"]) if case.get("lora") else None
    ours = OurTrainStep.fresh(config, batch=case["batch"], seq_len=shapes["seq"], remat=case["remat"],
                              attention=attention, vocab_chunk=vocab_chunk, lora=lora)
    runs = [ours() for _ in range(3)]
    if case.get("trace"):
        traced(ours, out_dir / f"{case['kind']}.trace.json.gz")
    return {"step_s": min(r["step_s"] for r in runs), "loss": runs[0]["loss"], "compile_s": ours.compile_s,
            "attention": attention}


# -- in the parent --------------------------------------------------------------------------------------------------

def child(case: dict, tiny: bool, timeout: float, out_dir: Path) -> dict:
    """`run_case` in a child process under the case's flag set; its result, or {"error": why}. A case with dump_hlo
    leaves XLA's optimized HLO of its programs in out_dir/hlo.tgz."""
    dump = Path(tempfile.mkdtemp()) if case.get("dump_hlo") else None
    flags = FLAG_SETS[case["flags"]] + (f" --xla_dump_to={dump} --xla_dump_hlo_as_text" if dump else "")
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip(),
           "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"}
    command = [sys.executable, "-m", "bench.gpu_tune", json.dumps(case), str(out_dir), *(["--tiny"] if tiny else [])]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over the {timeout:.0f} s left"}
    finally:
        if dump:
            with tarfile.open(out_dir / "hlo.tgz", "w:gz") as tar:
                for path in dump.glob("*after_optimizations.txt"):
                    tar.add(path, arcname=path.name)
            shutil.rmtree(dump, ignore_errors=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
        return {"error": "out of memory" if "RESOURCE_EXHAUSTED" in done.stderr else tail}
    return json.loads(lines[-1])


def agreed(tokens: list[int], reference: list[int]) -> int:
    """How many leading tokens of `tokens` equal `reference`'s."""
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))


def figures(case: dict, result: dict, earlier: list[dict], tiny: bool) -> str:
    """The case's result against its floor (roofline fraction or MFU, from the `earlier` results' limits case) and,
    for int8 projections, their speed against the bfloat16 ones measured in the same child."""
    from bench import roofline
    from llama_jax import preset

    if "error" in result or case["kind"] == "limits":
        return result.get("error") or (f"{result['bandwidth'] / 1e9:.0f} GB/s, bf16 peak "
                                       f"{result['peak_bf16'] / 1e12:.0f} TFLOP/s ({result['backend']}, "
                                       f"{result.get('device')}, jax {result.get('jax')})")
    limits = next((r for r in earlier if r["kind"] == "limits" and "error" not in r), {})
    shapes, bandwidth, peak = SHAPES[tiny], limits.get("bandwidth", float("nan")), limits.get("peak_bf16", float("nan"))
    if case["kind"] == "paged":
        return paged_figures(result)
    if case["kind"] == "proj":
        c = preset(shapes["decode_model"])
        values = roofline.matmul_params(c) - c.hidden_size * c.vocab_size  # the decoder layers' weights, no head
        bf16 = result["seconds"].get("bfloat16", {})
        parts = []
        for weights, seconds in result["seconds"].items():
            floor = values * (2 if weights == "bfloat16" else 1) / bandwidth
            error = f" (error {result['rel_error'][weights]:.1e})" if weights in result["rel_error"] else ""
            parts.append(f"{weights}{error}: " + ", ".join(
                f"{name} {s * 1e3:.2f} ms {floor / s:.0%} roofline"
                + (f" {bf16[name] / s:.2f}x bf16" if weights != "bfloat16" and name in bf16 else "")
                for name, s in seconds.items()))
        parts += [f"{name}: {why}" for name, why in result["rel_error"].items() if name.endswith(" failed")]
        return "; ".join(parts)
    if case["kind"] == "attention":
        c = preset(shapes["decode_model"])
        parts = []
        for name, seconds in result["seconds"].items():
            context = int(name.rsplit(" ", 1)[1])
            floor = 2 * c.num_hidden_layers * shapes["attention_batch"] * c.num_key_value_heads * context \
                * c.head_dim * 2 / bandwidth  # K and V of every layer, bfloat16, read once
            error = f" (error {result['rel_error'][name]:.1e})" if name in result["rel_error"] else ""
            parts.append(f"{name}{error}: {seconds * 1e3:.2f} ms, {floor / seconds:.0%} of roofline")
        return "; ".join(parts)
    if case["kind"] == "engines":
        config = preset(shapes["decode_model"])
        context = roofline.decode_mean_context(shapes["prompt"], shapes["new_tokens"])
        runs = [r for r in result["runs"] if "error" not in r]
        parts = [f"{r['weights']} batch {r['batch']}: {r['error']}" for r in result["runs"] if "error" in r]
        bf16 = {r["batch"]: r["decode_tok_s"] for r in runs if r["weights"] == "bfloat16"}
        first = {r["weights"]: r["row0"] for r in reversed(runs)}  # each dtype's first run's row 0
        for r in runs:
            int8 = r["weights"] == "int8"
            limit = roofline.decode_limit(config, r["batch"], context, r["weights"], bandwidth, "bfloat16")
            versus = f", {r['decode_tok_s'] / bf16[r['batch']]:.2f}x bf16" if int8 and r["batch"] in bf16 else ""
            parts.append(f"{r['weights']} batch {r['batch']}: {r['decode_tok_s']:.0f} tok/s, "
                         f"{r['decode_tok_s'] / limit:.0%} of roofline{versus}, TTFT {r['ttft_s'] * 1e3:.0f} ms, "
                         f"row 0 {agreed(r['row0'], first[r['weights']])}/{len(r['row0'])} tokens as the first run")
        return "; ".join(parts)
    from llama_jax.training import LORA_FLOPS_FRACTION

    flops = roofline.train_flops(preset(train_model(case, tiny)), case["batch"], shapes["seq"])
    flops *= LORA_FLOPS_FRACTION if case.get("lora") else 1  # no weight gradients for a frozen base
    return (f"{result['step_s']:.3f} s/step, MFU {roofline.mfu(flops, result['step_s'], peak):.0%}, "
            f"loss {result['loss']:.3f}, attention {result.get('attention')}")


def run(args) -> int:
    """The suite (the parent): every case in a child, the table after each to --out-dir."""
    out_dir = Path(args.out_dir or os.environ.get("OUT", "bench_results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline, rows, results = time.perf_counter() + args.time_budget, [], []
    for case in CASES:
        left = deadline - time.perf_counter()
        print(f"[bench gpu-tune {time.strftime('%H:%M:%S')}] {case['kind']}: {label(case)}", file=sys.stderr,
              flush=True)
        result = child(case, args.dry_run, left, out_dir) if left > 5 else {"error": "skipped: --time-budget spent"}
        rows.append([case["kind"], label(case), figures(case, result, results, args.dry_run)])
        results.append({**case, **result})
        (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (out_dir / "results.md").write_text(md_table(["kind", "candidate", "measured"], rows) + "\n")
    print(md_table(["kind", "candidate", "measured"], rows))
    return 0


if __name__ == "__main__":
    print(json.dumps(run_case(json.loads(sys.argv[1]), "--tiny" in sys.argv[3:], Path(sys.argv[2]))), flush=True)
