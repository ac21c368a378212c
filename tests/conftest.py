"""Test set-up: 8 simulated CPU devices (set before JAX starts) and loaders for the committed HF fixtures."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from llama_jax.config import LlamaConfig  # noqa: E402
from llama_jax.hf_mapping import params_from_hf  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
VARIANTS = ("mha", "gqa", "tied", "bias", "head_dim", "rope_scaling")


def load_fixture(variant: str):
    """(config, params, reference arrays) of a tiny HF model written by tests/make_fixtures.py."""
    directory = FIXTURES / variant
    config = LlamaConfig.load(directory)
    params = params_from_hf(load_file(directory / "model.safetensors"), config)
    return config, params, dict(np.load(directory / "reference.npz"))


@pytest.fixture(params=VARIANTS)
def fixture_model(request):
    return (request.param, *load_fixture(request.param))
