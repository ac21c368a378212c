"""The GPU tuning suite's parts that run without a GPU: every flag set is one XLA knows (a typo would make XLA refuse
to start on the GPU, after the device time is spent), the int8 projection formulations compute the same products
as bfloat16 weights holding the dequantized values, the serving case serves every token, and the decode attention
forms agree."""

import os
import subprocess
import sys

import pytest

from bench import gpu_micro, gpu_serve, gpu_tune
from llama_jax import preset


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


@pytest.mark.slow  # a bench tool's case
def test_int8_formulations_compute_the_dequantized_product():
    """Every int8 projection candidate, on the tiny model's shapes (one batch size: the rest only adds compiles):
    timed, and within bf16 rounding of the float32 product of the dequantized weight (relative error in norm, at 8
    rows; exactly 0 would mean it was not computed)."""
    measured = gpu_micro.proj_case({"weights": gpu_tune.PROJ_WEIGHTS, "batches": [1]}, preset("tiny"), rounds=1)
    for weights in gpu_tune.PROJ_WEIGHTS:
        seconds = measured["seconds"][weights]
        assert set(seconds) == {"batch 1"} and seconds["batch 1"] > 0
    int8 = [w for w in gpu_tune.PROJ_WEIGHTS if w.startswith("int8")]
    assert set(measured["rel_error"]) == set(int8)
    assert all(0 < measured["rel_error"][w] < 1e-2 for w in int8), measured["rel_error"]


@pytest.mark.slow  # a bench tool's case
def test_the_paged_case_serves_every_token_and_compares_with_the_engine():
    """The serving case at tiny shapes: every request's tokens come out of the PagedEngine's timed pass (the case
    asserts it), both engines' rates are positive, and the table names the ratio."""
    result = gpu_serve.paged_case({"batch": 8, "budget": 64}, gpu_tune.SHAPES[True])
    assert result["engine"]["tok_s"] > 0 and result["paged"]["tok_s"] > 0
    assert any(p.startswith("('decode'") for p in result["paged"]["programs"])
    assert "x the Engine's" in gpu_serve.paged_figures(result)


def test_decode_attention_forms_agree():
    """The attention candidates (slices of a stacked cache, one array per layer, reductions) on the tiny model's
    heads: each within bf16 rounding of the first (exactly 0 for the per-layer form: the same `attend`)."""
    measured = gpu_micro.attention_case({"contexts": [24]}, preset("tiny"), batch=3, rounds=1)
    assert set(measured["seconds"]) == {f"{form}, context 24" for form in gpu_micro.ATTENTION_FORMS}
    assert measured["rel_error"]["per-layer, context 24"] == 0
    assert 0 < measured["rel_error"]["reduce, context 24"] < 2e-2, measured["rel_error"]
