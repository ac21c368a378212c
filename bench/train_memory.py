"""Peak memory of a LoRA and a QLoRA training step (`python -m train --lora-rank`), against the base weights' bytes.

    python -m bench.train_memory CKPT [--seq-len 256] [--rank 16]

Each run is `python -m train CKPT --data D --out RUN --steps 1 --batch-size 1 --seq-len N --remat full
--compute-dtype bfloat16 --mesh fsdp=1 --lora-rank R` (and the same with `--quantize int8`) in a child process
whose peak RSS (VmHWM, sampled every 10 ms) is read from /proc, on one text record long enough to fill N tokens.
Prints a markdown table. For a Llama-3-8B shape: `python bench/make_synthetic_hf.py --preset llama3-8b HF`, copy a
tokenizer.json into HF, `python -m convert hf HF CKPT`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench.convert_bench import run_child
from bench.infer_memory import GIB, weight_bytes
from llama_jax.checkpoints import open_checkpoint
from llama_jax.errors import exit_code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    return exit_code(lambda: measure(args), interrupted="interrupted")


def measure(args) -> int:
    config = open_checkpoint(args.checkpoint).config
    base, int8 = weight_bytes(config, "bfloat16"), weight_bytes(config, "bfloat16", "int8")
    print("| run | exit | peak RSS GiB | bfloat16 weights GiB | peak / bfloat16 weights | wall s | loss |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="llama_jax_train_memory_") as work:
        data = Path(work) / "data.jsonl"
        data.write_text(json.dumps({"text": " ".join(["the quick brown fox jumps over the lazy dog"] * 64)}) + "\n")
        for name, extra in (("LoRA (bfloat16 base)", []), ("QLoRA (int8 base)", ["--quantize", "int8"])):
            command = [sys.executable, "-m", "train", str(args.checkpoint), "--data", str(data), "--out",
                       str(Path(work) / name.split()[0]), "--steps", "1", "--batch-size", "1", "--seq-len",
                       str(args.seq_len), "--remat", "full", "--compute-dtype", "bfloat16", "--mesh", "fsdp=1",
                       "--lora-rank", str(args.rank), "--peak-tflops", "1", *extra]
            result = run_child(command, min_available=GIB)
            status = f"killed: {result['killed']}" if result["killed"] else str(result["rc"])
            metrics = Path(work) / name.split()[0] / "metrics.jsonl"
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            loss = json.loads(lines[0])["loss"] if lines else float("nan")
            print(f"| {name} | {status} | {result['maxrss'] / GIB:.2f} | {base / GIB:.2f} | "
                  f"{result['maxrss'] / base:.3f} | {result['wall']:.0f} | {loss:.4f} |", flush=True)
            if result["rc"] != 0 and not result["killed"]:
                print(result["log"][-2000:], file=sys.stderr)
    print(f"\nbase weights: bfloat16 {base:,} bytes, int8 {int8:,} bytes; LoRA rank {args.rank}, seq {args.seq_len}, "
          "batch 1, remat full")
    return 0


if __name__ == "__main__":
    sys.exit(main())
