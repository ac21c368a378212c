"""The OpenAI request bodies the server accepts (unknown fields ignored, as OpenAI does), and its error object."""

from __future__ import annotations

import json
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from llama_jax.generation import MAX_LOGIT_BIAS

MAX_TOP_LOGPROBS = 5
MAX_STOPS = 4
MAX_N = 16


class ApiError(Exception):
    """An error the client gets as OpenAI's error object, with this HTTP status."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.retry_after = retry_after

    def response(self) -> JSONResponse:
        headers = {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: {why} is not supported by this server", param=param, code="unsupported_parameter")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Lenient(BaseModel):
    """A part of a request body: unknown fields ignored."""

    model_config = ConfigDict(extra="ignore")


class Function(Lenient):
    """A tool's function: its name and the JSON schema of its arguments (none: it takes no arguments)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None


class Tool(Lenient):
    type: Literal["function"]
    function: Function


class FunctionName(Lenient):
    name: str


class NamedToolChoice(Lenient):
    """tool_choice {"type": "function", "function": {"name": ...}}: this function must be called."""

    type: Literal["function"]
    function: FunctionName


class CalledFunction(FunctionName):
    arguments: str


class ToolCall(Lenient):
    """A call the assistant made earlier in the conversation, as the server returned it."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's
    tool_call_id: str | None = None  # a tool's answer: to this call

    @model_validator(mode="after")
    def _has_content(self) -> Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only in an assistant message with tool_calls)")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def turn(self) -> dict:
        """The message as chat templates get it (transformers' conventions): developer as system, null content as
        "", a call's arguments as the object they encode (the string itself when they are not JSON)."""
        turn = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            turn["tool_calls"] = [{"id": c.id, "type": c.type, "function": {
                "name": c.function.name, "arguments": json_or_text(c.function.arguments)}} for c in self.tool_calls]
        if self.tool_call_id is not None:
            turn["tool_call_id"] = self.tool_call_id
        return turn


class Sampling(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)  # vLLM's extra fields from here on
    logit_bias: dict[str, float] | None = None
    stop_token_ids: list[int] | None = None
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    best_of: int | None = None
    response_format: dict | None = None

    def check(self) -> None:
        """ApiError 400 for what this server does not do (rather than silently ignoring it)."""
        if self.best_of not in (None, 1):
            raise unsupported("best_of", "best_of > 1")
        if len(self.stops()) > MAX_STOPS:
            raise ApiError(400, f"stop: at most {MAX_STOPS} sequences", param="stop")
        self.bias()

    def bias(self) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token id, value) pairs (ApiError 400 unless the keys are token ids and the values in
        [-100, 100])."""
        pairs, given = [], self.logit_bias or {}
        if len(given) > MAX_LOGIT_BIAS:
            raise ApiError(400, f"logit_bias: at most {MAX_LOGIT_BIAS} tokens", param="logit_bias")
        for key, value in given.items():
            if not key.strip().lstrip("-").isdigit():
                raise ApiError(400, f"logit_bias: {key!r} is not a token id", param="logit_bias")
            if not -100 <= value <= 100:
                raise ApiError(400, f"logit_bias: the value for {key} must be in [-100, 100], got {value}",
                               param="logit_bias")
            pairs.append((int(key), float(value)))
        return tuple(pairs)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop or [] if s]


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    functions: list | None = None

    def check(self) -> None:
        super().check()
        if self.functions:
            raise unsupported("functions", "the legacy functions field (send tools)")
        self.forced_tools()
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if self.max_tokens == 0:
            raise ApiError(400, "max_tokens must be at least 1", param="max_tokens")

    def forced_tools(self) -> list[Tool] | None:
        """The tools one of which the answer must call (tool_choice "required" or a named function), else None;
        ApiError 400 naming the field for a tool_choice that cannot be met."""
        tools, choice = self.tools or [], self.tool_choice
        names = [t.function.name for t in tools]
        if len(set(names)) < len(names):
            raise ApiError(400, "tools: each function needs its own name", param="tools")
        if choice not in (None, "none") and not tools:
            raise ApiError(400, f"tool_choice: {choice_text(choice)} needs tools", param="tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ApiError(400, f"tool_choice: no function named {choice.function.name!r} in tools",
                           param="tool_choice")
        if choice != "required" and not isinstance(choice, NamedToolChoice):
            return None
        if (self.response_format or {}).get("type", "text") != "text":
            raise ApiError(400, f"response_format: cannot be combined with tool_choice {choice_text(choice)}",
                           param="response_format")
        return tools if choice == "required" else [tools[names.index(choice.function.name)]]

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def top(self) -> int | None:
        """None: no log-probabilities; else how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None

    def check(self) -> None:
        super().check()
        if self.suffix:
            raise unsupported("suffix", "insertion (suffix)")
        if self.max_tokens == 0 and not self.echo:
            raise ApiError(400, "max_tokens 0 needs echo: true (prompt log-probabilities only)", param="max_tokens")
        if self.stream and self.max_tokens == 0:
            raise ApiError(400, "max_tokens 0 cannot be streamed", param="stream")

    def limit(self) -> int | None:
        return self.max_tokens

    def top(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """One prompt (text or token ids) per choice."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        if not self.prompt:
            raise ApiError(400, "prompt is empty", param="prompt")
        return list(self.prompt)


def json_or_text(text: str) -> object:
    """The value `text` encodes in JSON, or `text` itself when it is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def choice_text(choice: str | NamedToolChoice) -> str:
    """A tool_choice as error messages name it."""
    return repr(choice) if isinstance(choice, str) else f"function {choice.function.name!r}"


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: list[int]
