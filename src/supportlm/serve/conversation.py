"""A customer's message and conversation so far, made into a prompt the engine can take.

Every part is capped (message, history, system prompt), the newest turns that fit the context
are kept, and the newest message's intent is detected (`supportlm.serve.handover`); each change
made to what the user sent becomes a notice they are shown.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from supportlm.engines.base import GenerationSettings
from supportlm.errors import SupportLMError
from supportlm.prompts import fit_messages, with_system_prompt
from supportlm.serve.handover import IntentRouter, Routing
from supportlm.serve.history import cap_history, cap_text
from supportlm.serve.settings import AppSettings


@dataclass
class ChatRequest:
    """Chat messages ready for the engine, with notices for the user about what was changed."""

    messages: list[dict[str, str]]
    notices: list[str]
    #: The newest message's intent and whether a person takes it over (None: no classifier).
    routing: Routing | None = None


def build_chat_request(
    message: str,
    history: Sequence[Mapping[str, Any]] | None,
    system_prompt: str,
    settings: GenerationSettings,
    *,
    tokenizer: Any,
    limits: AppSettings,
    context_length: int,
    router: IntentRouter | None = None,
) -> ChatRequest:
    """Cap every part, add the system prompt, keep the newest turns that fit the context."""
    if not isinstance(message, str) or not message.strip():
        raise SupportLMError("Please type a message.")
    message, notice = cap_text(message, tokenizer, limits.max_input_chars, limits.max_input_tokens)
    history_messages, notices = cap_history(
        history, limits.max_history_messages, limits.max_input_chars
    )
    notices = [notice, *notices] if notice else notices
    if len(system_prompt) > limits.max_system_prompt_chars:
        system_prompt = system_prompt[: limits.max_system_prompt_chars]
        notices.append(
            f"The system prompt was cut to its first {limits.max_system_prompt_chars} characters."
        )
    conversation = [*history_messages, {"role": "user", "content": message}]
    messages = with_system_prompt(conversation, system_prompt)
    budget = context_length - settings.max_new_tokens
    if budget < 1:
        raise SupportLMError(
            f"max_new_tokens ({settings.max_new_tokens}) leaves no room for the prompt in the "
            f"{context_length}-token context."
        )
    fitted = fit_messages(tokenizer, messages, budget)
    if len(fitted) < len(messages):
        notices.append("The oldest turns were left out to fit the model's context window.")
    routing = router.route(message) if router is not None else None
    if routing is not None and routing.notice:
        notices.append(routing.notice)
    return ChatRequest(fitted, notices, routing)
