"""The FastAPI application: OpenAI chat completions guarded by a first-token probe, models, health, metrics.

Status codes: 400 malformed request (bad JSON or field, no image, broken base64, remote URL, question too long,
max_tokens above the limit), 401 missing or wrong API key, 404 unknown model, 413 body or image too large,
415 unsupported image type, 503 queue full (with Retry-After), 500 generation failed. Every error body is the
OpenAI one, `{"error": {"message", "type", "param", "code"}}`, so the official client raises its matching exception
with the message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from lvlmlp.serve.batcher import Batcher, Engine, Job, QueueFull, Result
from lvlmlp.serve.schema import ApiError, ChatRequest, Limits, read_prompt

log = logging.getLogger("lvlmlp")

# Why a field is refused, for the fields this server deliberately does not implement.
_UNSUPPORTED = {
    "n": "this server returns one choice per request",
    "stop": "stop sequences are not supported",
    "logprobs": "logprobs are not supported",
}


@dataclass
class ServeConfig:
    """The server's settings (the flags of `lvlmlp serve`)."""

    model_id: str  # the name /v1/models lists
    aliases: set[str] = field(default_factory=set)  # other names a request's `model` may use (the path given)
    limits: Limits = field(default_factory=Limits)
    max_body_bytes: int = 16 << 20
    default_max_tokens: int = 64
    max_tokens_limit: int = 1024
    api_key: str | None = None
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    max_queue: int = 64


class ServeMetrics:
    """Prometheus metrics in a registry of their own (several apps in one process do not collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("lvlmlp_serve_requests", "chat completion requests, by HTTP status", ["code"],
                                registry=self.registry)
        self.flagged = Counter("lvlmlp_serve_flagged", "answered requests the probe flagged", registry=self.registry)
        self.latency = Histogram("lvlmlp_serve_request_latency_seconds",
                                 "seconds from a request's arrival to its last token",
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
                                 registry=self.registry)
        self.batch_size = Histogram("lvlmlp_serve_batch_size", "requests per generate batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.queue = Gauge("lvlmlp_serve_queue_depth", "requests waiting for the model", registry=self.registry)


def create_app(engine: Engine, config: ServeConfig) -> FastAPI:
    if config.limits.processed is None:  # images are bounded as the model's processor would resize them
        config = dataclasses.replace(config, limits=dataclasses.replace(
            config.limits, processed=getattr(engine.backend, "processed_pixels", None)))
    metrics = ServeMetrics()
    batcher = Batcher(engine, max_batch=config.max_batch, batch_wait_ms=config.batch_wait_ms,
                      max_queue=config.max_queue, on_batch=metrics.batch_size.observe)
    metrics.queue.set_function(batcher.queue.qsize)
    names = {config.model_id, *config.aliases}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.stop)

    app = FastAPI(title="lvlmlp serve", lifespan=lifespan)
    app.state.batcher, app.state.metrics, app.state.config = batcher, metrics, config

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        if request.url.path == "/v1/chat/completions":
            metrics.requests.labels(code=str(err.status)).inc()
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else {}
        if err.status == 503:
            headers["Retry-After"] = "1"
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("serve: %s %s failed", request.method, request.url.path)
        return await api_error(request, ApiError(500, f"internal error: {type(err).__name__}: {err}"))

    async def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), config.api_key):
            what = "wrong API key" if given else "no API key"
            raise ApiError(401, f"{what}: send the header 'Authorization: Bearer KEY' with this server's --api-key",
                           code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": config.model_id, "queue": batcher.queue.qsize()}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model_id, "object": "model", "created": 0,
                                            "owned_by": "lvlmlp"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(request: Request) -> Response:
        arrived = time.perf_counter()
        req = _parse(await _read_body(request, config.max_body_bytes))
        if req.model not in names:
            raise ApiError(404, f"model {req.model!r} is not served here; this server serves {config.model_id!r}",
                           param="model", code="model_not_found")
        max_tokens = req.max_completion_tokens or req.max_tokens or config.default_max_tokens
        if max_tokens > config.max_tokens_limit:
            raise ApiError(400, f"max_tokens {max_tokens} is above this server's limit {config.max_tokens_limit} "
                                "(--max-tokens-limit)", param="max_tokens")
        try:
            image, question = await run_in_threadpool(read_prompt, req, config.limits)  # decoding is CPU work
        except (ValueError, OverflowError, RecursionError, OSError) as err:  # the request's content, not the server
            log.warning("serve: a request's image could not be read: %r", err)
            raise ApiError(400, f"messages: the image cannot be read ({type(err).__name__}: "
                                f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else ''})",
                           param="messages") from None

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        job = Job(
            image=image, question=question, max_tokens=max_tokens,
            temperature=0.0 if req.temperature is None else req.temperature,  # greedy unless asked
            top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed,
            on_text=(lambda piece, flagged, score: loop.call_soon_threadsafe(
                events.put_nowait, ("text", (piece, flagged, score)))) if req.stream else None,
            done=lambda result: loop.call_soon_threadsafe(events.put_nowait, ("done", result)),
        )
        try:
            batcher.submit(job)
        except QueueFull as err:
            raise ApiError(503, f"{err}; retry later", code="server_busy") from None

        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": config.model_id}

        def finished(result: Result | BaseException) -> Result:
            if isinstance(result, BaseException):
                raise ApiError(500, f"generation failed: {type(result).__name__}: {result}")
            metrics.latency.observe(time.perf_counter() - arrived)
            metrics.requests.labels(code="200").inc()
            if result.flagged:
                metrics.flagged.inc()
            return result

        if not req.stream:
            _, result = await events.get()  # no text events: only "done"
            result = finished(result)
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                      "finish_reason": result.finish_reason, "flagged": result.flagged,
                      "probe_score": result.probe_score}
            return JSONResponse({**head, "object": "chat.completion", "choices": [choice], "usage": _usage(result)})

        options = (req.model_extra or {}).get("stream_options") or {}
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))

        async def sse() -> AsyncIterator[str]:
            first = True

            def chunk(delta: dict[str, Any], flagged: bool, score: float, finish: str | None) -> str:
                nonlocal first
                if first:  # the role comes with the first chunk, which already carries the verdict
                    delta, first = {"role": "assistant", **delta}, False
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "flagged": flagged,
                          "probe_score": score}
                return _event({**head, "object": "chat.completion.chunk", "choices": [choice]})

            while True:
                kind, value = await events.get()
                if kind == "text":
                    piece, flagged, score = value
                    yield chunk({"content": piece}, flagged, score, None)
                    continue
                try:
                    result = finished(value)
                except ApiError as err:  # the status line (200) is sent already: the error goes in the stream
                    metrics.requests.labels(code=str(err.status)).inc()
                    yield _event(err.body())
                    break
                yield chunk({}, result.flagged, result.probe_score, result.finish_reason)
                if include_usage:
                    yield _event({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(result)})
                break
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` (declared length or bytes received)."""
    declared = request.headers.get("content-length")
    too_big = f"the request body is larger than {limit} bytes (--max-body-bytes)"
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, too_big, code="request_too_large")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise ApiError(413, too_big, code="request_too_large")
    return bytes(body)


def _parse(body: bytes) -> ChatRequest:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({err})") from None
    except RecursionError:  # `[[[[...` a few thousand deep: Python's parser gives up (it is no chat request)
        raise ApiError(400, "the request body is nested too deeply to be a chat completion request") from None
    try:
        return ChatRequest.model_validate(data)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply to be a chat completion request") from None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        hint = _UNSUPPORTED.get(str(first["loc"][0])) if first["loc"] else None
        raise ApiError(400, f"{where}: {hint or first['msg']}", param=where) from None


def _usage(result: Result) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"
