"""The rerank API: a FastAPI application around one :class:`RerankEngine`.

    POST /v1/rerank, /v2/rerank, /rerank   Cohere / Jina / vLLM rerank shape (and, on /rerank,
                                           Text Embeddings Inference's)
    POST /score, /v1/score                 vLLM's score shape (text_1 x text_2)
    GET  /health                           the model, its limits and the batcher's counters
    GET  /v1/models, /models               the served model (OpenAI list shape)

Every error body is ``{"object": "error", "message", "type", "param", "code"}``, ``param``
naming the field at fault. With an API key every route but ``/health`` wants
``Authorization: Bearer <key>`` (401 otherwise). A request over a bound (documents, characters
per text, body bytes) is a 413 naming the field. Bad input is a 4xx for that request only; a model failure is a 500
for the request it happened in (see :mod:`megarank.serving.batcher`); the server keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from megarank.data.ranking import rank_documents
from megarank.serving.batcher import BatcherStopped, ScoringError
from megarank.serving.engine import RerankEngine
from megarank.serving.schemas import (
    ApiVersion,
    DocumentText,
    ErrorResponse,
    Meta,
    MetaTokens,
    ModelCard,
    ModelList,
    RerankRequest,
    RerankResponse,
    RerankResult,
    ScoreItem,
    ScoreRequest,
    ScoreResponse,
    TeiRerankRequest,
    TeiRerankResult,
    Usage,
)

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowedError",
               413: "RequestTooLargeError", 500: "InternalServerError",
               503: "ServiceUnavailableError"}


class BadRequest(Exception):
    """A request that parsed but asks for something the server does not do."""

    def __init__(self, param: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.message, self.status = param, message, status


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = ErrorResponse(message=message, type=ERROR_TYPES.get(status, "Error"), param=param,
                         code=status)
    return JSONResponse(body.model_dump(), status_code=status)


def _param(loc: tuple[Any, ...]) -> str:
    """('body', 'documents', 2, 'text') -> 'documents[2].text'."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def validation_message(error: dict[str, Any]) -> tuple[str, str]:
    """(param, message) of pydantic's first error of a request."""
    kind, loc, ctx = error.get("type"), tuple(error.get("loc", ())), error.get("ctx") or {}
    if kind == "json_invalid":
        return "body", f"body: malformed JSON ({ctx.get('error', error.get('msg'))})"
    if "param" in ctx:  # our own checks say which item is wrong
        return ctx["param"], error["msg"]
    param = _param(loc)
    if param == "body":
        if kind == "missing":
            return "body", "body: a JSON object is required"
        if isinstance(error.get("input"), bytes | str):  # not sent as JSON
            return "body", "body: must be a JSON object sent as Content-Type: application/json"
        return "body", "body: must be a JSON object"
    if kind == "missing":
        return param, f"{param}: field required"
    return param, f"{param}: {error.get('msg')}"


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` (declared by Content-Length or
    streamed) is answered 413 without being kept in memory. The body is read to its end before
    answering, so the client gets the 413 rather than a reset connection."""

    def __init__(self, app: Callable[..., Awaitable[None]], max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._drain(receive)
            await self._reject(scope, send, int(declared))
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                if message.get("more_body", False):
                    size += await self._drain(receive)
                await self._reject(scope, send, size)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _drain(receive: Callable) -> int:
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return size
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                return size

    async def _reject(self, scope: dict, send: Callable, size: int) -> None:
        response = error_response(
            413, f"body: {size} bytes, at most {self.max_bytes} per request (--max-body-mb)",
            "body")
        async def nothing() -> dict:
            return {"type": "http.disconnect"}

        await response(scope, nothing, send)


class ApiKey:
    """ASGI middleware: every request but ``GET /health`` must carry ``Authorization: Bearer
    <key>`` (as vLLM's and TEI's servers ask); otherwise 401, before the body is read."""

    def __init__(self, app: Callable[..., Awaitable[None]], key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            await self.app(scope, receive, send)
            return
        message = ("Authorization: wrong API key" if header else
                   "Authorization: missing; send 'Authorization: Bearer <key>' (--api-key)")
        response = error_response(401, message, "Authorization")
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


async def _json_body(request: Request) -> Any:
    """The request's JSON body, refused as FastAPI refuses a body it cannot read."""
    raw = await request.body()
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if kind and kind != "application/json" and not kind.endswith("+json"):
        raise RequestValidationError([{"type": "model_attributes_type", "loc": ("body",),
                                       "msg": "not JSON", "input": raw}])
    if not raw.strip():
        raise RequestValidationError([{"type": "missing", "loc": ("body",),
                                       "msg": "Field required", "input": None}])
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestValidationError([{
            "type": "json_invalid", "loc": ("body", getattr(e, "pos", 0)),
            "msg": "JSON decode error", "input": {},
            "ctx": {"error": getattr(e, "msg", str(e))}}]) from None


def _validate(model: type, payload: Any) -> Any:
    try:
        return model.model_validate(payload)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])}
                                      for err in e.errors()]) from None


class Handlers:
    """What the routes do with a request: the request bounds, then the engine's scores, in each
    API's response shape."""

    def __init__(self, engine: RerankEngine) -> None:
        self.engine = engine

    def check_count(self, n: int, param: str) -> None:
        limit = self.engine.limits.max_documents
        if n > limit:
            raise BadRequest(param, f"{param}: {n} texts, at most {limit} per request "
                                    "(the server's max_documents)", status=413)

    def check_chars(self, texts: str | list[str], param: str) -> None:
        limit = self.engine.limits.max_text_chars
        for i, text in enumerate([texts] if isinstance(texts, str) else texts):
            if len(text) > limit:
                name = param if isinstance(texts, str) else f"{param}[{i}]"
                raise BadRequest(name, f"{name}: {len(text)} characters, at most {limit} per "
                                       "text (the server's max_text_chars)", status=413)

    def check_rerank(self, query: str, docs: list[str], param: str) -> None:
        self.check_count(len(docs), param)
        self.check_chars(query, "query")
        self.check_chars(docs, param)

    async def rerank(self, body: RerankRequest, version: str) -> RerankResponse:
        """Cohere / Jina / vLLM: documents ordered by relevance."""
        docs: list[str] = body.documents  # the validator turned {"text": ...} into strings
        self.check_rerank(body.query, docs, "documents")
        scores, tokens = await self.engine.score([(body.query, d) for d in docs])
        ranked = [int(k) for k in rank_documents({f"{i:09d}": s for i, s in enumerate(scores)})]
        if body.top_n is not None:
            ranked = ranked[:body.top_n]
        results = [RerankResult(index=i, relevance_score=scores[i],
                                document=DocumentText(text=docs[i]) if body.return_documents
                                else None) for i in ranked]
        return RerankResponse(
            id=str(uuid.uuid4()), model=self.engine.name, results=results,
            meta=Meta(api_version=ApiVersion(version=version),
                      tokens=MetaTokens(input_tokens=tokens)),
            usage=Usage(prompt_tokens=tokens, total_tokens=tokens))

    async def rerank_tei(self, body: TeiRerankRequest) -> list[dict[str, Any]]:
        """Text Embeddings Inference: a list of ``{index, score[, text]}`` by relevance."""
        self.check_rerank(body.query, body.texts, "texts")
        scores, _ = await self.engine.score([(body.query, t) for t in body.texts],
                                            relevance="raw" if body.raw_scores else "sigmoid")
        ranked = [int(k) for k in rank_documents({f"{i:09d}": s for i, s in enumerate(scores)})]
        return [TeiRerankResult(index=i, score=scores[i],
                                text=body.texts[i] if body.return_text else None)
                .model_dump(exclude_none=True) for i in ranked]

    async def score(self, body: ScoreRequest) -> ScoreResponse:
        """vLLM's score: text_1 paired with each of text_2 (or the lists zipped)."""
        t1 = [body.text_1] if isinstance(body.text_1, str) else body.text_1
        t2 = [body.text_2] if isinstance(body.text_2, str) else body.text_2
        if len(t1) == 1:
            t1 = t1 * len(t2)
        elif len(t2) == 1:
            t2 = t2 * len(t1)
        elif len(t1) != len(t2):
            raise BadRequest("text_2", f"text_2: {len(t2)} texts for {len(t1)} in text_1; give "
                                       "as many, or one text on either side")
        self.check_count(len(t1), "text_2")
        self.check_chars(body.text_1, "text_1")
        self.check_chars(body.text_2, "text_2")
        scores, tokens = await self.engine.score(list(zip(t1, t2, strict=True)))
        return ScoreResponse(
            id=f"score-{uuid.uuid4().hex}", created=int(time.time()), model=self.engine.name,
            data=[ScoreItem(index=i, score=s) for i, s in enumerate(scores)],
            usage=Usage(prompt_tokens=tokens, total_tokens=tokens))


def add_error_handlers(app: FastAPI) -> None:
    """Every error answered as ``{"error", "param"}`` JSON with its status: 400 for a body that
    fails validation, 413 for a bound, 500 for a model failure, 503 while stopping."""
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        param, message = validation_message(errors[0]) if errors else ("body", "invalid body")
        return error_response(400, message, param)

    @app.exception_handler(BadRequest)
    async def _bad(_: Request, exc: BadRequest) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{exc.detail}: {request.method} {request.url.path}"
        return error_response(exc.status_code, message)

    @app.exception_handler(ScoringError)
    async def _scoring(_: Request, exc: ScoringError) -> JSONResponse:
        return error_response(500, f"the model failed on this request: {exc}")

    @app.exception_handler(BatcherStopped)
    async def _stopped(_: Request, exc: BatcherStopped) -> JSONResponse:
        return error_response(503, str(exc))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")


ERRORS = {400: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
          500: {"model": ErrorResponse}}


def add_rerank_routes(app: FastAPI, handlers: Handlers) -> None:
    """``/v1/rerank``, ``/v2/rerank`` and ``/rerank`` (which also takes TEI's request)."""
    rerank_doc = {"response_model": RerankResponse, "response_model_exclude_none": True,
                  "responses": ERRORS}

    @app.post("/v2/rerank", **rerank_doc)
    async def rerank_v2(body: RerankRequest) -> RerankResponse:
        """Cohere v2 / vLLM: documents ordered by relevance."""
        return await handlers.rerank(body, "2")

    @app.post("/v1/rerank", **rerank_doc)
    async def rerank_v1(body: RerankRequest) -> RerankResponse:
        """Cohere v1 / Jina / vLLM: documents ordered by relevance."""
        return await handlers.rerank(body, "1")

    tei_schema = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "oneOf": [RerankRequest.model_json_schema(), TeiRerankRequest.model_json_schema()]}}}}}

    @app.post("/rerank", openapi_extra=tei_schema,
              responses={200: {"model": RerankResponse | list[TeiRerankResult]}, **ERRORS})
    async def rerank_plain(request: Request) -> JSONResponse:
        """vLLM's unversioned path; a body with ``texts`` (and no ``documents``) is Text
        Embeddings Inference's request, answered with TEI's list of ``{index, score}``."""
        payload = await _json_body(request)
        if isinstance(payload, dict) and "texts" in payload and "documents" not in payload:
            return JSONResponse(await handlers.rerank_tei(_validate(TeiRerankRequest, payload)))
        body = await handlers.rerank(_validate(RerankRequest, payload), "2")
        return JSONResponse(body.model_dump(exclude_none=True))


def add_other_routes(app: FastAPI, handlers: Handlers, engine: RerankEngine) -> None:
    """``/score`` and ``/v1/score``, ``/health``, ``/models`` and ``/v1/models``."""
    created = int(time.time())
    score_doc = {"response_model": ScoreResponse, "responses": ERRORS}

    @app.post("/score", **score_doc)
    async def score_plain(body: ScoreRequest) -> ScoreResponse:
        """vLLM's score: text_1 paired with each of text_2 (or the lists zipped)."""
        return await handlers.score(body)

    @app.post("/v1/score", **score_doc)
    async def score_v1(body: ScoreRequest) -> ScoreResponse:
        return await handlers.score(body)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """200 while serving: the model, its limits and the batcher's counters."""
        return {"status": "ok", **engine.info(), "in_flight": engine.batcher.in_flight,
                "batching": engine.batcher.stats.as_dict()}

    def models() -> ModelList:
        return ModelList(data=[ModelCard(id=engine.name, created=created, root=engine.source,
                                         max_model_len=engine.max_length)])

    @app.get("/v1/models", response_model=ModelList)
    async def models_v1() -> ModelList:
        return models()

    @app.get("/models", response_model=ModelList)
    async def models_plain() -> ModelList:
        return models()



def create_app(engine: RerankEngine, api_key: str | None = None) -> FastAPI:
    """The API over ``engine``; its lifespan starts the engine's scoring thread and, at
    shutdown (after in-flight requests are answered), scores what is queued and stops it.
    With ``api_key`` every route but ``/health`` wants it as a bearer token."""

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    # strict_content_type=False: a JSON body without a Content-Type header is read as JSON.
    app = FastAPI(title="megarank rerank API", lifespan=lifespan, strict_content_type=False,
                  description="Cohere/Jina/vLLM-shaped rerank and score endpoints over a "
                              "megarank model, scored by its scoring contract.")
    app.add_middleware(BodyLimit, max_bytes=engine.limits.max_body_bytes)
    if api_key:  # added last, so it runs first: no body is read for a request without the key
        app.add_middleware(ApiKey, key=api_key)
    app.state.engine = engine
    add_error_handlers(app)
    handlers = Handlers(engine)
    add_rerank_routes(app, handlers)
    add_other_routes(app, handlers, engine)
    return app
