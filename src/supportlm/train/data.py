"""Training data: load, clean, de-duplicate, split and report.

A dataset is a JSON Lines, CSV or JSON list file, or a Hugging Face dataset id. Its records may
have any of four shapes (`SHAPES`), detected once per dataset from its first valid record:

- chat: ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}``
  with an optional leading system message, then user and assistant turns alternating;
- instruction/response: ``{"instruction": ..., "response": ...}`` (the Bitext CSV);
- alpaca: ``{"instruction": ..., "input": ..., "output": ...}``;
- sharegpt: ``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}``.

Every record becomes an `Example` (chat messages plus ``intent``/``category``/``task`` metadata),
is cleaned (`normalize_text`), de-duplicated, measured with the exact tokenisation used for
training (`supportlm.prompts.tokenize_conversation`), and assigned to train/validation/test by a
hash of its first user message, so a question never appears in two splits. `prepare_dataset` does
all of it and returns a `DataReport` to print before training and save next to the adapter.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from supportlm.errors import SupportLMError
from supportlm.prompts import IGNORE_INDEX, tokenize_conversation, with_system_prompt

__all__ = [
    "DEFAULT_DATASET",
    "SHAPES",
    "SPLITS",
    "CleanStats",
    "DataReport",
    "Example",
    "LoadStats",
    "MalformedRecord",
    "PreparedDataset",
    "assign_split",
    "clean_examples",
    "load_examples",
    "normalize_text",
    "prepare_dataset",
    "sample_examples",
    "split_examples",
    "with_system_prompt",
]

logger = logging.getLogger(__name__)

#: The bundled dataset; a relative path is looked up in the working directory, then in the repo.
DEFAULT_DATASET = "data/customer_support.jsonl"
REPO_ROOT = Path(__file__).resolve().parents[2]

SHAPES: dict[str, str] = {
    "chat": '{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}',
    "instruction_response": '{"instruction": "...", "response": "..."}',
    "alpaca": '{"instruction": "...", "input": "...", "output": "..."}',
    "sharegpt": '{"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}',
}
SPLITS = ("train", "validation", "test")
FILE_SUFFIXES = (".jsonl", ".json", ".csv")
META_KEYS = ("intent", "category", "task")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
#: Why examples are dropped, in pipeline order, as the data report words it.
DROP_REASONS = {
    "malformed": "malformed records skipped",
    "empty": "an empty message",
    "duplicate": "duplicate after normalisation",
    "not_sampled": "not sampled (max_examples)",
    "too_long": "longer than {max_seq_length} tokens",
}
#: How many malformed records the report quotes; the rest are only counted.
MAX_REPORTED_MALFORMED = 5
#: Below this many examples tokenising takes about a second, not worth a progress bar.
PROGRESS_BAR_MIN_EXAMPLES = 2000

Message = dict[str, str]

_HORIZONTAL_SPACE = re.compile(r"[^\S\n]+")
_INDENT = re.compile(r"[^\S\n]*")
_EXTRA_BLANK_LINES = re.compile(r"\n{3,}")


@dataclass
class Example:
    """One conversation in chat format, plus where it came from."""

    messages: list[Message]
    #: ``intent``, ``category`` and ``task`` when the record has them, and ``source_line``.
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def first_user_message(self) -> str:
        return next(m["content"] for m in self.messages if m["role"] == "user")

    @property
    def is_multi_turn(self) -> bool:
        return sum(m["role"] == "user" for m in self.messages) > 1


@dataclass
class MalformedRecord:
    location: str  # "line 17" in a file, "row 17" in a Hub dataset
    reason: str

    def __str__(self) -> str:
        return f"{self.location}: {self.reason}"


@dataclass
class LoadStats:
    source: str
    shape: str
    num_records: int = 0
    num_malformed: int = 0
    #: The first `MAX_REPORTED_MALFORMED` malformed records.
    malformed: list[MalformedRecord] = field(default_factory=list)

    @property
    def num_loaded(self) -> int:
        return self.num_records - self.num_malformed


@dataclass
class CleanStats:
    num_input: int = 0
    empty_dropped: int = 0
    duplicates_dropped: int = 0
    too_long_dropped: int = 0
    #: Token counts of the kept examples, when a tokenizer was given.
    num_tokens: list[int] = field(default_factory=list)
    num_supervised_tokens: list[int] = field(default_factory=list)


class _Malformed(ValueError):
    """A record that cannot become an `Example`; the message is the reason."""


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_examples(
    source: str | Path, *, strict: bool = False, split: str = "train"
) -> tuple[list[Example], LoadStats]:
    """Read every record of `source` as an `Example`.

    `source` is a ``.jsonl``, ``.csv`` or ``.json`` file, or a Hugging Face dataset id (loaded
    with `datasets.load_dataset(source, split=split)`). A malformed record is skipped and counted,
    or with `strict` raises `SupportLMError` naming its line.
    """
    name = str(source)
    path = _resolve_path(name)
    if path is None:
        if Path(name).suffix.lower() in FILE_SUFFIXES:
            raise SupportLMError(f"Data file not found: {name}.")
        records = _read_hub(name, split)
    elif path.is_dir() or path.suffix.lower() not in FILE_SUFFIXES:
        raise SupportLMError(f"{name} is not a .jsonl, .csv or .json file.")
    else:
        records = _read_file(path, name)
    return _parse_records(records, name, strict)


def _resolve_path(source: str) -> Path | None:
    path = Path(source).expanduser()
    if path.exists():
        return path
    # Lets `DEFAULT_DATASET` work from any working directory inside a source checkout.
    if not path.is_absolute() and (REPO_ROOT / path).exists():
        return REPO_ROOT / path
    return None


def _read_file(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, record or _Malformed)`` for every record of a local file.

    JSON Lines and CSV are parsed here rather than with `datasets`, because its JSON and CSV
    loaders fail or silently drop a bad row without saying which line it was on.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SupportLMError(f"{name} is not UTF-8 text (byte {exc.start}).") from exc
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(text, name)
    if suffix == ".json" and text.lstrip().startswith("["):
        return _read_json_list(text, name)
    return _read_jsonl(text)


def _read_jsonl(text: str) -> Iterator[tuple[str, Any]]:
    # Split on "\n" only: str.splitlines would also split inside strings holding U+2028.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            record = _Malformed(f"invalid JSON ({exc.msg} at column {exc.colno})")
        yield f"line {line_number}", record


def _read_json_list(text: str, name: str) -> Iterator[tuple[str, Any]]:
    # Decoding item by item (instead of one json.loads) keeps the line number of each record.
    decoder = json.JSONDecoder()
    whitespace = re.compile(r"\s*")
    index = whitespace.match(text, text.index("[") + 1).end()
    line_number, counted_up_to = 1, 0
    while index < len(text) and text[index] != "]":
        try:
            record, end = decoder.raw_decode(text, index)
        except json.JSONDecodeError as exc:
            # Past a syntax error the rest of a JSON list cannot be located, so nothing is skipped.
            raise SupportLMError(f"{name} line {exc.lineno}: invalid JSON ({exc.msg}).") from exc
        line_number += text.count("\n", counted_up_to, index)
        counted_up_to = index
        yield f"line {line_number}", record
        index = whitespace.match(text, end).end()
        if index < len(text) and text[index] == ",":
            index = whitespace.match(text, index + 1).end()
        elif index >= len(text) or text[index] != "]":
            line = line_number + text.count("\n", counted_up_to, index)
            raise SupportLMError(f"{name} line {line}: expected ',' or ']' after a record.")


def _read_csv(text: str, name: str) -> Iterator[tuple[str, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        return
    header = [column.strip() for column in header]
    if _detect_shape(header) is None:
        raise SupportLMError(
            f"{name} has columns {', '.join(header)}, which fit none of the accepted shapes: "
            f"{_describe_shapes()}."
        )
    # `line_num` counts physical lines, so a quoted answer spanning lines still maps to the line
    # where its row starts (header = line 1).
    end_of_previous = reader.line_num
    try:
        for row in reader:
            location = f"line {end_of_previous + 1}"
            end_of_previous = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                yield location, _Malformed(f"{len(row)} fields where the header has {len(header)}")
                continue
            yield location, _decode_json_columns(dict(zip(header, row, strict=True)))
    except csv.Error as exc:
        raise SupportLMError(f"{name} line {reader.line_num}: unreadable CSV ({exc}).") from exc


def _decode_json_columns(row: dict[str, str]) -> dict[str, Any] | _Malformed:
    # A CSV cell can only hold text, so chat and sharegpt turns are stored as a JSON list.
    for column in ("messages", "conversations"):
        if column in row:
            try:
                row[column] = json.loads(row[column])
            except json.JSONDecodeError as exc:
                return _Malformed(f"column {column!r} is not a JSON list ({exc.msg})")
    return row


def _read_hub(dataset_id: str, split: str) -> Iterator[tuple[str, Any]]:
    # Imported here because only Hub ids need it and it takes about a second to import.
    from datasets import load_dataset

    try:
        dataset = load_dataset(dataset_id, split=split)
    except Exception as exc:  # the Hub, network and dataset scripts fail in many different ways
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SupportLMError(
            f"{dataset_id!r} is neither a local file nor a Hugging Face dataset that could be "
            f"loaded (split {split!r}): {reason}"
        ) from exc
    for row_number, record in enumerate(dataset, start=1):
        yield f"row {row_number}", record


def _parse_records(
    records: Iterable[tuple[str, Any]], name: str, strict: bool
) -> tuple[list[Example], LoadStats]:
    examples: list[Example] = []
    stats = LoadStats(source=name, shape="")
    for location, record in records:
        stats.num_records += 1
        try:
            example, shape = _to_example(record, stats.shape)
        except _Malformed as exc:
            if strict:
                raise SupportLMError(f"{name} {location}: {exc}.") from None
            stats.num_malformed += 1
            if len(stats.malformed) < MAX_REPORTED_MALFORMED:
                stats.malformed.append(MalformedRecord(location, str(exc)))
            continue
        stats.shape = shape
        example.meta["source_line"] = int(location.split()[-1])
        examples.append(example)
    if not examples:
        first_problem = f" ({stats.malformed[0]})" if stats.malformed else ""
        raise SupportLMError(
            f"{name} has no record in an accepted shape{first_problem}; accepted shapes: "
            f"{_describe_shapes()}."
        )
    if stats.num_malformed:
        logger.warning(
            "%s: skipped %d malformed records, first: %s",
            name,
            stats.num_malformed,
            stats.malformed[0],
        )
    return examples, stats


def _describe_shapes() -> str:
    return "; ".join(f"{shape} {example}" for shape, example in SHAPES.items())


def _detect_shape(keys: Iterable[str]) -> str | None:
    keys = set(keys)
    if "messages" in keys:
        return "chat"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"instruction", "response"} <= keys:
        return "instruction_response"
    return None


def _to_example(record: Any, shape: str) -> tuple[Example, str]:
    """Convert one record; `shape` is the dataset's shape, or "" until one record has fit."""
    if isinstance(record, _Malformed):
        raise record
    if not isinstance(record, dict):
        raise _Malformed(f"expected a JSON object, got {type(record).__name__}")
    if not shape:
        shape = _detect_shape(record) or ""
        if not shape:
            raise _Malformed(
                f"keys {', '.join(map(str, record)) or '(none)'} fit none of the accepted "
                f"shapes: {_describe_shapes()}"
            )
    if shape == "chat":
        messages = _turns(record, "messages", "role", "content", None)
    elif shape == "sharegpt":
        messages = _turns(record, "conversations", "from", "value", SHAREGPT_ROLES)
    elif shape == "alpaca":
        instruction = _text_field(record, "instruction")
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise _Malformed(f"field 'input' must be text, got {type(extra).__name__}")
        if extra and extra.strip():
            instruction = f"{instruction}\n\n{extra}"
        messages = _exchange(instruction, _text_field(record, "output"))
    else:
        messages = _exchange(_text_field(record, "instruction"), _text_field(record, "response"))
    meta = {key: str(record[key]) for key in META_KEYS if record.get(key) not in (None, "")}
    return Example(messages=messages, meta=meta), shape


def _exchange(question: str, answer: str) -> list[Message]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _text_field(record: dict[str, Any], key: str) -> str:
    if key not in record:
        raise _Malformed(f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise _Malformed(f"field {key!r} must be text, got {type(value).__name__}")
    return value


def _turns(
    record: dict[str, Any],
    key: str,
    role_key: str,
    content_key: str,
    role_names: dict[str, str] | None,
) -> list[Message]:
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise _Malformed(f"field {key!r} must be a non-empty list")
    messages = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise _Malformed(f"message {number} is not an object")
        role, content = turn.get(role_key), turn.get(content_key)
        if not isinstance(role, str) or not isinstance(content, str):
            raise _Malformed(f"message {number} needs text {role_key!r} and {content_key!r}")
        if role_names is not None:
            if role not in role_names:
                raise _Malformed(
                    f"message {number} has unknown {role_key!r} {role!r} "
                    f"(use {', '.join(role_names)})"
                )
            role = role_names[role]
        messages.append({"role": role, "content": content})
    _check_roles(messages)
    return messages


def _check_roles(messages: list[Message]) -> None:
    offset = 1 if messages[0]["role"] == "system" else 0
    for number, message in enumerate(messages[offset:], start=offset + 1):
        expected = "user" if (number - offset) % 2 == 1 else "assistant"
        if message["role"] != expected:
            raise _Malformed(
                f"message {number} has role {message['role']!r} where {expected!r} was expected "
                "(after an optional system message, user and assistant alternate)"
            )
    if len(messages) - offset < 2 or messages[-1]["role"] != "assistant":
        raise _Malformed("the conversation must end with an assistant answer")


# ---------------------------------------------------------------------------------------------
# Cleaning
# ---------------------------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """Unicode NFC, one kind of line ending, single spaces, at most one blank line in a row.

    Line breaks and paragraph breaks are kept (answers contain numbered lists), and so is the
    indentation at the start of a line (nested list items), with tabs expanded to four spaces.
    """
    lines = []
    for line in unicodedata.normalize("NFC", text).splitlines():
        indent = _INDENT.match(line).group()
        body = _HORIZONTAL_SPACE.sub(" ", line[len(indent) :]).rstrip()
        lines.append(" " * len(indent.expandtabs(4)) + body if body else "")
    return _EXTRA_BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def clean_examples(
    examples: Iterable[Example],
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    system_prompt: str | None = None,
    max_seq_length: int | None = None,
) -> tuple[list[Example], CleanStats]:
    """Normalise every message, then drop empty, duplicate and (optionally) too-long examples.

    Duplicates are whole conversations that are equal after normalisation; the first is kept.
    With a `tokenizer`, each example is tokenised exactly as training will, with `system_prompt`
    prepended, its token counts are recorded, and it is dropped when longer than
    `max_seq_length` tokens.
    """
    if max_seq_length is not None and tokenizer is None:
        raise ValueError("max_seq_length needs a tokenizer to count tokens with.")
    stats = CleanStats()
    seen: set[tuple[tuple[str, str], ...]] = set()
    kept: list[Example] = []
    for example in examples:
        stats.num_input += 1
        messages = [
            {"role": m["role"], "content": normalize_text(m["content"])} for m in example.messages
        ]
        if not all(m["content"] for m in messages):
            stats.empty_dropped += 1
            continue
        key = tuple((m["role"], m["content"]) for m in messages)
        if key in seen:
            stats.duplicates_dropped += 1
            continue
        seen.add(key)
        kept.append(Example(messages=messages, meta=dict(example.meta)))
    if tokenizer is not None:
        kept = _drop_too_long(kept, stats, tokenizer, system_prompt, max_seq_length)
    if not kept:
        raise SupportLMError(
            f"No examples left after cleaning: of {stats.num_input}, {stats.empty_dropped} had "
            f"an empty message, {stats.duplicates_dropped} were duplicates and "
            f"{stats.too_long_dropped} were longer than {max_seq_length} tokens."
        )
    return kept, stats


def _drop_too_long(
    examples: list[Example],
    stats: CleanStats,
    tokenizer: PreTrainedTokenizerBase,
    system_prompt: str | None,
    max_seq_length: int | None,
) -> list[Example]:
    kept = []
    progress = tqdm(
        examples,
        desc="Tokenising",
        unit="example",
        disable=len(examples) < PROGRESS_BAR_MIN_EXAMPLES,
    )
    for example in progress:
        labels = tokenize_conversation(
            tokenizer, with_system_prompt(example.messages, system_prompt)
        )["labels"]
        if max_seq_length is not None and len(labels) > max_seq_length:
            stats.too_long_dropped += 1
            continue
        stats.num_tokens.append(len(labels))
        stats.num_supervised_tokens.append(sum(label != IGNORE_INDEX for label in labels))
        kept.append(example)
    return kept


def sample_examples(examples: list[Example], max_examples: int) -> list[Example]:
    """A deterministic sample of `max_examples` examples, in their original order.

    Keeps the examples with the smallest content hash rather than the first ones, because files
    are often sorted (the Bitext CSV by intent) and the first few hundred would be one intent.
    """
    if max_examples < 1:
        raise SupportLMError(f"max_examples must be at least 1, got {max_examples}.")
    if len(examples) <= max_examples:
        return list(examples)
    chosen = sorted(range(len(examples)), key=lambda i: _sha256(json.dumps(examples[i].messages)))[
        :max_examples
    ]
    return [examples[i] for i in sorted(chosen)]


# ---------------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------------


def assign_split(
    example: Example, *, validation_ratio: float = 0.1, test_ratio: float = 0.1
) -> str:
    """ "train", "validation" or "test", from a hash of the example's first user message.

    The question is normalised and case-folded first, so the same question (also with another
    answer, or as the start of a longer conversation) always lands in the same split, whatever
    the other examples are and in whatever order they come.
    """
    question = normalize_text(example.first_user_message).casefold()
    fraction = int(_sha256(question)[:16], 16) / 16**16
    if fraction < test_ratio:
        return "test"
    if fraction < test_ratio + validation_ratio:
        return "validation"
    return "train"


def split_examples(
    examples: Iterable[Example], *, validation_ratio: float = 0.1, test_ratio: float = 0.1
) -> dict[str, list[Example]]:
    """Group examples by `assign_split`; the dict has every key of `SPLITS`, in that order."""
    _check_ratios(validation_ratio, test_ratio)
    splits: dict[str, list[Example]] = {name: [] for name in SPLITS}
    for example in examples:
        splits[
            assign_split(example, validation_ratio=validation_ratio, test_ratio=test_ratio)
        ].append(example)
    return splits


def _check_ratios(validation_ratio: float, test_ratio: float) -> None:
    if not (
        0 <= validation_ratio < 1 and 0 <= test_ratio < 1 and validation_ratio + test_ratio < 1
    ):
        raise SupportLMError(
            f"validation_ratio ({validation_ratio}) and test_ratio ({test_ratio}) must each be "
            "between 0 and 1 and leave some examples for training."
        )


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# Report and the whole pipeline
# ---------------------------------------------------------------------------------------------


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


@dataclass
class PreparedDataset:
    splits: dict[str, list[Example]]
    report: DataReport


def prepare_dataset(
    source: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    system_prompt: str | None,
    max_seq_length: int,
    validation_ratio: float = 0.1,
    test_ratio: float = 0.1,
    strict: bool = False,
    max_examples: int | None = None,
) -> PreparedDataset:
    """Load, clean, (optionally) sample and split `source`, and describe it in a `DataReport`.

    `max_examples` keeps a deterministic sample (`sample_examples`) before tokenising, for quick
    runs; it is taken after de-duplication so it really holds that many distinct examples.
    """
    _check_ratios(validation_ratio, test_ratio)
    examples, load_stats = load_examples(source, strict=strict)
    not_sampled = 0
    if max_examples is None:
        examples, clean_stats = clean_examples(
            examples,
            tokenizer=tokenizer,
            system_prompt=system_prompt,
            max_seq_length=max_seq_length,
        )
    else:
        examples, clean_stats = clean_examples(examples)
        sample = sample_examples(examples, max_examples)
        not_sampled = len(examples) - len(sample)
        examples, length_stats = clean_examples(
            sample, tokenizer=tokenizer, system_prompt=system_prompt, max_seq_length=max_seq_length
        )
        clean_stats.too_long_dropped = length_stats.too_long_dropped
        clean_stats.num_tokens = length_stats.num_tokens
        clean_stats.num_supervised_tokens = length_stats.num_supervised_tokens
    splits = split_examples(examples, validation_ratio=validation_ratio, test_ratio=test_ratio)
    report = DataReport.build(
        load_stats, clean_stats, splits, max_seq_length=max_seq_length, not_sampled=not_sampled
    )
    logger.info(
        "%s: %d examples (%s)",
        report.source,
        len(examples),
        ", ".join(f"{name} {count}" for name, count in report.splits.items()),
    )
    return PreparedDataset(splits=splits, report=report)
