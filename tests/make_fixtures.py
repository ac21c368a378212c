"""Build tiny random-weight Llama reference fixtures with Hugging Face transformers.

The JAX port is checked against the reference implementation, ``transformers``'
``LlamaForCausalLM`` (fp32, eager attention), never against itself. For every
variant in ``VARIANTS`` this script builds a 2-layer, 256-token-vocabulary model
with deterministic random weights and writes to ``tests/fixtures/<variant>/``:

``config.json``
    The Hugging Face config, exactly as ``transformers`` serialises it.
``model.safetensors``
    The fp32 state dict under Hugging Face names (no ``lm_head.weight`` when
    the embeddings are tied), loadable with ``LlamaForCausalLM.from_pretrained``.
``reference.npz``
    ``tokens`` int32 [2, S] and ``logits`` float32 [2, S, vocab]: a forward pass
    at positions 0..S-1 without attention mask.
    ``gen_prompt`` int32 [7] and ``gen_tokens`` int32 [40]: the new tokens of a
    greedy ``generate`` call that never stops early (no EOS token).
    ``train_tokens`` int32 [2, 10], ``train_mask`` float32 [2, 10] and
    ``train_loss`` float32 []: the masked next-token loss
    ``sum(CE(logits[:, :-1], tokens[:, 1:]) * mask[:, 1:]) / sum(mask[:, 1:])``.
``grads.safetensors`` (only for ``GRAD_VARIANTS``, to keep the fixtures small)
    The fp32 gradient of ``train_loss`` for every parameter, Hugging Face names.

Weights are not Hugging Face's initialisation (std 0.02 gives near-zero logits
and uniform attention): every matrix is N(0, 1/fan_in) (q_proj: N(0, 4/fan_in)),
every RMSNorm weight 1 + 0.1 N(0, 1) and every bias 0.1 N(0, 1), so logits are
O(1) and attention is sharp and content-dependent. Sampled token ids avoid the special ids 0-2 (pad, bos, eos); in particular
token 0 is the embedding's ``padding_idx``, whose gradient torch zeroes.

Regenerate all fixtures (requires torch and transformers; deterministic, so a
rerun reproduces the files bit for bit) with::

    python tests/make_fixtures.py

Tests can also ``import make_fixtures`` and call ``build_reference(variant)`` to
recompute a variant live.
"""

import json
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file
from transformers import LlamaConfig, LlamaForCausalLM

FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"

BASE_CONFIG = dict(
    vocab_size=256,
    num_hidden_layers=2,
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=8,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=256,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
FIRST_REGULAR_TOKEN = 3  # ids 0, 1, 2 are pad, bos and eos
QUERY_GAIN = 2.0  # sharpens attention: scores have std ~2 rather than ~1

BATCH = 2
GEN_PROMPT_LEN = 7
GEN_NEW_TOKENS = 40
TRAIN_LEN = 10
TRAIN_PROMPT_LENS = (4, 2)  # masked-out leading tokens per row, like an SFT prompt


@dataclass(frozen=True)
class Variant:
    overrides: dict = field(default_factory=dict)  # applied on top of BASE_CONFIG
    seq_len: int = 12  # length of the forward-pass `tokens`


VARIANT_TABLE = {
    "mha": Variant(dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128)),
    "gqa": Variant(),
    "tied": Variant(dict(tie_word_embeddings=True)),
    "bias": Variant(dict(attention_bias=True, mlp_bias=True)),
    "head_dim": Variant(
        dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=128)
    ),
    # Llama 3.1 scaling with a short original context, so a 96-token prompt exercises it.
    "rope_scaling": Variant(
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        ),
        seq_len=96,
    ),
}
VARIANTS = tuple(VARIANT_TABLE)
GRAD_VARIANTS = ("gqa", "tied")


def _build_model(variant: str, generator: torch.Generator) -> LlamaForCausalLM:
    config = LlamaConfig(**{**BASE_CONFIG, **VARIANT_TABLE[variant].overrides}, attn_implementation="eager")
    # What `save_pretrained` would add, so config.json matches a real checkpoint.
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # named_parameters() yields a tied lm_head only once, as embed_tokens.
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 2:
                gain = QUERY_GAIN if "q_proj" in name else 1.0
                param.copy_(noise * gain * param.shape[1] ** -0.5)
            elif "norm" in name:
                param.copy_(1.0 + 0.1 * noise)
            else:  # bias
                param.copy_(0.1 * noise)
    return model


def _random_tokens(generator: torch.Generator, vocab_size: int, *shape: int) -> torch.Tensor:
    return torch.randint(FIRST_REGULAR_TOKEN, vocab_size, shape, generator=generator)


def _greedy_generate(model: LlamaForCausalLM, prompt: torch.Tensor) -> torch.Tensor:
    """The GEN_NEW_TOKENS tokens `generate` appends to `prompt` [P], greedily and without EOS."""
    model.generation_config.eos_token_id = None  # never stop early, no min-length logit masking
    with torch.no_grad():
        output = model.generate(
            prompt[None], do_sample=False, max_new_tokens=GEN_NEW_TOKENS, pad_token_id=model.config.pad_token_id
        )[0]
        assert output.shape == (len(prompt) + GEN_NEW_TOKENS,) and torch.equal(output[: len(prompt)], prompt)
        # generate() must be plain argmax decoding, which is what the fixture promises.
        for step in range(len(prompt), len(output)):
            assert model(output[None, :step]).logits[0, -1].argmax() == output[step]
    return output[len(prompt) :]


def _masked_lm_loss(model: LlamaForCausalLM, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = model(tokens).logits[:, :-1]
    targets, weights = tokens[:, 1:], mask[:, 1:]
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (losses * weights.reshape(-1)).sum() / weights.sum()


def build_reference(
    variant: str,
) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Build `variant` with transformers and return (config.json dict, state dict, reference arrays, grads).

    The state dict and grads are fp32 numpy arrays under Hugging Face parameter
    names; the reference arrays are those stored in reference.npz.
    """
    generator = torch.Generator().manual_seed(zlib.crc32(variant.encode()))
    model = _build_model(variant, generator)
    vocab_size = model.config.vocab_size

    tokens = _random_tokens(generator, vocab_size, BATCH, VARIANT_TABLE[variant].seq_len)
    with torch.no_grad():
        logits = model(tokens).logits

    gen_prompt = _random_tokens(generator, vocab_size, GEN_PROMPT_LEN)
    gen_tokens = _greedy_generate(model, gen_prompt)

    train_tokens = _random_tokens(generator, vocab_size, BATCH, TRAIN_LEN)
    train_mask = torch.ones(BATCH, TRAIN_LEN)
    for row, prompt_len in enumerate(TRAIN_PROMPT_LENS):
        train_mask[row, :prompt_len] = 0.0
    train_loss = _masked_lm_loss(model, train_tokens, train_mask)
    train_loss.backward()

    config = json.loads(model.config.to_json_string())
    params = dict(model.named_parameters())
    state_dict = {name: param.detach().numpy().copy() for name, param in params.items()}
    grads = {name: param.grad.numpy().copy() for name, param in params.items()}
    reference = {
        "tokens": tokens.numpy().astype(np.int32),
        "logits": logits.numpy(),
        "gen_prompt": gen_prompt.numpy().astype(np.int32),
        "gen_tokens": gen_tokens.numpy().astype(np.int32),
        "train_tokens": train_tokens.numpy().astype(np.int32),
        "train_mask": train_mask.numpy(),
        "train_loss": train_loss.detach().numpy(),
    }
    return config, state_dict, reference, grads


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez, but with fixed zip timestamps so reruns are bit-identical."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in arrays.items():
            with archive.open(zipfile.ZipInfo(f"{name}.npy"), "w", force_zip64=True) as f:
                np.lib.format.write_array(f, array)


def main() -> None:
    for variant in VARIANTS:
        config, state_dict, reference, grads = build_reference(variant)
        out_dir = FIXTURES_DIR / variant
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(state_dict, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        if variant in GRAD_VARIANTS:
            save_file(grads, str(out_dir / "grads.safetensors"), metadata={"format": "pt"})
        _save_npz(out_dir / "reference.npz", reference)
        print(
            f"{variant:>12}: max|logit| = {np.abs(reference['logits']).max():.3f}, "
            f"train_loss = {reference['train_loss']:.4f}"
        )


if __name__ == "__main__":
    main()
