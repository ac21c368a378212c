"""Logit bias, presence/frequency penalties (OpenAI's definitions), repetition penalty (transformers' processor) and
per-request stop ids and streams, per row in the serving engine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_fixture

from llama_jax.generation import Engine, PagedEngine, Request, SamplingParams, penalize, penalty_rows, token_counts
from llama_jax.model import forward

VOCAB = 50


def reference(logits, sampling: SamplingParams, prompt: list[int], generated: list[int]) -> np.ndarray:
    """OpenAI's formula (mu[j] - c[j] * frequency - (c[j] > 0) * presence over the generated tokens) after the logit
    bias, with transformers' RepetitionPenaltyLogitsProcessor over prompt and generated tokens between them."""
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    x = np.array(logits, np.float64)
    for token, value in sampling.logit_bias:
        x[token] += value
    x = RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty)(
        torch.tensor([prompt + generated]), torch.tensor(x[None])).numpy()[0]
    counts = np.bincount(np.array(generated, int), minlength=len(x))
    return x - counts * sampling.frequency_penalty - (counts > 0) * sampling.presence_penalty


SETTINGS = [
    SamplingParams(),
    SamplingParams(presence_penalty=1.5),
    SamplingParams(frequency_penalty=0.7),
    SamplingParams(frequency_penalty=-0.4, presence_penalty=0.3, repetition_penalty=1.3),
    SamplingParams(repetition_penalty=0.8, logit_bias=((3, -100.0), (7, 12.5), (3, 1.0))),
]


def test_penalties_equal_their_definitions_per_row():
    pytest.importorskip("transformers")
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (len(SETTINGS), VOCAB)).astype(np.float32)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (4, 9, 1, 6, 12)]
    generated = [rng.integers(0, VOCAB, n).tolist() for n in (0, 7, 15, 3, 10)]
    history = np.full((len(SETTINGS), 32), -1, np.int32)
    for r, (p, g) in enumerate(zip(prompts, generated, strict=True)):
        history[r, :len(p) + len(g)] = p + g
    counts = token_counts(jnp.asarray(history), jnp.asarray([len(p) for p in prompts]), VOCAB)
    ours = np.asarray(penalize(jnp.asarray(logits), penalty_rows(SETTINGS, VOCAB), counts))
    for r, sampling in enumerate(SETTINGS):
        np.testing.assert_allclose(ours[r], reference(logits[r], sampling, prompts[r], generated[r]), rtol=1e-6,
                                   atol=1e-5)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="presence_penalty must be in"):
        SamplingParams(presence_penalty=2.5)
    with pytest.raises(ValueError, match="logit_bias values"):
        SamplingParams(logit_bias=((1, 101.0),))
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0)
    with pytest.raises(ValueError, match="serving engine"):
        Engine({"layers": {}}, None, max_len=8, sampling=SamplingParams(frequency_penalty=1.0))


@pytest.fixture(scope="module")
def gqa():
    return load_fixture("gqa")


@pytest.fixture(scope="module")
def engine(gqa):
    """One engine for the module (its programs compiled once): 4 rows, a pool of 40 tokens (small enough that
    three or more requests preempt each other), decode calls of 3 steps."""
    config, params, _ = gqa
    return PagedEngine(params, config, slots=4, max_len=32, kv_tokens=40, block_size=4, chunk=3)


FORWARD = jax.jit(forward, static_argnums=2)


def greedy_reference(config, params, request: Request) -> list[int]:
    """Greedy decoding with the penalties applied by `reference` to the full forward's last logits, step by step."""
    tokens, generated = list(request.prompt), []
    for _ in range(request.max_new_tokens):  # right-padded to one length (causal: the padding is never seen)
        padded = np.zeros((1, 32), np.int32)
        padded[0, :len(tokens)] = tokens
        logits = np.asarray(FORWARD(params, padded, config)[0][0, len(tokens) - 1])
        if request.sampling.penalized:
            logits = reference(logits, request.sampling, list(request.prompt), generated)
        token = int(np.argmax(logits))
        tokens.append(token)
        generated.append(token)
        if token in request.stop_ids:
            break
    return generated


def test_penalized_requests_in_one_batch_equal_the_step_by_step_reference(gqa, engine):
    """Five settings side by side, joining a running batch, decoding in chunks of 3 and preempted by a small pool:
    each equals greedy decoding with its penalties applied to the model's logits one token at a time."""
    pytest.importorskip("transformers")
    config, params, ref = gqa
    pool = np.concatenate([ref["gen_prompt"], ref["tokens"].ravel(), ref["train_tokens"].ravel()]).tolist()
    requests = [Request(pool[7 * i:7 * i + 5 + i], 14, sampling) for i, sampling in enumerate(SETTINGS)]
    preempted = engine.counters["preemptions"]
    sids, got, finished = {}, {}, set()
    while len(finished) < len(requests):
        if len(sids) < len(requests):
            sids[engine.add(requests[len(sids)])] = len(sids)
        for out in engine.step():
            got.setdefault(sids[out.sid], []).extend(t.id for t in out.tokens)
            if out.finish_reason:
                finished.add(sids[out.sid])
    assert engine.counters["preemptions"] > preempted
    for i, request in enumerate(requests):
        assert got[i] == greedy_reference(config, params, request), i
    assert 3 not in got[4]  # logit_bias -100 bans it


def test_a_request_s_stop_ids_and_streams(gqa, engine):
    config, params, ref = gqa
    prompt = ref["tokens"].ravel()[:6].tolist()
    free = run(engine, [Request(prompt, 12)])[0]
    stop = free[5]
    cut = run(engine, [Request(prompt, 12, stop_ids=(stop,))])[0]
    assert cut == free[:free.index(stop) + 1]
    sampled = SamplingParams(temperature=1.0)
    choices = run(engine, [Request(prompt, 12, sampled, seed=5, stream=i) for i in range(3)])
    batch = Engine(params, config, max_len=32, sampling=sampled).generate([prompt] * 3, max_new_tokens=12, seed=5)
    assert choices == [c.tokens for c in batch.completions] and len({tuple(c) for c in choices}) == 3


def run(engine, requests):
    sids = {engine.add(r): i for i, r in enumerate(requests)}
    got, finished = {}, set()
    while len(finished) < len(requests):
        for out in engine.step():
            got.setdefault(sids[out.sid], []).extend(t.id for t in out.tokens)
            if out.finish_reason:
                finished.add(sids[out.sid])
    return [got[i] for i in range(len(requests))]


class EveryThird:
    """A constraint: the n-th token emitted must be = n (mod 3); records what it was told."""

    def __init__(self):
        self.told = []

    def fill(self, mask):
        ok = np.arange(len(mask) * 32) % 3 == len(self.told) % 3
        mask[:] = np.packbits(ok.reshape(-1, 32)[:, ::-1], axis=1).view(">i4")[:, 0]

    def consume(self, token):
        self.told.append(token)


def test_a_constrained_row_takes_only_allowed_tokens_beside_free_ones(gqa, engine):
    """A constrained row (its mask refilled for every token) beside free rows in the same steps: it equals greedy
    decoding over the allowed tokens of the model's logits, the constraint is told every token, and the free rows
    are untouched."""
    config, params, ref = gqa
    pool = np.concatenate([ref["gen_prompt"], ref["tokens"].ravel()]).tolist()
    constraint = EveryThird()
    requests = [Request(pool[:6], 10), Request(pool[6:13], 10, constraint=constraint), Request(pool[13:17], 10)]
    got = run(engine, requests)
    assert got[0] == greedy_reference(config, params, requests[0])
    assert got[2] == greedy_reference(config, params, requests[2])
    tokens, expected = list(requests[1].prompt), []
    for n in range(10):
        padded = np.zeros((1, 32), np.int32)
        padded[0, :len(tokens)] = tokens
        logits = np.asarray(FORWARD(params, padded, config)[0][0, len(tokens) - 1])
        token = int(np.argmax(np.where(np.arange(config.vocab_size) % 3 == n % 3, logits, -np.inf)))
        tokens.append(token)
        expected.append(token)
    assert got[1] == expected == constraint.told
    assert all(t % 3 == n % 3 for n, t in enumerate(got[1])) and got[1] != got[0][:10]
