"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of `trustmoe.engine.Engine`.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health (alive),
GET /ready (a production engine is loaded and serving), GET /metrics, POST /admin/reload
(re-read followed registry aliases now), GET /admin/versions, POST /admin/canary
({"percent": P}). Every error is an OpenAI-style body (see `protocol.py` for which status
means what); no traceback ever reaches a client. An optional API key guards every route but
/health and /ready (`Authorization: Bearer KEY`). Every response, errors and streams
included, carries `x-trustmoe-model: name:version@sha256:<digest12>` naming the version that
answered (see `serve/fleet.py`).

`create_app(model_ref, config)` builds everything an app uses inside the app (no process
globals), so replicas can run under any process manager (`serve/ray.py` for Ray Serve):

    >>> app = create_app("registry:demo@production", ServeConfig(follow=True))
    >>> app = create_app("runs/demo/model", EngineConfig(quantize="int8"))
    >>> from trustmoe.serve.app import serve
    >>> serve("runs/demo/model", "127.0.0.1", 8000, quantize="int8")   # blocks
"""

from __future__ import annotations

import asyncio
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
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from trustmoe.config import SERVER_MAX_CONCURRENCY, EngineConfig
from trustmoe.security.guard import Guard
from trustmoe.serve.bridge import ServedEngine
from trustmoe.serve.chat import ChatTemplate
from trustmoe.serve.fleet import MODEL_HEADER, USER_HEADER, Fleet, ReloadError, ServeConfig, user_hash
from trustmoe.serve.guarding import GuardBlocked
from trustmoe.serve.handlers import create_chat, create_completion
from trustmoe.serve.protocol import (
    MAX_BODY_BYTES,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    pydantic_error_to_api,
)
from trustmoe.serve.tracking import CURRENT_TRACKER, RequestTracker

if TYPE_CHECKING:
    from trustmoe.engine import Engine

log = logging.getLogger("trustmoe.serve")
API_KEY_ENV = "TRUSTMOE_API_KEY"
OPEN_PATHS = ("/health", "/ready")
SCOPE_KEY = "trustmoe.answer"  # per-request holder of the answering version's header


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


class ModelHeaderMiddleware:
    """Pure ASGI, outermost: `x-trustmoe-model` on every response (the answering version, or
    production's for a request that never reached an engine: 401, 413, 404...)."""

    def __init__(self, app: Any, fleet: Fleet) -> None:
        self.app, self.fleet = app, fleet

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        holder: dict[str, str] = {}
        scope[SCOPE_KEY] = holder

        async def send_with_header(message: Any) -> None:
            if message["type"] == "http.response.start":
                value = holder.get("header") or self.fleet.production.version.header
                headers = [h for h in message.get("headers", []) if h[0].lower() != MODEL_HEADER.encode()]
                headers.append((MODEL_HEADER.encode(), value.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_header)


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


def create_app(model: ServedEngine | Fleet | str | Path,
               config: ServeConfig | EngineConfig | None = None, *, model_name: str | None = None,
               api_key: str | None = None, max_concurrency: int = SERVER_MAX_CONCURRENCY,
               chat_template: ChatTemplate | None = None, served_names: list[str] | None = None,
               guard: Guard | None = None) -> FastAPI:
    """A FastAPI app; its engine threads run while the app is up (its lifespan).

    `model`: a model ref (`registry:NAME@ALIAS`, `registry:NAME@VERSION` or a model dir) with
    `config` (a `ServeConfig`, or an `EngineConfig` for the engine alone); a `Fleet`; or an
    engine already built (then the keyword arguments apply, and the engine never swaps).
    `guard`: the request/output guard (default: the built-in policy; pass
    `Guard(GuardPolicy(enabled=False))` to turn it off)."""
    if isinstance(model, Fleet):
        fleet = model
    elif isinstance(model, str | Path):
        cfg = config if isinstance(config, ServeConfig) else ServeConfig(
            engine=config or EngineConfig(), api_key=api_key, max_concurrency=max_concurrency,
            served_model_name=model_name, guard=guard)
        fleet = Fleet(model, cfg)
    else:
        if isinstance(config, ServeConfig):
            raise TypeError("a ServeConfig goes with a model ref, not with an engine")
        fleet = Fleet.of_engine(model, ServeConfig(
            api_key=api_key, max_concurrency=max_concurrency, served_model_name=model_name,
            guard=guard), chat_template=chat_template, served_names=served_names)
    key = fleet.config.api_key

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        fleet.start()
        try:
            yield
        finally:
            await asyncio.to_thread(fleet.close)

    app = FastAPI(title="trustmoe", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.trustmoe = fleet.production.state  # the first production engine's state
    app.state.fleet = fleet

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
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        err = APIError(500, f"internal error: {type(e).__name__}")
        holder = request.scope.get(SCOPE_KEY) or {}  # outside the header middleware here
        answer = holder.get("header") or fleet.production.version.header
        return JSONResponse(err.body(), status_code=500, headers={MODEL_HEADER: answer})

    @app.get("/health")
    async def health() -> Response:
        if fleet.closed or not fleet.production.state.bridge.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        body = {"ready": fleet.ready, "versions": [v.to_dict() for v in fleet.versions()],
                "pid": os.getpid()}
        return JSONResponse(body, status_code=200 if fleet.ready else 503)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        state = fleet.production.state
        data = []
        by_key = {v.key: v for v in fleet.versions()}
        for n in fleet.served_names():
            entry: dict[str, Any] = {"id": n, "object": "model", "created": state.created,
                                     "owned_by": "trustmoe", "max_model_len": state.max_model_len}
            v = by_key.get(n)
            if v is not None and v.digest:
                entry["trustmoe"] = {"role": v.role, "digest": v.digest, "version": v.version,
                                     "header": v.header}
            data.append(entry)
        return JSONResponse({"object": "list", "data": data})

    @app.get("/metrics")
    async def metrics() -> Response:
        m = fleet.production.state.metrics
        return Response(m.render(), media_type=m.content_type)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _answer(fleet, request, CompletionRequest, create_completion, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await _answer(fleet, request, ChatCompletionRequest, create_chat,
                             "/v1/chat/completions")

    @app.post("/admin/reload")
    async def reload() -> JSONResponse:
        try:
            moved = await asyncio.to_thread(fleet.reload)
        except ReloadError as e:
            status = 404 if "unknown" in str(e) or "points at no version" in str(e) else 503
            raise APIError(status, str(e), type_="reload_error", code="reload_failed") from None
        return JSONResponse({"reloaded": [v.to_dict() for v in moved],
                             "versions": [v.to_dict() for v in fleet.versions()]})

    @app.get("/admin/versions")
    async def versions() -> JSONResponse:
        return JSONResponse({"versions": [v.to_dict() for v in fleet.versions()],
                             "canary_percent": fleet.canary_percent(),
                             "last_reload_error": fleet.last_reload_error})

    @app.post("/admin/canary")
    async def canary(request: Request) -> JSONResponse:
        body = await _json_object(request)
        pct = body.get("percent")
        if not isinstance(pct, int | float) or isinstance(pct, bool):
            raise APIError(400, "body must be {\"percent\": number within 0..100}", "percent")
        try:
            fleet.set_canary_percent(float(pct))
        except ValueError as e:
            raise APIError(400, str(e), "percent") from None
        return JSONResponse({"canary_percent": fleet.canary_percent()})

    app.add_middleware(GuardMiddleware, api_key=key, max_body=MAX_BODY_BYTES)
    app.add_middleware(ModelHeaderMiddleware, fleet=fleet)
    return app


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        obj = json.loads((await request.body()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise APIError(400, "request body is not valid JSON", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_type")
    return obj


async def _answer(fleet: Fleet, request: Request, model: type[BaseModel], handler: Any,
                  endpoint: str) -> Any:
    """Parse, pick the engine (canary split, sticky per user), run the handler under a
    RequestTracker (see `serve/tracking.py`), and end the tracker unless a stream still runs."""
    holder = request.scope.get(SCOPE_KEY)
    try:
        req = await _parse(request, model)
    except APIError as e:
        slot = fleet.pick(None, fleet.production.version.key)  # header: production's
        RequestTracker(fleet, slot, endpoint, None, slot.state.new_id("http")).finish(e.status)
        raise
    hashed = user_hash(getattr(req, "user", None) or request.headers.get(USER_HEADER))
    slot = fleet.pick(hashed, getattr(req, "model", None))
    if holder is not None:
        holder["header"] = slot.version.header
    tracker = RequestTracker(fleet, slot, endpoint, hashed, slot.state.new_id("http"),
                             shadow=fleet.sample_shadow())
    token = CURRENT_TRACKER.set(tracker)
    try:
        resp = await handler(slot.state, req, request)
    except APIError as e:
        tracker.guard_blocked = isinstance(e, GuardBlocked)
        tracker.finish(e.status)
        raise
    except BaseException:
        tracker.finish(500)
        raise
    finally:
        CURRENT_TRACKER.reset(token)
    if isinstance(resp, StreamingResponse) and tracker.lease is not None and not tracker.lease.closed:
        tracker.streaming = True  # the lease's close ends the tracker
    else:
        tracker.finish(getattr(resp, "status_code", 200))
    return resp


def build_engine(model_dir: str | Path, config: EngineConfig | None = None,
                 **overrides: Any) -> Engine:
    """The engine a server runs: `config` (default `EngineConfig()`) with `overrides`
    (EngineConfig field names)."""
    from trustmoe.engine import Engine

    return Engine(model_dir, config, **overrides)


def serve(model_ref: str | Path, host: str = "127.0.0.1", port: int = 8000, *,
          config: EngineConfig | None = None, max_concurrency: int = SERVER_MAX_CONCURRENCY,
          api_key: str | None = None, served_model_name: str | None = None,
          log_level: str = "info", guard: Guard | None = None,
          serve_config: ServeConfig | None = None, **overrides: Any) -> None:
    """Load `model_ref` (a model dir or `registry:NAME@ALIAS`) and serve it until interrupted
    (blocks). `config` + `overrides` (EngineConfig field names) set the engine; `serve_config`,
    when given, sets everything else (canary, shadow, follow...) and the other keywords are
    ignored."""
    import dataclasses

    import uvicorn

    engine_cfg = config or EngineConfig()
    engine_cfg = engine_cfg.replace(**overrides) if overrides else engine_cfg
    if serve_config is None:
        guard = guard if guard is not None else Guard()  # a bad policy fails before the model loads
        serve_config = ServeConfig(engine=engine_cfg, max_concurrency=max_concurrency,
                                   api_key=api_key, served_model_name=served_model_name,
                                   guard=guard)
    elif overrides or config is not None:
        serve_config = dataclasses.replace(serve_config, engine=engine_cfg)
    if serve_config.api_key is None and os.environ.get(API_KEY_ENV):
        serve_config = dataclasses.replace(serve_config, api_key=os.environ[API_KEY_ENV])
    app = create_app(model_ref, serve_config)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
