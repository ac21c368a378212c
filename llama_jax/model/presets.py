"""Named configurations for the real Llama 3.x shapes (as in their published config.json) and tiny test shapes."""

from llama_jax.model.config import LlamaConfig, RopeScaling

_LLAMA3_TOKENS = dict(vocab_size=128256, bos_token_id=128000, eos_token_id=(128001,))
_LLAMA31_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=8192)
_LLAMA32_ROPE = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=8192)

_8B = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, max_position_embeddings=8192, **_LLAMA3_TOKENS)
_70B = _8B.replace(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)
_LONG = dict(rope_scaling=_LLAMA31_ROPE, max_position_embeddings=131072)

PRESETS: dict[str, LlamaConfig] = {
    "llama3-8b": _8B,
    "llama3-70b": _70B,
    "llama3.1-8b": _8B.replace(**_LONG),
    "llama3.1-70b": _70B.replace(**_LONG),
    "llama3.1-405b": _70B.replace(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                                  num_attention_heads=128, **_LONG),
    "llama3.2-1b": _8B.replace(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64,
                               tie_word_embeddings=True, rope_scaling=_LLAMA32_ROPE,
                               max_position_embeddings=131072),
    "llama3.2-3b": _8B.replace(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                               num_attention_heads=24, tie_word_embeddings=True, rope_scaling=_LLAMA32_ROPE,
                               max_position_embeddings=131072),
    "llama3.3-70b": _70B.replace(**_LONG),
    "smollm2-135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                                max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1,
                                eos_token_id=(2,), pad_token_id=2),
    "tiny": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                        bos_token_id=1, eos_token_id=(2,), pad_token_id=0),
    "tiny-gqa": LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                            bos_token_id=1, eos_token_id=(2,), pad_token_id=0),
}


def preset(name: str) -> LlamaConfig:
    """The named preset; ValueError lists the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
