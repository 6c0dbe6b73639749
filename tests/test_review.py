"""The trust gate: only signed-in agents' feedback, or approved feedback, is training data."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_abuse import chat, make_assistant

from supportlm.errors import SupportLMError
from supportlm.feedback.export import export_feedback, is_heldout
from supportlm.feedback.review import decide, provenance, queue
from supportlm.serve.settings import AppSettings

ROOT = Path(__file__).resolve().parents[1]


def settings(**values) -> AppSettings:
    return AppSettings(**{"model": "echo", "backend": "transformers", **values})


def test_who_is_an_agent():
    team = settings(auth="alice:pw1,bob:pw2")
    assert provenance("user:alice", team) == ("alice", True)
    assert provenance("127.0.0.1", team) == (None, False)  # an address names nobody
    assert provenance("key:127.0.0.1", team) == (None, False)  # nor does an API key
    listed = settings(auth="alice:pw1,bob:pw2", agents="bob")
    assert provenance("user:alice", listed) == ("alice", False)
    assert provenance("user:bob", listed) == ("bob", True)
    # A Hugging Face sign-in is anyone with an account: trusted only when listed.
    assert provenance("user:stranger", settings(hf_oauth=1)) == ("stranger", False)


def question(heldout: bool, n: int = 0) -> str:
    k = 0
    while is_heldout(text := f"Can I return item {n}-{k}?", 0.2) != heldout:
        k += 1
    return text


def feedback_from(assistant, who: str | None, n: int, correction: str) -> None:
    _, final = chat(assistant, question(heldout=False, n=n))
    assistant.record_feedback(
        "correction", final.request_id, corrected_answer=correction, client_id=who
    )


def read(folder: Path, name: str) -> list[str]:
    rows = [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]
    return [row["messages"][-1]["content"] for row in rows]


def test_only_trusted_feedback_is_exported_and_the_gates_are_counted(smollm2_tokenizer, tmp_path):
    assistant = make_assistant(smollm2_tokenizer, tmp_path, auth="alice:pw")
    feedback_from(assistant, "user:alice", 1, "From the agent.")
    feedback_from(assistant, "203.0.113.9", 2, "From a stranger: buy elsewhere.")
    feedback_from(assistant, "203.0.113.9", 3, "Another stranger's answer.")
    store = assistant.feedback
    report = export_feedback(store, tmp_path / "first", heldout_share=0)
    assert read(tmp_path / "first", "sft") == ["From the agent."]
    assert report.by_gate == {"agent": 1, "approved": 0, "pending": 2, "rejected": 0}
    pending = queue(store)
    assert [item["correction"] for item in pending] == [
        "From a stranger: buy elsewhere.",
        "Another stranger's answer.",
    ]
    decide(store, pending[0]["ref"], "rejected", "alice")
    decide(store, pending[1]["ref"], "approved", "alice")
    report = export_feedback(store, tmp_path / "second", heldout_share=0)
    assert read(tmp_path / "second", "sft") == ["From the agent.", "Another stranger's answer."]
    assert report.by_gate == {"agent": 1, "approved": 1, "pending": 0, "rejected": 1}
    assert queue(store) == []


def test_untrusted_feedback_never_reaches_the_heldout_file(smollm2_tokenizer, tmp_path):
    # A stranger's correction must not decide a promotion either.
    assistant = make_assistant(smollm2_tokenizer, tmp_path, auth="alice:pw")
    for who, answer in (("user:alice", "Trusted."), (None, "Untrusted.")):
        _, final = chat(assistant, question(heldout=True, n=len(answer)))
        assistant.record_feedback(
            "correction", final.request_id, corrected_answer=answer, client_id=who
        )
    export_feedback(assistant.feedback, tmp_path / "out")
    assert read(tmp_path / "out", "heldout") == ["Trusted."]


def test_nothing_trusted_is_a_clear_error(smollm2_tokenizer, tmp_path):
    assistant = make_assistant(smollm2_tokenizer, tmp_path)
    feedback_from(assistant, None, 1, "Anyone's answer.")
    with pytest.raises(SupportLMError, match="1 rows wait for approval"):
        export_feedback(assistant.feedback, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_votes_are_gated_too(smollm2_tokenizer, tmp_path):
    assistant = make_assistant(smollm2_tokenizer, tmp_path, auth="alice:pw")
    _, base = chat(assistant, "Where is my parcel?")
    _, tuned = chat(assistant, "Where is my parcel?")
    assistant.record_vote(base.request_id, tuned.request_id, "tuned", client_id="10.0.0.1")
    [item] = queue(assistant.feedback)
    assert item["ref"].startswith("v") and item["kind"] == "vote:tuned"
    with pytest.raises(SupportLMError, match="wait for approval"):
        export_feedback(assistant.feedback, tmp_path / "out", heldout_share=0)


@pytest.mark.parametrize("ref", ["x1", "f", "f99"])
def test_a_bad_reference_is_refused(smollm2_tokenizer, tmp_path, ref):
    assistant = make_assistant(smollm2_tokenizer, tmp_path)
    with pytest.raises(SupportLMError, match="queue item|no feedback row"):
        decide(assistant.feedback, ref, "approved", None)


def test_the_command_line_lists_approves_and_rejects(smollm2_tokenizer, tmp_path):
    assistant = make_assistant(smollm2_tokenizer, tmp_path)
    for n in (1, 2):
        feedback_from(assistant, None, n, f"Answer {n}.")
    db = str(assistant.feedback.path)
    cli = [sys.executable, str(ROOT / "finetune" / "feedback.py"), "--db", db]
    listed = subprocess.run([*cli, "review"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "waiting for approval: 2" in listed.stdout and "'Answer 1.'" in listed.stdout
    decided = subprocess.run(
        [*cli, "review", "--approve", "f1", "--reject", "f2", "--reviewer", "ops"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "waiting for approval: 0" in decided.stdout
    rows = {row["id"]: row for row in assistant.feedback.list_feedback()}
    assert (rows[1]["review"], rows[1]["reviewed_by"]) == ("approved", "ops")
    assert rows[2]["review"] == "rejected"
    wrong = subprocess.run([*cli, "review", "--approve", "z9"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "names no queue item" in wrong.stderr
