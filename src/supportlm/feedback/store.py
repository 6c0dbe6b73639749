"""Replies, feedback and preference votes from the app, in SQLite with personal data redacted.

Every reply the server produces is stored with a server-issued reply id and the adapter (name and
content version) that wrote it; likes, dislikes, corrections and votes name a reply id, so
feedback given after an adapter switch still names the adapter that wrote the reply, and
feedback for a reply the server never issued is refused. Every text a user typed or the model
wrote passes through `supportlm.feedback.redaction.redact` before it reaches the disk.

The schema has numbered migrations (`MIGRATIONS`): a database written by an older version is
brought up to date when it is opened, one migration per transaction. The database uses
write-ahead logging, so the app can keep writing while someone exports or reads the rows, and
each call opens its own connection (see `FeedbackStore`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from supportlm.errors import SupportLMError
from supportlm.feedback.migrations import MIGRATIONS, SCHEMA_VERSION
from supportlm.feedback.redaction import redact, redact_json

logger = logging.getLogger(__name__)

FEEDBACK_KINDS = ("like", "dislike", "correction")
VOTE_CHOICES = ("base", "tuned", "tie", "both_bad")

FeedbackKind = Literal["like", "dislike", "correction"]
VoteChoice = Literal["base", "tuned", "tie", "both_bad"]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def turn_digest(conversation: Sequence[Mapping[str, Any]], reply: str) -> str:
    """A content hash of a stored reply in its conversation (both as stored: redacted)."""
    turns = [[m["role"], m["content"]] for m in conversation] + [["assistant", reply]]
    return hashlib.sha256(json.dumps(turns, ensure_ascii=False).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ReplyRecord:
    """A reply as the server produced it (before redaction), with who produced it."""

    reply_id: str
    conversation: Sequence[Mapping[str, Any]]  # the prompt's messages, system prompt excluded
    reply: str
    finish_reason: str | None = None
    model_id: str | None = None
    adapter_id: str | None = None
    adapter_version: str | None = None
    backend: str | None = None
    settings: Mapping[str, Any] | None = None
    conversation_id: str | None = None
    intent: str | None = None
    handover: bool = False


class FeedbackStore:
    """Replies, likes, dislikes, corrections and base-vs-tuned votes in one SQLite file.

    Thread safety: Gradio runs event handlers in a pool of worker threads. Every method opens its
    own short-lived connection instead of sharing one: a `sqlite3.Connection` must not be used
    from several threads at once, opening one costs well under a millisecond (nothing next to a
    model reply), and SQLite itself serialises the writers (WAL mode plus a busy timeout), so no
    Python lock is needed and several app processes can share the file too.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 30.0):
        self.path = Path(path)
        self.timeout = timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as connection:
            # WAL is a property of the file, so setting it once at creation is enough.
            connection.execute("PRAGMA journal_mode=WAL")
        self._migrate()

    def _migrate(self) -> None:
        """Apply the migrations this file lacks, each in one transaction that re-reads the version.

        `BEGIN IMMEDIATE` takes the write lock before the version is read, so two app processes
        opening an old file at once migrate it once; a crash leaves the previous version intact.
        """
        for number in range(1, SCHEMA_VERSION + 1):
            with closing(
                sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            ) as connection:
                connection.execute("BEGIN IMMEDIATE")
                try:
                    version = connection.execute("PRAGMA user_version").fetchone()[0]
                    if version > SCHEMA_VERSION:
                        raise SupportLMError(
                            f"The feedback database {self.path} was written by a newer supportlm "
                            f"(schema {version}, this version reads {SCHEMA_VERSION}); please "
                            "upgrade."
                        )
                    if version < number:
                        for statement in MIGRATIONS[number - 1].split(";"):
                            if statement.strip():
                                connection.execute(statement)
                        connection.execute(f"PRAGMA user_version = {number}")
                    connection.execute("COMMIT")
                except BaseException:
                    connection.execute("ROLLBACK")
                    raise

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection that commits on success, rolls back on error, and is always closed."""
        with closing(sqlite3.connect(self.path, timeout=self.timeout)) as connection:
            connection.row_factory = sqlite3.Row
            # Safe with WAL (a crash cannot corrupt the file; a power cut may lose the last
            # commits) and it skips an fsync per write, which otherwise dominates a vote.
            connection.execute("PRAGMA synchronous=NORMAL")
            # Deleted rows are overwritten with zeros, not left in free pages for anyone with
            # the file to read back (erasure, retention); the default depends on the build.
            connection.execute("PRAGMA secure_delete=ON")
            with connection:
                yield connection

    # -- replies ------------------------------------------------------------------------------

    def add_reply(self, record: ReplyRecord) -> str:
        """Store a reply the server produced; returns its reply id.

        Its history counts as verified only when the conversation's last assistant turn is a
        reply this store holds, itself verified (so, by induction, every earlier one is).
        """
        conversation = redact_json([dict(m) for m in record.conversation])
        reply = redact(record.reply)
        row = (
            record.reply_id,
            _now(),
            _dumps(conversation),
            reply,
            record.finish_reason,
            record.model_id,
            record.adapter_id,
            record.adapter_version,
            record.backend,
            _dumps(redact_json(dict(record.settings)) if record.settings is not None else None),
            record.conversation_id,
            record.intent,
            int(record.handover),
            turn_digest(conversation, reply),
        )
        with self.connect() as connection:
            verified = self._history_verified(connection, conversation)
            connection.execute(
                "INSERT INTO replies (reply_id, created_at, conversation, reply, finish_reason, "
                "model_id, adapter_id, adapter_version, backend, settings, conversation_id, "
                "intent, handover, turn_digest, history_verified) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*row, int(verified)),
            )
        return record.reply_id

    @staticmethod
    def _history_verified(
        connection: sqlite3.Connection, conversation: Sequence[Mapping[str, Any]]
    ) -> bool:
        last = max((i for i, m in enumerate(conversation) if m["role"] == "assistant"), default=-1)
        if last < 0:
            return True  # no assistant turn: nothing a client could have forged
        digest = turn_digest(conversation[:last], conversation[last]["content"])
        row = connection.execute(
            "SELECT 1 FROM replies WHERE turn_digest = ? AND history_verified = 1 LIMIT 1",
            (digest,),
        ).fetchone()
        return row is not None

    def finish_reply(self, reply_id: str, reply: str, finish_reason: str | None) -> None:
        """Store the whole text of a reply stored while it was still streaming."""
        reply = redact(reply)
        with self.connect() as connection:
            row = connection.execute(
                "SELECT conversation FROM replies WHERE reply_id = ?", (reply_id,)
            ).fetchone()
            if row is None:
                return
            digest = turn_digest(json.loads(row["conversation"]), reply)
            connection.execute(
                "UPDATE replies SET reply = ?, finish_reason = ?, turn_digest = ? "
                "WHERE reply_id = ?",
                (reply, finish_reason, digest, reply_id),
            )

    def get_reply(self, reply_id: str) -> dict[str, Any]:
        """The stored reply `reply_id`; raises when the server never issued it."""
        with self.connect() as connection:
            row = connection.execute(
                "SELECT * FROM replies WHERE reply_id = ?", (reply_id,)
            ).fetchone()
        if row is None:
            raise SupportLMError(
                "That reply is unknown: feedback is taken for this app's replies only."
            )
        return _decoded(row)

    # -- feedback -----------------------------------------------------------------------------

    def add_feedback(
        self,
        kind: FeedbackKind,
        reply_id: str,
        *,
        corrected_answer: str | None = None,
        author: str | None = None,
        trusted: bool = False,
    ) -> int:
        """Store a like, dislike or correction of the reply `reply_id`; returns the row id.

        A correction needs `corrected_answer`: the answer the agent wanted instead. `author` is
        the signed-in user, `trusted` whether they are an agent (`supportlm.feedback.review`).
        """
        if kind not in FEEDBACK_KINDS:
            raise SupportLMError(f"Unknown feedback kind {kind!r}; use one of {FEEDBACK_KINDS}.")
        if kind == "correction" and not (corrected_answer or "").strip():
            raise SupportLMError("A correction needs the corrected answer.")
        reply = self.get_reply(reply_id)
        verified = bool(reply.get("history_verified"))
        earlier = reply["conversation"] if verified else last_question(reply["conversation"])
        conversation = [*earlier, {"role": "assistant", "content": reply["reply"]}]
        row = (
            _now(),
            kind,
            _dumps(conversation),
            len(conversation) - 1,
            reply["reply"],
            None if corrected_answer is None else redact(corrected_answer),
            reply["model_id"],
            reply["adapter_id"],
            reply["adapter_version"],
            reply["backend"],
            _dumps(reply["settings"]),
            reply_id,
            author,
            int(trusted),
            int(verified),
        )
        with self.connect() as connection:
            cursor = connection.execute(
                "INSERT INTO feedback (created_at, kind, conversation, message_index, reply, "
                "corrected_answer, model_id, adapter_id, adapter_version, backend, settings, "
                "reply_id, author, trusted, history_verified) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            return int(cursor.lastrowid)

    def add_vote(
        self,
        base_reply_id: str,
        tuned_reply_id: str,
        choice: VoteChoice,
        *,
        author: str | None = None,
        trusted: bool = False,
    ) -> int:
        """Store which of two replies to the same question a user preferred; returns the row id."""
        if choice not in VOTE_CHOICES:
            raise SupportLMError(f"Unknown vote {choice!r}; use one of {VOTE_CHOICES}.")
        base, tuned = self.get_reply(base_reply_id), self.get_reply(tuned_reply_id)
        if base["conversation"] != tuned["conversation"]:
            raise SupportLMError("A vote compares two answers to the same question.")
        question = next(
            (m["content"] for m in reversed(base["conversation"]) if m["role"] == "user"), ""
        )
        row = (
            _now(),
            question,
            base["reply"],
            tuned["reply"],
            choice,
            tuned["model_id"],
            tuned["adapter_id"],
            tuned["adapter_version"],
            _dumps(tuned["settings"]),
            base_reply_id,
            tuned_reply_id,
            author,
            int(trusted),
        )
        with self.connect() as connection:
            cursor = connection.execute(
                "INSERT INTO votes (created_at, question, base_answer, tuned_answer, choice, "
                "model_id, adapter_id, adapter_version, settings, base_reply_id, tuned_reply_id, "
                "author, trusted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            return int(cursor.lastrowid)

    def _select(self, table: str, limit: int | None, where: str = "") -> list[dict[str, Any]]:
        query = f"SELECT * FROM {table} {where} ORDER BY rowid DESC"
        parameters: tuple[int, ...] = ()
        if limit is not None:
            query += " LIMIT ?"
            parameters = (limit,)
        with self.connect() as connection:
            rows = connection.execute(query, parameters).fetchall()
        return [_decoded(row) for row in rows]

    def list_feedback(self, limit: int | None = 100) -> list[dict[str, Any]]:
        """The newest feedback rows first, JSON columns decoded."""
        return self._select("feedback", limit)

    def list_replies(self, limit: int | None = 100) -> list[dict[str, Any]]:
        """The newest replies first, JSON columns decoded."""
        return self._select("replies", limit)

    def list_handovers(self, limit: int | None = 100) -> list[dict[str, Any]]:
        """The newest replies to messages handed over to a person, JSON columns decoded."""
        return self._select("replies", limit, "WHERE handover = 1")

    def handover_counts(self) -> dict[str, int]:
        """How many messages were handed over, by intent (most first)."""
        with self.connect() as connection:
            rows = connection.execute(
                "SELECT intent, COUNT(*) FROM replies WHERE handover = 1 GROUP BY intent "
                "ORDER BY COUNT(*) DESC, intent"
            ).fetchall()
        return {str(intent): int(count) for intent, count in rows}

    def list_votes(self, limit: int | None = 100) -> list[dict[str, Any]]:
        """The newest votes first, JSON columns decoded."""
        return self._select("votes", limit)


def last_question(conversation: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The conversation cut to its last user message: what is left of an unverified history."""
    users = [dict(m) for m in conversation if m["role"] == "user"]
    return users[-1:]


def open_store(path: str | os.PathLike[str]) -> tuple[FeedbackStore | None, str | None]:
    """The store at `path`, or ``None`` and a notice for users when it cannot be used.

    A corrupt file, an unwritable folder or a database from a newer version must not stop the app
    from serving: the reason goes to the log in one line and feedback is switched off.
    """
    try:
        return FeedbackStore(path), None
    except (sqlite3.Error, OSError, SupportLMError) as error:
        logger.error("Feedback is off: the store %s cannot be used (%s).", path, error)
        return None, "Feedback is switched off on this server: its store could not be opened."


def _decoded(row: sqlite3.Row) -> dict[str, Any]:
    record = dict(row)
    for column in ("conversation", "settings"):
        if record.get(column) is not None:
            record[column] = json.loads(record[column])
    return record
