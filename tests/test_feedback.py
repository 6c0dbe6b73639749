import json
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from supportlm.errors import SupportLMError
from supportlm.feedback.export import export_feedback
from supportlm.feedback.review import decide, queue
from supportlm.feedback.store import SCHEMA_VERSION, FeedbackStore, ReplyRecord

CONVERSATION = [
    {"role": "system", "content": "Be helpful."},
    {"role": "user", "content": "I am anna@example.com, where is order #4521?"},
]
REPLY = "Please call +1 415 555 0100."
V1_DATABASE = Path(__file__).parent / "fixtures" / "feedback-v1.sqlite3"


@pytest.fixture
def store(tmp_path):
    return FeedbackStore(tmp_path / "nested" / "feedback.sqlite3")


def add_reply(store, reply_id="r1", reply=REPLY, conversation=CONVERSATION, **extra):
    return store.add_reply(ReplyRecord(reply_id, conversation, reply, **extra))


def raw_rows(path, table):
    with sqlite3.connect(path) as connection:
        connection.row_factory = sqlite3.Row
        return [dict(row) for row in connection.execute(f"SELECT * FROM {table} ORDER BY rowid")]


def test_store_creates_wal_database_with_schema_version(store):
    assert store.path.is_file()
    with sqlite3.connect(store.path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6


def test_replies_and_feedback_are_redacted_on_disk(store):
    add_reply(
        store,
        model_id="embedded",
        adapter_id="smollm2-support",
        adapter_version="v-123",
        backend="transformers",
        settings={"temperature": 0.0, "system_prompt": "Mail boss@example.com"},
    )
    row_id = store.add_feedback(
        "correction", "r1", corrected_answer="It ships; card 4111 1111 1111 1111 was charged."
    )
    (reply,) = raw_rows(store.path, "replies")
    assert reply["reply"] == "Please call [PHONE]."
    assert json.loads(reply["settings"])["system_prompt"] == "Mail [EMAIL]"
    (row,) = raw_rows(store.path, "feedback")
    assert row["id"] == row_id and row["reply_id"] == "r1"
    assert row["kind"] == "correction"
    assert row["created_at"].endswith("+00:00")
    assert (row["adapter_id"], row["adapter_version"]) == ("smollm2-support", "v-123")
    conversation = json.loads(row["conversation"])
    assert conversation[1]["content"] == "I am [EMAIL], where is order #4521?"
    assert conversation[-1] == {"role": "assistant", "content": "Please call [PHONE]."}
    assert row["reply"] == "Please call [PHONE]."
    assert row["corrected_answer"] == "It ships; card [CARD] was charged."
    for table in ("replies", "feedback"):
        raw = json.dumps(raw_rows(store.path, table))
        for secret in ("anna@example.com", "boss@example.com", "555 0100", "4111"):
            assert secret not in raw


def test_feedback_for_a_reply_the_server_never_issued_is_refused(store):
    with pytest.raises(SupportLMError, match="unknown"):
        store.add_feedback("like", "forged-id")
    with pytest.raises(SupportLMError, match="unknown"):
        store.add_vote("forged-a", "forged-b", "tuned")
    assert store.list_feedback() == [] and store.list_votes() == []


def test_votes_name_two_replies_to_the_same_question(store):
    add_reply(store, "base", "base says hi, call 555-123-4567")
    add_reply(store, "tuned", "tuned says hi", adapter_version="v-9")
    vote_id = store.add_vote("base", "tuned", "tuned")
    (row,) = raw_rows(store.path, "votes")
    assert row["id"] == vote_id
    assert row["question"] == "I am [EMAIL], where is order #4521?"
    assert (row["base_answer"], row["tuned_answer"]) == (
        "base says hi, call [PHONE]",
        "tuned says hi",
    )
    assert (row["base_reply_id"], row["tuned_reply_id"], row["adapter_version"]) == (
        "base",
        "tuned",
        "v-9",
    )
    add_reply(store, "other", "x", conversation=[{"role": "user", "content": "another question"}])
    with pytest.raises(SupportLMError, match="same question"):
        store.add_vote("base", "other", "tie")


def test_invalid_kind_and_choice_are_rejected(store):
    add_reply(store)
    with pytest.raises(SupportLMError, match="feedback kind"):
        store.add_feedback("love", "r1")
    with pytest.raises(SupportLMError, match="vote"):
        store.add_vote("r1", "r1", "maybe")
    with pytest.raises(SupportLMError, match="corrected answer"):
        store.add_feedback("correction", "r1", corrected_answer=" ")
    assert store.list_feedback() == [] and store.list_votes() == []


def test_list_feedback_decodes_json_newest_first(store):
    add_reply(store)
    store.add_feedback("like", "r1")
    store.add_feedback("dislike", "r1")
    rows = store.list_feedback(limit=10)
    assert [row["kind"] for row in rows] == ["dislike", "like"]
    assert rows[0]["conversation"][0] == {"role": "system", "content": "Be helpful."}
    assert rows[0]["settings"] is None
    assert [reply["reply_id"] for reply in store.list_replies()] == ["r1"]


def test_concurrent_writes_from_threads(store):
    threads_count, per_thread = 8, 25
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        try:
            for i in range(per_thread):
                add_reply(store, f"{worker}-{i}", f"reply {worker}-{i}")
                store.add_feedback("like", f"{worker}-{i}")
                store.add_vote(f"{worker}-{i}", f"{worker}-{i}", "tie")
        except BaseException as error:  # re-raised in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    replies = {row["reply"] for row in store.list_feedback(limit=None)}
    assert replies == {f"reply {w}-{i}" for w in range(threads_count) for i in range(per_thread)}
    assert len(store.list_votes(limit=None)) == threads_count * per_thread


def test_reopening_keeps_data(tmp_path):
    path = tmp_path / "feedback.sqlite3"
    add_reply(FeedbackStore(path))
    reopened = FeedbackStore(path)
    assert [reply["reply"] for reply in reopened.list_replies()] == ["Please call [PHONE]."]


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "feedback.sqlite3"
    FeedbackStore(path)
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA user_version = 99")
    with pytest.raises(SupportLMError, match="newer supportlm"):
        FeedbackStore(path)


def test_a_schema_1_database_from_the_first_release_is_migrated_and_keeps_its_rows(tmp_path):
    path = tmp_path / "feedback.sqlite3"
    shutil.copy(V1_DATABASE, path)
    store = FeedbackStore(path)
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    old = store.list_feedback()
    assert [row["kind"] for row in old] == ["correction", "like"]
    assert old[0]["corrected_answer"] == "Please share your order number."
    assert old[0]["reply_id"] is None  # written before replies had ids
    assert store.list_votes()[0]["choice"] == "tuned"
    # Rows from before the trust gate wait for a person's approval, like any untrusted row.
    with pytest.raises(SupportLMError, match="3 rows wait for approval"):
        export_feedback(store, tmp_path / "refused", heldout_share=0)
    for item in queue(store):
        decide(store, item["ref"], "approved", "reviewer")
    report = export_feedback(store, tmp_path / "export", heldout_share=0)
    assert report.rows["sft"] == 2 and report.rows["dpo"] == 2  # the correction, the like; + vote
    assert report.by_gate == {"agent": 0, "approved": 3, "pending": 0, "rejected": 0}
    add_reply(store)  # and the migrated store takes new rows
    store.add_feedback("like", "r1")
    assert len(store.list_feedback()) == 3


def test_app_processes_opening_an_old_database_at_once_migrate_it_once(tmp_path):
    path = tmp_path / "feedback.sqlite3"
    shutil.copy(V1_DATABASE, path)
    errors: list[BaseException] = []

    def open_store() -> None:
        try:
            FeedbackStore(path)
        except BaseException as error:  # re-raised below
            errors.append(error)

    threads = [threading.Thread(target=open_store) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    store = FeedbackStore(path)
    assert len(store.list_feedback()) == 2 and store.list_replies() == []
