"""python -m infer.serve [CKPT_DIR] [--host 127.0.0.1] [--port 8000] [--slots N] [--max-len N] [--kv-tokens N]
[--max-batch-tokens N] [--no-prefix-cache] [--api-key KEY] [--quantize int8] [--adapter [NAME=]DIR ...]
[--mesh SPEC] [--dtype ...]: an OpenAI-compatible HTTP server with continuous batching over a paged KV cache.

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health, GET /metrics (Prometheus).
Up to `--slots` requests run at once, each of up to `--max-len` tokens (prompt plus completion), their keys and
values in one pool of `--kv-tokens` token slots handed out in blocks of `--block-size` as they grow; each step
decodes a token of every running request and prefills up to `--max-batch-tokens` prompt tokens of those starting.
A prompt that begins with tokens already computed (a shared system prompt, a conversation's earlier turns) starts
from the prefix cache. A request waits when no place or no blocks are free, and gets 429 once `--max-waiting` are
waiting. Every program is compiled before the server listens. SIGTERM (or Ctrl-C) lets the requests in flight
finish, then exits. Without CKPT_DIR it serves SmolLM2-135M-Instruct. With `--adapter NAME=DIR` (repeatable) it
serves each LoRA adapter beside the base as model NAME: a request's `model` picks one, and requests for different
adapters run in the same batch.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import signal
import sys
import time

import jax.numpy as jnp

from infer.speculate import HELP as SPECULATE_HELP
from infer.speculate import check_spec, open_draft, proposer
from infer.weights import load_weights
from llama_jax.checkpoints import cache_home, open_checkpoint, smollm2_checkpoint
from llama_jax.errors import InputError, exit_code
from llama_jax.generation import PagedEngine, Scheduler, check_sizes, enable_compilation_cache
from llama_jax.model import COMPUTE_DTYPES, check_quantization, make_mesh
from llama_jax.text import encoder_for

KV_CACHE_DTYPES = ("float32", "bfloat16", "int8")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m infer.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", metavar="CKPT_DIR", help="default: SmolLM2-135M-Instruct")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--slots", type=int, default=8, help="requests running at once, at most")
    p.add_argument("--max-len", type=int, default=2048, help="tokens per request, prompt plus completion")
    p.add_argument("--kv-tokens", type=int, help="token slots in the KV pool (default: --slots x --max-len)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (divides --max-len)")
    p.add_argument("--max-batch-tokens", type=int, default=512, help="prompt tokens prefilled per step, at most")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="compute every prompt whole, sharing nothing between requests")
    p.add_argument("--max-waiting", type=int, default=64, help="requests queued for a slot before 429s")
    p.add_argument("--chunk", type=int, default=4, help="decode steps between admissions (and per stream event)")
    p.add_argument("--speculate", metavar="ngram|draft:CKPT_DIR", help=SPECULATE_HELP)
    p.add_argument("--speculate-tokens", type=int, default=4, metavar="K", help="tokens proposed per step")
    p.add_argument("--api-key", default=os.environ.get("LLAMA_JAX_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 (default: $LLAMA_JAX_API_KEY, else none)")
    p.add_argument("--name", help="the model's name in the API (default: the checkpoint directory's name)")
    p.add_argument("--mesh", metavar="SPEC", help="e.g. data=2,tensor=4: rows over data, heads over tensor")
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, help="compute dtype (default: the checkpoint's)")
    p.add_argument("--kv-cache", choices=KV_CACHE_DTYPES, help="KV-cache dtype (default: the compute dtype)")
    p.add_argument("--quantize", metavar="int8", help="int8: quantize the weights while loading")
    p.add_argument("--adapter", metavar="[NAME=]DIR", action="append", default=[],
                   help="a PEFT LoRA adapter for this model, not merged. NAME=DIR (repeatable): served beside the base "
                        "as model NAME; DIR alone (once, without NAME=DIR ones): every request runs it, under the "
                        "base's name")
    args = p.parse_args(argv)
    args.adapters = [tuple(a.split("=", 1)) for a in args.adapter if "=" in a]  # [(NAME, DIR)]
    plain = [a for a in args.adapter if "=" not in a]
    if len(plain) > 1 or plain and args.adapters:
        p.error("--adapter DIR (every request runs it) comes alone; serve several as --adapter NAME=DIR each")
    names = [name for name, _ in args.adapters]
    if any(not name or not directory for name, directory in args.adapters) or len(set(names)) < len(names):
        p.error(f"--adapter NAME=DIR needs a NAME and a DIR, each NAME once, got {', '.join(args.adapter)}")
    args.adapter = plain[0] if plain else None
    if args.max_waiting < 0:
        p.error("--max-waiting must be >= 0")
    if problem := check_spec(args.speculate, args.speculate_tokens):
        p.error(problem)
    args.kv_tokens = args.slots * args.max_len if args.kv_tokens is None else args.kv_tokens
    try:
        check_sizes(slots=args.slots, max_len=args.max_len, kv_tokens=args.kv_tokens, block_size=args.block_size,
                    max_batch_tokens=args.max_batch_tokens, chunk=args.chunk)
    except ValueError as e:  # the library names the settings as its arguments: say the options instead
        p.error(re.sub(r"\b(slots|max_len|kv_tokens|block_size|max_batch_tokens|chunk)\b",
                       lambda m: "--" + m.group().replace("_", "-"), str(e)))
    if not 0 < args.port < 65536:
        p.error(f"--port {args.port} is not a TCP port")
    return args


def log(message: str) -> None:
    print(f"[serve] {message}", file=sys.stderr, flush=True)


def build(args):
    """Checkpoint -> (Service, engine programs compiled). Everything the server needs before it listens."""
    from infer.serve.service import Service

    if args.checkpoint is None:
        args.checkpoint = smollm2_checkpoint(cache_home(), announce=lambda line: log(f"first use: {line}"))
    checkpoint = open_checkpoint(args.checkpoint)
    config = checkpoint.config
    if args.quantize is not None:
        check_quantization(args.quantize)
    if args.max_len > config.max_position_embeddings:
        raise ValueError(f"--max-len {args.max_len} exceeds the model's context of {config.max_position_embeddings}")
    dtype = jnp.dtype(args.dtype) if args.dtype else checkpoint.dtype
    encoder = encoder_for(checkpoint)
    draft = open_draft(args.speculate, encoder)
    enable_compilation_cache(cache_home() / "xla")
    start = time.perf_counter()
    mesh = make_mesh(args.mesh) if args.mesh else None
    name = args.name or os.path.basename(os.path.normpath(str(args.checkpoint)))
    if name in dict(args.adapters):
        raise ValueError(f"--adapter {name}=...: {name!r} is the base model's name (--name sets another)")
    params = load_weights(args, checkpoint, dtype, mesh, args.adapters)
    log(f"loaded {args.checkpoint} in {time.perf_counter() - start:.1f} s")
    engine = PagedEngine(params, config, slots=args.slots, max_len=args.max_len, kv_tokens=args.kv_tokens,
                         block_size=args.block_size, max_batch_tokens=args.max_batch_tokens,
                         prefix_cache=args.prefix_cache, stop_ids=checkpoint.stop_ids,
                         cache_dtype=args.kv_cache or dtype, dtype=dtype, chunk=args.chunk, top_logprobs=5, mesh=mesh,
                         speculate=proposer(args.speculate, args.speculate_tokens, draft, dtype))
    service = Service(encoder=encoder, scheduler=Scheduler(engine, max_waiting=args.max_waiting),
                      params=engine.params, config=config, dtype=dtype, max_len=args.max_len, name=name,
                      stop_ids=checkpoint.stop_ids, mesh=mesh, adapters=[name for name, _ in args.adapters])
    start = time.perf_counter()
    programs, _ = engine.warm_up()
    programs += service.warm_up()
    log(f"compiled {programs} programs in {time.perf_counter() - start:.1f} s (up to {args.slots} requests of "
        f"{args.max_len} tokens, a pool of {args.kv_tokens} tokens in blocks of {args.block_size})")
    return service


def run(args) -> int:
    import uvicorn

    from infer.serve.app import make_app

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                log(f"ready: http://{args.host}:{args.port}/v1 serving {', '.join(map(repr, service.models))}")

    service = build(args)
    # uvicorn drains on SIGTERM, then raises it again under the handler found at start: let that one return, so
    # that the server says it stopped and exits 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    service.scheduler.start()
    config = uvicorn.Config(make_app(service, api_key=args.api_key), host=args.host, port=args.port,
                            log_level="warning", timeout_graceful_shutdown=300)
    Server(config).run()  # returns after SIGTERM/SIGINT once the open requests are done (exits 1 if it cannot bind)
    log("stopped")
    return 0


def main(argv=None) -> int:
    """Exit status 0 after SIGTERM has drained the server, 2 with a one-line error for bad input."""
    return exit_code(functools.partial(run, parse_args(argv)), interrupted="interrupted",
                     user_errors=(InputError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
