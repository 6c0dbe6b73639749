"""Summaries of long customer-service texts: token chunks with overlap, map-reduce.

A text that does not fit the context window is cut into token chunks with overlap (at paragraph
or sentence boundaries where possible), each chunk is summarised, and the partial summaries are
summarised again (recursively while still too long). Only the final step is streamed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from supportlm.engines.base import Engine, GenerationSettings, StreamEvent, final_event
from supportlm.errors import SupportLMError
from supportlm.prompts import DEFAULT_SYSTEM_PROMPT, encode_chat, summarize_messages
from supportlm.serve.tasks.common import (
    PROMPT_MARGIN_TOKENS,
    Progress,
    ProgressCallback,
    TaskCall,
    Usage,
    count_tokens,
    encode,
    run_call,
    split_by_tokens,
    split_spans,
    stopped,
)

#: Share of a summary chunk repeated at the start of the next one, so that a sentence cut by a
#: chunk boundary is seen whole at least once.
SUMMARY_OVERLAP = 0.1

#: What the task does to a text, for the assistant's "Please paste or upload the text to ...".
VERB = "summarise"


def run(call: TaskCall, text: str, style: str = "paragraph") -> Iterator[StreamEvent]:
    """The assistant's entry point (`Assistant.run_task`): `summarize` with the call's limits."""
    return summarize(
        call.engine,
        text,
        style,
        call.settings,
        system_prompt=call.system_prompt,
        progress=call.progress,
        stop_event=call.stop_event,
        max_calls=call.max_calls,
    )


def summarize(
    engine: Engine,
    text: str,
    style: str,
    settings: GenerationSettings,
    *,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    progress: ProgressCallback | None = None,
    stop_event: threading.Event | None = None,
    max_calls: int | None = None,
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
    usage = Usage(max_calls=max_calls)
    overlap = int(text_budget * SUMMARY_OVERLAP)
    chunks = len(split_spans(engine.tokenizer, text, text_budget, overlap))
    usage.check_plan(chunks + 1 if chunks > 1 else 1, "summarise it")
    return _summarize(
        engine, text, style, settings, system_prompt, text_budget, progress, stop_event, usage
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
    usage: Usage,
) -> Iterator[StreamEvent]:
    tokenizer = engine.tokenizer
    report = Progress(progress)

    def messages(part: str) -> list[dict[str, str]]:
        return summarize_messages(part, style, system_prompt)

    def prompt(part: str) -> list[int]:
        return encode_chat(tokenizer, messages(part))

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
            calls = run_call(engine, messages(chunk), settings, usage, stop_event)
            final = final_event(event for event, _ in calls)
            if stopped(stop_event):
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
                tokenizer.decode(encode(tokenizer, summary)["input_ids"][:share])
                for summary in summaries
            )
        text = combined

    report(report.fraction if level else 0.0, "Writing the summary")
    final = None
    for final, call_start in run_call(engine, messages(text), settings, usage, stop_event):
        if not final.finished:
            yield usage.event(final.text, final, call_start)
    assert final is not None
    yield usage.event(final.text, finish_reason=final.finish_reason or "stop")
