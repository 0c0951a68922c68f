"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of `trustmoe.engine.Engine`.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics. Every error is an OpenAI-style body (see `protocol.py` for which status means
what); no traceback ever reaches a client. An optional API key guards every route but
/health (`Authorization: Bearer KEY`).

    >>> from trustmoe.serve.app import serve
    >>> serve("runs/demo/model", "127.0.0.1", 8000, quantize="int8")   # blocks
    >>> serve("runs/demo/model", config=EngineConfig(quantize="int8", kv_cache_mb=512))
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from trustmoe.config import SERVER_MAX_CONCURRENCY, EngineConfig
from trustmoe.security.guard import Guard
from trustmoe.serve.bridge import ServedEngine
from trustmoe.serve.chat import ChatTemplate
from trustmoe.serve.handlers import create_chat, create_completion
from trustmoe.serve.protocol import (
    MAX_BODY_BYTES,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    pydantic_error_to_api,
)
from trustmoe.serve.state import ServerState

if TYPE_CHECKING:
    from trustmoe.engine import Engine

log = logging.getLogger("trustmoe.serve")
API_KEY_ENV = "TRUSTMOE_API_KEY"
OPEN_PATHS = ("/health",)


class GuardMiddleware:
    """Pure ASGI (so streaming and disconnect detection are untouched): API key and body size."""

    def __init__(self, app: Any, api_key: str | None, max_body: int) -> None:
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        err: APIError | None = None
        if self.api_key and scope["path"] not in OPEN_PATHS:
            auth = headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                err = APIError(401, "invalid or missing API key", type_="authentication_error")
        length = headers.get("content-length")
        if err is None and length is not None:
            if not length.isdigit():
                err = APIError(400, "bad Content-Length header")
            elif int(length) > self.max_body:
                err = APIError(413, f"request body over {self.max_body} bytes")
        if err is not None:
            extra = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
            resp = JSONResponse(err.body(), status_code=err.status, headers=extra)
            await resp(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 (byte {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(400, f"request body is not valid JSON: {e.msg} at line {e.lineno} "
                       f"column {e.colno}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "request body nests too deeply", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_type")
    try:
        return model.model_validate(obj)
    except RecursionError:
        raise APIError(400, "request body nests too deeply", code="invalid_type") from None
    except ValidationError as e:
        raise pydantic_error_to_api([dict(x) for x in e.errors(include_url=False)]) from None


def create_app(engine: ServedEngine, *, model_name: str | None = None, api_key: str | None = None,
               max_concurrency: int = SERVER_MAX_CONCURRENCY, chat_template: ChatTemplate | None = None,
               served_names: list[str] | None = None, guard: Guard | None = None) -> FastAPI:
    """A FastAPI app serving `engine`; its engine thread runs while the app is up.

    `guard`: the request/output guard (default: the built-in policy; pass
    `Guard(GuardPolicy(enabled=False))` to turn it off)."""
    state = ServerState(engine, model_name=model_name, served_names=served_names,
                        max_concurrency=max_concurrency, chat_template=chat_template,
                        api_key=api_key)
    state.guard = guard if guard is not None else Guard()  # type: ignore[attr-defined]

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.bridge.start()
        try:
            yield
        finally:
            state.bridge.shutdown()

    app = FastAPI(title="trustmoe", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.trustmoe = state

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        err = pydantic_error_to_api(list(e.errors()))
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        err = APIError(e.status_code, str(e.detail))
        return JSONResponse(err.body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        err = APIError(500, f"internal error: {type(e).__name__}")
        return JSONResponse(err.body(), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        if not state.bridge.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        data = [{"id": n, "object": "model", "created": state.created, "owned_by": "trustmoe",
                 "max_model_len": state.max_model_len} for n in sorted(state.served_names)]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await create_completion(state, await _parse(request, CompletionRequest), request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await create_chat(state, await _parse(request, ChatCompletionRequest), request)

    app.add_middleware(GuardMiddleware, api_key=api_key, max_body=MAX_BODY_BYTES)
    return app


def build_engine(model_dir: str | Path, config: EngineConfig | None = None,
                 **overrides: Any) -> Engine:
    """The engine a server runs: `config` (default `EngineConfig()`) with `overrides`
    (EngineConfig field names)."""
    from trustmoe.engine import Engine

    return Engine(model_dir, config, **overrides)


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, *,
          config: EngineConfig | None = None, max_concurrency: int = SERVER_MAX_CONCURRENCY,
          api_key: str | None = None, served_model_name: str | None = None,
          log_level: str = "info", guard: Guard | None = None, **overrides: Any) -> None:
    """Load `model_dir` into an Engine (`config` + `overrides`, EngineConfig field names) and
    serve it until interrupted (blocks)."""
    import uvicorn

    guard = guard if guard is not None else Guard()  # a bad policy fails before the model loads
    engine = build_engine(model_dir, config, **overrides)
    key = api_key or os.environ.get(API_KEY_ENV) or None
    app = create_app(engine, model_name=served_model_name or engine.model_name, api_key=key,
                     max_concurrency=max_concurrency,
                     chat_template=ChatTemplate.from_model_dir(model_dir), guard=guard)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
