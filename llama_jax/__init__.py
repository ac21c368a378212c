"""llama_jax: Llama 3 in JAX/Flax. Given a config and params, `forward` returns logits.

    import llama_jax as lj
    config = lj.preset("tiny")
    params = lj.init_params(config, jax.random.key(0))
    logits, _ = lj.forward(params, tokens, config)          # tokens [batch, seq] -> [batch, seq, vocab] float32
"""

from llama_jax.cache import KVCache, init_cache
from llama_jax.config import LlamaConfig, RopeScaling
from llama_jax.errors import InputError
from llama_jax.model import (forward, init_params, param_logical_names, param_shapes, param_shardings,
                             unstack_layers)
from llama_jax.presets import PRESETS, preset
from llama_jax.sharding import make_mesh

__all__ = [
    "InputError", "KVCache", "LlamaConfig", "PRESETS", "RopeScaling", "forward", "init_cache", "init_params",
    "make_mesh", "param_logical_names", "param_shapes", "param_shardings", "preset",
    "unstack_layers",
]
