"""What the feedback store says about the assistant, for the Insights tab (and anyone's SQL).

* per adapter version: replies, likes, dislikes, corrections, the like share (satisfaction: likes
  over likes and dislikes), the correction rate (corrections over replies) and the compare votes;
* the same per day and version, for the plots;
* the most disliked or corrected questions, and intents by their share of unhappy replies.

Every figure counts all feedback, trusted or not: the trust gate (`supportlm.feedback.review`)
decides what becomes training data, not what a team gets to see.
"""

from __future__ import annotations

from typing import Any

from supportlm.feedback.review import rated_question
from supportlm.feedback.store import FeedbackStore

#: A reply's feedback, one row per reply: the day, version and intent with its counts.
_PER_REPLY = """
    SELECT substr(r.created_at, 1, 10) AS day,
           COALESCE(r.adapter_version, '(base)') AS version,
           COALESCE(r.intent, '(unknown)') AS intent,
           COALESCE(SUM(f.kind = 'like'), 0) AS likes,
           COALESCE(SUM(f.kind = 'dislike'), 0) AS dislikes,
           COALESCE(SUM(f.kind = 'correction'), 0) AS corrections
    FROM replies r LEFT JOIN feedback f ON f.reply_id = r.reply_id
    GROUP BY r.reply_id
"""


def _rows(store: FeedbackStore, query: str, parameters: tuple = ()) -> list[dict[str, Any]]:
    with store.connect() as connection:
        return [dict(row) for row in connection.execute(query, parameters).fetchall()]


def _rates(row: dict[str, Any]) -> dict[str, Any]:
    rated = row["likes"] + row["dislikes"]  # never NULL: _PER_REPLY counts with COALESCE
    row["like_share"] = round(row["likes"] / rated, 3) if rated else None
    row["correction_rate"] = round(row["corrections"] / row["replies"], 3)
    return row


def by_version(store: FeedbackStore) -> list[dict[str, Any]]:
    """One row per adapter version, newest first, with its rates and vote outcomes."""
    rows = _rows(store, f"""
        SELECT version, MIN(day) AS first_day, MAX(day) AS last_day, COUNT(*) AS replies,
               SUM(likes) AS likes, SUM(dislikes) AS dislikes, SUM(corrections) AS corrections
        FROM ({_PER_REPLY}) GROUP BY version ORDER BY last_day DESC, version
    """)  # fmt: skip
    votes = _rows(store, """
        SELECT COALESCE(adapter_version, '(base)') AS version, choice, COUNT(*) AS n
        FROM votes GROUP BY version, choice
    """)  # fmt: skip
    for row in rows:
        _rates(row)
        for choice in ("tuned", "base", "tie", "both_bad"):
            row[f"votes_{choice}"] = sum(
                v["n"] for v in votes if v["version"] == row["version"] and v["choice"] == choice
            )
    return rows


def by_day(store: FeedbackStore) -> list[dict[str, Any]]:
    """One row per day and adapter version, oldest first (the plots' data)."""
    rows = _rows(store, f"""
        SELECT day, version, COUNT(*) AS replies, SUM(likes) AS likes,
               SUM(dislikes) AS dislikes, SUM(corrections) AS corrections
        FROM ({_PER_REPLY}) GROUP BY day, version ORDER BY day, version
    """)  # fmt: skip
    return [_rates(row) for row in rows]


def most_disliked(store: FeedbackStore, limit: int = 10) -> list[dict[str, Any]]:
    """The questions with the most dislikes and corrections (over all their replies), most first."""
    rows = _rows(store, """
        SELECT f.kind, f.conversation, f.message_index, r.intent
        FROM feedback f LEFT JOIN replies r ON r.reply_id = f.reply_id
        WHERE f.kind IN ('dislike', 'correction') ORDER BY f.id DESC
    """)  # fmt: skip
    found: dict[str, dict[str, Any]] = {}  # newest first, so ties keep the newest order
    for row in rows:
        question = rated_question(row)
        entry = found.setdefault(question, {"question": question, "dislikes": 0,
                                            "corrections": 0, "intent": row["intent"]})  # fmt: skip
        entry["dislikes" if row["kind"] == "dislike" else "corrections"] += 1
        entry["intent"] = entry["intent"] or row["intent"]
    ranked = sorted(found.values(), key=lambda e: -(e["dislikes"] + e["corrections"]))
    return [{**entry, "intent": entry["intent"] or "(unknown)"} for entry in ranked[:limit]]


def unhappy_intents(store: FeedbackStore) -> list[dict[str, Any]]:
    """Intents by the share of their replies that were disliked or corrected, most first."""
    rows = _rows(store, f"""
        SELECT intent, COUNT(*) AS replies, SUM(dislikes > 0 OR corrections > 0) AS unhappy
        FROM ({_PER_REPLY}) GROUP BY intent ORDER BY 1.0 * unhappy / COUNT(*) DESC, intent
    """)  # fmt: skip
    for row in rows:
        row["unhappy_share"] = round(row["unhappy"] / row["replies"], 3)
    return rows
