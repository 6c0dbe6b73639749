"""OpenAI chat-completion requests read into supportlm's terms, and OpenAI-shaped replies.

Validation is written here rather than left to pydantic models on the route because every
refusal must be an OpenAI error object naming the field (``{"error": {"message", "type",
"param", "code"}}``), as llama.cpp's and vLLM's servers send; FastAPI's own 422 body is not one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from supportlm.engines.base import GenerationSettings, StreamEvent
from supportlm.serve.history import message_text

#: What this server honours, the one list the refusal of everything else is checked against.
SUPPORTED = {
    "model", "messages", "stream", "stream_options", "temperature", "top_p", "max_tokens",
    "max_completion_tokens", "stop", "seed", "n", "frequency_penalty", "presence_penalty",
    "repetition_penalty", "user", "logprobs",
}  # fmt: skip
ROLES = {"system", "developer", "user", "assistant"}
MAX_STOP_STRINGS = 4


class ApiError(Exception):
    """A refusal with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code,
        )  # fmt: skip

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


@dataclass
class ChatCompletionRequest:
    """A checked request: which served model, the conversation split as the assistant takes it."""

    model: str
    #: Whether `model` is the fine-tuned adapter (decided once, with the model check).
    use_adapter: bool
    message: str
    history: list[dict[str, str]]
    system_prompt: str | None
    settings: GenerationSettings
    stream: bool
    include_usage: bool
    user: str | None


def parse_chat_request(
    body: Any, models: Mapping[str, bool], default_settings: GenerationSettings
) -> ChatCompletionRequest:
    """`body` checked field by field; `models` maps each served model id to "uses the adapter"."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    unsupported = sorted(k for k, v in body.items() if k not in SUPPORTED and v is not None)
    if unsupported:
        raise ApiError(
            400,
            f"Unsupported field(s): {', '.join(unsupported)}. This server answers plain chat "
            f"completions; it supports {', '.join(sorted(SUPPORTED))}.",
            param=unsupported[0],
            code="unsupported_parameter",
        )
    model = body.get("model")
    if model not in models:
        raise ApiError(
            404,
            f"The model {model!r} does not exist; GET /v1/models lists {', '.join(models)}.",
            param="model",
            code="model_not_found",
        )
    message, history, system_prompt = _conversation(body.get("messages"))
    _refuse_unsupported_values(body)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("stream_options", "stream_options must be an object.")
    return ChatCompletionRequest(
        model=model,
        use_adapter=models[model],
        message=message,
        history=history,
        system_prompt=system_prompt,
        settings=_settings(body, default_settings),
        stream=_boolean(body, "stream"),
        include_usage=bool(options.get("include_usage")),
        user=body.get("user") if isinstance(body.get("user"), str) else None,
    )


def _conversation(messages: Any) -> tuple[str, list[dict[str, str]], str | None]:
    """(newest user message, earlier turns, system prompt) from OpenAI ``messages``."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "messages must be a non-empty list of {role, content}.")
    system, turns = [], []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise invalid(
                f"messages[{index}]",
                f"messages[{index}] must be an object whose role is one of {sorted(ROLES)}.",
            )
        content = message.get("content")
        if not isinstance(content, (str, list)):
            raise invalid(f"messages[{index}].content", "content must be a string or text parts.")
        text = message_text(content)
        if message["role"] in {"system", "developer"}:
            system.append(text)
        else:
            turns.append({"role": message["role"], "content": text})
    if not turns or turns[-1]["role"] != "user":
        raise invalid("messages", "messages must end with the user's message.")
    return turns[-1]["content"], turns[:-1], "\n\n".join(system) if system else None


def _refuse_unsupported_values(body: dict[str, Any]) -> None:
    if body.get("n") not in (None, 1):
        raise invalid("n", "Only n=1 is supported: send one request per completion.")
    if body.get("logprobs"):
        raise invalid("logprobs", "logprobs are not supported.")
    for name in ("frequency_penalty", "presence_penalty"):
        # Their additive OpenAI meaning has no exact equivalent in the engines' multiplicative
        # repetition_penalty, so anything but 0 is refused instead of silently changed.
        if _number(body, name, 0.0, -2.0, 2.0) != 0:
            raise invalid(
                name, f"{name} is not supported (use repetition_penalty, e.g. 1.1, instead)."
            )


def _settings(body: dict[str, Any], default: GenerationSettings) -> GenerationSettings:
    tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if tokens is not None and (
        not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1
    ):
        raise invalid(param, f"{param} must be a positive integer.")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise invalid("seed", "seed must be an integer.")
    return GenerationSettings(
        max_new_tokens=tokens or default.max_new_tokens,
        temperature=_number(body, "temperature", default.temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", default.top_p, 1e-9, 1.0),
        repetition_penalty=_number(
            body, "repetition_penalty", default.repetition_penalty, 1e-9, 10.0
        ),
        seed=seed,
        stop=_stop(body.get("stop")),
    )


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(name, f"{name} must be a number.")
    if not low <= value <= high:
        raise invalid(name, f"{name} must be between {low:g} and {high:g}.")
    return float(value)


def _boolean(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise invalid(name, f"{name} must be true or false.")
    return bool(value)


def _stop(stop: Any) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop", "stop must be a non-empty string or a list of them.")
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid("stop", f"At most {MAX_STOP_STRINGS} stop strings.")
    return tuple(stops)


# -- replies ------------------------------------------------------------------------------------


def finish_reason(event: StreamEvent) -> str:
    """OpenAI's finish reasons: "length" at the token limit, else "stop"."""
    return "length" if event.finish_reason == "length" else "stop"


def completion(completion_id: str, model: str, created: int, event: StreamEvent) -> dict[str, Any]:
    """A whole ``chat.completion`` object."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": event.text},
                "finish_reason": finish_reason(event),
                "logprobs": None,
            }
        ],
        "usage": event.usage,
    }


def chunk(
    completion_id: str,
    model: str,
    created: int,
    delta: dict[str, str] | None,
    finish: str | None = None,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One ``chat.completion.chunk``; with `usage` (and no delta) the usage chunk, no choices."""
    choices = [] if delta is None else [
        {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    ]  # fmt: skip
    body = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage
    return body


def now() -> int:
    return int(time.time())
