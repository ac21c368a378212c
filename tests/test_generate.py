"""The engine against transformers' greedy `generate`, against itself across batching, streaming and meshes,
and the cached decode step against the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import VARIANTS, load_fixture

import llama_jax as lj
from llama_jax.generation.engine import Engine, bucket, left_pad
from llama_jax.generation.steps import decode_step
from llama_jax.generation.sampling import SamplingParams

MAX_LEN = 64
SAMPLED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, min_p=0.02)
LENGTHS = [7, 2, 13, 5, 9, 1, 4, 11]  # one batch of 8 prompts: its programs compile once for most tests


@pytest.fixture(scope="module")
def gqa():
    return load_fixture("gqa")


@pytest.fixture(scope="module")
def greedy_engine(gqa):
    config, params, _ = gqa
    return Engine(params, config, max_len=MAX_LEN)


@pytest.fixture(scope="module")
def sampled_engine(gqa):
    config, params, _ = gqa
    return Engine(params, config, max_len=MAX_LEN, sampling=SAMPLED)


def prompts_of(ref, lengths):
    """Distinct prompts of the given lengths, cut from the fixture's reference tokens."""
    pool = np.concatenate([ref["gen_prompt"], ref["tokens"].ravel(), ref["train_tokens"].ravel()]).tolist()
    return [pool[3 * i:3 * i + n] for i, n in enumerate(lengths)]


def tokens_of(generation):
    return [c.tokens for c in generation.completions]


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_equals_transformers_generate(variant, gqa, greedy_engine):
    config, params, ref = gqa if variant == "gqa" else load_fixture(variant)
    engine = greedy_engine if variant == "gqa" else Engine(params, config, max_len=MAX_LEN)
    result = engine.generate([ref["gen_prompt"].tolist()], max_new_tokens=40)
    assert result.completions == [(ref["gen_tokens"].tolist(), "length")]
    assert result.decode_tokens == 39 and result.decode_tokens_per_s > 0 and result.ttft_s > 0


def test_batched_prompts_of_different_lengths_equal_each_alone(gqa, greedy_engine, sampled_engine):
    _, _, ref = gqa
    prompts = prompts_of(ref, LENGTHS)
    batched = tokens_of(greedy_engine.generate(prompts, max_new_tokens=20))
    assert all(len(t) == 20 for t in batched)
    for prompt, row in zip(prompts[:4], batched[:4], strict=True):
        assert tokens_of(greedy_engine.generate([prompt], max_new_tokens=20)) == [row]
    # sampled: a row's tokens depend on its prompt, the seed and its index only, not on the other rows
    sampled = tokens_of(sampled_engine.generate(prompts, max_new_tokens=20, seed=5))
    others = prompts[:1] + prompts[:0:-1]
    assert tokens_of(sampled_engine.generate(others, max_new_tokens=20, seed=5))[0] == sampled[0]


def test_cached_decode_step_equals_full_forward(gqa):
    config, params, ref = gqa
    prompts, new = prompts_of(ref, [9, 4]), 10
    jit_forward = jax.jit(lj.forward, static_argnames=("config", "dtype", "remat"))
    tokens, positions, segments = (jnp.asarray(a) for a in left_pad(prompts, 16))
    logits, cache = jit_forward(params, tokens, config, positions=positions, segment_ids=segments,
                                cache=lj.init_cache(config, batch=2, max_len=32))
    step = jax.jit(decode_step, static_argnames="config")
    cached, generated = [logits[:, -1]], [jnp.argmax(logits[:, -1], -1)]
    for position in positions[:, -1] + 1 + np.arange(new)[:, None]:
        logits, cache = step(params, cache, generated[-1], position, config)
        cached.append(logits)
        generated.append(jnp.argmax(logits, -1))
    # the full forward over prompt + generated tokens, left padded (equal to each row alone: see test_model)
    full_rows = [p + np.stack(generated, 1)[r, :new].tolist() for r, p in enumerate(prompts)]
    tokens, positions, segments = (jnp.asarray(a) for a in left_pad(full_rows, 16 + new))
    full = np.asarray(jit_forward(params, tokens, config, positions=positions, segment_ids=segments)[0])
    np.testing.assert_allclose(np.stack(cached, 1), full[:, -new - 1:], atol=1e-4)


def test_stop_ids_end_their_row_others_run_to_length(gqa, greedy_engine):
    config, _, ref = gqa
    prompts = prompts_of(ref, LENGTHS)
    free = tokens_of(greedy_engine.generate(prompts, max_new_tokens=12))
    stop_ids = (next(t for t in free[0][2:] if t not in free[1]), config.vocab_size - 1)
    expected = [next(((row[:i + 1], "stop") for i, t in enumerate(row) if t in stop_ids), (row, "length"))
                for row in free]
    streamed = []
    result = greedy_engine.generate(prompts, max_new_tokens=12, stop_ids=stop_ids, on_tokens=streamed.append,
                                    stream_chunk=2)
    assert result.completions == expected and {"stop", "length"} <= {reason for _, reason in expected}
    for row, (tokens, _) in enumerate(expected):  # a stopped row streams nothing more
        assert [len(new[row]) for new in streamed] == [1] + [min(2, max(0, len(tokens) - i)) for i in
                                                             range(1, 12, 2)][:len(streamed) - 1]
    every_row_stops = greedy_engine.generate(prompts[:1] * len(LENGTHS), max_new_tokens=12, stop_ids=stop_ids)
    assert tokens_of(every_row_stops) == [expected[0][0]] * len(LENGTHS)
    assert every_row_stops.decode_tokens == len(LENGTHS) * (len(expected[0][0]) - 1)


def test_streaming_gives_the_same_tokens_in_chunks(gqa, greedy_engine):
    _, _, ref = gqa
    prompts = prompts_of(ref, LENGTHS)
    whole = greedy_engine.generate(prompts, max_new_tokens=6)
    streamed = []
    chunked = greedy_engine.generate(prompts, max_new_tokens=6, on_tokens=streamed.append, stream_chunk=2)
    assert chunked.completions == whole.completions
    assert [[len(row) for row in new] for new in streamed] == [[1] * 8, [2] * 8, [2] * 8, [1] * 8]
    assert [sum(row, []) for row in zip(*streamed, strict=True)] == tokens_of(whole)



def test_no_device_call_beyond_the_token_limit(gqa, greedy_engine, monkeypatch):
    """The decode loop queues a chunk only while the calls already made cannot reach max_new_tokens."""
    _, _, ref = gqa
    calls = []
    compiled = greedy_engine._executable

    def counting(fn, *args, **kwargs):
        executable, seconds = compiled(fn, *args, **kwargs)
        return lambda *a: calls.append(fn.__name__) or executable(*a), seconds

    monkeypatch.setattr(greedy_engine, "_executable", counting)
    prompts = prompts_of(ref, LENGTHS)
    greedy_engine.generate(prompts, max_new_tokens=6)
    assert calls == ["prefill", "decode_loop"]  # one call runs the whole decode
    calls.clear()
    greedy_engine.generate(prompts, max_new_tokens=6, on_tokens=lambda new: None, stream_chunk=2)
    assert calls == ["prefill"] + ["decode_loop"] * 3  # 1 + 2 + 2 + 1 tokens

def test_sampling_reproducible_for_a_seed(gqa, sampled_engine):
    _, _, ref = gqa
    prompts = prompts_of(ref, [6] * 8)
    prompts[1] = prompts[0]
    first = tokens_of(sampled_engine.generate(prompts, max_new_tokens=16, seed=11))
    assert tokens_of(sampled_engine.generate(prompts, max_new_tokens=16, seed=11)) == first
    assert tokens_of(sampled_engine.generate(prompts, max_new_tokens=16, seed=12)) != first
    assert first[0] != first[1]  # the same prompt in two rows: each row draws from its own stream


def test_prompt_lengths_in_one_bucket_compile_once(gqa, greedy_engine):
    _, _, ref = gqa
    assert [bucket(n) for n in (1, 16, 17, 33)] == [16, 16, 32, 64]
    greedy_engine.generate(prompts_of(ref, [5]), max_new_tokens=4)
    assert greedy_engine.generate(prompts_of(ref, [11]), max_new_tokens=6).compile_s == 0


def test_bad_requests_raise(greedy_engine):
    with pytest.raises(ValueError, match="at least one token"):
        greedy_engine.generate([[5], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_len=64"):
        greedy_engine.generate([[5] * 60], max_new_tokens=10)
    with pytest.raises(ValueError, match="stream_chunk must be >= 1"):
        greedy_engine.generate([[5]], max_new_tokens=4, on_tokens=print, stream_chunk=0)
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        greedy_engine.generate([[5, 256]], max_new_tokens=4)


def test_bf16_cache(gqa):
    config, params, ref = gqa
    engine = Engine(params, config, max_len=MAX_LEN, cache_dtype=jnp.bfloat16)
    tokens = tokens_of(engine.generate([ref["gen_prompt"].tolist()], max_new_tokens=40))[0]
    assert engine.empty_cache(1).k.dtype == jnp.bfloat16
    assert tokens[:8] == ref["gen_tokens"][:8].tolist()


@pytest.mark.slow  # a memory measurement
def test_bf16_weights_are_never_converted_all_at_once(monkeypatch):
    """XLA:CPU converts bfloat16 weights to float32 to multiply them; the engine's programs must do it one weight at a
    time, not hoist a float32 copy of the whole model out of the decode loop (2x the weights: 32 GB at 8B)."""
    import llama_jax.generation.engine as engine_module

    config = lj.preset("tiny").replace(hidden_size=256, intermediate_size=1024, head_dim=64, num_hidden_layers=4)
    params = lj.init_params(config, jax.random.key(0), dtype=jnp.bfloat16)
    engine = Engine(params, config, max_len=64, dtype=jnp.bfloat16, cache_dtype=jnp.bfloat16)
    prompt = [[1, 2, 3, 4, 5]]
    tokens = engine.generate(prompt, max_new_tokens=8).completions[0].tokens
    weights = sum(leaf.nbytes for leaf in jax.tree.leaves(engine.params))
    temps = {key[0].__name__: compiled.memory_analysis().temp_size_in_bytes
             for key, compiled in engine._executables.items()}
    assert temps.keys() == {"prefill", "decode_loop"} and max(temps.values()) < weights / 4, (temps, weights)

    monkeypatch.setattr(engine_module, "CPU_NARROW_WEIGHT_OPTIONS", {})  # XLA's defaults: the same tokens
    default = Engine(params, config, max_len=64, dtype=jnp.bfloat16, cache_dtype=jnp.bfloat16)
    assert default.generate(prompt, max_new_tokens=8).completions[0].tokens == tokens


@pytest.mark.parametrize("spec", ["data=2,tensor=4", "data=8"])
def test_sharded_engine_equals_one_device(spec, gqa, greedy_engine, sampled_engine):
    assert jax.device_count() == 8
    config, params, ref = gqa
    prompts = prompts_of(ref, LENGTHS)
    single = sampled_engine if "tensor" in spec else greedy_engine  # sampled on one mesh, greedy on the other
    expected = tokens_of(single.generate(prompts, max_new_tokens=12, seed=3))
    engine = Engine(params, config, max_len=MAX_LEN, sampling=single.sampling, mesh=lj.make_mesh(spec))
    assert tokens_of(engine.generate(prompts, max_new_tokens=12, seed=3)) == expected
    q = engine.params["layer_0"]["attn"]["q"]
    assert q.addressable_shards[0].data.size == (q.size // 4 if "tensor" in spec else q.size)


def test_compilation_cache_persists_programs(tmp_path):
    """In a fresh process (as `python -m infer` uses it: JAX reads the setting once, at its first compile); a
    directory the user gave jax (JAX_COMPILATION_CACHE_DIR) wins over ours."""
    import os
    import subprocess
    import sys

    program = ("import sys, jax, jax.numpy as jnp; from llama_jax.generation.engine import enable_compilation_cache; "
               "enable_compilation_cache(sys.argv[1]); jax.jit(lambda x: x * 3 + 1)(jnp.arange(5))")
    env = {name: value for name, value in os.environ.items() if name != "JAX_COMPILATION_CACHE_DIR"}
    subprocess.run([sys.executable, "-c", program, str(tmp_path / "ours")], check=True, timeout=120, env=env)
    assert any((tmp_path / "ours").iterdir())
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "users")
    subprocess.run([sys.executable, "-c", program, str(tmp_path / "unused")], check=True, timeout=120, env=env)
    assert any((tmp_path / "users").iterdir()) and not (tmp_path / "unused").exists()
