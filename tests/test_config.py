"""Config: HF config.json in both rope forms, round trips, presets, and clear errors."""

import json

import pytest
from conftest import FIXTURES

import llama_jax as lj
from llama_jax.model.config import LlamaConfig, RopeScaling

LLAMA31_LEGACY = {  # the shape of Meta's published Llama 3.1 8B config.json (older keys)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "vocab_size": 128256,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "max_position_embeddings": 131072,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
}


def test_legacy_keys_match_preset():
    config = LlamaConfig.from_hf(LLAMA31_LEGACY)
    assert config.replace(eos_token_id=(128001,)) == lj.preset("llama3.1-8b")
    assert config.eos_token_id == (128001, 128008, 128009)
    assert config.head_dim == 128


def test_rope_parameters_form_as_transformers_5_writes_it():
    hf = json.loads((FIXTURES / "rope_scaling" / "config.json").read_text())
    assert "rope_parameters" in hf and "rope_scaling" not in hf
    config = LlamaConfig.from_hf(hf)
    assert config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 32)
    assert config.rope_theta == hf["rope_parameters"]["rope_theta"]


@pytest.mark.parametrize("name", sorted(lj.PRESETS))
def test_hf_round_trip(name):
    config = lj.preset(name)
    assert LlamaConfig.from_hf(json.loads(json.dumps(config.to_hf()))) == config


@pytest.mark.parametrize("name", sorted(lj.PRESETS))
def test_transformers_reads_our_config_json(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = lj.preset(name)
    config.save(tmp_path / "config.json")
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert LlamaConfig.from_hf(hf.to_dict()) == config


def test_known_parameter_counts():
    import math

    import jax
    counts = {name: sum(math.prod(x.shape) for x in jax.tree.leaves(lj.param_shapes(lj.preset(name))))
              for name in ("llama3-8b", "llama3.2-1b", "smollm2-135m")}
    assert counts == {"llama3-8b": 8_030_261_248, "llama3.2-1b": 1_235_814_400, "smollm2-135m": 134_515_008}


def test_errors_name_the_file(tmp_path):
    with pytest.raises(lj.InputError, match="config.json: missing config.json"):
        LlamaConfig.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA31_LEGACY, "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(lj.InputError, match=r"config.json: unsupported architecture"):
        LlamaConfig.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA31_LEGACY, "rope_scaling": {"rope_type": "yarn"}}))
    with pytest.raises(lj.InputError, match="unsupported rope_type 'yarn'"):
        LlamaConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(lj.InputError, match="not valid JSON"):
        LlamaConfig.load(tmp_path)
    with pytest.raises(ValueError, match="unknown preset"):
        lj.preset("llama9")


BAD_CONFIGS = [  # (change to LLAMA31_LEGACY, what the one-line error says)
    ({"num_hidden_layers": -3}, "num_hidden_layers must be a positive integer, got -3"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer, got 0"),
    ({"hidden_size": "4096"}, "hidden_size must be a positive integer, got '4096'"),
    ({"intermediate_size": 14336.5}, "intermediate_size must be a positive integer, got 14336.5"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    ({"num_attention_heads": None}, "num_attention_heads must be a positive integer, got None"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer, got 0"),
    ({"num_key_value_heads": 5}, r"num_attention_heads \(32\) must be a multiple of num_key_value_heads \(5\)"),
    ({"head_dim": 0}, "head_dim must be a positive integer, got 0"),
    ({"head_dim": 127}, "head_dim must be even"),
    ({"hidden_size": 16}, "head_dim must be a positive integer, got 0"),  # 16 // 32 heads
    ({"max_position_embeddings": 0}, "max_position_embeddings must be a positive integer, got 0"),
    ({"rms_norm_eps": -1e-5}, "rms_norm_eps must be a positive number, got -1e-05"),
    ({"rope_theta": None}, "rope_theta must be a positive number, got None"),
    ({"rope_scaling": {**LLAMA31_LEGACY["rope_scaling"], "high_freq_factor": 1.0}},
     r"rope_scaling.high_freq_factor \(1.0\) must be greater than low_freq_factor \(1.0\)"),
    ({"rope_scaling": {**LLAMA31_LEGACY["rope_scaling"], "factor": 0}},
     "rope_scaling.factor must be a positive number, got 0"),
    ({"eos_token_id": [128001, 200000]}, r"eos_token_id must be a token id below vocab_size \(128256\), got 200000"),
    ({"bos_token_id": -1}, "bos_token_id must be a token id below vocab_size"),
]


@pytest.mark.parametrize("change, message", BAD_CONFIGS, ids=[str(c) for c, _ in BAD_CONFIGS])
def test_every_field_is_checked_on_load(tmp_path, change, message):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA31_LEGACY, **change}))
    with pytest.raises(lj.InputError, match=message) as error:
        LlamaConfig.load(tmp_path)
    assert str(error.value).startswith(f"{tmp_path / 'config.json'}: ") and "\n" not in str(error.value)


def test_a_config_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(lj.InputError, match="config.json: not a JSON object but list"):
        LlamaConfig.load(tmp_path)
