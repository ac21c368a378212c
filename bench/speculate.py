"""python -m bench.speculate [CKPT_DIR] [--tokens 160] [--rounds 2] [--k 4 8]

What n-gram speculation (prompt lookup) gains on copy-heavy requests: SmolLM2 chat prompts that ask to repeat a
passage, to rewrite it with one word replaced and to add a docstring to a function, one request at a time, greedy.
Each prompt's decode tokens/s (the tokens after the first over the time after the first) through: the batch
`Engine` at batch 1 (what `infer` runs), the serving engine without speculation (4 decode steps per call, as the
server runs), and with `--speculate ngram` at each k, with the share of proposed tokens accepted. The tokens are
checked equal to plain decoding's. Interleaved rounds, best of each; prints a markdown table with each row against
the batch Engine in the same run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import md_table
from llama_jax.checkpoints import cache_home, load_params, open_checkpoint, smollm2_checkpoint
from llama_jax.generation import Engine, NgramProposer, PagedEngine, Request
from llama_jax.text import encoder_for

LICENCE = Path("/usr/share/common-licenses/Apache-2.0")
CODE = '''def mean_and_spread(values):
    total = 0.0
    for value in values:
        total += value
    mean = total / len(values)
    spread = 0.0
    for value in values:
        spread += (value - mean) ** 2
    return mean, (spread / len(values)) ** 0.5
'''


def prompts() -> dict[str, str]:
    """Three copy-heavy requests (the passage: the Apache licence's first definitions, as Debian ships it)."""
    passage = " ".join(" ".join(p.split()) for p in LICENCE.read_text().split("\n\n")[3:7])
    return {"repeat a passage": f"Repeat this passage exactly, word for word:\n\n{passage}",
            "replace a word": "Rewrite this passage with the word \"License\" replaced by \"Agreement\", and change "
                              f"nothing else:\n\n{passage}",
            "docstring for code": f"Here is a Python function:\n\n```python\n{CODE}```\n\nAdd a docstring to it and "
                                  "give the whole function."}


def through_engine(engine: Engine, ids: list[int], new: int, stop_ids) -> tuple[list[int], float]:
    """(tokens, decode tokens/s) of the request through the batch Engine (one device call, as `infer` runs it)."""
    result = engine.generate([ids], max_new_tokens=new, stop_ids=stop_ids)
    return result.completions[0].tokens, result.decode_tokens_per_s


def through_paged(engine: PagedEngine, ids: list[int], new: int) -> tuple[list[int], float, float]:
    """(tokens, decode tokens/s, the share of proposed tokens accepted) through the serving engine."""
    engine.add(Request(ids, new))
    tokens, stamps, accepted = [], [], 0.0
    while engine.running or engine.waiting:
        for out in engine.step():
            tokens += [t.id for t in out.tokens]
            stamps += [time.perf_counter()] * len(out.tokens)
            if out.finish_reason:
                accepted = out.accepted / max(out.proposed, 1)
    return tokens, (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9), accepted


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?")
    p.add_argument("--tokens", type=int, default=160)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--k", type=int, nargs="+", default=[4, 8])
    args = p.parse_args(argv)
    checkpoint = open_checkpoint(args.checkpoint or smollm2_checkpoint(cache_home()))
    encoder, config, stop_ids = encoder_for(checkpoint), checkpoint.config, checkpoint.stop_ids
    params = load_params(checkpoint, per_layer=True)
    requests = {name: encoder.render([{"role": "user", "content": text}], add_generation_prompt=True)
                for name, text in prompts().items()}
    max_len = 1024
    batch = Engine(params, config, max_len=max_len)
    engines = {"serving engine": PagedEngine(params, config, slots=1, max_len=max_len, stop_ids=stop_ids)}
    engines |= {f"ngram k={k}": PagedEngine(params, config, slots=1, max_len=max_len, stop_ids=stop_ids,
                                            speculate=NgramProposer(k)) for k in args.k}
    for engine in engines.values():
        engine.warm_up()
    best: dict[tuple[str, str], float] = {}
    made: dict[str, int] = {}
    accepted: dict[tuple[str, str], float] = {}
    for _ in range(args.rounds):
        for prompt, ids in requests.items():
            tokens, rate = through_engine(batch, ids, args.tokens, stop_ids)
            best[prompt, "batch Engine b1"] = max(best.get((prompt, "batch Engine b1"), 0), rate)
            made[prompt] = len(tokens)
            for name, engine in engines.items():
                got, rate, accepted[prompt, name] = through_paged(engine, ids, args.tokens)
                assert got == tokens, (prompt, name)
                best[prompt, name] = max(best.get((prompt, name), 0), rate)
    rows = []
    for prompt in requests:
        base = best[prompt, "batch Engine b1"]
        for name in ["batch Engine b1", *engines]:
            rate = best[prompt, name]
            rows.append([prompt, str(made[prompt]), name, f"{rate:.1f}", f"{rate / base:.2f}x",
                         f"{accepted[prompt, name]:.0%}" if engines.get(name) and engines[name].speculate else ""])
    print(md_table(["request", "tokens", "decoding", "tokens/s", "/ Engine b1", "accepted"], rows))
    print(json.dumps({f"{prompt} | {name}": rate for (prompt, name), rate in best.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
