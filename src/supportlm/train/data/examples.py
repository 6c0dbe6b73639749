"""Training data: read records of any of four shapes from a file or the Hub into `Example`s.

A dataset is a JSON Lines, CSV or JSON list file, or a Hugging Face dataset id. Its records may
have any of four shapes (`SHAPES`), detected once per dataset from its first valid record:

- chat: ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}``
  with an optional leading system message, then user and assistant turns alternating;
- instruction/response: ``{"instruction": ..., "response": ...}`` (the Bitext CSV);
- alpaca: ``{"instruction": ..., "input": ..., "output": ...}``;
- sharegpt: ``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}``.

Every record becomes an `Example` (chat messages plus ``intent``/``category``/``task`` metadata).
Cleaning, length limits and splits are `supportlm.train.data.dataset`; the report is
`supportlm.train.data.report`.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supportlm.errors import SupportLMError

logger = logging.getLogger(__name__)

#: The bundled dataset; a relative path is looked up in the working directory, then in the repo.
DEFAULT_DATASET = "data/customer_support.jsonl"
REPO_ROOT = Path(__file__).resolve().parents[4]  # src/supportlm/train/data/examples.py

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
#: How many malformed records the report quotes; the rest are only counted.
MAX_REPORTED_MALFORMED = 5

Message = dict[str, str]


@dataclass
class Example:
    """One conversation in chat format, plus where it came from."""

    messages: list[Message]
    #: ``intent``, ``category`` and ``task`` when the record has them, and ``source_line``.
    meta: dict[str, Any] = field(default_factory=dict)
    #: ``input_ids`` and answer-only ``labels`` with the system prompt they were built with, once
    #: `supportlm.train.data.dataset` has measured the example: training reuses them.
    encoded: dict[str, Any] | None = field(default=None, repr=False, compare=False)

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


TOO_DEEP = "JSON nested too deeply to be a conversation"


class _Malformed(ValueError):
    """A record that cannot become an `Example`; the message is the reason."""


def load_examples(
    source: str | Path, *, strict: bool = False, split: str = "train"
) -> tuple[list[Example], LoadStats]:
    """Read every record of `source` as an `Example`.

    `source` is a ``.jsonl``, ``.csv`` or ``.json`` file, or a Hugging Face dataset id (loaded
    with `datasets.load_dataset(source, split=split)`). A malformed record is skipped and counted,
    or with `strict` raises `SupportLMError` naming its line.
    """
    name = str(source)
    path = resolve_path(name)
    if path is None:
        if Path(name).suffix.lower() in FILE_SUFFIXES:
            raise SupportLMError(f"Data file not found: {name}.")
        records = _read_hub(name, split)
    elif path.is_dir() or path.suffix.lower() not in FILE_SUFFIXES:
        raise SupportLMError(f"{name} is not a .jsonl, .csv or .json file.")
    else:
        records = _read_file(path, name)
    return _parse_records(records, name, strict)


def resolve_path(source: str) -> Path | None:
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
    data = path.read_bytes()
    # UTF-16 files (as Excel and Windows tools write them) carry a byte-order mark.
    encoding = "utf-16" if data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else "utf-8-sig"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise SupportLMError(f"{name} line {line}: not UTF-8 text; save it as UTF-8.") from exc
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
        except RecursionError:
            record = _Malformed(TOO_DEEP)
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
        except RecursionError:
            line = line_number + text.count("\n", counted_up_to, index)
            raise SupportLMError(f"{name} line {line}: {TOO_DEEP}.") from None
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
    # csv refuses cells over 131,072 characters and stops the whole file; a long answer is not
    # malformed (`limit_length` deals with length), so the limit is the file's size.
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
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
            except RecursionError:
                return _Malformed(TOO_DEEP)
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
