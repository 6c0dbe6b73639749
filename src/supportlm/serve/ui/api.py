"""The documented API endpoints (for `gradio_client`): ``/chat``, ``/summarize``, ``/translate``.

Plain functions registered with `gr.api`, so their contract stays simple whatever the UI shows:
``/chat`` streams the reply text, ``/summarize`` and ``/translate`` stream strings.
"""

from __future__ import annotations

from collections.abc import Iterator

import gradio as gr

from supportlm.serve.assistant import Assistant
from supportlm.serve.ui.chat import chat_events
from supportlm.serve.ui.common import DEFAULTS, generation_settings, gpu, user_facing
from supportlm.serve.ui.summarise import summary_events
from supportlm.serve.ui.translate import translation_events


def _texts(updates: Iterator[tuple]) -> Iterator[str]:
    """The texts of (text, ...) updates, each new one once (API streams)."""
    last = None
    for text, *_ in user_facing(updates):
        if text != last:
            last = text
            yield text
    if last is None:
        yield ""


def register_api(assistant: Assistant) -> None:
    default_prompt = assistant.system_prompt

    @gpu
    def chat(
        message: str,
        history: list[dict] | None = None,
        system_prompt: str = default_prompt,
        temperature: float = DEFAULTS.temperature,
        top_p: float = DEFAULTS.top_p,
        max_new_tokens: int = DEFAULTS.max_new_tokens,
        repetition_penalty: float = DEFAULTS.repetition_penalty,
    ) -> Iterator[str]:
        """Answer `message` given the earlier `history` (role/content dicts); streams text."""
        settings = generation_settings(
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            repetition_penalty=repetition_penalty,
        )
        yield from _texts(chat_events(assistant, message, history, system_prompt, settings))

    @gpu
    def summarize(text: str, style: str = "paragraph", max_new_tokens: int = 192) -> Iterator[str]:
        """Summarise `text`: style is paragraph, bullets or action_items; streams text."""
        settings = generation_settings(max_new_tokens=max_new_tokens, temperature=0.0)
        yield from _texts(summary_events(assistant, text, style, settings))

    @gpu
    def translate(
        text: str,
        target_language: str = "French",
        source_language: str = "auto",
        max_new_tokens: int = 384,
    ) -> Iterator[str]:
        """Translate `text` into `target_language` (source auto-detected by default)."""
        settings = generation_settings(max_new_tokens=max_new_tokens, temperature=0.0)
        yield from _texts(
            translation_events(assistant, text, target_language, source_language, settings)
        )

    gr.api(chat, api_name="chat")
    gr.api(summarize, api_name="summarize")
    gr.api(translate, api_name="translate")
