"""Hugging Face `LlamaForCausalLM` state-dict names and layouts <-> this package's params tree, both ways.

Both sides use the rotate-half RoPE layout of q/k rows, so the mapping is only renames, transposes and reshapes
(exact). Each entry maps one leaf of our tree to one HF tensor (per layer for stacked leaves), so converters can
stream a checkpoint one stacked tensor at a time: see `TensorMapping` and `tensor_mappings`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from llama_jax.model import LlamaConfig

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """One params leaf at `path`; its HF tensor is `hf_name` (with `{i}` = layer index for stacked leaves).

    to_ours / to_hf convert one (per-layer) tensor between the HF layout `hf_shape` and ours `shape`.
    """

    path: tuple[str, ...]
    hf_name: str
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]
    to_ours: Callable[[Array], Array]
    to_hf: Callable[[Array], Array]

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_name

    def hf_names(self, config: LlamaConfig) -> list[str]:
        if not self.stacked:
            return [self.hf_name]
        return [self.hf_name.format(i=i) for i in range(config.num_hidden_layers)]


def _linear(path, hf_name, out_shape: tuple[int, ...], in_shape: tuple[int, ...]) -> TensorMapping:
    """An nn.Linear weight `[out, in]` (flattened) stored by us as `[*in_shape, *out_shape]`."""
    n_out, n_in = int(np.prod(out_shape)), int(np.prod(in_shape))
    return TensorMapping(path, hf_name, (n_out, n_in), in_shape + out_shape,
                         to_ours=lambda w: w.T.reshape(in_shape + out_shape),
                         to_hf=lambda w: w.reshape(n_in, n_out).T)


def _reshape(path, hf_name, shape: tuple[int, ...], hf_shape: tuple[int, ...] | None = None) -> TensorMapping:
    """A HF tensor of `hf_shape` (default: flat, `[prod(shape)]`) stored by us as `shape`."""
    hf_shape = hf_shape or (int(np.prod(shape)),)
    return TensorMapping(path, hf_name, hf_shape, shape, to_ours=lambda w: w.reshape(shape),
                         to_hf=lambda w: w.reshape(hf_shape))


def tensor_mappings(config: LlamaConfig) -> list[TensorMapping]:
    """Every tensor of the model for this config (biases and lm_head only when the config has them)."""
    c = config
    e, h, k, d, m = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size
    layer = "model.layers.{i}."
    maps = [
        _reshape(("embed",), "model.embed_tokens.weight", (c.vocab_size, e), (c.vocab_size, e)),
        _reshape(("layers", "attn_norm", "scale"), layer + "input_layernorm.weight", (e,)),
        _linear(("layers", "attn", "q"), layer + "self_attn.q_proj.weight", (h, d), (e,)),
        _linear(("layers", "attn", "k"), layer + "self_attn.k_proj.weight", (k, d), (e,)),
        _linear(("layers", "attn", "v"), layer + "self_attn.v_proj.weight", (k, d), (e,)),
        _linear(("layers", "attn", "o"), layer + "self_attn.o_proj.weight", (e,), (h, d)),
        _reshape(("layers", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight", (e,)),
        _linear(("layers", "mlp", "gate"), layer + "mlp.gate_proj.weight", (m,), (e,)),
        _linear(("layers", "mlp", "up"), layer + "mlp.up_proj.weight", (m,), (e,)),
        _linear(("layers", "mlp", "down"), layer + "mlp.down_proj.weight", (e,), (m,)),
        _reshape(("final_norm", "scale"), "model.norm.weight", (e,)),
    ]
    if c.attention_bias:
        maps += [_reshape(("layers", "attn", f"{n}_bias"), layer + f"self_attn.{n}_proj.bias", shape)
                 for n, shape in (("q", (h, d)), ("k", (k, d)), ("v", (k, d)), ("o", (e,)))]
    if c.mlp_bias:
        maps += [_reshape(("layers", "mlp", f"{n}_bias"), layer + f"mlp.{n}_proj.bias", (size,))
                 for n, size in (("gate", m), ("up", m), ("down", e))]
    if not c.tie_word_embeddings:
        maps.append(_linear(("lm_head",), "lm_head.weight", (c.vocab_size,), (e,)))
    return maps


def load_stacked(mapping: TensorMapping, get: Callable[[str], Array], config: LlamaConfig) -> Array:
    """Our leaf for `mapping`, reading HF tensors with `get(name)` (layers stacked on axis 0). Shapes checked.

    Layers are written into one preallocated array, so peak memory is the leaf plus one HF tensor.
    """
    names = mapping.hf_names(config)
    out = None
    for i, name in enumerate(names):
        tensor = get(name)
        if tuple(tensor.shape) != mapping.hf_shape:
            raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}, the config implies {mapping.hf_shape}")
        if not mapping.stacked:
            return mapping.to_ours(tensor)
        if out is None:
            out = np.empty((len(names), *mapping.shape), tensor.dtype)
        out[i] = mapping.to_ours(tensor)
        del tensor
    return out


def unstack(mapping: TensorMapping, leaf: Array, config: LlamaConfig) -> Iterator[tuple[str, Array]]:
    """The HF (name, tensor) pairs of one of our leaves (a stacked leaf may be any iterable of its layers)."""
    if not mapping.stacked:
        yield mapping.hf_name, mapping.to_hf(leaf)
        return
    for name, layer in zip(mapping.hf_names(config), leaf, strict=True):
        yield name, mapping.to_hf(layer)


def params_from_hf(state_dict: dict[str, Array] | Callable[[str], Array], config: LlamaConfig) -> dict[str, Any]:
    """Our params tree (numpy) from a HF state dict (name -> array) or a getter; KeyError names a missing tensor."""
    get = state_dict.__getitem__ if isinstance(state_dict, dict) else state_dict
    params: dict[str, Any] = {}
    for mapping in tensor_mappings(config):
        *parents, leaf = mapping.path
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = load_stacked(mapping, get, config)
    return params


def params_to_hf(params: dict[str, Any], config: LlamaConfig) -> dict[str, Array]:
    """A HF state dict (name -> numpy array, in the params' dtype) from our params tree."""
    state_dict = {}
    for mapping in tensor_mappings(config):
        leaf = params
        for key in mapping.path:
            leaf = leaf[key]
        state_dict.update(unstack(mapping, np.asarray(leaf), config))
    return state_dict
