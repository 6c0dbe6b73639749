"""The ``/v1`` routes (chat completions, models, feedback) and ``/health``, as a FastAPI app.

The Gradio app is mounted on this app at ``/`` (`supportlm.serve.ui.server`), so the model is
loaded once and both speak through the same `Assistant`: the same input caps, admission layer
(concurrency, waiting line, per-client rate limits), PII-safe storage and adapter switching.

Streaming follows OpenAI's chat-completion chunks as llama.cpp's and vLLM's servers send them:
the first delta carries the role, every chunk the same id, the last choice chunk its
``finish_reason``, then (with ``stream_options.include_usage``) a usage chunk with no choices,
then ``data: [DONE]``; a failure mid-stream is an error event followed by ``[DONE]``.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse

from supportlm.engines.base import EngineError, GenerationSettings
from supportlm.errors import SupportLMError
from supportlm.serve.admission import Busy, QueueFull
from supportlm.serve.answer import Answer
from supportlm.serve.assistant import Assistant
from supportlm.serve.info import public_name
from supportlm.serve.v1.access import ApiAccess
from supportlm.serve.v1.schema import (
    ApiError,
    ChatCompletionRequest,
    chunk,
    completion,
    finish_reason,
    now,
    parse_chat_request,
)

logger = logging.getLogger(__name__)

TUNED_MODEL = "supportlm"
BASE_MODEL = "supportlm-base"
DEFAULTS = GenerationSettings()


def _error_response(error: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    if error.status in (429, 503):  # when a polite client may try again (RFC 9110 10.2.3)
        headers = {"Retry-After": "1"}
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def as_api_error(error: BaseException) -> ApiError:
    """Any failure as the OpenAI error it is; unexpected ones are logged under a reference."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, EngineError):
        return ApiError(502, str(error), type="server_error", code="upstream_error")
    if isinstance(error, QueueFull):
        return ApiError(503, str(error), type="server_error", code="server_overloaded")
    if isinstance(error, Busy):
        return ApiError(429, str(error), type="rate_limit_error", code="rate_limit_exceeded")
    if isinstance(error, SupportLMError):
        return ApiError(400, str(error))
    reference = uuid.uuid4().hex[:8]
    logger.error("Generation failed (reference %s)", reference, exc_info=error)
    return ApiError(
        500, f"The model failed to answer; please retry (reference {reference}).",
        type="server_error", code="internal_error",
    )  # fmt: skip


def _sse(body: dict[str, Any] | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


class ChatCompletions:
    """The API of one `Assistant`: each public method is one route."""

    def __init__(self, assistant: Assistant) -> None:
        self.assistant = assistant
        settings = assistant.settings
        self.access = ApiAccess(settings, assistant.logins)
        self.max_body = settings.max_upload_bytes
        self.store = settings.api_store
        # Requests waiting for a slot each hold a worker thread; their own pool keeps them from
        # starving the Gradio app's threads.
        self.threads = anyio.CapacityLimiter(settings.concurrency + settings.max_queue + 2)

    def models(self) -> dict[str, bool]:
        """The served model ids, tuned first, each mapped to whether it uses the adapter."""
        tuned = {TUNED_MODEL: True} if self.assistant.engine.has_adapter else {}
        return {**tuned, BASE_MODEL: False}

    async def _call(self, function, *args):
        return await anyio.to_thread.run_sync(function, *args, limiter=self.threads)

    async def _json(self, request: Request) -> Any:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            raise ApiError(
                413, f"The request is larger than {self.max_body} bytes.", code="too_large"
            )
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > self.max_body:
                raise ApiError(
                    413, f"The request is larger than {self.max_body} bytes.", code="too_large"
                )
        try:
            return json.loads(body)
        except ValueError as error:
            raise ApiError(400, f"The request body is not valid JSON: {error}.") from error

    def _caller(self, request: Request) -> str | None:
        return self.access.check(request.headers, request.client.host if request.client else None)

    async def list_models(self, request: Request) -> Response:
        try:
            self._caller(request)
        except ApiError as error:
            return _error_response(error)
        engine, plan = self.assistant.engine, self.assistant.plan
        adapter = engine.adapter
        cards = [
            {
                "id": model, "object": "model", "created": 0, "owned_by": "supportlm",
                "root": public_name(plan.model), "parent": BASE_MODEL if use_adapter else None,
                "adapter_version": adapter.version if use_adapter and adapter else None,
            }
            for model, use_adapter in self.models().items()
        ]  # fmt: skip
        return JSONResponse({"object": "list", "data": cards})

    async def create(self, request: Request) -> Response:
        try:
            caller = self._caller(request)
            self.assistant.admission.precheck(caller)  # before the body is read or tokenised
            parsed = parse_chat_request(await self._json(request), self.models(), DEFAULTS)
            events = await self._call(self._start, parsed, caller)
            first = await self._call(next, events, None)
        except Exception as error:  # each failure becomes its OpenAI error
            return _error_response(as_api_error(error))
        for notice in first.notices:  # no place for them in OpenAI's format: to the log
            logger.info("API request changed: %s", notice)
        completion_id = first.reply_id  # what /v1/feedback takes back, as is
        if parsed.stream:
            reply = self._stream(completion_id, parsed, first, events)
            return StreamingResponse(reply, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        try:
            last = await self._call(_last, first, events)
        except Exception as error:
            return _error_response(as_api_error(error))
        return JSONResponse(completion(completion_id, parsed.model, now(), last.event))

    def _start(self, parsed: ChatCompletionRequest, caller: str | None) -> Iterator[Answer]:
        return self.assistant.answer(
            parsed.message, parsed.history, parsed.settings, system_prompt=parsed.system_prompt,
            use_adapter=parsed.use_adapter, client_id=caller, store=self.store,
        )  # fmt: skip

    async def _stream(
        self, completion_id: str, parsed: ChatCompletionRequest, answer: Answer | None,
        answers: Iterator[Answer],
    ) -> AsyncIterator[str]:  # fmt: skip
        created, sent = now(), ""

        def piece(delta=None, finish=None, usage=None) -> str:
            return _sse(chunk(completion_id, parsed.model, created, delta, finish, usage))

        try:
            yield piece({"role": "assistant", "content": ""})
            while answer is not None:
                event = answer.event
                delta = event.text[len(sent) :] if event.text.startswith(sent) else ""
                sent += delta
                if event.finished:
                    yield piece({"content": delta} if delta else {}, finish_reason(event))
                    if parsed.include_usage:
                        yield piece(usage=event.usage)
                    break
                if delta:
                    yield piece({"content": delta})
                answer = await self._call(next, answers, None)
            yield _sse("[DONE]")
        except Exception as error:  # told to the client, then the stream ends
            yield _sse(as_api_error(error).body())
            yield _sse("[DONE]")
        finally:  # the client left or the reply ended: stop the model, free the slot
            with anyio.CancelScope(shield=True):
                await self._call(answers.close)

    async def feedback(self, request: Request) -> Response:
        """``{"id": completion id, "rating": "like"|"dislike", "correction": text}``."""
        try:
            caller = self._caller(request)
            body = await self._json(request)
            if not isinstance(body, dict) or not isinstance(body.get("id"), str):
                raise ApiError(
                    400, "Send {'id': completion id, 'rating' or 'correction'}.", param="id"
                )
            kind, correction = _feedback_kind(body)
            row = await self._call(lambda: self.assistant.record_feedback(
                kind, body["id"], corrected_answer=correction, client_id=caller))  # fmt: skip
        except Exception as error:
            return _error_response(as_api_error(error))
        return JSONResponse({"id": body["id"], "object": "feedback", "row": row})

    async def health(self, request: Request) -> Response:
        """``{"status": "ok"}`` for anyone (a load balancer needs no key); what serves and the
        load only for a caller who passes the app's access check (`ApiAccess`)."""
        if self.access.required:
            try:
                self._caller(request)
            except ApiError:
                return JSONResponse({"status": "ok"})
        engine, admission = self.assistant.engine, self.assistant.admission
        return JSONResponse({
            "status": "ok", "engine": engine.name,
            "adapter_version": engine.adapter.version if engine.adapter else None,
            "running": admission.running, "waiting": admission.waiting,
        })  # fmt: skip


def _feedback_kind(body: dict[str, Any]) -> tuple[str, str | None]:
    correction = body.get("correction")
    if correction is not None:
        if not isinstance(correction, str) or not correction.strip():
            raise ApiError(
                400, "correction must be the corrected answer's text.", param="correction"
            )
        return "correction", correction
    rating = body.get("rating")
    if rating not in ("like", "dislike"):
        raise ApiError(
            400, "rating must be 'like' or 'dislike' (or send a correction).", param="rating"
        )
    return rating, None


def _last(first: Answer, events: Iterator[Answer]) -> Answer:
    last = first
    for last in events:  # noqa: B007 (the last event is the whole reply)
        pass
    return last


def create_api(assistant: Assistant) -> FastAPI:
    """The FastAPI app with ``/v1`` and ``/health``; CORS only for the configured origins."""
    api = ChatCompletions(assistant)
    app = FastAPI(title="supportlm", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_api_route("/v1/chat/completions", api.create, methods=["POST"])
    app.add_api_route("/v1/models", api.list_models, methods=["GET"])
    app.add_api_route("/v1/feedback", api.feedback, methods=["POST"])
    app.add_api_route("/health", api.health, methods=["GET"])
    origins = assistant.settings.cors_origins_list()
    if origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )  # fmt: skip
    app.state.chat_completions = api
    return app
