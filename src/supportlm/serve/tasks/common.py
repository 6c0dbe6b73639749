"""What summarising and translating share: token counting and cutting, usage, progress."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import re2  # linear-time matching: these patterns run on user text (see redaction)
from transformers import PreTrainedTokenizerBase

from supportlm.engines.base import Engine, EventClock, GenerationSettings, StreamEvent
from supportlm.errors import SupportLMError
from supportlm.feedback.redaction import EMAIL_PATTERN
from supportlm.prompts import DEFAULT_SYSTEM_PROMPT, tokenize_text

_PLACEHOLDER = r"\{\{[^{}\n]*\}\}"
PROTECTED = re2.compile(
    "|".join(
        [
            _PLACEHOLDER,
            # URLs, without trailing punctuation that belongs to the sentence.
            r"(?:https?://|www\.)[^\s<>\"'{}]*[^\s<>\"'{}.,;:!?)\]]",
            EMAIL_PATTERN,
            # Numbers with their inner separators: prices, dates, times, order and phone numbers.
            r"[+#]?\d+(?:[.,:/\-]\d+)*",
        ]
    )
)
# Lenient: small models add spaces or braces around markers ("{{{P1}}}") and change case.
_SENTENCE_END = re2.compile(r"[.!?…。！？][\"'”’)\]]*$")

#: `progress(fraction, description)`; the UI passes a `gr.Progress`.
ProgressCallback = Callable[[float, str], None]


@dataclass(frozen=True)
class TaskCall:
    """What a task module's ``run(call, text, **options)`` gets from the assistant: the engine
    of this run's slot, the decoding settings, and the run's limits and signals."""

    engine: Engine
    settings: GenerationSettings
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    progress: ProgressCallback | None = None
    stop_event: threading.Event | None = None
    max_calls: int | None = None


#: Tokens kept free in every prompt: a text tokenised inside the chat template can merge
#: differently at its edges than on its own.
PROMPT_MARGIN_TOKENS = 8


def count_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """How many tokens `text` takes inside a prompt (no special tokens added)."""
    return len(encode(tokenizer, text)["input_ids"])


def encode(tokenizer: PreTrainedTokenizerBase, text: str, offsets: bool = False):
    return tokenize_text(tokenizer, text, offsets=offsets)


def _boundary_strength(text: str, position: int) -> int:
    """How good a place `position` is to cut `text`: paragraph 4, line 3, sentence 2, word 1."""
    before = text[:position].rstrip(" \t")
    at_space = position == len(text) or text[position].isspace()
    if before.endswith("\n\n"):
        return 4
    if before.endswith("\n"):
        return 3
    if _SENTENCE_END.search(before) and at_space:
        return 2
    if at_space or text[position - 1].isspace():
        return 1
    return 0


def split_spans(
    tokenizer: PreTrainedTokenizerBase, text: str, chunk_tokens: int, overlap_tokens: int
) -> list[tuple[int, int]]:
    """Character spans of the chunks of `text` (see `split_by_tokens`).

    Without overlap the spans tile the text exactly: each starts where the previous one ends.
    """
    if chunk_tokens < 1:
        raise ValueError("chunk_tokens must be at least 1.")
    if not 0 <= overlap_tokens < chunk_tokens:
        raise ValueError("overlap_tokens must be at least 0 and smaller than chunk_tokens.")
    offsets = encode(tokenizer, text, offsets=True)["offset_mapping"]
    n = len(offsets)
    if n <= chunk_tokens:
        return [(0, len(text))]

    def char_position(token_index: int) -> int:
        if token_index == 0:
            return 0
        return len(text) if token_index >= n else offsets[token_index][0]

    protected = [m.span() for m in PROTECTED.finditer(text)]

    def can_cut(token_index: int) -> bool:
        if token_index in (0, n):
            return True
        position = offsets[token_index][0]
        # Byte-level tokens of one multi-byte character share their offsets: never cut between.
        if position < offsets[token_index - 1][1]:
            return False
        return not any(start < position < end for start, end in protected)

    spans = []
    start = 0
    while True:
        if n - start <= chunk_tokens:
            spans.append((char_position(start), len(text)))
            return spans
        limit = start + chunk_tokens
        # Aim for chunks of equal size, so the last one is not a scrap of a few tokens.
        remaining = n - start
        count = math.ceil((remaining - overlap_tokens) / (chunk_tokens - overlap_tokens))
        target = start + math.ceil((remaining + (count - 1) * overlap_tokens) / count)
        # The strongest boundary in the window wins, the one nearest the target on ties.
        candidates = [i for i in range(start + max(1, chunk_tokens // 2), limit + 1) if can_cut(i)]
        if not candidates:  # e.g. one placeholder longer than the window: cut right after it
            candidates = [next(i for i in range(limit + 1, n + 1) if can_cut(i))]
        end = max(
            candidates, key=lambda i: (_boundary_strength(text, char_position(i)), -abs(i - target))
        )
        spans.append((char_position(start), char_position(end)))
        if overlap_tokens == 0:
            start = end
            continue
        # The overlap starts at the earliest sentence start within its window (the longest
        # overlap that does not begin mid-sentence), else at the earliest allowed token.
        window = [i for i in range(max(start + 1, end - overlap_tokens), end) if can_cut(i)]
        sentence_starts = [i for i in window if _boundary_strength(text, char_position(i)) > 1]
        start = (sentence_starts or window or [end])[0]


def split_by_tokens(
    tokenizer: PreTrainedTokenizerBase, text: str, *, chunk_tokens: int, overlap_tokens: int
) -> list[str]:
    """Split `text` into chunks of at most about `chunk_tokens` tokens, overlapping by up to
    `overlap_tokens` tokens.

    Each chunk is an exact substring of `text`. Cuts prefer, within the second half of each
    window, a paragraph break, then a line break, then a sentence end, then a space; they never
    fall inside a ``{{placeholder}}``, URL, e-mail address or number (one longer than a whole
    window makes that chunk longer).
    """
    spans = split_spans(tokenizer, text, chunk_tokens, overlap_tokens)
    return [text[start:end] for start, end in spans]


@dataclass
class Usage:
    """Token counts and timings over every model call of one task."""

    clock: EventClock = field(default_factory=EventClock)
    num_tokens: int = 0
    truncated: bool = False
    #: The request's model-call budget (None: unlimited) and the calls made so far.
    max_calls: int | None = None
    calls: int = 0

    def remaining(self) -> float:
        return math.inf if self.max_calls is None else self.max_calls - self.calls

    def check_plan(self, planned: int, what: str) -> None:
        """Refuse before the first call a task that would need more calls than its budget."""
        if planned > self.remaining():
            raise SupportLMError(
                f"This text needs {planned} model calls to {what}; at most {self.max_calls} are "
                "allowed per request. Please send a shorter text, or split it."
            )

    def spend(self) -> None:
        """Count one model call; the budget is a hard limit, whatever a task planned."""
        if self.remaining() < 1:
            raise SupportLMError(
                f"This request used its {self.max_calls} model calls; please send a shorter text."
            )
        self.calls += 1

    def add(self, final: StreamEvent, call_start: float) -> None:
        self.num_tokens += final.num_tokens
        self.truncated = self.truncated or final.finish_reason == "length"
        self._first_token(final, call_start)

    def _first_token(self, event: StreamEvent, call_start: float) -> None:
        if event.time_to_first_token is not None:
            self.clock.first_token(call_start + event.time_to_first_token)

    def event(
        self,
        text: str,
        running: StreamEvent | None = None,
        call_start: float = 0.0,
        *,
        finish_reason: str | None = None,
    ) -> StreamEvent:
        num_tokens = self.num_tokens
        if running is not None:
            num_tokens += running.num_tokens
            self._first_token(running, call_start)
        return self.clock.event(text, num_tokens, finish_reason)


def run_call(
    engine: Engine,
    messages: list[dict[str, str]],
    settings: GenerationSettings,
    usage: Usage,
    stop_event: threading.Event | None,
) -> Iterator[tuple[StreamEvent, float]]:
    """Stream one model call on the chat `messages`, recording its usage once it finishes."""
    usage.spend()
    call_start = time.perf_counter()
    request = engine.request(messages, settings)
    for event in engine.stream(request, stop_event=stop_event):
        if event.finished:
            usage.add(event, call_start)
        yield event, call_start


def stopped(stop_event: threading.Event | None) -> bool:
    return stop_event is not None and stop_event.is_set()


class Progress:
    """Forwards to the caller's `progress`, never letting the fraction go backwards."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback
        self.fraction = 0.0

    def __call__(self, fraction: float, description: str) -> None:
        self.fraction = min(max(fraction, self.fraction), 1.0)
        if self.callback is not None:
            self.callback(self.fraction, description)
