"""The int8 suite: SmolLM2-135M-Instruct decode with int8 weights against our float32 and bfloat16 and against
llama.cpp at Q8_0 and F32 on the same weights, at batch 1 and 8, every runner interleaved round by round.

  ours float32 / bfloat16   Engine.generate on the converted checkpoints (compute and cache in that dtype)
  ours int8                 the float32 checkpoint quantized on load (`load_params(quantize="int8")`), float32
                            compute and cache: the int8 weights are converted inside each dot
  llama.cpp F32 / Q8_0      bench.llama_cpp_peer: GGUFs of the same weights, llama.cpp's C API, all cores

Roofline per runner: bandwidth x batch / bytes a step reads (its weights at their own width: 4, 2, 1 byte per
parameter; Q8_0 1.0625; plus the KV cache at the mean context).
"""

from __future__ import annotations

import gc

import jax.numpy as jnp

from bench import roofline
from bench.common import best, interleave, logger
from bench.cpu import smollm2
from bench.decode import OurGenerate
from bench.llama_cpp_peer import GGUF_TYPES, LlamaCppGenerate, write_gguf
from llama_jax.checkpoints import load_params, open_checkpoint, smollm2_gguf_path
from llama_jax.model import matmul_params

BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "int8": 1.0, "llama.cpp F32": 4.0, "llama.cpp Q8_0": 34 / 32}
PROMPT_LEN = 128


log = logger("int8")


def run(args, limits: dict) -> dict:
    rounds = 2 if args.quick else 3
    dirs, config = smollm2(args.cache_dir)
    ggufs = {q: write_gguf(smollm2_gguf_path(), args.cache_dir / f"smollm2-135m-instruct-{q}.gguf", q)
             for q in GGUF_TYPES}
    params = {"float32": load_params(open_checkpoint(dirs["float32"])),
              "bfloat16": load_params(open_checkpoint(dirs["bfloat16"])),
              "int8": load_params(open_checkpoint(dirs["float32"]), quantize="int8")}
    compute = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "int8": jnp.float32}
    rows = []
    for batch in (1, 8):
        tokens = args.new_tokens
        log(f"batch {batch}: compiling ours, loading llama.cpp")
        runners = {name: OurGenerate(p, config, dtype=compute[name], batch=batch, prompt_len=PROMPT_LEN,
                                     new_tokens=tokens) for name, p in params.items()}
        peers = {f"llama.cpp {q}": LlamaCppGenerate(path, batch=batch, prompt_len=PROMPT_LEN, new_tokens=tokens,
                                                    vocab_size=config.vocab_size) for q, path in ggufs.items()}
        runs = interleave({**runners, **peers}, rounds)
        context = roofline.decode_mean_context(PROMPT_LEN, tokens)
        for name, results in runs.items():
            cache = "bfloat16" if name == "bfloat16" else "float32" if not name.startswith("llama.cpp") else "float16"
            step_bytes = (matmul_params(config) * BYTES_PER_PARAM[name]
                          + batch * context * roofline.kv_bytes_per_token(config, cache))
            row = {"batch": batch, "runner": name, "new_tokens": tokens,
                   "tok_s": best([r["decode_tok_s"] for r in results]),
                   "limit_tok_s": limits["bandwidth"] * batch / step_bytes, "weight_bytes_per_param":
                   BYTES_PER_PARAM[name], "compile_s": getattr(runners.get(name), "compile_s", 0.0)}
            rows.append(row)
            log(f"  {name}: {row['tok_s']:.1f} tok/s")
        for peer in peers.values():
            peer.close()
        del runners, peers
        gc.collect()
    return {"int8_decode": rows, "settings": {"prompt_len": PROMPT_LEN, "new_tokens": args.new_tokens,
                                             "rounds": rounds}}
