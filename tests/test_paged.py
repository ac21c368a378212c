"""Attention over a paged KV cache equals the dense forward: a whole prompt, a prompt in chunks that do not line up
with blocks, one-token decode steps, and rows at different stages in one call (float32, within 1e-5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as lj
import llama_jax.model.paged as paged
from conftest import load_fixture
from llama_jax.model import PagedCache, Pages, chunk_blocks, init_paged_cache

BLOCK = 4


@pytest.fixture(scope="module", params=["gqa", "bias"])
def model(request):
    config, params, _ = load_fixture(request.param)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 29)).astype(np.int32)
    dense = np.asarray(jax.jit(lj.forward, static_argnames="config")(params, jnp.asarray(tokens), config)[0])
    return config, params, tokens, dense


def table(blocks: list[int], blocks_total: int) -> np.ndarray:
    """A row's table padded with the null block to a multiple of the attention's chunk of blocks."""
    width = -(-blocks_total // chunk_blocks(BLOCK)) * chunk_blocks(BLOCK)
    return np.array(blocks + [0] * (width - len(blocks)), np.int32)


def run(config, params, pool: PagedCache, rows: list[tuple[list[int], int, int]], tables: list[np.ndarray]):
    """One call: each row (its new tokens, the position of the first, the row's length after) right-padded to the
    longest; returns (logits of each row's new tokens, pool)."""
    width = max(len(r[0]) for r in rows)
    tokens = np.zeros((len(rows), width), np.int32)
    positions = np.full((len(rows), width), 1 << 20, np.int32)  # padding: beyond every row's length
    for i, (ids, start, _) in enumerate(rows):
        tokens[i, :len(ids)], positions[i, :len(ids)] = ids, np.arange(start, start + len(ids))
    pages = Pages(jnp.asarray(np.stack(tables)), jnp.asarray(positions), jnp.asarray([r[2] for r in rows], jnp.int32))
    logits, pool = jax.jit(lj.forward, static_argnames="config")(params, jnp.asarray(tokens), config, cache=pool,
                                                                 pages=pages)
    return [np.asarray(logits[i, :len(r[0])]) for i, r in enumerate(rows)], pool


@pytest.fixture(params=["default spans", "small spans"])
def spans(request, monkeypatch):
    """The tokens `paged_attend` reads per iteration: the defaults (these contexts fit in one chunk; narrow rows take
    the narrow span), or 8 for prompt chunks and 4 for decode steps and for narrow rows whose contexts are 16 tokens
    or fewer (wider contexts take the 8), so that 20-29 tokens take several chunks and the online softmax carries
    across, and both of a narrow row's spans are run."""
    if request.param == "small spans":
        monkeypatch.setattr(paged, "KV_CHUNK_TOKENS", 8)
        monkeypatch.setattr(paged, "DECODE_KV_CHUNK_TOKENS", 4)
        monkeypatch.setattr(paged, "NARROW_KV_CHUNK_TOKENS", 4)
        monkeypatch.setattr(paged, "NARROW_CONTEXT", 16)
    jax.clear_caches()  # the spans are read when forward is traced
    yield
    jax.clear_caches()


def test_a_whole_prompt_and_then_decode_steps(model, spans):
    config, params, tokens, dense = model
    pool = init_paged_cache(config, 24, BLOCK)
    blocks = table([5, 3, 17, 9, 11, 2, 20, 8], 8)  # scattered over the pool, not in order
    (first,), pool = run(config, params, pool, [(tokens[0, :20].tolist(), 0, 20)], [blocks])
    np.testing.assert_allclose(first, dense[0, :20], atol=1e-5, rtol=1e-5)
    for t in range(20, 29):
        (step,), pool = run(config, params, pool, [([int(tokens[0, t])], t, t + 1)], [blocks])
        np.testing.assert_allclose(step[0], dense[0, t], atol=1e-5, rtol=1e-5)


def test_chunks_that_do_not_line_up_with_blocks_and_rows_at_different_stages(model, spans):
    """Row 0 is prefilled 7 tokens at a time (chunks straddle blocks) while row 1, prefilled whole first, decodes
    in the same calls; an idle row (length 0) rides along and changes nothing."""
    config, params, tokens, dense = model
    pool = init_paged_cache(config, 24, BLOCK)
    tables = [table([1, 4, 7, 10, 13, 16, 19, 22], 8), table([2, 5, 8, 11, 14, 17, 20, 23], 8), table([], 8)]
    (whole,), pool = run(config, params, pool, [(tokens[1, :8].tolist(), 0, 8)], tables[1:2])
    np.testing.assert_allclose(whole, dense[1, :8], atol=1e-5, rtol=1e-5)
    done = 0
    for step in range(4):
        chunk = tokens[0, done:done + 7].tolist()
        rows = [(chunk, done, done + len(chunk)), ([int(tokens[1, 8 + step])], 8 + step, 9 + step), ([0], 0, 0)]
        (got0, got1, _), pool = run(config, params, pool, rows, tables)
        np.testing.assert_allclose(got0, dense[0, done:done + len(chunk)], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(got1[0], dense[1, 8 + step], atol=1e-5, rtol=1e-5)
        done += len(chunk)
    assert done == 28


def test_an_int8_pool_stays_close_and_finite(model):
    config, params, tokens, dense = model
    pool = init_paged_cache(config, 24, BLOCK, jnp.int8)
    (got,), _ = run(config, params, pool, [(tokens[0, :20].tolist(), 0, 20)], [table([5, 3, 17, 9, 11], 8)])
    assert np.all(np.isfinite(got))
    probs = jax.nn.softmax(dense[0, :20].astype(np.float64), axis=-1)
    kl = np.sum(probs * (jax.nn.log_softmax(dense[0, :20], axis=-1) - jax.nn.log_softmax(got, axis=-1)), axis=-1)
    assert 0 < kl.max() < 1e-3, kl
