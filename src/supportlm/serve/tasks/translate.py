"""Translation of customer-service texts on top of any `Engine`, checked and repaired.

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
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass, replace
from typing import Any

import re2  # linear-time matching: these patterns run on user text (see redaction)
from transformers import PreTrainedTokenizerBase

from supportlm.engines.base import Engine, GenerationSettings, StreamEvent
from supportlm.errors import SupportLMError
from supportlm.prompts import DEFAULT_SYSTEM_PROMPT, encode_chat, translate_messages
from supportlm.serve.tasks.common import (
    PROMPT_MARGIN_TOKENS,
    PROTECTED,
    Progress,
    ProgressCallback,
    TaskCall,
    Usage,
    count_tokens,
    run_call,
    split_spans,
    stopped,
)

_MARKER = re2.compile(r"\{+\s*[Pp](\d+)\s*\}+")
_UNFINISHED_MARKER = re2.compile(r"\{+\s*(?:[Pp]\d*\s*)?\}?$")


def protect_spans(text: str) -> tuple[str, list[str]]:
    """Swap placeholders, URLs, e-mail addresses and numbers for markers ``{{P1}}``, ``{{P2}}``…

    Returns the masked text and the protected spans; marker ``{{Pi}}`` stands for
    ``spans[i - 1]``. Markers look like the placeholders the translation instruction asks the
    model to keep; with a letter in them SmolLM2-135M copies them far more often than ``{{1}}``
    or ``[1]``, which it tends to turn into bare numbers.
    """
    spans: list[str] = []

    def mask(match: Any) -> str:
        spans.append(match.group())
        return f"{{{{P{len(spans)}}}}}"

    return PROTECTED.sub(mask, text), spans


def restore_spans(text: str, spans: list[str]) -> str:
    """Swap the markers of `protect_spans` back; markers the model invented are dropped."""

    def unmask(match: Any) -> str:
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
            spans = split_spans(tokenizer, core, unit_tokens, 0)
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


def _spread(lines: list[str], segment: list[int]) -> dict[int, str]:
    """A group's output lines over its units: one each, the surplus joined onto the last."""
    spread = {index: "" for index in segment}
    for index, line in zip(segment, lines, strict=False):
        spread[index] = line
    if len(lines) > len(segment):
        spread[segment[-1]] = " ".join(lines[len(segment) - 1 :])
    return spread


def _needs_model(masked: str) -> bool:
    """Whether anything but markers, punctuation and symbols is left to translate."""
    return any(char.isalpha() for char in _MARKER.sub("", masked))


#: What the task does to a text, for the assistant's "Please paste or upload the text to ...".
VERB = "translate"


def run(
    call: TaskCall, text: str, target_language: str = "French", source_language: str = "auto"
) -> Iterator[StreamEvent]:
    """The assistant's entry point (`Assistant.run_task`): `translate` with the call's limits;
    the translator's own system prompt, not the adapter's (a support agent's persona)."""
    return translate(
        call.engine,
        text,
        target_language,
        call.settings,
        source_language=source_language,
        progress=call.progress,
        stop_event=call.stop_event,
        max_calls=call.max_calls,
    )


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
    max_calls: int | None = None,
) -> Iterator[StreamEvent]:
    """Translate `text` into `target_language`, streaming the translation so far.

    Groups of short paragraphs (up to about half of `settings.max_new_tokens` tokens) are
    translated in one call each; lines longer than that are cut at sentence boundaries. Line
    breaks, blank lines, placeholders, URLs, e-mail addresses and numbers survive (see the module
    docstring for how). `num_tokens` and the timings cover every model call.

    At most `max_calls` model calls are made: a text that needs more is refused before the
    first call, and the line-by-line retries of a merged group stop when the budget runs low.

    Raises `SupportLMError` for an empty text, an unknown language or a text over the call
    budget before the first event.
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
    translation = _Translation(
        engine, text, target_language, settings, source_language, system_prompt, budget, stop_event
    )
    translation.usage.max_calls = max_calls
    translation.usage.check_plan(len(translation.segments), "translate it")
    return translation.run(Progress(progress))


class _Translation:
    """One translation: the layout of the text, what is translated so far, the model calls."""

    def __init__(
        self,
        engine: Engine,
        text: str,
        target_language: str,
        settings: GenerationSettings,
        source_language: str,
        system_prompt: str,
        budget: int,
        stop_event: threading.Event | None,
    ) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.target_language = target_language
        self.source_language = source_language
        self.settings = settings
        self.system_prompt = system_prompt
        self.stop_event = stop_event
        self.usage = Usage()
        self.layout = _layout(self.tokenizer, text, budget)
        self.translations: dict[int, str] = {}
        to_translate = []
        for index, unit in enumerate(self.layout.units):
            if _needs_model(protect_spans(unit.text)[0]):
                to_translate.append(index)
            else:  # only names of things, numbers and punctuation: nothing to translate
                self.translations[index] = unit.text
        self.segments = _segments(self.tokenizer, self.layout.units, to_translate, budget)
        self._segments_left = len(self.segments)

    def call(self, source: str, shown_before: str) -> Generator[StreamEvent, None, str]:
        """Stream one translation call; returns the output with the protected spans restored."""
        masked, spans = protect_spans(source)
        messages = translate_messages(
            masked, self.target_language, self.source_language, self.system_prompt
        )
        # A translation is rarely much longer than its source; the cap stops a small model that
        # rambles on after the translation from using the whole `max_new_tokens` for each call.
        cap = 4 * count_tokens(self.tokenizer, masked) + 16
        call_settings = replace(
            self.settings, max_new_tokens=min(self.settings.max_new_tokens, cap)
        )
        output = ""
        events = run_call(self.engine, messages, call_settings, self.usage, self.stop_event)
        for event, call_start in events:
            # A marker cut off by the token limit (or still being written) is not shown.
            output = _UNFINISHED_MARKER.sub("", restore_spans(event.text, spans))
            if not event.finished:
                yield self.usage.event(shown_before + output, event, call_start)
        return output

    def translate_alone(self, index: int) -> Generator[StreamEvent, None, None]:
        source = self.layout.units[index].text
        output = yield from self.call(source, self.layout.render(self.translations, index))
        line = " ".join(part.strip() for part in output.splitlines() if part.strip())
        if stopped(self.stop_event):  # keep what the user saw; a cut-off line is not repaired
            self.translations[index] = line
            return
        # The deterministic repair: a span the model dropped is appended to its line.
        missing = _missing_spans(line, protect_spans(source)[1])
        self.translations[index] = " ".join([line, *missing]).strip()

    def translate_group(self, segment: list[int]) -> Generator[StreamEvent, None, None]:
        units = self.layout.units
        source = units[segment[0]].text
        for previous, index in itertools.pairwise(segment):
            same = units[previous].paragraph == units[index].paragraph
            source += ("\n" if same else "\n\n") + units[index].text
        output = yield from self.call(source, self.layout.render(self.translations, segment[0]))
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        if len(lines) == len(segment) and not any(
            _missing_spans(line, protect_spans(units[index].text)[1])
            for line, index in zip(lines, segment, strict=True)
        ):
            self.translations.update(zip(segment, lines, strict=True))
            return
        if self.usage.remaining() < len(segment) + self._segments_left:
            # No budget to retry line by line: keep the group's output, spread over its lines.
            self.translations.update(_spread(lines, segment))
            return
        for index in segment:  # retry line by line, where the repair above applies
            if stopped(self.stop_event):
                break
            yield from self.translate_alone(index)

    def first_untranslated(self) -> int:
        units = len(self.layout.units)
        return next((i for i in range(units) if i not in self.translations), units)

    def run(self, report: Progress) -> Iterator[StreamEvent]:
        for number, segment in enumerate(self.segments):
            self._segments_left = len(self.segments) - number - 1
            report(
                number / len(self.segments),
                f"Translating part {number + 1} of {len(self.segments)}",
            )
            if len(segment) == 1:
                yield from self.translate_alone(segment[0])
            else:
                yield from self.translate_group(segment)
            if stopped(self.stop_event):
                shown = self.layout.render(self.translations, self.first_untranslated())
                yield self.usage.event(shown, finish_reason="cancelled")
                return
        report(1.0, "Translated")
        yield self.usage.event(
            self.layout.render(self.translations, len(self.layout.units)),
            finish_reason="length" if self.usage.truncated else "stop",
        )
