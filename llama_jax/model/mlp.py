"""The SwiGLU feed-forward block: down(silu(gate(x)) * up(x))."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.model.config import LlamaConfig
from llama_jax.model.sharding import constrain
from llama_jax.model.weights import project, weight


class MLP(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def project(self, name: str, x: jax.Array, names: tuple[str, str], shape: tuple[int, int]) -> jax.Array:
        """x `[batch, seq, in]` @ W `[in, out]` (+ bias `[out]` when the config has mlp_bias)."""
        out = project("bsi,io->bso", x, weight(self, name, names, shape))
        if self.config.mlp_bias:
            out = out + weight(self, f"{name}_bias", names[1:], shape[1:], nn.initializers.zeros)
        return out

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: `[batch, seq, embed]` -> `[batch, seq, embed]`."""
        up_shape = (self.config.hidden_size, self.config.intermediate_size)
        gate = self.project("gate", x, ("embed", "mlp"), up_shape)
        up = self.project("up", x, ("embed", "mlp"), up_shape)
        hidden = constrain(nn.silu(gate) * up, ("batch", "seq", "mlp"))
        return self.project("down", hidden, ("mlp", "embed"), up_shape[::-1])
