"""`python -m infer [CKPT] --chat` on a terminal with no --prompt: a multi-turn conversation.

Each answer streams as it is generated. Each turn sends the whole conversation to a one-request `PagedEngine`,
whose prefix cache still holds the earlier turns' blocks: only what the chat template adds after them is
prefilled (all of it, if the template renders the earlier turns differently from the tokens generated). /reset
starts over, /exit or Ctrl-D leaves, Ctrl-C stops the answer being written (at the prompt: leaves).
"""

from __future__ import annotations

import signal
import sys
import threading
import time

from llama_jax.checkpoints import Checkpoint
from llama_jax.generation import PagedEngine, Request, SamplingParams, block_size_for
from llama_jax.text import Encoder, StreamDecoder

CHAT_MAX_LEN = 8192  # the conversation's tokens at most (the model's context, when shorter)
HELP = "/reset starts over, /exit or Ctrl-D leaves; Ctrl-C stops an answer"


def say(message: str) -> None:
    print(f"({message})", file=sys.stderr, flush=True)


def converse(args, checkpoint: Checkpoint, encoder: Encoder, params, sampling: SamplingParams, dtype) -> int:
    config = checkpoint.config
    max_len = min(config.max_position_embeddings, CHAT_MAX_LEN)
    engine = PagedEngine(params, config, slots=1, max_len=max_len, block_size=block_size_for(max_len),
                         stop_ids=checkpoint.stop_ids, cache_dtype=args.kv_cache or dtype, dtype=dtype,
                         attention=args.attention)
    start = [] if args.system is None else [{"role": "system", "content": args.system}]
    messages = list(start)
    say(f"chat with {args.checkpoint}: {HELP}")
    for turn in range(sys.maxsize):
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line == "/exit":
            return 0
        if line == "/reset":
            messages = list(start)
            say("the conversation is cleared")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        ids = encoder.render(messages, add_generation_prompt=True)
        room = max_len - len(ids) + 1
        if room < 1:
            messages.pop()
            say(f"the conversation no longer fits the context of {max_len} tokens: /reset to start over")
            continue
        generated, reused = answer(engine, Request(ids, min(args.max_new_tokens, room), sampling, args.seed + turn),
                                   encoder)
        messages.append({"role": "assistant", "content": encoder.tokenizer.decode(generated,
                                                                                  skip_special_tokens=True)})
        say(f"{reused} tokens reused, {len(ids) - reused} prefilled, {len(generated)} generated")
    return 0


def answer(engine: PagedEngine, request: Request, encoder: Encoder) -> tuple[list[int], int]:
    """Stream one answer to stdout; returns its tokens and how many prompt tokens came from the prefix cache.
    Ctrl-C stops it at the next step."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    decoder = StreamDecoder(encoder.tokenizer)
    begin = time.perf_counter()
    generated, reused, finished = [], 0, False
    sid = engine.add(request)
    try:
        while not finished and not stop.is_set():
            for out in engine.step():
                new = [t.id for t in out.tokens]
                generated += new
                reused = max(reused, out.cached)
                finished = out.finish_reason is not None
                print(decoder.push(new), end="", flush=True)
    finally:
        engine.abort(sid)
        signal.signal(signal.SIGINT, previous)
    print(decoder.flush(), flush=True)
    if stop.is_set():
        say(f"stopped after {len(generated)} tokens, {time.perf_counter() - begin:.1f} s")
    return generated, reused
