"""`OpenAIEngine`: generation on a remote OpenAI-compatible server (the scale-out path).

vLLM (``--enable-lora --lora-modules supportlm=…``), TGI, llama.cpp's server, Ollama or another
supportlm's ``/v1`` serve the model; this engine sends them *chat messages*, since a remote
server applies the chat template and tokenises by itself. That is why every message's text has
its special-token strings broken up first (`neutralize_special_tokens`): a user who types
``<|im_start|>system`` must not open a system turn on the server, as `encode_chat` already
guarantees locally. The local tokenizer still caps inputs and fits the context.

The official ``openai`` client streams (``stream_options.include_usage`` gives the server's token
counts), times out, and its errors become one-sentence `SupportLMError`s.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from supportlm.engines.base import (
    AdapterRef,
    Engine,
    EngineError,
    EventClock,
    GenerationRequest,
    StreamEvent,
)
from supportlm.errors import SupportLMError
from supportlm.prompts import neutralize_special_tokens

if TYPE_CHECKING:
    from supportlm.engines.registry import EngineOptions

logger = logging.getLogger(__name__)


class RemoteError(EngineError):
    """The remote server failed or did not answer in time (a 502/504 for API callers)."""


class OpenAIEngine(Engine):
    """A remote server's tuned model (served as the adapter) and base model, behind `Engine`."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        tokenizer: Any,
        *,
        tuned_model: str | None,
        base_model: str,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        context_length: int = 2048,
        max_concurrency: int = 4,
    ) -> None:
        super().__init__()
        import openai  # the scale-out path only

        self._openai = openai
        self.client = openai.OpenAI(
            base_url=base_url, api_key=api_key or "none", timeout=timeout_s, max_retries=0
        )
        self.base_url, self.timeout_s = base_url, timeout_s
        self.tokenizer, self.context_length = tokenizer, context_length
        self.tuned_model, self.base_model = tuned_model, base_model
        self.max_concurrency = max_concurrency
        self.adapter = AdapterRef(tuned_model, f"remote:{tuned_model}") if tuned_model else None
        tuned = f"tuned model {tuned_model!r}, " if tuned_model else ""
        # The page header and About show the description: no URL (it may carry a password, and
        # names an internal host). The log names the host.
        self.description = f"remote OpenAI-compatible server ({tuned}base {base_model!r})"
        logger.info("Remote engine at %s", urlsplit(base_url).hostname)

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        settings = request.settings
        messages = [
            {"role": m["role"], "content": neutralize_special_tokens(m["content"], self.tokenizer)}
            for m in request.messages
        ]
        body: dict[str, Any] = {
            "model": self.tuned_model if request.adapter else self.base_model,
            "messages": messages,
            "max_tokens": settings.max_new_tokens,
            "temperature": settings.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if settings.do_sample:
            body["top_p"] = settings.top_p
        if settings.seed is not None:
            body["seed"] = settings.seed
        if settings.stop:
            body["stop"] = list(settings.stop)
        if settings.repetition_penalty != 1.0:  # vLLM's and supportlm's extension field
            body["extra_body"] = {"repetition_penalty": settings.repetition_penalty}
        return body

    def _stream(
        self, request: GenerationRequest, stop_event: threading.Event
    ) -> Iterator[StreamEvent]:
        clock = EventClock(request.request_id, len(request.prompt_ids))
        text, pieces, finish, usage = "", 0, None, None
        try:
            with self.client.chat.completions.create(**self._body(request)) as stream:
                for chunk in stream:
                    if stop_event.is_set():
                        finish = "cancelled"
                        break
                    usage = chunk.usage or usage
                    for choice in chunk.choices:
                        finish = choice.finish_reason or finish
                        if choice.delta.content:
                            clock.first_token()
                            text, pieces = text + choice.delta.content, pieces + 1
                            yield clock.event(text, pieces)
        except self._openai.APITimeoutError as error:
            raise RemoteError(
                f"The remote model server did not answer within {self.timeout_s:g} s."
            ) from error
        except self._openai.APIError as error:
            raise RemoteError(f"The remote model server failed: {_reason(error)}") from error
        if finish is None:
            # A complete reply always names why it ended; llama_cpp.server, for one, ends a
            # stream with a bare [DONE] when another request interrupts it.
            raise RemoteError(
                "The remote model server ended the reply before finishing it (no finish_reason); "
                "llama_cpp.server does this when a new request arrives, unless started with "
                "--interrupt_requests False."
            )
        if usage is not None:
            clock.prompt_tokens = usage.prompt_tokens
            pieces = usage.completion_tokens
        reason = finish if finish in ("length", "cancelled") else "stop"
        yield clock.event(text, pieces, reason)

    def close(self) -> None:
        self.client.close()


def _reason(error: Exception) -> str:
    """The server's own message when it sent an OpenAI error object, else the exception's."""
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        body = body.get("error", body)
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    return str(error)


def build(options: EngineOptions) -> OpenAIEngine:
    """The registry's builder: the remote server's models; the local tokenizer (the same
    model's) caps and counts."""
    url = options.setting("openai_base_url", None)
    if not url:
        raise SupportLMError("SUPPORTLM_BACKEND=openai needs SUPPORTLM_OPENAI_BASE_URL.")
    # An empty variable reads as unset (the default), so 'none' is how a user says "no tuned model".
    tuned = options.setting("openai_model", "supportlm") or ""
    tuned = None if tuned.strip().lower() in ("", "none") else tuned
    return OpenAIEngine(
        url,
        options.tokenizer(),
        tuned_model=tuned,
        base_model=options.setting("openai_base_model", None) or tuned or "default",
        api_key=options.setting("openai_api_key", None),
        timeout_s=options.setting("openai_timeout_s", 60.0),
        context_length=options.context_length,
        max_concurrency=options.concurrency,
    )
