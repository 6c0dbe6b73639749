"""Several datasets trained as one: the sources of a ``dataset`` setting and their weights.

``--dataset data/customer_support.jsonl,../shared/data/bitext-customer-support/train.csv`` (or a
YAML list) loads every source and tags each example with it (``meta["dataset"]``); the mixture
is then cleaned and split by question hash as one dataset, so a question shared by two sources
still lands in one split, and evaluation re-splits it exactly. ``--dataset_weights 1,0.5``
weights the sources in the *training* split only: 0.5 keeps a fixed half of that source's
training examples, 2 repeats them twice, so validation and test stay what the data holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from supportlm.errors import SupportLMError
from supportlm.train.data.examples import (
    FILE_SUFFIXES,
    MAX_REPORTED_MALFORMED,
    Example,
    LoadStats,
    load_examples,
    resolve_path,
)
from supportlm.train.data.sampling import sample_examples


def dataset_sources(dataset: str | Sequence[str]) -> list[str]:
    """The sources of a `dataset` setting: one, or several separated by commas (or a list)."""
    items = dataset.split(",") if isinstance(dataset, str) else list(dataset)
    sources = [str(item).strip() for item in items if str(item).strip()]
    if not sources:
        raise SupportLMError("No dataset given.")
    return sources


def dataset_weights(weights: str | Sequence[float] | None, sources: Sequence[str]) -> list[float]:
    """One positive weight per source (all 1 when `weights` is unset)."""
    if weights is None or weights == "":
        return [1.0] * len(sources)
    items = weights.split(",") if isinstance(weights, str) else list(weights)
    try:
        values = [float(item) for item in items]
    except ValueError as error:
        raise SupportLMError(f"dataset_weights must be numbers, got {weights!r}.") from error
    if len(values) != len(sources):
        raise SupportLMError(
            f"dataset_weights has {len(values)} values for {len(sources)} datasets."
        )
    if any(not math.isfinite(value) or value <= 0 for value in values):
        raise SupportLMError(f"dataset_weights must be positive, got {weights!r}.")
    return values


def check_mixture(dataset: Any, weights: Any) -> tuple[str, str | None]:
    """The `dataset` and `weights` settings as comma-separated strings (a YAML list is one),
    checked: a weight per source, each positive, every named file there."""
    if not isinstance(dataset, str):
        dataset = ",".join(str(source) for source in dataset)
    if weights is not None and not isinstance(weights, str):
        weights = ",".join(str(weight) for weight in weights)
    sources = dataset_sources(dataset)
    dataset_weights(weights, sources)
    for source in sources:
        if source.endswith(FILE_SUFFIXES) and resolve_path(source) is None:
            raise SupportLMError(f"Dataset file {source} does not exist.")
    return dataset, weights


def load_mixture(
    dataset: str | Sequence[str], *, strict: bool = False
) -> tuple[list[Example], LoadStats]:
    """`load_examples` of each source, concatenated; one `LoadStats` for them all.

    With several sources each example names its own in ``meta["dataset"]``.
    """
    sources = dataset_sources(dataset)
    if len(sources) == 1:
        return load_examples(sources[0], strict=strict)
    examples: list[Example] = []
    parts = []
    for source in sources:
        loaded, stats = load_examples(source, strict=strict)
        for example in loaded:
            example.meta["dataset"] = source
        examples += loaded
        parts.append(stats)
    combined = LoadStats(
        source=" + ".join(stats.source for stats in parts),
        shape=" + ".join(stats.shape for stats in parts),
        num_records=sum(stats.num_records for stats in parts),
        num_malformed=sum(stats.num_malformed for stats in parts),
        malformed=[m for stats in parts for m in stats.malformed][:MAX_REPORTED_MALFORMED],
    )
    return examples, combined


def weigh(examples: list[Example], sources: Sequence[str], weights: Sequence[float]) -> list:
    """The training examples with each source's share scaled by its weight.

    The whole part of a weight repeats a source's examples; the fraction adds a fixed sample of
    them (the smallest content hashes, `sample_examples`), so the same setting gives the same
    training set on every run.
    """
    if all(weight == 1 for weight in weights):
        return examples
    weighted: list[Example] = []
    for source, weight in zip(sources, weights, strict=True):
        part = [e for e in examples if e.meta.get("dataset", sources[0]) == source]
        weighted += part * int(weight)
        extra = round((weight - int(weight)) * len(part))
        if part and extra:
            weighted += sample_examples(part, extra)
    return weighted


def with_replay(
    examples: list[Example],
    replay: str | None,
    share: float,
    weigh_new: Callable[[list[Example]], list[Example]],
) -> list[Example]:
    """The training examples: the new ones weighed by `weigh_new`, and the replay source's
    repeated or sampled (`weigh`) so that they make up `share` of the result."""
    if not replay:
        return weigh_new(examples)
    new = weigh_new([e for e in examples if e.meta.get("dataset") != replay])
    old = [e for e in examples if e.meta.get("dataset") == replay]
    if not new or not old:
        raise SupportLMError(
            f"Replay needs training examples from both the new data ({len(new)}) and "
            f"{replay} ({len(old)})."
        )
    wanted = len(new) * share / (1 - share)
    return new + weigh(old, [replay], [wanted / len(old)])
