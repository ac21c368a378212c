"""Generation: samplers, the engine (batched prefill, an on-device decode loop over a static KV cache) and
sliding-window perplexity.
Imports `model` only; a serving engine belongs beside `engine.py`."""

from llama_jax.generation.engine import (Completion, DecodeState, Engine, Generation, bucket, cache_length,
                                         decode_loop, decode_step, enable_compilation_cache, left_pad, prefill)
from llama_jax.generation.sampling import GREEDY, SamplingParams, row_keys, sample
from llama_jax.generation.scoring import Perplexity, perplexity, sliding_windows

__all__ = [
    "GREEDY", "Completion", "DecodeState", "Engine", "Generation", "Perplexity", "SamplingParams", "bucket",
    "cache_length", "decode_loop", "decode_step", "enable_compilation_cache", "left_pad", "perplexity", "prefill",
    "row_keys", "sample", "sliding_windows",
]
