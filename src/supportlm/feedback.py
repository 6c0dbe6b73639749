"""Feedback and preference votes from the app, stored in SQLite with personal data redacted.

Every text a user typed or the model wrote (conversation, reply, correction, question, answers) is
passed through `redact` before it reaches the disk: e-mail addresses, phone numbers and payment
card numbers are replaced by ``[EMAIL]``, ``[PHONE]`` and ``[CARD]``. Redaction is a pattern-based
safety net, not a guarantee: names and street addresses, for instance, are kept.

The database uses write-ahead logging, so the app can keep writing while someone exports or reads
the rows, and each call opens its own connection (see `FeedbackStore`).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from supportlm.errors import SupportLMError

FEEDBACK_KINDS = ("like", "dislike", "correction")
VOTE_CHOICES = ("base", "tuned", "tie", "both_bad")
SCHEMA_VERSION = 1

FeedbackKind = Literal["like", "dislike", "correction"]
VoteChoice = Literal["base", "tuned", "tie", "both_bad"]

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")

# Digit groups joined by single spaces or dashes, as card numbers are written. Which consecutive
# groups form the card is decided afterwards with the Luhn checksum (see `_redact_cards`).
_DIGIT_GROUPS = re.compile(r"(?<![\w#])\d+(?:[ -]\d+)*(?![\w])")

# A phone-number candidate: optional country code, optional area code in parentheses, then digit
# groups separated by one space, dot or dash. Not preceded by a word character, '#', a currency
# sign, '/', '.' or '-' (order numbers, prices, paths, versions), and not followed by more digits,
# a decimal part or a word character. `_is_phone` then checks the number of digits.
_PHONE_CANDIDATE = re.compile(
    r"(?<![\w#$€£¥/.\-+])"
    r"(?P<number>(?:\+\d{1,3}[ .\-]?)?(?:\(\d{1,5}\)[ .\-]?)?\d{1,14}(?:[ .\-]\d{1,8}){0,5})"
    r"(?![\w/]|[.,]\d)"
)


def _luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _redact_cards(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        run = match.group()
        groups = [(m.start(), m.end()) for m in re.finditer(r"\d+", run)]
        # Longest run of whole consecutive groups with 13-19 digits that passes Luhn, so a card
        # followed by an expiry date ("4111 1111 1111 1111 12 26") is still found.
        pieces: list[str] = []
        position = 0
        first = 0
        while first < len(groups):
            best = None
            for last in range(len(groups) - 1, first - 1, -1):
                digits = "".join(run[s:e] for s, e in groups[first : last + 1])
                if 13 <= len(digits) <= 19 and _luhn_valid(digits):
                    best = last
                    break
            if best is None:
                first += 1
                continue
            pieces.append(run[position : groups[first][0]])
            pieces.append("[CARD]")
            position = groups[best][1]
            first = best + 1
        pieces.append(run[position:])
        return "".join(pieces)

    return _DIGIT_GROUPS.sub(replace, text)


def _is_phone(candidate: str) -> bool:
    digits = re.sub(r"\D", "", candidate)
    separated = re.search(r"[ .\-()]", candidate) is not None
    if candidate.startswith("+"):
        return 8 <= len(digits) <= 15
    if "(" in candidate:
        return 9 <= len(digits) <= 12
    if not separated:
        # A bare run of digits is as likely an order or account number as a phone number; only
        # runs with a national trunk prefix ("0...") are taken for phones.
        return digits.startswith("0") and 10 <= len(digits) <= 11
    if re.match(r"\d{4}-\d{2}-\d{2}", candidate):
        # An ISO date followed by another number ("2024-05-01 14 items").
        return False
    return 9 <= len(digits) <= 13


def _redact_phones(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        number = match.group("number")
        return "[PHONE]" if _is_phone(number) else number

    return _PHONE_CANDIDATE.sub(replace, text)


def redact(text: str) -> str:
    """Replace e-mail addresses, payment card numbers and phone numbers with placeholders.

    Card numbers are 13-19 digits, optionally grouped with spaces or dashes, that pass the Luhn
    checksum. Phone numbers are international (``+44 20 7946 0958``) or national numbers with
    separators (``(555) 123-4567``, ``06 12 34 56 78``, ``030-1234-5678``); order numbers
    (``#12345``), dates, times and prices are kept.

    >>> redact("Mail anna@example.com or call +1 415-555-0100 about order #88231.")
    'Mail [EMAIL] or call [PHONE] about order #88231.'
    """
    text = _EMAIL.sub("[EMAIL]", text)
    text = _redact_cards(text)
    return _redact_phones(text)


def _redact_json(value: Any) -> Any:
    """`redact` every string inside a JSON-like value (dict keys are kept)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {key: _redact_json(item) for key, item in value.items()}
    if isinstance(value, Sequence):
        return [_redact_json(item) for item in value]
    return value


def default_feedback_path() -> Path:
    """``$SUPPORTLM_FEEDBACK_DB``, or ``./.supportlm/feedback.sqlite3``."""
    return Path(os.environ.get("SUPPORTLM_FEEDBACK_DB") or Path(".supportlm") / "feedback.sqlite3")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('like', 'dislike', 'correction')),
    conversation TEXT NOT NULL,
    message_index INTEGER,
    reply TEXT,
    corrected_answer TEXT,
    model_id TEXT,
    adapter_id TEXT,
    backend TEXT,
    settings TEXT
);
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at TEXT NOT NULL,
    question TEXT NOT NULL,
    base_answer TEXT NOT NULL,
    tuned_answer TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('base', 'tuned', 'tie', 'both_bad')),
    model_id TEXT,
    adapter_id TEXT,
    settings TEXT
);
"""


class FeedbackStore:
    """Likes, dislikes, corrections and base-vs-tuned votes in one SQLite file.

    Thread safety: Gradio runs event handlers in a pool of worker threads. Every method opens its
    own short-lived connection instead of sharing one: a `sqlite3.Connection` must not be used
    from several threads at once, opening one costs well under a millisecond (nothing next to a
    model reply), and SQLite itself serialises the writers (WAL mode plus a busy timeout), so no
    Python lock is needed and several app processes can share the file too.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, timeout: float = 30.0):
        self.path = Path(path) if path is not None else default_feedback_path()
        self.timeout = timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as connection:
            # WAL is a property of the file, so setting it once at creation is enough.
            connection.execute("PRAGMA journal_mode=WAL")
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SupportLMError(
                    f"The feedback database {self.path} was written by a newer supportlm "
                    f"(schema {version}, this version reads {SCHEMA_VERSION}); please upgrade."
                )
            connection.executescript(_SCHEMA)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection that commits on success, rolls back on error, and is always closed."""
        with closing(sqlite3.connect(self.path, timeout=self.timeout)) as connection:
            connection.row_factory = sqlite3.Row
            # Safe with WAL (a crash cannot corrupt the file; a power cut may lose the last
            # commits) and it skips an fsync per write, which otherwise dominates a vote.
            connection.execute("PRAGMA synchronous=NORMAL")
            with connection:
                yield connection

    def add_feedback(
        self,
        kind: FeedbackKind,
        conversation: Sequence[Mapping[str, Any]],
        *,
        message_index: int | None = None,
        reply: str | None = None,
        corrected_answer: str | None = None,
        model_id: str | None = None,
        adapter_id: str | None = None,
        backend: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> int:
        """Store a like, dislike or correction of one assistant reply; returns the row id.

        `conversation` holds ``{"role", "content"}`` messages up to and including the rated reply,
        and `message_index` is the position of that reply in it. A correction needs
        `corrected_answer`: the answer the agent wanted instead.
        """
        if kind not in FEEDBACK_KINDS:
            raise ValueError(f"Unknown feedback kind {kind!r}; use one of {FEEDBACK_KINDS}.")
        if kind == "correction" and not (corrected_answer or "").strip():
            raise SupportLMError("A correction needs the corrected answer.")
        row = (
            _now(),
            kind,
            _dumps(_redact_json(list(conversation))),
            message_index,
            None if reply is None else redact(reply),
            None if corrected_answer is None else redact(corrected_answer),
            model_id,
            adapter_id,
            backend,
            _dumps(dict(settings) if settings is not None else None),
        )
        with self._connect() as connection:
            cursor = connection.execute(
                "INSERT INTO feedback (created_at, kind, conversation, message_index, reply, "
                "corrected_answer, model_id, adapter_id, backend, settings) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            return int(cursor.lastrowid)

    def add_vote(
        self,
        question: str,
        base_answer: str,
        tuned_answer: str,
        choice: VoteChoice,
        *,
        model_id: str | None = None,
        adapter_id: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> int:
        """Store which answer to `question` a user preferred; returns the row id."""
        if choice not in VOTE_CHOICES:
            raise ValueError(f"Unknown vote {choice!r}; use one of {VOTE_CHOICES}.")
        row = (
            _now(),
            redact(question),
            redact(base_answer),
            redact(tuned_answer),
            choice,
            model_id,
            adapter_id,
            _dumps(dict(settings) if settings is not None else None),
        )
        with self._connect() as connection:
            cursor = connection.execute(
                "INSERT INTO votes (created_at, question, base_answer, tuned_answer, choice, "
                "model_id, adapter_id, settings) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            return int(cursor.lastrowid)

    def _select(self, table: str, limit: int | None, where: str = "") -> list[dict[str, Any]]:
        query = f"SELECT * FROM {table} {where} ORDER BY id DESC"
        parameters: tuple[int, ...] = ()
        if limit is not None:
            query += " LIMIT ?"
            parameters = (limit,)
        with self._connect() as connection:
            rows = connection.execute(query, parameters).fetchall()
        records = []
        for row in rows:
            record = dict(row)
            for column in ("conversation", "settings"):
                if record.get(column) is not None:
                    record[column] = json.loads(record[column])
            records.append(record)
        return records

    def list_feedback(self, limit: int | None = 100) -> list[dict[str, Any]]:
        """The newest feedback rows first, JSON columns decoded."""
        return self._select("feedback", limit)

    def list_votes(self, limit: int | None = 100) -> list[dict[str, Any]]:
        """The newest votes first, JSON columns decoded."""
        return self._select("votes", limit)

    def export_jsonl(self, path: str | os.PathLike[str]) -> int:
        """Write the corrections as chat-shaped training examples; returns how many.

        Each line is ``{"messages": [...]}``: the conversation before the corrected reply followed
        by the corrected answer as the assistant turn, the shape `supportlm.data` loads and
        ``finetune/train.py`` trains on. Support teams can so fine-tune the next adapter on the
        answers their agents fixed. Oldest corrections come first.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = self._select("feedback", None, "WHERE kind = 'correction'")[::-1]
        count = 0
        with path.open("w", encoding="utf-8") as file:
            for row in rows:
                conversation = row["conversation"]
                end = row["message_index"] if row["message_index"] is not None else None
                history = conversation[:end]
                # The rated reply itself is replaced by the correction.
                if end is None and history and history[-1].get("role") == "assistant":
                    history = history[:-1]
                messages = [
                    {"role": message["role"], "content": message["content"]} for message in history
                ]
                messages.append({"role": "assistant", "content": row["corrected_answer"]})
                file.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
                count += 1
        return count
