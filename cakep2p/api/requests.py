"""Request validation for the HTTP API: JSON bodies become GenerationRequests, or OpenAI-style ApiErrors.

Status codes: 400 for a body that is not a JSON object, an unrecognized or unsupported argument, or a
prompt longer than the context; 404 for an unknown model; 422 for a missing field, a wrong type or a
value out of range.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse

from cakep2p.cluster import LoadedModel
from cakep2p.engine.conversation import default_max_new_tokens
from cakep2p.engine.sampling import SamplingParams, sampling_params
from cakep2p.errors import CakeError

MAX_STOP_SEQUENCES = 16  # OpenAI allows 4; some editor plugins send more
MAX_SEED = (1 << 63) - 1
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


@dataclass(frozen=True)
class GenerationRequest:
    """What a validated body asks for."""

    prompt_ids: list[int]
    params: SamplingParams
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    echo: str = ""
    continues_prompt: bool = False  # plain completion: the text goes on from the prompt exactly; chat trims its start


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
        self.defaults = model.checkpoint.generation  # unset sampling values follow the model, as transformers does

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
        params = sampling_params(
            self.defaults,
            max_new_tokens=max_tokens or default_max_tokens or self.model.max_seq_len,
            temperature=_number(body, "temperature", None, 0, 2),
            top_p=_number(body, "top_p", None, 0, 1, low_open=True),
            top_k=_number(body, "top_k", None, 0, 1 << 30, integer=True),
            repetition_penalty=_number(body, "repetition_penalty", None, 0, 10, low_open=True),
            seed=_number(body, "seed", None, 0, MAX_SEED, integer=True),
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
            raise self._too_long(f"{len(prompt_ids)}", param)
        return prompt_ids

    def _encode(self, text: str, param: str, add_special_tokens: bool) -> list[int]:
        """The text's token ids; a text that cannot fit the context however it tokenizes is refused unread."""
        fewest = self.model.tokenizer.fewest_tokens(text)
        if fewest >= self.model.max_seq_len:
            raise self._too_long(f"at least {fewest}", param)
        return self._fit(self.model.tokenizer.encode(text, add_special_tokens=add_special_tokens), param)

    def _too_long(self, count: str, param: str) -> ApiError:
        return ApiError(400, f"This model's context holds {self.model.max_seq_len} tokens but the prompt has "
                             f"{count}: shorten the {param}", param=param, code="context_length_exceeded")

    def chat(self, body: dict) -> GenerationRequest:
        # an answer without max_tokens gets a quarter of the context, as in the window and `cakep2p chat`
        default_max_tokens = default_max_new_tokens(self.model.max_seq_len)
        params, stops, stream, include_usage = self._common(body, CHAT_ARGS, default_max_tokens)
        tokenizer = self.model.tokenizer
        try:
            text = tokenizer.apply_chat_template(_messages(body), add_generation_prompt=True)
        except CakeError as error:
            raise ApiError(400, str(error), param="messages", code="invalid_messages") from None
        prompt_ids = self._encode(text, "messages", add_special_tokens=False)
        return GenerationRequest(prompt_ids, params, stops, stream, include_usage)

    def completion(self, body: dict) -> GenerationRequest:
        params, stops, stream, include_usage = self._common(body, COMPLETION_ARGS, 16)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = self._encode(prompt, "prompt", add_special_tokens=True)
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



def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_body(raw: bytes) -> dict:
    """The JSON object a request carries (NaN and Infinity refused, and text that is no valid Unicode, such as a
    lone surrogate escape); ApiError 400 otherwise."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except ValueError as error:
        raise ApiError(400, f"The body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The body must be a JSON object", code="invalid_json")
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "The body holds text that is not valid Unicode (a lone surrogate \\ud800-\\udfff "
                            "escape): send UTF-8 text", code="invalid_unicode") from None
    return body
