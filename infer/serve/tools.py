"""Tool calls on /v1/chat/completions, in Llama 3.1's convention (Meta's 3.1 template, vLLM's `llama3_json` parser):
the chat template renders the tools; the model calls one by answering `{"name": ..., "parameters": {...}}` and its
end-of-turn token; that text comes back as OpenAI's `tool_calls`. tool_choice "required" or a named function is
enforced with the structured-output grammar (the arguments then validate against the function's schema)."""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import Collection

from infer.grammar import Grammars
from infer.serve.protocol import ApiError, ChatRequest, Function, Tool
from infer.serve.service import Piece

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclasses.dataclass(frozen=True)
class ToolPlan:
    """What a chat request's tools mean for its prompt, its generation and its answer."""

    specs: list[dict] | None  # the tools as the chat template gets them (None: the request has none)
    names: frozenset[str]  # the functions an answer may call (empty: its text is never parsed for calls)
    grammar: str | None  # the grammar of a forced call (tool_choice "required" or a named function)


def plan(body: ChatRequest, grammars: Grammars, takes_tools: bool) -> ToolPlan:
    """The ToolPlan of a request that passed its `check`; ApiError 400 naming the field for tools on a template that
    does not render them, or a function whose parameters are not a JSON schema the grammar engine compiles."""
    if not body.tools:
        return ToolPlan(None, frozenset(), None)
    if not takes_tools:
        raise ApiError(400, "tools: this model's chat template does not render tools, so it cannot call them",
                       param="tools", code="unsupported_parameter")
    for i, tool in enumerate(body.tools):
        if tool.function.parameters is not None:
            try:
                grammars.json_schema(tool.function.parameters)
            except ValueError as e:
                raise ApiError(400, f"tools[{i}].function.parameters: {e}",
                               param=f"tools[{i}].function.parameters") from None
    forced, grammar = body.forced_tools(), None
    if forced:
        try:
            grammar = grammars.json_schema(forced_schema(forced))
        except ValueError as e:
            raise ApiError(400, f"tool_choice: {e}", param="tool_choice") from None
    names = frozenset() if body.tool_choice == "none" else frozenset(t.function.name for t in body.tools)
    return ToolPlan([t.model_dump(exclude_none=True) for t in body.tools], names, grammar)


def call_schema(function: Function) -> dict:
    """The JSON of a call of `function`: {"name": its name, "parameters": arguments its schema accepts}, in that
    order. The parameters' schema is its own resource (`$id`), so that its "#/..." references resolve inside it."""
    parameters = NO_ARGUMENTS if function.parameters is None else function.parameters
    return {"type": "object", "properties": {"name": {"const": function.name},
                                             "parameters": {"$id": f"urn:tool:{function.name}", **parameters}},
            "required": ["name", "parameters"], "additionalProperties": False}


def forced_schema(tools: list[Tool]) -> dict:
    """The JSON of a call of one of `tools`."""
    schemas = [call_schema(t.function) for t in tools]
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def parse_calls(text: str, names: Collection[str]) -> list[tuple[str, dict]] | None:
    """(name, arguments) of each call in a Llama 3.1 answer: a JSON object {"name", "parameters"} ("arguments" is
    accepted too), or several separated by ";" (as vLLM's llama3_json parser); None unless all of `text` is calls
    of functions in `names`."""
    decoder, calls, at = json.JSONDecoder(), [], 0
    text = text.strip()
    while True:
        try:
            value, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return None
        arguments = value.get("parameters", value.get("arguments")) if isinstance(value, dict) else None
        if not isinstance(arguments, dict) or value.get("name") not in names:
            return None
        calls.append((value["name"], arguments))
        rest = text[end:].lstrip()
        if not rest:
            return calls
        if not rest.startswith(";"):
            return None
        at = len(text) - len(rest[1:].lstrip())


def tool_calls(calls: list[tuple[str, dict]]) -> list[dict]:
    """OpenAI's `tool_calls`, each with a new id."""
    return [{"id": f"call_{secrets.token_hex(12)}", "type": "function",
             "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}
            for name, arguments in calls]


def answer(text: str, finish_reason: str | None, names: Collection[str]) -> dict:
    """A whole choice's {"message", "finish_reason"}: its tool calls ("tool_calls") when its text is calls of
    `names`, else the text."""
    calls = parse_calls(text, names) if names else None
    if calls is None:
        return {"message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
    return {"message": {"role": "assistant", "content": None, "tool_calls": tool_calls(calls)},
            "finish_reason": "tool_calls"}


def call_deltas(calls: list[dict]) -> list[dict]:
    """Streamed `delta`s of tool calls, as OpenAI sends them: per call, its index, id, type and name, then its
    arguments."""
    deltas = []
    for index, call in enumerate(calls):
        head = {**call, "function": {"name": call["function"]["name"], "arguments": ""}}
        deltas += [{"tool_calls": [{"index": index, **head}]},
                   {"tool_calls": [{"index": index, "function": {"arguments": call["function"]["arguments"]}}]}]
    return deltas


class CallBuffer:
    """One streamed choice whose text may be tool calls of `names`: from a first non-space "{" on, its pieces are
    held to the end, where they are calls or content; other text passes at once (and all of it when `names` is
    empty)."""

    def __init__(self, names: Collection[str]):
        self.names, self.held, self.passing = names, [], not names

    def push(self, piece: Piece) -> tuple[Piece, list[dict] | None] | None:
        """(a piece to send, its tool calls or None), or None while held."""
        if self.passing:
            return piece, None
        self.held.append(piece)
        text = "".join(p.text for p in self.held)
        whole = Piece(text, [t for p in self.held for t in p.tokens], piece.finish_reason)
        if text.strip() and not text.lstrip().startswith("{"):
            self.passing, self.held = True, []
            return whole, None
        if piece.finish_reason is None:
            return None
        calls = parse_calls(text, self.names)
        return (whole, None) if calls is None else (dataclasses.replace(whole, finish_reason="tool_calls"),
                                                    tool_calls(calls))
