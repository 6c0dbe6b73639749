"""The intent of each customer message, and the ones a person must handle (hand-over).

`IntentRouter` classifies the newest customer message with `supportlm.intent_classifier` and
says whether it is one of the settings' hand-over intents (complaints, requests for a human
agent, account deletion by default). A hand-over still gets the assistant's first reply, with a
visible notice that a person will take it over; the reply is stored with its intent and the
hand-over flag, so a team can list what the assistant did not handle
(``python finetune/feedback.py handovers``).

Which questions the classifier learns from, first found: ``SUPPORTLM_INTENT_DATA``; the adapter's
``intent_questions.jsonl`` (its training split); the bundled data (``data/customer_support.jsonl``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from supportlm.errors import SupportLMError
from supportlm.intent_classifier import IntentClassifier
from supportlm.intents import canonical_intent
from supportlm.run_folder import RunFolder
from supportlm.serve.settings import AppSettings

logger = logging.getLogger(__name__)

BUNDLED_DATA = Path(__file__).resolve().parents[3] / "data" / "customer_support.jsonl"


@dataclass(frozen=True)
class Routing:
    """What the router decided for one message."""

    intent: str
    confidence: float
    handover: bool

    @property
    def caption(self) -> str:
        return f"intent {self.intent} ({self.confidence:.0%})"

    @property
    def notice(self) -> str | None:
        if not self.handover:
            return None
        return (
            f"🙋 Handed over to a person: this looks like *{self.intent.replace('_', ' ')}*, "
            "which our support team handles itself. The answer below is a first reply; a team "
            "member will follow up."
        )


class IntentRouter:
    """A fitted intent classifier and the intents that go to a person."""

    def __init__(
        self,
        classifier: IntentClassifier | None,
        handover_intents: frozenset[str],
        min_confidence: float = 0.5,
    ) -> None:
        self.classifier = classifier
        self.handover_intents = handover_intents
        self.min_confidence = min_confidence

    @classmethod
    def from_settings(cls, settings: AppSettings, run: RunFolder | None) -> IntentRouter:
        handover = frozenset(
            canonical_intent(name) for name in settings.handover_intents.split(",") if name.strip()
        )
        source = settings.intent_data or (run and run.intent_questions()) or BUNDLED_DATA
        try:
            classifier = IntentClassifier.from_file(Path(source))
        except (OSError, SupportLMError) as error:
            if settings.intent_data:  # asked for by name: a wrong file is the operator's error
                raise SupportLMError(f"SUPPORTLM_INTENT_DATA: {error}") from error
            logger.warning("No intent classifier (%s): intents are not shown.", error)
            classifier = None
        if classifier is not None and (unknown := handover - set(classifier.intents)):
            logger.warning("Hand-over intents the classifier never names: %s", sorted(unknown))
        return cls(classifier, handover, settings.handover_min_confidence)

    @property
    def description(self) -> str:
        if self.classifier is None:
            return "off (no questions with intents to learn from)"
        return self.classifier.description

    def route(self, message: str) -> Routing | None:
        """The intent of `message` and whether it goes to a person (None without a classifier)."""
        if self.classifier is None or not message.strip():
            return None
        guess = self.classifier.guess(message)
        handover = guess.intent in self.handover_intents and guess.confidence >= self.min_confidence
        return Routing(guess.intent, guess.confidence, handover)
