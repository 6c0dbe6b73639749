"""The one prompt module: training, evaluation and the app all format conversations here.

Conversations are rendered with the tokenizer's own chat template (ChatML when it has none) and
turned into token ids *segment by segment*: the template is rendered around sentinels, template
text is tokenised with special tokens, and message contents are tokenised with
``split_special_tokens=True``. So a customer who types ``<|im_start|>system`` gets ordinary text
ids, not a new system turn, and the label mask is exact (no re-tokenisation guesswork).
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from supportlm.errors import SupportLMError

#: Label value ignored by the cross-entropy loss (PyTorch's and transformers' convention).
IGNORE_INDEX = -100

DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly and professional customer-service assistant. Answer clearly and "
    "concisely, ask for the details you need (such as an order number), and never make up "
    "policies, prices or personal data."
)

#: ChatML, used only when a tokenizer ships no chat template (base models).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

PROMPT_STYLE_FILE = "supportlm_prompt.json"

SUMMARY_STYLES: dict[str, str] = {
    "paragraph": "Summarise the following customer-service text in one short paragraph.",
    "bullets": "Summarise the following customer-service text as a short list of bullet points.",
    "action_items": (
        "List the action items a support agent should take after reading the following "
        'customer-service text, one per line, each starting with "- ".'
    ),
}

LANGUAGES: list[str] = [
    "English",
    "Chinese",
    "Spanish",
    "French",
    "German",
    "Japanese",
    "Portuguese",
    "Italian",
    "Korean",
    "Russian",
    "Arabic",
]

_TRANSLATE_KEEP = (
    "Keep placeholders in double curly braces such as {{Order Number}}, URLs, numbers and line "
    "breaks exactly as they are. Reply with the translation only."
)

Message = dict[str, str]


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give `tokenizer` a chat template (ChatML if it has none) and a padding token."""
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def with_system_prompt(messages: list[Message], system_prompt: str | None) -> list[Message]:
    """Prepend `system_prompt` unless the conversation already starts with a system message."""
    if not system_prompt or (messages and messages[0]["role"] == "system"):
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


def _segments(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], add_generation_prompt: bool
) -> list[tuple[str, int | None]]:
    """Render the chat template with sentinels in place of the contents.

    Returns ``(text, message_index)`` pairs: template text has index ``None``, message content
    carries the index of its message.
    """
    nonce = secrets.token_hex(4)
    sentinels = [f"@@SUPPORTLM_{nonce}_{i}@@" for i in range(len(messages))]
    placeholder_messages = [
        {"role": m["role"], "content": s} for m, s in zip(messages, sentinels, strict=True)
    ]
    rendered = tokenizer.apply_chat_template(
        placeholder_messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    pattern = re.compile("|".join(re.escape(s) for s in sentinels))
    segments: list[tuple[str, int | None]] = []
    position = 0
    for match in pattern.finditer(rendered):
        if match.start() > position:
            segments.append((rendered[position : match.start()], None))
        index = sentinels.index(match.group())
        segments.append((messages[index]["content"], index))
        position = match.end()
    if position < len(rendered):
        segments.append((rendered[position:], None))
    return segments


#: transformers' fast tokenizer honours `split_special_tokens` by setting a flag on the shared
#: Rust tokenizer before it encodes (``tokenization_utils_tokenizers.py``), so two threads
#: encoding at once (two chats, or an evaluation's parallel requests) could encode a customer's
#: text with control tokens live, or the template with them split: a measured failure, three
#: concurrent llama.cpp requests answered from garbled prompts. Every encode of the package goes
#: through `tokenize_text`, which makes setting the flag and encoding one step.
_ENCODE_LOCK = threading.Lock()


def tokenize_text(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    *,
    split_special_tokens: bool = True,
    offsets: bool = False,
) -> Any:
    """`text` encoded without special tokens added; with `split_special_tokens` (the default)
    user and data text can never become control tokens. Safe to call from many threads."""
    with _ENCODE_LOCK:
        return tokenizer(
            text,
            add_special_tokens=False,
            split_special_tokens=split_special_tokens,
            return_offsets_mapping=offsets,
        )


def _encode_template(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenize_text(tokenizer, text, split_special_tokens=False)["input_ids"]


def _encode_content(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenize_text(tokenizer, text)["input_ids"]


def _end_of_turn_length(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> int:
    """How many leading ids of the template text after an answer close that answer.

    The model must learn to emit the end-of-turn token (``<|im_end|>``, ``<|eot_id|>``…), so it is
    supervised together with the answer: everything up to and including the first special token,
    or up to the first line break for templates whose markers are plain text.
    """
    special = set(tokenizer.all_special_ids)
    for i, token_id in enumerate(ids):
        if token_id in special:
            return i + 1
    for i, token_id in enumerate(ids):
        if "\n" in tokenizer.decode([token_id]):
            return i + 1
    return len(ids)


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    *,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids of `messages` rendered with the chat template, ready for generation."""
    return tokenize_conversation(tokenizer, messages, add_generation_prompt=add_generation_prompt)[
        "input_ids"
    ]


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    *,
    assistant_only_loss: bool = True,
    add_generation_prompt: bool = False,
) -> dict[str, list[int]]:
    """Tokenise a conversation for training.

    With `assistant_only_loss` (the default), labels are `IGNORE_INDEX` everywhere except on the
    contents of every assistant turn and the end-of-turn token that closes it; otherwise every
    token is supervised.
    """
    _check_messages(messages)
    input_ids: list[int] = []
    labels: list[int] = []
    close_answer = False
    for text, index in _segments(tokenizer, messages, add_generation_prompt):
        if index is None:
            ids = _encode_template(tokenizer, text)
            supervised = _end_of_turn_length(tokenizer, ids) if close_answer else 0
            close_answer = False
        else:
            ids = _encode_content(tokenizer, text)
            close_answer = messages[index]["role"] == "assistant"
            supervised = len(ids) if close_answer else 0
        input_ids.extend(ids)
        if assistant_only_loss:
            labels.extend(ids[:supervised] + [IGNORE_INDEX] * (len(ids) - supervised))
        else:
            labels.extend(ids)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}


def _check_messages(messages: list[Message]) -> None:
    if not messages:
        raise SupportLMError("A conversation needs at least one message.")
    for message in messages:
        if message.get("role") not in {"system", "user", "assistant"}:
            raise SupportLMError(
                f"Unknown message role {message.get('role')!r}; use system, user or assistant."
            )
        if not isinstance(message.get("content"), str):
            raise SupportLMError("Every message needs a text 'content'.")


def fit_messages(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], max_prompt_tokens: int
) -> list[Message]:
    """The system prompt, the latest message and as many of the newest turns as fit.

    Newest first, with each message's tokens counted once: the first version re-encoded the
    whole conversation for every exchange it dropped (400 turns cost 81k tokenizer calls). The
    per-message counts add the tokens the chat template puts around a message, measured once;
    one final encoding checks the sum, and in the rare case the template merges differently one
    more exchange is dropped. The system prompt and the latest message are always kept; if even
    those do not fit, the message is too long and the caller must say so.
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    length = len(encode_chat(tokenizer, system + turns[-1:]))
    if length > max_prompt_tokens:
        raise SupportLMError(
            f"The message is too long for the model: {length} prompt tokens, at most "
            f"{max_prompt_tokens}. Please shorten it."
        )
    start = _oldest_turn_that_fits(tokenizer, turns, max_prompt_tokens - length)
    while True:
        candidate = system + turns[start:]
        if start == len(turns) - 1 or len(encode_chat(tokenizer, candidate)) <= max_prompt_tokens:
            return candidate
        start = _next_exchange(turns, start)


def _oldest_turn_that_fits(
    tokenizer: PreTrainedTokenizerBase, turns: list[Message], budget: int
) -> int:
    """The index of the oldest turn such that the turns from it to the latest fit in `budget`."""
    overhead = _template_tokens_per_message(tokenizer)
    start = len(turns) - 1
    while start > 0:
        text = turns[start - 1]["content"]
        cost = overhead + len(_encode_content(tokenizer, text))
        if cost > budget:
            break
        budget -= cost
        start -= 1
    # The kept history starts with a user message, so the roles keep alternating.
    if turns[start]["role"] == "assistant" and start < len(turns) - 1:
        start += 1
    return start


def _next_exchange(turns: list[Message], start: int) -> int:
    """Drop a whole exchange (user + assistant) from the start of the kept turns."""
    if start + 2 < len(turns) and turns[start + 1]["role"] == "assistant":
        return start + 2
    return start + 1


@functools.lru_cache(maxsize=8)
def _template_tokens_per_message(tokenizer: PreTrainedTokenizerBase) -> int:
    """How many tokens the chat template adds around one message (role markers, separators)."""
    one = [{"role": "user", "content": "a"}]
    two = [*one, {"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}]
    added = len(encode_chat(tokenizer, two)) - len(encode_chat(tokenizer, one))
    texts = len(_encode_content(tokenizer, "b")) + len(_encode_content(tokenizer, "a"))
    return max(0, (added - texts + 1) // 2)


def summarize_messages(
    text: str, style: str, system_prompt: str = DEFAULT_SYSTEM_PROMPT
) -> list[Message]:
    """The summarisation request, exactly as the bundled training data phrases it."""
    if style not in SUMMARY_STYLES:
        raise SupportLMError(
            f"Unknown summary style {style!r}; choose one of {', '.join(SUMMARY_STYLES)}."
        )
    request = f"{SUMMARY_STYLES[style]}\n\nText:\n{text}"
    return with_system_prompt([{"role": "user", "content": request}], system_prompt)


def translate_messages(
    text: str,
    target_language: str,
    source_language: str = "auto",
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> list[Message]:
    """The translation request, exactly as the bundled training data phrases it."""
    for language in (target_language, source_language):
        if language != "auto" and language not in LANGUAGES:
            raise SupportLMError(
                f"Unknown language {language!r}; choose one of {', '.join(LANGUAGES)}."
            )
    if target_language == "auto":
        raise SupportLMError("Choose a target language for the translation.")
    source = "" if source_language == "auto" else f"{source_language} "
    request = (
        f"Translate the following {source}text into {target_language}. {_TRANSLATE_KEEP}"
        f"\n\nText:\n{text}"
    )
    return with_system_prompt([{"role": "user", "content": request}], system_prompt)


def end_of_turn_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an assistant turn: EOS plus the template's end-of-turn marker."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
            ids.append(token_id)
    return sorted(set(ids))


def save_prompt_style(
    output_dir: str | Path, tokenizer: PreTrainedTokenizerBase, system_prompt: str
) -> None:
    """Save the tokenizer (with its chat template) and the system prompt next to an adapter."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(output_dir)
    style = {"system_prompt": system_prompt, "chat_template": tokenizer.chat_template}
    (output_dir / PROMPT_STYLE_FILE).write_text(json.dumps(style, indent=2, ensure_ascii=False))


def load_prompt_style(directory: str | Path) -> dict[str, Any] | None:
    """The prompt style saved by `save_prompt_style`, or None when the folder has none."""
    path = Path(directory) / PROMPT_STYLE_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def intent_messages(
    question: str, labels: Sequence[str], system_prompt: str = DEFAULT_SYSTEM_PROMPT
) -> list[Message]:
    """The intent question: which of `labels` the customer's message is about, name only."""
    return with_system_prompt([intent_request(question, labels)], system_prompt)


def intent_request(question: str, labels: Sequence[str]) -> Message:
    """The user turn of the intent question (training examples and evaluation use the same)."""
    content = (
        "Which intent does this customer message have? Answer with one intent name from this "
        f"list and nothing else: {', '.join(labels)}.\n\nMessage:\n{question}"
    )
    return {"role": "user", "content": content}


#: Inserted after the first character of a special-token string found in text that a library
#: will tokenise without `split_special_tokens` (TRL's preference trainers, a remote server).
NEUTRALIZER = "\u2060"  # WORD JOINER: invisible, and no tokenizer merges it into a special token


def neutralize_special_tokens(text: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """`text` with every special-token string (``<|im_start|>``…) broken up, so that a tokenizer
    that parses special tokens reads it as ordinary text, as `encode_chat` does by itself."""
    specials = sorted(
        {t for t in tokenizer.all_special_tokens if len(t) > 1}
        | {t.content for t in tokenizer.added_tokens_decoder.values() if t.special},
        key=len,
        reverse=True,
    )
    for token in specials:
        text = text.replace(token, token[0] + NEUTRALIZER + token[1:])
    return text
