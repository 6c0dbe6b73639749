"""Intent vocabulary, parsing, scores, the baseline and the report (issue 10, part 6)."""

import json
import sys
from pathlib import Path

import pytest

from supportlm.errors import SupportLMError
from supportlm.intents import canonical_intent, intent_examples, intent_labels, parse_intent
from supportlm.prompts import DEFAULT_SYSTEM_PROMPT
from supportlm.train.data.arguments import DataArguments
from supportlm.train.data.dataset import prepare_dataset
from supportlm.train.judge.intents import baseline_predictions, intent_scores

REPO_ROOT = Path(__file__).resolve().parents[1]
BITEXT = REPO_ROOT.parent / "shared" / "data" / "bitext-customer-support" / "train.csv"
LABELS = ["cancel_order", "contact_human_agent", "recover_password", "track_order"]


def test_one_vocabulary_across_the_bundled_data_and_bitext():
    assert canonical_intent("contact_human") == "contact_human_agent"
    assert canonical_intent(" Reset Password ") == "recover_password"
    assert intent_labels(["track_order", "translate", None, "contact_human"]) == [
        "contact_human_agent",
        "track_order",
    ]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("cancel_order", "cancel_order"),
        ("Intent: track_order.", "track_order"),
        ("The intent is contact_human", "contact_human_agent"),
        ("recover passwrd", "recover_password"),
        ("I am happy to help you with that!", None),
        ("", None),
    ],
)
def test_a_model_answer_is_read_as_one_of_the_labels(answer, expected):
    assert parse_intent(answer, LABELS) == expected


def test_scores_count_an_unreadable_answer_as_wrong():
    truth = ["a", "a", "b", "b"]
    scores = intent_scores(truth, ["a", None, "b", "b"])
    assert scores["intent_accuracy"] == 0.75
    assert scores["intent_macro_recall"] == pytest.approx((0.5 + 1.0) / 2)
    assert scores["intent_macro_f1"] == pytest.approx((2 / 3 + 1.0) / 2)


@pytest.mark.skipif(not BITEXT.is_file(), reason="the Bitext sample is in ../shared")
def test_the_tfidf_baseline_on_the_bitext_test_split(smollm2_tokenizer):
    data = DataArguments(dataset=str(BITEXT), max_seq_length=512)
    prepared = prepare_dataset(data, smollm2_tokenizer, system_prompt=DEFAULT_SYSTEM_PROMPT)
    train, test = (intent_examples(prepared.splits[s]) for s in ("train", "test"))
    truth = [canonical_intent(e.meta["intent"]) for e in test]
    scores = intent_scores(truth, baseline_predictions(train, test))
    assert len(test) > 300 and scores["intent_accuracy"] >= 0.9  # measured: 0.98


def test_evaluate_reports_intents_and_plots_the_confusion_matrix(tiny_model_dir, tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "finetune"))
    from evaluate import main

    output = tmp_path / "eval.json"
    argv = ["--model_name_or_path", tiny_model_dir, "--dataset", "data/customer_support.jsonl"]
    argv += ["--limit", "8", "--max_new_tokens", "4", "--output", str(output)]
    assert main(argv) == 0
    report = json.loads(output.read_text())
    for scores in (report["base"], report["intent_baseline"]):
        assert {"intent_accuracy", "intent_macro_recall", "intent_macro_f1"} <= scores.keys()
    assert report["intents"]["labels"] and len(report["intents"]["truth"]) <= 8
    assert "raw_placeholder_share" in report["base"]
    assert (tmp_path / "eval-intents.png").read_bytes().startswith(b"\x89PNG")


def test_intent_questions_join_the_training_split_only(smollm2_tokenizer):
    def prepare(share):
        data = DataArguments(
            dataset="data/customer_support.jsonl", max_seq_length=512, intent_share=share
        )
        return prepare_dataset(data, smollm2_tokenizer, system_prompt=DEFAULT_SYSTEM_PROMPT).splits

    plain, mixed = prepare(0.0), prepare(0.5)
    assert mixed["validation"] == plain["validation"] and mixed["test"] == plain["test"]
    added = mixed["train"][len(plain["train"]) :]
    named = len(intent_examples(plain["train"]))
    assert len(added) == round(0.5 * named) and all(e.meta["task"] == "intent" for e in added)
    labels = intent_labels(e.meta.get("intent") for e in plain["train"])
    for example in added:
        question, answer = example.messages
        assert "Which intent" in question["content"] and answer["content"] in labels
    with pytest.raises(SupportLMError, match="intent_share"):
        prepare(1.5)
