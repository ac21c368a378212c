"""The masked next-token loss and its gradients against transformers/torch (fixtures from make_fixtures.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, load_fixture
from numerics import assert_trees_close_in_norm, float32_rtol
from safetensors.numpy import load_file

from llama_jax.checkpoints.hf_mapping import params_from_hf
from llama_jax.model import param_shapes
from llama_jax.training.loss import next_token_loss


def batch_of(ref):
    return {"tokens": jnp.asarray(ref["train_tokens"]), "loss_mask": jnp.asarray(ref["train_mask"])}


@pytest.mark.parametrize("variant, vocab_chunk", [("gqa", 256), ("gqa", 37), ("tied", 100)])
def test_loss_and_grads_match_torch(variant, vocab_chunk):
    """The loss applies the head a slice of the vocabulary (256 entries here) at a time: one slice, slices that do
    not divide it (the last one short), and a tied head (the embedding's transpose) all match torch's full softmax."""
    config, params, ref = load_fixture(variant)
    grad_fn = jax.jit(jax.value_and_grad(next_token_loss, has_aux=True), static_argnames=("config", "vocab_chunk"))
    (loss, aux), grads = grad_fn(params, batch_of(ref), config, vocab_chunk=vocab_chunk)
    np.testing.assert_allclose(loss, ref["train_loss"], rtol=1e-5)
    assert aux["weight"] == ref["train_mask"][:, 1:].sum()
    expected = params_from_hf(load_file(FIXTURES / variant / "grads.safetensors"), config)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(expected))
    errors = jax.tree.map(lambda g, e: float(np.abs(np.asarray(g) - e).max()), grads, expected)
    assert max(jax.tree.leaves(errors)) < 1e-4 * scale, errors


def test_masked_tokens_contribute_exactly_zero():
    config, params, ref = load_fixture("gqa")
    tokens = np.asarray(ref["train_tokens"])
    mask = np.zeros(tokens.shape, np.float32)
    mask[:, 2:6] = 1  # an "assistant turn" in the middle; a masked prompt before it, a masked turn after it
    batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(mask)}
    grad_fn = jax.jit(jax.value_and_grad(next_token_loss, has_aux=True), static_argnames="config")
    (loss, aux), grads = grad_fn(params, batch, config)
    assert float(aux["weight"]) == 2 * 4  # targets 2..5 of each row

    # Tokens after the last counted target (a later user turn) change nothing, bit for bit.
    changed = tokens.copy()
    changed[:, 6:] = (changed[:, 6:] + 7) % config.vocab_size
    (loss2, _), grads2 = grad_fn(params, {**batch, "tokens": jnp.asarray(changed)}, config)
    assert float(loss2) == float(loss)
    jax.tree.map(np.testing.assert_array_equal, grads2, grads)

    # A row that is all prompt (mask 0) adds nothing.
    extra = {"tokens": jnp.asarray(np.concatenate([tokens, tokens[:1]])),
             "loss_mask": jnp.asarray(np.concatenate([mask, np.zeros_like(mask[:1])]))}
    (loss3, _), grads3 = grad_fn(params, extra, config)
    np.testing.assert_allclose(loss3, loss, rtol=1e-6)
    # The same sums with one more (zero) term each: float32 reordering only.
    assert_trees_close_in_norm(grads3, grads, float32_rtol(tokens.size, depth=2 * config.num_hidden_layers))

    # With everything masked the gradient is exactly zero.
    (_, aux), zero = grad_fn(params, {**batch, "loss_mask": jnp.zeros_like(batch["loss_mask"])}, config)
    assert float(aux["weight"]) == 0 and all(not np.asarray(g).any() for g in jax.tree.leaves(zero))


def dot_operand_dtypes(jaxpr) -> list[tuple[tuple, tuple]]:
    """(operand dtypes, operand shapes) of every dot_general without batch dimensions in `jaxpr`, nested ones too."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and not eqn.params["dimension_numbers"][1][0]:
            found.append((tuple(v.aval.dtype for v in eqn.invars), tuple(v.aval.shape for v in eqn.invars)))
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple) else (param,):
                if hasattr(sub, "jaxpr") or hasattr(sub, "eqns"):
                    found += dot_operand_dtypes(getattr(sub, "jaxpr", sub))
    return found


@pytest.mark.parametrize("remat", ["none", "dots"])
def test_bf16_training_gradient_dots_are_bf16_off_the_cpu(remat, monkeypatch):
    """With bfloat16 compute on a GPU or TPU (the backend is faked: only tracing happens), every projection's dots,
    forward and both gradient dots, take bfloat16 operands; only the head's (float32 logits) take float32. A
    float32 projection result made its gradient dots float32 x bfloat16: TF32 GEMMs at half the bf16 rate."""
    config, _, ref = load_fixture("gqa")
    config = dataclasses.replace(config, vocab_size=300)  # no other axis of the model is 300 long
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    loss = jax.value_and_grad(next_token_loss, has_aux=True)
    jaxpr = jax.make_jaxpr(lambda p, b: loss(p, b, config, dtype=jnp.bfloat16, remat=remat))(
        param_shapes(config), batch_of(ref))
    dots = dot_operand_dtypes(jaxpr.jaxpr)
    wide = [shapes for dtypes, shapes in dots if jnp.float32 in dtypes]
    assert len(dots) >= 3 * 7  # each projection's forward and two gradient dots (the layers are one scan)
    assert wide and all(any(config.vocab_size in shape for shape in shapes) for shapes in wide), wide


@pytest.mark.slow  # bf16 steps emulated on a CPU
def test_bf16_training_off_the_cpu_is_the_same_step_within_bf16_rounding(monkeypatch):
    """The same bf16-compute loss and gradients, whether the projections' dots return float32 (a CPU) or bfloat16
    (a GPU or TPU; faked here, run on this CPU): the loss within 1e-3 and each gradient within 3% in norm
    (bfloat16 keeps 8 bits: its rounding of the cotangents is what differs)."""
    config, params, ref = load_fixture("gqa")

    def step():
        grad_fn = jax.jit(jax.value_and_grad(next_token_loss, has_aux=True), static_argnames=("config", "dtype"))
        (loss, _), grads = grad_fn(params, batch_of(ref), config, dtype=jnp.bfloat16)
        return loss, grads

    loss, grads = step()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    gpu_loss, gpu_grads = step()
    np.testing.assert_allclose(gpu_loss, loss, rtol=1e-3)
    assert_trees_close_in_norm(gpu_grads, grads, 3e-2)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(gpu_grads))
