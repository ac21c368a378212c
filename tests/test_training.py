"""The optimizer and the train step: schedules, decay mask, accumulation, overfitting, sharding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_fixture
from numerics import assert_trees_close_in_norm, float32_rtol

import llama_jax as lj
from llama_jax.model.sharding import named_sharding, place
from llama_jax.training.step import (OptimizerConfig, decay_mask, init_state, learning_rate, make_optimizer,
                                train_step)


def stepper(config, opt, dtype=jnp.float32):
    optimizer = make_optimizer(opt)
    step = jax.jit(functools.partial(train_step, config=config, optimizer=optimizer, schedule=learning_rate(opt),
                                     dtype=dtype))
    return optimizer, step


def random_batch(rng, accum, batch, seq, vocab):
    tokens = rng.integers(3, vocab, (accum, batch, seq)).astype(np.int32)
    mask = (rng.random((accum, batch, seq)) < 0.7).astype(np.float32)
    return {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(mask)}


def test_schedules():
    cos = learning_rate(OptimizerConfig(total_steps=110, lr=1.0, warmup=10))
    assert float(cos(0)) == 0 and float(cos(5)) == pytest.approx(0.5) and float(cos(10)) == pytest.approx(1.0)
    assert float(cos(60)) == pytest.approx(0.5, abs=1e-6) and float(cos(110)) == pytest.approx(0.0, abs=1e-6)
    lin = learning_rate(OptimizerConfig(total_steps=100, lr=2.0, schedule="linear"))
    assert float(lin(0)) == 2.0 and float(lin(50)) == pytest.approx(1.0)
    const = learning_rate(OptimizerConfig(total_steps=100, lr=3.0, schedule="constant", warmup=4))
    assert float(const(2)) == pytest.approx(1.5) and float(const(99)) == 3.0


def test_no_weight_decay_on_norms_and_biases():
    config, params, _ = load_fixture("bias")
    mask = decay_mask(params)
    assert mask["layers"]["attn"]["q"] and mask["embed"] and mask["layers"]["mlp"]["down"]
    assert not mask["layers"]["attn"]["q_bias"] and not mask["layers"]["mlp"]["up_bias"]
    assert not mask["final_norm"]["scale"] and not mask["layers"]["attn_norm"]["scale"]
    # With lr 0 for gradients but decay on, only decayed leaves would move: check via a zero-gradient update.
    opt = make_optimizer(OptimizerConfig(total_steps=10, lr=1e-1, weight_decay=0.5, schedule="constant"))
    state = opt.init(params)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zero, state, params)
    assert np.abs(updates["layers"]["attn"]["q"]).max() > 0
    assert not np.asarray(updates["layers"]["attn"]["q_bias"]).any()
    assert not np.asarray(updates["final_norm"]["scale"]).any()


def test_gradient_accumulation_equals_one_big_batch():
    """With plain SGD (lr 1) the update is the gradient itself, so this compares gradients, scale included."""
    import optax

    config, params, _ = load_fixture("gqa")
    step = jax.jit(functools.partial(train_step, config=config, optimizer=optax.sgd(1.0),
                                     schedule=optax.constant_schedule(1.0), dtype=jnp.float32))
    batch = random_batch(np.random.default_rng(0), 2, 2, 12, config.vocab_size)
    whole = jax.tree.map(lambda x: x.reshape(1, 4, 12), batch)
    state_a, metrics_a = step(init_state(params, optax.sgd(1.0)), batch)
    state_b, metrics_b = step(init_state(params, optax.sgd(1.0)), whole)
    np.testing.assert_allclose(metrics_a["loss"], metrics_b["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics_a["grad_norm"], metrics_b["grad_norm"], rtol=1e-5)
    assert float(metrics_a["tokens"]) == float(batch["loss_mask"][:, :, 1:].sum())
    # Summation order differs (per micro-batch, then added). The params after one SGD step at lr 1 are the initial
    # params minus the gradient: compare the updates (the gradients) in norm, float32 reordering of the longest sums.
    updates = [jax.tree.map(lambda new, old: new - old, state.params, params) for state in (state_a, state_b)]
    rtol = float32_rtol(max(config.intermediate_size, config.vocab_size), depth=2 * config.num_hidden_layers)
    assert_trees_close_in_norm(*updates, rtol)


def test_tiny_model_overfits_twenty_examples():
    config = lj.preset("tiny")
    params = lj.init_params(config, jax.random.key(0))
    opt = OptimizerConfig(total_steps=150, lr=3e-3, warmup=10)
    optimizer, step = stepper(config, opt)
    rng = np.random.default_rng(1)
    examples = rng.integers(3, config.vocab_size, (20, 16)).astype(np.int32)
    batch = {"tokens": jnp.asarray(examples[None]), "loss_mask": jnp.ones((1, 20, 16), jnp.float32)}
    state = init_state(params, optimizer)
    losses = []
    for _ in range(opt.total_steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    assert losses[0] > 5.0 and losses[-1] < 0.05, (losses[0], losses[-1])


@pytest.mark.parametrize("spec", [pytest.param("fsdp=8", marks=pytest.mark.slow), "data=2,fsdp=2,tensor=2",
                                  pytest.param("data=4,tensor=2", marks=pytest.mark.slow)])  # one mesh fast
def test_sharded_step_equals_single_device(spec):
    config, params, _ = load_fixture("gqa")
    opt = OptimizerConfig(total_steps=10, lr=1e-3, weight_decay=0.1)
    optimizer, step = stepper(config, opt)
    batch = random_batch(np.random.default_rng(2), 1, 8, 12, config.vocab_size)
    expected_state, expected = step(init_state(params, optimizer), batch)
    expected_state, expected2 = step(expected_state, batch)

    mesh = lj.make_mesh(spec)
    sharded_params = jax.tree.map(lambda x, s: place(np.asarray(x), s), params, lj.param_shardings(config, mesh))
    with jax.set_mesh(mesh):
        sharded_batch = {k: place(np.asarray(v), named_sharding(mesh, (None, "batch", "seq"), v.shape))
                         for k, v in batch.items()}
        state = init_state(sharded_params, optimizer)
        assert state.opt_state[1][0].mu["layers"]["mlp"]["up"].sharding.spec == \
            sharded_params["layers"]["mlp"]["up"].sharding.spec
        state, metrics = step(state, sharded_batch)
        state, metrics2 = step(state, sharded_batch)
    for got, want in ((metrics, expected), (metrics2, expected2)):
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
        np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-4)
    # Adam's g / sqrt(v) magnifies reduction-order noise in near-zero gradients, so an element whose gradient is
    # ~0 may move by up to a step (lr) differently: all but 0.1% must agree to 1% of a step, none beyond 2 steps.
    diffs = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel() for a, b in
                            zip(jax.tree.leaves(state.params), jax.tree.leaves(expected_state.params), strict=True)])
    assert (diffs > 1e-2 * opt.lr).mean() < 1e-3 and diffs.max() < 2 * opt.lr, (np.sort(diffs)[-5:], diffs.size)
