"""The trust gate: which feedback may become training data, and the approval queue.

On a public deployment anyone can type a correction, so feedback is training data only when it
passed a gate (its row's `gate`):

* ``agent``: written by a signed-in agent (``SUPPORTLM_AGENTS``, by default every
  ``SUPPORTLM_AUTH`` user), trusted when it is stored;
* ``approved``: a person approved it in the Insights tab or with ``feedback.py review``;
* ``pending`` (waiting for a decision) and ``rejected`` rows stay in the store for the
  statistics, and the export leaves them out and counts them.

Every kind is gated (likes, dislikes, corrections, votes): a stranger's dislike or vote steers
training as much as a correction does. A queue item is named ``f<row>`` (feedback) or
``v<row>`` (a vote), as the tables number them separately.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from supportlm.errors import SupportLMError
from supportlm.feedback.store import FeedbackStore

if TYPE_CHECKING:  # the app's settings name the agents; this package never imports the app
    from supportlm.serve.settings import AppSettings

GATES = ("agent", "approved", "pending", "rejected")
PASSING = ("agent", "approved")
DECISIONS = ("approved", "rejected")
_TABLES = {"f": "feedback", "v": "votes"}


def provenance(client_id: str | None, settings: AppSettings) -> tuple[str | None, bool]:
    """(author, trusted) of a write: the signed-in user, and whether they are an agent.

    `client_id` is `supportlm.serve.ui.common.client_id`'s (or /v1's) ``user:NAME`` for a
    signed-in user; an address or an API key names nobody, so it is never trusted.
    """
    if not client_id or not client_id.startswith("user:"):
        return None, False
    author = client_id.removeprefix("user:")
    return author, author in settings.agent_names()


def gate(row: dict[str, Any]) -> str:
    """The gate a feedback or vote row stands at (one of `GATES`)."""
    if row.get("review") in DECISIONS:
        return str(row["review"])
    return "agent" if row.get("trusted") else "pending"


def queue(store: FeedbackStore, limit: int | None = 50) -> list[dict[str, Any]]:
    """Pending feedback and votes, oldest first: what a person must approve or reject."""
    items = []
    for prefix, table in _TABLES.items():
        with store.connect() as connection:
            rows = connection.execute(
                f"SELECT * FROM {table} WHERE trusted = 0 AND review IS NULL ORDER BY id"
            ).fetchall()
        items += [_item(prefix, dict(row)) for row in rows]
    items.sort(key=lambda item: item["created_at"])
    return items[:limit] if limit is not None else items


def _item(prefix: str, row: dict[str, Any]) -> dict[str, Any]:
    if prefix == "v":
        return {
            "ref": f"v{row['id']}", "kind": f"vote:{row['choice']}", "question": row["question"],
            "reply": row["tuned_answer"], "correction": row["base_answer"],
            "author": row.get("author"), "created_at": row["created_at"], "context": "",
        }  # fmt: skip
    return {
        "ref": f"f{row['id']}", "kind": row["kind"], "question": rated_question(row),
        "reply": row["reply"], "correction": row.get("corrected_answer"),
        "author": row.get("author"), "created_at": row["created_at"], "context": context(row),
    }  # fmt: skip


def context(row: dict[str, Any]) -> str:
    """The earlier turns an approval admits with the rated question (the export trains on them):
    none for a history the server could not verify, which the export cuts off too."""
    if not row.get("history_verified"):
        return ""
    earlier = _before_reply(row)
    last_user = max((i for i, m in enumerate(earlier) if m["role"] == "user"), default=0)
    return "\n".join(f"{m['role']}: {m['content']}" for m in earlier[:last_user])


def rated_question(row: dict[str, Any]) -> str:
    """The customer's message a stored feedback row rated: the last user turn before the reply
    at `message_index` (rows from before it: the conversation's last message)."""
    return next((m["content"] for m in reversed(_before_reply(row)) if m["role"] == "user"), "")


def _before_reply(row: dict[str, Any]) -> list[dict[str, Any]]:
    """A stored feedback row's messages before the rated reply."""
    messages = json.loads(row["conversation"])
    end = row["message_index"] if row.get("message_index") is not None else len(messages) - 1
    return messages[:end]


def decide(store: FeedbackStore, ref: str, decision: str, reviewer: str | None) -> None:
    """Approve or reject the queue item `ref` (``f12``, ``v3``); a decision can be changed."""
    if decision not in DECISIONS:
        raise SupportLMError(f"Decide {DECISIONS[0]} or {DECISIONS[1]}, not {decision!r}.")
    table = _TABLES.get(ref[:1])
    if table is None or not ref[1:].isdigit():
        raise SupportLMError(f"{ref!r} names no queue item: use f<row> or v<row>, e.g. f12.")
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with store.connect() as connection:
        cursor = connection.execute(
            f"UPDATE {table} SET review = ?, reviewed_by = ?, reviewed_at = ? WHERE id = ?",
            (decision, reviewer, stamp, int(ref[1:])),
        )
    if cursor.rowcount == 0:
        raise SupportLMError(f"There is no {table} row {ref[1:]} to review.")
