"""OpenAI-compatible HTTP API over a LoadedModel: the routes (chat and text completions, streamed or not, models,
health, status) and the ASGI app.

Bodies are checked in requests.py, generations queue and run in sessions.py, server.py serves the app. 401 answers a missing
or wrong API key, 404 an unknown path; the other status codes are listed in `api_requests`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from typing import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cakep2p.api.requests import ApiError, GenerationRequest, RequestReader, parse_body
from cakep2p.api.sessions import Generation, Sessions, SessionsFull, openai_finish_reason, usage
from cakep2p.api.status import cluster_status
from cakep2p.cluster import LoadedModel

MAX_BODY_BYTES = 8 * 1024 * 1024


async def _watch_disconnect(request: Request, generation: Generation) -> None:
    """Cancel the generation when the client goes away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            generation.cancel()
            return


# ---------------------------------------------------------------- response shapes


class ChatShape:
    object_name, chunk_name, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    def opening(self) -> dict:
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def piece(self, text: str) -> dict:
        return {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}

    def closing(self, finish: str) -> dict:
        return {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}

    def whole(self, text: str, finish: str) -> dict:
        return {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None, "finish_reason": finish}


class TextShape:
    object_name, chunk_name, id_prefix = "text_completion", "text_completion", "cmpl-"

    def opening(self) -> dict | None:
        return None

    def piece(self, text: str) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": None}

    def closing(self, finish: str) -> dict:
        return {"index": 0, "text": "", "logprobs": None, "finish_reason": finish}

    def whole(self, text: str, finish: str) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------- the app


class Api:
    """The routes, bound to one model."""

    def __init__(self, model: LoadedModel, api_key: str | None, status: Callable[[], dict] | None,
                 max_sessions: int, max_waiting: int | None = None):
        self.model = model
        self.api_key = api_key
        self.status = status
        self.reader = RequestReader(model)
        self.sessions = Sessions(model, max_sessions, max_waiting)
        self.created = int(time.time())

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def _raw_body(self, request: Request) -> bytes:
        self._authorize(request)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise ApiError(413, f"The request body is over {MAX_BODY_BYTES} bytes", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def _model_card(self) -> dict:
        return {"id": self.model.name, "object": "model", "created": self.created, "owned_by": "cakep2p"}

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model.name})

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model_card(self, request: Request) -> Response:
        self._authorize(request)
        if request.path_params["model_id"] != self.model.name:
            raise ApiError(404, f"The model '{request.path_params['model_id']}' does not exist",
                           param="model", code="model_not_found")
        return JSONResponse(self._model_card())

    async def cluster(self, request: Request) -> Response:
        self._authorize(request)
        body = {"model": self.model.describe(), "sessions": self.sessions.snapshot()}
        if self.status is not None:
            body["cluster"] = self.status()
        return JSONResponse(body)

    async def chat_completions(self, request: Request) -> Response:
        return await self._respond(request, await self._read(request, self.reader.chat), ChatShape())

    async def completions(self, request: Request) -> Response:
        return await self._respond(request, await self._read(request, self.reader.completion), TextShape())

    async def _read(self, request: Request, reader: Callable[[dict], GenerationRequest]) -> GenerationRequest:
        """The request, parsed, templated and tokenized in a worker thread: a huge prompt must not stall /health
        or the other streams on the event loop."""
        raw = await self._raw_body(request)
        return await asyncio.to_thread(lambda: reader(parse_body(raw)))

    async def _respond(self, request: Request, wanted: GenerationRequest, shape: ChatShape | TextShape) -> Response:
        head = {"id": shape.id_prefix + uuid.uuid4().hex[:24], "created": int(time.time()), "model": self.model.name,
                "system_fingerprint": None}
        try:  # admitted before any response starts: a refusal is a 429, streamed or not
            generation = Generation(self.sessions, wanted).start()
        except SessionsFull as error:
            raise _too_many_requests(error) from None
        if wanted.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(self._stream(request, generation, shape, head), media_type="text/event-stream",
                                     headers=headers)
        watcher = asyncio.create_task(_watch_disconnect(request, generation))
        try:
            texts = [wanted.echo] + [text async for text in generation.texts()]
        except Exception as error:
            raise ApiError(503, f"Generation failed: {error}", error_type="server_error",
                           code="generation_failed") from None
        finally:
            generation.cancel()
            watcher.cancel()
        outcome = generation.outcome
        return JSONResponse({**head, "object": shape.object_name,
                             "choices": [shape.whole("".join(texts), openai_finish_reason(outcome))],
                             "usage": usage(outcome)})

    async def _stream(self, request: Request, generation: Generation, shape: ChatShape | TextShape,
                      head: dict) -> AsyncIterator[str]:
        wanted = generation.request
        chunk_head = {**head, "object": shape.chunk_name}
        if wanted.include_usage:
            chunk_head["usage"] = None
        watcher = asyncio.create_task(_watch_disconnect(request, generation))
        try:
            opening = shape.opening()
            if opening is not None:
                yield _sse({**chunk_head, "choices": [opening]})
            if wanted.echo:
                yield _sse({**chunk_head, "choices": [shape.piece(wanted.echo)]})
            try:
                async for text in generation.texts():
                    yield _sse({**chunk_head, "choices": [shape.piece(text)]})
            except Exception as error:
                yield _sse({"error": {"message": f"Generation failed: {error}", "type": "server_error",
                                      "param": None, "code": "generation_failed"}})
            else:
                outcome = generation.outcome
                yield _sse({**chunk_head, "choices": [shape.closing(openai_finish_reason(outcome))]})
                if wanted.include_usage:
                    yield _sse({**chunk_head, "choices": [], "usage": usage(outcome)})
            yield _sse("[DONE]")
        finally:
            generation.cancel()
            watcher.cancel()


def _too_many_requests(error: SessionsFull) -> ApiError:
    return ApiError(429, f"Too many requests: {error}", error_type="rate_limit_exceeded", code="rate_limit_exceeded")


async def _api_error(request: Request, error: Exception) -> Response:
    return error.response()


async def _http_error(request: Request, error: Exception) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
    message = f"{request.method} {request.url.path}: {error.detail}"
    return ApiError(error.status_code, message, code=code).response()


def create_app(model: LoadedModel, *, api_key: str | None = None, max_sessions: int = 4,
               max_waiting: int | None = None) -> Starlette:
    """The ASGI app serving `model`; `app.state.sessions` counts open sessions (`open`, `waiting`, `finished`).

    Beyond `max_sessions` requests wait their turn; beyond `max_waiting` more (default 4 x max_sessions) they get 429.
    """
    api = Api(model, api_key, cluster_status(model), max_sessions, max_waiting)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        api.sessions.cancel_all()

    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", api.model_card, methods=["GET"]),
        Route("/v1/cluster", api.cluster, methods=["GET"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: _api_error, HTTPException: _http_error})
    app.state.sessions = api.sessions
    app.state.api = api
    return app
