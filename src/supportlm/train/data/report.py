"""The data report: what became of a dataset on its way to training (printed and saved)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from supportlm.train.data.examples import Example, LoadStats

if TYPE_CHECKING:
    from supportlm.train.data.dataset import CleanStats

#: Why examples are dropped, in pipeline order, as the data report words it.
DROP_REASONS = {
    "malformed": "malformed records skipped",
    "empty": "an empty message",
    "duplicate": "duplicate after normalisation",
    "not_sampled": "not sampled (max_examples)",
    "too_long": "longer than {max_seq_length} tokens",
}


@dataclass
class DataReport:
    """What became of a dataset on its way to training; printed before training starts."""

    source: str
    shape: str
    max_seq_length: int | None
    num_records: int
    #: Examples dropped by each step, in pipeline order (see `DROP_REASONS`).
    dropped: dict[str, int]
    num_examples: int
    splits: dict[str, int]
    malformed_examples: list[str]
    by_intent: dict[str, int]
    by_category: dict[str, int]
    by_task: dict[str, int]
    #: ``{"total"|"supervised": {"p50", "p90", "p95", "p99", "max"}}``; empty without a tokenizer.
    token_lengths: dict[str, dict[str, int]]
    multi_turn: int

    @classmethod
    def build(
        cls,
        load_stats: LoadStats,
        clean_stats: CleanStats,
        splits: dict[str, list[Example]],
        *,
        max_seq_length: int | None = None,
        not_sampled: int = 0,
    ) -> DataReport:
        examples = [example for split in splits.values() for example in split]
        dropped = {
            "malformed": load_stats.num_malformed,
            "empty": clean_stats.empty_dropped,
            "duplicate": clean_stats.duplicates_dropped,
            "not_sampled": not_sampled,
            "too_long": clean_stats.too_long_dropped,
        }
        token_lengths = {}
        if clean_stats.num_tokens:
            for kind, lengths in (
                ("total", clean_stats.num_tokens),
                ("supervised", clean_stats.num_supervised_tokens),
            ):
                # inverted_cdf: every percentile is a length that really occurs in the data.
                percentiles = np.percentile(lengths, [50, 90, 95, 99], method="inverted_cdf")
                token_lengths[kind] = {
                    **{f"p{q}": int(v) for q, v in zip((50, 90, 95, 99), percentiles, strict=True)},
                    "max": int(max(lengths)),
                }
        return cls(
            source=load_stats.source,
            shape=load_stats.shape,
            max_seq_length=max_seq_length,
            num_records=load_stats.num_records,
            dropped=dropped,
            num_examples=len(examples),
            splits={name: len(split) for name, split in splits.items()},
            malformed_examples=[str(record) for record in load_stats.malformed],
            by_intent=_count_meta(examples, "intent"),
            by_category=_count_meta(examples, "category"),
            by_task=_count_meta(examples, "task"),
            token_lengths=token_lengths,
            multi_turn=sum(example.is_multi_turn for example in examples),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        lines = [
            f"# Data report: {self.source}",
            "",
            f"Shape: {self.shape}. Multi-turn conversations: {self.multi_turn}.",
            "",
            "| step | dropped | examples left |",
            "|---|---:|---:|",
            f"| records read | | {self.num_records} |",
        ]
        remaining = self.num_records
        for reason, count in self.dropped.items():
            remaining -= count
            if reason != "not_sampled" or count:
                label = DROP_REASONS[reason].format(max_seq_length=self.max_seq_length)
                lines.append(f"| {label} | {count} | {remaining} |")
        lines += [f"| {name} split | | {count} |" for name, count in self.splits.items()]
        if self.malformed_examples:
            lines += ["", "First malformed records:", ""]
            lines += [f"- {record}" for record in self.malformed_examples]
        if self.token_lengths:
            limit = f" (max_seq_length {self.max_seq_length})" if self.max_seq_length else ""
            lines += [
                "",
                f"Tokens per example{limit}:",
                "",
                "| tokens | p50 | p90 | p95 | p99 | max |",
                "|---|---:|---:|---:|---:|---:|",
                *(
                    f"| {kind} | " + " | ".join(str(v) for v in values.values()) + " |"
                    for kind, values in self.token_lengths.items()
                ),
            ]
        for title, counts in (
            ("task", self.by_task),
            ("category", self.by_category),
            ("intent", self.by_intent),
        ):
            if counts:
                lines += ["", f"| {title} | examples |", "|---|---:|"]
                lines += [f"| {value} | {count} |" for value, count in counts.items()]
        return "\n".join(lines) + "\n"

    def save(self, directory: str | Path) -> None:
        """Write ``data_report.json`` and ``data_report.md`` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "data_report.json").write_text(
            json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        (directory / "data_report.md").write_text(self.to_markdown(), encoding="utf-8")


def _count_meta(examples: list[Example], key: str) -> dict[str, int]:
    return dict(Counter(e.meta[key] for e in examples if key in e.meta).most_common())
