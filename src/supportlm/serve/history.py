"""Conversations as the UI and the API hand them over, turned into plain chat messages."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase


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
        if message.get("role") not in {"user", "assistant"}:
            continue
        metadata = message.get("metadata") or {}
        if metadata.get("title"):  # tool or thought bubbles are UI, not conversation
            continue
        messages.append({"role": message["role"], "content": message_text(message["content"])})
    return messages


def cap_text(
    text: str, tokenizer: PreTrainedTokenizerBase, max_chars: int, max_tokens: int
) -> tuple[str, str | None]:
    """Cut `text` to `max_chars` characters and `max_tokens` tokens; the notice says so."""
    notice = None
    if len(text) > max_chars:
        text = text[:max_chars]
        notice = f"The input was cut to its first {max_chars} characters."
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if len(ids) > max_tokens:
        text = tokenizer.decode(ids[:max_tokens])
        notice = f"The input was cut to its first {max_tokens} tokens."
    return text, notice
