"""The model math and nothing else: config and presets, the decoder and `forward`, attention, RoPE, norm, MLP,
weight declaration (every matmul goes through `weights.project`), int8 weights (`quant`), LoRA adapters on the
projections (`lora`), the KV cache (float or int8), logical-axis sharding rules and FLOP counts. Imports nothing
from the rest of the package except `llama_jax.errors`."""

from llama_jax.model.attention import ATTENTION_IMPLS, attend
from llama_jax.model.cache import CACHE_NAMES, KVCache, init_cache
from llama_jax.model.config import LlamaConfig, RopeScaling
from llama_jax.model.decoder import (COMPUTE_DTYPES, REMAT_POLICIES, Remat, check_attention, forward, init_params,
                                     param_logical_names, param_shapes, param_shardings, unstack_layers)
from llama_jax.model.int8_kernel import Tiles, einsum_product, rows_product
from llama_jax.model.flops import forward_flops_per_token, matmul_params, measured_peak_flops, training_flops_per_token
from llama_jax.model.lora import (LORA_TARGETS, LoraWeight, MultiLoraWeight, adapter_count, attach, attach_many,
                                  init_adapters, select_adapters)
from llama_jax.model.paged import (NULL_BLOCK, POOL_NAMES, PagedCache, Pages, chunk_blocks, copy_blocks,
                                   init_paged_cache, paged_attend)
from llama_jax.model.presets import PRESETS, preset
from llama_jax.model.quant import (QUANTIZATIONS, QuantArray, check_quantization, input_axes, is_quantized_leaf,
                                   quantize, quantize_tree, rows_layout)
from llama_jax.model.rope import inverse_frequencies
from llama_jax.model.sharding import MESH_AXES, make_mesh, named_sharding, place, tree_shardings
from llama_jax.model.weights import CPU_NARROW_WEIGHT_OPTIONS, narrow_weight_options, project

__all__ = [
    "ATTENTION_IMPLS", "CACHE_NAMES", "COMPUTE_DTYPES", "CPU_NARROW_WEIGHT_OPTIONS", "KVCache", "LORA_TARGETS",
    "LlamaConfig", "LoraWeight", "MESH_AXES", "MultiLoraWeight", "NULL_BLOCK", "POOL_NAMES",
    "PRESETS", "PagedCache", "Pages", "QUANTIZATIONS", "QuantArray", "REMAT_POLICIES", "Remat",
    "RopeScaling", "Tiles", "adapter_count", "attach", "attach_many", "attend", "check_attention", "chunk_blocks",
    "check_quantization", "copy_blocks", "einsum_product",
    "forward", "forward_flops_per_token",
    "init_adapters", "init_cache", "init_paged_cache", "init_params", "input_axes", "inverse_frequencies",
    "is_quantized_leaf", "make_mesh", "matmul_params", "measured_peak_flops", "named_sharding",
    "narrow_weight_options",
    "paged_attend", "param_logical_names", "param_shapes", "param_shardings", "place", "preset", "project", "quantize",
    "quantize_tree", "rows_layout", "rows_product", "select_adapters", "training_flops_per_token", "tree_shardings",
    "unstack_layers",
]
