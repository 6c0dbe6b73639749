"""Several datasets as one: sources, weights on the training split only, configs, lineage."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from test_data import tokenizer  # noqa: F401 (the word-level fixture)

from supportlm.errors import SupportLMError
from supportlm.train.data.arguments import DataArguments
from supportlm.train.data.dataset import prepare_dataset
from supportlm.train.data.mixture import dataset_sources, dataset_weights
from supportlm.train.fit.config import parse_config


@pytest.fixture
def two_datasets(tmp_path) -> tuple[Path, Path]:
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"chat question {i}"},
                        {"role": "assistant", "content": f"chat answer {i}"},
                    ]
                }
            )
            + "\n"
            for i in range(60)
        )
    )
    table = tmp_path / "pairs.csv"
    with table.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["instruction", "response", "intent"])
        writer.writerows([f"csv question {i}", f"csv answer {i}", "track_order"] for i in range(40))
    return chat, table


def _prepare(source, tokenizer, weights=None):  # noqa: F811
    data = DataArguments(dataset=source, max_seq_length=64, dataset_weights=weights)
    return prepare_dataset(data, tokenizer, system_prompt=None)


def test_a_mixture_loads_every_source_and_splits_them_as_one(two_datasets, tokenizer):  # noqa: F811
    chat, table = two_datasets
    mixed = _prepare(f"{chat},{table}", tokenizer)
    every = [e for split in mixed.splits.values() for e in split]
    assert Counter(e.meta["dataset"] for e in every) == {str(chat): 60, str(table): 40}
    assert mixed.report.source == f"{chat} + {table}"
    # Each source's split is the one it gets alone: the hash of the question decides.
    alone = _prepare(str(table), tokenizer)
    for name in ("validation", "test"):
        mixed_questions = {
            e.first_user_message for e in mixed.splits[name] if e.meta["dataset"] == str(table)
        }
        assert mixed_questions == {e.first_user_message for e in alone.splits[name]}


def test_weights_scale_the_training_split_only(two_datasets, tokenizer):  # noqa: F811
    chat, table = two_datasets
    plain = _prepare([str(chat), str(table)], tokenizer)
    weighted = _prepare([str(chat), str(table)], tokenizer, weights="2,0.5")

    def counts(prepared, split):
        return Counter(e.meta["dataset"] for e in prepared.splits[split])

    train, train_plain = counts(weighted, "train"), counts(plain, "train")
    assert train[str(chat)] == 2 * train_plain[str(chat)]
    assert train[str(table)] == round(0.5 * train_plain[str(table)])
    for split in ("validation", "test"):
        assert counts(weighted, split) == counts(plain, split)
    again = _prepare([str(chat), str(table)], tokenizer, weights="2,0.5")
    assert [e.messages for e in again.splits["train"]] == [
        e.messages for e in weighted.splits["train"]
    ]


@pytest.mark.parametrize(
    ("weights", "message"),
    [("1", "1 values for 2 datasets"), ("1,0", "must be positive"), ("1,x", "must be numbers")],
)
def test_bad_weights_are_one_clear_sentence(weights, message):
    with pytest.raises(SupportLMError, match=message):
        dataset_weights(weights, ["a.jsonl", "b.csv"])


def test_configs_take_a_list_or_commas_and_check_every_file(two_datasets, tmp_path):
    chat, table = two_datasets
    config_file = tmp_path / "mix.yaml"
    config_file.write_text(
        yaml.safe_dump({"dataset": [str(chat), str(table)], "dataset_weights": [1, 0.5]})
    )
    config = parse_config(["--config", str(config_file), "--output_dir", str(tmp_path / "out")])
    assert config.data.dataset == f"{chat},{table}" and config.data.dataset_weights == "1,0.5"
    assert dataset_sources(config.data.dataset) == [str(chat), str(table)]
    with pytest.raises(SupportLMError, match="nope.csv does not exist"):
        parse_config(["--dataset", f"{chat},{tmp_path / 'nope.csv'}"])
