"""Test set-up: 8 simulated CPU devices and one compilation cache for the session (both set before JAX starts),
and loaders for the committed HF fixtures.

The session's cache directory holds the persistent XLA compilation cache and is $LLAMA_JAX_CACHE (where `infer`
keeps converted models and compiled programs), so this process, pytest-xdist's workers and every CLI subprocess
the tests start compile a program once and load it after that; nothing reaches the user's own cache. The directory
is removed when the session ends.
"""

import os
import shutil
import tempfile
import uuid

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# xdist's workers inherit the controller's environment, so the controller's directory is every worker's.
SESSION_DIR = os.environ.setdefault("LLAMA_JAX_TEST_SESSION_DIR",
                                    os.path.join(tempfile.gettempdir(), f"llama_jax-tests-{uuid.uuid4().hex[:12]}"))
os.environ["LLAMA_JAX_CACHE"] = SESSION_DIR
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(SESSION_DIR, "xla")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from llama_jax.checkpoints.hf_mapping import params_from_hf  # noqa: E402
from llama_jax.model.config import LlamaConfig  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
VARIANTS = ("mha", "gqa", "tied", "bias", "head_dim", "rope_scaling")


def pytest_sessionfinish(session):
    """The controller (or the only process) removes the session's cache; xdist's workers leave it to it."""
    if not hasattr(session.config, "workerinput"):
        shutil.rmtree(SESSION_DIR, ignore_errors=True)


def load_fixture(variant: str):
    """(config, params, reference arrays) of a tiny HF model written by tests/make_fixtures.py."""
    directory = FIXTURES / variant
    config = LlamaConfig.load(directory)
    params = params_from_hf(load_file(directory / "model.safetensors"), config)
    return config, params, dict(np.load(directory / "reference.npz"))


@pytest.fixture(scope="session")
def hf_smollm2_model():
    """transformers' LlamaForCausalLM loaded from the SmolLM2 GGUF (fp32, eval): the real-model reference.

    transformers reads a GGUF slowly (~30 s: the file twice, a tensor-name map built per tensor), so the first
    process of the session to need it saves what it loaded with `save_model` in the session directory, and the
    other xdist worker loads that (~1 s): the same tensors, written and read by transformers alone."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from filelock import FileLock
    from safetensors.torch import save_model

    from llama_jax.checkpoints.gguf_file import smollm2_gguf_path

    saved = Path(SESSION_DIR) / "hf-smollm2"
    saved.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{saved}.lock"):
        if not saved.is_dir():
            path = smollm2_gguf_path()
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                      dtype=torch.float32)
            model.config.save_pretrained(f"{saved}.partial")  # (a GGUF-loaded model refuses save_pretrained)
            save_model(model, f"{saved}.partial/model.safetensors")
            os.rename(f"{saved}.partial", saved)
            return model.eval()
    return transformers.AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_checkpoint():
    """SmolLM2-135M-Instruct converted from its GGUF to a float32 llama_jax checkpoint, once per run: the first
    process to need it converts it into the session directory (~10 s), the other xdist worker waits and reads it."""
    from filelock import FileLock

    from llama_jax.checkpoints.conversion import gguf_source, to_checkpoint
    from llama_jax.checkpoints.gguf_file import smollm2_gguf_path

    saved = Path(SESSION_DIR) / "smollm2-ckpt"
    saved.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{saved}.lock"):
        if not saved.is_dir():
            to_checkpoint(gguf_source(smollm2_gguf_path()), saved)
    return saved


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The gqa fixture (random tiny weights, a byte tokenizer) as a llama_jax checkpoint, for tests of the programs'
    plumbing where the model's answers do not matter: it loads and compiles in a second or two, SmolLM2 in ten."""
    from hf_dirs import make_hf_dir

    from llama_jax.checkpoints.conversion import hf_source, to_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return to_checkpoint(hf_source(make_hf_dir(root / "hf", "gqa")), root / "ckpt")


@pytest.fixture(params=VARIANTS)
def fixture_model(request):
    return (request.param, *load_fixture(request.param))
