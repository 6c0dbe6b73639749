"""Conversations as the UI and the API hand them over, turned into plain chat messages."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from supportlm.errors import SupportLMError
from supportlm.prompts import tokenize_text


def message_text(content: Any) -> str:
    """The text of a chat message's content in any of Gradio's shapes (str, parts, dict)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    if isinstance(content, Sequence):
        return "".join(message_text(part) for part in content)
    return ""


def plain_messages(history: Sequence[Mapping[str, Any]] | None) -> list[dict[str, str]]:
    """``{"role", "content": str}`` messages from a Gradio history (files and metadata dropped)."""
    messages = []
    for message in history or []:
        if not isinstance(message, Mapping):
            raise SupportLMError("Each history message must be a {role, content} object.")
        if message.get("role") not in {"user", "assistant"}:
            continue
        metadata = message.get("metadata") or {}
        if metadata.get("title"):  # tool or thought bubbles are UI, not conversation
            continue
        messages.append({"role": message["role"], "content": message_text(message.get("content"))})
    return messages


def cap_text(
    text: str, tokenizer: PreTrainedTokenizerBase, max_chars: int, max_tokens: int
) -> tuple[str, str | None]:
    """Cut `text` to `max_chars` characters and `max_tokens` tokens; the notice says so."""
    notice = None
    if len(text) > max_chars:
        text = text[:max_chars]
        notice = f"The input was cut to its first {max_chars} characters."
    ids = tokenize_text(tokenizer, text)["input_ids"]
    if len(ids) > max_tokens:
        text = tokenizer.decode(ids[:max_tokens])
        notice = f"The input was cut to its first {max_tokens} tokens."
    return text, notice


def cap_history(
    history: Sequence[Mapping[str, Any]] | None, max_messages: int, max_chars: int
) -> tuple[list[dict[str, str]], list[str]]:
    """The newest `max_messages` plain messages, each cut to `max_chars`; notices say what changed.

    Only the kept messages are read, so a 10,000-turn history costs as much as a short one.
    """
    if (history is not None and not isinstance(history, Sequence)) or isinstance(history, str):
        raise SupportLMError("The history must be a list of {role, content} messages.")
    history = list(history or [])
    notices = []
    if len(history) > max_messages:
        history = history[-max_messages:]
        notices.append(f"Only the newest {max_messages} messages of the conversation were used.")
    messages = plain_messages(history)
    if any(len(m["content"]) > max_chars for m in messages):
        messages = [{**m, "content": m["content"][:max_chars]} for m in messages]
        notices.append(f"Earlier messages were cut to their first {max_chars} characters.")
    return messages, notices
