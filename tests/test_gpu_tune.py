"""The GPU tuning suite's parts that run without a GPU: every flag set is one XLA knows (a typo would make XLA refuse
to start on the GPU, after the device time is spent), and the int8 projection formulations compute the same
products as bfloat16 weights holding the dequantized values."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from bench import gpu_tune
from llama_jax import preset
from llama_jax.model import QuantArray


def test_every_flag_set_is_known_to_xla():
    flags = " ".join(gpu_tune.FLAG_SETS.values())
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}"}
    done = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "3.0", done.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; jnp.ones(3)"], capture_output=True,
                         env={**env, "XLA_FLAGS": env["XLA_FLAGS"] + " --xla_gpu_enable_tritn_gemm=true"}, text=True,
                         timeout=120)
    assert bad.returncode != 0  # what the check above would catch


@pytest.mark.parametrize("formulation", ["convert-dot", "mul-reduce", "mixed-dot"])
def test_int8_formulations_compute_the_dequantized_product(formulation):
    config = preset("tiny")
    seconds = gpu_tune.proj_case({"weights": f"int8:{formulation}"}, config, rounds=1)["seconds"]
    assert set(seconds) == {f"batch {b}" for b in gpu_tune.PROJ_BATCHES} and all(s > 0 for s in seconds.values())
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 64)), jnp.bfloat16)
    values = jnp.asarray(np.random.default_rng(1).integers(-127, 128, size=(64, 32)), jnp.int8)
    scale = jnp.full((1, 32), 0.01, jnp.float32)
    expected = jnp.einsum("bi,io->bo", x.astype(jnp.float32), values.astype(jnp.float32) * scale)
    got = gpu_tune.int8_matmul(formulation, x, QuantArray(values, scale)).astype(jnp.float32)
    np.testing.assert_allclose(got, expected, rtol=2e-2, atol=2e-2 * float(jnp.abs(expected).max()))
    assert jnp.isfinite(got).all()
