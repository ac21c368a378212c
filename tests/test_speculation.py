"""Speculative decoding in the paged engine: the n-gram proposer finds what a brute-force search finds; with it, a
draft model (or a proposer that is right and then wrong) every request's tokens are those of plain decoding, greedy
and sampled; the model accepts exactly the proposals it would have emitted (all of them when the draft is the model
itself); and sampled tokens keep the model's distribution (a chi-square test against softmax probabilities computed
by `forward`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from conftest import load_fixture

from llama_jax.generation import DraftModel, NgramProposer, PagedEngine, Request, SamplingParams
from llama_jax.model import LlamaConfig, forward, init_params

MAX_LEN = 64
MAX_NEW = 18


@pytest.fixture(scope="module")
def gqa():
    return load_fixture("gqa")


def latest_match(tokens, k, max_ngram, min_ngram):
    """The proposer's definition, by brute force."""
    for n in range(max_ngram, min_ngram - 1, -1):
        for start in range(len(tokens) - n - 1, -1, -1):
            if n < len(tokens) and tokens[start:start + n] == tokens[-n:]:
                return tokens[start + n:start + n + k]
    return []


def test_the_ngram_proposer_takes_the_latest_match_of_the_longest_suffix():
    rng = np.random.default_rng(0)
    proposer = NgramProposer(k=3, max_ngram=3, min_ngram=1)
    found = 0
    for length in list(range(1, 12)) * 40:
        tokens = rng.integers(0, 4, length).tolist()
        proposal = proposer.propose(tokens)
        assert proposal == latest_match(tokens, 3, 3, 1), tokens
        found += bool(proposal)
    assert found > 250  # most sequences have a match
    assert NgramProposer(k=2).propose([5, 6, 7, 9, 5, 6, 7, 8, 5, 6, 7]) == [8, 5]  # the latest of two matches
    assert NgramProposer(k=2, min_ngram=2).propose([1, 2, 3]) == []


def serve(engine, requests):
    """Every request added at once; returns each one's tokens."""
    sids = {engine.add(request): i for i, request in enumerate(requests)}
    tokens = {i: [] for i in range(len(requests))}
    while engine.running or engine.waiting:
        for out in engine.step():
            tokens[sids[out.sid]] += [t.id for t in out.tokens]
    return [tokens[i] for i in range(len(requests))]


def repetitive_requests(ref, count):
    """Prompts that repeat a phrase (so that n-grams match), greedy, sampled and penalized ones mixed."""
    pool = np.concatenate([ref["gen_prompt"], ref["tokens"].ravel()]).tolist()
    settings = [SamplingParams(), SamplingParams(temperature=0.9, top_p=0.9), SamplingParams(temperature=0.7, top_k=8),
                SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2)]
    return [Request(pool[i:i + 4] * 3 + pool[i + 4:i + 6], MAX_NEW, settings[i % 4], seed=i) for i in range(count)]


def test_speculation_gives_the_tokens_of_plain_decoding(gqa):
    """16 requests through engines with and without n-gram speculation: the same tokens, for greedy, sampled and
    penalized rows, with proposals both accepted and rejected."""
    config, params, ref = gqa
    requests = repetitive_requests(ref, 16)
    plain = PagedEngine(params, config, slots=4, max_len=MAX_LEN, block_size=4, chunk=3)
    speculating = PagedEngine(params, config, slots=4, max_len=MAX_LEN, block_size=4, chunk=3,
                              speculate=NgramProposer(k=4))
    assert serve(speculating, requests) == serve(plain, requests)
    counters = speculating.counters
    assert counters["proposed_tokens"] > counters["accepted_tokens"] > 0
    assert counters["generated_tokens"] == sum(r.max_new_tokens for r in requests) == plain.counters[
        "generated_tokens"]
    assert speculating.blocks.available() == speculating.blocks.usable


@pytest.mark.slow  # a second model's programs
def test_a_draft_model_gives_the_tokens_of_plain_decoding(gqa):
    """16 requests (greedy, sampled, penalized) with a draft of another architecture (the mha fixture: the same
    vocabulary), then greedy ones with the model as its own draft: they accept every proposal, which they can only if
    the draft's pool holds the right keys and values at every position (prompts chunked over steps, a prefix shared
    through the cache, all k accepted)."""
    config, params, ref = gqa
    requests = repetitive_requests(ref, 14)
    requests += [Request(requests[0].prompt + [7, 8, 9], MAX_NEW, seed=1), Request(requests[0].prompt, MAX_NEW)]
    options = dict(slots=2, max_len=MAX_LEN, block_size=4, max_batch_tokens=8, chunk=3)
    plain = serve(PagedEngine(params, config, **options), requests)
    other_config, other_params, _ = load_fixture("mha")
    engine = PagedEngine(params, config, **options, speculate=DraftModel(other_params, other_config, k=3))
    assert serve(engine, requests) == plain and engine.counters["proposed_tokens"] > 0  # (random: seldom accepted)
    engine = PagedEngine(params, config, **options, speculate=DraftModel(params, config, k=3))
    assert serve(engine, requests[:1]) == plain[:1]  # greedy; then two that start from its cached blocks
    assert serve(engine, requests[14:]) == plain[14:]
    assert engine.counters["accepted_tokens"] == engine.counters["proposed_tokens"] > 0
    assert engine.counters["cached_tokens"] > 0


class RightThenWrong:
    """Proposes the request's true continuation (plain decoding's tokens) with its `wrong`-th token changed; keeps
    what the engine verifies of each (as many tokens as the request has left to feed)."""

    def __init__(self, truth: dict, k: int, wrong: int):
        self.truth, self.k, self.wrong, self.proposals = truth, k, wrong, []

    def propose(self, tokens):
        prompt = next(p for p in self.truth if tuple(tokens[:len(p)]) == p)
        done = len(tokens) - len(prompt)
        proposal = list(self.truth[prompt][done:done + self.k])
        if len(proposal) > self.wrong:
            proposal[self.wrong] = (proposal[self.wrong] + 1) % 256
        self.proposals.append(proposal[:MAX_NEW - 1 - done])
        return proposal


def test_the_model_accepts_exactly_the_proposals_it_would_emit(gqa):
    config, params, ref = gqa
    requests = repetitive_requests(ref, 4)
    truth = dict(zip((tuple(r.prompt) for r in requests), serve(PagedEngine(
        params, config, slots=4, max_len=MAX_LEN, block_size=4), requests), strict=True))
    proposer = RightThenWrong(truth, k=4, wrong=2)
    engine = PagedEngine(params, config, slots=4, max_len=MAX_LEN, block_size=4, speculate=proposer)
    assert serve(engine, requests) == list(truth.values())
    proposed = proposer.proposals
    assert engine.counters["accepted_tokens"] == sum(min(len(p), 2) for p in proposed)
    assert engine.counters["proposed_tokens"] == sum(len(p) for p in proposed)


@pytest.mark.slow  # thousands of samples
def test_sampled_speculation_keeps_the_models_distribution():
    """2,000 requests (seeds 0..1999) of a random 8-token-vocabulary model, sampled at temperature 1, with a proposer
    that proposes, after the first token a, [x, y]: the most likely second token after a and the most likely third
    after (a, x). The frequencies of the second and third tokens, and of the third when x was accepted, match the
    model's probabilities, summed over the paths to them."""
    config = LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    params = init_params(config, jax.random.key(0))
    params["lm_head"] = params["lm_head"] * 15  # spread the distribution
    prompt, vocab = [1, 2, 3], config.vocab_size
    paths = np.array([[a, b] for a in range(vocab) for b in range(vocab)])

    logits = jax.jit(lambda tokens: forward(params, tokens, config)[0][:, -1])

    def probs(rows):
        return np.asarray(jax.nn.softmax(logits(jnp.array(rows))), np.float64)

    p1 = probs([prompt])[0]  # [a]
    p2 = probs([prompt + [a] for a in range(vocab)])  # [a, b]
    p3 = probs([prompt + list(path) for path in paths]).reshape(vocab, vocab, vocab)  # [a, b, c]
    x = p2.argmax(axis=1)  # [a]
    y = p3[np.arange(vocab), x].argmax(axis=1)  # [a]

    class Proposer:
        k = 2

        @staticmethod
        def propose(tokens):
            return [int(x[tokens[3]]), int(y[tokens[3]])] if len(tokens) == 4 else []

    engine = PagedEngine(params, config, slots=256, max_len=8, block_size=4,
                         speculate=Proposer)
    draws = 2000
    got = np.array(serve(engine, [Request(prompt, 4, SamplingParams(temperature=1.0), seed=s) for s in range(draws)]))
    assert engine.counters["accepted_tokens"] > draws // 4
    path = p1[:, None] * p2  # [a, b]
    accepted = got[:, 1] == x[got[:, 0]]
    third_after_x = (p1 * p2[np.arange(vocab), x]) @ p3[np.arange(vocab), x]
    for observed, expected in ((got[:, 1], p1 @ p2), (got[:, 2], np.einsum("ab,abc->c", path, p3)),
                               (got[accepted, 2], third_after_x / third_after_x.sum())):
        counts = np.bincount(observed, minlength=vocab)
        expected = expected / expected.sum() * len(observed)
        assert expected.min() > 5, expected  # the chi-square approximation holds
        assert scipy.stats.chisquare(counts, expected).pvalue > 1e-3, (counts, expected)
