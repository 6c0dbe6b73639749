"""The bundled training set (data/customer_support.jsonl) keeps the promises of its data card.

It is the default training data, so a malformed line, a thin intent or a summarise/translate request
phrased differently from what the app sends would silently degrade every default run.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from supportlm.prompts import LANGUAGES, SUMMARY_STYLES, summarize_messages, translate_messages

DATA_FILE = Path(__file__).resolve().parents[1] / "data" / "customer_support.jsonl"

TRANSLATE_REQUEST = re.compile(
    r"Translate the following (?:(?P<source>[A-Z][a-z]+) )?text into (?P<target>[A-Z][a-z]+)\. "
    r".*?\n\nText:\n(?P<text>.*)\Z",
    re.DOTALL,
)
# What a translation must carry over verbatim: placeholders, URLs and digit runs.
VERBATIM = re.compile(r"\{\{[^{}]+\}\}|https?://\S+|\d+")
SNAKE_CASE = re.compile(r"[a-z]+(?:_[a-z]+)*")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    with DATA_FILE.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def user_text(row: dict) -> str:
    return row["messages"][0]["content"]


def request_body(row: dict) -> str:
    return user_text(row).split("\n\nText:\n", 1)[1]


def by_task(rows: list[dict], task: str) -> list[dict]:
    return [row for row in rows if row["task"] == task]


def test_every_line_is_a_well_formed_conversation(rows: list[dict]) -> None:
    for number, row in enumerate(rows, start=1):
        assert set(row) == {"messages", "intent", "category", "task"}, number
        assert row["task"] in {"chat", "summarize", "translate"}, number
        assert SNAKE_CASE.fullmatch(row["intent"]), (number, row["intent"])
        assert row["category"].isupper(), (number, row["category"])
        roles = [message["role"] for message in row["messages"]]
        assert len(roles) >= 2 and len(roles) % 2 == 0, number
        assert roles == ["user", "assistant"] * (len(roles) // 2), number
        for message in row["messages"]:
            assert set(message) == {"role", "content"}, number
            assert message["content"].strip() == message["content"] != "", number


def test_sizes_and_coverage(rows: list[dict]) -> None:
    chat = by_task(rows, "chat")
    per_intent = Counter(row["intent"] for row in chat)
    assert len(rows) >= 330
    assert len(per_intent) >= 24
    assert min(per_intent.values()) >= 8, per_intent.most_common()[-3:]
    assert len({row["category"] for row in chat}) >= 10
    assert len(by_task(rows, "summarize")) >= 25
    assert len(by_task(rows, "translate")) >= 25


def test_no_repeated_questions(rows: list[dict]) -> None:
    counts = Counter(" ".join(user_text(row).lower().split()) for row in rows)
    assert [text for text, count in counts.items() if count > 1] == []


def test_multi_turn_conversations(rows: list[dict]) -> None:
    turns = [len(row["messages"]) // 2 for row in by_task(rows, "chat")]
    multi_turn = [count for count in turns if count > 1]
    assert len(multi_turn) >= 40
    assert max(turns) <= 4
    assert {2, 3} <= set(multi_turn)


def test_summarize_requests_match_the_app(rows: list[dict]) -> None:
    styles = Counter()
    for row in by_task(rows, "summarize"):
        assert (row["intent"], row["category"], len(row["messages"])) == ("summarize", "TASK", 2)
        style = next(
            (s for s, line in SUMMARY_STYLES.items() if user_text(row).startswith(line)), None
        )
        assert style is not None, user_text(row)[:80]
        styles[style] += 1
        text = request_body(row)
        assert user_text(row) == summarize_messages(text, style)[-1]["content"]
        assert 60 <= len(text.split()) <= 250, text[:60]
        summary = row["messages"][1]["content"]
        assert len(summary.split()) < len(text.split())
        if style != "paragraph":
            assert all(line.startswith("- ") for line in summary.splitlines()), summary
    assert set(styles) == set(SUMMARY_STYLES)


def test_translate_requests_match_the_app_and_keep_verbatim_parts(rows: list[dict]) -> None:
    targets = Counter()
    into_english_from = set()
    stated_source = 0
    for row in by_task(rows, "translate"):
        assert (row["intent"], row["category"], len(row["messages"])) == ("translate", "TASK", 2)
        match = TRANSLATE_REQUEST.fullmatch(user_text(row))
        assert match, user_text(row)[:80]
        source, target, text = match["source"] or "auto", match["target"], match["text"]
        assert user_text(row) == translate_messages(text, target, source)[-1]["content"]
        translation = row["messages"][1]["content"]
        assert translation != text
        for token in VERBATIM.findall(text):
            assert token in translation, (token, translation)
        assert translation.count("\n") == text.count("\n"), text[:60]
        targets[target] += 1
        stated_source += source != "auto"
        if target == "English":
            into_english_from.add(text[:20])
    assert all(targets[language] >= 2 for language in LANGUAGES), targets
    assert len(into_english_from) >= 2
    assert stated_source >= 3
    assert sum("{{" in request_body(row) for row in by_task(rows, "translate")) >= 10
