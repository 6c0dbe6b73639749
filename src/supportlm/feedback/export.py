"""The feedback store as training data, in the formats TRL reads (`finetune/feedback.py export`).

One export is a folder:

* ``sft.jsonl``: ``{"messages": [...]}`` chat rows, the conversation so far and the answer to
  learn: every correction (the agent's answer), and liked replies unless ``include_likes=False``;
* ``kto.jsonl``: unpaired preferences ``{"prompt", "completion", "label"}`` (conversational: the
  prompt is the conversation so far, the completion one assistant message): a liked reply is
  ``true``, a disliked one ``false``; a correction gives both (the correction ``true``, the
  model's reply ``false``); a compare vote gives the winner ``true`` and the loser ``false``,
  "both bad" two ``false`` rows, a tie nothing;
* ``dpo.jsonl``: preference pairs ``{"prompt", "chosen", "rejected"}`` from corrections (the
  correction over the model's reply) and from votes (the winner over the loser);
* ``heldout.jsonl``: the held-out feedback, never in the three files above: ``{"messages",
  "rejected", "kind", "adapter_version"}`` where the last message is the reference answer (a
  correction, or a liked reply) and ``rejected`` the reply it replaced; `finetune/evaluate.py
  --against` scores new vs old adapters on it;
* ``reply_ids.json``: for each line of each file, the stored replies it came from, so erasing
  a conversation removes its lines here too (`supportlm.feedback.derived`);
* ``export.json``: what was exported and from what (counts by kind, adapter version, intent; how
  many rows each trust gate let through; the filters; the rows of each file and a content hash of
  the export), which training records in its lineage; ``export.md`` says the same for people.

Only trusted feedback is exported (`supportlm.feedback.review`): from a signed-in agent, or approved
by a person; pending and rejected rows are counted in the report and left out of every file,
held-out feedback included (an untrusted correction must not decide a promotion either).

A question is held out by a salted hash of its normalised text, so it is held out in every export
and its rows of every kind stay on one side. Rows with the same prompt and answer are written once
(the newest feedback on them decides a like/dislike conflict). Everything written passes through
`redact` again: the store redacts on the way in, and an export must stay safe even if the
patterns grew since a row was stored (the report counts how many texts changed).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from supportlm.cache import atomic_target
from supportlm.errors import SupportLMError
from supportlm.feedback import derived
from supportlm.feedback.redaction import redact
from supportlm.feedback.review import GATES, PASSING, gate
from supportlm.feedback.store import FeedbackStore, last_question
from supportlm.run_folder import FEEDBACK_EXPORT_REPORT

FILES = ("sft", "kto", "dpo", "heldout")
HELDOUT_SALT = "supportlm-feedback-heldout:"
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class ExportFilter:
    """Which feedback to export: one adapter version, and a date range (ISO dates, inclusive)."""

    adapter_version: str | None = None
    since: str | None = None
    until: str | None = None

    def keeps(self, row: Mapping[str, Any]) -> bool:
        if self.adapter_version and row.get("adapter_version") != self.adapter_version:
            return False
        day = str(row.get("created_at", ""))[:10]
        return not (self.since and day < self.since) and not (self.until and day > self.until)


@dataclass
class Signal:
    """One piece of feedback, reduced to what the formats need."""

    kind: str  # like, dislike, correction, vote
    prompt: Messages
    reply: str  # the model's reply (for a vote: the loser)
    better: str | None  # the correction, or a vote's winner
    adapter_version: str | None
    intent: str | None
    created_at: str
    choice: str | None = None  # a vote's choice
    other: str | None = None  # a vote's other answer (the winner, or the second bad one)
    gate: str = "pending"  # supportlm.feedback.review.GATES
    reply_ids: tuple[str, ...] = ()  # the stored replies it came from (erasure reaches it)

    @property
    def question(self) -> str:
        return next((m["content"] for m in reversed(self.prompt) if m["role"] == "user"), "")


@dataclass
class ExportReport:
    filters: dict[str, Any]
    heldout_share: float
    include_likes: bool
    by_kind: dict[str, int] = field(default_factory=dict)
    by_adapter_version: dict[str, int] = field(default_factory=dict)
    by_intent: dict[str, int] = field(default_factory=dict)
    by_gate: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    duplicates_dropped: int = 0
    votes_skipped: int = 0
    redacted_on_export: int = 0
    heldout_questions: int = 0
    export_hash: str = ""

    def to_markdown(self) -> str:
        lines = ["# Feedback export", "", f"Content hash `{self.export_hash}`.", ""]
        for title, counts in (
            ("Trust gates (only agent and approved rows are exported)", self.by_gate),
            ("Exported feedback by kind", self.by_kind),
            ("By adapter version", self.by_adapter_version),
            ("By detected intent", self.by_intent),
            ("Rows written", self.rows),
        ):
            lines += [f"## {title}", "", "| | count |", "|---|---:|"]
            lines += [f"| {name} | {count} |" for name, count in counts.items()] + [""]
        lines.append(
            f"Held out: {self.heldout_questions} questions ({self.heldout_share:.0%} by hash); "
            f"duplicates dropped {self.duplicates_dropped}; ties skipped {self.votes_skipped}; "
            f"texts changed by redaction on export {self.redacted_on_export}."
        )
        return "\n".join(lines) + "\n"


def is_heldout(question: str, share: float) -> bool:
    """Whether `question` is in the held-out share (a salted hash of its normalised text)."""
    text = " ".join(question.split()).casefold()
    digest = hashlib.sha256((HELDOUT_SALT + text).encode("utf-8")).hexdigest()
    return int(digest[:16], 16) / 16**16 < share


def collect_signals(store: FeedbackStore, filters: ExportFilter) -> list[Signal]:
    """Every feedback row and vote that passes `filters`, oldest first, with its trust gate."""
    intents = {r["reply_id"]: r.get("intent") for r in store.list_replies(None)}
    signals = [_feedback_signal(row, intents) for row in store.list_feedback(None)[::-1]]
    signals += [_vote_signal(store, row, intents) for row in store.list_votes(None)[::-1]]
    kept = []
    for signal, row in signals:
        if filters.keeps(row):
            signal.gate = gate(row)
            kept.append(signal)
    return sorted(kept, key=lambda signal: signal.created_at)


def _feedback_signal(row: dict[str, Any], intents: Mapping[str, Any]) -> tuple[Signal, dict]:
    conversation = row["conversation"]
    end = row.get("message_index")
    if end is None:  # rows from before message_index: the rated reply is the last message
        end = len(conversation) - 1
    prompt = [{"role": m["role"], "content": m["content"]} for m in conversation[:end]]
    if not row.get("history_verified"):  # assistant turns a client sent: never training data
        prompt = last_question(prompt)
    signal = Signal(
        kind=row["kind"],
        prompt=prompt,
        reply=row["reply"],
        better=row.get("corrected_answer"),
        adapter_version=row.get("adapter_version"),
        intent=intents.get(row.get("reply_id")),
        created_at=row["created_at"],
        reply_ids=tuple(filter(None, [row.get("reply_id")])),
    )
    return signal, row


def _vote_signal(
    store: FeedbackStore, row: dict[str, Any], intents: Mapping[str, Any]
) -> tuple[Signal, dict]:
    prompt: Messages = [{"role": "user", "content": row["question"]}]
    if row.get("tuned_reply_id"):
        tuned = store.get_reply(row["tuned_reply_id"])
        prompt = [{"role": m["role"], "content": m["content"]} for m in tuned["conversation"]]
        if not tuned.get("history_verified"):
            prompt = last_question(prompt)
    winner, loser = row["tuned_answer"], row["base_answer"]
    if row["choice"] == "base":
        winner, loser = loser, winner
    signal = Signal(
        kind="vote",
        prompt=prompt,
        reply=loser,
        better=winner if row["choice"] in ("base", "tuned") else None,
        adapter_version=row.get("adapter_version"),
        intent=intents.get(row.get("tuned_reply_id")),
        created_at=row["created_at"],
        choice=row["choice"],
        other=winner,
        reply_ids=tuple(filter(None, [row.get("base_reply_id"), row.get("tuned_reply_id")])),
    )
    return signal, row


def _assistant(text: str) -> Messages:
    return [{"role": "assistant", "content": text}]


def training_rows(signal: Signal, include_likes: bool) -> dict[str, list[dict[str, Any]]]:
    """The SFT, KTO and DPO rows one signal gives (see the module doc)."""
    rows: dict[str, list[dict[str, Any]]] = {"sft": [], "kto": [], "dpo": []}
    prompt = signal.prompt

    def kto(text: str, label: bool) -> None:
        rows["kto"].append({"prompt": prompt, "completion": _assistant(text), "label": label})

    if signal.kind == "like":
        kto(signal.reply, True)
        if include_likes:
            rows["sft"].append({"messages": prompt + _assistant(signal.reply)})
    elif signal.kind == "dislike":
        kto(signal.reply, False)
    elif signal.kind == "correction" or (signal.kind == "vote" and signal.better):
        kto(signal.better, True)
        kto(signal.reply, False)
        pair = {"prompt": prompt, "chosen": _assistant(signal.better)}
        rows["dpo"].append({**pair, "rejected": _assistant(signal.reply)})
        if signal.kind == "correction":
            rows["sft"].append({"messages": prompt + _assistant(signal.better)})
    elif signal.choice == "both_bad":
        kto(signal.reply, False)
        kto(signal.other or "", False)
    return rows


def heldout_row(signal: Signal) -> dict[str, Any] | None:
    """The reference answer a held-out signal gives for evaluation, if it has one."""
    reference = signal.better if signal.kind in ("correction", "vote") else None
    if signal.kind == "like":
        reference = signal.reply
    if not reference:
        return None
    return {
        "messages": signal.prompt + _assistant(reference),
        "rejected": None if signal.kind == "like" else signal.reply,
        "kind": signal.kind,
        "adapter_version": signal.adapter_version,
    }


def _row_key(name: str, row: Mapping[str, Any]) -> str:
    """Rows with the same key are duplicates; a KTO row's label is not part of it (the newest
    label on the same prompt and completion wins)."""
    keyed = {key: value for key, value in row.items() if not (name == "kto" and key == "label")}
    return json.dumps(keyed, sort_keys=True, ensure_ascii=False)


def build_rows(
    signals: Sequence[Signal], heldout_share: float, include_likes: bool, report: ExportReport
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[list[str]]]]:
    """The de-duplicated rows of every file, held-out questions split off, and for each row the
    reply ids it came from."""
    found: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in FILES}
    sources: dict[str, dict[str, set[str]]] = {name: {} for name in FILES}
    heldout_questions = set()
    for signal in signals:  # oldest first: a newer duplicate replaces an older one
        if is_heldout(signal.question, heldout_share):
            heldout_questions.add(signal.question)
            row = heldout_row(signal)
            produced = {"heldout": [row] if row else []}
        else:
            produced = training_rows(signal, include_likes)
        for name, rows in produced.items():
            for row in rows:
                key = _row_key(name, row)
                report.duplicates_dropped += key in found[name]
                found[name].pop(key, None)
                found[name][key] = row
                sources[name].setdefault(key, set()).update(signal.reply_ids)
    report.heldout_questions = len(heldout_questions)
    rows = {name: list(found[name].values()) for name in FILES}
    ids = {name: [sorted(sources[name][key]) for key in found[name]] for name in FILES}
    return rows, ids


def _redacted(value: Any, report: ExportReport) -> Any:
    if isinstance(value, str):
        clean = redact(value)
        report.redacted_on_export += clean != value
        return clean
    if isinstance(value, list):
        return [_redacted(item, report) for item in value]
    if isinstance(value, dict):
        return {key: _redacted(item, report) for key, item in value.items()}
    return value


def export_feedback(
    store: FeedbackStore,
    out_dir: str | os.PathLike[str],
    *,
    filters: ExportFilter = ExportFilter(),
    heldout_share: float = 0.2,
    include_likes: bool = True,
) -> ExportReport:
    """Write one export folder (see the module doc) and return its report."""
    if not 0 <= heldout_share < 1:
        raise SupportLMError(f"The held-out share must be in [0, 1), got {heldout_share}.")
    report = ExportReport(asdict(filters), heldout_share, include_likes)
    signals = collect_signals(store, filters)
    if not signals:
        raise SupportLMError("No feedback to export (check the store and the filters).")
    report.by_gate = {name: sum(s.gate == name for s in signals) for name in GATES}
    signals = [signal for signal in signals if signal.gate in PASSING]
    if not signals:
        raise SupportLMError(
            f"No trusted feedback to export: {report.by_gate['pending']} rows wait for approval "
            "(the Insights tab, or `feedback.py review`); only signed-in agents' feedback is "
            "trusted as it arrives (SUPPORTLM_AGENTS)."
        )
    _count(report, signals)
    rows, reply_ids = build_rows(signals, heldout_share, include_likes, report)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SupportLMError(f"{out_dir} is not empty: export into a new folder.")
    with atomic_target(out_dir) as tmp:
        tmp.mkdir(parents=True)
        digest = hashlib.sha256()
        for name in FILES:
            text = "".join(
                json.dumps(_redacted(row, report), ensure_ascii=False) + "\n" for row in rows[name]
            )
            (tmp / f"{name}.jsonl").write_text(text, encoding="utf-8")
            digest.update(text.encode("utf-8"))
            report.rows[name] = len(rows[name])
        report.export_hash = digest.hexdigest()[:16]
        (tmp / FEEDBACK_EXPORT_REPORT).write_text(
            json.dumps(asdict(report), indent=2), encoding="utf-8"
        )
        (tmp / "export.md").write_text(report.to_markdown(), encoding="utf-8")
        (tmp / derived.REPLY_IDS).write_text(json.dumps(reply_ids), encoding="utf-8")
    derived.register(store, out_dir)  # erasure and retention reach this copy
    return report


def _count(report: ExportReport, signals: Iterable[Signal]) -> None:
    signals = list(signals)
    report.by_kind = dict(Counter(f"vote:{s.choice}" if s.choice else s.kind for s in signals))
    report.by_adapter_version = dict(Counter(s.adapter_version or "(base)" for s in signals))
    report.by_intent = dict(Counter(s.intent or "(unknown)" for s in signals).most_common())
    report.votes_skipped = sum(s.choice == "tie" for s in signals)
