"""New vs old adapter (`evaluate.py --against`), and promoting only a better one (`promote.py`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import save_random_adapter
from test_training import REPO_ROOT, tiny_args

from supportlm.errors import SupportLMError
from supportlm.feedback.export import export_feedback, is_heldout
from supportlm.feedback.store import FeedbackStore, ReplyRecord
from supportlm.run_folder import RunFolder, latest_run
from supportlm.train.fit.config import parse_config
from supportlm.train.fit.run import train
from supportlm.train.judge.versus import VERSUS_FILE
from supportlm.train.release.promotion import decide, history, promote, rollback

BUNDLED = str(REPO_ROOT / "data" / "customer_support.jsonl")


def report(test=(30.0, 30.0), feedback=(20.0, 25.0), n_feedback=5, old="v-old", new="v-new"):
    def side(value):
        return {"rougeL": value, "chrf": value}

    return {
        "old": {"adapter_version": old},
        "new": {"adapter_version": new},
        "test": {"n": 10, "old": side(test[0]), "new": side(test[1])},
        "feedback": {"n": n_feedback, "old": side(feedback[0]), "new": side(feedback[1])},
    }


@pytest.mark.parametrize(
    ("kwargs", "promoted", "failure"),
    [
        ({}, True, None),
        ({"test": (30.0, 29.1)}, True, None),  # a 0.9-point drop is allowed
        ({"test": (30.0, 28.5)}, False, "test rougeL fell 1.50 points"),
        ({"feedback": (25.0, 25.0)}, False, "feedback rougeL did not improve"),
        ({"n_feedback": 0}, False, "no held-out feedback"),
    ],
)
def test_the_decision_names_the_number_that_failed(kwargs, promoted, failure):
    decision = decide(report(**kwargs))
    assert decision.promote is promoted
    if failure:
        assert any(failure in text for text in decision.failures)


def adapter(tiny_model_dir, folder, seed):
    save_random_adapter(tiny_model_dir, folder, seed=seed)
    run = RunFolder(folder)
    run.write_record(tiny_model_dir, {"method": "sft"})
    return run


def test_promote_moves_latest_only_when_better_and_rollback_goes_back(tiny_model_dir, tmp_path):
    outputs = tmp_path / "outputs"
    old = adapter(tiny_model_dir, outputs / "v1", 0)
    new = adapter(tiny_model_dir, outputs / "v2", 1)
    newer = adapter(tiny_model_dir, outputs / "v3", 2)
    (outputs / "latest").write_text("v1\n")
    worse = report(test=(30.0, 20.0), old=old.adapter_version(), new=new.adapter_version())
    (new.path / VERSUS_FILE).write_text(json.dumps(worse))
    assert not promote(new.path, outputs_dir=outputs).promote
    assert latest_run(outputs).path.name == "v1"
    assert promote(new.path, outputs_dir=outputs, force=True).promote  # logged as forced
    assert latest_run(outputs).path.name == "v2"
    better = report(old=new.adapter_version(), new=newer.adapter_version())
    (newer.path / VERSUS_FILE).write_text(json.dumps(better))
    assert promote(newer.path, outputs_dir=outputs).promote
    assert latest_run(outputs).path.name == "v3"
    assert [(e["action"], e["forced"]) for e in history(outputs) if "forced" in e] == [
        ("refused", False), ("promote", True), ("promote", False),
    ]  # fmt: skip
    rollback(outputs)
    assert latest_run(outputs).path.name == "v2"
    rollback(outputs)
    assert latest_run(outputs).path.name == "v1"
    with pytest.raises(SupportLMError, match="Nothing to roll back"):
        rollback(outputs)


def test_a_stale_report_is_refused(tiny_model_dir, tmp_path):
    outputs = tmp_path / "outputs"
    old = adapter(tiny_model_dir, outputs / "v1", 0)
    new = adapter(tiny_model_dir, outputs / "v2", 1)
    (outputs / "latest").write_text("v1\n")
    (new.path / VERSUS_FILE).write_text(json.dumps(report(old="v-else", new=new.adapter_version())))
    with pytest.raises(SupportLMError, match="is served now: compare again"):
        promote(new.path, outputs_dir=outputs)
    (new.path / VERSUS_FILE).write_text(json.dumps(report(old=old.adapter_version())))
    with pytest.raises(SupportLMError, match="another version"):
        promote(new.path, outputs_dir=outputs)


@pytest.fixture(scope="module")
def parent_and_candidate(tiny_model_dir, tmp_path_factory):
    """A tiny run, and a candidate continued from it on exported feedback."""
    root = tmp_path_factory.mktemp("loop")
    parent = train(parse_config(tiny_args(tiny_model_dir, root / "v1", "--max_steps", "3")))
    store = FeedbackStore(root / "feedback.sqlite3")
    for i in range(40):
        question = [{"role": "user", "content": f"May I swap the size of shoe order {i}?"}]
        store.add_reply(ReplyRecord(f"r{i}", question, "No.", adapter_version="v-1"))
        store.add_feedback(
            "correction", f"r{i}", corrected_answer="Yes, free within 30 days.", trusted=True
        )
    export_feedback(store, root / "export", heldout_share=0.25)
    argv = tiny_args(tiny_model_dir, root / "v2", "--max_steps", "2", "--eval_strategy", "no")
    argv += ["--init_adapter", str(parent.output_dir), "--dataset", str(root / "export/sft.jsonl"),
             "--replay_dataset", BUNDLED]  # fmt: skip
    candidate = train(parse_config(argv))
    return RunFolder(parent.output_dir), RunFolder(candidate.output_dir), root


def test_evaluate_against_scores_both_on_test_and_heldout_feedback(parent_and_candidate, tmp_path):
    parent, candidate, root = parent_and_candidate
    output = tmp_path / "versus.json"
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "finetune" / "evaluate.py"), "--adapter",
         str(candidate.path), "--against", str(parent.path), "--limit", "4", "--engine",
         "transformers", "--max_new_tokens", "6", "--output", str(output)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    result = json.loads(output.read_text())
    assert result == json.loads((candidate.path / VERSUS_FILE).read_text())
    assert result["old"]["adapter_version"] == parent.adapter_version()
    assert result["new"]["adapter_version"] == candidate.adapter_version()
    # The parent's own test split, as its split.json recorded it (a 48-example run: 3 questions).
    assert result["test"]["n"] == min(4, len(parent.split()["test"])) > 0
    assert result["test_source"] == str(parent.path)
    heldout = (root / "export" / "heldout.jsonl").read_text().splitlines()
    feedback = result["feedback"]
    assert feedback["n"] == len(heldout) > 0
    assert feedback["wins"] + feedback["losses"] + feedback["ties"] == feedback["n"]
    assert all(is_heldout(json.loads(line)["messages"][0]["content"], 0.25) for line in heldout)
    assert output.with_suffix(".png").stat().st_size > 0
    assert "against" in output.with_suffix(".md").read_text()
    # promote.py reads the same report: its exit code follows the decision.
    promoted = decide(result).promote
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    (outputs / "latest").write_text(str(parent.path) + "\n")
    run = subprocess.run(
        [sys.executable, str(REPO_ROOT / "finetune" / "promote.py"), str(candidate.path),
         "--outputs_dir", str(outputs)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == (0 if promoted else 1), run.stderr
    assert (latest_run(outputs).path == candidate.path) is promoted
