"""The converter: HF <-> checkpoint round trips, sharded restore, atomicity, bad input, progress."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_fixture
from hf_dirs import make_hf_dir, read_hf_tensors

import llama_jax as lj
from convert.__main__ import main as convert_main
from llama_jax.checkpoints.directory import load_params, open_checkpoint

REPO = Path(__file__).resolve().parents[1]


def run_convert(*args) -> int:
    return convert_main([str(a) for a in args])


def logits(params, tokens, config):
    return np.asarray(jax.jit(lj.forward, static_argnames="config")(params, tokens, config)[0])


@pytest.mark.parametrize("variant", ["gqa", "tied", "bias", "rope_scaling"])
def test_hf_round_trip_fp32_is_bit_exact_and_logits_match(tmp_path, variant):
    src = make_hf_dir(tmp_path / "hf", variant)
    assert run_convert("hf", src, tmp_path / "ckpt") == 0
    checkpoint = open_checkpoint(tmp_path / "ckpt")
    assert checkpoint.metadata["dtype"] == "float32" and checkpoint.metadata["source"] == str(src)
    _, _, ref = load_fixture(variant)
    out = logits(load_params(checkpoint), ref["tokens"], checkpoint.config)
    assert np.abs(out - ref["logits"]).max() < 1e-4

    assert run_convert("export", tmp_path / "ckpt", tmp_path / "back") == 0
    original, back = read_hf_tensors(src), read_hf_tensors(tmp_path / "back")
    assert original.keys() == back.keys()
    for name in original:
        assert back[name].dtype == original[name].dtype and np.array_equal(back[name], original[name]), name
    assert lj.LlamaConfig.load(tmp_path / "back") == checkpoint.config


def test_sharded_bf16_source_round_trip_is_bit_exact(tmp_path):
    import ml_dtypes

    src = make_hf_dir(tmp_path / "hf", "tied", dtype=ml_dtypes.bfloat16, shards=3)
    assert len(list(src.glob("*.safetensors"))) == 3
    assert run_convert("hf", src, tmp_path / "ckpt") == 0
    assert open_checkpoint(tmp_path / "ckpt").metadata["dtype"] == "bfloat16"
    assert run_convert("export", tmp_path / "ckpt", tmp_path / "back") == 0
    original, back = read_hf_tensors(src), read_hf_tensors(tmp_path / "back")
    assert "lm_head.weight" not in back and original.keys() == back.keys()
    assert all(back[n].dtype == original[n].dtype and np.array_equal(back[n], original[n]) for n in original)


def test_dtype_option_casts(tmp_path):
    import ml_dtypes

    src = make_hf_dir(tmp_path / "hf", "gqa", dtype=ml_dtypes.bfloat16)
    assert run_convert("hf", src, tmp_path / "ckpt", "--dtype", "float32") == 0
    checkpoint = open_checkpoint(tmp_path / "ckpt")
    params = load_params(checkpoint)
    assert params["embed"].dtype == np.float32
    assert np.array_equal(np.asarray(params["embed"]),
                          read_hf_tensors(src)["model.embed_tokens.weight"].astype(np.float32))
    assert run_convert("export", tmp_path / "ckpt", tmp_path / "half", "--dtype", "float16") == 0
    assert read_hf_tensors(tmp_path / "half")["model.norm.weight"].dtype == np.float16


def test_restore_directly_into_sharded_arrays(tmp_path):
    assert jax.device_count() == 8
    src = make_hf_dir(tmp_path / "hf", "gqa")
    assert run_convert("hf", src, tmp_path / "ckpt") == 0
    checkpoint = open_checkpoint(tmp_path / "ckpt")
    mesh = lj.make_mesh("data=2,fsdp=2,tensor=2")
    params = load_params(checkpoint, mesh=mesh)
    expected = lj.param_shardings(checkpoint.config, mesh)
    for leaf, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    up = params["layers"]["mlp"]["up"]
    assert up.addressable_shards[0].data.size == up.size // 4  # fsdp x tensor
    _, _, ref = load_fixture("gqa")
    with jax.set_mesh(mesh):
        out = logits(params, ref["tokens"], checkpoint.config)
    assert np.abs(out - ref["logits"]).max() < 1e-4


@pytest.mark.parametrize("variant", ["gqa", "rope_scaling"])
def test_export_loads_in_transformers_with_same_logits(tmp_path, variant):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = make_hf_dir(tmp_path / "hf", variant)
    assert run_convert("hf", src, tmp_path / "ckpt") == 0
    assert run_convert("export", tmp_path / "ckpt", tmp_path / "back") == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "back", torch_dtype=torch.float32).eval()
    _, _, ref = load_fixture(variant)
    with torch.no_grad():
        out = model(torch.as_tensor(ref["tokens"], dtype=torch.long)).logits.numpy()
    assert np.abs(out - ref["logits"]).max() < 1e-4
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "back")
    assert tokenizer.decode(tokenizer("héllo")["input_ids"]) == "héllo"


def test_unwritable_destination_is_one_line(tmp_path, capsys):
    src = make_hf_dir(tmp_path / "hf", "mha")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert run_convert("hf", src, blocker / "ckpt") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "cannot be written here" in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "hf"]


def test_existing_destination_needs_force(tmp_path, capsys):
    src = make_hf_dir(tmp_path / "hf", "mha")
    dst = tmp_path / "ckpt"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert run_convert("hf", src, dst) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (dst / "keep.txt").read_text() == "mine"
    assert run_convert("hf", src, dst, "--force") == 0
    assert not (dst / "keep.txt").exists() and open_checkpoint(dst).config.num_attention_heads == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]


def test_ctrl_c_leaves_nothing(tmp_path, monkeypatch, capsys):
    import llama_jax.checkpoints.conversion as conversion

    src = make_hf_dir(tmp_path / "hf", "gqa")
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return original(*args)

    original = conversion.load_stacked
    monkeypatch.setattr(conversion, "load_stacked", interrupted)
    assert run_convert("hf", src, tmp_path / "ckpt") == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


SLOW_CONVERT = """
import sys, time
import llama_jax.checkpoints.conversion as conversion
original = conversion.load_stacked
def slow(*args):
    print("leaf", flush=True)
    time.sleep(0.5)
    return original(*args)
conversion.load_stacked = slow
from convert.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_mid_conversion_never_looks_complete_and_rerun_works(tmp_path):
    src = make_hf_dir(tmp_path / "hf", "gqa")
    dst = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, "hf", str(src), str(dst)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    for _ in range(4):
        assert proc.stdout.readline() == "leaf\n"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not dst.exists()
    with pytest.raises(lj.InputError, match="no such checkpoint"):
        open_checkpoint(dst)
    assert run_convert("hf", src, dst) == 0
    assert open_checkpoint(dst).config.num_key_value_heads == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]


def _break(tmp_path, how):
    """A HF dir broken in one way; returns (source, the path the error must name, a phrase it must contain)."""
    src = make_hf_dir(tmp_path / "hf", "gqa", shards=2)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    if how == "missing config":
        (src / "config.json").unlink()
        return src, src / "config.json", "missing config.json"
    bad_configs = {"unsupported architecture": ({"architectures": ["MistralForCausalLM"]}, "unsupported architecture"),
                   "negative layers": ({"num_hidden_layers": -3}, "num_hidden_layers must be a positive integer"),
                   "zero vocab": ({"vocab_size": 0}, "vocab_size must be a positive integer")}
    if how in bad_configs:
        change, phrase = bad_configs[how]
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, **change}))
        return src, src / "config.json", phrase
    if how == "missing shard":
        shard.unlink()
        return src, shard, "missing safetensors shard"
    if how == "truncated shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        return src, shard, "truncated"
    if how == "corrupt header":
        shard.write_bytes(b"\xff" * 64 + shard.read_bytes()[64:])
        return src, shard, "unreadable"
    tensors = read_hf_tensors(src)
    for file in src.glob("*.safetensors"):
        file.unlink()
    (src / "model.safetensors.index.json").unlink()
    if how == "missing tensor":
        del tensors["model.layers.1.mlp.up_proj.weight"]
        phrase = "missing tensor model.layers.1.mlp.up_proj.weight"
    else:  # wrong shape
        tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:, :-1]
        phrase = "tensor model.layers.1.mlp.up_proj.weight has shape (256, 127)"
    from safetensors.numpy import save_file
    save_file(tensors, src / "model.safetensors")
    return src, src / "model.safetensors" if how == "wrong shape" else src, phrase


@pytest.mark.parametrize("how", ["missing config", "unsupported architecture", "negative layers", "zero vocab",
                                 "missing shard", "truncated shard", "corrupt header", "missing tensor", "wrong shape"])
def test_bad_hf_input_is_one_clear_line(tmp_path, capsys, how):
    src, named, phrase = _break(tmp_path, how)
    assert run_convert("hf", src, tmp_path / "ckpt") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: {named}: "), err
    assert phrase in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_bad_checkpoint_dir_for_export(tmp_path, capsys):
    (tmp_path / "notackpt").mkdir()
    assert run_convert("export", tmp_path / "notackpt", tmp_path / "out") == 2
    assert "not a llama_jax checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_progress_bar_on_a_terminal_only(tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    src = make_hf_dir(tmp_path / "hf", "gqa")
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    proc = subprocess.Popen([sys.executable, "-m", "convert", "hf", str(src), str(tmp_path / "tty")], cwd=REPO,
                            stdout=secondary, stderr=secondary)
    os.close(secondary)
    output = b""
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            chunk = os.read(primary, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    assert proc.wait() == 0
    text = output.decode(errors="replace")
    assert "convert" in text and "tensors=12/12" in text and "100%" in text, text

    quiet = subprocess.run([sys.executable, "-m", "convert", "hf", str(src), str(tmp_path / "pipe")], cwd=REPO,
                           capture_output=True, text=True)
    assert quiet.returncode == 0
    assert quiet.stdout.strip() == f"wrote {tmp_path / 'pipe'}" and "%" not in quiet.stderr


@pytest.mark.parametrize("mesh_spec", [None, "data=2,fsdp=2,tensor=2"])
def test_per_layer_restore_is_the_engines_layout_and_is_kept_as_is(tmp_path, mesh_spec):
    """load_params(per_layer=True) gives exactly unstack_layers(stacked restore), in the same shardings and cast to
    the asked dtype, and the Engine keeps those very arrays (no second copy of the weights)."""
    from llama_jax.generation import Engine

    assert run_convert("hf", make_hf_dir(tmp_path / "hf", "bias"), tmp_path / "ckpt") == 0
    checkpoint = open_checkpoint(tmp_path / "ckpt")
    mesh = lj.make_mesh(mesh_spec) if mesh_spec else None
    expected = jax.jit(lj.unstack_layers)(load_params(checkpoint, mesh=mesh, dtype="bfloat16"))
    per_layer = load_params(checkpoint, mesh=mesh, dtype="bfloat16", per_layer=True)
    assert jax.tree.structure(per_layer) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(per_layer), jax.tree.leaves(expected), strict=True):
        assert got.dtype == want.dtype == jnp.bfloat16 and np.array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
    engine = Engine(per_layer, checkpoint.config, max_len=32, mesh=mesh, dtype=jnp.bfloat16,
                    cache_dtype=jnp.bfloat16)
    assert all(a is b for a, b in zip(jax.tree.leaves(engine.params), jax.tree.leaves(per_layer), strict=True))
