"""`python -m infer --json-schema FILE`: every prompt's completion constrained to JSON that the schema accepts.

The batch `Engine` has no per-token masks, so these prompts go through the serving engine (`PagedEngine`, as the
terminal chat), each with its own llguidance matcher (infer/grammar.py): a prompt's tokens are what the model would
pick (greedy, or sampled with the same settings) among those that keep the text valid.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from infer.grammar import Grammars
from llama_jax.checkpoints import Checkpoint
from llama_jax.errors import InputError
from llama_jax.generation import PagedEngine, Request, SamplingParams, block_size_for
from llama_jax.text import Encoder


def schema_grammar(path: str, checkpoint: Checkpoint, encoder: Encoder) -> tuple[Grammars, str]:
    """llguidance over the checkpoint's tokenizer, and the grammar of the JSON schema in file `path` (InputError naming
    the file when it cannot be one): checked before any weight is read."""
    grammars = Grammars(encoder, checkpoint.config.vocab_size, checkpoint.stop_ids)
    try:
        schema = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(path, f"not a readable JSON schema ({e.__class__.__name__}: {e})") from None
    try:
        return grammars, grammars.json_schema(schema)
    except ValueError as e:
        raise InputError(path, str(e)) from None

def run_constrained(args, checkpoint: Checkpoint, encoder: Encoder, grammar: tuple[Grammars, str], params,
                    sampling: SamplingParams, dtype, mesh, prompts: list[str], encoded: list[list[int]],
                    max_len: int) -> int:
    """Print each prompt's constrained completion (text, or with --json the fields of `infer --json`)."""
    results = generate(args, checkpoint, grammar, params, sampling, dtype, mesh, encoded, max_len)
    for prompt, ids, result in zip(prompts, encoded, results, strict=True):
        text = encoder.tokenizer.decode(result["generated_token_ids"], skip_special_tokens=True)
        if args.json:
            print(json.dumps({"prompt": prompt, "prompt_token_ids": ids, **result, "text": text}, ensure_ascii=False))
        else:
            print(text)
    return 0


def generate(args, checkpoint: Checkpoint, grammar: tuple[Grammars, str], params, sampling: SamplingParams, dtype,
             mesh, encoded: list[list[int]], max_len: int) -> list[dict]:
    """Each prompt's constrained completion: {generated_token_ids, finish_reason, time_to_first_token_s,
    decode_tokens_per_s}, in order. Prompt i samples with stream i of --seed (row i of `infer` on a batch)."""
    grammars, grammar = grammar
    engine = PagedEngine(params, checkpoint.config, slots=min(args.batch_size, len(encoded)), max_len=max_len,
                         block_size=block_size_for(max_len), stop_ids=checkpoint.stop_ids,
                         cache_dtype=args.kv_cache or dtype, dtype=dtype, attention=args.attention, mesh=mesh)
    start = time.perf_counter()
    sids = {engine.add(Request(ids, args.max_new_tokens, sampling, args.seed, i, constraint=grammars.constraint(
        grammar))): i for i, ids in enumerate(encoded)}
    tokens, reasons, times = {i: [] for i in sids.values()}, {}, {i: [] for i in sids.values()}
    while len(reasons) < len(sids):
        for out in engine.step():
            i = sids[out.sid]
            tokens[i] += [t.id for t in out.tokens]
            times[i] += [time.perf_counter()] * len(out.tokens)
            if out.finish_reason:
                reasons[i] = out.finish_reason
    return [{"generated_token_ids": tokens[i], "finish_reason": reasons[i],
             "time_to_first_token_s": times[i][0] - start,
             "decode_tokens_per_s": (len(times[i]) - 1) / max(times[i][-1] - times[i][0], 1e-9)}
            for i in range(len(encoded))]
