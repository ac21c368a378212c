"""The model configuration: every Llama 3.x field that changes the math, and its HF `config.json` form."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from llama_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 ("llama3" rope_type) frequency scaling for long context."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self):
        _check_positive(self, ("factor", "low_freq_factor", "high_freq_factor"), "a positive number", _is_number,
                        prefix="rope_scaling.")
        _check_positive(self, ("original_max_position_embeddings",), "a positive integer", _is_int,
                        prefix="rope_scaling.")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"rope_scaling.high_freq_factor ({self.high_freq_factor}) must be greater than "
                             f"low_freq_factor ({self.low_freq_factor})")


_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama 3.x decoder. Immutable; pass it explicitly."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        """Every field checked, so a bad config is a one-line ValueError here, never a failure deep in JAX."""
        _check_positive(self, _SIZES, "a positive integer", _is_int)
        _check_positive(self, ("rms_norm_eps", "rope_theta"), "a positive number", _is_number)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (rotary embeddings rotate pairs), got {self.head_dim}")
        tokens = [("bos_token_id", self.bos_token_id), ("pad_token_id", self.pad_token_id)]
        for name, token in [*tokens, *(("eos_token_id", t) for t in self.eos_token_id)]:
            if token is not None and not (_is_int(token) and 0 <= token < self.vocab_size):
                raise ValueError(f"{name} must be a token id below vocab_size ({self.vocab_size}), got {token!r}")

    @property
    def num_groups(self) -> int:
        """Query heads that share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **changes) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    # ----- Hugging Face config.json -----

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LlamaConfig:
        """Read a HF `LlamaForCausalLM` config dict (older `rope_theta`/`rope_scaling` or newer `rope_parameters`).

        Raises ValueError (with the offending key) for anything this port cannot compute exactly.
        """
        archs = hf.get("architectures") or ["LlamaForCausalLM"]
        if archs != ["LlamaForCausalLM"] or hf.get("model_type", "llama") != "llama":
            raise ValueError(f"unsupported architecture {archs} (model_type {hf.get('model_type')!r}); "
                             "only LlamaForCausalLM is supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=_float(rope["factor"]),
                low_freq_factor=_float(rope["low_freq_factor"]),
                high_freq_factor=_float(rope["high_freq_factor"]),
                original_max_position_embeddings=rope["original_max_position_embeddings"],
            )
        elif rope_type == "default":
            scaling = None
        else:
            raise ValueError(f"unsupported rope_type {rope_type!r}; supported: default, llama3")
        heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
        kv_heads, head_dim = hf.get("num_key_value_heads"), hf.get("head_dim")
        if head_dim is None and _is_int(hidden) and _is_int(heads) and heads > 0:  # else __post_init__ names heads
            head_dim = hidden // heads
        eos = hf.get("eos_token_id")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=heads if kv_heads is None else kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=_float(rope_theta),
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf(self) -> dict[str, Any]:
        """The HF config dict, in the older `rope_theta`/`rope_scaling` form that every HF-world loader reads."""
        eos = list(self.eos_token_id)
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None
            else {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": self.pad_token_id,
        }

    @classmethod
    def load(cls, path: str | Path) -> LlamaConfig:
        """Read a `config.json` file (or the one inside a directory); InputError names the file on failure."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            hf = json.loads(path.read_text())
            if not isinstance(hf, dict):
                raise ValueError(f"not a JSON object but {type(hf).__name__}")
            return cls.from_hf(hf)
        except FileNotFoundError:
            raise InputError(path, "missing config.json") from None
        except json.JSONDecodeError as e:
            raise InputError(path, f"not valid JSON ({e})") from None
        except KeyError as e:
            raise InputError(path, f"missing required key {e}") from None
        except ValueError as e:
            raise InputError(path, str(e)) from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf(), indent=2) + "\n")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _float(value):
    """A JSON number as a float; anything else unchanged, for the config's own check to name."""
    return float(value) if _is_number(value) else value


def _check_positive(config, names: tuple[str, ...], kind: str, is_kind, prefix: str = "") -> None:
    """ValueError naming the first of `names` whose value in `config` is not `kind` (and > 0)."""
    for name in names:
        value = getattr(config, name)
        if not (is_kind(value) and value > 0):
            raise ValueError(f"{prefix}{name} must be {kind}, got {value!r}")
