"""The questions of the feedback-loop bench, and how its answers are scored.

Every question comes from the Bitext sample's *training* split (never its validation or test
split, which `finetune/evaluate.py` reports on). The corrected intents are left out of the
starting adapter's data altogether, so what the loop gains on them is learned from feedback.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "src"))

from supportlm.placeholders import ShopDetails  # noqa: E402
from supportlm.train.data.dataset import assign_split  # noqa: E402
from supportlm.train.data.examples import Example  # noqa: E402
from supportlm.train.judge.metrics import chrf, rouge_l  # noqa: E402

BITEXT = REPO_ROOT.parent / "shared" / "data" / "bitext-customer-support" / "train.csv"

#: Not intents the app hands over to a person (complaints, a human agent, account deletion):
#: their replies carry the hand-over notice, not only the model's answer.
DEFAULT_INTENTS = (
    "newsletter_subscription",
    "check_payment_methods",
    "delivery_options",
    "recover_password",
)


@dataclass(frozen=True)
class Question:
    text: str
    answer: str  # the Bitext reference: the simulated agent's correction
    intent: str


@dataclass(frozen=True)
class QuestionSets:
    feedback: list[Question]  # asked, disliked and corrected
    corrected_unseen: list[Question]  # the same intents, never given as feedback
    other_unseen: list[Question]  # the other intents: what must not get worse


def read_rows(path: Path = BITEXT) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def training_split(rows: Iterable[dict[str, str]]) -> dict[str, list[Question]]:
    """The training split's rows by intent, in file order."""
    by_intent: dict[str, list[Question]] = {}
    for row in rows:
        example = Example(
            messages=[
                {"role": "user", "content": row["instruction"]},
                {"role": "assistant", "content": row["response"]},
            ]
        )
        if assign_split(example) == "train":
            question = Question(row["instruction"], row["response"], row["intent"])
            by_intent.setdefault(row["intent"], []).append(question)
    return by_intent


def pick_questions(
    rows: Sequence[dict[str, str]],
    intents: Sequence[str],
    per_intent: int,
    unseen_per_intent: int,
    other_per_intent: int,
) -> QuestionSets:
    """Feedback and unseen questions of `intents`, and unseen questions of every other intent."""
    by_intent = training_split(rows)
    unknown = sorted(set(intents) - set(by_intent))
    if unknown:
        raise SystemExit(f"unknown intents {unknown}; the sample has {sorted(by_intent)}")
    feedback, corrected, other = [], [], []
    for intent, questions in sorted(by_intent.items()):
        if intent in intents:
            if len(questions) < per_intent + unseen_per_intent:
                raise SystemExit(f"{intent} has only {len(questions)} training questions")
            feedback += questions[:per_intent]
            corrected += questions[per_intent : per_intent + unseen_per_intent]
        else:
            other += questions[:other_per_intent]
    return QuestionSets(feedback, corrected, other)


def write_without(rows: Sequence[dict[str, str]], intents: Sequence[str], path: Path) -> int:
    """The sample without `intents`, as the starting adapter's training data; returns its rows."""
    kept = [row for row in rows if row["intent"] not in intents]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    return len(kept)


def scores(
    questions: Sequence[Question], answers: Sequence[str], shop: ShopDetails, like_rouge: float
) -> dict[str, float]:
    """ROUGE-L and chrF of `answers` against the references, filled as the app fills replies.

    The app fills {{placeholders}} in what it serves; the references get the same filling so a
    filled detail is not counted as a miss. `like_share` is the share of answers whose own
    ROUGE-L reaches `like_rouge`: the proxy for a customer's like.
    """
    references = [shop.fill(q.answer) for q in questions]
    each = [rouge_l([answer], [ref]) for answer, ref in zip(answers, references, strict=True)]
    return {
        "rougeL": rouge_l(answers, references),
        "chrf": chrf(answers, references),
        "like_share": sum(score >= like_rouge for score in each) / len(each),
        "n_questions": len(questions),
    }
