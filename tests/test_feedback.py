import json
import sqlite3
import threading

import pytest

from supportlm.errors import SupportLMError
from supportlm.feedback import FeedbackStore, default_feedback_path, redact


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # e-mail addresses
        ("write to anna.k+shop@example.co.uk please", "write to [EMAIL] please"),
        ("ME@EXAMPLE.COM", "[EMAIL]"),
        # phone numbers: international and national formats
        ("call +1 415-555-0100 now", "call [PHONE] now"),
        ("call +44 (0)20 7946 0958.", "call [PHONE]."),
        ("tel:+33612345678", "tel:[PHONE]"),
        ("+49 30 12345678", "[PHONE]"),
        ("(555) 123-4567", "[PHONE]"),
        ("555-123-4567", "[PHONE]"),
        ("555.123.4567", "[PHONE]"),
        ("06 12 34 56 78", "[PHONE]"),
        ("020 7946 0958", "[PHONE]"),
        ("0612345678", "[PHONE]"),
        ("my number is 612 345 678, thanks", "my number is [PHONE], thanks"),
        # payment cards (Luhn-valid), with and without separators
        ("card 4111 1111 1111 1111 exp 12/26", "card [CARD] exp 12/26"),
        ("4111-1111-1111-1111", "[CARD]"),
        ("5555555555554444", "[CARD]"),
        ("amex 3782 822463 10005", "amex [CARD]"),
        ("4111 1111 1111 1111 12 26", "[CARD] 12 26"),
        # all three at once
        (
            "Anna (anna@example.com, +1 415 555 0100) paid with 4242424242424242.",
            "Anna ([EMAIL], [PHONE]) paid with [CARD].",
        ),
    ],
)
def test_redact_replaces_personal_data(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "order #12345",
        "order #1234567890",
        "order ORD-2024-000123",
        "order 5551234567",
        "delivered on 2024-05-01",
        "delivered on 01/05/2024 at 14:30",
        "delivered on 15.01.2024",
        "it cost $1,299.99 or 1.299,99 €",
        "refund of 12.50 EUR for 3 items",
        "4111 1111 1111 1112",
        "tracking 1Z999AA10123456784",
        "see https://example.com/orders/0612345678",
        "version 10.2.3",
        "between 2023 and 2024",
    ],
)
def test_redact_keeps_order_numbers_dates_and_prices(text):
    assert redact(text) == text


def test_default_path_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("SUPPORTLM_FEEDBACK_DB", raising=False)
    assert default_feedback_path().as_posix() == ".supportlm/feedback.sqlite3"
    monkeypatch.setenv("SUPPORTLM_FEEDBACK_DB", str(tmp_path / "x.db"))
    assert default_feedback_path() == tmp_path / "x.db"


CONVERSATION = [
    {"role": "system", "content": "Be helpful."},
    {"role": "user", "content": "I am anna@example.com, where is order #4521?"},
    {"role": "assistant", "content": "Please call +1 415 555 0100."},
]


@pytest.fixture
def store(tmp_path):
    return FeedbackStore(tmp_path / "nested" / "feedback.sqlite3")


def raw_rows(path, table):
    with sqlite3.connect(path) as connection:
        connection.row_factory = sqlite3.Row
        return [dict(row) for row in connection.execute(f"SELECT * FROM {table} ORDER BY id")]


def test_store_creates_wal_database_with_schema_version(store):
    assert store.path.is_file()
    with sqlite3.connect(store.path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert connection.execute("PRAGMA user_version").fetchone()[0] == 1


def test_feedback_is_redacted_on_disk(store):
    row_id = store.add_feedback(
        "correction",
        CONVERSATION,
        message_index=2,
        reply=CONVERSATION[2]["content"],
        corrected_answer="Your order ships today; card 4111 1111 1111 1111 was charged.",
        model_id="embedded",
        adapter_id="outputs/demo",
        backend="transformers",
        settings={"temperature": 0.0, "max_new_tokens": 64},
    )
    (row,) = raw_rows(store.path, "feedback")
    assert row["id"] == row_id
    assert row["kind"] == "correction"
    assert row["created_at"].endswith("+00:00")
    conversation = json.loads(row["conversation"])
    assert conversation[1]["content"] == "I am [EMAIL], where is order #4521?"
    assert row["reply"] == "Please call [PHONE]."
    assert row["corrected_answer"] == "Your order ships today; card [CARD] was charged."
    assert json.loads(row["settings"]) == {"temperature": 0.0, "max_new_tokens": 64}
    raw = json.dumps(row)
    for secret in ("anna@example.com", "555 0100", "4111"):
        assert secret not in raw


def test_votes_are_redacted_and_listed(store):
    store.add_vote("Reach me at 555-123-4567", "base says hi", "tuned says hi", "tuned")
    second = store.add_vote("q", "b", "mail me: x@y.org", "both_bad", model_id="m")
    (first_row, second_row) = raw_rows(store.path, "votes")
    assert first_row["question"] == "Reach me at [PHONE]"
    assert second_row["tuned_answer"] == "mail me: [EMAIL]"
    listed = store.list_votes(limit=1)
    assert [vote["id"] for vote in listed] == [second]
    assert listed[0]["choice"] == "both_bad"


def test_invalid_kind_and_choice_are_rejected(store):
    with pytest.raises(ValueError, match="feedback kind"):
        store.add_feedback("love", CONVERSATION)
    with pytest.raises(ValueError, match="vote"):
        store.add_vote("q", "a", "b", "maybe")
    with pytest.raises(SupportLMError, match="corrected answer"):
        store.add_feedback("correction", CONVERSATION, message_index=2, corrected_answer=" ")
    assert store.list_feedback() == [] and store.list_votes() == []


def test_list_feedback_decodes_json_newest_first(store):
    store.add_feedback("like", CONVERSATION, message_index=2, reply="ok")
    store.add_feedback("dislike", CONVERSATION, message_index=2, reply="bad")
    rows = store.list_feedback(limit=10)
    assert [row["kind"] for row in rows] == ["dislike", "like"]
    assert rows[0]["conversation"][0] == {"role": "system", "content": "Be helpful."}
    assert rows[0]["settings"] is None


def test_export_jsonl_turns_corrections_into_chat_examples(store, tmp_path):
    store.add_feedback("like", CONVERSATION, message_index=2, reply="x")
    store.add_feedback(
        "correction", CONVERSATION, message_index=2, corrected_answer="It ships on Monday."
    )
    count = store.export_jsonl(tmp_path / "out" / "corrections.jsonl")
    lines = (tmp_path / "out" / "corrections.jsonl").read_text().splitlines()
    assert count == 1 and len(lines) == 1
    example = json.loads(lines[0])
    assert example == {
        "messages": [
            {"role": "system", "content": "Be helpful."},
            {"role": "user", "content": "I am [EMAIL], where is order #4521?"},
            {"role": "assistant", "content": "It ships on Monday."},
        ]
    }


def test_concurrent_writes_from_threads(store):
    threads_count, per_thread = 8, 25
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        try:
            for i in range(per_thread):
                store.add_feedback("like", CONVERSATION, message_index=2, reply=f"{worker}-{i}")
                store.add_vote(f"q{worker}-{i}", "a", "b", "tie")
        except BaseException as error:  # re-raised in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    replies = {row["reply"] for row in store.list_feedback(limit=None)}
    assert replies == {f"{w}-{i}" for w in range(threads_count) for i in range(per_thread)}
    assert len(store.list_votes(limit=None)) == threads_count * per_thread


def test_reopening_keeps_data(tmp_path):
    path = tmp_path / "feedback.sqlite3"
    FeedbackStore(path).add_vote("q", "a", "b", "base")
    reopened = FeedbackStore(path)
    assert [vote["question"] for vote in reopened.list_votes()] == ["q"]


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "feedback.sqlite3"
    FeedbackStore(path)
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA user_version = 99")
    with pytest.raises(SupportLMError, match="newer supportlm"):
        FeedbackStore(path)
