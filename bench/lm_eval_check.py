"""python -m bench.lm_eval_check --lm-eval-python PY [--docs 40]: lm-evaluation-harness against our server.

A multiple-choice task written from the GPL-3 text (each sentence's first words, its own ending and three endings of
other sentences; data from a local file, no hub) is run by `lm_eval --model local-completions` (its own virtual
environment: `PY -m lm_eval`, with `pip install lm-eval[api]` there) against `python -m infer.serve` on SmolLM2,
tokenizing through the server's /tokenize (lm-eval's remote tokenizer). Every log-likelihood lm-eval got is then
compared with ours computed directly by `token_logprobs` (`infer --perplexity`'s scoring) on the same tokens.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shlex
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from bench.cpu import smollm2
from bench.serving import TEXT, Server
from llama_jax.checkpoints import cache_home, load_params, open_checkpoint
from llama_jax.generation import token_logprobs
from llama_jax.text import encoder_for

TASK = """task: licence_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
"""


def documents(count: int) -> list[dict]:
    sentences = [re.sub(r"\s+", " ", s).strip() for s in re.split(r"(?<=[.;])\s+", TEXT.read_text())]
    sentences = [s.split() for s in sentences if 60 < len(s) < 200][:count + 3]
    rng = random.Random(0)
    docs = []
    for i, words in enumerate(sentences[:count]):
        cut = len(words) * 3 // 5
        endings = [" ".join(words[cut:])] + [" ".join(sentences[(i + k) % len(sentences)][cut:]) for k in (1, 2, 3)]
        order = rng.sample(range(4), 4)
        docs.append({"context": " ".join(words[:cut]), "choices": [endings[j] for j in order], "gold": order.index(0)})
    return docs


def ours(tokenizer, params, config, context: str, continuation: str) -> float:
    """The continuation's log-likelihood, tokenized as lm-eval's `_encode_pair` does."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    whole, head = encode(context + continuation), encode(context)
    tokens = np.asarray([whole])
    chosen, _, _ = token_logprobs(params, tokens, np.ones_like(tokens), config, np.float32)
    return float(np.asarray(chosen)[0, len(head) - 1:].sum())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lm_eval_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lm-eval-python", required=True, help="a python with lm-eval[api] installed")
    p.add_argument("--docs", type=int, default=40)
    args = p.parse_args(argv)
    dirs, config = smollm2(cache_home())
    work = Path(tempfile.mkdtemp(prefix="lm_eval_check_"))
    data = work / "licence_cloze.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in documents(args.docs)))
    (work / "licence_cloze.yaml").write_text(TASK.format(data=data))
    port = 8941
    server_argv = ["-m", "infer.serve", str(dirs["float32"]), "--port", str(port), "--max-len", "256", "--name",
                   "smol"]
    command = [args.lm_eval_python, "-m", "lm_eval", "--model", "local-completions", "--model_args",
               f"model=smol,base_url=http://127.0.0.1:{port}/v1/completions,tokenizer_backend=remote,"
               "tokenized_requests=True,num_concurrent=4", "--tasks", "licence_cloze", "--include_path", str(work),
               "--output_path", str(work / "out"), "--log_samples"]
    with Server(server_argv, port):
        subprocess.run(command, check=True)
    samples = next((work / "out").rglob("samples_licence_cloze*.jsonl"))
    results = json.loads(next((work / "out").rglob("results*.json")).read_text())
    checkpoint = open_checkpoint(dirs["float32"])
    tokenizer, params = encoder_for(checkpoint).tokenizer, load_params(checkpoint)
    differences = []
    for line in samples.read_text().splitlines():
        sample = json.loads(line)
        for arguments, response in zip(sample["arguments"].values(), sample["resps"], strict=True):
            direct = ours(tokenizer, params, config, arguments["arg_0"], arguments["arg_1"])
            differences.append(abs(float(response[0][0]) - direct))
    print(f"command: {shlex.join(command)}")
    print(f"licence_cloze acc: {results['results']['licence_cloze']['acc,none']:.3f} over {args.docs} documents")
    print(f"{len(differences)} log-likelihoods; largest |lm-eval through the server - ours directly|: "
          f"{max(differences):.2e}")
    return 0 if max(differences) < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
