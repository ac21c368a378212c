"""`python -m infer [CKPT] --chat` on a terminal with no --prompt: a multi-turn conversation.

Each answer streams as it is generated. The conversation's tokens stay in the KV cache between turns (one row of a
`SlotEngine`): a turn prefills only what the chat template adds after them (`SlotEngine.resume`), unless the
template renders the earlier turns differently from the tokens generated, when the whole conversation is prefilled
again. /reset starts over, /exit or Ctrl-D leaves, Ctrl-C stops the answer being written (at the prompt: leaves).
"""

from __future__ import annotations

import signal
import sys
import threading
import time

from llama_jax.checkpoints import Checkpoint
from llama_jax.generation import Request, SamplingParams, SlotEngine
from llama_jax.text import Encoder, StreamDecoder

CHAT_MAX_LEN = 8192  # the conversation's tokens at most (the model's context, when shorter)
HELP = "/reset starts over, /exit or Ctrl-D leaves; Ctrl-C stops an answer"


def say(message: str) -> None:
    print(f"({message})", file=sys.stderr, flush=True)


def converse(args, checkpoint: Checkpoint, encoder: Encoder, params, sampling: SamplingParams, dtype) -> int:
    config = checkpoint.config
    max_len = min(config.max_position_embeddings, CHAT_MAX_LEN)
    engine = SlotEngine(params, config, slots=1, max_len=max_len, stop_ids=checkpoint.stop_ids,
                        cache_dtype=args.kv_cache or dtype, dtype=dtype, attention=args.attention)
    start = [] if args.system is None else [{"role": "system", "content": args.system}]
    messages, cached = list(start), []  # the conversation, and the tokens the engine's row holds
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
            messages, cached = list(start), []
            say("the conversation is cleared")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        ids = encoder.render(messages, add_generation_prompt=True)
        reused = len(cached) if cached and ids[:len(cached)] == cached else 0
        room = engine.room(0, len(ids) - reused) if reused else max_len - len(ids) + 1
        if room < 1:
            messages.pop()
            say(f"the conversation no longer fits the context of {max_len} tokens: /reset to start over")
            continue
        generated = answer(engine, Request(ids[reused:], min(args.max_new_tokens, room), sampling,
                                           args.seed + turn), encoder, reused)
        messages.append({"role": "assistant", "content": encoder.tokenizer.decode(generated,
                                                                                  skip_special_tokens=True)})
        cached = ids + generated[:-1]  # the last token was never fed back
        say(f"{reused} tokens reused, {len(ids) - reused} prefilled, {len(generated)} generated")
    return 0


def answer(engine: SlotEngine, request: Request, encoder: Encoder, reused: int) -> list[int]:
    """Stream one answer to stdout; returns its tokens. Ctrl-C stops it at the next step."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    decoder = StreamDecoder(encoder.tokenizer)
    begin = time.perf_counter()
    try:
        first = engine.resume(0, request, reused) if reused else engine.admit(0, request)
        generated = [first.id]
        print(decoder.push(generated), end="", flush=True)
        while not engine.finish_reasons() and not stop.is_set():
            new = [t.id for t in engine.step()[0]]
            generated += new
            print(decoder.push(new), end="", flush=True)
    finally:
        engine.release(0)
        signal.signal(signal.SIGINT, previous)
    print(decoder.flush(), flush=True)
    if stop.is_set():
        say(f"stopped after {len(generated)} tokens, {time.perf_counter() - begin:.1f} s")
    return generated
