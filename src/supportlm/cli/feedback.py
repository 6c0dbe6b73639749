"""The feedback store from the command line: export it as training data, review, loop, erase.

    python finetune/feedback.py export --out outputs/feedback-2026-12-01/   # sft/kto/dpo/heldout
    python finetune/feedback.py export --out DIR --adapter_version v-... --since 2026-11-01
    python finetune/feedback.py review                       # feedback waiting for approval
    python finetune/feedback.py review --approve f12 f13 --reject v4
    python finetune/feedback.py loop --replay_dataset data/customer_support.jsonl
        # export -> train --init_adapter latest -> evaluate --against -> promote, in one go

    python finetune/feedback.py erase --conversation ID      # the id shown under the chat
    python finetune/feedback.py erase --reply REPLY_ID       # the conversation of that reply
    python finetune/feedback.py purge --days 30              # rows older than 30 days
    python finetune/feedback.py handovers                    # messages a person must handle

``--db`` names the store (default: ``SUPPORTLM_FEEDBACK_DB``, else .supportlm/feedback.sqlite3).
Only trusted feedback is exported: a signed-in agent's, or approved (`supportlm.feedback.review`).
See `supportlm.feedback.export`, `supportlm.train.release.feedback_loop` and
`supportlm.feedback.retention`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import supportlm
from supportlm.errors import SupportLMError
from supportlm.feedback import derived
from supportlm.feedback.export import ExportFilter, export_feedback
from supportlm.feedback.retention import (
    erase_conversation,
    erase_reply_conversation,
    purge_older_than,
)
from supportlm.feedback.review import decide, queue
from supportlm.feedback.store import FeedbackStore
from supportlm.serve.settings import AppSettings
from supportlm.train.release.feedback_loop import LoopSettings, run_loop


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", help="the SQLite store; default: the app's")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write the feedback as TRL training data")
    export.add_argument("--out", required=True, help="a new folder for the export")
    export.add_argument("--adapter_version", help="only feedback on replies of this version")
    export.add_argument("--since", help="only feedback from this date on (YYYY-MM-DD)")
    export.add_argument("--until", help="only feedback up to this date (YYYY-MM-DD)")
    export.add_argument(
        "--heldout_share", type=float, default=0.2, help="questions held out for evaluation"
    )
    export.add_argument(
        "--no_likes", action="store_true", help="liked replies are not supervised examples"
    )
    review = commands.add_parser("review", help="list, approve or reject untrusted feedback")
    review.add_argument("--approve", nargs="+", default=[], metavar="REF", help="e.g. f12 v3")
    review.add_argument("--reject", nargs="+", default=[], metavar="REF")
    review.add_argument("--reviewer", help="who decided (recorded with each decision)")
    add_loop_parser(commands)
    erase = commands.add_parser("erase", help="delete one conversation's rows")
    which = erase.add_mutually_exclusive_group(required=True)
    which.add_argument("--conversation", help="the conversation id shown under the chat")
    which.add_argument("--reply", help="a reply id of the conversation")
    purge = commands.add_parser("purge", help="delete rows older than --days")
    purge.add_argument("--days", type=int, required=True)
    handovers = commands.add_parser("handovers", help="list messages handed over to a person")
    handovers.add_argument("--limit", type=int, default=20, help="newest messages shown")
    return parser.parse_args(argv)


def add_loop_parser(commands: argparse._SubParsersAction) -> None:
    loop = commands.add_parser("loop", help="export, retrain, compare and promote in one go")
    loop.add_argument("--outputs_dir", default="outputs", help="where latest and the runs live")
    loop.add_argument("--replay_dataset", help="the original training data, replayed")
    loop.add_argument(
        "--train_config", default=LoopSettings.train_config, help="the retrain's recipe (YAML)"
    )
    loop.add_argument("--max_steps", type=int, help="the retrain's steps (default: the recipe's)")
    loop.add_argument("--eval_limit", type=int, default=40, help="test questions compared")
    loop.add_argument("--heldout_share", type=float, default=0.2)
    loop.add_argument("--force", action="store_true", help="promote even if the gate refuses")
    loop.add_argument(
        "--train_args", nargs=argparse.REMAINDER, default=[], help="more train.py flags (last)"
    )


def run_review(store: FeedbackStore, args: argparse.Namespace) -> None:
    for ref in args.approve:
        decide(store, ref, "approved", args.reviewer)
    for ref in args.reject:
        decide(store, ref, "rejected", args.reviewer)
    items = queue(store, None)
    print(f"waiting for approval: {len(items)}")
    for item in items:
        answer = item["correction"] or item["reply"]
        print(f"{item['ref']}  {item['kind']}  {item['author'] or '-'}  "
              f"{item['question'][:60]!r} -> {answer[:60]!r}")  # fmt: skip


def print_loop(db: str, args: argparse.Namespace) -> int:
    settings = LoopSettings(
        db=db, outputs_dir=args.outputs_dir, replay_dataset=args.replay_dataset,
        train_config=args.train_config, max_steps=args.max_steps, eval_limit=args.eval_limit,
        heldout_share=args.heldout_share, force=args.force, train_args=args.train_args,
    )  # fmt: skip
    report = run_loop(settings)
    for name, seconds in report.stages_s.items():
        print(f"{name}: {seconds:.0f} s")
    verdict = "promoted" + (" (forced)" if report.forced else "") if report.promoted else "refused"
    print(f"{report.candidate}: {verdict}; the log: {report.log}")
    return 0 if report.promoted else 1


def print_handovers(store: FeedbackStore, limit: int) -> None:
    """Counts by intent, then the newest handed-over messages (redacted, as stored)."""
    counts = store.handover_counts()
    print(f"handed over: {sum(counts.values())}")
    for intent, count in counts.items():
        print(f"  {intent}: {count}")
    for reply in store.list_handovers(limit):
        question = next(
            (m["content"] for m in reversed(reply["conversation"]) if m["role"] == "user"), ""
        )
        print(f"{reply['created_at']}  {reply['intent']}  {reply['conversation_id']}  {question}")


def run_export(store: FeedbackStore, args: argparse.Namespace) -> None:
    filters = ExportFilter(args.adapter_version, args.since, args.until)
    report = export_feedback(
        store,
        args.out,
        filters=filters,
        heldout_share=args.heldout_share,
        include_likes=not args.no_likes,
    )
    print(report.to_markdown())
    print(f"written to {args.out}")


def main(argv: Sequence[str] | None = None) -> int:
    supportlm.setup_logging()
    args = parse_args(argv)
    try:
        db = str(args.db or AppSettings.from_env().feedback_db)
        store = FeedbackStore(db)
        if args.command == "loop":
            return print_loop(db, args)
        if args.command == "review":
            run_review(store, args)
            return 0
        if args.command == "export":
            run_export(store, args)
            return 0
        if args.command == "handovers":
            print_handovers(store, args.limit)
            return 0
        if args.command == "purge":
            counts = purge_older_than(store, args.days)
        elif args.conversation:
            counts = erase_conversation(store, args.conversation)
        else:
            counts = erase_reply_conversation(store, args.reply)
    except SupportLMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    scrubbed = counts.pop("exports_scrubbed", {})
    expired = counts.pop("exports_expired", [])
    print("deleted: " + ", ".join(f"{count} {table}" for table, count in counts.items()))
    for folder, files in scrubbed.items():
        print(f"removed from the export {folder}: lines of {', '.join(files)}")
    for folder in expired:
        print(f"deleted the expired export {folder}")
    for run in derived.trained_on([*scrubbed, *expired]):
        print(f"trained on an export that lost rows (retrain or delete it): {run}")
    return 0
