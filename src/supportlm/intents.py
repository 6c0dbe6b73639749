"""One intent vocabulary across datasets, and reading an intent out of a model's answer.

The bundled data and Bitext name some intents differently (``contact_human`` vs
``contact_human_agent``); `INTENT_ALIASES` maps the bundled names onto Bitext's, the larger
public vocabulary, in this one place. `canonical_intent` applies it to any label, and
`parse_intent` turns a model's free-text answer to the intent question
(`supportlm.prompts.intent_messages`) into one of the known labels.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any

#: Bundled-data name -> the Bitext name of the same intent.
INTENT_ALIASES = {
    "change_address": "change_shipping_address",
    "contact_human": "contact_human_agent",
    "invoice_request": "get_invoice",
    "leave_review": "review",
    "newsletter_unsubscribe": "newsletter_subscription",
    "payment_failed": "payment_issue",
    "payment_methods": "check_payment_methods",
    "refund_status": "track_refund",
    "reset_password": "recover_password",
}

#: Intents that are tasks of the app, not customer intents.
TASK_INTENTS = frozenset({"summarize", "translate"})


def canonical_intent(label: str) -> str:
    """`label` in the one vocabulary: lower snake case, bundled names mapped to Bitext's."""
    key = "_".join(label.strip().lower().replace("-", " ").split())
    return INTENT_ALIASES.get(key, key)


def intent_labels(intents: Iterable[str | None]) -> list[str]:
    """The sorted canonical customer intents among `intents` (tasks and blanks left out)."""
    labels = {canonical_intent(i) for i in intents if i}
    return sorted(labels - TASK_INTENTS)


def intent_examples(examples: Iterable[Any]) -> list[Any]:
    """The examples (anything with a ``meta`` dict) whose intent is a customer intent."""
    examples = list(examples)
    known = set(intent_labels(e.meta.get("intent") for e in examples))
    return [e for e in examples if canonical_intent(e.meta.get("intent") or "") in known]


def parse_intent(answer: str, labels: Sequence[str]) -> str | None:
    """The label `answer` names: its first word-run that is a label, else the closest label.

    Returns None when nothing in the answer is close to any label (cutoff 0.6).
    """
    first_line = answer.strip().splitlines()[0] if answer.strip() else ""
    candidate = canonical_intent(first_line.strip(" .`'\"*:"))
    if candidate in labels:
        return candidate
    for word in first_line.replace(",", " ").split():
        if canonical_intent(word.strip(" .`'\"*:")) in labels:
            return canonical_intent(word.strip(" .`'\"*:"))
    close = difflib.get_close_matches(candidate, labels, n=1, cutoff=0.6)
    return close[0] if close else None
