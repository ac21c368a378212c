"""Test set-up: 8 simulated CPU devices (set before JAX starts) and loaders for the committed HF fixtures."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from llama_jax.checkpoints.hf_mapping import params_from_hf  # noqa: E402
from llama_jax.model.config import LlamaConfig  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
VARIANTS = ("mha", "gqa", "tied", "bias", "head_dim", "rope_scaling")


def load_fixture(variant: str):
    """(config, params, reference arrays) of a tiny HF model written by tests/make_fixtures.py."""
    directory = FIXTURES / variant
    config = LlamaConfig.load(directory)
    params = params_from_hf(load_file(directory / "model.safetensors"), config)
    return config, params, dict(np.load(directory / "reference.npz"))


@pytest.fixture(scope="session")
def hf_smollm2_model():
    """transformers' LlamaForCausalLM loaded from the SmolLM2 GGUF (fp32, eval): the real-model reference."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from llama_jax.checkpoints.gguf_file import smollm2_gguf_path

    path = smollm2_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory):
    """SmolLM2-135M-Instruct converted from its GGUF to a float32 llama_jax checkpoint (once per run)."""
    from llama_jax.checkpoints.conversion import gguf_source, to_checkpoint
    from llama_jax.checkpoints.gguf_file import smollm2_gguf_path

    return to_checkpoint(gguf_source(smollm2_gguf_path()), tmp_path_factory.mktemp("smollm2") / "ckpt")


@pytest.fixture(params=VARIANTS)
def fixture_model(request):
    return (request.param, *load_fixture(request.param))
