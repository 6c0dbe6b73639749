"""`DataArguments`: which conversations to train on and how to cut them; the one object every
data preparation takes (`finetune/train.py` parses it, evaluation and the benches build one)."""

from __future__ import annotations

from dataclasses import dataclass, field

from supportlm.errors import SupportLMError
from supportlm.train.data.dataset import check_ratios
from supportlm.train.data.examples import DEFAULT_DATASET
from supportlm.train.data.mixture import check_mixture


@dataclass
class DataArguments:
    """Which conversations to train on, and how to cut them."""

    dataset: str = field(
        default=DEFAULT_DATASET,
        metadata={
            "help": "Training data: a .jsonl/.csv/.json file or a Hugging Face dataset id; "
            "several, comma-separated (or a YAML list), train as one "
            "(supportlm.train.data.mixture)."
        },
    )
    dataset_weights: str | None = field(
        default=None,
        metadata={
            "help": "One weight per dataset, comma-separated (e.g. 1,0.5): scales each one's share "
            "of the training split (0.5: a fixed half, 2: twice); validation and test unchanged."
        },
    )
    replay_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Original training data replayed beside new data (e.g. feedback), so old "
            "skills are not forgotten; its validation and test questions are held out too."
        },
    )
    replay_share: float = field(
        default=0.5,
        metadata={"help": "Share of the training split taken from replay_dataset."},
    )
    max_seq_length: int = field(
        default=512,
        metadata={
            "help": "Longest conversation in tokens (system prompt and template included); longer "
            "ones are dropped, never cut mid-answer. Also TRL's `max_length`."
        },
    )
    validation_ratio: float = field(
        default=0.1, metadata={"help": "Share of questions held out for early stopping."}
    )
    test_ratio: float = field(
        default=0.1, metadata={"help": "Share of questions held out for finetune/evaluate.py."}
    )
    intent_share: float = field(
        default=0.0,
        metadata={
            "help": "For this share of the training conversations that name an intent, also train "
            "the intent question (answer: the intent name); evaluate.py scores it."
        },
    )
    max_eval_examples: int | None = field(
        default=96,
        metadata={
            "help": "Validation conversations scored at each evaluation: a fixed sample stratified "
            "by intent, the same every time. Unset or 0: the whole validation split."
        },
    )
    strict: bool = field(
        default=False,
        metadata={"help": "Fail on the first malformed record instead of skipping it."},
    )
    max_examples: int | None = field(
        default=None,
        metadata={"help": "Keep a deterministic sample of this many examples (quick runs)."},
    )
    assistant_only_loss: bool = field(
        default=True,
        metadata={
            "help": "Compute the loss on assistant answers only (labels -100 on system and user "
            "turns); false trains on every token."
        },
    )

    def __post_init__(self) -> None:
        if self.max_seq_length < 16:
            raise SupportLMError(f"max_seq_length must be at least 16, got {self.max_seq_length}.")
        check_ratios(self.validation_ratio, self.test_ratio)
        for name, least in (("max_eval_examples", 0), ("max_examples", 1)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise SupportLMError(f"{name} must be at least {least}, got {value}.")
        self.dataset, self.dataset_weights = check_mixture(self.dataset, self.dataset_weights)
        if not 0 < self.replay_share < 1:
            raise SupportLMError(f"replay_share must be in (0, 1), got {self.replay_share}.")
        if self.replay_dataset:
            check_mixture(self.replay_dataset, None)
