"""Generation: samplers, the engine (batched prefill, an on-device decode loop over a static KV cache) and
sliding-window perplexity.
Imports `model` only. `PagedEngine` (paged_engine.py) serves requests that join and leave a running batch over a
paged KV pool with a prefix cache; `Scheduler` runs it on a thread."""

from llama_jax.generation.engine import (Completion, Engine, Generation, bucket, cache_length, enable_compilation_cache,
                                         left_pad, prefill_lengths)
from llama_jax.generation.paged_engine import Output, PagedEngine, Request, Token
from llama_jax.generation.paged_steps import block_size_for, check_sizes, compile_all
from llama_jax.generation.penalties import (MAX_LOGIT_BIAS, Counts, PenaltyRows, mask_words, penalize, penalty_rows,
                                             token_counts)
from llama_jax.generation.sampling import GREEDY, SamplingParams, SamplingRows, row_keys, sample, sampling_rows
from llama_jax.generation.drafting import DraftModel
from llama_jax.generation.speculation import NgramProposer, verify_pages
from llama_jax.generation.scheduler import QueueFull, Scheduler, Ticket, Update
from llama_jax.generation.steps import EMPTY, DecodeState, Emitted, decode_loop, decode_step, prefill
from llama_jax.generation.scoring import Perplexity, perplexity, sliding_windows, token_logprobs

__all__ = [
    "MAX_LOGIT_BIAS", "Counts", "PenaltyRows", "mask_words", "penalize", "penalty_rows", "token_counts",
    "EMPTY", "GREEDY", "Completion", "DecodeState", "Emitted", "Engine", "Generation", "Perplexity", "SamplingParams",
    "SamplingRows", "bucket", "cache_length", "decode_loop", "decode_step", "enable_compilation_cache", "left_pad",
    "perplexity", "prefill", "row_keys", "sample", "sampling_rows", "sliding_windows", "Output", "PagedEngine",
    "block_size_for", "compile_all", "Request", "Token", "check_sizes", "prefill_lengths", "QueueFull", "Scheduler",
    "Ticket", "Update", "token_logprobs", "NgramProposer", "verify_pages", "DraftModel",
]
