"""Data rights on the feedback store: erase one conversation, delete rows past their retention.

Both delete the feedback and votes that name a reply together with the reply, in one transaction,
so no row is left pointing at a reply that is gone; then the copies in feedback exports follow
(`supportlm.feedback.derived`): erasure removes their lines, retention deletes old exports whole.
``python finetune/feedback.py erase`` and ``... purge`` run them from the command line; the app
purges at start-up and once an hour when ``SUPPORTLM_RETENTION_DAYS`` is set.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from supportlm.errors import SupportLMError
from supportlm.feedback import derived
from supportlm.feedback.store import FeedbackStore

_TABLES = ("feedback", "votes", "replies")


def _delete(store: FeedbackStore, replies_where: str, value: str, rows_where: str) -> dict:
    """Delete the replies matching `replies_where`, the rows naming them, and the feedback and
    votes matching `rows_where` (both use ``:value``), then their lines in every export
    (`supportlm.feedback.derived.scrub`); returns how many rows each table lost and which exports
    changed (``exports_scrubbed``)."""
    selected = f"SELECT reply_id FROM replies WHERE {replies_where}"
    statements = {
        "feedback": f"DELETE FROM feedback WHERE reply_id IN ({selected}) OR {rows_where}",
        "votes": (
            f"DELETE FROM votes WHERE base_reply_id IN ({selected}) "
            f"OR tuned_reply_id IN ({selected}) OR {rows_where}"
        ),
        "replies": f"DELETE FROM replies WHERE {replies_where}",
    }
    with store.connect() as connection:  # the ids the exports lose, read right before the rows go
        erased = [row[0] for row in connection.execute(selected, {"value": value})]
        erased += [row[0] for row in connection.execute(
            f"SELECT reply_id FROM feedback WHERE {rows_where}", {"value": value})]  # fmt: skip
        counts: dict[str, Any] = {
            table: connection.execute(statements[table], {"value": value}).rowcount
            for table in _TABLES
        }
    counts["exports_scrubbed"] = derived.scrub(store, filter(None, erased))
    return counts


def erase_conversation(store: FeedbackStore, conversation_id: str) -> dict[str, int]:
    """Delete every stored row of one conversation (its replies, their feedback and votes)."""
    if not conversation_id or not conversation_id.strip():
        raise SupportLMError("Name the conversation to erase (its id is shown under the chat).")
    return _delete(store, "conversation_id = :value", conversation_id, "0")


def erase_reply_conversation(store: FeedbackStore, reply_id: str) -> dict[str, int]:
    """Delete the whole conversation that reply `reply_id` belongs to."""
    conversation_id = store.get_reply(reply_id).get("conversation_id")
    if conversation_id is None:
        return _delete(store, "reply_id = :value", reply_id, "0")
    return erase_conversation(store, conversation_id)


def purge_older_than(
    store: FeedbackStore, days: int, *, now: datetime | None = None
) -> dict[str, int]:
    """Delete rows created more than `days` days ago; returns how many each table lost."""
    if days < 1:
        raise SupportLMError("The retention is at least one day.")
    now = now or datetime.now(timezone.utc)
    cutoff = (now - timedelta(days=days)).isoformat(timespec="seconds")
    counts = _delete(store, "created_at < :value", cutoff, "created_at < :value")
    counts["exports_expired"] = derived.expire(store, cutoff)
    return counts
