"""What int8 weights and the int8 KV cache do to the real SmolLM2-135M-Instruct: perplexity, KL, greedy agreement.

The float32 perplexity these are measured against equals transformers' (tests/test_infer.py). The numbers are
printed (pytest -s) and recorded in BENCHMARKS.md ("int8 quality").
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as lj
from infer.__main__ import main as infer_main
from llama_jax.checkpoints import load_params, open_checkpoint
from llama_jax.generation import Engine
from llama_jax.text import encoder_for

LICENCE = Path("/usr/share/common-licenses/GPL-3")  # a real English text from Debian's base system
PROMPTS = ["Once upon a time, in a land far away,", "The three primary colors are",
           "def fibonacci(n):", "The capital of France is", "Water boils at a temperature of",
           "In 1969, the first humans", "My favourite recipe for pancakes", "The theory of relativity says"]


def perplexity(capsys, checkpoint, text_file, *args) -> dict:
    code = infer_main([str(checkpoint), "--perplexity", str(text_file), "--json", *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert np.isfinite(result["nll"])
    return result


def test_int8_perplexity_is_within_bounds(smollm2_checkpoint, tmp_path, capsys):
    """~2,600 tokens of the GPL, context 512, stride 256: int8 weights within 3% of float32; an int8 KV cache within
    1% of the same model through a float32 cache (both scored through the cache, as generation runs)."""
    (tmp_path / "text.txt").write_text(LICENCE.read_text()[:12000])
    floats = perplexity(capsys, smollm2_checkpoint, tmp_path / "text.txt")
    weights = perplexity(capsys, smollm2_checkpoint, tmp_path / "text.txt", "--quantize", "int8")
    float_cache = perplexity(capsys, smollm2_checkpoint, tmp_path / "text.txt", "--kv-cache", "float32")
    int8_cache = perplexity(capsys, smollm2_checkpoint, tmp_path / "text.txt", "--kv-cache", "int8")
    ratios = {"int8 weights": weights["perplexity"] / floats["perplexity"],
              "int8 KV cache": int8_cache["perplexity"] / float_cache["perplexity"]}
    print(f"\nperplexity float32 {floats['perplexity']:.4f}, int8 weights {weights['perplexity']:.4f}, "
          f"float32 cache {float_cache['perplexity']:.4f}, int8 cache {int8_cache['perplexity']:.4f}; {ratios}")
    assert floats["tokens"] == weights["tokens"] == int8_cache["tokens"] > 2000
    assert abs(float_cache["perplexity"] / floats["perplexity"] - 1) < 1e-4  # the cached path is the same model
    assert ratios["int8 weights"] - 1 < 0.03 and ratios["int8 KV cache"] - 1 < 0.01, ratios
    assert ratios["int8 weights"] != 1 and ratios["int8 KV cache"] != 1  # both really quantize


@pytest.fixture(scope="module")
def smollm2(smollm2_checkpoint):
    checkpoint = open_checkpoint(smollm2_checkpoint)
    return (checkpoint, load_params(checkpoint, per_layer=True),
            load_params(checkpoint, per_layer=True, quantize="int8"))


def test_mean_kl_of_int8_weights_is_small(smollm2, smollm2_checkpoint):
    """Mean KL(float32 || int8) of the next-token distributions over the first 512 tokens of the GPL (nats)."""
    checkpoint, floats, ints = smollm2
    ids = encoder_for(checkpoint).tokenizer.encode(LICENCE.read_text()[:4000]).ids[:512]
    logits = [jax.jit(lj.forward, static_argnames="config")(p, jnp.array([ids]), checkpoint.config)[0][0]
              for p in (floats, ints)]
    logp, logq = (jax.nn.log_softmax(x, axis=-1) for x in logits)
    kl = float(jnp.mean(jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)))
    print(f"\nmean KL(float32 || int8 weights) over {len(ids)} positions: {kl:.5f} nats")
    assert np.isfinite(kl) and 0 < kl < 0.02


def teacher_forced_agreement(config, params, prompts, generated, cache_dtype=None) -> float:
    """The share of float32's greedy tokens that `params` (through a cache of `cache_dtype`) also ranks first, each
    given float32's tokens before it."""
    agree = total = 0
    for prompt, tokens in zip(prompts, generated, strict=True):
        sequence = jnp.array([prompt + tokens[:-1]])
        cache = None if cache_dtype is None else lj.init_cache(config, 1, sequence.shape[1], cache_dtype)
        logits, _ = lj.forward(params, sequence, config, cache=cache)
        predicted = np.asarray(jnp.argmax(logits[0, len(prompt) - 1:], axis=-1))
        agree, total = agree + int(np.sum(predicted == np.array(tokens))), total + len(tokens)
    return agree / total


def test_greedy_tokens_mostly_agree_with_float32(smollm2):
    """32 greedy tokens after 8 prompts, teacher-forced: int8 weights and the int8 KV cache each pick float32's token
    at (nearly) every step; and the Engine runs both end to end, its first tokens equal to float32's."""
    checkpoint, floats, ints = smollm2
    config, tokenizer = checkpoint.config, encoder_for(checkpoint).tokenizer
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]
    reference = Engine(floats, config, max_len=64).generate(prompts, max_new_tokens=32)
    generated = [c.tokens for c in reference.completions]
    assert all(len(tokens) == 32 for tokens in generated)
    weights = teacher_forced_agreement(config, ints, prompts, generated)
    cache = teacher_forced_agreement(config, floats, prompts, generated, jnp.int8)
    print(f"\nteacher-forced greedy agreement with float32 over {32 * len(prompts)} tokens: int8 weights "
          f"{weights:.3f}, int8 KV cache {cache:.3f}")
    assert weights >= 0.9 and cache >= 0.95
    quantized = Engine(ints, config, max_len=64, cache_dtype=jnp.int8).generate(prompts, max_new_tokens=32)
    free_running = [a.tokens[:4] == b.tokens[:4] for a, b in zip(quantized.completions, reference.completions,
                                                                    strict=True)]
    assert sum(free_running) >= 6, free_running
