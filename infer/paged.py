"""`python -m infer` through the serving engine: `--json-schema FILE` (every completion constrained to JSON that the
schema accepts) and `--speculate` (speculative decoding).

The batch `Engine` has neither per-token masks nor speculation, so these prompts go through `PagedEngine` (as the
terminal chat), all at once: a prompt's tokens are those `infer` gives it alone (greedy, or sampled with the same
settings), constrained to a valid text by its own llguidance matcher (infer/grammar.py) with --json-schema.
"""

from __future__ import annotations

import json
import sys
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


def run_paged(args, checkpoint: Checkpoint, encoder: Encoder, grammar: tuple[Grammars, str] | None, speculate,
              params, sampling: SamplingParams, dtype, mesh, prompts: list[str], encoded: list[list[int]],
              max_len: int) -> int:
    """Print each prompt's completion (text, or with --json the fields of `infer --json`, and with --speculate how
    many tokens were proposed and accepted)."""
    start = time.perf_counter()
    results = generate(args, checkpoint, grammar, speculate, params, sampling, dtype, mesh, encoded, max_len)
    for i, (prompt, ids, result) in enumerate(zip(prompts, encoded, results, strict=True)):
        text = encoder.tokenizer.decode(result["generated_token_ids"], skip_special_tokens=True)
        if args.json:
            print(json.dumps({"prompt": prompt, "prompt_token_ids": ids, **result, "text": text}, ensure_ascii=False))
        else:
            print(text if len(prompts) == 1 else f"[{i}] {text}")
    if not args.json:
        tokens = sum(len(r["generated_token_ids"]) for r in results)
        line = f"({tokens} tokens in {time.perf_counter() - start:.1f} s"
        if speculate is not None:
            proposed = sum(r["speculation"]["proposed_tokens"] for r in results)
            accepted = sum(r["speculation"]["accepted_tokens"] for r in results)
            line += f"; speculation: {accepted} of {proposed} proposed tokens accepted"
        print(line + ")", file=sys.stderr)
    return 0


def generate(args, checkpoint: Checkpoint, grammar: tuple[Grammars, str] | None, speculate, params,
             sampling: SamplingParams, dtype, mesh, encoded: list[list[int]], max_len: int) -> list[dict]:
    """Each prompt's completion: {generated_token_ids, finish_reason, time_to_first_token_s, decode_tokens_per_s}
    (and speculation: {proposed_tokens, accepted_tokens, acceptance_rate}), in order. Prompt i samples with stream i
    of --seed (row i of `infer` on a batch)."""
    engine = PagedEngine(params, checkpoint.config, slots=min(args.batch_size, len(encoded)), max_len=max_len,
                         block_size=block_size_for(max_len), stop_ids=checkpoint.stop_ids,
                         cache_dtype=args.kv_cache or dtype, dtype=dtype, attention=args.attention, mesh=mesh,
                         speculate=speculate)
    start = time.perf_counter()
    constraint = (lambda: grammar[0].constraint(grammar[1])) if grammar else (lambda: None)
    sids = {engine.add(Request(ids, args.max_new_tokens, sampling, args.seed, i, constraint=constraint())): i
            for i, ids in enumerate(encoded)}
    results = [{"generated_token_ids": []} for _ in encoded]
    times: list[list[float]] = [[] for _ in encoded]
    while any("finish_reason" not in r for r in results):
        for out in engine.step():
            result = results[sids[out.sid]]
            result["generated_token_ids"] += [t.id for t in out.tokens]
            times[sids[out.sid]] += [time.perf_counter()] * len(out.tokens)
            if out.finish_reason:
                result["finish_reason"] = out.finish_reason
                if speculate is not None:
                    result["speculation"] = {"proposed_tokens": out.proposed, "accepted_tokens": out.accepted,
                                             "acceptance_rate": out.accepted / max(out.proposed, 1)}
    for result, stamps in zip(results, times, strict=True):
        result["time_to_first_token_s"] = stamps[0] - start
        result["decode_tokens_per_s"] = (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)
    return results
