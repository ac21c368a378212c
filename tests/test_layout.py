"""The package layout: the one-way import contracts in pyproject.toml (import-linter) hold on this tree, and a copy of
the tree with one wrong import breaks exactly the contract that forbids it."""

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONTRACTS = [contract["name"] for contract in
             tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]]
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def lint(root: Path) -> tuple[int, str]:
    """Run lint-imports on the tree at `root` (found first on the path); its exit code and its report, one line."""
    result = subprocess.run([sys.executable, "-c", LINT, "--no-cache"], cwd=root, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(root)}, timeout=300, check=False)
    return result.returncode, " ".join((result.stdout + result.stderr).split())


def verdicts(report: str) -> dict[str, str]:
    return {name: "BROKEN" if f"{name} BROKEN" in report else "KEPT" if f"{name} KEPT" in report else "?"
            for name in CONTRACTS}


def test_the_tree_keeps_every_contract():
    code, report = lint(REPO)
    assert code == 0 and set(verdicts(report).values()) == {"KEPT"}, report


WRONG_IMPORTS = [  # (file, the line appended to it, the start of the one contract it breaks)
    ("llama_jax/model/decoder.py", "from llama_jax.checkpoints import open_checkpoint", "llama_jax is layered"),
    ("llama_jax/checkpoints/conversion.py", "from llama_jax.text import Encoder", "llama_jax is layered"),
    ("llama_jax/generation/engine.py", "from llama_jax.training import next_token_loss", "llama_jax is layered"),
    ("llama_jax/model/config.py", "import bench.roofline", "The library never imports the programs"),
    ("llama_jax/training/step.py", "from llama_jax.text.chat import render_chat", "llama_jax.text "),
    ("infer/__main__.py", "from llama_jax.model.decoder import forward", "llama_jax.model "),
    ("bench/profile.py", "from llama_jax.generation.engine import prefill", "llama_jax.generation "),
]


@pytest.mark.parametrize("file, line, contract", WRONG_IMPORTS, ids=[f"{f}: {line}" for f, line, _ in WRONG_IMPORTS])
def test_a_wrong_import_breaks_its_contract(tmp_path, file, line, contract):
    for name in ("llama_jax", "convert", "infer", "train", "bench"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    with (tmp_path / file).open("a") as f:
        f.write(f"\n{line}  # a wrong arrow\n")
    code, report = lint(tmp_path)
    broken = [name for name, verdict in verdicts(report).items() if verdict == "BROKEN"]
    assert code == 1 and len(broken) == 1 and broken[0].startswith(contract), report
