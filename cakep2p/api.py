"""OpenAI-compatible HTTP API over a LoadedModel: chat and text completions (streamed or not), models, health, status.

Each request runs in its own pipeline (its own KV cache on every stage) in a worker thread; at most
`max_sessions` run at once and the rest wait in order. Status codes: 400 for a body that is not a JSON
object, an unrecognized or unsupported argument, or a prompt longer than the context; 401 for a missing
or wrong API key; 404 for an unknown model or path; 422 for a missing field, a wrong type or a value
out of range.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cakep2p.conversation import Reply, TokenEvent, stream_completion
from cakep2p.engine.generation_config import GenerationDefaults, read_generation_defaults
from cakep2p.engine.sampling import SamplingParams
from cakep2p.errors import CakeError
from cakep2p.loaded_model import LoadedModel

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_STOP_SEQUENCES = 16  # OpenAI allows 4; some editor plugins send more
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "stop"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Arguments OpenAI clients commonly send that change nothing here (or are checked for an unsupported value).
_COMMON_ARGS = {"model", "temperature", "top_p", "max_tokens", "stop", "seed", "stream", "stream_options", "n",
                "user", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "metadata", "store",
                "service_tier", "top_k", "repetition_penalty"}
CHAT_ARGS = _COMMON_ARGS | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                            "tool_choice", "parallel_tool_calls"}
COMPLETION_ARGS = _COMMON_ARGS | {"prompt", "echo", "suffix", "best_of"}


class ApiError(Exception):
    """A request the API refuses, turned into an OpenAI-style JSON error."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 error_type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.error_type = status, message, param, code, error_type

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


# ---------------------------------------------------------------- request bodies


@dataclass(frozen=True)
class GenerationRequest:
    """What a validated body asks for."""

    prompt_ids: list[int]
    params: SamplingParams
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    echo: str = ""
    continues_prompt: bool = False  # plain completion: the text goes on from the prompt, leading space kept


def _invalid(name: str, message: str) -> ApiError:
    return ApiError(422, f"'{name}' {message}", param=name, code="invalid_value")


def _unsupported(name: str, message: str) -> ApiError:
    return ApiError(400, f"'{name}' {message}", param=name, code="unsupported_value")


def _number(body: dict, name: str, default: float | None, low: float, high: float,
            *, integer: bool = False, low_open: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise _invalid(name, f"must be {'an integer' if integer else 'a number'}, got {json.dumps(value)[:40]}")
    if value < low or value > high or (low_open and value == low):
        raise _invalid(name, f"must be {'>' if low_open else '>='} {low} and <= {high}, got {value}")
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid(name, "must be true or false")
    return value


def _stops(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(stop, str) and stop for stop in stops):
        raise _invalid("stop", "must be a non-empty string or a list of non-empty strings")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise _invalid("stop", f"takes at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}")
    return tuple(stops)


def _check_unsupported(body: dict) -> None:
    if _number(body, "n", 1, 1, 128, integer=True) != 1:
        raise _unsupported("n", "must be 1: one choice per request")
    if _number(body, "best_of", 1, 1, 128, integer=True) != 1:
        raise _unsupported("best_of", "must be 1")
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body, name, 0, -2, 2) != 0:
            raise _unsupported(name, "is not supported: use repetition_penalty")
    for name in ("logprobs", "top_logprobs", "logit_bias", "tools", "suffix"):
        if body.get(name) not in (None, False, 0, "", [], {}):
            raise _unsupported(name, "is not supported by this server")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise _unsupported("response_format", "only {\"type\": \"text\"} is supported")


def _message_text(index: int, content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _unsupported(f"messages[{index}].content", "parts must be {\"type\": \"text\", \"text\": ...}")
            parts.append(part["text"])
        return "".join(parts)
    raise _invalid(f"messages[{index}].content", "must be a string or a list of text parts")


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if messages is None:
        raise ApiError(422, "'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "must be a non-empty list of {\"role\", \"content\"} objects")
    rendered = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _invalid(f"messages[{index}]", "must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise _invalid(f"messages[{index}].role", f"must be one of {', '.join(ROLES)}, got {json.dumps(role)}")
        rendered.append({"role": ROLES[role], "content": _message_text(index, message.get("content"))})
    return rendered


class RequestReader:
    """Turns request bodies into GenerationRequests for one model."""

    def __init__(self, model: LoadedModel):
        self.model = model
        try:  # unset sampling values follow the model's generation_config.json, as transformers does
            self.defaults = read_generation_defaults(model.model_dir)
        except CakeError:
            self.defaults = GenerationDefaults()

    def _common(self, body: dict, allowed: set[str], default_max_tokens: int | None) -> tuple:
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ApiError(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0],
                           code="unrecognized_argument")
        model = body.get("model")
        if model is None:
            raise ApiError(422, "'model' is required", param="model", code="missing_required_parameter")
        if not isinstance(model, str):
            raise _invalid("model", "must be a string: a model id from GET /v1/models")
        if model != self.model.name:
            raise ApiError(404, f"The model '{model}' does not exist: this server runs '{self.model.name}'",
                           param="model", code="model_not_found")
        _check_unsupported(body)
        max_tokens = _number(body, "max_completion_tokens", None, 1, 1 << 30, integer=True)
        if max_tokens is None:
            max_tokens = _number(body, "max_tokens", None, 1, 1 << 30, integer=True)
        params = SamplingParams(
            max_new_tokens=max_tokens or default_max_tokens or self.model.max_seq_len,
            temperature=_number(body, "temperature", self.defaults.temperature, 0, 2),
            top_p=_number(body, "top_p", self.defaults.top_p, 0, 1, low_open=True),
            top_k=_number(body, "top_k", self.defaults.top_k, 0, 1 << 30, integer=True),
            repetition_penalty=_number(body, "repetition_penalty", self.defaults.repetition_penalty, 0, 10,
                                       low_open=True),
            seed=_number(body, "seed", None, -(1 << 63), (1 << 64) - 1, integer=True),
        )
        stream = _flag(body, "stream")
        options = body.get("stream_options")
        if options is not None and not stream:
            raise _unsupported("stream_options", "is only allowed when 'stream' is true")
        if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
            raise _invalid("stream_options", "must be an object like {\"include_usage\": true}")
        include_usage = _flag(options or {}, "include_usage")
        return params, _stops(body), stream, include_usage

    def _fit(self, prompt_ids: list[int], param: str) -> list[int]:
        if not prompt_ids:
            raise _invalid(param, "is empty and this model adds no start token: send some text")
        if len(prompt_ids) >= self.model.max_seq_len:
            raise ApiError(400, f"This model's context holds {self.model.max_seq_len} tokens but the prompt has "
                                f"{len(prompt_ids)}: shorten the {param}", param=param, code="context_length_exceeded")
        return prompt_ids

    def chat(self, body: dict) -> GenerationRequest:
        params, stops, stream, include_usage = self._common(body, CHAT_ARGS, None)
        tokenizer = self.model.tokenizer
        try:
            text = tokenizer.apply_chat_template(_messages(body), add_generation_prompt=True)
        except CakeError as error:
            raise ApiError(400, str(error), param="messages", code="invalid_messages") from None
        prompt_ids = self._fit(tokenizer.encode(text, add_special_tokens=False), "messages")
        return GenerationRequest(prompt_ids, params, stops, stream, include_usage)

    def completion(self, body: dict) -> GenerationRequest:
        params, stops, stream, include_usage = self._common(body, COMPLETION_ARGS, 16)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = self.model.tokenizer.encode(prompt, add_special_tokens=True)
            text = prompt
        elif isinstance(prompt, list) and prompt and all(
            isinstance(token, int) and not isinstance(token, bool) and 0 <= token < self.model.args.vocab_size
            for token in prompt
        ):
            prompt_ids, text = list(prompt), self.model.tokenizer.decode(prompt)
        elif prompt is None:
            raise ApiError(422, "'prompt' is required", param="prompt", code="missing_required_parameter")
        else:
            raise _invalid("prompt", "must be a string, or a non-empty list of token ids within the vocabulary")
        echo = text if _flag(body, "echo") else ""
        return GenerationRequest(self._fit(prompt_ids, "prompt"), params, stops, stream, include_usage, echo, True)


# ---------------------------------------------------------------- generation in worker threads


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back a tail that may be the start of one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was reached (the text before it is returned)."""
        self.pending += text
        hits = [index for index in (self.pending.find(stop) for stop in self.stops) if index >= 0]
        if hits:
            text, self.pending = self.pending[: min(hits)], ""
            return text, True
        keep = max((size for stop in self.stops for size in range(1, len(stop))
                    if self.pending.endswith(stop[:size])), default=0)
        cut = len(self.pending) - keep
        text, self.pending = self.pending[:cut], self.pending[cut:]
        return text, False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


@dataclass(frozen=True)
class Outcome:
    finish_reason: str  # OpenAI's: 'stop' or 'length'
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class Sessions:
    """At most `limit` generations at once, each in its own pipeline; the others wait first come, first served."""

    def __init__(self, model: LoadedModel, limit: int):
        if limit < 1:
            raise ValueError(f"max_sessions must be >= 1, got {limit}")
        self.model = model
        self.limit = limit
        self.open = 0  # sessions holding a pipeline now
        self.finished: collections.Counter[str] = collections.Counter()  # 'stop' | 'length' | 'cancelled' | 'error'
        self._queue: collections.deque[Generation] = collections.deque()
        self._running: set[Generation] = set()
        self._condition = threading.Condition()

    def snapshot(self) -> dict:
        with self._condition:
            cancelling = sum(generation.cancelled.is_set() for generation in self._running)
            return {"open": self.open, "waiting": len(self._queue), "cancelling": cancelling, "max": self.limit,
                    "finished": dict(self.finished)}

    def acquire(self, generation: "Generation") -> bool:
        """Block until the generation may open a pipeline; False when it was cancelled while waiting."""
        with self._condition:
            self._queue.append(generation)
            try:
                while not generation.cancelled.is_set() and (
                    self.open >= self.limit or self._queue[0] is not generation
                ):
                    self._condition.wait()
                if generation.cancelled.is_set():
                    self.finished["cancelled"] += 1
                    return False
                self.open += 1
                self._running.add(generation)
                return True
            finally:
                self._queue.remove(generation)
                self._condition.notify_all()

    def release(self, generation: "Generation", finish: str) -> None:
        with self._condition:
            self.open -= 1
            self._running.discard(generation)
            self.finished[finish] += 1
            self._condition.notify_all()

    def wake(self) -> None:
        with self._condition:
            self._condition.notify_all()

    def cancel_all(self) -> None:
        with self._condition:
            everyone = list(self._queue) + list(self._running)
        for generation in everyone:
            generation.cancel()


class Generation:
    """One request's tokens, produced in a worker thread and handed to the event loop through a queue."""

    def __init__(self, sessions: Sessions, request: GenerationRequest):
        self.sessions = sessions
        self.request = request
        self.cancelled = threading.Event()
        self.outcome: Outcome | None = None
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._thread = threading.Thread(target=self._work, name="cakep2p-api-generation", daemon=True)

    def start(self) -> "Generation":
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Stop within one token (or leave the queue); the pipeline is closed by the worker."""
        self.cancelled.set()
        self.sessions.wake()

    async def texts(self) -> AsyncIterator[str]:
        """The reply's text pieces as they come; `outcome` is set when this ends."""
        while True:
            kind, value = await self._events.get()
            if kind == "text":
                yield value
            elif kind == "end":
                self.outcome = value
                return
            else:
                raise value

    def _emit(self, kind: str, value: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening any more
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))

    def _pieces(self, events: Iterator[TokenEvent]) -> Iterator[str]:
        """The reply's text; a plain completion is decoded after the prompt, so its first word keeps its space."""
        if not self.request.continues_prompt:
            yield from (event.text for event in events)
            return
        decoder = self.sessions.model.tokenizer.stream_decoder(self.request.prompt_ids)
        for event in events:
            if event.token_id >= 0:
                yield decoder.push(event.token_id)
        yield decoder.flush()

    def _work(self) -> None:
        request, model = self.request, self.sessions.model
        reply = Reply()
        if not self.sessions.acquire(self):
            self._emit("end", Outcome("stop", len(request.prompt_ids), 0))
            return
        finish = "error"
        pipeline = None
        try:
            pipeline = model.new_pipeline()
            matcher = StopMatcher(request.stops)
            events = stream_completion(pipeline, model.tokenizer, request.prompt_ids, request.params, reply,
                                       cancel=self.cancelled)
            try:
                for piece in self._pieces(events):
                    text, stopped = matcher.push(piece)
                    if text:
                        self._emit("text", text)
                    if stopped:
                        finish = "stop"
                        break
                else:
                    finish = reply.stats.finish_reason if reply.stats else "cancelled"
                    tail = matcher.flush()
                    if tail:
                        self._emit("text", tail)
            finally:
                events.close()
        except Exception as error:  # reported to the client; the session is still freed below
            log.warning("generation failed: %s", error)
            self._emit("error", error)
        finally:
            if pipeline is not None:
                try:
                    pipeline.close()
                except Exception as error:
                    log.warning("closing a session's pipeline failed: %s", error)
            self.sessions.release(self, finish)
        if finish != "error":
            self._emit("end", Outcome(FINISH_REASONS[finish], len(request.prompt_ids), len(reply.token_ids)))


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
                 max_sessions: int):
        self.model = model
        self.api_key = api_key
        self.status = status
        self.reader = RequestReader(model)
        self.sessions = Sessions(model, max_sessions)
        self.created = int(time.time())

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def _body(self, request: Request) -> dict:
        self._authorize(request)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise ApiError(413, f"The request body is over {MAX_BODY_BYTES} bytes", code="request_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks), parse_constant=_reject_constant)
        except ValueError as error:
            raise ApiError(400, f"The body is not valid JSON: {error}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The body must be a JSON object", code="invalid_json")
        return body

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
        body = await self._body(request)
        return await self._respond(request, self.reader.chat(body), ChatShape())

    async def completions(self, request: Request) -> Response:
        body = await self._body(request)
        return await self._respond(request, self.reader.completion(body), TextShape())

    async def _respond(self, request: Request, wanted: GenerationRequest, shape: ChatShape | TextShape) -> Response:
        head = {"id": shape.id_prefix + uuid.uuid4().hex[:24], "created": int(time.time()), "model": self.model.name,
                "system_fingerprint": None}
        if wanted.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(self._stream(request, wanted, shape, head), media_type="text/event-stream",
                                     headers=headers)
        generation = Generation(self.sessions, wanted).start()
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
                             "choices": [shape.whole("".join(texts), outcome.finish_reason)],
                             "usage": outcome.usage()})

    async def _stream(self, request: Request, wanted: GenerationRequest, shape: ChatShape | TextShape,
                      head: dict) -> AsyncIterator[str]:
        chunk_head = {**head, "object": shape.chunk_name}
        if wanted.include_usage:
            chunk_head["usage"] = None
        generation = Generation(self.sessions, wanted).start()
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
                yield _sse({**chunk_head, "choices": [shape.closing(outcome.finish_reason)]})
                if wanted.include_usage:
                    yield _sse({**chunk_head, "choices": [], "usage": outcome.usage()})
            yield _sse("[DONE]")
        finally:
            generation.cancel()
            watcher.cancel()


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


async def _api_error(request: Request, error: Exception) -> Response:
    return error.response()


async def _http_error(request: Request, error: Exception) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
    message = f"{request.method} {request.url.path}: {error.detail}"
    return ApiError(error.status_code, message, code=code).response()


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (0: any free port); CakeError naming the fix when it cannot be had."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as error:
        raise CakeError(f"cannot use --host {host} ({error}); pass an IP address of this machine") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as error:
        sock.close()
        raise CakeError(f"cannot listen on {host}:{port} ({error.strerror or error}); "
                        "pick another --port, or a --host this machine has") from None
    return sock


def base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class BackgroundServer:
    """Serves an app with uvicorn on a thread (the window's on/off switch, tests); `stop()` always joins it."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0):
        self.app, self.host, self.port = app, host, port
        self.url: str | None = None
        self._sock: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 15.0) -> str:
        """Listen and wait until requests are served; returns the base URL (without /v1)."""
        self._sock = listen_socket(self.host, self.port)
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="cakep2p-api-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise CakeError(f"the API server on {self.host}:{self.port} did not start; see the log above")
            time.sleep(0.01)
        self.url = base_url(self._sock)
        return self.url

    def stop(self, timeout: float = 15.0) -> None:
        """Finish open requests (cut after 5 s), then close the socket."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def create_app(model: LoadedModel, *, api_key: str | None = None, status: Callable[[], dict] | None = None,
               max_sessions: int = 4) -> Starlette:
    """The ASGI app serving `model`; `app.state.sessions` counts open sessions (`open`, `waiting`, `finished`)."""
    api = Api(model, api_key, status, max_sessions)

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
