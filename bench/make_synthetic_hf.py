"""Write a synthetic Hugging Face LlamaForCausalLM directory with random weights in a preset's real shapes.

    python bench/make_synthetic_hf.py --preset llama3.2-1b OUT_DIR [--dtype bfloat16] [--shard-size-gb 1]

OUT_DIR gets config.json (the preset's `to_hf()` plus "torch_dtype"), generation_config.json, sharded
model-0000i-of-0000n.safetensors and model.safetensors.index.json, tensors in HF's order (embedding, then layer
by layer, then the final norm and lm_head). It streams: each safetensors file is written by hand (8-byte header
length, JSON header, raw data) one tensor at a time, and each tensor in chunks of at most 64 MiB, so memory stays
at one chunk whatever the model size (llama3-8b: ~16 GB on disk, ~100 MB of RAM).

The weights are random and non-zero but carry no information: they are built from random bits (PCG64 raw
output, ~3 GB/s on one core) with the sign and mantissa random and the exponent fixed so that |w| is in
[2^-7, 2^-5), about a 0.02-std init; norm weights are in [1, 2). No NaN, inf, zero or subnormal. Generation is
faster than the disk, so making the 1B model takes seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from llama_jax.checkpoints import tensor_mappings
from llama_jax.model import PRESETS, preset

INDEX_FILE = "model.safetensors.index.json"
CHUNK_BYTES = 64 << 20
DTYPES = {"bfloat16": ("BF16", np.dtype(ml_dtypes.bfloat16)),
          "float16": ("F16", np.dtype(np.float16)),
          "float32": ("F32", np.dtype(np.float32))}


def hf_tensors(config) -> list[tuple[str, tuple[int, ...]]]:
    """Every (HF name, shape) of the model, in the order HF checkpoints store them (by layer)."""
    maps = tensor_mappings(config)
    unstacked = [m for m in maps if not m.stacked]
    first = [(m.hf_name, m.hf_shape) for m in unstacked if m.hf_name == "model.embed_tokens.weight"]
    layers = [(m.hf_name.format(i=i), m.hf_shape) for i in range(config.num_hidden_layers)
              for m in maps if m.stacked]
    last = [(m.hf_name, m.hf_shape) for m in unstacked if m.hf_name != "model.embed_tokens.weight"]
    return first + layers + last


def plan_shards(tensors, itemsize: int, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy split into consecutive groups of at most `shard_bytes` (a bigger tensor gets a file of its own)."""
    shards, current, size = [], [], 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * itemsize
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    if current:
        shards.append(current)
    return shards


# Per dtype: (unsigned view, (keep mask, set bits) for weights, (keep mask, set bits) for norm weights).
# Weights keep sign, mantissa and the lowest exponent bit, the rest of the exponent set so |w| is in
# [2^-7, 2^-5); norms keep only the mantissa with exponent = bias, i.e. [1, 2).
_BITS = {"bfloat16": (np.uint16, (0x80FF, 120 << 7), (0x007F, 127 << 7)),
         "float16": (np.uint16, (0x87FF, 8 << 10), (0x03FF, 15 << 10)),
         "float32": (np.uint32, (0x80FFFFFF, 120 << 23), (0x007FFFFF, 127 << 23))}


def random_chunk(rng: np.random.Generator, n: int, dtype_name: str, norm: bool) -> np.ndarray:
    """`n` random non-zero values of the dtype as raw bits (uint16/uint32): see `_BITS`. ~3 GB/s on one core."""
    uint, weight, norm_bits = _BITS[dtype_name]
    keep, value = norm_bits if norm else weight
    per_word = 8 // np.dtype(uint).itemsize
    words = rng.bit_generator.random_raw(-(-n // per_word))  # uint64
    words &= np.uint64(int.from_bytes(np.array([keep] * per_word, uint).tobytes(), "little"))
    words |= np.uint64(int.from_bytes(np.array([value] * per_word, uint).tobytes(), "little"))
    return words.view(uint)[:n]


def write_safetensors(path: Path, tensors, dtype_name: str, rng: np.random.Generator) -> int:
    """Write one safetensors file, tensor by tensor in chunks; returns its data bytes. fsync'd."""
    st_dtype, dtype = DTYPES[dtype_name]
    header, offset = {}, 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    chunk_items = CHUNK_BYTES // dtype.itemsize
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for name, shape in tensors:
            norm = name.endswith("norm.weight")
            remaining = int(np.prod(shape))
            while remaining:
                n = min(remaining, chunk_items)
                f.write(random_chunk(rng, n, dtype_name, norm).data)
                remaining -= n
        f.flush()
        os.fsync(f.fileno())
    return offset


def make(preset_name: str, out_dir: Path, dtype_name: str = "bfloat16", shard_size_gb: float = 1.0,
         seed: int = 0, force: bool = False) -> dict:
    config = preset(preset_name)
    dtype = DTYPES[dtype_name][1]
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise SystemExit(f"error: {out_dir} exists and is not empty; pass --force")
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("model*.safetensors"):
        old.unlink()
    shards = plan_shards(hf_tensors(config), dtype.itemsize, int(shard_size_gb * 1e9))
    rng = np.random.default_rng(seed)
    weight_map, total, start = {}, 0, time.perf_counter()
    for i, tensors in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(out_dir / name, tensors, dtype_name, rng)
        weight_map.update(dict.fromkeys((t for t, _ in tensors), name))
        print(f"  {name}: {len(tensors)} tensors, {total / 1e9:.2f} GB so far", file=sys.stderr)
    seconds = time.perf_counter() - start
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps({**config.to_hf(), "torch_dtype": dtype_name}, indent=2) + "\n")
    eos = list(config.eos_token_id)
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
                  "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return {"bytes": total, "tensors": len(weight_map), "shards": len(shards), "seconds": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--preset", default="llama3.2-1b", choices=sorted(PRESETS))
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--shard-size-gb", type=float, default=1.0, help="max bytes per file, in GB (1e9)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace the weights of a non-empty OUT_DIR")
    args = parser.parse_args(argv)
    result = make(args.preset, args.out_dir, args.dtype, args.shard_size_gb, args.seed, args.force)
    print(f"wrote {args.out_dir}: {result['tensors']} tensors in {result['shards']} files, "
          f"{result['bytes'] / 1e9:.3f} GB in {result['seconds']:.1f} s "
          f"({result['bytes'] / 1e9 / result['seconds']:.2f} GB/s, fsync'd)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
