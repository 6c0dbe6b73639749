"""Which held-out conversations `finetune/evaluate.py` scores, and why (see `evaluation`).

By default the test split of the data the adapter was trained on: the run folder records the
hashes of the questions it held out (``split.json``, `RunFolder.split`), and those are scored;
folders from before it are re-split with the run's ratios (the split is a hash of each first user
message). Another ``--dataset`` is scored whole unless it is the training data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supportlm.errors import SupportLMError
from supportlm.modeling import adapter_base_model
from supportlm.run_folder import RunFolder
from supportlm.train.data.arguments import DataArguments
from supportlm.train.data.dataset import prepare_dataset, split_as_recorded
from supportlm.train.data.examples import DEFAULT_DATASET, Example
from supportlm.train.data.mixture import dataset_sources
from supportlm.train.data.sampling import sample_examples
from supportlm.train.fit.config import run_config
from supportlm.train.judge.arguments import EvaluationArguments

logger = logging.getLogger(__name__)


@dataclass
class EvaluationData:
    """The examples to evaluate and where they come from, in words for the report."""

    examples: list[Example]
    dataset: str
    split: str  # "test" | "all"
    reason: str
    max_seq_length: int
    num_available: int
    #: The training split, for the intent baseline (TF-IDF + logistic regression).
    train_examples: list[Example] = field(default_factory=list)


def check_adapter(adapter: str) -> str | None:
    """The base model `adapter` was trained on; raises if the adapter cannot be read."""
    if not Path(adapter).expanduser().exists() and adapter.startswith((".", "/", "~")):
        raise SupportLMError(f"Adapter folder {adapter} does not exist.")
    try:
        return adapter_base_model(adapter)
    except SupportLMError as error:
        if not Path(adapter).expanduser().exists():
            raise SupportLMError(
                f"Adapter folder {adapter} does not exist (and it is no Hub adapter that could be "
                "downloaded); train one with finetune/train.py."
            ) from error
        raise


def _same_dataset(a: str, b: str) -> bool:
    """Whether two dataset settings name the same sources (paths compared resolved)."""

    def key(name: str) -> str:
        path = Path(name).expanduser()
        return str(path.resolve()) if path.exists() else name.rstrip("/")

    return sorted(map(key, dataset_sources(a))) == sorted(map(key, dataset_sources(b)))


def select_data(
    args: EvaluationArguments,
    tokenizer: Any,
    system_prompt: str,
    run: RunFolder | None,
    context_length: int,
) -> EvaluationData:
    """Load and split the evaluation data as `args` asks; see the module docstring."""
    training = run_config(run) if run is not None else None
    trained_on = training.data.dataset if training else None
    dataset = args.dataset or trained_on or DEFAULT_DATASET
    is_training_data = trained_on is not None and _same_dataset(dataset, trained_on)
    recorded = run.split() if is_training_data else None
    # Without a recorded split, the training run's ratios re-derive it (the split is a hash);
    # without a run, the data module's defaults apply, and only the context length limits.
    source = training.data if is_training_data else None
    data_args = DataArguments(
        dataset=dataset,
        max_seq_length=source.max_seq_length if source else context_length,
        validation_ratio=source.validation_ratio if source else 0.1,
        test_ratio=source.test_ratio if source else 0.1,
    )
    split = args.split
    if split == "auto":
        split = "test" if args.dataset is None or is_training_data else "all"
    reason = _split_reason(split, trained_on, is_training_data, recorded is not None)
    prepared = prepare_dataset(data_args, tokenizer, system_prompt=system_prompt)
    if recorded is not None:
        prepared.splits = split_as_recorded(prepared.splits, recorded)
    if split == "test":
        examples = prepared.splits["test"]
    else:
        examples = [example for part in prepared.splits.values() for example in part]
    if not examples:
        raise SupportLMError(
            f"The {split} split of {dataset} is empty; use a larger dataset or --split all."
        )
    available = len(examples)
    if args.limit is not None:
        examples = sample_examples(examples, args.limit)
    return EvaluationData(
        examples=examples,
        dataset=str(dataset),
        split=split,
        reason=reason,
        max_seq_length=data_args.max_seq_length,
        num_available=available,
        train_examples=prepared.splits["train"],
    )


def _split_reason(split: str, trained_on: str | None, is_training_data: bool, recorded: bool):
    """Which questions are scored, in words for the report."""
    if split == "test" and is_training_data:
        how = "the questions its run recorded" if recorded else "same ratios, same hash"
        return f"held out from the adapter's training data ({how})"
    if split == "test":
        return "by hash of the first user message, default ratios"
    if trained_on is None:
        return "no training data recorded to hold out"
    if is_training_data:
        reason = "INCLUDING those the adapter was trained on: scores are optimistic"
        logger.warning("Evaluating on the adapter's own training data: %s", reason)
        return reason
    return f"the adapter was trained on other data ({trained_on})"
