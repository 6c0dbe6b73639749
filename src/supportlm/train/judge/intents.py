"""Intent accuracy, macro recall and F1: the model's intents and a cheap baseline's.

The model is asked the intent question (`supportlm.prompts.intent_messages`) with greedy
decoding and its answer read with `supportlm.intents.parse_intent`. The baseline is
`supportlm.intent_classifier` (TF-IDF word 1-2-grams with logistic regression, the classifier the
app serves), trained on the same training split's questions: side by side with the model.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

from supportlm.intent_classifier import IntentClassifier
from supportlm.intents import canonical_intent, intent_examples, intent_labels

UNKNOWN = "(none)"


def intent_scores(truth: Sequence[str], predicted: Sequence[str | None]) -> dict[str, float]:
    """Accuracy, macro recall and macro F1 over the true labels (an unreadable answer is wrong)."""
    predicted = [p or UNKNOWN for p in predicted]
    macro = {"labels": sorted(set(truth)), "average": "macro", "zero_division": 0}
    with warnings.catch_warnings():  # "more classes than half the samples": true of small tests
        warnings.simplefilter("ignore", UserWarning)
        scores = {
            "intent_accuracy": accuracy_score(truth, predicted),
            "intent_macro_recall": recall_score(truth, predicted, **macro),
            "intent_macro_f1": f1_score(truth, predicted, **macro),
        }
    return {
        **scores,
        "intent_n": len(truth),
    }


def baseline_predictions(train: Sequence[Any], test: Sequence[Any]) -> list[str]:
    """TF-IDF + logistic regression trained on `train`'s questions, applied to `test`'s."""
    classifier = IntentClassifier.fit(
        [e.first_user_message for e in train], [e.meta["intent"] for e in train]
    )
    return classifier.predict([e.first_user_message for e in test])


def model_intents(
    decoder: Any,
    examples: Sequence[Any],
    labels: Sequence[str],
    system_prompt: str,
    *,
    tuned: bool,
) -> list[str | None]:
    """The intents the model names for `examples`' questions (greedy, a few tokens)."""
    from supportlm.engines.base import GenerationSettings
    from supportlm.intents import parse_intent
    from supportlm.prompts import intent_messages

    settings = GenerationSettings(max_new_tokens=12, temperature=0.0)
    questions = [intent_messages(e.first_user_message, labels, system_prompt) for e in examples]
    events = decoder.decode(questions, settings, use_adapter=tuned, desc="Intents")
    return [parse_intent(event.text, labels) for event in events]


def intent_report(
    decoder: Any, loaded: Any, train: Sequence[Any], test: Sequence[Any], system_prompt: str
) -> dict[str, Any] | None:
    """Intent scores of base, tuned (with an adapter) and the baseline; None without intents."""
    test = intent_examples(test)
    asked = {e.first_user_message for e in test}  # never train the baseline on a test question
    train = [e for e in intent_examples(train) if e.first_user_message not in asked]
    if not test or not train:
        return None
    labels = intent_labels(e.meta["intent"] for e in [*train, *test])
    truth = [canonical_intent(e.meta["intent"]) for e in test]
    predictions = {"baseline": baseline_predictions(train, test)}
    for variant in ("base", "tuned") if loaded.adapter is not None else ("base",):
        predictions[variant] = model_intents(
            decoder, test, labels, system_prompt, tuned=variant == "tuned"
        )
    return {
        "labels": labels,
        "truth": truth,
        "predictions": predictions,
        "scores": {name: intent_scores(truth, p) for name, p in predictions.items()},
    }


def plot_confusion(
    truth: Sequence[str], predicted: Sequence[str | None], path: Path, title: str
) -> Path:
    """A confusion matrix (rows: true intent, columns: predicted) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    predicted = [p or UNKNOWN for p in predicted]
    labels = sorted(set(truth) | set(predicted))
    matrix = confusion_matrix(truth, predicted, labels=labels)
    size = max(6.0, 0.32 * len(labels))
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    axis.set_yticks(range(len(labels)), labels, fontsize=7)
    axis.set_xlabel("predicted intent")
    axis.set_ylabel("true intent")
    axis.set_title(title)
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
