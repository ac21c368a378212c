"""The HTTP endpoints (FastAPI): /v1/models, /v1/chat/completions, /v1/completions, /health and /metrics, in OpenAI's
request and response shapes, streamed as server-sent events when asked."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from infer.serve.format import chat_logprobs, completion_logprobs, token_text, usage
from infer.serve.protocol import (ApiError, ChatRequest, CompletionRequest, DetokenizeRequest, Sampling,
                                   TokenizeRequest)
from infer.serve.service import Piece, Service
from infer.serve.tools import CallBuffer, answer, call_deltas, plan

POLL_S = 0.25  # how often a non-streamed request checks that its client is still there


def make_app(service: Service, *, api_key: str | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(service.scheduler.close)  # after uvicorn has let the open requests finish

    app = FastAPI(title="llama_jax", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return ApiError(400, f"{where}: {first['msg']}" if where else first["msg"], param=where or None).response()

    @app.exception_handler(Exception)
    async def unexpected(request, e: Exception):  # still OpenAI's error object; the server goes on
        return ApiError(500, f"internal error: {e.__class__.__name__}: {e}", kind="server_error").response()

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return ApiError(e.status_code, str(e.detail), kind="invalid_request_error").response()

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key is not None and request.url.path not in ("/health", "/metrics"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                code="invalid_api_key").response()
        return await call_next(request)

    @app.get("/health")
    async def health():
        load = service.scheduler.load()
        failed = service.scheduler.failed
        return JSONResponse({"status": "error" if failed else "ok", **load, **({"error": failed} if failed else {})},
                            status_code=503 if failed else 200)

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "llama_jax",
                                            "max_model_len": service.max_len, "parent": service.name if slot else None}
                                           for model, slot in service.models.items()]}

    # vLLM's tokenizer endpoints: lm-evaluation-harness tokenizes through them (its "remote" tokenizer backend)
    @app.get("/tokenizer_info")
    async def tokenizer_info():
        encoder = service.encoder
        eos = None if encoder.eos_id is None else token_text(encoder, encoder.eos_id)
        return {"eos_token": eos, "bos_token": encoder.bos_token or None, "pad_token": None,
                "chat_template": encoder.chat_template, "model_max_length": service.max_len}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        ids = service.encoder.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens).ids
        return {"tokens": ids, "count": len(ids), "max_model_len": service.max_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        service.prompt_ids(body.tokens or [0])  # 400 unless every id is in the vocabulary
        return {"prompt": service.encoder.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        check(body)
        tools = plan(body, service.grammars, service.encoder.takes_tools)
        ids = service.chat_ids(body.messages, tools.specs)
        runs = await service.choices(ids, body, service.budget(ids, body), seed_of(body), tools.grammar)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model or service.name}
        if body.stream:
            return sse(chat_stream(runs, meta, body, len(ids), tools.names))
        results = await asyncio.gather(*(collect(run, request) for run in runs))
        choices = [{"index": i, **answer(text, reason, tools.names),
                    "logprobs": None if body.top() is None else chat_logprobs(service.encoder, tokens, body.top())}
                   for i, (text, tokens, reason) in enumerate(results)]
        return {**meta, "object": "chat.completion", "choices": choices,
                "usage": usage(len(ids), sum(len(tokens) for _, tokens, _ in results))}

    async def chat_stream(runs, meta, body: ChatRequest, prompt_tokens: int, names: frozenset[str]
                          ) -> AsyncIterator[dict]:
        """Chunks of each choice's text, or of its tool calls (of `names`) once its end shows that it is calls."""
        chunk = {**meta, "object": "chat.completion.chunk"}
        for index in range(len(runs)):
            choice = {"index": index, "delta": {"role": "assistant", "content": None if names else ""},
                      "logprobs": None, "finish_reason": None}  # (OpenAI's null content where calls may come)
            yield {**chunk, "choices": [choice]}
        count, buffers = 0, [CallBuffer(names) for _ in runs]
        async for index, piece in merged(runs):
            count += len(piece.tokens)
            if (ready := buffers[index].push(piece)) is None:
                continue
            piece, calls = ready
            logprobs = None if body.top() is None else chat_logprobs(service.encoder, piece.tokens, body.top())
            deltas = call_deltas(calls) if calls else [{"content": piece.text} if piece.text else {}]
            for k, delta in enumerate(deltas):
                yield {**chunk, "choices": [{"index": index, "delta": delta, "logprobs": None if k else logprobs,
                                             "finish_reason": piece.finish_reason if k == len(deltas) - 1 else None}]}
        if body.stream_options and body.stream_options.include_usage:
            yield {**chunk, "choices": [], "usage": usage(prompt_tokens, count)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check(body)
        prompts = [service.prompt_ids(p) for p in body.prompts()]
        if body.stream and len(prompts) > 1:
            raise ApiError(400, "stream: one prompt at a time", param="stream")
        budgets = [service.budget(ids, body) for ids in prompts] if body.max_tokens != 0 else [0] * len(prompts)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model or service.name}
        seed = seed_of(body)
        runs = [await service.choices(ids, body, n, seed) if n else [None] * body.n
                for ids, n in zip(prompts, budgets, strict=True)]
        if body.stream:
            return sse(completion_stream(runs[0], meta, body, prompts[0]))
        results = await asyncio.gather(*(collect(run, request) if run else done() for each in runs for run in each))
        choices, total, scores = [], 0, {}
        for index, (text, tokens, reason) in enumerate(results):  # index: prompt x n + choice, as OpenAI's
            ids = prompts[index // body.n]
            if body.echo and index // body.n not in scores:  # the prompt scored once for its n choices
                scores[index // body.n] = await asyncio.to_thread(service.score, ids, service.adapter(body.model))
            scored = scores.get(index // body.n, [])
            prompt_text = service.encoder.tokenizer.decode(ids, skip_special_tokens=False) if body.echo else ""
            logprobs = None
            if body.top() is not None:
                logprobs = completion_logprobs(service.encoder, [*scored, *tokens], body.top())
            choices.append({"index": index, "text": prompt_text + text, "logprobs": logprobs,
                            "finish_reason": reason})
            total += len(tokens)
        return {**meta, "object": "text_completion", "choices": choices,
                "usage": usage(sum(len(p) for p in prompts), total)}

    async def completion_stream(runs, meta, body: CompletionRequest, ids: list[int]) -> AsyncIterator[dict]:
        chunk = {**meta, "object": "text_completion"}
        count = 0
        if body.echo:
            scored = (await asyncio.to_thread(service.score, ids, service.adapter(body.model)) if body.top() is not None
                      else [])
            logprobs = None if body.top() is None else completion_logprobs(service.encoder, scored, body.top())
            text = service.encoder.tokenizer.decode(ids, skip_special_tokens=False)
            for index in range(len(runs)):
                yield {**chunk, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                             "finish_reason": None}]}
        async for index, piece in merged(runs):
            count += len(piece.tokens)
            logprobs = None if body.top() is None else completion_logprobs(service.encoder, piece.tokens, body.top())
            yield {**chunk, "choices": [{"index": index, "text": piece.text, "logprobs": logprobs,
                                         "finish_reason": piece.finish_reason}]}
        if body.stream_options and body.stream_options.include_usage:
            yield {**chunk, "choices": [], "usage": usage(len(ids), count)}

    def check(body: Sampling) -> None:
        body.check()
        service.adapter(body.model)  # a 404 for a model this server does not have

    return app


def seed_of(body: Sampling) -> int:
    return body.seed if body.seed is not None else secrets.randbits(31)


async def done() -> tuple[str, list, str]:
    """A choice with no generated tokens (max_tokens 0 with echo)."""
    return "", [], "length"


async def merged(runs: list[AsyncIterator[Piece]]) -> AsyncIterator[tuple[int, Piece]]:
    """(choice index, piece) from several choices as each comes; leaving early (or one failing) ends them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, run: AsyncIterator[Piece]) -> None:
        try:
            async for piece in run:
                queue.put_nowait((index, piece, None))
        except Exception as e:  # noqa: BLE001 - handed to the reader, which raises it
            queue.put_nowait((index, None, e))
        queue.put_nowait((index, None, None))

    tasks = [asyncio.ensure_future(pump(i, run)) for i, run in enumerate(runs)]
    try:
        left = len(runs)
        while left:
            index, piece, error = await queue.get()
            if error is not None:
                raise error
            if piece is None:
                left -= 1
            else:
                yield index, piece
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(pieces: AsyncIterator[Piece], request: Request) -> tuple[str, list, str | None]:
    """A whole choice: (text, tokens, finish reason). Gives up (freeing the slot) if the client goes away."""
    async def gather():
        text, tokens, reason = [], [], None
        async for piece in pieces:
            text.append(piece.text)
            tokens.extend(piece.tokens)
            reason = piece.finish_reason
        return "".join(text), tokens, reason

    task = asyncio.ensure_future(gather())
    while not (await asyncio.wait({task}, timeout=POLL_S))[0]:
        if await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await pieces.aclose()
            raise ApiError(499, "the client went away")
    return task.result()


def sse(events: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events in OpenAI's format: `data: {json}` per chunk, then `data: [DONE]`; an error that happens
    after the stream started arrives as a last `data: {"error": ...}`."""
    async def lines():
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except ApiError as e:
            yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind, 'code': e.code}})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
