"""Summarisation and translation of long customer-service texts on top of any `Engine`.

Summaries use map-reduce when a text does not fit the context window: the text is cut into token
chunks with overlap (at paragraph or sentence boundaries where possible), each chunk is
summarised, and the partial summaries are summarised again (recursively while still too long).
Only the final step is streamed to the user.

Translations go paragraph by paragraph, short neighbouring paragraphs grouped up to a token
budget. Placeholders (``{{Order Number}}``), URLs, e-mail addresses and numbers are swapped for
short numbered markers (``{{P1}}``) before the model sees the text and swapped back afterwards.
The output is then *checked*, because a small model does not reliably copy anything:

1. A group must come back with one line per input line and every protected span on its line;
   otherwise each of its lines is translated again on its own.
2. A single line whose translation lost a protected span gets the span appended (a deterministic
   repair: the span survives even when the model dropped it), and multi-line output for a single
   line is joined with spaces.

The line structure (line breaks, blank lines, indentation) is rebuilt from the input rather than
taken from the model, so it always survives.
"""

from __future__ import annotations

import collections
import itertools
import math
import re
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field, replace

from transformers import PreTrainedTokenizerBase

from supportlm.engines.base import Engine, EventClock, GenerationSettings, StreamEvent
from supportlm.errors import SupportLMError
from supportlm.prompts import (
    DEFAULT_SYSTEM_PROMPT,
    encode_chat,
    summarize_messages,
    translate_messages,
)
from supportlm.serve.redaction import EMAIL_PATTERN

#: `progress(fraction, description)`; the UI passes a `gr.Progress`.
ProgressCallback = Callable[[float, str], None]

#: Share of a summary chunk repeated at the start of the next one, so that a sentence cut by a
#: chunk boundary is seen whole at least once.
SUMMARY_OVERLAP = 0.1
#: Tokens kept free in every prompt: a text tokenised inside the chat template can merge
#: differently at its edges than on its own.
PROMPT_MARGIN_TOKENS = 8

_PLACEHOLDER = r"\{\{[^{}\n]*\}\}"
_PROTECTED = re.compile(
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
_MARKER = re.compile(r"\{+\s*[Pp](\d+)\s*\}+")
_UNFINISHED_MARKER = re.compile(r"\{+\s*(?:[Pp]\d*\s*)?\}?$")
_SENTENCE_END = re.compile(r"[.!?…。！？][\"'”’)\]]*$")


def count_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """How many tokens `text` takes inside a prompt (no special tokens added)."""
    return len(_encode(tokenizer, text)["input_ids"])


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, offsets: bool = False):
    return tokenizer(
        text,
        add_special_tokens=False,
        split_special_tokens=True,
        return_offsets_mapping=offsets,
    )


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


def _split_spans(
    tokenizer: PreTrainedTokenizerBase, text: str, chunk_tokens: int, overlap_tokens: int
) -> list[tuple[int, int]]:
    """Character spans of the chunks of `text` (see `split_by_tokens`).

    Without overlap the spans tile the text exactly: each starts where the previous one ends.
    """
    if chunk_tokens < 1:
        raise ValueError("chunk_tokens must be at least 1.")
    if not 0 <= overlap_tokens < chunk_tokens:
        raise ValueError("overlap_tokens must be at least 0 and smaller than chunk_tokens.")
    offsets = _encode(tokenizer, text, offsets=True)["offset_mapping"]
    n = len(offsets)
    if n <= chunk_tokens:
        return [(0, len(text))]

    def char_position(token_index: int) -> int:
        if token_index == 0:
            return 0
        return len(text) if token_index >= n else offsets[token_index][0]

    protected = [m.span() for m in _PROTECTED.finditer(text)]

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
    spans = _split_spans(tokenizer, text, chunk_tokens, overlap_tokens)
    return [text[start:end] for start, end in spans]


def protect_spans(text: str) -> tuple[str, list[str]]:
    """Swap placeholders, URLs, e-mail addresses and numbers for markers ``{{P1}}``, ``{{P2}}``…

    Returns the masked text and the protected spans; marker ``{{Pi}}`` stands for
    ``spans[i - 1]``. Markers look like the placeholders the translation instruction asks the
    model to keep; with a letter in them SmolLM2-135M copies them far more often than ``{{1}}``
    or ``[1]``, which it tends to turn into bare numbers.
    """
    spans: list[str] = []

    def mask(match: re.Match[str]) -> str:
        spans.append(match.group())
        return f"{{{{P{len(spans)}}}}}"

    return _PROTECTED.sub(mask, text), spans


def restore_spans(text: str, spans: list[str]) -> str:
    """Swap the markers of `protect_spans` back; markers the model invented are dropped."""

    def unmask(match: re.Match[str]) -> str:
        index = int(match.group(1))
        return spans[index - 1] if 1 <= index <= len(spans) else ""

    return _MARKER.sub(unmask, text)


def _missing_spans(text: str, spans: list[str]) -> list[str]:
    """The protected spans (with multiplicity) that do not occur in `text`."""
    missing = []
    for span, needed in collections.Counter(spans).items():
        missing += [span] * max(0, needed - text.count(span))
    return missing


@dataclass
class _Usage:
    """Token counts and timings over every model call of one task."""

    clock: EventClock = field(default_factory=EventClock)
    num_tokens: int = 0
    truncated: bool = False

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


def _run(
    engine: Engine,
    prompt_ids: list[int],
    settings: GenerationSettings,
    usage: _Usage,
    stop_event: threading.Event | None,
) -> Iterator[tuple[StreamEvent, float]]:
    """Stream one model call, recording its usage once it finishes."""
    call_start = time.perf_counter()
    for event in engine.stream(engine.request(prompt_ids, settings), stop_event=stop_event):
        if event.finished:
            usage.add(event, call_start)
        yield event, call_start


def _stopped(stop_event: threading.Event | None) -> bool:
    return stop_event is not None and stop_event.is_set()


class _Progress:
    """Forwards to the caller's `progress`, never letting the fraction go backwards."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback
        self.fraction = 0.0

    def __call__(self, fraction: float, description: str) -> None:
        self.fraction = min(max(fraction, self.fraction), 1.0)
        if self.callback is not None:
            self.callback(self.fraction, description)


# --- summarisation -------------------------------------------------------------------------------


def summarize(
    engine: Engine,
    text: str,
    style: str,
    settings: GenerationSettings,
    *,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    progress: ProgressCallback | None = None,
    stop_event: threading.Event | None = None,
) -> Iterator[StreamEvent]:
    """Summarise `text` in `style` (a key of `supportlm.prompts.SUMMARY_STYLES`), streaming.

    A text that fits the context window (minus `settings.max_new_tokens`) is summarised in one
    call. A longer one is cut into overlapping chunks that are summarised one by one; their
    summaries are then summarised together, recursively while still too long. While the chunks
    are being summarised the events carry an empty text (`progress` reports which chunk); the
    final summary is streamed. `num_tokens` and the timings cover every model call.

    Raises `SupportLMError` for an empty text, an unknown style, or a `max_new_tokens` that
    leaves no room for the text; these are checked before the first event.
    """
    if not text.strip():
        raise SupportLMError("There is no text to summarise.")
    overhead = len(encode_chat(engine.tokenizer, summarize_messages("", style, system_prompt)))
    text_budget = engine.context_length - settings.max_new_tokens - overhead - PROMPT_MARGIN_TOKENS
    if text_budget < 16:
        raise SupportLMError(
            f"max_new_tokens={settings.max_new_tokens} leaves no room for the text in the "
            f"model's {engine.context_length}-token context; lower it."
        )
    return _summarize(
        engine, text, style, settings, system_prompt, text_budget, progress, stop_event
    )


def _summarize(
    engine: Engine,
    text: str,
    style: str,
    settings: GenerationSettings,
    system_prompt: str,
    text_budget: int,
    progress: ProgressCallback | None,
    stop_event: threading.Event | None,
) -> Iterator[StreamEvent]:
    tokenizer = engine.tokenizer
    usage = _Usage()
    report = _Progress(progress)

    def prompt(part: str) -> list[int]:
        return encode_chat(tokenizer, summarize_messages(part, style, system_prompt))

    def fits(part: str) -> bool:
        return len(prompt(part)) + settings.max_new_tokens <= engine.context_length

    level = 0
    while not fits(text):
        level += 1
        chunks = split_by_tokens(
            tokenizer,
            text,
            chunk_tokens=text_budget,
            overlap_tokens=int(text_budget * SUMMARY_OVERLAP),
        )
        summaries = []
        for index, chunk in enumerate(chunks):
            report(
                index / (len(chunks) + 1),
                f"Summarising part {index + 1} of {len(chunks)}"
                + (f" (round {level})" if level > 1 else ""),
            )
            final, _ = collections.deque(
                _run(engine, prompt(chunk), settings, usage, stop_event), maxlen=1
            ).pop()
            if _stopped(stop_event):
                yield usage.event("", finish_reason="cancelled")
                return
            summaries.append(final.text.strip())
            yield usage.event("")
        combined = "\n\n".join(summary for summary in summaries if summary)
        if count_tokens(tokenizer, combined) >= count_tokens(tokenizer, text):
            # The model did not shorten anything (it can echo its input): keep the head of each
            # partial summary so the final call fits instead of recursing forever.
            share = max(1, text_budget // max(1, len(summaries)) - 2)
            combined = "\n\n".join(
                tokenizer.decode(_encode(tokenizer, summary)["input_ids"][:share])
                for summary in summaries
            )
        text = combined

    report(report.fraction if level else 0.0, "Writing the summary")
    final = None
    for final, call_start in _run(engine, prompt(text), settings, usage, stop_event):
        if not final.finished:
            yield usage.event(final.text, final, call_start)
    assert final is not None
    yield usage.event(final.text, finish_reason=final.finish_reason or "stop")


# --- translation ---------------------------------------------------------------------------------


@dataclass
class _Unit:
    """One line of the input (or one piece of an over-long line) that the model translates."""

    text: str
    paragraph: int


@dataclass
class _Layout:
    """The input split into units and the literal text around them (newlines, indentation)."""

    pieces: list[str | int]  # literal text, or the index of a unit
    units: list[_Unit]

    def render(self, translations: dict[int, str], before_unit: int) -> str:
        """The output up to (not including) unit `before_unit`."""
        parts = []
        for piece in self.pieces:
            if isinstance(piece, int):
                if piece >= before_unit:
                    break
                parts.append(translations[piece])
            else:
                parts.append(piece)
        return "".join(parts)


def _layout(tokenizer: PreTrainedTokenizerBase, text: str, unit_tokens: int) -> _Layout:
    pieces: list[str | int] = []
    units: list[_Unit] = []
    paragraph = 0
    previous_blank = False
    for line_number, line in enumerate(text.split("\n")):
        if line_number:
            pieces.append("\n")
        core = line.strip()
        if not core:
            pieces.append(line)
            previous_blank = True
            continue
        if previous_blank:
            paragraph += 1
        previous_blank = False
        offset = len(line) - len(line.lstrip())
        spans = [(0, len(core))]
        if count_tokens(tokenizer, core) > unit_tokens:
            spans = _split_spans(tokenizer, core, unit_tokens, 0)
        pieces.append(line[:offset])
        for start, end in spans:
            piece = core[start:end]
            stripped = piece.strip()
            lead = piece[: len(piece) - len(piece.lstrip())]
            trail = piece[len(lead) + len(stripped) :]
            if lead:
                pieces.append(lead)
            pieces.append(len(units))
            units.append(_Unit(stripped, paragraph))
            if trail:
                pieces.append(trail)
        pieces.append(line[offset + len(core) :])
    return _Layout([piece for piece in pieces if piece != ""], units)


def _segments(
    tokenizer: PreTrainedTokenizerBase, units: list[_Unit], indices: list[int], budget: int
) -> list[list[int]]:
    """The unit `indices`, in order, grouped up to `budget` tokens per group."""
    segments: list[list[int]] = []
    used = 0
    for index in indices:
        size = count_tokens(tokenizer, units[index].text) + 2  # + the line breaks between units
        if segments and used + size <= budget:
            segments[-1].append(index)
            used += size
        else:
            segments.append([index])
            used = size
    return segments


def _needs_model(masked: str) -> bool:
    """Whether anything but markers, punctuation and symbols is left to translate."""
    return any(char.isalpha() for char in _MARKER.sub("", masked))


def translate(
    engine: Engine,
    text: str,
    target_language: str,
    settings: GenerationSettings,
    *,
    source_language: str = "auto",
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    progress: ProgressCallback | None = None,
    stop_event: threading.Event | None = None,
) -> Iterator[StreamEvent]:
    """Translate `text` into `target_language`, streaming the translation so far.

    Groups of short paragraphs (up to about half of `settings.max_new_tokens` tokens) are
    translated in one call each; lines longer than that are cut at sentence boundaries. Line
    breaks, blank lines, placeholders, URLs, e-mail addresses and numbers survive (see the module
    docstring for how). `num_tokens` and the timings cover every model call.

    Raises `SupportLMError` for an empty text or an unknown language before the first event.
    """
    if not text.strip():
        raise SupportLMError("There is no text to translate.")
    overhead = len(
        encode_chat(
            engine.tokenizer,
            translate_messages("", target_language, source_language, system_prompt),
        )
    )
    room = engine.context_length - overhead - PROMPT_MARGIN_TOKENS
    budget = min(max(16, settings.max_new_tokens // 2), room - settings.max_new_tokens)
    if budget < 8:
        raise SupportLMError(
            f"max_new_tokens={settings.max_new_tokens} leaves no room for the text in the "
            f"model's {engine.context_length}-token context; lower it."
        )
    return _translate(
        engine,
        text,
        target_language,
        settings,
        source_language,
        system_prompt,
        budget,
        progress,
        stop_event,
    )


def _translate(
    engine: Engine,
    text: str,
    target_language: str,
    settings: GenerationSettings,
    source_language: str,
    system_prompt: str,
    budget: int,
    progress: ProgressCallback | None,
    stop_event: threading.Event | None,
) -> Iterator[StreamEvent]:
    tokenizer = engine.tokenizer
    usage = _Usage()
    report = _Progress(progress)
    layout = _layout(tokenizer, text, budget)
    translations: dict[int, str] = {}
    to_translate = []
    for index, unit in enumerate(layout.units):
        if _needs_model(protect_spans(unit.text)[0]):
            to_translate.append(index)
        else:  # only names of things, numbers and punctuation: nothing to translate
            translations[index] = unit.text
    segments = _segments(tokenizer, layout.units, to_translate, budget)

    def call(source: str, shown_before: str) -> Generator[StreamEvent, None, str]:
        """Stream one translation call; returns the output with the protected spans restored."""
        masked, spans = protect_spans(source)
        prompt_ids = encode_chat(
            tokenizer, translate_messages(masked, target_language, source_language, system_prompt)
        )
        # A translation is rarely much longer than its source; the cap stops a small model that
        # rambles on after the translation from using the whole `max_new_tokens` for each call.
        call_settings = replace(
            settings,
            max_new_tokens=min(settings.max_new_tokens, 4 * count_tokens(tokenizer, masked) + 16),
        )
        output = ""
        for event, call_start in _run(engine, prompt_ids, call_settings, usage, stop_event):
            # A marker cut off by the token limit (or still being written) is not shown.
            output = _UNFINISHED_MARKER.sub("", restore_spans(event.text, spans))
            if not event.finished:
                yield usage.event(shown_before + output, event, call_start)
        return output

    def translate_alone(index: int) -> Generator[StreamEvent, None, None]:
        source = layout.units[index].text
        output = yield from call(source, layout.render(translations, index))
        line = " ".join(part.strip() for part in output.splitlines() if part.strip())
        if _stopped(stop_event):  # keep what the user saw; a cut-off line is not repaired
            translations[index] = line
            return
        # The deterministic repair: a span the model dropped is appended to its line.
        missing = _missing_spans(line, protect_spans(source)[1])
        translations[index] = " ".join([line, *missing]).strip()

    def first_untranslated() -> int:
        return next(
            (i for i in range(len(layout.units)) if i not in translations), len(layout.units)
        )

    for number, segment in enumerate(segments):
        report(number / len(segments), f"Translating part {number + 1} of {len(segments)}")
        if len(segment) == 1:
            yield from translate_alone(segment[0])
        else:
            source = layout.units[segment[0]].text
            for previous, index in itertools.pairwise(segment):
                same = layout.units[previous].paragraph == layout.units[index].paragraph
                source += ("\n" if same else "\n\n") + layout.units[index].text
            output = yield from call(source, layout.render(translations, segment[0]))
            lines = [line.strip() for line in output.splitlines() if line.strip()]
            if len(lines) == len(segment) and not any(
                _missing_spans(line, protect_spans(layout.units[index].text)[1])
                for line, index in zip(lines, segment, strict=True)
            ):
                translations.update(zip(segment, lines, strict=True))
            else:  # retry line by line, where the repair above applies
                for index in segment:
                    if _stopped(stop_event):
                        break
                    yield from translate_alone(index)
        if _stopped(stop_event):
            yield usage.event(
                layout.render(translations, first_untranslated()), finish_reason="cancelled"
            )
            return
    report(1.0, "Translated")
    yield usage.event(
        layout.render(translations, len(layout.units)),
        finish_reason="length" if usage.truncated else "stop",
    )
