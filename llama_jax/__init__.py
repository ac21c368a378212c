"""llama_jax: Llama 3 in JAX/Flax. Given a config and params, `forward` returns logits.

    import llama_jax as lj
    config = lj.preset("tiny")
    params = lj.init_params(config, jax.random.key(0))
    logits, _ = lj.forward(params, tokens, config)          # tokens [batch, seq] -> [batch, seq, vocab] float32

The package, bottom to top (each imports only those below it; `tests/test_layout.py` holds it to that):
    errors       the one user-facing error type
    model        the math: config, presets, decoder, attention, cache, sharding rules, FLOP counts
    checkpoints  HF directories, GGUF files, our checkpoint directory, conversions, atomic writes
    text         tokenizer-side: chat templates, streamed decoding, records -> token ids
    generation   samplers and the generation engine          | training  loss, optimizer, step, data, runs
"""

from llama_jax.errors import InputError
from llama_jax.model import (PRESETS, KVCache, LlamaConfig, RopeScaling, forward, init_cache, init_params, make_mesh,
                             param_logical_names, param_shapes, param_shardings, preset, unstack_layers)

__all__ = [
    "InputError", "KVCache", "LlamaConfig", "PRESETS", "RopeScaling", "forward", "init_cache", "init_params",
    "make_mesh", "param_logical_names", "param_shapes", "param_shardings", "preset",
    "unstack_layers",
]
