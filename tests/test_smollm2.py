"""The real model: SmolLM2-135M-Instruct (GGUF, Q4_1) through the converter, against transformers."""

import jax
import numpy as np
import pytest
from gguf_files import TINY, hf_tensors, tiny_gguf_file, to_llama_cpp
from hf_dirs import read_hf_tensors

import llama_jax as lj
from convert.__main__ import main as convert_main
from llama_jax.checkpoints.directory import load_params, open_checkpoint

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def our_logits(checkpoint_dir, tokens):
    checkpoint = open_checkpoint(checkpoint_dir)
    params = load_params(checkpoint)
    logits, _ = jax.jit(lj.forward, static_argnames="config")(params, np.asarray([tokens]), checkpoint.config)
    return np.asarray(logits[0])


@pytest.fixture(scope="module")
def prompt_ids(smollm2_checkpoint):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(open_checkpoint(smollm2_checkpoint).tokenizer_path)).encode(PROMPT).ids


@pytest.fixture(scope="module")
def reference_logits(hf_smollm2_model, prompt_ids):
    import torch

    with torch.no_grad():
        return hf_smollm2_model(torch.tensor([prompt_ids])).logits[0].numpy()


def test_checkpoint_files(smollm2_checkpoint):
    checkpoint = open_checkpoint(smollm2_checkpoint)
    config = checkpoint.config
    assert config.rms_norm_eps == pytest.approx(1e-5)  # GGUF stores it as float32
    assert config.replace(rms_norm_eps=1e-5) == lj.preset("smollm2-135m")
    assert "<|im_start|>" in checkpoint.chat_template
    assert 2 in checkpoint.stop_ids  # <|im_end|>
    assert checkpoint.metadata["dtype"] == "float32" and checkpoint.metadata["source"].endswith(".gguf")


def test_logits_match_transformers_on_the_same_gguf(smollm2_checkpoint, prompt_ids, reference_logits):
    ours = our_logits(smollm2_checkpoint, prompt_ids)
    assert np.isfinite(ours).all() and np.abs(reference_logits).max() > 5
    assert np.abs(ours - reference_logits).max() < 1e-3  # 30 layers, logits up to ~30: fp32 reduction noise
    assert (ours.argmax(-1) == reference_logits.argmax(-1)).all()
    print("max abs logit difference vs transformers:", np.abs(ours - reference_logits).max())


def test_export_reloads_in_transformers_with_the_same_logits(smollm2_checkpoint, prompt_ids, reference_logits,
                                                               tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert convert_main(["export", str(smollm2_checkpoint), str(tmp_path / "hf")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0].numpy()
    assert np.abs(logits - reference_logits).max() < 1e-3
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.encode(PROMPT) == prompt_ids
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith(
        "<|im_start|>")


def _assert_cli_error(tmp_path, capsys, source, phrase):
    assert convert_main(["gguf", str(source), str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {source}: ") and "\n" not in err and phrase in err, err
    assert not (tmp_path / "ckpt").exists()


def test_gguf_of_another_architecture(tmp_path, capsys):
    _assert_cli_error(tmp_path, capsys, tiny_gguf_file(tmp_path / "gpt2.gguf", arch="gpt2"), "gpt2")


def test_gguf_with_an_unsupported_quantization(tmp_path, capsys):
    import gguf

    tensors = to_llama_cpp(hf_tensors(np.random.default_rng(0), **TINY), **TINY)
    rows, cols = tensors["blk.0.ffn_down.weight"].shape
    block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    tensors["blk.0.ffn_down.weight"] = (np.zeros((rows, cols // block * block_bytes), np.uint8),
                                        gguf.GGMLQuantizationType.Q8_1)
    _assert_cli_error(tmp_path, capsys, tiny_gguf_file(tmp_path / "q81.gguf", tensors=tensors), "Q8_1")


def test_gguf_with_a_corrupt_header(tmp_path, capsys):
    path = tiny_gguf_file(tmp_path / "corrupt.gguf")
    data = bytearray(path.read_bytes())
    data[:4] = b"NOPE"
    path.write_bytes(bytes(data))
    _assert_cli_error(tmp_path, capsys, path, "")


def test_missing_gguf(tmp_path, capsys):
    _assert_cli_error(tmp_path, capsys, tmp_path / "absent.gguf", "")


def test_tiny_gguf_round_trips_to_the_hf_tensors_it_was_made_from(tmp_path):
    """GGUF -> checkpoint -> HF gives back the tensors llama.cpp's converter started from, q/k order included."""
    hf = hf_tensors(np.random.default_rng(0), **TINY)
    path = tiny_gguf_file(tmp_path / "tiny.gguf", tensors=to_llama_cpp(hf, **TINY))
    assert convert_main(["gguf", str(path), str(tmp_path / "ckpt")]) == 0
    assert convert_main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    back = read_hf_tensors(tmp_path / "hf")
    assert back.keys() == hf.keys()
    assert all(np.array_equal(back[n], hf[n]) for n in hf)
