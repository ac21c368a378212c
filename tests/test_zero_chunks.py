"""Tensors that are zero, in whole or in some chunks, round-trip through every writer and reader.

TensorStore skips chunks equal to the fill value unless told otherwise, and Orbax reads a missing chunk as an
error: a zero bias, a zero matrix or one zero layer once made a checkpoint that no program could open. Every
writer now stores every chunk and checks that they are there before the directory is renamed into place.
"""

import json
import tempfile
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from gguf_files import TINY, hf_tensors, to_llama_cpp, write_gguf
from hf_dirs import make_hf_dir, read_hf_tensors, zero_model_hf_dir
from hypothesis import given, settings
from hypothesis import strategies as st

import llama_jax as lj
from convert.__main__ import main as convert_main
from infer.__main__ import main as infer_main
from llama_jax.checkpoints import leaf_store
from llama_jax.checkpoints.directory import load_params, open_checkpoint, param_paths, write_checkpoint
from llama_jax.checkpoints.hf_mapping import params_from_hf


def stored_zero_leaves(checkpoint_dir: Path) -> list[str]:
    """The leaves of a checkpoint that are all zeros."""
    params = load_params(open_checkpoint(checkpoint_dir))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return sorted(jax.tree_util.keystr(path) for path, leaf in flat if not np.asarray(leaf).any())


def test_zero_tensors_convert_generate_and_export_bit_exact(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    src = zero_model_hf_dir(tmp_path / "hf")
    assert convert_main(["hf", str(src), str(tmp_path / "ckpt")]) == 0
    assert len(stored_zero_leaves(tmp_path / "ckpt")) == 9  # 7 biases, v and o

    capsys.readouterr()
    assert infer_main([str(tmp_path / "ckpt"), "--prompt", "Hello, world", "--max-new-tokens", "8",
                       "--temperature", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    prompt, generated = result["prompt_token_ids"], result["generated_token_ids"]

    reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        expected_logits = reference(torch.tensor([prompt])).logits.numpy()
        expected = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8,
                                      eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    checkpoint = open_checkpoint(tmp_path / "ckpt")
    logits, _ = lj.forward(load_params(checkpoint), np.array([prompt]), checkpoint.config)
    assert np.abs(np.asarray(logits) - expected_logits).max() < 1e-4
    assert generated and generated == expected[:len(generated)]  # shorter only where a stop id came
    assert len(generated) == 8 or generated[-1] in checkpoint.stop_ids

    assert convert_main(["export", str(tmp_path / "ckpt"), str(tmp_path / "back")]) == 0
    original, back = read_hf_tensors(src), read_hf_tensors(tmp_path / "back")
    assert original.keys() == back.keys()
    assert all(back[n].dtype == original[n].dtype and np.array_equal(back[n], original[n]) for n in original)


def test_gguf_with_zero_tensors_converts_exactly(tmp_path):
    original = hf_tensors(np.random.default_rng(3), **TINY, attention_bias=True, tied=False)
    for name in ("model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.layers.0.self_attn.k_proj.bias", "model.layers.1.self_attn.k_proj.bias"):
        original[name] = np.zeros_like(original[name])
    gguf_file = write_gguf(tmp_path / "zeros.gguf", to_llama_cpp(original, **TINY), **TINY)
    assert convert_main(["gguf", str(gguf_file), str(tmp_path / "ckpt")]) == 0
    checkpoint = open_checkpoint(tmp_path / "ckpt")
    restored = load_params(checkpoint)
    jax.tree.map(np.testing.assert_array_equal, restored, params_from_hf(original, checkpoint.config))
    assert stored_zero_leaves(tmp_path / "ckpt") == ["['layers']['attn']['k_bias']"]


def drop_a_chunk(write_leaf):
    """`write_leaf` that then loses the last chunk of the `layers.mlp.up` leaf, as a failing disk might."""
    def writer(directory, value, dtype, stacked):
        write_leaf(directory, value, dtype, stacked)
        if directory.name == "layers.mlp.up":
            sorted(p for p in (directory / "c").rglob("*") if p.is_file())[-1].unlink()
    return writer


def test_a_chunk_missing_after_writing_is_an_error_and_nothing_is_kept(tmp_path, monkeypatch, capsys):
    import llama_jax.checkpoints.directory as checkpoint_module

    src = make_hf_dir(tmp_path / "hf", "gqa")
    monkeypatch.setattr(checkpoint_module, "write_leaf", drop_a_chunk(leaf_store.write_leaf))
    assert convert_main(["hf", str(src), str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "layers.mlp.up: chunk c/1/0/0 missing" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_checkpoint_with_a_missing_chunk_is_refused_in_one_line(tmp_path, capsys):
    assert convert_main(["hf", str(make_hf_dir(tmp_path / "hf", "bias")), str(tmp_path / "ckpt")]) == 0
    leaf = tmp_path / "ckpt" / "params" / "state" / "layers.attn.k_bias"
    (leaf / "c" / "1" / "0" / "0").unlink()  # as llama_jax 0.1.0 left a zero chunk
    capsys.readouterr()
    for run in (lambda: infer_main([str(tmp_path / "ckpt"), "--prompt", "hi", "--max-new-tokens", "4"]),
                lambda: convert_main(["export", str(tmp_path / "ckpt"), str(tmp_path / "back")])):
        assert run() == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"error: {leaf}: chunk c/1/0/0 missing" in err, err
    assert not (tmp_path / "back").exists()


@st.composite
def leaves_with_zero_chunks(draw, config):
    """(path, array) for every leaf of `config`: random values with a random set of whole chunks (as the storage
    splits the leaf, at float32) set to zero, and some exact zeros inside other chunks."""
    leaves = []
    for path, shape in zip(param_paths(config), (s.shape for s in jax.tree.leaves(lj.param_shapes(config))),
                           strict=True):
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        value = rng.standard_normal(shape).astype(np.float32) * (rng.random(shape) > 0.1)
        chunk = leaf_store.chunk_shape(shape, 4, stacked=path[0] == "layers")
        grid = [-(-size // c) for size, c in zip(shape, chunk, strict=True)]
        zero = draw(st.lists(st.booleans(), min_size=int(np.prod(grid)), max_size=int(np.prod(grid))))
        for index, is_zero in zip(np.ndindex(*grid), zero, strict=True):
            if is_zero:
                value[tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunk, strict=True))] = 0
        leaves.append((path, value))
    return leaves


TINY_CONFIG = lj.preset("tiny").replace(attention_bias=True, mlp_bias=True, vocab_size=64)


@settings(max_examples=12, deadline=None)
@given(leaves=leaves_with_zero_chunks(TINY_CONFIG), dtype=st.sampled_from(["float32", "bfloat16"]))
def test_any_leaves_round_trip_whatever_chunks_are_zero(leaves, dtype):
    with tempfile.TemporaryDirectory() as root, pytest.MonkeyPatch.context() as patch:
        patch.setattr(leaf_store, "CHUNK_BYTES", 512)  # many chunks per leaf
        write_checkpoint(Path(root) / "ckpt", TINY_CONFIG, iter(leaves), dtype=dtype, source="test",
                         tokenizer_json=None, chat_template=None, generation_config={})
        restored = jax.tree_util.tree_flatten_with_path(load_params(open_checkpoint(Path(root) / "ckpt")))[0]
    expected_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    for (path, expected), (_, got) in zip(leaves, restored, strict=True):
        np.testing.assert_array_equal(np.asarray(got), expected.astype(expected_dtype), err_msg=str(path))
