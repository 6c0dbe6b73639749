"""The intent of a customer's message: TF-IDF + logistic regression (scikit-learn).

Why this and not the language model: on the Bitext test split this classifier names the intent
of 98 % of the questions (docs/results/intents-*-bitext.md), the tuned 135M model far fewer, and
it costs well under a millisecond a message next to seconds for a model call. It is fitted on the
questions of a file with an ``intent`` column (the adapter's training data, else the bundled
data) when the app starts: a second or less for a few thousand questions, and nothing to ship
or to unpickle. `supportlm.train.judge.intents` uses the same classifier as its baseline.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supportlm.errors import SupportLMError
from supportlm.intents import TASK_INTENTS, canonical_intent, intent_examples

logger = logging.getLogger(__name__)

DESCRIPTION = "TF-IDF + logistic regression"


@dataclass(frozen=True)
class IntentGuess:
    """The most likely intent of a message and the classifier's probability for it."""

    intent: str
    confidence: float


class IntentClassifier:
    """Word 1-2-gram TF-IDF features, multinomial logistic regression over the intents."""

    def __init__(self, pipeline: Any, n_questions: int, source: str) -> None:
        self._pipeline = pipeline
        self.n_questions = n_questions
        self.source = source

    @classmethod
    def fit(
        cls, questions: Sequence[str], intents: Sequence[str], source: str = "training data"
    ) -> IntentClassifier:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        labels = [canonical_intent(intent) for intent in intents]
        if len(set(labels)) < 2:
            raise ValueError("An intent classifier needs questions of at least two intents.")
        pipeline = make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
            LogisticRegression(max_iter=2000, C=10.0),
        )
        pipeline.fit(list(questions), labels)
        return cls(pipeline, len(questions), source)

    @classmethod
    def from_file(cls, path: Path) -> IntentClassifier | None:
        """Fitted on `path` (`read_intent_questions`); None when it names fewer than 2 intents."""
        started = time.perf_counter()
        questions, intents = read_intent_questions(path)
        if len(set(map(canonical_intent, intents))) < 2:
            logger.warning("No intent classifier: %s names fewer than two intents.", path)
            return None
        # Named by its folder and file: the description is shown to users, a full path is not.
        classifier = cls.fit(questions, intents, f"{path.parent.name}/{path.name}")
        logger.info(
            "Intent classifier: %d intents from %d questions of %s in %.2f s.",
            len(classifier.intents),
            len(questions),
            path,
            time.perf_counter() - started,
        )
        return classifier

    @property
    def intents(self) -> list[str]:
        return [str(label) for label in self._pipeline.classes_]

    @property
    def description(self) -> str:
        return f"{DESCRIPTION} on {self.n_questions} questions of {self.source}"

    def predict(self, messages: Sequence[str]) -> list[str]:
        return [str(label) for label in self._pipeline.predict(list(messages))]

    def guess(self, message: str) -> IntentGuess:
        probabilities = self._pipeline.predict_proba([message])[0]
        best = int(probabilities.argmax())
        return IntentGuess(str(self._pipeline.classes_[best]), float(probabilities[best]))


def write_intent_questions(path: Path, examples: Sequence[Any]) -> int:
    """Save the first user message and intent of each of `examples` that names one (JSONL)."""
    named = intent_examples(e for e in examples if e.meta.get("task") != "intent")
    if len({canonical_intent(e.meta["intent"]) for e in named}) < 2:
        return 0
    rows = [
        {"question": e.first_user_message, "intent": canonical_intent(e.meta["intent"])}
        for e in named
    ]
    path.write_text(
        "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8"
    )
    return len(rows)


def read_intent_questions(path: Path) -> tuple[list[str], list[str]]:
    """Questions and intents of a JSONL file: ``question`` (or ``messages``) and ``intent``.

    Rows without an intent, or with a task (summarise, translate) as intent, are skipped; a line
    that is not a JSON object is an error naming the line.
    """
    questions, intents = [], []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise SupportLMError(f"{path}, line {number}: not JSON ({error.msg}).") from error
            if not isinstance(row, dict):
                raise SupportLMError(f"{path}, line {number}: expected a JSON object.")
            question = row.get("question") or _first_user_message(row.get("messages"))
            intent = row.get("intent")
            if not (isinstance(question, str) and isinstance(intent, str) and intent.strip()):
                continue
            if canonical_intent(intent) not in TASK_INTENTS:
                questions.append(question)
                intents.append(intent)
    return questions, intents


def _first_user_message(messages: Any) -> str | None:
    if not isinstance(messages, list):
        return None
    return next(
        (m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"),
        None,
    )
