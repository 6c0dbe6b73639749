"""The feedback store exported as TRL training data (`finetune/feedback.py export`)."""

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from supportlm.errors import SupportLMError
from supportlm.feedback.export import ExportFilter, export_feedback, is_heldout
from supportlm.feedback.store import FeedbackStore, ReplyRecord
from supportlm.train.data.examples import load_examples

ROOT = Path(__file__).resolve().parents[1]


def question(n: int, heldout: bool) -> str:
    """The n-th question on the wanted side of the 20 % held-out hash."""
    k = 0
    while True:
        text = f"Where is my order number {n}-{k}?"
        if is_heldout(text, 0.2) == heldout:
            return text
        k += 1


def reply(store, reply_id, text, asked, *, version="v-aaa", intent="track_order"):
    conversation = [{"role": "user", "content": asked}]
    store.add_reply(
        ReplyRecord(reply_id, conversation, text, adapter_version=version, intent=intent)
    )


@pytest.fixture
def store(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.sqlite3")
    q = [question(i, heldout=False) for i in range(4)]
    reply(store, "r1", "It left the warehouse.", q[0])
    store.add_feedback("like", "r1", trusted=True)
    reply(store, "r2", "No idea.", q[1])
    store.add_feedback("dislike", "r2", trusted=True)
    reply(store, "r3", "Call us.", q[2], version="v-bbb", intent="complaint")
    store.add_feedback("correction", "r3", corrected_answer="It ships on Monday.", trusted=True)
    reply(store, "base", "Base answer.", q[3], version=None)
    reply(store, "tuned", "Tuned answer.", q[3])
    store.add_vote("base", "tuned", "tuned", trusted=True)
    reply(store, "h1", "Wrong.", question(9, heldout=True))
    store.add_feedback("correction", "h1", corrected_answer="The right answer.", trusted=True)
    return store


def read(folder: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]


def test_each_kind_of_feedback_becomes_the_rows_trl_reads(store, tmp_path):
    report = export_feedback(store, tmp_path / "out")
    out = tmp_path / "out"
    sft, kto, dpo = read(out, "sft"), read(out, "kto"), read(out, "dpo")
    answers = [row["messages"][-1]["content"] for row in sft]
    assert answers == ["It left the warehouse.", "It ships on Monday."]  # like, correction
    labels = {row["completion"][0]["content"]: row["label"] for row in kto}
    assert labels == {
        "It left the warehouse.": True,
        "No idea.": False,
        "It ships on Monday.": True,
        "Call us.": False,
        "Tuned answer.": True,
        "Base answer.": False,
    }
    pairs = [(row["chosen"][0]["content"], row["rejected"][0]["content"]) for row in dpo]
    assert pairs == [("It ships on Monday.", "Call us."), ("Tuned answer.", "Base answer.")]
    assert all(row["prompt"][-1]["role"] == "user" for row in kto + dpo)  # conversational
    assert report.rows == {"sft": 2, "kto": 6, "dpo": 2, "heldout": 1}
    assert report.by_kind == {"like": 1, "dislike": 1, "correction": 2, "vote:tuned": 1}
    assert report.by_adapter_version == {"v-aaa": 4, "v-bbb": 1}
    assert report.by_intent["complaint"] == 1
    on_disk = json.loads((out / "export.json").read_text())
    assert on_disk["export_hash"] == report.export_hash and len(report.export_hash) == 16


def test_heldout_questions_never_reach_the_training_files(store, tmp_path):
    export_feedback(store, tmp_path / "out")
    heldout = read(tmp_path / "out", "heldout")
    assert heldout == [
        {
            "messages": [
                {"role": "user", "content": question(9, heldout=True)},
                {"role": "assistant", "content": "The right answer."},
            ],
            "rejected": "Wrong.",
            "kind": "correction",
            "adapter_version": "v-aaa",
        }
    ]
    training = "".join((tmp_path / "out" / f"{n}.jsonl").read_text() for n in ("sft", "kto", "dpo"))
    assert "The right answer." not in training and "Wrong." not in training


def test_the_exported_files_load_as_training_data(store, tmp_path):
    export_feedback(store, tmp_path / "out")
    examples, stats = load_examples(str(tmp_path / "out" / "sft.jsonl"), strict=True)
    assert len(examples) == 2 and stats.shape == "chat"


def test_filters_keep_one_adapter_version_and_a_date_range(store, tmp_path):
    report = export_feedback(store, tmp_path / "a", filters=ExportFilter(adapter_version="v-bbb"))
    assert report.by_kind == {"correction": 1}
    with pytest.raises(SupportLMError, match="No feedback"):
        export_feedback(store, tmp_path / "b", filters=ExportFilter(since="2999-01-01"))
    assert not (tmp_path / "b").exists()


def test_duplicates_are_written_once_and_the_newest_label_wins(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.sqlite3")
    asked = question(1, heldout=False)
    for reply_id in ("a", "b"):
        reply(store, reply_id, "Same answer.", asked)
    store.add_feedback("like", "a", trusted=True)
    store.add_feedback("dislike", "b", trusted=True)  # the same prompt and reply, disliked later
    report = export_feedback(store, tmp_path / "out", include_likes=False)
    assert read(tmp_path / "out", "kto") == [
        {
            "prompt": [{"role": "user", "content": asked}],
            "completion": [{"role": "assistant", "content": "Same answer."}],
            "label": False,
        }
    ]
    assert report.duplicates_dropped == 1 and report.rows["sft"] == 0


def test_redaction_is_applied_again_on_the_way_out(store, tmp_path):
    # A row written before a pattern existed (here: written straight into the file).
    with sqlite3.connect(store.path) as connection:
        connection.execute(
            "UPDATE feedback SET corrected_answer = 'Mail anna@example.com' "
            "WHERE kind = 'correction'"
        )
    report = export_feedback(store, tmp_path / "out")
    text = "".join(p.read_text() for p in (tmp_path / "out").glob("*.jsonl"))
    assert "anna@example.com" not in text and "[EMAIL]" in text
    assert report.redacted_on_export >= 1


def test_an_export_never_overwrites_a_folder(store, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(SupportLMError, match="not empty"):
        export_feedback(store, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_the_command_line_exports_and_reports(store, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "finetune" / "feedback.py"), "--db", str(store.path),
         "export", "--out", str(tmp_path / "cli"), "--heldout_share", "0"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "| correction | 2 |" in result.stdout
    assert len(read(tmp_path / "cli", "sft")) == 3
