"""Tokens with log-probabilities in OpenAI's two response shapes, and the usage counts."""

from __future__ import annotations

from llama_jax.generation import Token
from llama_jax.text import Encoder


def token_text(encoder: Encoder, token: int) -> str:
    return encoder.tokenizer.decode([token], skip_special_tokens=False)


def chat_logprobs(encoder: Encoder, tokens: list[Token], top: int) -> dict:
    """Chat's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    def entry(token: int, logprob: float) -> dict:
        text = token_text(encoder, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top[:top]]}
                        for t in tokens]}


def completion_logprobs(encoder: Encoder, tokens: list[Token], top: int) -> dict:
    """Completions' `logprobs`: parallel lists tokens, token_logprobs, top_logprobs ({token: logprob}, None where
    the token has none, as the prompt's first) and text_offset."""
    texts = [token_text(encoder, t.id) for t in tokens]
    offsets, at = [], 0
    for text in texts:
        offsets.append(at)
        at += len(text)
    tops = [None if t.logprob is None else {token_text(encoder, i): lp for i, lp in t.top[:top]} for t in tokens]
    return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens], "top_logprobs": tops,
            "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
