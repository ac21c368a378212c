"""What int8 weights and the int8 KV cache do to the real SmolLM2-135M-Instruct: perplexity, KL, greedy agreement.

The float32 perplexity these are measured against equals transformers' (tests/test_infer.py). The numbers are
printed (pytest -s) and recorded in BENCHMARKS.md ("int8 quality").
"""

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as lj
from infer.__main__ import main as infer_main
from llama_jax.checkpoints import load_params, open_checkpoint
from llama_jax.generation import Engine, perplexity
from llama_jax.text import encoder_for

pytestmark = pytest.mark.slow

LICENCE = Path("/usr/share/common-licenses/GPL-3")  # a real English text from Debian's base system
PROMPTS = ["Once upon a time, in a land far away,", "The three primary colors are",
           "def fibonacci(n):", "The capital of France is", "Water boils at a temperature of",
           "In 1969, the first humans", "My favourite recipe for pancakes", "The theory of relativity says"]


@pytest.fixture(scope="module")
def smollm2(smollm2_checkpoint):
    checkpoint = open_checkpoint(smollm2_checkpoint)
    return (checkpoint, load_params(checkpoint, per_layer=True),
            load_params(checkpoint, per_layer=True, quantize="int8"))


def test_int8_perplexity_is_within_bounds(smollm2, smollm2_checkpoint, tmp_path, capsys):
    """~2,600 tokens of the GPL, context 512, stride 256 (11 windows, one batch): int8 weights within 3% of float32;
    an int8 KV cache (the windows written to it and attended from it) within 1% of float32, which a float32 cache
    equals (tests/test_quantize.py); and the CLI's `--quantize int8 --kv-cache int8` gives the library's number.
    Time (~70 s): five perplexity runs over 11 x 512 tokens of the real model (bounds of 1-3% need this much text)."""
    checkpoint, floats, ints = smollm2
    text = LICENCE.read_text()[:12000]
    ids = encoder_for(checkpoint).tokenizer.encode(text).ids
    score = functools.partial(perplexity, ids=ids, config=checkpoint.config, context=512, stride=256, batch_size=11)
    results = {"float32": score(floats), "int8 weights": score(ints),
               "int8 KV cache": score(floats, cache_dtype=jnp.int8), "both": score(ints, cache_dtype=jnp.int8)}
    ratios = {k: r.perplexity / results["float32"].perplexity for k, r in results.items()}
    assert all(np.isfinite(r.nll) and r.tokens == len(ids) - 1 > 2000 for r in results.values())
    assert 1 < ratios["int8 weights"] < 1.03 and 1 < ratios["int8 KV cache"] < 1.01, ratios
    (tmp_path / "text.txt").write_text(text)
    code = infer_main([str(smollm2_checkpoint), "--perplexity", str(tmp_path / "text.txt"), "--json", "--quantize",
                       "int8", "--kv-cache", "int8", "--batch-size", "11"])
    cli = json.loads(capsys.readouterr().out)
    assert code == 0 and abs(cli["perplexity"] / results["both"].perplexity - 1) < 1e-5
    print("\nperplexity " + ", ".join(f"{k} {r.perplexity:.4f} ({ratios[k]:.4f}x)" for k, r in results.items()))


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
    given float32's tokens before it: every row at once, right-padded (padding is segment 0)."""
    rows = [p + g[:-1] for p, g in zip(prompts, generated, strict=True)]
    width = max(len(r) for r in rows)
    tokens = np.array([r + [0] * (width - len(r)) for r in rows], np.int32)
    segments = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows], np.int32)

    @jax.jit
    def logits(params, tokens, segments):
        cache = None if cache_dtype is None else lj.init_cache(config, len(rows), width, cache_dtype)
        return lj.forward(params, tokens, config, segment_ids=segments, cache=cache)[0]

    predicted = np.asarray(jnp.argmax(logits(params, tokens, segments), axis=-1))
    agree = sum(int(np.sum(predicted[i, len(p) - 1:len(p) - 1 + len(g)] == np.array(g)))
                for i, (p, g) in enumerate(zip(prompts, generated, strict=True)))
    return agree / sum(len(g) for g in generated)


def test_greedy_tokens_mostly_agree_with_float32(smollm2):
    """32 greedy tokens after 8 prompts, teacher-forced: int8 weights and the int8 KV cache each pick float32's token
    at (nearly) every step; and the Engine runs both end to end, its first tokens equal to float32's.
    Time (~35 s): three teacher-forced runs of the real model and two Engines compiled (int8 weights, int8 cache)."""
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
