import itertools
import re
import threading

import pytest

from supportlm.engines.base import Engine, GenerationSettings, StreamEvent
from supportlm.errors import SupportLMError
from supportlm.modeling import load_tokenizer
from supportlm.serve.tasks.common import count_tokens, split_by_tokens
from supportlm.serve.tasks.summarize import summarize
from supportlm.serve.tasks.translate import protect_spans, restore_spans, translate


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("embedded")


def upper_case(kind: str, text: str) -> str:
    return text.upper()


class FakeEngine(Engine):
    """A deterministic `Engine`: replies `reply(kind, text)` to the text inside the prompt.

    The prompt ids are decoded with the real tokenizer and the text after ``Text:`` is taken out,
    so the tests see exactly what the task sent. The reply is streamed token by token and cut at
    `max_new_tokens`, like a real engine.
    """

    name = "fake"
    description = "fake engine"

    def __init__(self, tokenizer, reply=upper_case, context_length=8192, stop_after_calls=None):
        super().__init__()
        self.tokenizer = tokenizer
        self.reply = reply
        self.context_length = context_length
        self.requests: list[str] = []
        self.prompt_lengths: list[int] = []
        self.max_new_tokens: list[int] = []
        self.stop_after_calls = stop_after_calls

    def _stream(self, request, stop_event):
        prompt_ids, settings = request.prompt_ids, request.settings
        assert len(prompt_ids) + settings.max_new_tokens <= self.context_length
        prompt = self.tokenizer.decode(prompt_ids)
        kind = "translate" if "Translate the following" in prompt else "summarize"
        request = prompt.split("Text:\n", 1)[1].rsplit("<|im_end|>", 1)[0]
        self.requests.append(request)
        self.prompt_lengths.append(len(prompt_ids))
        self.max_new_tokens.append(settings.max_new_tokens)
        if self.stop_after_calls is not None and len(self.requests) >= self.stop_after_calls:
            stop_event.set()
        ids = self.tokenizer(self.reply(kind, request), add_special_tokens=False)["input_ids"]
        reason = "length" if len(ids) > settings.max_new_tokens else "stop"
        ids = ids[: settings.max_new_tokens]
        text = ""
        count = 0
        for count in range(1, len(ids) + 1):
            if stop_event is not None and stop_event.is_set():
                reason = "cancelled"
                break
            text = self.tokenizer.decode(ids[:count])
            yield StreamEvent(text, count, 0.001, 0.001 * count)
        yield StreamEvent(text, count, 0.001, 0.001 * count, finished=True, finish_reason=reason)


def run(events):
    events = list(events)
    assert events and events[-1].finished
    assert not any(event.finished for event in events[:-1])
    return events


# --- tokens and chunks ----------------------------------------------------------------------------


def test_count_tokens_matches_the_tokenizer(tokenizer):
    text = "Where is my order {{Order Number}}?"
    assert count_tokens(tokenizer, text) == len(tokenizer(text, add_special_tokens=False).input_ids)
    assert count_tokens(tokenizer, "") == 0


PARAGRAPHS = [
    f"Paragraph {n}. The customer asked about order {{{{Order Number}}}} and a refund of "
    f"{n}.50 EUR. The agent checked the account and promised an answer within {n} days."
    for n in range(1, 13)
]
LONG_TEXT = "\n\n".join(PARAGRAPHS)


def test_short_text_is_one_chunk(tokenizer):
    assert split_by_tokens(tokenizer, "Short text.", chunk_tokens=50, overlap_tokens=10) == [
        "Short text."
    ]


def test_chunks_tile_the_text_and_cut_at_paragraphs(tokenizer):
    chunks = split_by_tokens(tokenizer, LONG_TEXT, chunk_tokens=100, overlap_tokens=0)
    assert len(chunks) > 3
    assert "".join(chunks) == LONG_TEXT
    for chunk in chunks:
        assert count_tokens(tokenizer, chunk) <= 101
        assert chunk.count("{{") == chunk.count("}}")
    # Each paragraph is ~45 tokens, so every window of 100 contains a paragraph break.
    for chunk in chunks[:-1]:
        assert chunk.rstrip(" ").endswith(("EUR.", "days.", "\n\n", "days.\n"))
    for chunk in chunks[1:]:
        assert chunk.lstrip("\n").startswith("Paragraph")


def test_chunks_overlap(tokenizer):
    chunks = split_by_tokens(tokenizer, LONG_TEXT, chunk_tokens=100, overlap_tokens=30)
    assert len(chunks) > 3
    position = 0
    for previous, chunk in itertools.pairwise(chunks):
        start = LONG_TEXT.index(previous, position)
        next_start = LONG_TEXT.index(chunk, start + 1)
        assert next_start < start + len(previous), "consecutive chunks should overlap"
        # The overlap begins at a sentence, not mid-way.
        assert LONG_TEXT[next_start - 1] in ".\n" and chunk.lstrip()[0].isupper()
        position = start
    assert LONG_TEXT.startswith(chunks[0]) and LONG_TEXT.endswith(chunks[-1])


def test_no_cut_inside_placeholders(tokenizer):
    text = " ".join(["{{Customer Support Phone Number}} is open."] * 40)
    chunks = split_by_tokens(tokenizer, text, chunk_tokens=13, overlap_tokens=0)
    assert "".join(chunks) == text
    for chunk in chunks:
        assert chunk.count("{{") == chunk.count("}}") > 0
        assert re.fullmatch(r"[^{}]*(\{\{[^{}]*\}\}[^{}]*)*", chunk)


def test_no_cut_inside_numbers_urls_or_emails(tokenizer):
    spans = ["03/12/2024", "https://shop.example.com/track?id=42", "help@example.com", "1234567"]
    text = " ".join(f"Refund {span} ok" for span in spans * 6)
    chunks = split_by_tokens(tokenizer, text, chunk_tokens=9, overlap_tokens=0)
    assert len(chunks) > 10 and "".join(chunks) == text
    found = [span for chunk in chunks for span in spans if span in chunk]
    assert len(found) == len(spans) * 6
    cuts = list(itertools.accumulate(len(chunk) for chunk in chunks))[:-1]
    assert all(" " in text[cut - 1 : cut + 1] for cut in cuts), "cuts fall between words"


def test_sentence_boundaries_are_preferred(tokenizer):
    text = " ".join(f"Sentence number {n} has several words in it." for n in range(30))
    chunks = split_by_tokens(tokenizer, text, chunk_tokens=40, overlap_tokens=0)
    assert all(chunk.endswith("it.") for chunk in chunks)


def test_chunks_have_even_sizes(tokenizer):
    text = "word " * 37  # 38 tokens and no boundary to prefer
    sizes = [
        count_tokens(tokenizer, chunk)
        for chunk in split_by_tokens(tokenizer, text, chunk_tokens=16, overlap_tokens=0)
    ]
    assert len(sizes) == 3 and max(sizes) - min(sizes) <= 2


def test_split_rejects_bad_sizes(tokenizer):
    with pytest.raises(ValueError, match="overlap"):
        split_by_tokens(tokenizer, LONG_TEXT, chunk_tokens=10, overlap_tokens=10)
    with pytest.raises(ValueError, match="chunk_tokens"):
        split_by_tokens(tokenizer, LONG_TEXT, chunk_tokens=0, overlap_tokens=0)


# --- protected spans ------------------------------------------------------------------------------


def test_protect_and_restore_spans():
    text = (
        "Order {{Order Number}} of 12.50 EUR (#4521) on 03/12/2024, see "
        "https://shop.example.com/t?id=7. Mail anna.k@example.com."
    )
    masked, spans = protect_spans(text)
    assert masked == "Order {{P1}} of {{P2}} EUR ({{P3}}) on {{P4}}, see {{P5}}. Mail {{P6}}."
    assert spans == [
        "{{Order Number}}",
        "12.50",
        "#4521",
        "03/12/2024",
        "https://shop.example.com/t?id=7",
        "anna.k@example.com",
    ]
    assert restore_spans(masked, spans) == text
    # Markers moved, spaced out or invented by the model.
    restored = restore_spans("{{ P2 }} EUR pour {{{p1}}} {{P9}}", spans)
    assert restored == "12.50 EUR pour {{Order Number}} "


def test_protect_leaves_plain_text_alone():
    assert protect_spans("Hello, how can I help?") == ("Hello, how can I help?", [])


# --- summarisation --------------------------------------------------------------------------------


def topics(kind: str, text: str) -> str:
    """A summariser that keeps only the paragraph numbers it saw: short, and checkable."""
    return " ".join(dict.fromkeys(re.findall(r"Paragraph \d+", text)))


def test_short_text_is_summarised_in_one_streamed_call(tokenizer):
    engine = FakeEngine(tokenizer)
    progress = []
    events = run(
        summarize(
            engine,
            "The parcel arrived broken.",
            "bullets",
            GenerationSettings(max_new_tokens=32),
            progress=lambda fraction, description: progress.append((fraction, description)),
        )
    )
    assert engine.requests == ["The parcel arrived broken."]
    assert events[-1].text == "THE PARCEL ARRIVED BROKEN."
    assert events[-1].finish_reason == "stop"
    assert len(events) > 2 and events[0].text and len(events[0].text) < len(events[-1].text)
    assert progress == [(0.0, "Writing the summary")]


def test_long_text_is_map_reduced(tokenizer):
    engine = FakeEngine(tokenizer, reply=topics, context_length=300)
    settings = GenerationSettings(max_new_tokens=64)
    progress = []
    events = run(
        summarize(
            engine,
            LONG_TEXT,
            "paragraph",
            settings,
            progress=lambda fraction, description: progress.append((fraction, description)),
        )
    )
    # Several chunk summaries, then one final summary of their concatenation.
    assert len(engine.requests) > 3
    final_request = engine.requests[-1]
    assert final_request == "\n\n".join(
        topics("summarize", request) for request in engine.requests[:-1]
    )
    expected = " ".join(f"Paragraph {n}" for n in range(1, 13))
    assert events[-1].text == expected
    # The map phase shows nothing; the final summary streams.
    map_events = [event for event in events if not event.text]
    assert len(map_events) == len(engine.requests) - 1
    assert events[-1].num_tokens > count_tokens(tokenizer, expected)
    fractions = [fraction for fraction, _ in progress]
    assert fractions == sorted(fractions) and fractions[-1] < 1
    assert progress[0][1] == f"Summarising part 1 of {len(engine.requests) - 1}"


def test_summaries_of_summaries_are_reduced_again(tokenizer):
    def verbose(kind, text):  # long enough that the first round does not fit the window
        return " ".join(f"{topic} needs a refund." for topic in topics(kind, text).split(" P"))

    engine = FakeEngine(tokenizer, reply=verbose, context_length=240)
    progress = []
    events = run(
        summarize(
            engine,
            LONG_TEXT * 2,
            "paragraph",
            GenerationSettings(max_new_tokens=40),
            progress=lambda fraction, description: progress.append((fraction, description)),
        )
    )
    assert any("(round 2)" in description for _, description in progress)
    assert events[-1].finish_reason in {"stop", "length"}
    assert events[-1].text


def test_a_model_that_does_not_shorten_still_finishes(tokenizer):
    engine = FakeEngine(tokenizer, reply=lambda kind, text: text, context_length=300)
    events = run(summarize(engine, LONG_TEXT, "bullets", GenerationSettings(max_new_tokens=64)))
    assert events[-1].text
    assert len(engine.requests) < 20


def test_summary_can_be_stopped_between_chunks(tokenizer):
    engine = FakeEngine(tokenizer, reply=topics, context_length=400, stop_after_calls=2)
    stop_event = threading.Event()
    events = run(
        summarize(
            engine,
            LONG_TEXT,
            "bullets",
            GenerationSettings(max_new_tokens=64),
            stop_event=stop_event,
        )
    )
    assert len(engine.requests) == 2
    assert events[-1].finish_reason == "cancelled"


@pytest.mark.parametrize(
    ("text", "style", "max_new_tokens", "message"),
    [
        ("  \n", "bullets", 32, "no text to summarise"),
        ("Hello", "haiku", 32, "Unknown summary style"),
        ("Hello", "bullets", 8190, "leaves no room"),
    ],
)
def test_summarize_rejects_bad_requests_before_streaming(
    tokenizer, text, style, max_new_tokens, message
):
    engine = FakeEngine(tokenizer)
    with pytest.raises(SupportLMError, match=message):
        summarize(engine, text, style, GenerationSettings(max_new_tokens=max_new_tokens))
    assert engine.requests == []


# --- translation ----------------------------------------------------------------------------------

LETTER = (
    "Hello {{Customer Name}},\n"
    "\n"
    "  Your order {{Order Number}} ships on 03/12/2024.\n"
    "Track it at https://shop.example.com/track?id=42 or write to help@example.com.\n"
    "\n"
    "\n"
    "{{Order Number}}\n"
    "Thanks!\r\n"
)


def test_translation_keeps_structure_and_spans(tokenizer):
    engine = FakeEngine(tokenizer)
    events = run(translate(engine, LETTER, "French", GenerationSettings(max_new_tokens=256)))
    assert events[-1].text == (
        "HELLO {{Customer Name}},\n"
        "\n"
        "  YOUR ORDER {{Order Number}} SHIPS ON 03/12/2024.\n"
        "TRACK IT AT https://shop.example.com/track?id=42 OR WRITE TO help@example.com.\n"
        "\n"
        "\n"
        "{{Order Number}}\n"
        "THANKS!\r\n"
    )
    assert events[-1].finish_reason == "stop"
    # Short paragraphs go together in one call; the model saw markers, not the spans.
    assert len(engine.requests) == 1
    assert "{{Customer Name}}" not in engine.requests[0]
    assert "{{P1}}" in engine.requests[0]
    # The translation streams: the text grows.
    lengths = [len(event.text) for event in events]
    assert lengths == sorted(lengths) and len(set(lengths)) > 3


def test_long_lines_are_translated_in_pieces(tokenizer):
    text = " ".join(f"Sentence {n} asks about the refund." for n in range(12))
    engine = FakeEngine(tokenizer)
    events = run(translate(engine, text, "German", GenerationSettings(max_new_tokens=64)))
    assert len(engine.requests) > 2
    assert all(count_tokens(tokenizer, request) <= 48 for request in engine.requests)
    assert events[-1].text == text.upper()


def lossy(kind: str, text: str) -> str:
    """A model that drops every marker and joins the lines."""
    return re.sub(r"\s*\{\{P\d+\}\}", "", text).replace("\n", " ").upper()


def test_lost_spans_and_line_breaks_are_repaired(tokenizer):
    engine = FakeEngine(tokenizer, reply=lossy)
    events = run(translate(engine, LETTER, "Spanish", GenerationSettings(max_new_tokens=256)))
    assert events[-1].text == (
        "HELLO, {{Customer Name}}\n"
        "\n"
        "  YOUR ORDER SHIPS ON. {{Order Number}} 03/12/2024\n"
        "TRACK IT AT OR WRITE TO. https://shop.example.com/track?id=42 help@example.com\n"
        "\n"
        "\n"
        "{{Order Number}}\n"
        "THANKS!\r\n"
    )
    # One call for the group, then one per line that needs the model.
    assert len(engine.requests) == 1 + 4


def test_unfinished_markers_are_not_shown(tokenizer):
    engine = FakeEngine(tokenizer, reply=lambda kind, text: text.upper() + " {{P")
    events = run(translate(engine, "Refund of 12.50 EUR.", "French", GenerationSettings()))
    assert all("{{P" not in event.text for event in events)
    assert events[-1].text == "REFUND OF 12.50 EUR."


def test_text_without_words_is_copied_without_calls(tokenizer):
    engine = FakeEngine(tokenizer)
    text = "{{Order Number}}\n\n+1 415 555 0100 / https://example.com"
    events = run(translate(engine, text, "Korean", GenerationSettings()))
    assert events[-1].text == text
    assert engine.requests == []


def test_translation_can_be_stopped(tokenizer):
    text = "\n\n".join(PARAGRAPHS[:4])
    engine = FakeEngine(tokenizer, stop_after_calls=2)
    events = run(
        translate(
            engine,
            text,
            "Italian",
            GenerationSettings(max_new_tokens=256),
            stop_event=threading.Event(),
        )
    )
    # The second call was stopped before its first token: the first call's paragraphs remain.
    assert events[-1].finish_reason == "cancelled"
    assert len(engine.requests) == 2
    done = engine.requests[0].count("Paragraph")
    assert 1 <= done < 4
    translated = [p.upper().replace("{{ORDER NUMBER}}", "{{Order Number}}") for p in PARAGRAPHS]
    assert events[-1].text == "\n\n".join(translated[:done]) + "\n\n"


@pytest.mark.parametrize(
    ("text", "language", "message"),
    [("", "French", "no text to translate"), ("Hi", "Klingon", "Unknown language")],
)
def test_translate_rejects_bad_requests_before_streaming(tokenizer, text, language, message):
    engine = FakeEngine(tokenizer)
    with pytest.raises(SupportLMError, match=message):
        translate(engine, text, language, GenerationSettings())
    assert engine.requests == []


# --- the real model -------------------------------------------------------------------------------


def test_real_model_translation_keeps_spans_and_line_breaks():
    """SmolLM2-135M translates poorly and rarely copies markers: the guarantees must still hold."""
    from supportlm.engines.transformers import TransformersEngine
    from supportlm.modeling import load_model

    engine = TransformersEngine.from_loaded(load_model("embedded"))
    text = "Hi {{Customer Name}},\n\nYour order {{Order Number}} ships on 03/12/2024."
    events = run(translate(engine, text, "French", GenerationSettings(max_new_tokens=24)))
    final = events[-1].text
    for span in ("{{Customer Name}}", "{{Order Number}}", "03/12/2024"):
        assert span in final
    lines = final.split("\n")
    assert len(lines) == 3 and lines[1] == "" and lines[0] and lines[2]
    assert "{{Customer Name}}" in lines[0] and "{{Order Number}}" in lines[2]
    assert events[-1].num_tokens > 0
