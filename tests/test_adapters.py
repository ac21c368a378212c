"""Several LoRA adapters served from one base in one batch (`attach_many`, `select_adapters`): each row equals the
forward, the engine and the server with its adapter alone; different adapters never share prefix-cache blocks; the
server lists and picks adapters by `model` and refuses unknown models and adapters that do not fit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.checkpoints import load_params, open_checkpoint, read_adapter
from llama_jax.checkpoints.peft import Adapter, write_adapter
from llama_jax.model import (attach, attach_many, forward, init_adapters, param_logical_names, param_shapes,
                             select_adapters, unstack_layers)

# Two adapters of different ranks and targets (so ranks are padded and each lacks targets the other has).
ADAPTERS = {"one": dict(rank=4, alpha=8, targets=("q", "v", "down"), seed=1),
            "two": dict(rank=2, alpha=6, targets=("q", "k", "o", "gate", "up"), seed=2)}
TOKENS = np.array([[3, 17, 42, 7, 99, 5, 1, 64], [9, 8, 7, 6, 5, 4, 3, 2], [77, 31, 13, 200, 128, 250, 64, 1]])


@pytest.fixture(scope="module")
def adapter_dirs(tiny_checkpoint, tmp_path_factory):
    """{name: PEFT adapter directory} of random, non-zero factors for the tiny checkpoint."""
    config = open_checkpoint(tiny_checkpoint).config
    root, dirs = tmp_path_factory.mktemp("adapters"), {}
    for name, spec in ADAPTERS.items():
        shapes = init_adapters(param_shapes(config), param_logical_names(config), rank=spec["rank"],
                               targets=spec["targets"], rng=jax.random.key(0))
        rng = np.random.default_rng(spec["seed"])
        weights = jax.tree.map(lambda x, rng=rng: rng.normal(0, 0.3, x.shape).astype(np.float32), shapes)
        adapter = Adapter(weights, spec["rank"], float(spec["alpha"]), spec["targets"])
        dirs[name] = write_adapter(root / name, adapter, config, base=tiny_checkpoint)
    return dirs


def adapters_of(checkpoint, adapter_dirs, per_layer):
    """[(factors in the params' layout, scale)] of each adapter, in ADAPTERS' order."""
    read = [read_adapter(adapter_dirs[name], checkpoint.config) for name in ADAPTERS]
    return [(unstack_layers(a.weights) if per_layer else a.weights, a.scale) for a in read]


@pytest.mark.parametrize("per_layer, quantize", [(False, None), (True, "int8")], ids=["stacked", "per-layer-int8"])
def test_each_row_equals_its_adapter_alone(tiny_checkpoint, adapter_dirs, per_layer, quantize):
    checkpoint = open_checkpoint(tiny_checkpoint)
    params = load_params(checkpoint, per_layer=per_layer, quantize=quantize)
    adapters = adapters_of(checkpoint, adapter_dirs, per_layer)
    run = jax.jit(functools.partial(forward, config=checkpoint.config))
    base = np.asarray(run(params, TOKENS)[0])
    alone = [np.asarray(run(attach(params, factors, scale), TOKENS)[0]) for factors, scale in adapters]
    multi = attach_many(params, adapters)
    ids = jnp.array([1, 2, 0])  # row 0 adapter one, row 1 adapter two, row 2 the base
    mixed = np.asarray(jax.jit(lambda p, ids, t: forward(select_adapters(p, ids), t, checkpoint.config)[0])(
        multi, ids, TOKENS))
    for row, expected in enumerate([alone[0], alone[1], base]):
        np.testing.assert_allclose(mixed[row], expected[row], atol=1e-5, rtol=0)
    assert np.abs(alone[0] - base).max() > 1e-2 and np.abs(alone[1] - base).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(np.asarray(run(multi, TOKENS)[0]), base, atol=1e-5, rtol=0)  # no ids: the base
