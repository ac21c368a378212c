"""python -m train end to end on a tiny model: metrics, final checkpoint, resume, signals, NaN, errors, sharding,
and two processes with jax.distributed.

Runs are subprocesses sharing the session's JAX compilation cache, so the same train step compiles once per mesh.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from hf_dirs import make_hf_dir, zero_model_hf_dir

from convert.__main__ import main as convert_main
from llama_jax.checkpoints.directory import load_params, open_checkpoint
from llama_jax.training.step import OptimizerConfig, learning_rate
from train.__main__ import main as train_main

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
LR = 3e-3
SETTINGS = ("--steps", "6", "--save-every", "2", "--keep", "2", "--batch-size", "4", "--seq-len", "128", "--pack",
            "--lr", str(LR), "--compute-dtype", "float32", "--peak-tflops", "1")
METRICS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"}
# Run as `python -c`: sends this process SIGTERM as step {step} begins, like a scheduler preempting the job.
SIGTERM_AT_STEP = """
import os, signal, sys
import train.__main__ as cli
real_batches = cli.batches
def batches(*args, start, **kwargs):
    for step, batch in enumerate(real_batches(*args, start=start, **kwargs), start=start + 1):
        if step == {step}:
            os.kill(os.getpid(), signal.SIGTERM)
        yield batch
cli.batches = batches
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The gqa fixture model (vocab 256, byte-level tokenizer) as a checkpoint, with a plain-text chat template."""
    root = tmp_path_factory.mktemp("tiny")
    assert convert_main(["hf", str(make_hf_dir(root / "hf", "gqa")), str(root / "ckpt")]) == 0
    (root / "ckpt" / "chat_template.jinja").write_text(TEMPLATE)
    return root / "ckpt"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(train.jsonl, eval.jsonl): text records and chat records, mixed."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "cats", "sing"]
    def sentence():
        return " ".join(rng.choice(words, rng.integers(2, 8)))
    def record(i):
        if i % 2:
            return {"text": sentence()}
        return {"messages": [{"role": "user", "content": sentence()}, {"role": "assistant", "content": sentence()}]}
    for name, count in (("train", 40), ("eval", 6)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(record(i)) + "\n" for i in range(count)))
    return root / "train.jsonl", root / "eval.jsonl"


@pytest.fixture(scope="module")
def env():
    """The session's compilation cache comes with os.environ (conftest.py)."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def command(tiny, data, out, *extra) -> list[str]:
    return [str(tiny), "--data", str(data[0]), "--out", str(out), *SETTINGS, *map(str, extra)]


def train(args, env, *, script=None) -> subprocess.CompletedProcess:
    runner = ["-c", script] if script else ["-m", "train"]
    return subprocess.run([sys.executable, *runner, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> np.ndarray:
    return np.array([m["loss"] for m in metrics(run_dir)])


def saved_steps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def baseline(tiny, data, env, tmp_path_factory):
    """An uninterrupted run over all 8 devices on the fsdp axis, with eval data."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    result = train(command(tiny, data, out, "--eval-data", data[1], "--mesh", "fsdp=8"), env)
    assert result.returncode == 0, result.stderr
    return out, result


@pytest.fixture(scope="module")
def sharded(tiny, data, env, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "run"
    result = train(command(tiny, data, out, "--eval-data", data[1], "--mesh", "data=2,fsdp=2,tensor=2"), env)
    assert result.returncode == 0, result.stderr
    return out


def test_run_writes_metrics_and_a_final_checkpoint(baseline, tiny, tmp_path):
    out, result = baseline
    assert "40 examples (0 truncated, 0 skipped)" in result.stderr and f"wrote {out / 'final'}" in result.stderr
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and all(METRICS <= r.keys() for r in rows)
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4, 6]
    assert all(np.isfinite([r[k] for k in METRICS]).all() and r["tokens_per_s"] > 0 for r in rows)
    schedule = learning_rate(OptimizerConfig(total_steps=6, lr=LR))
    np.testing.assert_allclose([r["lr"] for r in rows], [float(schedule(s)) for s in range(6)], rtol=1e-6)
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["eval_loss"] < rows[1]["eval_loss"]
    assert saved_steps(out) == ["4", "6"]  # --keep 2

    final, start = open_checkpoint(out / "final"), open_checkpoint(tiny)
    assert final.config == start.config and final.chat_template == start.chat_template
    trained, initial = load_params(final), load_params(start)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), trained, initial)
    assert all(0 < m < 1 for m in jax.tree.leaves(moved))
    assert convert_main(["export", str(out / "final"), str(tmp_path / "hf")]) == 0


def test_sigterm_saves_and_the_same_command_resumes_with_the_same_losses(baseline, tiny, data, env, tmp_path):
    out = tmp_path / "run"
    args = command(tiny, data, out, "--eval-data", data[1], "--mesh", "fsdp=8")
    stopped = train(args, env, script=SIGTERM_AT_STEP.format(step=3))
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "stopped by a signal at step 3; checkpoint saved; run the same command to resume" in stopped.stderr
    assert saved_steps(out) == ["2", "3"] and len(metrics(out)) == 3 and not (out / "final").exists()

    # What a kill -9 in the middle of saving step 5 leaves: Orbax's uncommitted temporary directory (here a
    # complete-looking copy) and a metrics line past the newest checkpoint. Neither may be used.
    shutil.copytree(out / "checkpoints" / "3", out / "checkpoints" / "5.orbax-checkpoint-tmp-1700000000000000")
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 4, "loss": 0.0}) + "\n")

    resumed = train(args, env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out} at step 3" in resumed.stderr
    assert saved_steps(out) == ["4", "6"]
    expected = metrics(baseline[0])
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "grad_norm", "eval_loss"):  # bit for bit: same program, same state, same batches
        assert [r.get(key) for r in metrics(out)] == [r.get(key) for r in expected], key


def test_zero_leaves_survive_save_resume_and_the_final_checkpoint(data, env, tmp_path):
    """Attention made dead (v, o and every bias zero): v, o and the q/k/v biases get no gradient, so whole leaves
    of params and of optimizer moments are zero in every saved step, the resumed state and the final checkpoint."""
    ckpt = tmp_path / "ckpt"
    assert convert_main(["hf", str(zero_model_hf_dir(tmp_path / "hf")), str(ckpt)]) == 0
    (ckpt / "chat_template.jinja").write_text(TEMPLATE)
    out = tmp_path / "run"
    args = command(ckpt, data, out, "--mesh", "fsdp=8")
    stopped = train(args, env, script=SIGTERM_AT_STEP.format(step=3))
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    resumed = train(args, env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out} at step 3" in resumed.stderr and saved_steps(out) == ["4", "6"]
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6] and losses(out)[-1] < losses(out)[0]
    attention = load_params(open_checkpoint(out / "final"))["layers"]["attn"]
    assert sorted(name for name, leaf in attention.items() if not np.asarray(leaf).any()) == [
        "k_bias", "o", "q_bias", "v", "v_bias"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny, data, env, tmp_path):
    out = tmp_path / "run"
    result = train(command(tiny, data, out, "--mesh", "fsdp=8", "--save-every", "1", "--lr", "1e30"), env)
    assert result.returncode == 1, result.stderr
    good = metrics(out)
    assert good and np.isfinite([r["loss"] for r in good]).all()
    message = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and re.fullmatch(
        rf"error: loss became (nan|inf|-inf) at step {len(good) + 1}; stopping\. The newest checkpoint, step "
        rf"{len(good)}, in {re.escape(str(out / 'checkpoints'))} is the last good one", message[0]), message
    assert saved_steps(out)[-1] == str(len(good)) and not (out / "final").exists()


def test_bad_arguments_and_inputs_give_one_line_and_exit_2(tiny, data, tmp_path, capsys):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": oops}\n')
    cases = [([str(tiny), "--data", str(tmp_path / "missing.jsonl")], f"{tmp_path / 'missing.jsonl'}: no such file"),
             ([str(tiny), "--data", str(bad_json)], f"{bad_json}:2: not valid JSON"),
             ([str(tmp_path), "--data", str(data[0])], f"{tmp_path}: not a llama_jax checkpoint"),
             ([str(tiny), "--data", str(data[0]), "--mesh", "data=3"], "--mesh: mesh spec 'data=3' uses 3 devices"),
             ([str(tiny), "--data", str(data[0]), "--attention", "cudnn"],
              "--attention: cuDNN attention needs a GPU; jax runs on cpu here")]
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    (broken / "config.json").write_text(json.dumps({**json.loads((tiny / "config.json").read_text()),
                                                    "num_hidden_layers": -3}))
    cases.append(([str(broken), "--data", str(data[0])],
                  f"{broken / 'config.json'}: num_hidden_layers must be a positive integer, got -3"))
    for args, problem in cases:
        assert train_main([*args, "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {problem}") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as exit_:
        train_main([str(tiny), "--data", str(data[0]), "--out", str(tmp_path / "run"), "--steps", "0"])
    assert exit_.value.code == 2 and "--steps: must be positive" in capsys.readouterr().err


def test_sharded_mesh_gives_the_same_losses(baseline, sharded):
    expected, got = metrics(baseline[0]), metrics(sharded)
    for key in ("loss", "grad_norm", "eval_loss"):
        np.testing.assert_allclose([r.get(key, 0) for r in got], [r.get(key, 0) for r in expected], rtol=1e-5,
                                   err_msg=key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(args, env) -> list[tuple[str, str]]:
    """`python -m train ARGS` as 2 processes x 4 CPU devices joined by jax.distributed; their (stdout, stderr)."""
    args = [*args, "--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2"]
    host_env = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    processes = [subprocess.Popen([sys.executable, "-m", "train", *args, "--process-id", str(i)], cwd=REPO,
                                  env=host_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
    try:
        results = [p.communicate(timeout=180) for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert [p.returncode for p in processes] == [0, 0], results
    assert "8 devices" in results[0][1] and "examples (" not in results[1][1]  # process 0 reports, alone
    return results


@pytest.mark.slow  # two processes: test_sharded_mesh_gives_the_same_losses covers the mesh in one
def test_two_processes_give_the_same_losses_as_one(sharded, tiny, data, env, tmp_path):
    """2 processes x 4 CPU devices joined by jax.distributed == 1 process x 8 devices, on the same mesh."""
    out = tmp_path / "run"
    two_processes(command(tiny, data, out, "--eval-data", data[1], "--mesh", "data=2,fsdp=2,tensor=2"), env)
    expected, got = metrics(sharded), metrics(out)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]  # written once
    for key in ("loss", "grad_norm", "eval_loss"):
        np.testing.assert_allclose([r.get(key, 0) for r in got], [r.get(key, 0) for r in expected], rtol=1e-5,
                                   err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), load_params(open_checkpoint(out / "final")),
                 load_params(open_checkpoint(sharded / "final")))


QLORA = ("--lora-rank", "4", "--quantize", "int8", "--grad-accum", "2", "--mesh", "data=2,fsdp=2,tensor=2")


@pytest.fixture(scope="module")
def qlora(tiny, data, env, tmp_path_factory):
    """An uninterrupted QLoRA run (accumulation, packing, eval) on a sharded mesh."""
    out = tmp_path_factory.mktemp("qlora") / "run"
    result = train(command(tiny, data, out, *QLORA, "--eval-data", data[1]), env)
    assert result.returncode == 0, result.stderr
    return out


def test_qlora_resumes_after_sigterm_with_the_same_losses(qlora, tiny, data, env, tmp_path):
    """LoRA over an int8 base with accumulation, packing and eval on a sharded mesh: a run stopped by SIGTERM and
    resumed gives the same losses bit for bit, and writes a PEFT adapter, not a checkpoint."""
    args = command(tiny, data, tmp_path / "run", *QLORA, "--eval-data", data[1])
    stopped = train(args, env, script=SIGTERM_AT_STEP.format(step=3))
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    resumed = train(args, env)
    assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr
    expected = metrics(qlora)
    assert expected[-1]["loss"] < expected[0]["loss"]
    for key in ("loss", "grad_norm", "eval_loss"):
        assert [r.get(key) for r in metrics(tmp_path / "run")] == [r.get(key) for r in expected], key
    assert sorted(p.name for p in (tmp_path / "run" / "final").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "llama_jax_adapter.json"]


@pytest.mark.slow  # two processes, as above
def test_qlora_on_two_processes_gives_the_same_losses_and_adapter(qlora, tiny, data, env, tmp_path):
    """Time (~25 s): two `python -m train` processes joined by jax.distributed, each starting jax and compiling the
    QLoRA step for its half of the mesh."""
    from safetensors.numpy import load_file

    out = tmp_path / "run"
    two_processes(command(tiny, data, out, *QLORA, "--eval-data", data[1]), env)
    for key in ("loss", "grad_norm", "eval_loss"):
        np.testing.assert_allclose([r.get(key, 0) for r in metrics(out)], [r.get(key, 0) for r in metrics(qlora)],
                                   rtol=1e-5, err_msg=key)
    got, want = (load_file(d / "final" / "adapter_model.safetensors") for d in (out, qlora))
    assert got.keys() == want.keys()
    for name in got:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)
