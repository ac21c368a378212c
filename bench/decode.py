"""Generation runs: llama_jax's `Engine` and, as the peer, transformers' `generate`, on the same prompts.

Each runner is built once (weights placed, compiled/warmed up: compile time reported apart) and then called
once per round; a call returns {"ttft_s", "decode_tok_s", ...} for one greedy generation of exactly
`new_tokens` tokens per row (no early stop).
"""

from __future__ import annotations

import time

import numpy as np

from llama_jax.generation import Engine, bucket


def random_prompts(vocab_size: int, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    """`batch` prompts of `length` token ids, distinct per row, avoiding the first ids (special tokens)."""
    rng = np.random.default_rng(seed)
    return rng.integers(3, vocab_size, size=(batch, length)).tolist()


class OurGenerate:
    """`Engine.generate` with a cache of bucket(prompt) + new_tokens slots, greedy, stop_ids=()."""

    def __init__(self, params, config, *, dtype, batch: int, prompt_len: int, new_tokens: int, seed: int = 0,
                 attention: str = "xla"):
        self.prompts = random_prompts(config.vocab_size, batch, prompt_len, seed)
        self.new_tokens = new_tokens
        self.engine = Engine(params, config, max_len=bucket(prompt_len) + new_tokens, cache_dtype=dtype, dtype=dtype,
                             attention=attention)
        start = time.perf_counter()
        warm = self.engine.generate(self.prompts, max_new_tokens=min(2, new_tokens), stop_ids=())
        self.compile_s = warm.compile_s  # both programs (prefill, decode loop) are compiled by this first call
        self.warmup_s = time.perf_counter() - start

    def __call__(self) -> dict:
        result = self.engine.generate(self.prompts, max_new_tokens=self.new_tokens, stop_ids=())
        lengths = {len(c.tokens) for c in result.completions}
        assert lengths == {self.new_tokens}, f"expected {self.new_tokens} tokens per row, got {lengths}"
        assert result.compile_s == 0, "recompiled after warm-up"
        return {"ttft_s": result.ttft_s, "decode_s": result.decode_s, "decode_tok_s": result.decode_tokens_per_s}


def _first_token_clock():
    """A transformers streamer that notes when the first generated tokens reach it (the first `put` is the prompt)."""
    from transformers.generation.streamers import BaseStreamer

    class FirstTokenClock(BaseStreamer):
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:
                self.first = time.perf_counter()

        def end(self):
            pass

    return FirstTokenClock()


class PeerGenerate:
    """transformers `generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)` on the same prompts."""

    def __init__(self, model, *, batch: int, prompt_len: int, new_tokens: int, vocab_size: int, seed: int = 0):
        import torch

        self.torch, self.model, self.new_tokens, self.batch = torch, model, new_tokens, batch
        self.ids = torch.tensor(random_prompts(vocab_size, batch, prompt_len, seed))
        start = time.perf_counter()
        self._generate(min(2, new_tokens))
        self.warmup_s = time.perf_counter() - start
        self.compile_s = 0.0

    def _generate(self, new_tokens: int, streamer=None):
        with self.torch.inference_mode():
            return self.model.generate(self.ids, attention_mask=self.torch.ones_like(self.ids), do_sample=False,
                                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=streamer,
                                       pad_token_id=self.model.config.eos_token_id, temperature=None, top_p=None,
                                       top_k=None)

    def __call__(self) -> dict:
        clock = _first_token_clock()
        start = time.perf_counter()
        out = self._generate(self.new_tokens, clock)
        end = time.perf_counter()
        assert out.shape[1] - self.ids.shape[1] == self.new_tokens
        decode_s = end - clock.first
        return {"ttft_s": clock.first - start, "decode_s": decode_s,
                "decode_tok_s": self.batch * (self.new_tokens - 1) / decode_s}
