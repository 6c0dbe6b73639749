"""What every tab shares: generation controls, user-facing errors, notices, the GPU hook."""

from __future__ import annotations

import functools
import importlib.util
import logging
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr

from supportlm.engines.base import GenerationSettings, StreamEvent
from supportlm.errors import SupportLMError
from supportlm.serve.answer import Answer
from supportlm.serve.identity import conversation_id
from supportlm.serve.settings import AppSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

DEFAULTS = GenerationSettings()


def gpu(function: F) -> F:
    """`spaces.GPU` on Hugging Face ZeroGPU Spaces (where `spaces` is installed), else as is."""
    if importlib.util.find_spec("spaces") is None:
        return function
    import spaces

    return spaces.GPU(function)


def generation_settings(**values: Any) -> GenerationSettings:
    """`GenerationSettings` from widget values; an invalid value is a message, not a crash."""
    try:
        return GenerationSettings(**values)
    except (SupportLMError, TypeError, ValueError) as error:
        raise gr.Error(str(error)) from error


def user_errors(function: F) -> F:
    """A handler whose `SupportLMError` is shown to the user as a `gr.Error` message."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except SupportLMError as error:
            raise gr.Error(str(error)) from error

    return wrapper  # type: ignore[return-value]


def user_facing(events: Iterator[T]) -> Iterator[T]:
    """Turn a failure inside generation into a message for the user instead of a dead request.

    The engine recovers on its own (its lock and thread are released), so the next request works.
    """
    try:
        yield from events
    except gr.Error:
        raise
    except SupportLMError as error:
        raise gr.Error(str(error)) from error
    except Exception as error:
        # The detail (exception text, server paths) goes to the log only; the user gets a
        # reference to quote, which the log line carries too.
        reference = uuid.uuid4().hex[:8]
        logger.exception("Generation failed (reference %s)", reference)
        raise gr.Error(
            f"Sorry, the model failed to answer. Please try again (reference {reference})."
        ) from error


def notify(notices: list[str]) -> str:
    """Show each notice as a toast; return them as Markdown for the caption."""
    for notice in notices:
        gr.Warning(notice)
    return "".join(f"⚠️ {notice}  \n" for notice in notices)


def caption(event: StreamEvent, notices: str = "") -> str:
    return f"{notices}<small>{event.caption()}</small>"


def shown(answers: Iterator[Answer], extra: str = "") -> Iterator[tuple[str, str, Answer]]:
    """(text so far, caption, answer) of a streamed `Answer`: its notices become toasts (once)
    and the caption's first lines, `extra` follows the timings."""
    notices = None
    for answer in user_facing(answers):
        if notices is None:
            notices = notify(list(answer.notices))
        yield answer.text, caption(answer.event, notices) + extra, answer


def client_id(request: gr.Request | None, settings: AppSettings) -> str | None:
    """Who is asking, for per-client rate limits: the signed-in user, else the client's address.

    Every handler that generates or writes calls it, so it is also where a required Hugging Face
    sign-in (``SUPPORTLM_HF_OAUTH=1`` on a Space with ``hf_oauth: true``) is enforced.
    """
    user = signed_in_user(request)
    if user is None and settings.hf_oauth:
        raise gr.Error("Please sign in with Hugging Face first (the button at the top).")
    if user is not None:
        return f"user:{user}"
    if request is None or request.client is None:
        return None
    return request.client.host


def signed_in_user(request: gr.Request | None) -> str | None:
    """The user signed in by ``SUPPORTLM_AUTH`` (launch auth) or Hugging Face OAuth, if any."""
    if request is None:
        return None
    if getattr(request, "username", None):
        return request.username
    try:  # the session exists only when Gradio installed its OAuth middleware
        info = request.request.session.get("oauth_info")  # type: ignore[union-attr]
    except (AttributeError, AssertionError):
        return None
    return ((info or {}).get("userinfo") or {}).get("preferred_username")


def session_id(request: gr.Request | None, settings: AppSettings) -> str | None:
    """The conversation id stored with this browser session's replies (for erasure): issued by
    the server from Gradio's client-chosen session hash (`supportlm.serve.identity`)."""
    return conversation_id(getattr(request, "session_hash", None), settings.secret)


def read_upload(path: Path, max_bytes: int) -> str:
    """An uploaded text file's contents, read once and bounded; the upload is deleted after.

    Binary files (a NUL byte, or not UTF-8) and files over `max_bytes` are refused with a
    message; Gradio's ``max_file_size`` refuses larger ones before they are even stored, and
    `supportlm.serve.ui.guard` refuses non-text uploads as they arrive.
    """
    try:
        return check_text_file(path, max_bytes)
    finally:
        path.unlink(missing_ok=True)  # nothing a visitor uploads stays on the server


def check_text_file(path: Path, max_bytes: int) -> str:
    """The file's text; raises `SupportLMError` for a binary, non-UTF-8 or too large file."""
    with path.open("rb") as file:
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise SupportLMError(f"The file is larger than {max_bytes // 1000} kB; upload less.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise SupportLMError("That file is not UTF-8 text; upload a .txt or .md file.") from error
    if "\x00" in text:
        raise SupportLMError("That file is binary, not text; upload a .txt or .md file.")
    return text


def max_reply_tokens(context_length: int, max_input_tokens: int) -> int:
    """The largest reply the sliders offer: what the context leaves after a full input."""
    return max(16, min(1024, context_length - max_input_tokens - 64))


def max_new_tokens_slider(maximum: int, default: int, **kwargs: Any) -> gr.Slider:
    return gr.Slider(16, maximum, min(default, maximum), step=16, label="Max new tokens", **kwargs)


class GenerationControls:
    """The chat tab's decoding sliders and system prompt; `settings` reads them in one place."""

    def __init__(self, system_prompt: str, max_reply: int) -> None:
        self.system_prompt = gr.Textbox(system_prompt, label="System prompt", lines=3)
        self.temperature = gr.Slider(
            0.0, 1.5, DEFAULTS.temperature, step=0.05, label="Temperature (0 = greedy)"
        )
        self.top_p = gr.Slider(0.05, 1.0, DEFAULTS.top_p, step=0.05, label="Top-p")
        self.max_new_tokens = max_new_tokens_slider(max_reply, DEFAULTS.max_new_tokens)
        self.repetition_penalty = gr.Slider(
            1.0, 2.0, DEFAULTS.repetition_penalty, step=0.05, label="Repetition penalty"
        )

    @property
    def inputs(self) -> list[gr.components.Component]:
        return [
            self.system_prompt,
            self.temperature,
            self.top_p,
            self.max_new_tokens,
            self.repetition_penalty,
        ]

    @staticmethod
    def read(values: tuple[Any, ...]) -> tuple[str, GenerationSettings]:
        """(system prompt, settings) from the values of `inputs`, in their order."""
        prompt, temperature, top_p, max_new_tokens, repetition_penalty = values
        settings = generation_settings(
            temperature=float(temperature),
            top_p=float(top_p),
            max_new_tokens=int(max_new_tokens),
            repetition_penalty=float(repetition_penalty),
        )
        return prompt, settings
