"""The OpenAI-compatible HTTP app (FastAPI) around an `Engine`.

    POST /v1/chat/completions   video_url / image_url content parts; `stream: true` as server-sent events
    GET  /v1/models             one entry per served model id (the request's `model` picks)
    GET  /health                200 once the model is loaded
    GET  /metrics               Prometheus text: requests, tokens, encode-cache hits and bytes

Every refused request gets a 4xx with an OpenAI-style error body that names the problem and no server path; the
server keeps serving. A client that disconnects (mid-stream or while waiting) has its request cancelled, which ends
its row of the batch at the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..inference.engine import ChatJob, Engine
from ..inference.media import RequestError
from .protocol import ChatCompletionRequest, chunk_body, completion_body, error_body, usage

log = logging.getLogger("slowfast_adapter.serve")
POLL_S = 0.25  # how often a waiting request checks whether its client is still there


def error_response(status: int, message: str, *, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status=status, code=code, param=param), status_code=status)


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    first = error.errors()[0] if error.errors() else {}
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    param = ".".join(where) or None
    return f"Invalid request: {param or 'body'}: {first.get('msg', 'invalid value')}.", param


class _Events:
    """The engine's callbacks for one job, delivered to the request's event loop as ("text", piece) / ("done", job)."""

    def __init__(self, job: ChatJob) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job.on_text = lambda piece: loop.call_soon_threadsafe(self.queue.put_nowait, ("text", piece))
        job.on_done = lambda finished: loop.call_soon_threadsafe(self.queue.put_nowait, ("done", finished))

    async def next(self, request: Request, job: ChatJob) -> tuple[str, Any]:
        """The next event; cancels the job (and raises `CancelledError`) if the client has gone."""
        while True:
            try:
                return await asyncio.wait_for(self.queue.get(), POLL_S)
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    raise asyncio.CancelledError from None


def create_app(engine: Engine, *, submit=None, title: str = "slowfast-adapter") -> FastAPI:
    """The app serving `engine`. `submit(job)`: how a prepared job is run (default: the engine's worker thread);
    the Ray Serve deployment passes its batching entry point."""
    app = FastAPI(title=title)
    statuses: Counter = Counter()
    run = submit or engine.submit

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(error)
        statuses[400] += 1
        return error_response(400, message, code="invalid_request", param=param)

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> JSONResponse:
        statuses[error.status] += 1
        return error_response(error.status, str(error), code=error.code, param=error.param)

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception) -> JSONResponse:
        log.exception("request failed")
        statuses[500] += 1
        return error_response(500, "The server failed on this request; see its log.", code="internal_error")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "slowfast-adapter"}
                for name in engine.model_ids]  # fmt: skip
        return {"object": "list", "data": data}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        return prometheus_text(engine, statuses)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        job = body.job(engine.model.generation_config, engine.settings.default_max_tokens)
        await asyncio.to_thread(engine.prepare, job)  # reads the media: RequestErrors become 4xx here
        events = _Events(job)
        run(job)
        kind, value = await events.next(request, job)  # the first text, or the end (errors are still 4xx)
        if kind == "done" and value.error is not None:
            raise value.error
        if not body.stream:
            while kind != "done":
                kind, value = await events.next(request, job)
            if value.error is not None:
                raise value.error
            statuses[200] += 1
            return completion_body(job)
        statuses[200] += 1
        return StreamingResponse(_stream(job, events, request, (kind, value)), media_type="text/event-stream")

    return app


async def _stream(job: ChatJob, events: _Events, request: Request, first: tuple[str, Any]) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format: the role, each piece of text, the finish reason with the usage,
    then `data: [DONE]`. Cancels the job when the client goes away."""

    def sse(body: dict[str, Any]) -> str:
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield sse(chunk_body(job, {"role": "assistant", "content": ""}))
        kind, value = first
        while kind != "done":
            yield sse(chunk_body(job, {"content": value}))
            kind, value = await events.next(request, job)
        if value.error is not None:  # after the first token only a server failure can end a job
            yield sse(error_body("The server failed on this request; see its log.", status=500, code="internal_error"))
        else:
            yield sse(chunk_body(job, {}, job.result.finish_reason, usage=usage(job.result)))
        yield "data: [DONE]\n\n"
    finally:
        if not job.done.is_set():
            job.cancelled.set()  # the client is gone: free the job's row


def prometheus_text(engine: Engine, statuses: Counter) -> str:
    """Counters and gauges in the Prometheus text format."""
    cache = engine.cache
    metrics = [
        ("slowfast_requests_completed_total", "counter", "Requests answered.", engine.counters["requests"]),
        ("slowfast_requests_failed_total", "counter", "Requests that failed after they were queued.",
         engine.counters["errors"]),
        ("slowfast_batches_total", "counter", "generate calls (batches of requests).", engine.counters["batches"]),
        ("slowfast_prompt_tokens_total", "counter", "Prompt tokens the LLM read.", engine.counters["prompt_tokens"]),
        ("slowfast_completion_tokens_total", "counter", "Tokens generated.", engine.counters["completion_tokens"]),
        ("slowfast_encode_cache_hits_total", "counter", "Requests whose videos were already encoded.",
         cache.stats["hits"]),
        ("slowfast_encode_cache_misses_total", "counter", "Requests whose videos were encoded.", cache.stats["misses"]),
        ("slowfast_encode_cache_evictions_total", "counter", "Encoded videos dropped for space.",
         cache.stats["evictions"]),
        ("slowfast_encode_cache_bytes", "gauge", "Bytes held by encoded videos.", cache.nbytes),
        ("slowfast_encode_cache_entries", "gauge", "Prompts' videos held encoded.", len(cache)),
    ]  # fmt: skip
    lines = []
    for name, kind, help_text, value in metrics:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    name = "slowfast_http_responses_total"
    lines += [f"# HELP {name} Chat-completion responses by HTTP status.", f"# TYPE {name} counter"]
    lines += [f'{name}{{code="{code}"}} {count}' for code, count in sorted(statuses.items())]
    return "\n".join(lines) + "\n"
