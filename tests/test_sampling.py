"""The samplers: validation, greedy, reproducible per-row streams, and that every filter keeps only its tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.generation.sampling import (SamplingParams, candidates, filter_logits, greedy_tokens, row_keys, sample,
                                           sampling_rows, step_keys)

ROWS, VOCAB = 512, 64  # every row is an independent draw, so one call checks many seeds at once


def random_logits(seed=0, rows=ROWS, vocab=VOCAB, scale=3.0):
    return jax.random.normal(jax.random.key(seed), (rows, vocab)) * scale


def rows(params, n=ROWS):
    """SamplingRows for n rows: `params` for each, or a list of one SamplingParams per row."""
    return sampling_rows(params if isinstance(params, list) else [params] * n)


def draw(logits, params, seed=0, step=0, bound=None):
    """Tokens sampled with `params` (one SamplingParams for every row, or a list, one per row)."""
    keys = step_keys(row_keys(seed, len(logits)), step)
    return np.asarray(jax.jit(sample, static_argnums=3)(logits, keys, rows(params, len(logits)), bound))


def kept_by(logits, params, bound=None):
    return np.isfinite(np.asarray(filter_logits(logits, rows(params, len(logits)), bound)))


def probabilities(logits, temperature):
    return np.asarray(jax.nn.softmax(np.asarray(logits) / temperature, axis=-1))


@pytest.mark.parametrize("bad, value", [
    (dict(temperature=-0.5), "-0.5"), (dict(temperature=float("nan")), "nan"), (dict(top_k=-1), "-1"),
    (dict(top_k=2.5), "2.5"), (dict(top_p=0.0), "0.0"), (dict(top_p=1.5), "1.5"), (dict(min_p=-0.1), "-0.1"),
    (dict(min_p=2.0), "2.0"),
])
def test_invalid_values_raise_naming_them(bad, value):
    with pytest.raises(ValueError, match=f"{next(iter(bad))}.*{value}"):
        SamplingParams(**bad)


def test_temperature_zero_is_argmax_whatever_the_filters():
    logits = random_logits()
    expected = np.argmax(np.asarray(logits), axis=-1)
    for params in (SamplingParams(), SamplingParams(top_k=3, top_p=0.5, min_p=0.2)):
        np.testing.assert_array_equal(draw(logits, params, seed=1), expected)


def test_greedy_tokens_are_numpys_argmax_with_ties_infinities_and_nans():
    """The first largest logit, or the first NaN, as numpy's argmax: rows of ties, of -inf only, with +inf, with NaN."""
    logits = np.round(np.asarray(random_logits(rows=64, vocab=37)))  # rounded: many rows hold tied maxima
    logits[1] = -np.inf
    logits[2, [3, 30]] = np.inf
    logits[3, [5, 20]] = np.nan
    logits[4, [0, 9]] = [np.inf, np.nan]
    tokens = np.asarray(jax.jit(greedy_tokens)(logits))
    tied = sum(np.sum(row == row.max()) > 1 for row in logits[5:])
    assert tokens.dtype == np.int32 and tied >= 10, tied
    np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))
    assert list(tokens[1:5]) == [0, 3, 5, 9]


def test_same_seed_same_tokens_other_seed_or_step_other_tokens():
    logits, params = random_logits(), SamplingParams(temperature=1.0)
    first = draw(logits, params, seed=3)
    np.testing.assert_array_equal(draw(logits, params, seed=3), first)
    assert (draw(logits, params, seed=4) != first).mean() > 0.5
    assert (draw(logits, params, seed=3, step=1) != first).mean() > 0.5


def test_a_rows_stream_does_not_depend_on_the_batch():
    keys = row_keys(7, 5)
    np.testing.assert_array_equal(jax.random.key_data(row_keys(7, 1)), jax.random.key_data(keys[:1]))
    logits = random_logits(rows=5)
    params = SamplingParams(temperature=1.0, top_p=0.9)
    np.testing.assert_array_equal(draw(logits[:1], params, seed=7), draw(logits, params, seed=7)[:1])
    # identical rows still draw independently
    same = jnp.broadcast_to(random_logits(rows=1), (ROWS, VOCAB))
    assert len(set(draw(same, SamplingParams(temperature=1.0)).tolist())) > 10


def test_temperature_sampling_follows_the_softmax():
    logits = jnp.broadcast_to(jnp.array([0.0, 1.0, 2.0, -1.0]), (20000, 4))
    params = SamplingParams(temperature=0.7)
    freq = np.bincount(draw(logits, params), minlength=4) / len(logits)
    np.testing.assert_allclose(freq, probabilities(logits[0], 0.7), atol=0.015)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_top_k_never_emits_a_token_outside_the_k_largest(k):
    logits = random_logits(seed=k)
    tokens = draw(logits, SamplingParams(temperature=1.5, top_k=k))
    ranks = (np.asarray(logits) > np.take_along_axis(np.asarray(logits), tokens[:, None], 1)).sum(1)
    assert ranks.max() < k
    assert len(np.unique(ranks)) == k  # and every one of them is drawn sometimes


def nucleus(logits, temperature, top_p):
    """Reference: bool [rows, vocab], the smallest set of most likely tokens whose mass reaches top_p."""
    probs = probabilities(logits, temperature)
    order = np.argsort(-probs, axis=-1)
    sorted_probs = np.take_along_axis(probs, order, -1)
    keep_sorted = np.cumsum(sorted_probs, -1) - sorted_probs < top_p
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, -1)
    return keep


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9])
def test_top_p_keeps_exactly_the_nucleus_and_never_samples_outside(top_p):
    logits, params = random_logits(seed=1), SamplingParams(temperature=0.8, top_p=top_p)
    keep = nucleus(logits, 0.8, top_p)
    np.testing.assert_array_equal(kept_by(logits, params), keep)
    tokens = draw(logits, params)
    assert keep[np.arange(ROWS), tokens].all()


@pytest.mark.parametrize("min_p", [0.05, 0.3, 1.0])
def test_min_p_never_samples_below_the_threshold(min_p):
    logits, params = random_logits(seed=2), SamplingParams(temperature=1.2, min_p=min_p)
    probs = probabilities(logits, 1.2)
    tokens = draw(logits, params)
    chosen = probs[np.arange(ROWS), tokens]
    assert (chosen >= min_p * probs.max(-1) * (1 - 1e-5)).all()
    if min_p == 1.0:
        np.testing.assert_array_equal(tokens, probs.argmax(-1))


def test_filters_combine():
    logits = random_logits(seed=3)
    params = SamplingParams(temperature=0.9, top_k=8, top_p=0.8, min_p=0.1)
    kept = kept_by(logits, params)
    top8 = np.asarray(logits) >= np.sort(np.asarray(logits), -1)[:, -8:-7]
    # top-p acts on the top-k distribution (renormalised), min-p relative to the most likely token
    masked = np.where(top8, np.asarray(logits), -np.inf)
    probs = probabilities(logits, 0.9)
    expected = top8 & nucleus(masked, 0.9, 0.8) & (probs >= 0.1 * probs.max(-1, keepdims=True))
    np.testing.assert_array_equal(kept, expected)
    assert kept.sum(-1).min() >= 1 and kept.sum(-1).max() <= 8
    assert kept[np.arange(ROWS), draw(logits, params)].all()


def test_rows_with_different_settings_draw_as_each_would_alone():
    """One batch mixing greedy, top-k, top-p and min-p rows: each row's token equals that row drawn in a batch of its
    own settings (same key), so requests with any settings share one compiled step."""
    logits = random_logits(seed=4, rows=8)
    settings = [SamplingParams(), SamplingParams(temperature=0.8, top_k=5), SamplingParams(temperature=1.1, top_p=0.7),
                SamplingParams(temperature=0.6, min_p=0.2), SamplingParams(temperature=1.0),
                SamplingParams(temperature=0.9, top_k=12, top_p=0.8, min_p=0.05), SamplingParams(),
                SamplingParams(temperature=2.0, top_p=0.3)]
    mixed = draw(logits, settings, seed=5)
    for row, params in enumerate(settings):
        assert mixed[row] == draw(logits, params, seed=5)[row], (row, params)
    assert mixed[0] == np.argmax(np.asarray(logits[0])) and mixed[6] == np.argmax(np.asarray(logits[6]))


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, top_k=7),
                                    SamplingParams(temperature=0.7, top_k=20, top_p=0.6, min_p=0.02)])
def test_ranking_only_top_k_candidates_filters_the_same(params):
    logits = random_logits(seed=6)
    bound = candidates(params, VOCAB)
    assert bound == params.top_k
    np.testing.assert_array_equal(kept_by(logits, params, bound), kept_by(logits, params))
    np.testing.assert_array_equal(draw(logits, params, bound=bound), draw(logits, params))
