"""Structured output for `infer --json-schema` and the server's `response_format`: a grammar compiled by llguidance
into a matcher per request that gives, token by token, the tokens that keep the text valid (JSON, or JSON that a
schema accepts); the serving engine applies its mask to the logits (llama_jax.generation.penalties)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import llguidance
import numpy as np

from llama_jax.text import Encoder


# No free whitespace between JSON tokens (a small model given the choice can emit newlines until max_tokens); a
# schema's own "x-guidance" options still apply over these.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class Constraint:
    """One request's matcher, in the engine's `Request.constraint` protocol."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self.matcher = matcher

    def fill(self, mask: np.ndarray) -> None:
        """The allowed tokens as bits of `mask`, an int32 row `[ceil(vocab / 32)]` (contiguous)."""
        self.matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)

    def consume(self, token: int) -> None:
        self.matcher.consume_token(token)


class Grammars:
    """response_format -> grammar -> a Constraint per request, over the checkpoint's tokenizer (its stop ids end a
    finished grammar)."""

    def __init__(self, encoder: Encoder, vocab: int, stop_ids: Sequence[int]):
        self.tokenizer = llguidance.LLTokenizer(encoder.tokenizer.to_str(), n_vocab=vocab, eos_token=list(stop_ids))

    def grammar(self, response_format: dict | None) -> str | None:
        """The grammar for OpenAI's response_format ({"type": "text"}, {"type": "json_object"} or {"type":
        "json_schema", "json_schema": {"name", "schema", "strict"}}), None for plain text; ValueError (one line,
        naming the field) for anything else, or a schema that llguidance cannot compile."""
        kind = (response_format or {}).get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            schema = {"type": "object"}
        elif kind == "json_schema":
            schema = (response_format.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise ValueError("response_format.json_schema.schema: a JSON schema (an object) is required")
        else:
            raise ValueError(f"response_format: type {kind!r} is not one of text, json_object, json_schema")
        try:
            return self.json_schema(schema)
        except ValueError as e:
            raise ValueError(f"response_format: {e}") from None

    def json_schema(self, schema) -> str:
        """The grammar of JSON that `schema` accepts; ValueError (one line) when llguidance cannot compile it."""
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_LAYOUT)
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(f"this schema is not supported: {error}")
        return grammar

    def constraint(self, grammar: str) -> Constraint:
        return Constraint(llguidance.LLMatcher(self.tokenizer, grammar))
